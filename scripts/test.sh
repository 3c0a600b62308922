#!/usr/bin/env bash
# Sets up what is missing (PostgreSQL; a JDK, Maven and Apache Kafka's jars) and runs every
# check CI runs: formatting, lints and all the tests. The end-to-end tests start their own
# Kafka brokers (tests/common/kafka.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-build-deps.sh
scripts/ensure-postgres.sh
scripts/ensure-kafka.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets 2>&1 | tee target/test-output.txt
# Every input decoder, and the store behind them, under the fuzzer, briefly (run longer by
# hand: scripts/fuzz.sh 600).
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
