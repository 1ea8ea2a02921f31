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
    fn shares_of_a_parquet_table_hold_every_row_once() {
        let dir = tempfile::tempdir().unwrap();
        write_ids(dir.path(), 1_000, 100);
        let store = LocalDirectory::discover(dir.path()).unwrap();
        assert_eq!(store.parts("ids").unwrap(), 10);
        let mut seen = Vec::new();
        for part in 0..3 {
            let share = ids(store.scan_part("ids", &[0], part, 3).unwrap());
            // Share 0 reads row groups 0, 3, 6 and 9: 400 rows, the first from 0.
            if part == 0 {
                assert_eq!(share.len(), 400);
                assert_eq!(share[..3], [0, 1, 2]);
                assert_eq!(share[100], 300);
            }
            seen.extend(share);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..1_000).collect::<Vec<_>>());
        // One part is the whole table.
        assert_eq!(
            ids(store.scan_part("ids", &[0], 0, 1).unwrap()).len(),
            1_000
        );
    }

    #[test]
    fn a_table_in_many_row_groups_splits_at_most_max_parts_ways() {
        let dir = tempfile::tempdir().unwrap();
        write_ids(dir.path(), 4_000, 100);
        let store = LocalDirectory::discover(dir.path()).unwrap();
        assert_eq!(store.parts("ids").unwrap(), MAX_PARTS);
        let total: usize = (0..MAX_PARTS)
            .map(|part| ids(store.scan_part("ids", &[0], part, MAX_PARTS).unwrap()).len())
            .sum();
        assert_eq!(total, 4_000);
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
