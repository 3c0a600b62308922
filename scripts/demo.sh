#!/usr/bin/env bash
# Sets up what is missing (PostgreSQL, the build's system packages), builds the worker and
# runs it with a demo story on an embedded broker. Pass --keep-running to keep the worker up
# after the story.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-build-deps.sh
scripts/ensure-postgres.sh
if [ ! -x target/debug/entitlement-worker ]; then
  echo "Building the worker: the first build compiles librdkafka and about 300 crates, 5 to 15 minutes on 2 cores; later runs take seconds."
fi
cargo build --bin entitlement-worker
exec target/debug/entitlement-worker demo "$@"
