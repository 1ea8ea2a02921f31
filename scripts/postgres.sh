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
# A machine stopped with the cluster running leaves it to crash recovery at
# the next start, which first syncs the whole data directory: with fsync, file
# by file, that once took longer than pg_ctl's 60 s and failed CI. syncfs does
# it per file system; the wait is long enough for recovery itself.
conf_dir=/etc/postgresql/$version/$cluster
if ! grep -qx "recovery_init_sync_method = syncfs" "$conf_dir/postgresql.conf"; then
    echo "recovery_init_sync_method = syncfs" >>"$conf_dir/postgresql.conf"
fi
online() {
    pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $4}' | grep -qx online
}
if ! online; then
    log "starting PostgreSQL cluster $cluster"
    if ! pg_ctlcluster "$version" "$cluster" start -- -t 600 >&2; then
        # The cluster holds only throw-away test databases: one that cannot
        # start is replaced rather than leaving every PostgreSQL test red.
        log "PostgreSQL cluster $cluster did not start: recreating it"
        pg_ctlcluster "$version" "$cluster" stop -m immediate >&2 2>/dev/null || true
        pg_dropcluster "$version" "$cluster" >&2
        pg_createcluster "$version" "$cluster" -p "$port" >&2
        echo "recovery_init_sync_method = syncfs" >>"$conf_dir/postgresql.conf"
        pg_ctlcluster "$version" "$cluster" start -- -t 600 >&2
    fi
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
# Each test makes a database of its own and leaves it behind (a test that
# fails keeps its evidence). Those older than a day are dropped here: over
# months of runs they had grown the cluster to thousands of databases, and
# with them the time crash recovery takes.
stale=$(psql_admin "SELECT datname FROM pg_database
    WHERE datname ~ '^cg_(test|up|bench)_[0-9a-f]+\$'
      AND (pg_stat_file('base/' || oid || '/PG_VERSION')).modification < now() - interval '1 day'")
if [ -n "$stale" ]; then
    log "dropping $(wc -l <<<"$stale") test databases older than a day"
    for name in $stale; do
        psql_admin "DROP DATABASE IF EXISTS $name WITH (FORCE)" >&2
    done
fi
echo "postgres://civicgrid:$password@127.0.0.1:$port/civicgrid"
