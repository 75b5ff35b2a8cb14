-- Retention by whole partitions (issue 18, item 9) and one identity per session (item 10).
--
-- execution_events is partitioned by month on `at`, outbox by month on `created_at`; an old
-- month is detached, archived and dropped by `execution-worker retention` as the owner role,
-- never deleted row by row (the append-only trigger is cloned onto every partition and the
-- worker role holds no DELETE, TRUNCATE or ownership anywhere).
--
-- executions stays UNPARTITIONED on purpose: in PostgreSQL a primary key or unique index of a
-- partitioned table must contain the partition key, so `UNIQUE (idempotency_key)` would
-- become unique per month. A redelivered approval received in the next month would then
-- find no conflict for its intent's `ON CONFLICT DO NOTHING` and could be sent again. The
-- idempotency key stays unique across all time: executions is the exactly-once ledger.
--
-- Existing rows are copied into the new partitioned tables (ids, sequences and grants kept).

-- (item 10) the session identity (SessionSpec.identity) an execution was sent on: resumed by
-- it in every process, whatever that process calls the session. NULL on older rows, which
-- are resumed by session_id as before.
ALTER TABLE execution.executions ADD COLUMN session_key text;

-- Monthly partitions [month, next month) in UTC, named <table>_pYYYYMM: the current month,
-- `months_ahead` more, and the months of the timestamps in `also` (rows being moved in).
-- The worker role cannot create tables: `execution-worker migrate` and `execution-worker
-- retention` call this as the owner. A month whose rows already sit in the default
-- partition is skipped (creating it would fail); retention reports rows there.
CREATE FUNCTION execution.ensure_partitions(
  months_ahead integer, also timestamptz[] DEFAULT '{}'
) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
  parent text;
  col text;
  month timestamp;
  this_month timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
  part text;
  crowded boolean;
BEGIN
  FOR parent, col IN SELECT * FROM (VALUES ('execution_events', 'at'), ('outbox', 'created_at')) v
  LOOP
    FOR month IN
      SELECT m FROM generate_series(this_month,
        this_month + make_interval(months => greatest(months_ahead, 0)), interval '1 month') m
      UNION
      SELECT date_trunc('month', t AT TIME ZONE 'UTC') FROM unnest(also) t WHERE t IS NOT NULL
      ORDER BY 1
    LOOP
      part := format('%s_p%s', parent, to_char(month, 'YYYYMM'));
      CONTINUE WHEN to_regclass(format('execution.%I', part)) IS NOT NULL;
      EXECUTE format(
        'SELECT EXISTS (SELECT 1 FROM execution.%I WHERE %I >= %L AND %I < %L)',
        parent || '_default', col, month AT TIME ZONE 'UTC',
        col, (month + interval '1 month') AT TIME ZONE 'UTC') INTO crowded;
      IF crowded THEN
        RAISE NOTICE '% not created: rows of that month are in %_default', part, parent;
        CONTINUE;
      END IF;
      EXECUTE format(
        'CREATE TABLE execution.%I PARTITION OF execution.%I FOR VALUES FROM (%L) TO (%L)',
        part, parent, month AT TIME ZONE 'UTC', (month + interval '1 month') AT TIME ZONE 'UTC');
      IF parent = 'execution_events' THEN
        -- row triggers are cloned from the parent; statement (TRUNCATE) triggers are not
        EXECUTE format('CREATE TRIGGER execution_events_no_truncate BEFORE TRUNCATE'
          ' ON execution.%I FOR EACH STATEMENT EXECUTE FUNCTION'
          ' execution.refuse_event_change()', part);
      END IF;
      RETURN NEXT part;
    END LOOP;
  END LOOP;
END $$;
REVOKE ALL ON FUNCTION execution.ensure_partitions(integer, timestamptz[]) FROM PUBLIC;

