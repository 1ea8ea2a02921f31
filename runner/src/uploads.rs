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

/// The longest line a CSV upload may have: far beyond any row of a table,
/// small enough that reading one never strains a runner's memory.
pub const MAX_CSV_LINE_BYTES: u64 = 1 << 20;

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
    /// When the product's policy aggregates over privacy units: how far the
    /// new version may differ from the one before.
    pub guard: Option<ChangeGuard>,
}

/// What keeps two versions from singling anyone out: the table's rows
/// change for no privacy unit, or for at least `min_units` of them.
#[derive(Debug, Clone)]
pub struct ChangeGuard {
    /// The privacy unit column (only a table that has it is guarded).
    pub unit_column: String,
    /// The output policy's minimum aggregation count.
    pub min_units: u64,
    /// Whether the upload adds to the table's rows (else replaces them).
    pub append: bool,
    /// The table's files in the version before (empty: it had none, or the
    /// product had no version and its folder's table is adopted).
    pub previous: Vec<ManifestFile>,
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
    /// Another ingest of the same upload is under way here.
    InProgress,
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
    let failed = |error: crate::staging::StagingError| StorageError::Store(error.to_string());
    let sealed = {
        let (staging, id) = (staging.clone(), job.upload_id.clone());
        blocking(move || staging.seal(&id)).await?
    };
    // Only the ingest that sealed the upload cleans up after it: a second
    // one for the same upload finds nothing, and leaves the first's files.
    let staged = match sealed {
        Ok(sealed) => sealed,
        Err(crate::staging::StagingError::Io(error))
            if error.kind() == std::io::ErrorKind::NotFound =>
        {
            let sealed = staging.scratch(&job.upload_id, "sealed").map_err(failed)?;
            if sealed.exists() {
                return Ok(IngestOutcome::InProgress);
            }
            return Ok(IngestOutcome::Refused(
                "nothing is staged for this upload (ingested or lost already); send it again"
                    .into(),
            ));
        }
        Err(other) => return Err(failed(other)),
    };
    let outcome = ingest_sealed(products, staging, &job, staged).await;
    let (staging, id) = (staging.clone(), job.upload_id.clone());
    let _ = tokio::task::spawn_blocking(move || staging.discard(&id)).await;
    outcome
}

async fn ingest_sealed(
    products: &ProductStore,
    staging: &Staging,
    job: &IngestJob,
    staged: std::path::PathBuf,
) -> Result<IngestOutcome, StorageError> {
    let failed = |error: crate::staging::StagingError| StorageError::Store(error.to_string());
    let digest = {
        let staged = staged.clone();
        blocking(move || Staging::digest_of(&staged))
            .await?
            .map_err(failed)?
    };
    if (digest.0, &digest.1) != (job.bytes, &job.sha256) {
        return Ok(IngestOutcome::Refused(format!(
            "the upload's {} bytes hash to {}, not the declared {} bytes with SHA-256 {}",
            digest.0, digest.1, job.bytes, job.sha256
        )));
    }
    // A CSV reader holds a record whole: a file of one endless line would
    // take as much memory as it is long.
    if job.format == Format::Csv && digest.2 > MAX_CSV_LINE_BYTES {
        return Ok(IngestOutcome::Refused(format!(
            "a line of the CSV is {} bytes long; at most {MAX_CSV_LINE_BYTES}",
            digest.2
        )));
    }
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
    if let Some(guard) = &job.guard
        && let Some(refused) = guard_change(products, staging, job, guard, &adopted).await?
    {
        return Ok(IngestOutcome::Refused(refused));
    }
    let path = products
        .put_file(&job.location, &job.table.name, &upload.sha256, &canonical)
        .await?;
    let upload = ManifestFile {
        path,
        sha256: upload.sha256,
        bytes: upload.bytes,
        rows: upload.rows,
    };
    Ok(IngestOutcome::Ingested { upload, adopted })
}

/// Why the new version would differ from the one before in too few privacy
/// units, if it would. The upload's canonical file is in the staging
/// directory; the table before is `guard.previous` in the store, or the
/// folder's table adopted into the first version, or nothing (no consumer
/// has seen this table: nothing to compare with).
async fn guard_change(
    products: &ProductStore,
    staging: &Staging,
    job: &IngestJob,
    guard: &ChangeGuard,
    adopted: &[(String, ManifestFile)],
) -> Result<Option<String>, StorageError> {
    use civicgrid_sandbox::change::{appended, changed_units, unit_summaries};
    use civicgrid_sandbox::manifest::{Manifest, ManifestTable};

    let table = job.table.name.clone();
    if !job
        .table
        .columns
        .iter()
        .any(|(name, _)| *name == guard.unit_column)
    {
        return Ok(None);
    }
    let mut previous = guard.previous.clone();
    previous.extend(
        adopted
            .iter()
            .filter(|(name, _)| *name == table)
            .map(|(_, file)| file.clone()),
    );
    if previous.is_empty() {
        return Ok(None);
    }
    let footers = std::sync::Arc::new(civicgrid_sandbox::FooterCache::new());
    let before = if guard.append {
        None
    } else {
        let manifest = Manifest {
            tables: vec![ManifestTable {
                name: table.clone(),
                files: previous,
            }],
        };
        Some(products.version(&job.location, &manifest, &footers).await?)
    };
    let uploaded: std::sync::Arc<dyn civicgrid_sandbox::TableStore> = std::sync::Arc::new(
        civicgrid_sandbox::LocalDirectory::new(staging.dir(), [job.upload_id.clone()]),
    );
    let (unit, id) = (guard.unit_column.clone(), job.upload_id.clone());
    let changed = blocking(move || {
        let after = unit_summaries(uploaded.as_ref(), &id, &unit)?;
        match before {
            // An append changes every unit it has rows of.
            None => Ok::<_, String>(appended(&after)),
            Some(before) => Ok(changed_units(
                &unit_summaries(before.as_ref(), &table, &unit)?,
                &after,
            )),
        }
    })
    .await?
    .map_err(StorageError::Store)?;
    let min = usize::try_from(guard.min_units).unwrap_or(usize::MAX);
    Ok((!changed.allowed(min)).then(|| {
        format!(
            "the upload changes the rows of {} of the table's {column} values{}, and a version changes none or at least {min} (the product's minimum aggregation count): comparing two versions must not single anyone out",
            changed.units,
            if changed.no_unit { " and rows with none" } else { "" },
            column = guard.unit_column
        )
    }))
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

/// Moves a file waiting in the product's refresh folder into staging as
/// upload `upload_id`: its length and SHA-256, or `None` when another took
/// it first.
///
/// # Errors
/// A bad id, location or name, or a store that fails.
pub async fn take_incoming(
    products: &ProductStore,
    staging: &Staging,
    upload_id: &str,
    (location, product_id): (&str, &str),
    incoming: &crate::storage::Incoming,
) -> Result<Option<(u64, String)>, StorageError> {
    let failed = |error: crate::staging::StagingError| StorageError::Store(error.to_string());
    let staged = staging.path(upload_id).map_err(failed)?;
    std::fs::create_dir_all(staging.dir())
        .map_err(|error| StorageError::Store(error.to_string()))?;
    if !products
        .take_incoming(location, product_id, incoming, &staged)
        .await?
    {
        return Ok(None);
    }
    let digest = blocking(move || Staging::digest_of(&staged))
        .await?
        .map_err(failed)?;
    Ok(Some((digest.0, digest.1)))
}
