-- Contracts between a consumer organization and a product's provider.
CREATE TABLE contracts (
    id TEXT PRIMARY KEY,
    product_id TEXT NOT NULL REFERENCES products (id),
    consumer_organization_id TEXT NOT NULL REFERENCES organizations (id),
    provider_organization_id TEXT NOT NULL REFERENCES organizations (id),
    plan_id TEXT NOT NULL,
    operations BYTEA NOT NULL,
    monthly_query_quota BIGINT NOT NULL,
    state TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    decided_at BIGINT,
    expires_at BIGINT,
    duration_days BIGINT NOT NULL,
    purpose TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX contracts_by_consumer ON contracts (consumer_organization_id, product_id);
CREATE INDEX contracts_by_provider ON contracts (provider_organization_id);
