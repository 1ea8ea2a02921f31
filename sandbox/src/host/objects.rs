//! Tables in a data center's object store (S3 or any store `object_store`
//! speaks to): the product's folder is a prefix, each table an object
//! `<table>.parquet` or `<table>.arrow` directly under it.
//!
//! Parquet is read in ranges: the footer once (then cached by the object's
//! entity tag), and of each row group only the column chunks a query asks
//! for, so a query over two columns of a wide table fetches those two.
//! Arrow IPC files have no such index and are fetched whole.
//!
//! The sandbox reads tables on blocking threads; the store is asynchronous.
//! Every request is sent on the runtime the store was given and waited for
//! on the reading thread, so a run never blocks that runtime's workers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use std::ops::Range;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use sha2::{Digest as _, Sha256};
use tokio::runtime::Handle;

use super::data::{
    BATCH_ROWS, FooterCache, Identity, SHARE_ROWS, TableScan, TableStore, footer_options, reorder,
    shaped, shares_of,
};
use crate::location::{self, LocationError};

/// The largest Arrow IPC table fetched whole (once per run, then kept for
/// the run); larger tables belong in Parquet, which is read by the column.
pub const MAX_ARROW_OBJECT_BYTES: u64 = 256 << 20;

/// The folder of `location` under `root` in an object store: the location
/// checked as a data directory's would be (relative, no `..`, no URI), so a
/// provider names a prefix inside the store's root and never above it.
///
/// # Errors
/// A location [`location::check`] refuses.
pub fn folder(root: &ObjectPath, location: &str) -> Result<ObjectPath, LocationError> {
    location::check(location)?;
    Ok(std::path::Path::new(location)
        .components()
        .filter_map(|component| match component {
            std::path::Component::Normal(part) => part.to_str(),
            _ => None,
        })
        .fold(root.clone(), ObjectPath::join))
}

/// Why a product's folder could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// No object is under the folder.
    #[error("{0}: no such folder in the store")]
    Missing(String),
    /// The store did not answer.
    #[error("{0}")]
    Store(String),
}

#[derive(Debug, Clone)]
struct StoredTable {
    name: String,
    object: ObjectMeta,
    parquet: bool,
}

/// A product's tables in an object store, as listed when it was discovered:
/// a run reads the objects that were there when it started.
#[derive(Clone)]
pub struct ObjectTables {
    store: Arc<dyn ObjectStore>,
    runtime: Handle,
    tables: Vec<StoredTable>,
    footers: Arc<FooterCache>,
    share_rows: u64,
    /// Arrow IPC tables fetched in this run, by name: a run asks for a
    /// table's schema and its scan several times.
    arrow_files: Arc<Mutex<HashMap<String, Bytes>>>,
}

impl std::fmt::Debug for ObjectTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTables")
            .field("store", &self.store.to_string())
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

impl ObjectTables {
    /// Every `.parquet` and `.arrow` object directly in `folder` of
    /// `store`, by name, listed now. `runtime` sends the store's requests
    /// (a multi-threaded runtime, or one a thread is driving); read the
    /// tables off its worker threads.
    ///
    /// # Errors
    /// [`ListError::Missing`] when the folder holds no object at all, and
    /// [`ListError::Store`] when it cannot be listed.
    pub async fn list(
        store: Arc<dyn ObjectStore>,
        runtime: Handle,
        folder: &ObjectPath,
    ) -> Result<Self, ListError> {
        let listed = store
            .list_with_delimiter(Some(folder))
            .await
            .map_err(|error| ListError::Store(format!("listing {folder}: {error}")))?;
        if listed.objects.is_empty() && listed.common_prefixes.is_empty() {
            return Err(ListError::Missing(folder.to_string()));
        }
        // Without an entity tag a read cannot ask for the version listed,
        // and a footer cached for one file could be used for its successor.
        if let Some(untagged) = listed.objects.iter().find(|object| object.e_tag.is_none()) {
            return Err(ListError::Store(format!(
                "{}: the store gives no entity tag",
                untagged.location
            )));
        }
        let mut tables: Vec<StoredTable> = listed
            .objects
            .into_iter()
            .filter_map(|object| {
                let name = object.location.filename()?.to_owned();
                let (stem, parquet) = match name.rsplit_once('.')? {
                    (stem, "parquet") => (stem, true),
                    (stem, "arrow") => (stem, false),
                    _ => return None,
                };
                Some(StoredTable {
                    name: stem.to_owned(),
                    object,
                    parquet,
                })
            })
            .collect();
        // A table in both formats is read as Parquet, as on a local disk.
        tables.sort_by(|a, b| (&a.name, !a.parquet).cmp(&(&b.name, !b.parquet)));
        tables.dedup_by(|later, first| later.name == first.name);
        Ok(Self {
            store,
            runtime,
            tables,
            footers: Arc::default(),
            share_rows: SHARE_ROWS,
            arrow_files: Arc::default(),
        })
    }

