//! Turning a provider's staged upload into product data: checked against
//! what the provider declared, rewritten as canonical Parquet typed by the
//! product's declared table, and stored under its content's name. The same
//! steps serve a runner (its data center's store) and the embedded default
//! (the marketplace's data directory).

use civicgrid_sandbox::ingest::{self, Format};
use civicgrid_sandbox::manifest::ManifestFile;
use civicgrid_sandbox::quality::DeclaredTable;

use crate::staging::Staging;
use crate::storage::{ProductStore, StorageError};

/// One upload to ingest.
#[derive(Debug, Clone)]
pub struct IngestJob {
    /// The staged file's id.
    pub upload_id: String,
    /// The product's folder.
    pub location: String,
    /// The declared table the upload holds rows of.
    pub table: DeclaredTable,
    /// How the upload is encoded.
    pub format: Format,
    /// The provider's declared hash and length of the upload.
    pub sha256: String,
    /// The declared length.
    pub bytes: u64,
    /// Tables the product's folder holds as `<table>.parquet`, to copy into
    /// its first version.
    pub adopt: Vec<DeclaredTable>,
}

/// What became of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored: the upload's file, and each adopted table's.
    Ingested {
        /// The upload as stored.
        upload: ManifestFile,
        /// (table, file) of each adopted table.
        adopted: Vec<(String, ManifestFile)>,
    },
    /// The provider's file was refused, and why (for the provider).
    Refused(String),
}

/// Ingests `job`'s staged upload into `products`. The staged file is
/// removed whatever the outcome: a refused upload is sent again whole.
///
/// # Errors
/// A store that fails ([`StorageError::Store`]) or a location refused.
pub async fn ingest(
    products: &ProductStore,
    staging: &Staging,
    job: IngestJob,
) -> Result<IngestOutcome, StorageError> {
    let outcome = ingest_staged(products, staging, &job).await;
    let (staging, id) = (staging.clone(), job.upload_id.clone());
    let _ = tokio::task::spawn_blocking(move || staging.discard(&id)).await;
    outcome
}

async fn ingest_staged(
    products: &ProductStore,
    staging: &Staging,
    job: &IngestJob,
) -> Result<IngestOutcome, StorageError> {
    let failed = |error: crate::staging::StagingError| StorageError::Store(error.to_string());
    let staged = staging.path(&job.upload_id).map_err(failed)?;
    if !staged.exists() {
        return Ok(IngestOutcome::Refused(
            "nothing is staged for this upload; send it again".into(),
        ));
    }
    let digest = {
        let (staging, id) = (staging.clone(), job.upload_id.clone());
        blocking(move || staging.digest(&id))
            .await?
            .map_err(failed)?
    };
    if digest != (job.bytes, job.sha256.clone()) {
        return Ok(IngestOutcome::Refused(format!(
            "the upload's {} bytes hash to {}, not the declared {} bytes with SHA-256 {}",
            digest.0, digest.1, job.bytes, job.sha256
        )));
    }
    let canonical = staging.scratch(&job.upload_id, "parquet").map_err(failed)?;
    let upload = match canonical_file(
        staged,
        Some(job.format),
        job.table.clone(),
        canonical.clone(),
    )
    .await?
    {
        Ok(ingested) => ingested,
        Err(refused) => return Ok(IngestOutcome::Refused(refused.to_string())),
    };
    let path = products
        .put_file(&job.location, &job.table.name, &upload.sha256, &canonical)
        .await?;
    let upload = ManifestFile {
        path,
        sha256: upload.sha256,
        bytes: upload.bytes,
        rows: upload.rows,
    };
    let mut adopted = Vec::with_capacity(job.adopt.len());
    for table in &job.adopt {
        let copied = staging
            .scratch(&job.upload_id, &format!("{}.adopt", table.name))
            .map_err(failed)?;
        match products
            .fetch_table(&job.location, &table.name, &copied)
            .await
        {
            // Not there yet: the provider uploads it later.
            Ok(false) => continue,
            Ok(true) => {}
            Err(StorageError::Version(why)) => {
                return Ok(IngestOutcome::Refused(format!(
                    "the product has no version yet, and its folder's table {} cannot be carried into the first one: {why}; upload that table first",
                    table.name
                )));
            }
            Err(other) => return Err(other),
        }
        let canonical = staging
            .scratch(&job.upload_id, &format!("{}.parquet", table.name))
            .map_err(failed)?;
        let file = match canonical_file(copied, None, table.clone(), canonical.clone()).await? {
            Ok(file) => file,
            Err(refused) => {
                return Ok(IngestOutcome::Refused(format!(
                    "the product has no version yet, and its folder's table {} cannot be carried into the first one: {refused}; upload that table first",
                    table.name
                )));
            }
        };
        let path = products
            .put_file(&job.location, &table.name, &file.sha256, &canonical)
            .await?;
        adopted.push((
            table.name.clone(),
            ManifestFile {
                path,
                sha256: file.sha256,
                bytes: file.bytes,
                rows: file.rows,
            },
        ));
    }
    Ok(IngestOutcome::Ingested { upload, adopted })
}

/// The canonical file of `input`: an upload in `format`, or (`None`) a
/// table as a product's folder holds it, its undeclared columns left out.
async fn canonical_file(
    input: std::path::PathBuf,
    format: Option<Format>,
    table: DeclaredTable,
    output: std::path::PathBuf,
) -> Result<Result<ingest::Ingested, ingest::IngestError>, StorageError> {
    let ingested = blocking(move || match format {
        Some(format) => ingest::canonical_parquet(&input, format, &table, &output),
        None => ingest::canonical_parquet_of_declared(&input, &table, &output),
    })
    .await?;
    match ingested {
        Err(ingest::IngestError::Io(why)) => Err(StorageError::Store(why)),
        other => Ok(other),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StorageError::Store(format!("an ingest task failed: {error}")))
}
