#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for tests/test_search_pg.py.
#
#   eval "$(bash scripts/pg-test.sh)"     # exports BLOCKDSL_PG_URL
#   bash scripts/pg-test.sh stop          # stops it again
#
# Installs PostgreSQL with apt when it is missing (as root on Debian/Ubuntu), initialises a
# cluster in a temporary folder owned by the `postgres` user (or by the calling user when
# not root), starts it on loopback only (port 5433, or the next free one), creates the
# database `blockdsl_test` and prints the export line on stdout; everything else goes to
# stderr. Idempotent: a second run finds the running server and prints the same line.
set -euo pipefail

PGROOT=${BLOCKDSL_PG_DIR:-${TMPDIR:-/tmp}/blockdsl-pg}
DB=blockdsl_test
log() { echo "pg-test: $*" >&2; }

find_bindir() {
  # The newest /usr/lib/postgresql/N/bin (Debian), else wherever initdb is on PATH.
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ]; then best=$d; fi
  done
  if [ -z "$best" ] && command -v initdb >/dev/null 2>&1; then
    best=$(dirname "$(command -v initdb)")
  fi
  echo "$best"
}

BIN=$(find_bindir)
if [ -z "$BIN" ]; then
  if [ "$(id -u)" != 0 ]; then
    log "PostgreSQL is not installed and this is not root: install it (apt-get install postgresql)"
    exit 1
  fi
  log "installing PostgreSQL with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  BIN=$(find_bindir)
fi
[ -x "$BIN/pg_ctl" ] || { log "no pg_ctl found"; exit 1; }

# Run a command as the cluster owner: `postgres` when we are root (initdb refuses root).
if [ "$(id -u)" = 0 ]; then
  OWNER=postgres
  as_owner() { runuser -u postgres -- "$@"; }
else
  OWNER=$(id -un)
  as_owner() { "$@"; }
fi

DATA=$PGROOT/data
if [ "${1:-}" = stop ]; then
  if [ -f "$DATA/postmaster.pid" ]; then as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2; fi
  exit 0
fi

mkdir -p "$PGROOT"
if [ "$(id -u)" = 0 ]; then chown "$OWNER" "$PGROOT"; fi
if [ ! -f "$DATA/PG_VERSION" ]; then
  log "initdb in $DATA"
  as_owner "$BIN/initdb" -D "$DATA" -U postgres -A trust --no-sync -E UTF8 >/dev/null
fi

port_of_running() {
  # The port the server in $DATA listens on, if it runs (line 4 of postmaster.pid).
  if as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    sed -n 4p "$DATA/postmaster.pid"
  fi
}

port_free() {
  # Nothing accepts a connection on it (bash's /dev/tcp; no other tool needed).
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

PORT=$(port_of_running || true)
if [ -z "$PORT" ]; then
  PORT=${BLOCKDSL_PG_PORT:-5433}
  while ! port_free "$PORT"; do PORT=$((PORT + 1)); done
  log "starting PostgreSQL on 127.0.0.1:$PORT"
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$PGROOT/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGROOT -c fsync=off -c max_connections=100" \
    start >&2
fi

if ! as_owner "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$DB'" postgres | grep -q 1; then
  as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
log "ready: postgresql://postgres@127.0.0.1:$PORT/$DB"
echo "export BLOCKDSL_PG_URL=postgresql://postgres@127.0.0.1:$PORT/$DB"
