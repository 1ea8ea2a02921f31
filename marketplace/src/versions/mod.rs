//! Versions of a product's data, and the uploads that make them.
//!
//! A provider uploads one table's rows at a time (Parquet or CSV), in
//! chunks staged where the product's data lives; committing the upload
//! checks it against the length and SHA-256 declared up front, rewrites it
//! as Parquet typed by the product's declared table, stores it under its
//! content's name, measures the new version's quality, and publishes the
//! version: immutable, fingerprinted, and recorded in the audit log.
//! Queries read the newest version, or one a consumer pins.

use civicgrid_sandbox::manifest::Manifest;
use rand::RngCore as _;
use sqlx::AnyConnection;

use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result};
use crate::registry::Product;
use crate::spec::QualityMetrics;
use crate::store::{self, Backend};

pub(crate) mod model;

pub use model::{DataVersion, Upload, UploadState};

/// The largest upload: a day's partition of a city-wide table fits many
/// times over; larger loads are several uploads appended.
pub const MAX_UPLOAD_BYTES: i64 = 16 << 30;

/// The largest chunk: under gRPC's 4 MiB message limit with room for the
/// request's other fields.
pub const MAX_CHUNK_BYTES: usize = 3 << 20;

/// Most uploads one provider may have receiving at once (an upload left
/// unfinished for [`ABANDONED_AFTER_MS`] no longer counts): each holds staged
/// bytes on a runner's disk.
pub const MAX_RECEIVING_PER_PROVIDER: i64 = 10;

/// When an unfinished upload counts as abandoned (a runner removes its
/// staged bytes after as long).
pub const ABANDONED_AFTER_MS: i64 = 2 * 24 * 3600 * 1000;

/// Most versions listed at once.
pub const MAX_LISTED: i64 = 1000;

/// What a provider asks to upload.
#[derive(Clone, Debug)]
pub struct NewUpload {
    /// The product.
    pub product_id: String,
    /// The declared table.
    pub table: String,
    /// parquet or csv.
    pub format: String,
    /// Adds rows to the table instead of replacing them.
    pub append: bool,
    /// Typed by the revision waiting for review: the upload becomes that
    /// revision's data, published when it is approved.
    pub for_revision: bool,
    /// The file's length.
    pub size_bytes: i64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// A new upload id: 32 lowercase hex digits, the form a runner stages under.
#[must_use]
pub fn new_upload_id() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Checks `request` against `product`: a declared table, a known format,
/// a length within bounds, a well-formed hash.
///
/// # Errors
/// `InvalidArgument` naming the field; `FailedPrecondition` for a retired
/// product.
pub fn check(product: &Product, request: &NewUpload) -> Result<()> {
    if product.state == crate::registry::ProductState::Retired {
        return Err(MarketError::FailedPrecondition(format!(
            "product {} is retired; it takes no new data",
            product.id
        )));
    }
    let spec = typed_by(product, request.for_revision)?;
    if !spec.tables.iter().any(|t| t.name == request.table) {
        return Err(MarketError::invalid(
            "table",
            format!(
                "{:?} is not a table of product {}{}; declare it in a revision first",
                request.table,
                product.id,
                if request.for_revision {
                    "'s revision"
                } else {
                    ""
                }
            ),
        ));
    }
    if civicgrid_sandbox::ingest::Format::parse(&request.format).is_none() {
        return Err(MarketError::invalid("format", "parquet or csv"));
    }
    if !(1..=MAX_UPLOAD_BYTES).contains(&request.size_bytes) {
        return Err(MarketError::invalid(
            "size_bytes",
            format!("1 to {MAX_UPLOAD_BYTES} bytes; split larger loads into appended uploads"),
        ));
    }
    let hex = request.sha256.len() == 64
        && request
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return Err(MarketError::invalid(
            "sha256",
            "the file's SHA-256 as 64 lowercase hex digits",
        ));
    }
    Ok(())
}

