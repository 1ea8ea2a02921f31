//! Where a product's tables come from. Local files now; an object store is
//! another [`TableStore`].

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderBuilder, ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
    RowSelection, RowSelector,
};
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};

/// Rows per batch streamed to the guest: large enough that per-batch costs
/// (IPC framing, a host call) vanish, small enough to bound guest memory and
/// to keep a batch and what the plan makes of it in a core's cache. TPC-H
/// Q1 reads about 100 bytes a row: at 64 Ki rows a batch was 6 MiB, and
/// 16 Ki rows took a tenth off the run, in the sandbox and natively alike
/// (8 Ki was slower again in the sandbox: twice the host calls).
pub const BATCH_ROWS: usize = 16 * 1024;

/// Batches of one table, with only the requested columns.
pub type TableScan = Box<dyn Iterator<Item = Result<RecordBatch, String>> + Send>;

/// A product's tables.
pub trait TableStore: Send + Sync {
    /// The table names, in the order the guest sees them.
    fn tables(&self) -> Vec<String>;
    /// A table's schema as stored.
    fn schema(&self, table: &str) -> Result<SchemaRef, String>;
    /// Streams `columns` (indices into [`Self::schema`]) of `table`.
    fn scan(&self, table: &str, columns: &[usize]) -> Result<TableScan, String>;

    /// When `table` was last written, where the store knows.
    fn modified(&self, _table: &str) -> Option<SystemTime> {
        None
    }

    /// Into how many shares a scan of `table` splits, so that instances on
    /// different cores can each read one. A property of the data, never of
    /// the machine: fuel must not depend on the core count. 1 means the
    /// table is read whole.
    fn parts(&self, _table: &str) -> Result<usize, String> {
        Ok(1)
    }

    /// Streams share `part` of `parts` of `table`. Every row is in exactly
    /// one share, and a share's batches come in the same order every time.
    /// This fallback splits by batch and still reads every batch; stores
    /// that report more than one part override it to read only their share.
    fn scan_part(
        &self,
        table: &str,
        columns: &[usize],
        part: usize,
        parts: usize,
    ) -> Result<TableScan, String> {
        let scan = self.scan(table, columns)?;
        Ok(Box::new(
            scan.enumerate()
                .filter(move |(index, _)| index % parts.max(1) == part)
                .map(|(_, batch)| batch),
        ))
    }
}

/// A store narrowed to what a product declares: only the declared tables,
/// and of each only the declared columns, in the file's order. Anything
/// else in the folder or the file is not there as far as a query can tell
/// (deny by default: a column added to a file is not served until the
/// product's schema names it).
pub struct DeclaredColumns {
    inner: Arc<dyn TableStore>,
    declared: HashMap<String, Vec<String>>,
    tables: Vec<String>,
}

impl DeclaredColumns {
    /// `inner` showing only `declared` tables and their columns.
    pub fn new(inner: Arc<dyn TableStore>, declared: HashMap<String, Vec<String>>) -> Self {
        let mut tables: Vec<String> = inner
            .tables()
            .into_iter()
            .filter(|t| declared.contains_key(t))
            .collect();
        tables.sort();
        Self {
            inner,
            declared,
            tables,
        }
    }

    /// The stored schema's indices of the declared columns, in file order.
    fn visible(&self, table: &str) -> Result<(SchemaRef, Vec<usize>), String> {
        let columns = self
            .declared
            .get(table)
            .ok_or_else(|| format!("no table {table}"))?;
        let stored = self.inner.schema(table)?;
        for column in columns {
            if stored.index_of(column).is_err() {
                return Err(format!(
                    "declared column {column} is not in table {table}'s file"
                ));
            }
        }
        let indices: Vec<usize> = (0..stored.fields().len())
            .filter(|&i| columns.contains(stored.field(i).name()))
            .collect();
        Ok((stored, indices))
    }

