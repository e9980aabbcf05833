#!/usr/bin/env bash
# The whole test suite: unit, golden (checked by the real nft), gRPC/grpcurl, and the
# network-namespace lab with the real controller and agents. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh


cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