    /// [`Self::list`], waited for on this (non-runtime) thread.
    ///
    /// # Errors
    /// As [`Self::list`].
    pub fn discover(
        store: Arc<dyn ObjectStore>,
        runtime: Handle,
        folder: &ObjectPath,
    ) -> Result<Self, ListError> {
        wait(&runtime.clone(), Self::list(store, runtime, folder))
    }

    /// The same tables, with Parquet footers kept in `footers`.
    #[must_use]
    pub fn with_footer_cache(mut self, footers: Arc<FooterCache>) -> Self {
        self.footers = footers;
        self
    }

    /// The same tables, split into shares of at most `rows` rows.
    #[must_use]
    pub fn with_share_rows(mut self, rows: u64) -> Self {
        self.share_rows = rows.max(1);
        self
    }

    /// Only the tables `names`, each of which must have been listed.
    ///
    /// # Errors
    /// [`ListError::Missing`] naming the first table not listed.
    pub fn only(mut self, names: &[String], folder: &ObjectPath) -> Result<Self, ListError> {
        if let Some(missing) = names
            .iter()
            .find(|name| !self.tables.iter().any(|stored| &stored.name == *name))
        {
            return Err(ListError::Missing(format!("{folder}/{missing}")));
        }
        self.tables.retain(|stored| names.contains(&stored.name));
        Ok(self)
    }

    /// Checks that table `name`'s object holds `bytes` bytes hashing to
    /// `sha256`: read whole the first time, then trusted while its entity
    /// tag is the one that was hashed.
    ///
    /// # Errors
    /// A differing length or hash, or a store that does not answer.
    pub fn verify(&self, name: &str, sha256: &str, bytes: u64) -> Result<(), String> {
        let stored = self.table(name)?;
        let location = &stored.object.location;
        if stored.object.size != bytes {
            return Err(format!(
                "{location}: holds {} bytes where the version lists {bytes}",
                stored.object.size
            ));
        }
        let key = format!("{}/{location}", self.store);
        let identity = Identity::object(
            stored.object.size,
            SystemTime::from(stored.object.last_modified),
            stored.object.e_tag.clone(),
        );
        if self.footers.was_verified(&key, &identity, sha256) {
            return Ok(());
        }
        let reader = self.reader(stored);
        let hashed = wait(&self.runtime, async move {
            let options = GetOptions {
                if_match: reader.object.e_tag.clone(),
                ..GetOptions::default()
            };
            let mut stream = reader
                .store
                .get_opts(&reader.object.location, options)
                .await?
                .into_stream();
            let mut hasher = Sha256::new();
            while let Some(chunk) = stream.next().await {
                hasher.update(chunk?);
            }
            Ok::<_, object_store::Error>(hex::encode(hasher.finalize()))
        })
        .map_err(|error| format!("{location}: {error}"))?;
        if hashed != sha256 {
            return Err(format!(
                "{location}: its content is not the one the version lists"
            ));
        }
        self.footers.mark_verified(&key, identity, sha256);
        Ok(())
    }

    fn table(&self, table: &str) -> Result<&StoredTable, String> {
        self.tables
            .iter()
            .find(|stored| stored.name == table)
            .ok_or_else(|| format!("no table {table}"))
    }

    fn reader(&self, stored: &StoredTable) -> PinnedObject {
        PinnedObject {
            store: Arc::clone(&self.store),
            object: stored.object.clone(),
        }
    }

    /// A Parquet table's footer: cached while the object is the one it was
    /// read from, or fetched (a ranged read of the file's end).
    fn footer(&self, stored: &StoredTable) -> Result<ArrowReaderMetadata, String> {
        let key = format!("{}/{}", self.store, stored.object.location);
        let identity = Identity::object(
            stored.object.size,
            SystemTime::from(stored.object.last_modified),
            stored.object.e_tag.clone(),
        );
        if let Some(footer) = self.footers.get(&key, &identity) {
            return Ok(footer);
        }
        let mut reader = self.reader(stored);
        let footer = wait(
            &self.runtime,
            ArrowReaderMetadata::load_async(&mut reader, footer_options()),
        )
        .map_err(|error| format!("{}: {error}", stored.object.location))?;
        self.footers.put(&key, identity, footer.clone());
        Ok(footer)
    }

