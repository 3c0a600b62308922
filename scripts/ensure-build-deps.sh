#!/usr/bin/env bash
# Installs what building the worker needs beyond Rust when it is missing: a C toolchain,
# cmake and pkg-config (librdkafka is compiled from source) and OpenSSL's headers (TLS and
# SASL/SCRAM to Kafka). Safe to run again: with everything in place it only checks.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for package in build-essential cmake pkg-config libssl-dev; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "Installing ${missing[*]} (to build librdkafka with TLS)..." >&2
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
