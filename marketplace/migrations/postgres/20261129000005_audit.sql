-- The audit log: entries (the leaves), the perfect subtree hashes of its RFC 9162
-- Merkle tree, and its head (size and right-edge hashes).
CREATE TABLE audit_entries (
    idx BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    body BYTEA NOT NULL
);
CREATE INDEX audit_entries_by_kind ON audit_entries (kind);
CREATE TABLE audit_nodes (
    node_key BIGINT PRIMARY KEY,
    hash BYTEA NOT NULL
);
CREATE TABLE audit_head (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    size BIGINT NOT NULL,
    frontier BYTEA NOT NULL
);
INSERT INTO audit_head (id, size, frontier) VALUES (1, 0, ''::bytea);
