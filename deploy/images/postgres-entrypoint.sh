#!/bin/sh
# Entrypoint of local/postgres:15 (built by build-local.sh from Debian's postgresql-15).
# Honours the official image's POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB and
# POSTGRES_HOST_AUTH_METHOD (default scram-sha-256) and /docker-entrypoint-initdb.d on first
# start, then runs the server in the foreground listening on all addresses.
set -eu

PGDATA=${PGDATA:-/var/lib/postgresql/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
AUTH=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
export PGDATA

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$AUTH" != trust ]; then
    echo "docker-entrypoint: POSTGRES_PASSWORD is required (or POSTGRES_HOST_AUTH_METHOD=trust)" >&2
    exit 1
  fi
  set -- --username="$POSTGRES_USER" --auth-local=trust --auth-host="$AUTH" \
    --encoding=UTF8 --locale=C.UTF-8
  pwfile=$(mktemp)
  if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    # Through a file, so that the password never shows in a process listing.
    printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
    chown postgres "$pwfile"
    set -- "$@" --pwfile="$pwfile"
  fi
  runuser -u postgres -- initdb "$@" >/dev/null
  rm -f "$pwfile"
  {
    echo "host all all 0.0.0.0/0 $AUTH"
    echo "host all all ::/0 $AUTH"
  } >>"$PGDATA/pg_hba.conf"
  if [ "$POSTGRES_DB" != "postgres" ]; then
    echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\";" |
      runuser -u postgres -- postgres --single -D "$PGDATA" -j postgres >/dev/null
  fi
  # As the official image: scripts in /docker-entrypoint-initdb.d run once, against a
  # server listening on its socket only (e.g. deploy/compose/ha/primary-replication.sh).
  if [ -n "$(ls -A /docker-entrypoint-initdb.d 2>/dev/null)" ]; then
    runuser -u postgres -- pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
    export POSTGRES_USER POSTGRES_DB
    for script in /docker-entrypoint-initdb.d/*; do
      case $script in
        *.sh) echo "docker-entrypoint: running $script" >&2 && sh "$script" ;;
        *.sql) echo "docker-entrypoint: running $script" >&2 &&
          psql -X -q -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f "$script" ;;
      esac
    done
    runuser -u postgres -- pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  fi
fi

# setpriv execs: the server is PID 1 and gets Docker's signals itself (SIGINT = fast
# shutdown); runuser would stay in between as a parent that does not forward them as sent.
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" -c listen_addresses='*'
