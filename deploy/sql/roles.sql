-- Least-privilege roles for the execution worker (PostgreSQL 13+).
--
--   execution_owner   owns the schema; `execution-worker migrate` and `execution-worker
--                     retention` run as it (DDL only: tables, monthly partitions ahead,
--                     detaching and dropping whole old partitions).
--   execution_worker  what the running workers log in as: read/insert everywhere the
--                     pipeline writes, UPDATE only on executions and outbox, nothing else.
--   execution_operator  the desk tools (`trail`, `report`, `dead-letters`): reads the audit
--                     store, and appends to operator_actions (who replayed or purged which
--                     dead letter); nothing else. The worker cannot write operator_actions.
--
-- The worker can NOT: update, delete or truncate audit events (no privilege, and the
-- append-only trigger as a second line); delete executions or outbox rows; create, alter,
-- attach, detach or drop anything (partitions included: it owns no table); read or write
-- other schemas of the database. Partitions created by the owner get the same baseline
-- (read + insert) from the default privileges below; the pipeline only uses the parents.
--
-- Run as a superuser (or a role with CREATEROLE and ownership of the database), once per
-- database, after creating the database:
--   psql "$ADMIN_URL" -v owner_password="'...'" -v worker_password="'...'" \
--        [-v operator_password="'...'"] -f roles.sql
-- then `DATABASE_URL=postgresql://execution_owner:...@host/db execution-worker migrate`
-- and run the workers with DATABASE_URL=postgresql://execution_worker:...@host/db.
-- Passwords come from psql variables so they never sit in this file or in shell history.
-- The script is idempotent: run it again after every migration (it re-grants on new tables).

\set ON_ERROR_STOP on
-- role names may be overridden (-v owner_role=... -v worker_role=...), e.g. one pair per
-- environment on a shared server
\if :{?owner_role}
\else
\set owner_role execution_owner
\endif
\if :{?worker_role}
\else
\set worker_role execution_worker
\endif
\if :{?operator_role}
\else
\set operator_role execution_operator
\endif

SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'owner_role') AS create_owner \gset
\if :create_owner
CREATE ROLE :"owner_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
\endif
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'worker_role') AS create_worker \gset
\if :create_worker
CREATE ROLE :"worker_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
\endif
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'operator_role') AS create_operator \gset
\if :create_operator
CREATE ROLE :"operator_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
\endif
\if :{?operator_password}
ALTER ROLE :"operator_role" PASSWORD :operator_password;
\endif
\if :{?owner_password}
ALTER ROLE :"owner_role" PASSWORD :owner_password;
\endif
\if :{?worker_password}
ALTER ROLE :"worker_role" PASSWORD :worker_password;
\endif

-- Nobody creates objects in public; the worker may only connect.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SELECT current_database() AS db \gset
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO :"owner_role";
GRANT CONNECT ON DATABASE :"db" TO :"worker_role";
GRANT CONNECT ON DATABASE :"db" TO :"operator_role";
GRANT CREATE ON DATABASE :"db" TO :"owner_role";  -- CREATE SCHEMA on first migration

CREATE SCHEMA IF NOT EXISTS execution AUTHORIZATION :"owner_role";
ALTER SCHEMA execution OWNER TO :"owner_role";
REVOKE ALL ON SCHEMA execution FROM PUBLIC;
GRANT USAGE ON SCHEMA execution TO :"worker_role";  -- USAGE, never CREATE
GRANT USAGE ON SCHEMA execution TO :"operator_role";

-- Tables the owner creates from now on get the worker's baseline (read + insert) ...
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA execution
  GRANT SELECT, INSERT ON TABLES TO :"worker_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA execution
  GRANT USAGE ON SEQUENCES TO :"worker_role";

-- ... and the tables that exist get it now (re-run after migrations; no-op when empty).
GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA execution TO :"worker_role";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA execution TO :"worker_role";

-- UPDATE only where the pipeline updates: execution rows (intent -> final state) and the
-- outbox (published_at, and the retry backoff: attempts, next_attempt_at). Never
-- execution_events (append-only audit), never DELETE/TRUNCATE.
SELECT to_regclass('execution.executions') IS NOT NULL AS migrated \gset
\if :migrated
GRANT UPDATE ON execution.executions TO :"worker_role";
GRANT UPDATE (published_at, attempts, next_attempt_at) ON execution.outbox TO :"worker_role";
SELECT to_regclass('execution.deal_checks') IS NOT NULL AS deal_checks \gset
\if :deal_checks
-- the settler deletes a deal check once the deals agreed (migration 0008)
GRANT DELETE ON execution.deal_checks TO :"worker_role";
\endif
REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER
  ON execution.execution_events, execution.schema_migrations FROM :"worker_role";
REVOKE DELETE, TRUNCATE, REFERENCES, TRIGGER
  ON execution.executions, execution.outbox FROM :"worker_role";
-- The operator reads everything the audit store holds (trail, report) ...
GRANT SELECT ON ALL TABLES IN SCHEMA execution TO :"operator_role";
\else
\echo 'schema not migrated yet: run execution-worker migrate as the owner role, then this file again'
\endif

-- ... and appends to operator_actions (migration 0003), which the worker never writes.
SELECT to_regclass('execution.operator_actions') IS NOT NULL AS desk_tools \gset
\if :desk_tools
GRANT SELECT, INSERT ON execution.operator_actions TO :"operator_role";
GRANT USAGE ON SEQUENCE execution.operator_actions_action_id_seq TO :"operator_role";
REVOKE ALL ON execution.operator_actions FROM :"worker_role";
REVOKE ALL ON SEQUENCE execution.operator_actions_action_id_seq FROM :"worker_role";
REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER
  ON execution.operator_actions FROM :"operator_role";
\endif
