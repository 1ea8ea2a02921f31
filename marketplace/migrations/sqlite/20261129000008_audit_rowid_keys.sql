-- In SQLite only `INTEGER PRIMARY KEY` makes the key the rowid; `BIGINT
-- PRIMARY KEY` kept a hidden rowid plus a separate unique index, so every
-- audit row was written to two b-trees. Rebuild both audit tables keyed by
-- rowid (PostgreSQL's BIGINT keys are already the table's own index).
CREATE TABLE audit_entries_by_rowid (
    idx INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    body BLOB NOT NULL
);
INSERT INTO audit_entries_by_rowid (idx, kind, tenant, body)
    SELECT idx, kind, tenant, body FROM audit_entries;
DROP TABLE audit_entries;
ALTER TABLE audit_entries_by_rowid RENAME TO audit_entries;
CREATE TABLE audit_nodes_by_rowid (
    node_key INTEGER PRIMARY KEY,
    hash BLOB NOT NULL
);
INSERT INTO audit_nodes_by_rowid (node_key, hash) SELECT node_key, hash FROM audit_nodes;
DROP TABLE audit_nodes;
ALTER TABLE audit_nodes_by_rowid RENAME TO audit_nodes;