/// The spec an upload is typed by: the one that serves, or the revision
/// waiting for review.
///
/// # Errors
/// `FailedPrecondition` for an upload for a revision when none waits.
pub fn typed_by(product: &Product, for_revision: bool) -> Result<&crate::spec::ProductSpec> {
    if !for_revision {
        return Ok(&product.spec);
    }
    product.pending_revision.as_ref().ok_or_else(|| {
        MarketError::FailedPrecondition(format!(
            "product {} has no revision waiting for review to upload data for",
            product.id
        ))
    })
}

/// The declared table `name` of `spec`, typed, as the ingest takes it.
///
/// # Errors
/// `FailedPrecondition` when the product no longer declares it.
pub fn declared_table(
    product: &Product,
    spec: &crate::spec::ProductSpec,
    name: &str,
) -> Result<civicgrid_sandbox::quality::DeclaredTable> {
    crate::quality::declared(&spec.tables)
        .into_iter()
        .find(|table| table.name == name)
        .ok_or_else(|| {
            MarketError::FailedPrecondition(format!(
                "product {} no longer declares table {name}",
                product.id
            ))
        })
}

/// Publishes `manifest` as `product`'s next data version, made by `upload`:
/// stored, made the newest, the upload marked ingested, and the audit entry
/// appended, in the caller's transaction. The product must still be at
/// the version the manifest was built on.
///
/// # Errors
/// `Aborted` when another version or the upload changed meanwhile.
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    product: &Product,
    base_version: i64,
    manifest: Manifest,
    quality: QualityMetrics,
    upload: &Upload,
) -> Result<DataVersion> {
    store::lock_audit_head(connection).await?;
    let now = store::now_ms();
    let version = base_version + 1;
    let candidate = upload.for_revision;
    if candidate {
        // Data for a revision: numbered after the newest version, which must
        // still be the one it was built on, and replacing any earlier data
        // uploaded for the revision.
        if crate::registry::get(connection, &product.id)
            .await?
            .data_version
            != base_version
        {
            return Err(MarketError::Aborted(format!(
                "another version of product {}'s data was published meanwhile; commit again",
                product.id
            )));
        }
        store::data_versions::delete_candidate(connection, &product.id, version).await?;
    } else {
        store::data_versions::publish_version(connection, &product.id, base_version, version, now)
            .await?;
    }
    let fingerprint = manifest.fingerprint();
    let rows = i64::try_from(manifest.rows()).unwrap_or(i64::MAX);
    let bytes = i64::try_from(manifest.bytes()).unwrap_or(i64::MAX);
    let index = log::append(
        connection,
        backend,
        &[Event {
            kind: "product.data_version".into(),
            actor: actor.to_owned(),
            tenant: product.provider_organization_id.clone(),
            subject: product.id.clone(),
            details: serde_json::json!({
                "data_version": version,
                "fingerprint": fingerprint,
                "rows": rows,
                "bytes": bytes,
                "upload": upload.id,
                "data_center": upload.data_center,
                "table": upload.table,
                "append": upload.append,
                "upload_sha256": upload.sha256,
                "candidate": candidate,
                // Every file, so that anyone holding the log recomputes
                // the fingerprint without asking the operator.
                "manifest": serde_json::to_value(&manifest)
                    .map_err(|error| MarketError::Corrupt(format!("manifest: {error}")))?,
                "completeness": quality.completeness,
                "validity": quality.validity,
                "freshness_seconds": quality.freshness_seconds,
            }),
        }],
    )
    .await?[0];
    let stored = DataVersion {
        product_id: product.id.clone(),
        version,
        manifest,
        fingerprint,
        rows,
        bytes,
        quality,
        upload_id: upload.id.clone(),
        data_center: upload.data_center.clone(),
        created_by: actor.to_owned(),
        created_at_unix_ms: now,
        audit_index: i64::try_from(index).unwrap_or(i64::MAX),
        superseded_at_unix_ms: 0,
        withdrawn_at_unix_ms: 0,
        withdrawn_reason: String::new(),
        files_deleted_at_unix_ms: 0,
        candidate,
    };
    if !candidate {
        store::data_versions::supersede(connection, &product.id, base_version, now).await?;
    }
    store::data_versions::insert_version(connection, &stored).await?;
    let mut done = upload.clone();
    done.state = UploadState::Ingested;
    done.data_version = version;
    done.updated_at_unix_ms = now.max(upload.updated_at_unix_ms + 1);
    store::data_versions::update_upload(connection, &done, upload).await?;
    Ok(stored)
}

