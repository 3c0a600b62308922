#!/usr/bin/env bash
# The benchmark of issue 4 (docs/performance.md): builds the worker and the harness in
# release, then runs the harness, which starts its own tansu broker and uses a fresh
# PostgreSQL database per run. Arguments go to the harness; `scripts/bench.sh --help`
# lists them. Examples:
#   scripts/bench.sh                                             # the full run (1M events)
#   scripts/bench.sh --events 100000 --stored 10000 --latency-seconds 10   # a quick one
#   scripts/bench.sh --stored 10000,1000000,10000000             # state growth up to 10M
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--help" ] && [ "${1:-}" != "-h" ]; then
  scripts/ensure-postgres.sh
  scripts/ensure-tansu.sh
fi
cargo build --release --bin entitlement-worker --example benchmark
exec cargo run --release --example benchmark -- "$@"
