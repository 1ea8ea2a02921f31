//! Product storage as the registry sees it: where a product's files are
//! (a location inside a data directory, checked when a spec is registered),
//! and its data quality as measured when it is submitted — by a runner in
//! a data center hosting it, or, in the embedded default, over the
//! marketplace's own data directory (see [`civicgrid_sandbox::quality`]).
//! Also the sample city's population data.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use civicgrid_sandbox::quality::{Quality, QualityError};
use parquet::arrow::ArrowWriter;

use crate::error::{MarketError, Result};
use crate::spec::{QualityMetrics, Table};

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

/// The declared tables of a spec, as the sandbox's quality measurement
/// (and a runner's) takes them.
pub fn declared(tables: &[Table]) -> Vec<civicgrid_sandbox::quality::DeclaredTable> {
    tables
        .iter()
        .map(|table| civicgrid_sandbox::quality::DeclaredTable {
            name: table.name.clone(),
            columns: table
                .columns
                .iter()
                .map(|column| (column.name.clone(), column.r#type.clone()))
                .collect(),
        })
        .collect()
}

/// A measurement's outcome as the registry records it, or its error naming
/// the spec's field.
///
/// # Errors
/// `InvalidArgument` naming the column for a schema mismatch;
/// `FailedPrecondition` when a table cannot be read.
pub fn recorded(measured: std::result::Result<Quality, QualityError>) -> Result<QualityMetrics> {
    measured.map(metrics).map_err(|error| match error.field() {
        Some(field) => MarketError::invalid(field, error.to_string()),
        None => MarketError::FailedPrecondition(error.to_string()),
    })
}

/// A runner's measurement as the registry records it.
///
/// # Errors
/// The runner's error, as it was.
pub fn recorded_remote(measured: Result<Quality>) -> Result<QualityMetrics> {
    measured.map(metrics)
}

fn metrics(quality: Quality) -> QualityMetrics {
    QualityMetrics {
        completeness: quality.completeness,
        validity: quality.validity,
        freshness_seconds: quality.freshness_seconds,
    }
}

/// Measures the product's tables in `dir` (the embedded default, where the
/// marketplace's own data directory holds the products) at `now_ms`.
///
/// # Errors
/// As [`recorded`].
pub fn measure(dir: &Path, tables: &[Table], now_ms: i64) -> Result<QualityMetrics> {
    let store = civicgrid_sandbox::LocalDirectory::discover(dir).map_err(|error| {
        MarketError::FailedPrecondition(format!("cannot read the product's folder: {error}"))
    })?;
    recorded(civicgrid_sandbox::quality::measure(
        &store,
        &declared(tables),
        now_ms,
    ))
}

/// Measures version `manifest` of the product in `dir` (the embedded
/// default) at `now_ms`.
///
/// # Errors
/// As [`recorded`]; `FailedPrecondition` when a version's file is missing
/// or not the one it lists.
pub fn measure_version(
    dir: &Path,
    manifest: &civicgrid_sandbox::manifest::Manifest,
    tables: &[Table],
    now_ms: i64,
) -> Result<QualityMetrics> {
    let store = civicgrid_sandbox::VersionTables::local(dir, manifest, &std::sync::Arc::default())
        .map_err(|error| {
            MarketError::FailedPrecondition(format!(
                "cannot read the product's data version: {error}"
            ))
        })?;
    recorded(civicgrid_sandbox::quality::measure(
        &store,
        &declared(tables),
        now_ms,
    ))
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
