-- Desk tools (issue 20, parts 2 and 3).
--
-- Arrival price: the bid and ask of the tick the pre-trade checks used (the same tick that
-- gave requested_price and spread_pips), written with the intent row. Implementation
-- shortfall is measured from their mid to the fill price (worker/store/reports.py).
ALTER TABLE execution.executions
  ADD COLUMN arrival_bid double precision,
  ADD COLUMN arrival_ask double precision;
-- `report --since/--until` and `trail --since/--until` select by receive time.
CREATE INDEX executions_received_at ON execution.executions (received_at);

-- What operators did to dead letters (`execution-worker dead-letters replay|purge`):
-- who, when, what. Append-only like execution_events; the worker role may read it, only
-- an operator role writes it (deploy/sql/roles.sql).
CREATE TABLE execution.operator_actions (
  action_id bigserial PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  actor text NOT NULL,            -- the operator as given (--actor, else $USER@host)
  db_user text NOT NULL DEFAULT current_user,
  action text NOT NULL,           -- replay | purge | replay-failed | purge-failed
  queue text NOT NULL,
  dead_letter_id text NOT NULL,   -- the message_id, else sha256 of body and properties
  message_id text,
  idempotency_key text,
  reason text,                    -- why it was dead-lettered
  body_sha256 text NOT NULL,
  detail jsonb                    -- properties and a masked, bounded body preview
);
CREATE INDEX operator_actions_at ON execution.operator_actions (at);

CREATE FUNCTION execution.refuse_operator_action_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'operator_actions is append-only: % refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER operator_actions_append_only
  BEFORE UPDATE OR DELETE ON execution.operator_actions
  FOR EACH ROW EXECUTE FUNCTION execution.refuse_operator_action_change();
CREATE TRIGGER operator_actions_no_truncate
  BEFORE TRUNCATE ON execution.operator_actions
  FOR EACH STATEMENT EXECUTE FUNCTION execution.refuse_operator_action_change();
