-- Account routing (issue 20, part 1).
--
-- The account an execution was routed to: the session's configured account name (its
-- sessions-file alias, else "<server>:<login>"); on a refusal before any session, the
-- account the approval named. account_login stays: the login the terminal reported.
ALTER TABLE execution.executions ADD COLUMN account text;
-- `trail --account` and `report --by account` over a time range.
CREATE INDEX executions_account_received_at ON execution.executions (account, received_at);