    fn stored_columns(&self, table: &str, columns: &[usize]) -> Result<Vec<usize>, String> {
        let (_, visible) = self.visible(table)?;
        columns
            .iter()
            .map(|&c| {
                visible
                    .get(c)
                    .copied()
                    .ok_or_else(|| format!("table {table} has no column {c}"))
            })
            .collect()
    }
}

impl TableStore for DeclaredColumns {
    fn tables(&self) -> Vec<String> {
        self.tables.clone()
    }

    fn schema(&self, table: &str) -> Result<SchemaRef, String> {
        let (stored, visible) = self.visible(table)?;
        stored
            .project(&visible)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }

    fn scan(&self, table: &str, columns: &[usize]) -> Result<TableScan, String> {
        self.inner
            .scan(table, &self.stored_columns(table, columns)?)
    }

    fn parts(&self, table: &str) -> Result<usize, String> {
        self.inner.parts(table)
    }

    fn modified(&self, table: &str) -> Option<SystemTime> {
        self.inner.modified(table)
    }

    fn scan_part(
        &self,
        table: &str,
        columns: &[usize],
        part: usize,
        parts: usize,
    ) -> Result<TableScan, String> {
        self.inner
            .scan_part(table, &self.stored_columns(table, columns)?, part, parts)
    }
}

/// The most shares a scan splits into: more than the cores of any machine we
/// run on, few enough that each share's planning is noise next to its scan.
pub const MAX_PARTS: usize = 16;

/// Rows a share of a split scan holds, at most (fewer only when the table
/// has fewer than two shares' worth, or more than [`MAX_PARTS`]' worth).
///
/// Every share is read by an instance of its own, and every instance plans
/// the query first: 4–7 ms for TPC-H Q1, against about 60 ms to aggregate
/// a million of its rows. At SF1 (6,001,215 line items) shares of a row
/// group each (six) planned seven times per query, about a tenth of the
/// split run on two cores; shares of up to 4 Mi rows split it in two, one
/// per core, and plan three times. The share count must stay a property of
/// the data, never of the machine (fuel must not depend on the core count),
/// so this is a constant, not the cores present.
pub const SHARE_ROWS: u64 = 4 * 1024 * 1024;

/// Parsed Parquet footers (schema, row groups, column chunk offsets), shared
/// by the scans of many runs. Without it a small query parses its table's
/// footer three times (schema, parts, scan), and every query parses it again:
/// on a tiny aggregate that was a few percent of the server's CPU. An entry
/// is used only while the file is still the one it was parsed from.
#[derive(Debug, Default)]
pub struct FooterCache {
    entries: Mutex<HashMap<String, (Identity, ArrowReaderMetadata)>>,
    parsed: AtomicU64,
    /// Files whose bytes were hashed and matched a manifest, as they were
    /// then: a file replaced since has another identity and is hashed again.
    verified: Mutex<HashMap<String, (Identity, String)>>,
}

/// The most footers kept; past it the cache starts over, so a host serving
/// very many files holds at most this many footers in memory.
const FOOTER_CACHE_ENTRIES: usize = 4096;

/// What tells a file from its replacement. On a local disk: a new device
/// or inode when it was renamed over, a new length, modification or change
/// time when it was rewritten in place (the change time is the kernel's: a
/// writer can set the modification time back, not the change time). In an
/// object store: a new entity tag (or, where the store gives none, a new
/// size or modification time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Identity {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    tag: Option<String>,
}

impl Identity {
    pub(crate) fn of(file: &File, path: &Path) -> Result<Self, String> {
        let metadata = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        use std::os::unix::fs::MetadataExt as _;
        Ok(Self {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified: metadata.modified().ok(),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
            tag: None,
        })
    }

    /// An object's identity: its size, modification time and entity tag.
    pub(crate) fn object(len: u64, modified: SystemTime, tag: Option<String>) -> Self {
        Self {
            device: 0,
            inode: 0,
            len,
            modified: Some(modified),
            changed: (0, 0),
            tag,
        }
    }
}

