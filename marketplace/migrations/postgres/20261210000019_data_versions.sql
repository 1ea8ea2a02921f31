-- Versions of products' data. A version is immutable: its manifest lists
-- every file of every table (content-addressed in the product's folder),
-- and its fingerprint is the Merkle root over those files that a query's
-- audit entry records. `products.data_version` is the newest published one
-- (0: the product's folder as it is, for products with no version yet).
-- `data_center` is where its files are stored ("" in the embedded default):
-- queries on it run there. A version withdrawn (by its provider, or when
-- the product's retention ran out) can no longer be read; once no live
-- version lists its files, they are deleted (`files_deleted_at`). A
-- candidate (1) is the data uploaded for a revision waiting for review:
-- numbered after the newest version, read by no query, and published when
-- the revision is approved (or deleted when it is rejected).
CREATE TABLE product_data_versions (
    product_id TEXT NOT NULL REFERENCES products (id),
    version BIGINT NOT NULL,
    manifest TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    row_count BIGINT NOT NULL,
    byte_count BIGINT NOT NULL,
    completeness DOUBLE PRECISION NOT NULL,
    validity DOUBLE PRECISION NOT NULL,
    freshness_seconds BIGINT NOT NULL,
    upload_id TEXT NOT NULL,
    data_center TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    audit_index BIGINT NOT NULL,
    superseded_at BIGINT NOT NULL,
    withdrawn_at BIGINT NOT NULL,
    withdrawn_reason TEXT NOT NULL,
    files_deleted_at BIGINT NOT NULL,
    candidate BIGINT NOT NULL,
    PRIMARY KEY (product_id, version)
);
-- Uploads in progress and done. The bytes are staged where the product's
-- data lives (a runner in a hosting data center, named by endpoint), never
-- in this database. `state`: receiving, ingested or refused.
CREATE TABLE product_uploads (
    id TEXT PRIMARY KEY,
    product_id TEXT NOT NULL REFERENCES products (id),
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    table_name TEXT NOT NULL,
    format TEXT NOT NULL,
    append_rows BIGINT NOT NULL,
    for_revision BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    received_bytes BIGINT NOT NULL,
    data_center TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL,
    data_version BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX product_uploads_by_product ON product_uploads (product_id, created_at);
ALTER TABLE products ADD COLUMN data_version BIGINT NOT NULL DEFAULT 0;
