-- Issue 27: the database epochs (system identifier, timeline) the workers have written to.
--
-- A promoted standby starts a new timeline; with asynchronous replication it may lack the
-- newest commits of the old primary. The first worker that connects to a new epoch records
-- it here; first_seen_at tells a worker started later when the switch happened, so that
-- approvals decided before it are reconciled with the broker by their magic before any
-- send (worker/store/epoch.py, worker/execution/failover.py).
CREATE TABLE IF NOT EXISTS execution.database_epochs (
  system_identifier bigint NOT NULL,
  timeline integer NOT NULL,
  first_seen_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (system_identifier, timeline)
);