impl FooterCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many footers were parsed (not found in the cache) so far.
    pub fn footers_parsed(&self) -> u64 {
        self.parsed.load(Ordering::Relaxed)
    }

    /// The footer cached under `key`, if it was parsed from the file that
    /// `identity` names.
    pub(crate) fn get(&self, key: &str, identity: &Identity) -> Option<ArrowReaderMetadata> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key)
            .filter(|(cached, _)| cached == identity)
            .map(|(_, metadata)| metadata.clone())
    }

    /// Keeps `metadata`, just parsed from the file `identity` names.
    pub(crate) fn put(&self, key: &str, identity: Identity, metadata: ArrowReaderMetadata) {
        self.parsed.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= FOOTER_CACHE_ENTRIES && !entries.contains_key(key) {
            entries.clear();
        }
        entries.insert(key.to_owned(), (identity, metadata));
    }

    /// Whether the file `identity` names was hashed to `sha256` before.
    pub(crate) fn was_verified(&self, key: &str, identity: &Identity, sha256: &str) -> bool {
        let verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        verified
            .get(key)
            .is_some_and(|(known, hash)| known == identity && hash == sha256)
    }

    /// Remembers that the file `identity` names hashed to `sha256`.
    pub(crate) fn mark_verified(&self, key: &str, identity: Identity, sha256: &str) {
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= FOOTER_CACHE_ENTRIES && !verified.contains_key(key) {
            verified.clear();
        }
        verified.insert(key.to_owned(), (identity, sha256.to_owned()));
    }

    /// The footer of `file`, opened from `path`: cached, or parsed and cached.
    fn metadata(&self, path: &Path, file: &File) -> Result<ArrowReaderMetadata, String> {
        let identity = Identity::of(file, path)?;
        let key = path.to_string_lossy();
        if let Some(metadata) = self.get(&key, &identity) {
            return Ok(metadata);
        }
        let metadata = ArrowReaderMetadata::load(file, footer_options())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.put(&key, identity, metadata.clone());
        Ok(metadata)
    }
}

/// How footers are read. The offset index (where each page starts) lets a
/// share that starts or ends inside a row group skip the pages it does not
/// read instead of decompressing them; files written without one still
/// split.
pub(crate) fn footer_options() -> ArrowReaderOptions {
    ArrowReaderOptions::new().with_offset_index_policy(PageIndexPolicy::Optional)
}

/// Tables as files in one directory: `<table>.parquet` or `<table>.arrow`
/// (Arrow IPC file format).
#[derive(Debug, Clone)]
pub struct LocalDirectory {
    dir: PathBuf,
    tables: Vec<String>,
    footers: Arc<FooterCache>,
    share_rows: u64,
    /// SHA-256 every table's file must hash to, where a version says.
    expected: Option<Arc<HashMap<String, String>>>,
}

