-- Issue 18 items 1 and 3.
-- closing_sent_at: the slippage close's stage, committed BEFORE the first closing order is
-- sent, so that a redelivery counts the closing deals already done instead of closing again.
-- UNKNOWN rows: the broker showed nothing of an order whose outcome is unknown; a provisional
-- confirmation is on record and a background reconciler asks the broker again with backoff
-- (reconcile_attempts, next_reconcile_at) until a fill appears or the window ends.
-- outbox.version: a corrected confirmation is a NEW outbox row with the next version (the
-- worker may never rewrite a payload); message_id "<execution_id>:v<version>" from version 2.
-- The outbox is partitioned by created_at (0004), so its key must hold created_at too; one
-- row per (execution_id, version) is kept by the writer: versions are only ever added by the
-- holder of the execution's session, from the row's confirmation_version, in the statement
-- that moves that version forward.
ALTER TABLE execution.executions
  ADD COLUMN closing_sent_at timestamptz,
  ADD COLUMN confirmation_version integer NOT NULL DEFAULT 1,
  ADD COLUMN reconcile_attempts integer NOT NULL DEFAULT 0,
  ADD COLUMN next_reconcile_at timestamptz;
CREATE INDEX executions_unknown ON execution.executions (next_reconcile_at)
  WHERE state = 'UNKNOWN';
ALTER TABLE execution.outbox
  ADD COLUMN version integer NOT NULL DEFAULT 1 CHECK (version >= 1),
  DROP CONSTRAINT outbox_pkey,
  ADD PRIMARY KEY (execution_id, version, created_at);
