#!/usr/bin/env bash
# A 2-node namespace cluster with the real controller and agents serving real traffic:
# builds, runs the demo, cleans up. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins --locked
exec target/debug/kubenft-demo "$@"
