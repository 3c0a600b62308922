#!/usr/bin/env bash
# Installs PostgreSQL when it is missing, starts it, and sets the password the defaults use
# (postgres/postgres on 127.0.0.1:5432). Safe to run again.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
  echo "Installing PostgreSQL..."
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q .; then
  as_root pg_createcluster "$version" main >/dev/null
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
  as_root pg_ctlcluster "$version" main start
fi
for _ in $(seq 1 50); do
  if as_root su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1; then break; fi
  sleep 0.2
done
as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
echo "PostgreSQL $version is running on 127.0.0.1:5432."
