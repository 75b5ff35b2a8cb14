-- The outbox sweep takes the rows due first, not the oldest first: a confirmation the broker
-- keeps refusing (returned: no queue bound for its routing key; or nacked) backs off, so
-- older unroutable rows can no longer fill every sweep and starve a routable one (issue 18,
-- item 8). Store.mark_failed counts the attempts and sets the next one.
ALTER TABLE execution.outbox
  ADD COLUMN attempts integer NOT NULL DEFAULT 0,
  ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now();
UPDATE execution.outbox SET next_attempt_at = created_at WHERE published_at IS NULL;
CREATE INDEX outbox_due ON execution.outbox (next_attempt_at) WHERE published_at IS NULL;
