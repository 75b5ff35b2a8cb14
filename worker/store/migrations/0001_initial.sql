CREATE SCHEMA IF NOT EXISTS execution;

CREATE TABLE execution.executions (
  execution_id uuid PRIMARY KEY,
  idempotency_key text NOT NULL UNIQUE,
  rpm_order_id text,
  state text NOT NULL,
  rejection_reason text,
  rejection_details text,
  symbol text,
  broker_symbol text,
  direction smallint,
  intended_units double precision,
  intended_lots double precision,
  executed_units double precision,
  executed_lots double precision,
  requested_price double precision,
  fill_price double precision,
  spread_pips double precision,
  slippage_pips double precision,
  deviation_points integer,
  filling_mode integer,
  comment_token text NOT NULL,
  magic bigint,
  session_id text,
  account_login bigint,
  broker_order bigint,
  broker_deals bigint[],
  broker_position bigint,
  retcode integer,
  broker_comment text,
  attempts integer NOT NULL DEFAULT 0,
  request jsonb,
  decided_at timestamptz,
  received_at timestamptz NOT NULL,
  submitted_at timestamptz,
  completed_at timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX executions_rpm_order_id ON execution.executions (rpm_order_id);
CREATE INDEX executions_in_flight ON execution.executions (state)
  WHERE state IN ('RECEIVED', 'VALIDATED', 'SUBMITTING', 'SUBMITTED');

CREATE TABLE execution.execution_events (
  event_id bigserial PRIMARY KEY,
  execution_id uuid NOT NULL REFERENCES execution.executions,
  at timestamptz NOT NULL,
  stage text NOT NULL,
  kind text NOT NULL,
  state text,
  function text,
  retcode integer,
  latency_ms double precision,
  detail jsonb
);
CREATE INDEX execution_events_execution ON execution.execution_events (execution_id, event_id);

CREATE FUNCTION execution.refuse_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'execution_events is append-only: % refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER execution_events_append_only
  BEFORE UPDATE OR DELETE ON execution.execution_events
  FOR EACH ROW EXECUTE FUNCTION execution.refuse_event_change();
CREATE TRIGGER execution_events_no_truncate
  BEFORE TRUNCATE ON execution.execution_events
  FOR EACH STATEMENT EXECUTE FUNCTION execution.refuse_event_change();

CREATE TABLE execution.outbox (
  execution_id uuid PRIMARY KEY REFERENCES execution.executions,
  routing_key text NOT NULL,
  payload text NOT NULL,
  correlation_id text,
  reply_to text,
  created_at timestamptz NOT NULL DEFAULT now(),
  published_at timestamptz
);
CREATE INDEX outbox_unpublished ON execution.outbox (created_at) WHERE published_at IS NULL;
