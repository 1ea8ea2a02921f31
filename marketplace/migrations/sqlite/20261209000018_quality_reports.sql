-- Consumers' reports of problems in a product's data and the provider's
-- answers: the find-report-verify loop on data quality. `state` is open or
-- fixed; a fixed report names the version that fixed it, and its reporter
-- may reopen it. Times are Unix ms.
CREATE TABLE quality_reports (
    id TEXT PRIMARY KEY,
    product_id TEXT NOT NULL REFERENCES products (id),
    product_version BIGINT NOT NULL,
    column_name TEXT NOT NULL,
    description TEXT NOT NULL,
    query_id TEXT NOT NULL,
    reporter_organization_id TEXT NOT NULL REFERENCES organizations (id),
    reporter_user_id TEXT NOT NULL,
    state TEXT NOT NULL,
    answer TEXT NOT NULL,
    fixed_in_version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX quality_reports_by_product ON quality_reports (product_id, state);