/// Version `version` of `product_id`, checked against the signed log: its
/// manifest names only files in its data folder, hashes to the stored
/// fingerprint, and is the one the version's audit entry recorded. A row
/// edited in the database (another version's files under this number) is
/// `Corrupt`, never read.
///
/// # Errors
/// `NotFound`; `Corrupt` for a version that does not match its entry.
pub async fn verified(
    connection: &mut AnyConnection,
    product_id: &str,
    version: i64,
) -> Result<DataVersion> {
    let stored = get_version(connection, product_id, version).await?;
    if stored.withdrawn_at_unix_ms > 0 {
        return Err(MarketError::NotFound {
            what: "data version",
            id: format!("{product_id}@{version} (withdrawn)"),
        });
    }
    let corrupt = |why: &str| {
        tracing::error!(product = %product_id, version, why, "a data version does not match its audit entry");
        MarketError::Corrupt(format!(
            "version {version} of product {product_id}'s data does not match its audit entry"
        ))
    };
    if stored.manifest.check().is_err() {
        return Err(corrupt("its manifest names files outside its data folder"));
    }
    if stored.manifest.fingerprint() != stored.fingerprint {
        return Err(corrupt("its manifest does not hash to its fingerprint"));
    }
    let index = u64::try_from(stored.audit_index).map_err(|_| corrupt("no audit entry"))?;
    let entries = log::entries(connection, index, index + 1, "product.data_version", "", 1).await?;
    let entry: serde_json::Value = entries
        .first()
        .and_then(|entry| serde_json::from_slice(&entry.body).ok())
        .ok_or_else(|| corrupt("its audit entry is missing"))?;
    let recorded: Option<Manifest> =
        serde_json::from_value(entry["details"]["manifest"].clone()).ok();
    let matches = entry["subject"] == product_id
        && entry["details"]["data_version"] == version
        && entry["details"]["fingerprint"] == stored.fingerprint.as_str()
        && recorded.as_ref() == Some(&stored.manifest);
    if !matches {
        return Err(corrupt("its audit entry records another version"));
    }
    Ok(stored)
}

pub(crate) use crate::store::data_versions::{
    all_versions, candidate, count_receiving, files_deleted, get_upload, get_version,
    insert_upload, list_uploads, list_versions, product_ids, superseded_readable, update_upload,
    with_files_to_delete,
};

/// Withdraws version `version` of `product`: it can no longer be read, and
/// the audit log says who withdrew it and why. The newest version cannot be
/// withdrawn (publish a corrected one first), so a product always has data
/// to answer with once it has any.
///
/// # Errors
/// `FailedPrecondition` for the newest version or one withdrawn already,
/// `NotFound`, `InvalidArgument` naming `reason`.
pub async fn withdraw(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    product: &Product,
    version: i64,
    reason: &str,
) -> Result<u64> {
    crate::error::check_text("reason", reason, 2000, true)?;
    store::lock_audit_head(connection).await?;
    let stored = get_version(connection, &product.id, version).await?;
    if version >= product.data_version {
        return Err(MarketError::FailedPrecondition(format!(
            "version {version} is product {}'s newest data; publish a corrected version first",
            product.id
        )));
    }
    let now = store::now_ms();
    if !store::data_versions::withdraw(connection, &product.id, version, now, reason).await? {
        return Err(MarketError::FailedPrecondition(format!(
            "version {version} of product {} was withdrawn already",
            product.id
        )));
    }
    let index = log::append(
        connection,
        backend,
        &[Event {
            kind: "product.data_version_withdrawn".into(),
            actor: actor.to_owned(),
            tenant: product.provider_organization_id.clone(),
            subject: product.id.clone(),
            details: serde_json::json!({
                "data_version": version,
                "fingerprint": stored.fingerprint,
                "reason": reason,
            }),
        }],
    )
    .await?[0];
    Ok(index)
}

