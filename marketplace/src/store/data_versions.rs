//! The `product_data_versions` and `product_uploads` tables.

use civicgrid_sandbox::manifest::Manifest;
use sqlx::{AnyConnection, Row as _};

use crate::error::{MarketError, Result};
use crate::spec::QualityMetrics;
use crate::versions::model::{DataVersion, Upload, UploadState};

const VERSION_COLUMNS: &str = "product_id, version, manifest, fingerprint, row_count, byte_count, \
     completeness, validity, freshness_seconds, upload_id, data_center, created_by, created_at, \
     audit_index, superseded_at, withdrawn_at, withdrawn_reason, files_deleted_at, candidate";

const UPLOAD_COLUMNS: &str = "id, product_id, organization_id, table_name, format, append_rows, for_revision, \
     size_bytes, sha256, received_bytes, data_center, endpoint, state, message, data_version, \
     created_by, created_at, updated_at";

fn version_from_row(row: &sqlx::any::AnyRow) -> Result<DataVersion> {
    let manifest: String = row.try_get("manifest")?;
    let manifest: Manifest = serde_json::from_str(&manifest)
        .map_err(|error| MarketError::Corrupt(format!("stored manifest: {error}")))?;
    Ok(DataVersion {
        product_id: row.try_get("product_id")?,
        version: row.try_get("version")?,
        manifest,
        fingerprint: row.try_get("fingerprint")?,
        rows: row.try_get("row_count")?,
        bytes: row.try_get("byte_count")?,
        quality: QualityMetrics {
            completeness: row.try_get("completeness")?,
            validity: row.try_get("validity")?,
            freshness_seconds: row.try_get("freshness_seconds")?,
        },
        upload_id: row.try_get("upload_id")?,
        data_center: row.try_get("data_center")?,
        created_by: row.try_get("created_by")?,
        created_at_unix_ms: row.try_get("created_at")?,
        audit_index: row.try_get("audit_index")?,
        superseded_at_unix_ms: row.try_get("superseded_at")?,
        withdrawn_at_unix_ms: row.try_get("withdrawn_at")?,
        withdrawn_reason: row.try_get("withdrawn_reason")?,
        files_deleted_at_unix_ms: row.try_get("files_deleted_at")?,
        candidate: row.try_get::<i64, _>("candidate")? != 0,
    })
}

fn upload_from_row(row: &sqlx::any::AnyRow) -> Result<Upload> {
    Ok(Upload {
        id: row.try_get("id")?,
        product_id: row.try_get("product_id")?,
        organization_id: row.try_get("organization_id")?,
        table: row.try_get("table_name")?,
        format: row.try_get("format")?,
        append: row.try_get::<i64, _>("append_rows")? != 0,
        for_revision: row.try_get::<i64, _>("for_revision")? != 0,
        size_bytes: row.try_get("size_bytes")?,
        sha256: row.try_get("sha256")?,
        received_bytes: row.try_get("received_bytes")?,
        data_center: row.try_get("data_center")?,
        endpoint: row.try_get("endpoint")?,
        state: UploadState::parse(&row.try_get::<String, _>("state")?)?,
        message: row.try_get("message")?,
        data_version: row.try_get("data_version")?,
        created_by: row.try_get("created_by")?,
        created_at_unix_ms: row.try_get("created_at")?,
        updated_at_unix_ms: row.try_get("updated_at")?,
    })
}

/// Stores a new version.
pub(crate) async fn insert_version(
    connection: &mut AnyConnection,
    version: &DataVersion,
) -> Result<()> {
    let manifest = serde_json::to_string(&version.manifest)
        .map_err(|error| MarketError::Corrupt(format!("manifest: {error}")))?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO product_data_versions ({VERSION_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
    )))
    .bind(&version.product_id)
    .bind(version.version)
    .bind(manifest)
    .bind(&version.fingerprint)
    .bind(version.rows)
    .bind(version.bytes)
    .bind(version.quality.completeness)
    .bind(version.quality.validity)
    .bind(version.quality.freshness_seconds)
    .bind(&version.upload_id)
    .bind(&version.data_center)
    .bind(&version.created_by)
    .bind(version.created_at_unix_ms)
    .bind(version.audit_index)
    .bind(version.superseded_at_unix_ms)
    .bind(version.withdrawn_at_unix_ms)
    .bind(&version.withdrawn_reason)
    .bind(version.files_deleted_at_unix_ms)
    .bind(i64::from(version.candidate))
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Makes `version` the product's newest, if `previous` still is.
///
/// # Errors
/// `Aborted` when another version was published meanwhile.
pub(crate) async fn publish_version(
    connection: &mut AnyConnection,
    product_id: &str,
    previous: i64,
    version: i64,
    now_ms: i64,
) -> Result<()> {
    let updated = sqlx::query(
        // Never the time it had: a reservation's cached product is confirmed
        // by that time, and must see the new version.
        "UPDATE products SET data_version = $1, \
         updated_at = CASE WHEN updated_at >= $2 THEN updated_at + 1 ELSE $2 END \
         WHERE id = $3 AND data_version = $4",
    )
    .bind(version)
    .bind(now_ms)
    .bind(product_id)
    .bind(previous)
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if updated == 1 {
        Ok(())
    } else {
        Err(MarketError::Aborted(format!(
            "another version of product {product_id}'s data was published meanwhile; commit again"
        )))
    }
}

