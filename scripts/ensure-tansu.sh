#!/usr/bin/env bash
# Installs tansu 0.6.0 (a Kafka-protocol broker, used by the end-to-end tests of the binary)
# unless it is already installed. Building it takes 12 to 20 minutes on 2 cores, once.
set -euo pipefail

version=0.6.0
tansu="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
if [ -x "$tansu" ] && "$tansu" --version 2>/dev/null | grep -qx "tansu $version"; then
  echo "tansu $version is installed."
  exit 0
fi
echo "Installing tansu $version (a Kafka-protocol broker for the tests; this takes a while, once)..."
cargo install "tansu@$version" --locked --no-default-features --features dynostore,libsql
"$tansu" --version
