-- Issue 26: settlement that never doubles and never holds a terminal.
--
-- settling: what a handling left for the settler (worker.execution.settle.Awaited, JSON):
-- the legs sent, the orders the server took whose fills do not show yet, the fills the
-- replies confirmed, whether the last leg's outcome is unknown, and since when. Set on an
-- in-flight row (SUBMITTED) when its session is released before the broker's history caught
-- up; on a final row settled from replies that named their deals ("verify": its deals are
-- still to be checked against them); kept on an UNKNOWN row (the background recheck reads
-- it). NULL once nothing is left to settle or check.
ALTER TABLE execution.executions ADD COLUMN settling jsonb;
-- The settler's scan for rows nobody in this process is settling (a killed worker's):
-- SELECT ... WHERE settling IS NOT NULL AND state <> 'UNKNOWN' AND updated_at <= ...
CREATE INDEX executions_settling ON execution.executions (updated_at)
  WHERE settling IS NOT NULL;