/// Why `measured` falls short of the provider's `minimums`, if it does.
#[must_use]
pub fn below_minimums(measured: &QualityMetrics, minimums: &QualityMetrics) -> Option<String> {
    let mut short = Vec::new();
    if measured.completeness < minimums.completeness {
        short.push(format!(
            "completeness {:.4} is below {:.4}",
            measured.completeness, minimums.completeness
        ));
    }
    if measured.validity < minimums.validity {
        short.push(format!(
            "validity {:.4} is below {:.4}",
            measured.validity, minimums.validity
        ));
    }
    if minimums.freshness_seconds > 0 && measured.freshness_seconds > minimums.freshness_seconds {
        short.push(format!(
            "the newest data is {} s old, more than {} s",
            measured.freshness_seconds, minimums.freshness_seconds
        ));
    }
    (!short.is_empty()).then(|| {
        format!(
            "the new version's quality is below the product's minimums: {}",
            short.join("; ")
        )
    })
}

/// Publishes `product`'s candidate version with the approval of the revision
/// it was uploaded for, in the caller's transaction (which approves it).
///
/// # Errors
/// `FailedPrecondition` when a version was published after the candidate's
/// base (its data would be lost).
pub async fn promote_candidate(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    product: &Product,
    candidate: &DataVersion,
) -> Result<()> {
    store::lock_audit_head(connection).await?;
    let now = store::now_ms();
    let base = candidate.version - 1;
    store::data_versions::publish_version(connection, &product.id, base, candidate.version, now)
        .await
        .map_err(|_| {
            MarketError::FailedPrecondition(format!(
                "product {}'s data changed after the revision's data was uploaded; upload it again",
                product.id
            ))
        })?;
    store::data_versions::supersede(connection, &product.id, base, now).await?;
    store::data_versions::promote(connection, &product.id, candidate.version).await?;
    log::append(
        connection,
        backend,
        &[Event {
            kind: "product.data_version_published".into(),
            actor: actor.to_owned(),
            tenant: product.provider_organization_id.clone(),
            subject: product.id.clone(),
            details: serde_json::json!({
                "data_version": candidate.version,
                "fingerprint": candidate.fingerprint,
                "with_revision": true,
            }),
        }],
    )
    .await?;
    Ok(())
}

/// Drops `product`'s candidate version (its revision was rejected), in the
/// caller's transaction; the candidate, if there was one.
///
/// # Errors
/// Database failures.
pub async fn discard_candidate(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    product: &Product,
) -> Result<Option<DataVersion>> {
    let Some(candidate) = store::data_versions::candidate(connection, &product.id).await? else {
        return Ok(None);
    };
    store::lock_audit_head(connection).await?;
    store::data_versions::delete_candidate(connection, &product.id, candidate.version).await?;
    log::append(
        connection,
        backend,
        &[Event {
            kind: "product.data_version_discarded".into(),
            actor: actor.to_owned(),
            tenant: product.provider_organization_id.clone(),
            subject: product.id.clone(),
            details: serde_json::json!({
                "data_version": candidate.version,
                "fingerprint": candidate.fingerprint,
            }),
        }],
    )
    .await?;
    Ok(Some(candidate))
}
