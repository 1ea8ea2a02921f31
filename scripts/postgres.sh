#!/usr/bin/env bash
# Installs PostgreSQL from Debian's packages (when missing), starts a cluster
# of its own for CivicGrid's tests on port 55432, and prints the admin URL the
# tests create their throw-away databases through. Idempotent.
set -euo pipefail

port=55432
cluster=civicgrid
password=civicgrid-test

log() { printf '==> %s\n' "$*" >&2; }

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)

if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version $cluster"; then
    log "creating PostgreSQL $version cluster $cluster on port $port"
    pg_createcluster "$version" "$cluster" -p "$port" >&2
fi
if ! pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $4}' | grep -qx online; then
    log "starting PostgreSQL cluster $cluster"
    pg_ctlcluster "$version" "$cluster" start >&2
fi
for _ in $(seq 1 50); do
    pg_isready -q -h 127.0.0.1 -p "$port" && break
    sleep 0.2
done
# A role of our own with a password, for TCP connections.
psql_admin() { su postgres -c "psql -q -tA -p $port -v ON_ERROR_STOP=1 -c \"$1\""; }
if [ -z "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = 'civicgrid'")" ]; then
    psql_admin "CREATE ROLE civicgrid LOGIN CREATEDB PASSWORD '$password'" >&2
fi
if [ -z "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = 'civicgrid'")" ]; then
    psql_admin "CREATE DATABASE civicgrid OWNER civicgrid" >&2
fi
echo "postgres://civicgrid:$password@127.0.0.1:$port/civicgrid"