impl LocalDirectory {
    /// The tables named, from `dir`.
    pub fn new(
        dir: impl Into<PathBuf>,
        tables: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            dir: dir.into(),
            tables: tables.into_iter().map(Into::into).collect(),
            footers: Arc::default(),
            share_rows: SHARE_ROWS,
            expected: None,
        }
    }

    /// The same tables, each of whose file must hash to `expected[table]`:
    /// checked on the handle every read goes through (hashed the first time
    /// a file is opened, then trusted while it is the same file), so a file
    /// renamed over one that was checked is never read.
    #[must_use]
    pub fn with_expected_hashes(mut self, expected: HashMap<String, String>) -> Self {
        self.expected = Some(Arc::new(expected));
        self
    }

    /// Opens `table`'s file at `path`, checked against its expected hash.
    fn open_table(&self, table: &str, path: &Path) -> Result<File, String> {
        use std::io::{Seek as _, SeekFrom};
        let mut file = open(path)?;
        let Some(sha256) = self.expected.as_ref().and_then(|hashes| hashes.get(table)) else {
            return Ok(file);
        };
        let identity = Identity::of(&file, path)?;
        let key = path.to_string_lossy();
        if !self.footers.was_verified(&key, &identity, sha256) {
            let failed = |e: std::io::Error| format!("{}: {e}", path.display());
            let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
            std::io::copy(&mut file, &mut hasher).map_err(failed)?;
            if hex::encode(sha2::Digest::finalize(hasher)) != *sha256 {
                return Err(format!(
                    "{}: its content is not the one the version lists",
                    path.display()
                ));
            }
            file.seek(SeekFrom::Start(0)).map_err(failed)?;
            self.footers.mark_verified(&key, identity, sha256);
        }
        Ok(file)
    }

    /// The same tables, split into shares of at most `rows` rows instead of
    /// [`SHARE_ROWS`] (see [`shares_for`]). Fuel depends on it: a run bills
    /// the planning of every share's instance.
    #[must_use]
    pub fn with_share_rows(mut self, rows: u64) -> Self {
        self.share_rows = rows.max(1);
        self
    }

    /// The same tables, with Parquet footers kept in `footers`, which may be
    /// shared with other directories and outlive this one.
    #[must_use]
    pub fn with_footer_cache(mut self, footers: Arc<FooterCache>) -> Self {
        self.footers = footers;
        self
    }

    /// Every `.parquet` and `.arrow` file in `dir`, by name.
    pub fn discover(dir: impl Into<PathBuf>) -> Result<Self, String> {
        let dir = dir.into();
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut tables: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let path = e.path();
                let ext = path.extension()?.to_str()?;
                matches!(ext, "parquet" | "arrow")
                    .then(|| path.file_stem()?.to_str().map(str::to_owned))?
            })
            .collect();
        tables.sort();
        Ok(Self::new(dir, tables))
    }

    fn file(&self, table: &str) -> Result<(PathBuf, bool), String> {
        if !self.tables.iter().any(|t| t == table) {
            return Err(format!("no table {table}"));
        }
        let parquet = self.dir.join(format!("{table}.parquet"));
        if parquet.exists() {
            return Ok((parquet, true));
        }
        let arrow = self.dir.join(format!("{table}.arrow"));
        if arrow.exists() {
            return Ok((arrow, false));
        }
        Err(format!(
            "table {table} has no file in {}",
            self.dir.display()
        ))
    }
}

/// Opens a table's file, which must be the file itself, not a link: a link
/// in a product's folder could lead to any file the server can read.
/// Checked after opening, against what was opened, so a link swapped in
/// between the check and the open is caught too.
pub fn open(path: &Path) -> Result<File, String> {
    use std::os::unix::fs::MetadataExt;
    let failed = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = File::open(path).map_err(failed)?;
    let opened = file.metadata().map_err(failed)?;
    let named = std::fs::symlink_metadata(path).map_err(failed)?;
    if named.file_type().is_symlink() || (named.dev(), named.ino()) != (opened.dev(), opened.ino())
    {
        return Err(format!("{}: is a link, not a file", path.display()));
    }
    Ok(file)
}

impl TableStore for LocalDirectory {
    fn tables(&self) -> Vec<String> {
        self.tables.clone()
    }

    fn schema(&self, table: &str) -> Result<SchemaRef, String> {
        let (path, is_parquet) = self.file(table)?;
        let file = self.open_table(table, &path)?;
        if is_parquet {
            let footer = self.footers.metadata(&path, &file)?;
            Ok(Arc::new(
                footer
                    .schema()
                    .as_ref()
                    .clone()
                    .with_metadata(Default::default()),
            ))
        } else {
            let reader = arrow_ipc::reader::FileReader::try_new(file, None)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(Arc::new(
                reader
                    .schema()
                    .as_ref()
                    .clone()
                    .with_metadata(Default::default()),
            ))
        }
    }

    fn scan(&self, table: &str, columns: &[usize]) -> Result<TableScan, String> {
        self.scan_row_groups(table, columns, None)
    }

    fn modified(&self, table: &str) -> Option<SystemTime> {
        let (path, _) = self.file(table).ok()?;
        self.open_table(table, &path)
            .ok()?
            .metadata()
            .ok()?
            .modified()
            .ok()
    }