    /// An Arrow IPC table, fetched whole.
    fn arrow_file(
        &self,
        stored: &StoredTable,
        columns: Option<Vec<usize>>,
    ) -> Result<arrow_ipc::reader::FileReader<std::io::Cursor<bytes::Bytes>>, String> {
        let location = &stored.object.location;
        if stored.object.size > MAX_ARROW_OBJECT_BYTES {
            return Err(format!(
                "{location}: an Arrow IPC table over {MAX_ARROW_OBJECT_BYTES} bytes; store it as Parquet"
            ));
        }
        let cached = self
            .arrow_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&stored.name)
            .cloned();
        let bytes = match cached {
            Some(bytes) => bytes,
            None => {
                let bytes = wait(
                    &self.runtime,
                    self.reader(stored).fetch(0..stored.object.size),
                )
                .map_err(|error| format!("{location}: {error}"))?;
                self.arrow_files
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(stored.name.clone(), bytes.clone());
                bytes
            }
        };
        arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), columns)
            .map_err(|error| format!("{location}: {error}"))
    }

    fn scan_share(
        &self,
        table: &str,
        columns: &[usize],
        share: Option<(usize, usize)>,
    ) -> Result<TableScan, String> {
        let stored = self.table(table)?;
        let name = stored.object.location.to_string();
        if !stored.parquet {
            if share.is_some_and(|(_, parts)| parts > 1) {
                return Err(format!("table {table} is not stored in parts"));
            }
            let reader = self.arrow_file(stored, Some(columns.to_vec()))?;
            return Ok(Box::new(
                reader.map(move |b| b.map_err(|e| format!("{name}: {e}"))),
            ));
        }
        let footer = self.footer(stored)?;
        let (builder, order) = shaped(
            ParquetRecordBatchStreamBuilder::new_with_metadata(self.reader(stored), footer),
            columns,
            share,
        );
        let mut stream = builder.build().map_err(|e| format!("{name}: {e}"))?;
        let runtime = self.runtime.clone();
        let batches = std::iter::from_fn(move || {
            let batch = wait(&runtime, stream.next())?;
            Some(
                batch
                    .map_err(|e| format!("{name}: {e}"))
                    .and_then(|batch| reorder(batch, &order)),
            )
        });
        Ok(Box::new(Rebatched {
            batches: Box::new(batches),
            pending: Vec::new(),
            pending_rows: 0,
            done: false,
        }))
    }
}

/// Batches of exactly [`BATCH_ROWS`] rows (the last one fewer), whatever
/// the row groups: the asynchronous reader ends a batch at every row group,
/// the file reader does not, and the guest must see the same batches, and
/// burn the same fuel, wherever its data center keeps the file.
struct Rebatched {
    batches: TableScan,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    done: bool,
}

impl Rebatched {
    fn take(&mut self, rows: usize) -> Result<RecordBatch, String> {
        let schema = self.pending[0].schema();
        let whole = arrow_select::concat::concat_batches(&schema, &self.pending)
            .map_err(|e| e.to_string())?;
        let rest = whole.slice(rows, whole.num_rows() - rows);
        self.pending = if rest.num_rows() > 0 {
            vec![rest]
        } else {
            Vec::new()
        };
        self.pending_rows -= rows;
        Ok(whole.slice(0, rows))
    }
}

impl Iterator for Rebatched {
    type Item = Result<RecordBatch, String>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done && self.pending_rows < BATCH_ROWS {
            match self.batches.next() {
                Some(Ok(batch)) => {
                    self.pending_rows += batch.num_rows();
                    self.pending.push(batch);
                }
                Some(Err(error)) => return Some(Err(error)),
                None => self.done = true,
            }
        }
        if self.pending_rows == 0 {
            return None;
        }
        // A batch that is already whole passes as it is, uncopied.
        if self.pending.len() == 1 && self.pending_rows <= BATCH_ROWS {
            self.pending_rows = 0;
            return self.pending.pop().map(Ok);
        }
        let rows = self.pending_rows.min(BATCH_ROWS);
        Some(self.take(rows))
    }
}

/// Waits for `future`, sent on `runtime`, from a thread that may be a
/// worker of a multi-threaded runtime itself (then moved off it for the
/// wait, so the runtime's other tasks go on).
///
/// # Panics
/// On a worker of a current-thread runtime, which cannot wait on itself:
/// read tables off such a runtime (`spawn_blocking`).
fn wait<T>(runtime: &Handle, future: impl std::future::Future<Output = T>) -> T {
    match Handle::try_current() {
        Ok(current) if current.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| runtime.block_on(future))
        }
        _ => runtime.block_on(future),
    }
}

/// One object as it was listed: every read asks for that version (its
/// entity tag) and fails if the object was replaced since, so a run never
/// mixes the footer of one file with the pages of another.
struct PinnedObject {
    store: Arc<dyn ObjectStore>,
    object: ObjectMeta,
}

impl PinnedObject {
    async fn fetch(&self, range: Range<u64>) -> object_store::Result<Bytes> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: self.object.e_tag.clone(),
            ..GetOptions::default()
        };
        self.store
            .get_opts(&self.object.location, options)
            .await?
            .bytes()
            .await
    }
}

