-- The demand list: data consumers ask for, and providers' answers.
CREATE TABLE demands (
    id TEXT PRIMARY KEY,
    consumer_organization_id TEXT NOT NULL REFERENCES organizations (id),
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    keywords TEXT NOT NULL,
    tier TEXT NOT NULL,
    region TEXT NOT NULL,
    monthly_budget_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    state TEXT NOT NULL,
    search_text TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    closed_at BIGINT
);
CREATE TABLE demand_answers (
    demand_id TEXT NOT NULL REFERENCES demands (id),
    seq BIGINT NOT NULL,
    provider_organization_id TEXT NOT NULL REFERENCES organizations (id),
    product_id TEXT NOT NULL REFERENCES products (id),
    message TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (demand_id, seq)
);