    /// A Parquet table stored in more than one row group splits into shares
    /// of at most the directory's share rows ([`SHARE_ROWS`] by default), see
    /// [`shares_for`]; each share is an equal run of the table's rows (see
    /// [`share_rows`]). Arrow IPC files do not split.
    fn parts(&self, table: &str) -> Result<usize, String> {
        let (path, is_parquet) = self.file(table)?;
        if !is_parquet {
            return Ok(1);
        }
        let footer = self
            .footers
            .metadata(&path, &self.open_table(table, &path)?)?;
        Ok(shares_of(&footer, self.share_rows))
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
        let (_, is_parquet) = self.file(table)?;
        if !is_parquet {
            return Err(format!("table {table} is not stored in parts"));
        }
        self.scan_row_groups(table, columns, Some((part, parts)))
    }
}

impl LocalDirectory {
    fn scan_row_groups(
        &self,
        table: &str,
        columns: &[usize],
        share: Option<(usize, usize)>,
    ) -> Result<TableScan, String> {
        let (path, is_parquet) = self.file(table)?;
        let file = self.open_table(table, &path)?;
        let name = path.display().to_string();
        if is_parquet {
            let footer = self.footers.metadata(&path, &file)?;
            let (builder, order) = shaped(
                ParquetRecordBatchReaderBuilder::new_with_metadata(file, footer),
                columns,
                share,
            );
            let reader = builder.build().map_err(|e| format!("{name}: {e}"))?;
            Ok(Box::new(reader.map(move |b| {
                let batch = b.map_err(|e| format!("{name}: {e}"))?;
                reorder(batch, &order)
            })))
        } else {
            let reader = arrow_ipc::reader::FileReader::try_new(file, Some(columns.to_vec()))
                .map_err(|e| format!("{name}: {e}"))?;
            Ok(Box::new(
                reader.map(move |b| b.map_err(|e| format!("{name}: {e}"))),
            ))
        }
    }
}

/// `builder` reading `columns` (in the order asked for) of share `share`
/// (part, parts) of the file, or all of it, in batches of [`BATCH_ROWS`];
/// and the order that puts each batch's columns back in the order asked for
/// (the mask reads in file order).
pub(crate) fn shaped<T>(
    mut builder: ArrowReaderBuilder<T>,
    columns: &[usize],
    share: Option<(usize, usize)>,
) -> (ArrowReaderBuilder<T>, Vec<usize>) {
    if let Some((part, parts)) = share {
        let (groups, selection) = share_rows(builder.metadata(), part, parts);
        builder = builder
            .with_row_groups(groups)
            .with_row_selection(selection);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), columns.iter().copied());
    let mut sorted = columns.to_vec();
    sorted.sort_unstable();
    let order: Vec<usize> = columns
        .iter()
        .map(|c| sorted.binary_search(c).unwrap_or_default())
        .collect();
    let builder = builder.with_projection(mask).with_batch_size(BATCH_ROWS);
    (builder, order)
}

/// How many shares the Parquet file `footer` describes splits into, with
/// shares of at most `share_rows` rows (see [`shares_for`]).
pub(crate) fn shares_of(footer: &ArrowReaderMetadata, share_rows: u64) -> usize {
    let metadata = footer.metadata();
    let rows = metadata
        .row_groups()
        .iter()
        .map(|group| u64::try_from(group.num_rows()).unwrap_or_default())
        .sum();
    shares_for(rows, metadata.num_row_groups(), share_rows)
}