fn parquet_error(error: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(error))
}

impl AsyncFileReader for PinnedObject {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move { self.fetch(range).await.map_err(parquet_error) }.boxed()
    }

    /// The column chunks of a row group, in as few requests as their
    /// gaps allow (object_store's coalescing: ranges under 1 MiB apart).
    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            object_store::coalesce_ranges(
                &ranges,
                |range| self.fetch(range),
                object_store::OBJECT_STORE_COALESCE_DEFAULT,
            )
            .await
            .map_err(parquet_error)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.object.size;
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

impl TableStore for ObjectTables {
    fn tables(&self) -> Vec<String> {
        self.tables
            .iter()
            .map(|stored| stored.name.clone())
            .collect()
    }

    fn schema(&self, table: &str) -> Result<SchemaRef, String> {
        let stored = self.table(table)?;
        let schema = if stored.parquet {
            self.footer(stored)?.schema().as_ref().clone()
        } else {
            self.arrow_file(stored, None)?.schema().as_ref().clone()
        };
        Ok(Arc::new(schema.with_metadata(Default::default())))
    }

    fn scan(&self, table: &str, columns: &[usize]) -> Result<TableScan, String> {
        self.scan_share(table, columns, None)
    }

    fn modified(&self, table: &str) -> Option<SystemTime> {
        Some(SystemTime::from(
            self.table(table).ok()?.object.last_modified,
        ))
    }

    fn parts(&self, table: &str) -> Result<usize, String> {
        let stored = self.table(table)?;
        if !stored.parquet {
            return Ok(1);
        }
        Ok(shares_of(&self.footer(stored)?, self.share_rows))
    }

    fn scan_part(
        &self,
        table: &str,
        columns: &[usize],
        part: usize,
        parts: usize,
    ) -> Result<TableScan, String> {
        if parts <= 1 {
            return self.scan(table, columns);
        }
        self.scan_share(table, columns, Some((part, parts)))
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::{Array, Int64Array};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    fn batches(rows: &[usize]) -> Vec<Result<RecordBatch, String>> {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let mut next = 0i64;
        rows.iter()
            .map(|&n| {
                let ids = Int64Array::from_iter_values(next..next + n as i64);
                next += n as i64;
                Ok(RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(ids)]).unwrap())
            })
            .collect()
    }

    fn rebatched(input: Vec<Result<RecordBatch, String>>) -> Vec<Result<Vec<i64>, String>> {
        Rebatched {
            batches: Box::new(input.into_iter()),
            pending: Vec::new(),
            pending_rows: 0,
            done: false,
        }
        .map(|batch| {
            batch.map(|batch| {
                let ids = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap();
                ids.values().to_vec()
            })
        })
        .collect()
    }

    #[test]
    fn batches_are_cut_as_a_file_reader_cuts_them() {
        let out = rebatched(batches(&[0, 5, BATCH_ROWS, 3, 0]));
        let lengths: Vec<usize> = out.iter().map(|b| b.as_ref().unwrap().len()).collect();
        assert_eq!(lengths, [BATCH_ROWS, 8]);
        // Rows keep their order across the cuts.
        let all: Vec<i64> = out.into_iter().flat_map(Result::unwrap).collect();
        assert_eq!(all, (0..(BATCH_ROWS + 8) as i64).collect::<Vec<_>>());
        // A whole batch passes as it is; nothing in, nothing out.
        assert_eq!(rebatched(batches(&[BATCH_ROWS])).len(), 1);
        assert!(rebatched(batches(&[0, 0])).is_empty());
    }

    #[test]
    fn an_error_ends_the_batches_where_it_happened() {
        let mut input = batches(&[10, 20]);
        input.insert(1, Err("page 3 is corrupt".into()));
        let out = rebatched(input);
        assert_eq!(out[0], Err("page 3 is corrupt".to_owned()));
    }

    #[test]
    fn folders_stay_under_the_root() {
        let root = ObjectPath::from("city/core");
        assert_eq!(
            folder(&root, "products/population").unwrap().as_ref(),
            "city/core/products/population"
        );
        assert_eq!(
            folder(&root, "./products/population/").unwrap().as_ref(),
            "city/core/products/population"
        );
        assert_eq!(
            folder(&root, "products/Population_2026-v1.2")
                .unwrap()
                .as_ref(),
            "city/core/products/Population_2026-v1.2"
        );
        for refused in [
            "../edge/products/p",
            "products/../../p",
            "/products/p",
            "s3://other-bucket/p",
            "",
            ".",
            "products/team~a",
            "products/a%2Fb",
            "products/a b",
            "products\\b",
            "products/人口",
        ] {
            assert!(
                matches!(folder(&root, refused), Err(LocationError::Outside(_))),
                "{refused}"
            );
        }
    }
}
