#!/bin/sh
# First start of the primary (docker-entrypoint-initdb.d): a replication role for the
# standby, the pg_hba line that lets it stream, and the standby made synchronous: a commit
# returns once the standby has it (synchronous_commit = on, the default), so a failover to
# it loses no committed transaction (PostgreSQL docs, "Synchronous Replication", 27.2.8).
set -eu
psql -v ON_ERROR_STOP=1 -v pw="$REPLICATION_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'pw';
ALTER SYSTEM SET synchronous_standby_names = 'standby';
SQL
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
