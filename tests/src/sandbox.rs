//! Helpers for sandbox tests and benchmarks: the built guests, one shared
//! sandbox per process, sample data, and the native baseline (the SQL guest's
//! own planning and DataFusion, run outside the sandbox on the same files).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow_array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::protocol::{GuestFailure, GuestRequest, ScanPredicate, TableInfo};
use civicgrid_sandbox::{LocalDirectory, Sandbox, SandboxConfig, ScanFilter, TableStore};
use civicgrid_sandbox_guest::{BatchIter, BatchSource};

/// Where `sandbox/build-guests.sh` put the Wasm guests.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CIVICGRID_GUEST_DIR") {
        return dir.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip1/guest")
}

fn read_guest(file: &str) -> Vec<u8> {
    let path = guest_dir().join(file);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the guests first: bash sandbox/build-guests.sh (scripts/test.sh does)",
            path.display()
        )
    })
}

/// The SQL guest module.
pub fn sql_guest() -> Vec<u8> {
    read_guest("civicgrid_sandbox_guest.wasm")
}

/// The example algorithm module.
pub fn example_algorithm() -> Vec<u8> {
    read_guest("civicgrid_example_algorithm.wasm")
}

/// One sandbox per test process, caching compiled modules under `target/`
/// so the SQL guest is compiled once per build, not once per test.
pub fn shared_sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
        Sandbox::new(&SandboxConfig::new(cache)).expect("sandbox")
    })
}

/// A sandbox of its own, caching compiled modules where [`shared_sandbox`]
/// does, with `configure` applied to the defaults (and few pool slots).
pub fn sandbox_with(configure: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let mut config = SandboxConfig::new(cache);
    config.max_concurrent_runs = 4;
    configure(&mut config);
    Sandbox::new(&config).expect("sandbox")
}

/// TPC-H at scale factor 0.01 (60k line items), written once per process.
pub fn tpch_small() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::tpch::write_parquet(dir.path(), 0.01).expect("TPC-H data");
        dir
    })
    .path()
}

/// TPC-H at scale factor 0.01 with `lineitem` in row groups of 8,192 rows
/// (eight of them), so the sandbox splits scans of it across instances when
/// its shares are as small ([`local_in_shares`] with 8,192).
pub fn tpch_small_in_parts() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        for table in crate::tpch::TABLES {
            std::fs::copy(
                tpch_small().join(format!("{table}.parquet")),
                dir.path().join(format!("{table}.parquet")),
            )
            .expect("copy TPC-H");
        }
        let lineitem = dir.path().join("lineitem.parquet");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&lineitem).expect("lineitem"),
        )
        .expect("lineitem reader")
        .build()
        .expect("lineitem reader");
        let batches: Vec<RecordBatch> = reader.map(|b| b.expect("lineitem batch")).collect();
        write_batches_in_groups(dir.path(), "lineitem", &batches, 8_192).expect("rewrite lineitem");
        dir
    })
    .path()
}

/// The benchmarks' policy for resident data: `person_id` unreadable, and
/// every released row must count at least 10 distinct people.
pub fn residents_aggregate_policy() -> OutputPolicy {
    OutputPolicy {
        blocked_columns: vec!["person_id".into()],
        aggregation: Some(civicgrid_sandbox::policy::AggregationRule {
            privacy_unit_columns: vec!["person_id".into()],
            min_units: 10,
            ..civicgrid_sandbox::policy::AggregationRule::default()
        }),
        ..OutputPolicy::default()
    }
}

/// Residents of a small city: 2,000 people in seven districts of 100 to 500
/// and one district ("Harbour") of three, with a unique income each.
pub fn write_residents(dir: &Path) -> std::io::Result<()> {
    write_residents_in_groups(dir, usize::MAX)
}

/// [`write_residents`] with the residents in row groups of `rows_per_group`.
pub fn write_residents_in_groups(dir: &Path, rows_per_group: usize) -> std::io::Result<()> {
    let districts = ["North", "South", "East", "West", "Centre", "Hills", "River"];
    let mut district = Vec::new();
    let mut age_band = Vec::new();
    let mut household = Vec::new();
    let mut income = Vec::new();
    let mut person = Vec::new();
    for i in 0..2000i64 {
        let d = if i < 3 {
            "Harbour"
        } else {
            districts[(i as usize * 7 / 2000) % 7]
        };
        district.push(d.to_owned());
        age_band.push(["0-17", "18-29", "30-44", "45-64", "65+"][(i % 5) as usize].to_owned());
        household.push((i % 6 + 1) as i32);
        income.push(20_000 + i * 37);
        person.push(100_000 + i);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("district", DataType::Utf8, false),
        Field::new("age_band", DataType::Utf8, false),
        Field::new("household_size", DataType::Int32, false),
        Field::new("income", DataType::Int64, false),
        Field::new("person_id", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(district)),
        Arc::new(StringArray::from(age_band)),
        Arc::new(Int32Array::from(household)),
        Arc::new(Int64Array::from(income)),
        Arc::new(Int64Array::from(person)),
    ];
    let batch =
        RecordBatch::try_new(Arc::clone(&schema), columns).map_err(std::io::Error::other)?;
    write_batches_in_groups(dir, "residents", &[batch], rows_per_group)?;

    let names: Vec<&str> = districts.iter().copied().chain(["Harbour"]).collect();
    let areas: Vec<i64> = (0..names.len() as i64).map(|i| 10 + i).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("area_km2", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(names)),
            Arc::new(Int64Array::from(areas)),
        ],
    )
    .map_err(std::io::Error::other)?;
    write_batch(dir, "districts", &batch)
}

