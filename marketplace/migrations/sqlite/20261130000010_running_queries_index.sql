-- Every reservation counts its contract's running queries for the quota.
-- Without an index that read every query ever run (a full scan of a table
-- that only grows); running queries are few, so a partial index keeps it
-- to them.
CREATE INDEX queries_running ON queries (contract_id) WHERE state = 'running';
