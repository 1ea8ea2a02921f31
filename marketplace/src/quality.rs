//! Data quality measured from the product's own files when it is submitted for
//! registration, so the registry records what the data is, not what its
//! provider says it is.
//!
//! Each table is `<storage location>/<table>.parquet`. For the columns the
//! spec declares:
//! - **completeness**: non-null cells / all cells;
//! - **validity**: non-null values that are plausible for their type / non-null
//!   values (text not blank, floats finite, dates and timestamps between
//!   1900 and a day from now);
//! - **freshness**: seconds since the newest date or timestamp value, or since
//!   the newest file was written when no such column exists.
//!
//! A declared column missing from the file, or of another type, refuses the
//! submission with the field named.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray as _;
use arrow_array::types::{Date32Type, Float32Type, Float64Type};
use arrow_array::{Array, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{MarketError, Result};
use crate::spec::{QualityMetrics, Table};

const DAY_MS: i64 = 86_400_000;
/// 1900-01-01 in Unix milliseconds.
const EARLIEST_MS: i64 = -2_208_988_800_000;

/// Checks a product's storage location as written: a relative path inside
/// the server's data directory (`products/population`), never an absolute
/// path, a URI or a path that climbs out with `..`. A provider names where
/// its files are; the server decides that it is inside its own area.
///
/// # Errors
/// `InvalidArgument` naming `spec.storage_location`.
pub fn check_location(location: &str) -> Result<()> {
    civicgrid_sandbox::location::check(location)
        .map_err(|error| MarketError::invalid("spec.storage_location", error.to_string()))
}

/// The folders of two locations overlap when one contains the other: a
/// product could then read the other's files.
pub fn locations_overlap(a: &str, b: &str) -> bool {
    let parts = |l: &str| -> Vec<String> {
        Path::new(l)
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    let shared = a.len().min(b.len());
    a[..shared] == b[..shared]
}

/// Where a product's files are: its location inside the data directory,
/// reached without following a link (see [`civicgrid_sandbox::location`]).
///
/// # Errors
/// `InvalidArgument` naming `spec.storage_location` for a location
/// [`check_location`] refuses, one that does not exist, or one reached
/// through a link.
pub fn resolve_location(data_dir: &Path, location: &str) -> Result<PathBuf> {
    civicgrid_sandbox::location::resolve(data_dir, location)
        .map_err(|error| MarketError::invalid("spec.storage_location", error.to_string()))
}

fn compatible(declared: &str, actual: &DataType) -> bool {
    match declared {
        "boolean" => matches!(actual, DataType::Boolean),
        "int32" => matches!(actual, DataType::Int8 | DataType::Int16 | DataType::Int32),
        "int64" => matches!(
            actual,
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
        ),
        "float64" => matches!(actual, DataType::Float32 | DataType::Float64),
        "utf8" => matches!(
            actual,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ),
        "date32" => matches!(actual, DataType::Date32),
        "timestamp" => matches!(actual, DataType::Timestamp(_, _)),
        decimal => {
            matches!(actual, DataType::Decimal128(p, s) if format!("decimal({p},{s})") == decimal.replace(' ', ""))
        }
    }
}

#[derive(Default)]
struct Tally {
    cells: u64,
    nulls: u64,
    invalid: u64,
    newest_ms: Option<i64>,
}

impl Tally {
    fn saw_time(&mut self, ms: i64, now_ms: i64) -> bool {
        let plausible = (EARLIEST_MS..=now_ms + DAY_MS).contains(&ms);
        if plausible {
            self.newest_ms = Some(self.newest_ms.map_or(ms, |newest| newest.max(ms)));
        }
        plausible
    }

    fn column(&mut self, array: &ArrayRef, now_ms: i64) {
        self.cells += array.len() as u64;
        self.nulls += array.null_count() as u64;
        let invalid = match array.data_type() {
            DataType::Utf8 => array
                .as_string::<i32>()
                .iter()
                .flatten()
                .filter(|v| v.trim().is_empty())
                .count(),
            DataType::LargeUtf8 => array
                .as_string::<i64>()
                .iter()
                .flatten()
                .filter(|v| v.trim().is_empty())
                .count(),
            DataType::Utf8View => array
                .as_string_view()
                .iter()
                .flatten()
                .filter(|v| v.trim().is_empty())
                .count(),
            DataType::Float64 => array
                .as_primitive::<Float64Type>()
                .iter()
                .flatten()
                .filter(|v| !v.is_finite())
                .count(),
            DataType::Float32 => array
                .as_primitive::<Float32Type>()
                .iter()
                .flatten()
                .filter(|v| !v.is_finite())
                .count(),
            DataType::Date32 => array
                .as_primitive::<Date32Type>()
                .iter()
                .flatten()
                .filter(|days| !self.saw_time(i64::from(*days) * DAY_MS, now_ms))
                .count(),
            DataType::Timestamp(unit, _) => {
                let to_ms = |v: i64| match unit {
                    TimeUnit::Second => v.saturating_mul(1000),
                    TimeUnit::Millisecond => v,
                    TimeUnit::Microsecond => v / 1000,
                    TimeUnit::Nanosecond => v / 1_000_000,
                };
                let values: Vec<i64> = match unit {
                    TimeUnit::Second => array
                        .as_primitive::<arrow_array::types::TimestampSecondType>()
                        .iter()
                        .flatten()
                        .collect(),
                    TimeUnit::Millisecond => array
                        .as_primitive::<arrow_array::types::TimestampMillisecondType>()
                        .iter()
                        .flatten()
                        .collect(),
                    TimeUnit::Microsecond => array
                        .as_primitive::<arrow_array::types::TimestampMicrosecondType>()
                        .iter()
                        .flatten()
                        .collect(),
                    TimeUnit::Nanosecond => array
                        .as_primitive::<arrow_array::types::TimestampNanosecondType>()
                        .iter()
                        .flatten()
                        .collect(),
                };
                values
                    .into_iter()
                    .filter(|v| !self.saw_time(to_ms(*v), now_ms))
                    .count()
            }
            _ => 0,
        };
        self.invalid += invalid as u64;
    }
}

/// Measures the product's tables in `dir` at `now_ms`.
///
/// # Errors
/// `FailedPrecondition` when a table cannot be read; `InvalidArgument`
/// naming the column when the file does not match the declared schema.
pub fn measure(dir: &Path, tables: &[Table], now_ms: i64) -> Result<QualityMetrics> {
    let mut tally = Tally::default();
    let mut newest_file_ms: Option<i64> = None;
    for (t, table) in tables.iter().enumerate() {
        let path = dir.join(format!("{}.parquet", table.name));
        let unreadable = |error: &dyn std::fmt::Display| {
            MarketError::FailedPrecondition(format!(
                "cannot read table {} at {}: {error}",
                table.name,
                path.display()
            ))
        };
        let file = File::open(&path).map_err(|e| unreadable(&e))?;
        let modified = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64);
        newest_file_ms = newest_file_ms.max(modified);
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| unreadable(&e))?;
        let schema = builder.schema().clone();
        let mut indices = Vec::with_capacity(table.columns.len());
        for (c, column) in table.columns.iter().enumerate() {
            let (index, field) = schema.column_with_name(&column.name).ok_or_else(|| {
                MarketError::invalid(
                    format!("spec.tables[{t}].columns[{c}].name"),
                    format!("column {:?} is not in {}", column.name, path.display()),
                )
            })?;
            if !compatible(&column.r#type, field.data_type()) {
                return Err(MarketError::invalid(
                    format!("spec.tables[{t}].columns[{c}].type"),
                    format!(
                        "declared {} but {} holds {}",
                        column.r#type,
                        path.display(),
                        field.data_type()
                    ),
                ));
            }
            indices.push(index);
        }
        let reader = builder.build().map_err(|e| unreadable(&e))?;
        for batch in reader {
            let batch = batch.map_err(|e| unreadable(&e))?;
            for index in &indices {
                tally.column(batch.column(*index), now_ms);
            }
        }
    }
    let non_null = tally.cells - tally.nulls;
    let ratio = |part: u64, whole: u64| {
        if whole == 0 {
            1.0
        } else {
            part as f64 / whole as f64
        }
    };
    let newest = tally.newest_ms.or(newest_file_ms).unwrap_or(now_ms);
    Ok(QualityMetrics {
        completeness: ratio(non_null, tally.cells),
        validity: ratio(non_null - tally.invalid, non_null),
        freshness_seconds: ((now_ms - newest) / 1000).max(0),
    })
}

