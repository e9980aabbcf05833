#!/usr/bin/env bash
# The whole test suite: unit, golden (checked by the real nft), gRPC/grpcurl, and the
# network-namespace lab with the real controller and agents. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Leftovers of a lab whose test process was SIGKILLed.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^kn[0-9]+x[0-9]+-' || true); do
  ip netns del "$ns" 2>/dev/null || true
done

cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
