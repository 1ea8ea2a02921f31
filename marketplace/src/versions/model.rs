//! Data versions and uploads as stored.

use civicgrid_sandbox::manifest::Manifest;

use crate::error::{MarketError, Result};
use crate::spec::QualityMetrics;

/// Where an upload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadState {
    /// Chunks are arriving.
    Receiving,
    /// Stored and made part of a version.
    Ingested,
    /// Refused; `message` says why.
    Refused,
}

impl UploadState {
    /// As stored.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Receiving => "receiving",
            Self::Ingested => "ingested",
            Self::Refused => "refused",
        }
    }

    /// From storage.
    ///
    /// # Errors
    /// `Corrupt` for a name never stored.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "receiving" => Ok(Self::Receiving),
            "ingested" => Ok(Self::Ingested),
            "refused" => Ok(Self::Refused),
            other => Err(MarketError::Corrupt(format!("upload state {other:?}"))),
        }
    }
}

/// A provider's upload of one table's rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Upload {
    /// 32 lowercase hex digits.
    pub id: String,
    /// The product.
    pub product_id: String,
    /// The provider that uploads.
    pub organization_id: String,
    /// The declared table the rows are of.
    pub table: String,
    /// parquet or csv.
    pub format: String,
    /// Adds the rows to the table's (a new partition) instead of replacing
    /// them.
    pub append: bool,
    /// Typed by the revision waiting for review, whose data it becomes.
    pub for_revision: bool,
    /// The file's length, declared up front.
    pub size_bytes: i64,
    /// Its SHA-256, declared up front.
    pub sha256: String,
    /// Bytes staged so far.
    pub received_bytes: i64,
    /// The data center whose store takes it ("" in the embedded default).
    pub data_center: String,
    /// The runner staging it ("" in the embedded default).
    pub endpoint: String,
    /// Where it is.
    pub state: UploadState,
    /// Why it was refused.
    pub message: String,
    /// The version it made (0 before).
    pub data_version: i64,
    /// Who started it.
    pub created_by: String,
    /// When it started, Unix ms.
    pub created_at_unix_ms: i64,
    /// Its last change, Unix ms.
    pub updated_at_unix_ms: i64,
}

/// One immutable version of a product's data.
#[derive(Clone, Debug, PartialEq)]
pub struct DataVersion {
    /// The product.
    pub product_id: String,
    /// Counts from 1.
    pub version: i64,
    /// Its files.
    pub manifest: Manifest,
    /// The Merkle root over its files (hex).
    pub fingerprint: String,
    /// Rows in every table.
    pub rows: i64,
    /// Bytes in every file.
    pub bytes: i64,
    /// Measured on this version's files.
    pub quality: QualityMetrics,
    /// The upload that made it.
    pub upload_id: String,
    /// The data center whose store holds its files ("" in the embedded
    /// default): queries on it run there.
    pub data_center: String,
    /// Who uploaded it.
    pub created_by: String,
    /// When, Unix ms.
    pub created_at_unix_ms: i64,
    /// The audit entry recording it.
    pub audit_index: i64,
    /// When a newer version was published (0 while it is the newest).
    pub superseded_at_unix_ms: i64,
    /// When it was withdrawn (0 while it can be read).
    pub withdrawn_at_unix_ms: i64,
    /// Why.
    pub withdrawn_reason: String,
    /// When its files no live version lists were deleted (0 before).
    pub files_deleted_at_unix_ms: i64,
    /// Data for a revision waiting for review: read by no query until the
    /// revision is approved.
    pub candidate: bool,
}