/// Version `version` of a product.
///
/// # Errors
/// `NotFound`.
pub(crate) async fn get_version(
    connection: &mut AnyConnection,
    product_id: &str,
    version: i64,
) -> Result<DataVersion> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {VERSION_COLUMNS} FROM product_data_versions WHERE product_id = $1 AND version = $2"
    )))
    .bind(product_id)
    .bind(version)
    .fetch_optional(&mut *connection)
    .await?
    .ok_or_else(|| MarketError::NotFound {
        what: "data version",
        id: format!("{product_id}@{version}"),
    })?;
    version_from_row(&row)
}

/// A product's versions, newest first, at most `limit`.
pub(crate) async fn list_versions(
    connection: &mut AnyConnection,
    product_id: &str,
    limit: i64,
) -> Result<Vec<DataVersion>> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {VERSION_COLUMNS} FROM product_data_versions WHERE product_id = $1 \
         ORDER BY version DESC LIMIT $2"
    )))
    .bind(product_id)
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(version_from_row)
    .collect()
}

/// Stores a new upload.
pub(crate) async fn insert_upload(connection: &mut AnyConnection, upload: &Upload) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO product_uploads ({UPLOAD_COLUMNS}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
    )))
    .bind(&upload.id)
    .bind(&upload.product_id)
    .bind(&upload.organization_id)
    .bind(&upload.table)
    .bind(&upload.format)
    .bind(i64::from(upload.append))
    .bind(i64::from(upload.for_revision))
    .bind(upload.size_bytes)
    .bind(&upload.sha256)
    .bind(upload.received_bytes)
    .bind(&upload.data_center)
    .bind(&upload.endpoint)
    .bind(upload.state.name())
    .bind(&upload.message)
    .bind(upload.data_version)
    .bind(&upload.created_by)
    .bind(upload.created_at_unix_ms)
    .bind(upload.updated_at_unix_ms)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// An upload by id.
///
/// # Errors
/// `NotFound`.
pub(crate) async fn get_upload(connection: &mut AnyConnection, id: &str) -> Result<Upload> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {UPLOAD_COLUMNS} FROM product_uploads WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *connection)
    .await?
    .ok_or_else(|| MarketError::NotFound {
        what: "upload",
        id: id.to_owned(),
    })?;
    upload_from_row(&row)
}

/// Saves `upload`'s progress and outcome, only if it is still as `read`
/// (a concurrent chunk or commit makes this fail rather than be lost).
///
/// # Errors
/// `Aborted` when it changed meanwhile.
pub(crate) async fn update_upload(
    connection: &mut AnyConnection,
    upload: &Upload,
    read: &Upload,
) -> Result<()> {
    let updated = sqlx::query(
        "UPDATE product_uploads SET received_bytes = $1, data_center = $2, endpoint = $3, \
         state = $4, message = $5, data_version = $6, updated_at = $7 \
         WHERE id = $8 AND state = $9 AND received_bytes = $10 AND updated_at = $11",
    )
    .bind(upload.received_bytes)
    .bind(&upload.data_center)
    .bind(&upload.endpoint)
    .bind(upload.state.name())
    .bind(&upload.message)
    .bind(upload.data_version)
    .bind(upload.updated_at_unix_ms)
    .bind(&upload.id)
    .bind(read.state.name())
    .bind(read.received_bytes)
    .bind(read.updated_at_unix_ms)
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if updated == 1 {
        Ok(())
    } else {
        Err(MarketError::Aborted(format!(
            "upload {} changed meanwhile; ask for it and resume",
            upload.id
        )))
    }
}

/// Uploads of `organization` still receiving that were started since
/// `since_ms`.
pub(crate) async fn count_receiving(
    connection: &mut AnyConnection,
    organization: &str,
    since_ms: i64,
) -> Result<i64> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM product_uploads \
         WHERE organization_id = $1 AND state = 'receiving' AND created_at >= $2",
    )
    .bind(organization)
    .bind(since_ms)
    .fetch_one(&mut *connection)
    .await?;
    Ok(row.try_get("n")?)
}