/// The city's districts.
pub const DISTRICTS: [&str; 12] = [
    "harbour",
    "old-town",
    "riverside",
    "north-gate",
    "university",
    "market",
    "west-end",
    "airport",
    "hillside",
    "garden-city",
    "docklands",
    "east-park",
];

/// Writes the sample `population` product's data (`residents.parquet`) into
/// `dir`: `rows` residents over 12 districts, with every 50th household size
/// missing and every 100th age band blank, so its quality is measurably
/// imperfect.
///
/// # Errors
/// When the file cannot be written.
pub fn write_sample_population(dir: &Path, rows: usize) -> Result<()> {
    let io = |source: std::io::Error| MarketError::Io {
        context: format!("writing sample data to {}", dir.display()),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let districts = DISTRICTS;
    let bands = ["0-14", "15-24", "25-44", "45-64", "65+"];
    let district: StringArray = (0..rows)
        .map(|i| Some(districts[(i * 7 + i / 13) % districts.len()]))
        .collect();
    let age_band: StringArray = (0..rows)
        .map(|i| {
            Some(if i % 100 == 99 {
                ""
            } else {
                bands[(i * 3 + i / 7) % bands.len()]
            })
        })
        .collect();
    let household: Int32Array = (0..rows)
        .map(|i| (i % 50 != 49).then_some(1 + (i % 5) as i32))
        .collect();
    let person: Int64Array = (0..rows).map(|i| Some(1_000_000 + i as i64)).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("district", DataType::Utf8, false),
        Field::new("age_band", DataType::Utf8, false),
        Field::new("household_size", DataType::Int32, true),
        Field::new("person_id", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(district),
            Arc::new(age_band),
            Arc::new(household),
            Arc::new(person),
        ],
    )
    .map_err(|e| MarketError::Corrupt(e.to_string()))?;
    let path = dir.join("residents.parquet");
    let file = File::create(&path).map_err(io)?;
    let mut writer = ArrowWriter::try_new(file, schema, None)
        .map_err(|e| MarketError::Corrupt(e.to_string()))?;
    writer
        .write(&batch)
        .map_err(|e| MarketError::Corrupt(e.to_string()))?;
    writer
        .close()
        .map_err(|e| MarketError::Corrupt(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Column, Sensitivity};

    fn residents(columns: &[(&str, &str)]) -> Vec<Table> {
        vec![Table {
            name: "residents".into(),
            columns: columns
                .iter()
                .map(|(name, kind)| Column {
                    name: (*name).into(),
                    r#type: (*kind).into(),
                    sensitivity: Sensitivity::Public as i32,
                    description: String::new(),
                })
                .collect(),
        }]
    }

    #[test]
    fn sample_data_measures_what_was_put_in_it() {
        let dir = tempfile::tempdir().unwrap();
        write_sample_population(dir.path(), 1000).unwrap();
        let tables = residents(&[
            ("district", "utf8"),
            ("age_band", "utf8"),
            ("household_size", "int32"),
            ("person_id", "int64"),
        ]);
        let metrics = measure(dir.path(), &tables, crate::store::now_ms()).unwrap();
        // 4,000 cells, 20 household sizes missing; 10 blank age bands.
        assert!(
            (metrics.completeness - 3980.0 / 4000.0).abs() < 1e-12,
            "{metrics:?}"
        );
        assert!(
            (metrics.validity - 3970.0 / 3980.0).abs() < 1e-12,
            "{metrics:?}"
        );
        assert!(metrics.freshness_seconds < 60, "just written: {metrics:?}");
    }

    #[test]
    fn a_schema_mismatch_names_the_column() {
        let dir = tempfile::tempdir().unwrap();
        write_sample_population(dir.path(), 10).unwrap();
        let missing = residents(&[("district", "utf8"), ("income", "int64")]);
        match measure(dir.path(), &missing, 0) {
            Err(MarketError::InvalidArgument { field, .. }) => {
                assert_eq!(field, "spec.tables[0].columns[1].name")
            }
            other => panic!("{other:?}"),
        }
        let wrong_type = residents(&[("district", "int64")]);
        match measure(dir.path(), &wrong_type, 0) {
            Err(MarketError::InvalidArgument { field, .. }) => {
                assert_eq!(field, "spec.tables[0].columns[0].type")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            measure(&dir.path().join("nowhere"), &missing, 0),
            Err(MarketError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn locations_resolve_inside_the_data_directory_only() {
        let data = tempfile::tempdir().unwrap();
        let root = data.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("products/p")).unwrap();
        std::fs::create_dir_all(root.join("products/alice")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(root.join("products/alice"), root.join("products/bob")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("products/out")).unwrap();
        assert_eq!(
            resolve_location(&root, "products/p").unwrap(),
            root.join("products/p")
        );
        assert_eq!(
            resolve_location(&root, "./products/p/").unwrap(),
            root.join("products/p")
        );
        for (location, why) in [
            ("file:///data/p", "URI"),
            ("s3://bucket/p", "URI"),
            ("/srv/civicgrid/products/p", "absolute"),
            ("products/../products/p", ".."),
            ("products/missing", "no such folder"),
            ("products/bob", "link"),
            ("products/out", "link"),
        ] {
            match resolve_location(&root, location) {
                Err(MarketError::InvalidArgument { field, .. }) => {
                    assert_eq!(field, "spec.storage_location", "{location} ({why})");
                }
                other => panic!("{location} ({why}): {other:?}"),
            }
        }
    }
}
