-- The marketplace servers sharing this database (docs/marketplace.md,
-- "Several servers on one PostgreSQL"). A server renews `seen_at` (the
-- database's clock, Unix ms) while it lives; a running query names the
-- server running it, so a server gives up as interrupted only the queries
-- of servers that stopped renewing, never those of a live one.
CREATE TABLE marketplace_replicas (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL
);
ALTER TABLE queries ADD COLUMN replica_id TEXT NOT NULL DEFAULT '';
-- The origin and verifier key the log is signed under: the first server to
-- open the database records them, and a server with another key or origin
-- refuses to start rather than sign checkpoints no verifier accepts.
CREATE TABLE log_identity (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    origin TEXT NOT NULL,
    verifier_key TEXT NOT NULL
);
