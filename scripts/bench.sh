#!/usr/bin/env bash
# The benchmark of issue 4 (docs/performance.md): makes sure PostgreSQL runs and Apache
# Kafka's jars are resolved (scripts/ensure-postgres.sh, scripts/ensure-kafka.sh), builds
# the worker and the harness in release, then runs the harness, which starts its own Kafka
# broker (scripts/kafka-broker.sh: one KRaft node on free ports, its data in a temporary
# directory, stopped when the harness ends) and uses a fresh PostgreSQL database per run.
# Arguments go to the harness; `scripts/bench.sh --help` lists them. Examples:
#   scripts/bench.sh                                             # the full run (1M events)
#   scripts/bench.sh --events 100000 --stored 10000 --latency-seconds 10   # a quick one
#   scripts/bench.sh --stored 10000,1000000,10000000             # state growth up to 10M
#   scripts/bench.sh --instructions-events none                  # without the callgrind runs
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--help" ] && [ "${1:-}" != "-h" ]; then
  scripts/ensure-build-deps.sh
  scripts/ensure-postgres.sh
  scripts/ensure-kafka.sh >/dev/null
  # valgrind counts the worker's own instructions per event (--instructions-events).
  if ! command -v valgrind >/dev/null 2>&1; then
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    echo "Installing valgrind (the benchmark's instruction counts)..." >&2
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
  fi
fi
cargo build --release --bin entitlement-worker --example benchmark
exec cargo run --release --example benchmark -- "$@"
