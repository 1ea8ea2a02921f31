//! Where a product's tables come from. Local files now; an object store is
//! another [`TableStore`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Rows per batch streamed to the guest: large enough that per-batch costs
/// (IPC framing, a host call) vanish, small enough to bound guest memory.
pub const BATCH_ROWS: usize = 64 * 1024;

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

/// The most shares a scan splits into: more than the cores of any machine we
/// run on, few enough that each share's planning is noise next to its scan.
pub const MAX_PARTS: usize = 16;

/// Tables as files in one directory: `<table>.parquet` or `<table>.arrow`
/// (Arrow IPC file format).
#[derive(Debug, Clone)]
pub struct LocalDirectory {
    dir: PathBuf,
    tables: Vec<String>,
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
        }
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
        Ok(Self { dir, tables })
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

fn open(path: &Path) -> Result<File, String> {
    File::open(path).map_err(|e| format!("{}: {e}", path.display()))
}

impl TableStore for LocalDirectory {
    fn tables(&self) -> Vec<String> {
        self.tables.clone()
    }

    fn schema(&self, table: &str) -> Result<SchemaRef, String> {
        let (path, is_parquet) = self.file(table)?;
        let file = open(&path)?;
        if is_parquet {
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(Arc::new(
                builder
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

    /// A Parquet table splits by row group (share `k` reads groups `i` with
    /// `i % parts == k`), at most [`MAX_PARTS`] ways; Arrow IPC files do not split.
    fn parts(&self, table: &str) -> Result<usize, String> {
        let (path, is_parquet) = self.file(table)?;
        if !is_parquet {
            return Ok(1);
        }
        let builder = ParquetRecordBatchReaderBuilder::try_new(open(&path)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(builder.metadata().num_row_groups().clamp(1, MAX_PARTS))
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
        let file = open(&path)?;
        let name = path.display().to_string();
        if is_parquet {
            let mut builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| format!("{name}: {e}"))?;
            if let Some((part, parts)) = share {
                let groups = builder.metadata().num_row_groups();
                builder = builder.with_row_groups((part..groups).step_by(parts).collect());
            }
            let mask = ProjectionMask::roots(builder.parquet_schema(), columns.iter().copied());
            // The mask keeps file order; the guest asked for its own order.
            let mut sorted = columns.to_vec();
            sorted.sort_unstable();
            let order: Vec<usize> = columns
                .iter()
                .map(|c| sorted.binary_search(c).unwrap_or_default())
                .collect();
            let reader = builder
                .with_projection(mask)
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| format!("{name}: {e}"))?;
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

fn reorder(batch: RecordBatch, order: &[usize]) -> Result<RecordBatch, String> {
    if order.iter().enumerate().all(|(i, &o)| i == o) {
        return Ok(batch);
    }
    if batch.num_columns() == 0 {
        return Ok(batch);
    }
    batch.project(order).map_err(|e| e.to_string())
}
