-- Queries, billing and privacy budgets.
--
-- Every balance is the sum of its account's postings (kept in balance_minor
-- in the same transaction); the postings of one ledger entry sum to zero.
CREATE TABLE ledger_accounts (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    currency TEXT NOT NULL,
    balance_minor BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE ledger_postings (
    id BIGSERIAL PRIMARY KEY,
    entry_id TEXT NOT NULL,
    account_id TEXT NOT NULL REFERENCES ledger_accounts (id),
    amount_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    kind TEXT NOT NULL,
    query_id TEXT,
    at BIGINT NOT NULL
);
CREATE INDEX ledger_postings_by_account ON ledger_postings (account_id, at);
-- One row per query (and per idempotency key): running until its outcome
-- commits with its charge, postings and audit entry.
CREATE TABLE queries (
    id TEXT PRIMARY KEY,
    consumer_organization_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    provider_organization_id TEXT NOT NULL,
    contract_id TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    sql_text TEXT NOT NULL,
    algorithm_sha256 TEXT NOT NULL,
    period TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT NOT NULL,
    error_code BIGINT NOT NULL DEFAULT 0,
    fuel BIGINT NOT NULL DEFAULT 0,
    compute_units BIGINT NOT NULL DEFAULT 0,
    rows_read BIGINT NOT NULL DEFAULT 0,
    bytes_read BIGINT NOT NULL DEFAULT 0,
    rows_released BIGINT NOT NULL DEFAULT 0,
    bytes_released BIGINT NOT NULL DEFAULT 0,
    suppressed_rows BIGINT NOT NULL DEFAULT 0,
    truncated BIGINT NOT NULL DEFAULT 0,
    privacy_spent DOUBLE PRECISION NOT NULL DEFAULT 0,
    wall_time_ms BIGINT NOT NULL DEFAULT 0,
    currency TEXT NOT NULL,
    held_minor BIGINT NOT NULL,
    hold_open BIGINT NOT NULL,
    charge_minor BIGINT NOT NULL DEFAULT 0,
    result BYTEA,
    audit_index BIGINT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT,
    UNIQUE (consumer_organization_id, idempotency_key)
);
CREATE INDEX queries_by_product ON queries (product_id, created_at);
CREATE INDEX queries_open_holds ON queries (hold_open);
CREATE TABLE usage_counters (
    contract_id TEXT NOT NULL,
    period TEXT NOT NULL,
    queries BIGINT NOT NULL DEFAULT 0,
    compute_units BIGINT NOT NULL DEFAULT 0,
    rows_released BIGINT NOT NULL DEFAULT 0,
    subscription_charged BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (contract_id, period)
);
CREATE TABLE privacy_budgets (
    consumer_organization_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    period TEXT NOT NULL,
    spent DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer_organization_id, product_id, period)
);
