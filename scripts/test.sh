#!/usr/bin/env bash
# Sets up what is missing (PostgreSQL, the tansu broker) and runs every check CI runs:
# formatting, lints and all the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
scripts/ensure-tansu.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets 2>&1 | tee target/test-output.txt
# Every input decoder, and the store behind them, under the fuzzer, briefly (run longer by
# hand: scripts/fuzz.sh 600).
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