/// Marks version `version` superseded at `now_ms` (a newer one was
/// published).
pub(crate) async fn supersede(
    connection: &mut AnyConnection,
    product_id: &str,
    version: i64,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE product_data_versions SET superseded_at = $1 \
         WHERE product_id = $2 AND version = $3 AND superseded_at = 0",
    )
    .bind(now_ms)
    .bind(product_id)
    .bind(version)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Withdraws a version still readable; `false` when it was withdrawn
/// already.
pub(crate) async fn withdraw(
    connection: &mut AnyConnection,
    product_id: &str,
    version: i64,
    now_ms: i64,
    reason: &str,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE product_data_versions SET withdrawn_at = $1, withdrawn_reason = $2 \
         WHERE product_id = $3 AND version = $4 AND withdrawn_at = 0",
    )
    .bind(now_ms)
    .bind(reason)
    .bind(product_id)
    .bind(version)
    .execute(&mut *connection)
    .await?
    .rows_affected()
        == 1)
}

/// Versions superseded and still readable: (product, version, superseded at).
pub(crate) async fn superseded_readable(
    connection: &mut AnyConnection,
) -> Result<Vec<(String, i64, i64)>> {
    sqlx::query(
        "SELECT product_id, version, superseded_at FROM product_data_versions \
         WHERE superseded_at > 0 AND withdrawn_at = 0 ORDER BY product_id, version",
    )
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|row| {
        Ok((
            row.try_get("product_id")?,
            row.try_get("version")?,
            row.try_get("superseded_at")?,
        ))
    })
    .collect()
}

/// Products with a withdrawn version whose files are not deleted yet.
pub(crate) async fn with_files_to_delete(connection: &mut AnyConnection) -> Result<Vec<String>> {
    sqlx::query(
        "SELECT DISTINCT product_id FROM product_data_versions \
         WHERE withdrawn_at > 0 AND files_deleted_at = 0 ORDER BY product_id",
    )
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|row| Ok(row.try_get("product_id")?))
    .collect()
}

/// Every version of a product, oldest first.
pub(crate) async fn all_versions(
    connection: &mut AnyConnection,
    product_id: &str,
) -> Result<Vec<DataVersion>> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {VERSION_COLUMNS} FROM product_data_versions WHERE product_id = $1 ORDER BY version"
    )))
    .bind(product_id)
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(version_from_row)
    .collect()
}

/// Records that a withdrawn version's files no live version lists are gone.
pub(crate) async fn files_deleted(
    connection: &mut AnyConnection,
    product_id: &str,
    version: i64,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE product_data_versions SET files_deleted_at = $1 \
         WHERE product_id = $2 AND version = $3 AND withdrawn_at > 0",
    )
    .bind(now_ms)
    .bind(product_id)
    .bind(version)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Publishes candidate `version`: no longer a candidate.
pub(crate) async fn promote(
    connection: &mut AnyConnection,
    product_id: &str,
    version: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE product_data_versions SET candidate = 0 \
         WHERE product_id = $1 AND version = $2 AND candidate = 1",
    )
    .bind(product_id)
    .bind(version)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Deletes candidate `version` (its revision was rejected, or new data was
/// uploaded for it).
pub(crate) async fn delete_candidate(
    connection: &mut AnyConnection,
    product_id: &str,
    version: i64,
) -> Result<()> {
    sqlx::query(
        "DELETE FROM product_data_versions WHERE product_id = $1 AND version = $2 AND candidate = 1",
    )
    .bind(product_id)
    .bind(version)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The product's candidate version, if it has one.
pub(crate) async fn candidate(
    connection: &mut AnyConnection,
    product_id: &str,
) -> Result<Option<DataVersion>> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {VERSION_COLUMNS} FROM product_data_versions WHERE product_id = $1 AND candidate = 1"
    )))
    .bind(product_id)
    .fetch_optional(&mut *connection)
    .await?
    .as_ref()
    .map(version_from_row)
    .transpose()
}

/// A product's uploads, newest first, at most `limit`.
pub(crate) async fn list_uploads(
    connection: &mut AnyConnection,
    product_id: &str,
    limit: i64,
) -> Result<Vec<Upload>> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {UPLOAD_COLUMNS} FROM product_uploads WHERE product_id = $1 \
         ORDER BY created_at DESC, id LIMIT $2"
    )))
    .bind(product_id)
    .bind(limit)
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(upload_from_row)
    .collect()
}

/// Every product's id.
pub(crate) async fn product_ids(connection: &mut AnyConnection) -> Result<Vec<String>> {
    sqlx::query("SELECT id FROM products ORDER BY id")
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(|row| Ok(row.try_get("id")?))
        .collect()
}