-- Grants of the old tables go to the new ones (the worker's UPDATE on outbox columns too),
-- so the workers keep running before roles.sql is re-run.
CREATE FUNCTION execution.copy_grants_0004(source regclass, target regclass)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT a.grantee::regrole::text AS grantee, a.privilege_type AS privilege
    FROM pg_class c, aclexplode(c.relacl) a
    WHERE c.oid = source AND a.grantee <> c.relowner AND a.grantee <> 0
  LOOP
    EXECUTE format('GRANT %s ON %s TO %s', r.privilege, target, r.grantee);
  END LOOP;
  FOR r IN SELECT att.attname AS col, a.grantee::regrole::text AS grantee,
      a.privilege_type AS privilege
    FROM pg_attribute att, aclexplode(att.attacl) a
    WHERE att.attrelid = source AND att.attacl IS NOT NULL AND a.grantee <> 0
  LOOP
    EXECUTE format('GRANT %s (%I) ON %s TO %s', r.privilege, r.col, target, r.grantee);
  END LOOP;
END $$;

-- execution_events ------------------------------------------------------------------------
ALTER TABLE execution.execution_events RENAME TO execution_events_unpartitioned;
ALTER INDEX execution.execution_events_pkey RENAME TO execution_events_unpartitioned_pkey;
ALTER INDEX execution.execution_events_execution RENAME TO execution_events_unpartitioned_execution;
ALTER SEQUENCE execution.execution_events_event_id_seq OWNED BY NONE;

CREATE TABLE execution.execution_events (
  event_id bigint NOT NULL DEFAULT nextval('execution.execution_events_event_id_seq'),
  execution_id uuid NOT NULL REFERENCES execution.executions,
  at timestamptz NOT NULL,
  stage text NOT NULL,
  kind text NOT NULL,
  state text,
  function text,
  retcode integer,
  latency_ms double precision,
  detail jsonb,
  PRIMARY KEY (event_id, at)  -- a partitioned table's key includes the partition key
) PARTITION BY RANGE (at);
ALTER SEQUENCE execution.execution_events_event_id_seq OWNED BY execution.execution_events.event_id;
CREATE INDEX execution_events_execution ON execution.execution_events (execution_id, event_id);
CREATE TRIGGER execution_events_append_only
  BEFORE UPDATE OR DELETE ON execution.execution_events
  FOR EACH ROW EXECUTE FUNCTION execution.refuse_event_change();
CREATE TRIGGER execution_events_no_truncate
  BEFORE TRUNCATE ON execution.execution_events
  FOR EACH STATEMENT EXECUTE FUNCTION execution.refuse_event_change();
CREATE TABLE execution.execution_events_default PARTITION OF execution.execution_events DEFAULT;
CREATE TRIGGER execution_events_no_truncate
  BEFORE TRUNCATE ON execution.execution_events_default
  FOR EACH STATEMENT EXECUTE FUNCTION execution.refuse_event_change();
SELECT execution.copy_grants_0004('execution.execution_events_unpartitioned', 'execution.execution_events');

-- outbox ----------------------------------------------------------------------------------
ALTER TABLE execution.outbox RENAME TO outbox_unpartitioned;
ALTER INDEX execution.outbox_pkey RENAME TO outbox_unpartitioned_pkey;
ALTER INDEX execution.outbox_unpublished RENAME TO outbox_unpartitioned_unpublished;
ALTER INDEX execution.outbox_due RENAME TO outbox_unpartitioned_due;

-- One outbox row per execution is kept by the writer (Store.finish inserts it in the same
-- statement that moves the row to its final state, at most once); the key now includes
-- created_at because the table is partitioned by it.
CREATE TABLE execution.outbox (
  execution_id uuid NOT NULL REFERENCES execution.executions,
  routing_key text NOT NULL,
  payload text NOT NULL,
  correlation_id text,
  reply_to text,
  created_at timestamptz NOT NULL DEFAULT now(),
  published_at timestamptz,
  attempts integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (execution_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX outbox_unpublished ON execution.outbox (created_at) WHERE published_at IS NULL;
CREATE INDEX outbox_due ON execution.outbox (next_attempt_at) WHERE published_at IS NULL;
CREATE TABLE execution.outbox_default PARTITION OF execution.outbox DEFAULT;
SELECT execution.copy_grants_0004('execution.outbox_unpartitioned', 'execution.outbox');

-- partitions for every month that has rows, and three ahead; then the rows --------------
SELECT execution.ensure_partitions(3, ARRAY(
  SELECT date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    FROM execution.execution_events_unpartitioned
  UNION SELECT date_trunc('month', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    FROM execution.outbox_unpartitioned));

INSERT INTO execution.execution_events
  (event_id, execution_id, at, stage, kind, state, function, retcode, latency_ms, detail)
SELECT event_id, execution_id, at, stage, kind, state, function, retcode, latency_ms, detail
FROM execution.execution_events_unpartitioned;
INSERT INTO execution.outbox
  (execution_id, routing_key, payload, correlation_id, reply_to, created_at, published_at,
   attempts, next_attempt_at)
SELECT execution_id, routing_key, payload, correlation_id, reply_to, created_at, published_at,
  attempts, next_attempt_at
FROM execution.outbox_unpartitioned;

DROP TABLE execution.execution_events_unpartitioned;
DROP TABLE execution.outbox_unpartitioned;
DROP FUNCTION execution.copy_grants_0004(regclass, regclass);
