-- Issue 29: work per message. What every execution writes, cut to what a query needs.
--
-- 1. The deal checks of fills settled from their replies get a table of their own. They
--    were a `settling` document on the final row, cleared once the deals agreed: a third
--    version of every row (a non-HOT update, the column being in an index's predicate,
--    so every index of executions written again). Now: one narrow row inserted by the
--    final's statement and deleted, in a batch per settler round, when checked.
CREATE TABLE execution.deal_checks (
  execution_id uuid PRIMARY KEY,
  created_at timestamptz NOT NULL DEFAULT now(),
  document jsonb NOT NULL  -- worker.execution.settle.Awaited (JSON), verify: true
);
INSERT INTO execution.deal_checks (execution_id, created_at, document)
  SELECT execution_id, updated_at, settling FROM execution.executions
  WHERE settling IS NOT NULL
    AND state NOT IN ('RECEIVED', 'VALIDATED', 'SUBMITTING', 'SUBMITTED', 'UNKNOWN');
UPDATE execution.executions SET settling = NULL
  WHERE execution_id IN (SELECT execution_id FROM execution.deal_checks);

-- 2. Indexes no query of the worker or its tools needs. What each remaining one serves:
--    executions_pkey                by execution_id: every write, trail, the settler
--    executions_idempotency_key_key the exactly-once key (ON CONFLICT of the intent)
--    executions_rpm_order_id        trail ORDER_ID
--    executions_in_flight           recovery: rows still in flight (partial)
--    executions_received_at         report/trail time ranges, retention
--    executions_unknown             the background recheck (partial)
--    executions_settling            the settler's scan of rows nobody settles (partial)
--    execution_events_execution     trail and the audit reads (by execution_id)
--    outbox_pkey                    confirmation_of, marking published (by execution_id)
--    outbox_due                     the outbox sweep and the backlog gauge (partial)
-- Dropped:
--    executions_account_received_at: `trail --account` and `report --by account` read a
--      time range (executions_received_at) and filter the account;
--    outbox_unpublished: the backlog gauge's min(created_at) over unpublished rows reads
--      them through outbox_due (the same partial predicate, few rows);
--    execution_events_pkey (event_id, at): no query looks an event up by its id (trail
--      orders by at, event_id within one execution's rows).
DROP INDEX execution.executions_account_received_at;
DROP INDEX execution.outbox_unpublished;
ALTER TABLE execution.execution_events DROP CONSTRAINT execution_events_pkey;

-- 3. Foreign keys from the events and the outbox to executions. Each event row and each
--    outbox row paid a referential check (a key-share lock on the execution row). Both are
--    only ever inserted by the statement that inserts or updates their execution row, from
--    that statement's own RETURNING (worker.store.store: intent, update_in_flight, finish,
--    correct), and executions rows are never deleted: the reference holds by construction.
DO $$
DECLARE r record;
BEGIN
  FOR r IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
           WHERE contype = 'f' AND confrelid = 'execution.executions'::regclass
             AND conrelid IN ('execution.execution_events'::regclass, 'execution.outbox'::regclass)
  LOOP
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.tbl, r.conname);
  END LOOP;
END $$;
