#!/bin/sh
# The standby of deploy/compose/ha.yml: on first start a base backup of the primary with
# -R (standby.signal + primary_conninfo), named "standby" (the primary's
# synchronous_standby_names); then the image's own entrypoint runs the server. The
# replication password is in ~postgres/.pgpass (libpq's default password file, read by
# pg_basebackup and by the WAL receiver), written on every start, never on a command line.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
PASSFILE=/var/lib/postgresql/.pgpass
printf '%s:5432:*:replicator:%s\n' "$PRIMARY_HOST" "$REPLICATION_PASSWORD" >"$PASSFILE"
chown postgres "$PASSFILE" && chmod 600 "$PASSFILE"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
  until runuser -u postgres -- pg_basebackup -d "host=$PRIMARY_HOST user=replicator application_name=standby" \
    -D "$PGDATA" -R -X stream -c fast; do
    echo "standby: primary not ready, retrying" >&2
    rm -rf "${PGDATA:?}"/*
    sleep 2
  done
fi
exec docker-entrypoint.sh postgres