fn write_batch(dir: &Path, table: &str, batch: &RecordBatch) -> std::io::Result<()> {
    write_batches_in_groups(dir, table, std::slice::from_ref(batch), usize::MAX)
}

fn write_batches_in_groups(
    dir: &Path,
    table: &str,
    batches: &[RecordBatch],
    rows_per_group: usize,
) -> std::io::Result<()> {
    let schema = batches
        .first()
        .map(RecordBatch::schema)
        .ok_or_else(|| std::io::Error::other(format!("no batches for {table}")))?;
    let file = std::fs::File::create(dir.join(format!("{table}.parquet")))?;
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows_per_group.min(1 << 20)))
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, Some(properties))
        .map_err(std::io::Error::other)?;
    for batch in batches {
        writer.write(batch).map_err(std::io::Error::other)?;
    }
    writer.close().map_err(std::io::Error::other)?;
    Ok(())
}

/// A product's tables read natively, for the guest's engine outside the sandbox.
pub struct NativeSource {
    store: Arc<dyn TableStore>,
    tables: Vec<String>,
}

impl NativeSource {
    fn name(&self, table: usize) -> Result<&str, String> {
        self.tables
            .get(table)
            .map(String::as_str)
            .ok_or_else(|| format!("no table {table}"))
    }

    /// `scan` through the host's own filter, as the sandbox gets it.
    fn filtered(
        &self,
        table: &str,
        columns: &[usize],
        predicates: &[ScanPredicate],
        scan: BatchIter,
    ) -> Result<BatchIter, String> {
        if predicates.is_empty() {
            return Ok(scan);
        }
        let schema = self
            .store
            .schema(table)?
            .project(columns)
            .map_err(|e| e.to_string())?;
        let filter = ScanFilter::new(&schema, predicates)?;
        Ok(Box::new(scan.map(move |batch| filter.apply(batch?))))
    }
}

/// The host's own reader and filter, as the sandbox gets them: the native
/// baseline reads and filters exactly as the sandbox does, and on several
/// partitions reads the same row-group shares a split run's instances read.
impl BatchSource for NativeSource {
    fn scan(
        &self,
        table: usize,
        columns: &[usize],
        predicates: &[ScanPredicate],
    ) -> Result<BatchIter, String> {
        let name = self.name(table)?;
        let scan = self.store.scan(name, columns)?;
        self.filtered(name, columns, predicates, scan)
    }

    fn parts(&self, table: usize) -> usize {
        self.name(table)
            .and_then(|name| self.store.parts(name))
            .unwrap_or(1)
    }

    fn scan_part(
        &self,
        table: usize,
        columns: &[usize],
        predicates: &[ScanPredicate],
        part: usize,
        parts: usize,
    ) -> Result<BatchIter, String> {
        let name = self.name(table)?;
        let scan = self.store.scan_part(name, columns, part, parts)?;
        self.filtered(name, columns, predicates, scan)
    }
}

/// Runs `sql` with the SQL guest's code natively (DataFusion with
/// `partitions` target partitions) over the same files the sandbox reads.
pub fn run_native(
    store: Arc<dyn TableStore>,
    sql: &str,
    policy: &OutputPolicy,
    partitions: usize,
) -> Result<Vec<RecordBatch>, GuestFailure> {
    let tables = store.tables();
    let infos = tables
        .iter()
        .map(|name| TableInfo {
            name: name.clone(),
            schema: store.schema(name).expect("schema").as_ref().clone(),
        })
        .collect();
    let request = GuestRequest {
        sql: sql.to_owned(),
        tables: infos,
        policy: policy.clone(),
        min_units: policy.aggregation.as_ref().map_or(0, |a| a.min_units),
        stage: Default::default(),
    };
    let source = Arc::new(NativeSource { store, tables });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(partitions.max(1))
        .build()
        .expect("runtime");
    let mut batches = Vec::new();
    runtime.block_on(civicgrid_sandbox_guest::run(
        &request,
        source,
        partitions,
        |b| {
            batches.push(b);
            Ok(())
        },
    ))?;
    Ok(batches)
}

/// The tables in `dir`, as the sandbox sees them.
pub fn local(dir: &Path) -> Arc<dyn TableStore> {
    Arc::new(LocalDirectory::discover(dir).expect("tables"))
}

/// The tables in `dir`, split into shares of at most `share_rows` rows, so
/// small tables split as far as large ones do by default.
pub fn local_in_shares(dir: &Path, share_rows: u64) -> Arc<dyn TableStore> {
    Arc::new(
        LocalDirectory::discover(dir)
            .expect("tables")
            .with_share_rows(share_rows),
    )
}
