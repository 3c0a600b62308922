#!/usr/bin/env bash
# Sets up what is missing (PostgreSQL) and runs the worker with a demo story on an
# embedded broker. Pass --keep-running to keep the worker up after the story.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-build-deps.sh
scripts/ensure-postgres.sh
exec cargo run --quiet --bin entitlement-worker -- demo "$@"