/// How many shares a table of `rows` rows stored in `row_groups` row groups
/// splits into, with shares of at most `share_rows` rows.
///
/// Shares are equal in rows, so the cores that run them finish together
/// when the count is a multiple of theirs; an even count is, for the two
/// cores we run on. Before shares were runs of rows, they were whole
/// row groups: TPC-H SF1's line items (five groups of 1,048,576 rows and one
/// of 758,335) split 3,145,728 against 2,855,487 rows on two cores, so one
/// core idled for the last tenth of the scan, natively as in the sandbox.
///
/// A table splits only if it is stored in more than one row group and two
/// shares would each hold at least a sixteenth of `share_rows`: below that
/// the second instance's planning costs more than the scan it saves.
fn shares_for(rows: u64, row_groups: usize, share_rows: u64) -> usize {
    let share_rows = share_rows.max(1);
    if row_groups < 2 || rows < 2 * share_rows.div_ceil(16) {
        return 1;
    }
    let shares = usize::try_from(rows.div_ceil(share_rows)).unwrap_or(MAX_PARTS);
    shares.max(2).next_multiple_of(2).min(MAX_PARTS)
}

/// Share `part` of `parts` of a Parquet file: the row groups it touches and,
/// across them, the rows it reads. Share `k` reads the file's rows
/// `k * n / parts .. (k + 1) * n / parts` (of `n`), so every row is in
/// exactly one share and shares differ by at most one row.
pub(crate) fn share_rows(
    metadata: &ParquetMetaData,
    part: usize,
    parts: usize,
) -> (Vec<usize>, RowSelection) {
    let counts: Vec<u64> = metadata
        .row_groups()
        .iter()
        .map(|group| u64::try_from(group.num_rows()).unwrap_or_default())
        .collect();
    let total: u64 = counts.iter().sum();
    let bound = |k: usize| -> u64 {
        let k = (k.min(parts)) as u128;
        (u128::from(total) * k / parts.max(1) as u128) as u64
    };
    let (start, end) = (bound(part), bound(part + 1));
    let mut groups = Vec::new();
    let mut selectors = Vec::new();
    let mut first_row = 0u64;
    for (index, &rows) in counts.iter().enumerate() {
        let (from, to) = (start.max(first_row), end.min(first_row + rows));
        if from < to {
            groups.push(index);
            let skip_before = (from - first_row) as usize;
            let skip_after = (first_row + rows - to) as usize;
            if skip_before > 0 {
                selectors.push(RowSelector::skip(skip_before));
            }
            selectors.push(RowSelector::select((to - from) as usize));
            if skip_after > 0 {
                selectors.push(RowSelector::skip(skip_after));
            }
        }
        first_row += rows;
    }
    (groups, RowSelection::from(selectors))
}

