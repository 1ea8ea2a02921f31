-- Data products, their versions and registration events.
CREATE TABLE products (
    id TEXT PRIMARY KEY,
    provider_organization_id TEXT NOT NULL REFERENCES organizations (id),
    version BIGINT NOT NULL,
    state TEXT NOT NULL,
    spec BYTEA NOT NULL,
    tier TEXT NOT NULL,
    region TEXT NOT NULL,
    search_text TEXT NOT NULL,
    max_sensitivity BIGINT NOT NULL,
    registration_number TEXT UNIQUE,
    approved_by TEXT,
    registered_at BIGINT,
    public_notice_ends_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX products_by_state ON products (state, tier, region);
CREATE TABLE product_versions (
    product_id TEXT NOT NULL REFERENCES products (id),
    version BIGINT NOT NULL,
    spec BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (product_id, version)
);
CREATE TABLE registration_events (
    product_id TEXT NOT NULL REFERENCES products (id),
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    version BIGINT NOT NULL,
    at BIGINT NOT NULL,
    audit_index BIGINT NOT NULL,
    PRIMARY KEY (product_id, seq)
);
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
