#!/usr/bin/env bash
# Runs issue 5's benchmarks (crate bench/, binary kubenft-bench) and writes BENCHMARKS.md.
# Needs root (network namespaces). Suites 1-5 take about 15 minutes on 2 cores
# (suite 5, network programming latency in the namespace lab, well under a minute); suite 6,
# self-healing (check costs, idle CPU with drift detection on, injection → repair per fault
# kind at 1k/10k/30k Services), about 20 minutes more.
#
#   scripts/bench.sh                                  # everything
#   scripts/bench.sh --suite 1,2 --sizes 1000,10000   # a quicker run (flags go to kubenft-bench)
#   scripts/bench.sh --suite 5 --programming-changes 100
#   scripts/bench.sh --suite 6                        # self-healing (--heal-sizes, --heal-injections)
#   scripts/bench.sh --suite 4 --tls on                # suites 3/4: TLS only (default: both)
#   scripts/bench.sh --suite 9                        # endurance: 30 min of churn (not in the default set)
#   scripts/bench.sh --suite 9 --endurance-secs 120    # its smoke test
#
# Each suite's latest tables are kept in target/kubenft-bench/suite-N.md and BENCHMARKS.md is
# rebuilt from all of them, so suites may be run separately.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release -p kubenft-bench -p kubenft-agent -p kubenft-controller
bin="${CARGO_TARGET_DIR:-target}/release"

# Suite 3 opens one HTTP/2 connection per simulated agent on loopback (both ends in this
# machine): 5,000 agents need more than the default 1,024 descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

"$bin/kubenft-bench" --agent-bin "$bin/kubenft-agent" --controller-bin "$bin/kubenft-controller" \
  --out BENCHMARKS.md "$@" &
pid=$!
# The bench deletes its namespaces (knb-<pid>-*, suite 5's lab kn<pid>x<n>-*) itself, also on
# SIGINT/SIGTERM; this catches a bench that died some other way, and the processes left in them.
cleanup() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^(knb-$pid-|kn${pid}x[0-9]+-)" |
    while read -r ns; do
      ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
      ip netns del "$ns" || true
    done || true # nothing left over is the usual case (grep then fails): not an error
}
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; cleanup' INT TERM
trap cleanup EXIT
wait "$pid"
echo "bench: wrote BENCHMARKS.md"