pub(crate) fn reorder(batch: RecordBatch, order: &[usize]) -> Result<RecordBatch, String> {
    if order.iter().enumerate().all(|(i, &o)| i == o) {
        return Ok(batch);
    }
    if batch.num_columns() == 0 {
        return Ok(batch);
    }
    batch.project(order).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use arrow_array::{Array, Int64Array};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::*;

    /// `ids` 0..rows in row groups of `group` rows.
    fn write_ids(dir: &Path, rows: i64, group: usize) {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from_iter_values(0..rows))],
        )
        .unwrap();
        let properties = WriterProperties::builder()
            .set_max_row_group_row_count(Some(group))
            .build();
        let file = File::create(dir.join("ids.parquet")).unwrap();
        let mut writer = ArrowWriter::try_new(file, schema, Some(properties)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    fn ids(scan: TableScan) -> Vec<i64> {
        scan.flat_map(|batch| {
            let batch = batch.unwrap();
            let column = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            column.values().to_vec()
        })
        .collect()
    }

    #[test]
    fn shares_of_a_parquet_table_are_equal_runs_of_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        write_ids(dir.path(), 1_000, 100);
        let store = LocalDirectory::discover(dir.path())
            .unwrap()
            .with_share_rows(100);
        assert_eq!(store.parts("ids").unwrap(), 10);
        // Three shares of ten row groups: the boundaries fall inside groups 3
        // and 6, and each share is one run of rows in file order.
        let shares: Vec<Vec<i64>> = (0..3)
            .map(|part| ids(store.scan_part("ids", &[0], part, 3).unwrap()))
            .collect();
        assert_eq!(shares[0], (0..333).collect::<Vec<_>>());
        assert_eq!(shares[1], (333..666).collect::<Vec<_>>());
        assert_eq!(shares[2], (666..1_000).collect::<Vec<_>>());
        // One part is the whole table.
        assert_eq!(
            ids(store.scan_part("ids", &[0], 0, 1).unwrap()),
            (0..1_000).collect::<Vec<_>>()
        );
    }

    #[test]
    fn uneven_row_groups_still_split_into_shares_a_row_apart() {
        // Like TPC-H's line items: full groups and a smaller last one, which
        // whole-group shares could not balance.
        let dir = tempfile::tempdir().unwrap();
        write_ids(dir.path(), 5 * 1_024 + 741, 1_024);
        let store = LocalDirectory::discover(dir.path())
            .unwrap()
            .with_share_rows(1_024);
        assert_eq!(store.parts("ids").unwrap(), 6);
        for parts in [2, 4, 6, 7] {
            let mut next = 0;
            for part in 0..parts {
                let share = ids(store.scan_part("ids", &[0], part, parts).unwrap());
                let expected = (5 * 1_024 + 741) / parts as i64;
                assert!(
                    (share.len() as i64 - expected).abs() <= 1,
                    "share {part} of {parts} holds {} rows",
                    share.len()
                );
                assert_eq!(share, (next..next + share.len() as i64).collect::<Vec<_>>());
                next += share.len() as i64;
            }
            assert_eq!(next, 5 * 1_024 + 741);
        }
        // More shares than rows: the extra ones are empty, none fails.
        let dir = tempfile::tempdir().unwrap();
        write_ids(dir.path(), 3, 1);
        let store = LocalDirectory::discover(dir.path()).unwrap();
        let sizes: Vec<usize> = (0..5)
            .map(|part| ids(store.scan_part("ids", &[0], part, 5).unwrap()).len())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 3);
    }

    #[test]
    fn the_share_count_is_the_rows_over_share_rows_rounded_up_to_even() {
        // TPC-H's line items: SF1 splits in two, SF10 as far as it may.
        assert_eq!(shares_for(6_001_215, 6, SHARE_ROWS), 2);
        assert_eq!(shares_for(59_986_052, 58, SHARE_ROWS), MAX_PARTS);
        assert_eq!(shares_for(3 * SHARE_ROWS, 12, SHARE_ROWS), 4);
        assert_eq!(shares_for(3 * SHARE_ROWS + 1, 12, SHARE_ROWS), 4);
        assert_eq!(shares_for(4 * SHARE_ROWS + 1, 12, SHARE_ROWS), 6);
        // One row group never splits, however many rows it holds.
        assert_eq!(shares_for(6_001_215, 1, SHARE_ROWS), 1);
        assert_eq!(shares_for(0, 0, SHARE_ROWS), 1);
        // Too few rows for two shares worth their planning.
        assert_eq!(shares_for(SHARE_ROWS / 8 - 1, 6, SHARE_ROWS), 1);
        assert_eq!(shares_for(SHARE_ROWS / 8, 6, SHARE_ROWS), 2);
        // Smaller shares, as the split tests use.
        assert_eq!(shares_for(60_175, 8, 8_192), 8);
        assert_eq!(shares_for(2_000, 8, 250), 8);
        assert_eq!(shares_for(4_000, 40, 100), MAX_PARTS);
        assert_eq!(shares_for(10, 10, 0), 10);
    }

    #[test]
    fn a_table_in_many_row_groups_splits_at_most_max_parts_ways() {
        let dir = tempfile::tempdir().unwrap();
        write_ids(dir.path(), 4_000, 100);
        let store = LocalDirectory::discover(dir.path())
            .unwrap()
            .with_share_rows(100);
        assert_eq!(store.parts("ids").unwrap(), MAX_PARTS);
        let total: usize = (0..MAX_PARTS)
            .map(|part| ids(store.scan_part("ids", &[0], part, MAX_PARTS).unwrap()).len())
            .sum();
        assert_eq!(total, 4_000);
    }

    #[test]
    fn a_footer_is_parsed_once_across_runs_sharing_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        write_ids(dir.path(), 1_000, 100);
        let footers = Arc::new(FooterCache::new());
        for _run in 0..3 {
            let store = LocalDirectory::discover(dir.path())
                .unwrap()
                .with_footer_cache(Arc::clone(&footers))
                .with_share_rows(100);
            assert_eq!(store.schema("ids").unwrap().field(0).name(), "id");
            assert_eq!(store.parts("ids").unwrap(), 10);
            assert_eq!(ids(store.scan("ids", &[0]).unwrap()).len(), 1_000);
            assert_eq!(
                ids(store.scan_part("ids", &[0], 1, 10).unwrap()),
                (100..200).collect::<Vec<_>>()
            );
        }
        assert_eq!(footers.footers_parsed(), 1);

        // Without a shared cache, each directory parses the footer once.
        let store = LocalDirectory::discover(dir.path()).unwrap();
        store.schema("ids").unwrap();
        store.parts("ids").unwrap();
        assert_eq!(ids(store.scan("ids", &[0]).unwrap()).len(), 1_000);
        assert_eq!(store.footers.footers_parsed(), 1);
    }

    #[test]
    fn a_replaced_or_rewritten_file_is_never_read_with_its_old_footer() {
        let dir = tempfile::tempdir().unwrap();
        let footers = Arc::new(FooterCache::new());
        let store = || {
            LocalDirectory::discover(dir.path())
                .unwrap()
                .with_footer_cache(Arc::clone(&footers))
                .with_share_rows(100)
        };
        write_ids(dir.path(), 1_000, 100);
        assert_eq!(ids(store().scan("ids", &[0]).unwrap()).len(), 1_000);

        // Rewritten in place (same inode, new length).
        write_ids(dir.path(), 50, 100);
        assert_eq!(store().parts("ids").unwrap(), 1);
        assert_eq!(
            ids(store().scan("ids", &[0]).unwrap()),
            (0..50).collect::<Vec<_>>()
        );
        assert_eq!(footers.footers_parsed(), 2);

        // Renamed over (a new inode).
        let staging = tempfile::tempdir().unwrap();
        write_ids(staging.path(), 700, 100);
        std::fs::rename(
            staging.path().join("ids.parquet"),
            dir.path().join("ids.parquet"),
        )
        .unwrap();
        // Seven row groups of 100 now: eight shares of up to 100.
        assert_eq!(store().parts("ids").unwrap(), 8);
        assert_eq!(ids(store().scan("ids", &[0]).unwrap()).len(), 700);
        assert_eq!(footers.footers_parsed(), 3);

        // Replaced by something that is not Parquet: an error naming the
        // file, not the footer of what was there before.
        std::fs::write(dir.path().join("ids.parquet"), b"not parquet at all").unwrap();
        let refused = store().schema("ids").unwrap_err();
        assert!(refused.contains("ids.parquet"), "{refused}");
        assert!(store().scan("ids", &[0]).is_err());
    }

    #[test]
    fn arrow_files_and_small_tables_are_one_part() {
        let dir = tempfile::tempdir().unwrap();
        write_ids(dir.path(), 50, 100);
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![1, 2, 3]))],
        )
        .unwrap();
        let file = File::create(dir.path().join("numbers.arrow")).unwrap();
        let mut writer = arrow_ipc::writer::FileWriter::try_new(file, &schema).unwrap();
        writer.write(&batch).unwrap();
        writer.finish().unwrap();
        let store = LocalDirectory::discover(dir.path()).unwrap();
        assert_eq!(store.parts("ids").unwrap(), 1);
        assert_eq!(store.parts("numbers").unwrap(), 1);
        let refused = store.scan_part("numbers", &[0], 1, 2).err().unwrap();
        assert!(refused.contains("not stored in parts"), "{refused}");
        assert!(
            store
                .parts("missing")
                .unwrap_err()
                .contains("no table missing")
        );
    }
}
