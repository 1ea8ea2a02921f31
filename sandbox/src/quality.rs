//! Data quality measured from a product's own tables, where they are stored
//! (a runner in the product's data center, or the embedded default's data
//! directory), so the registry records what the data is, not what its
//! provider says it is. For the columns a product declares:
//! - **completeness**: non-null cells / all cells;
//! - **validity**: non-null values that are plausible for their type / non-null
//!   values (text not blank, floats finite, dates and timestamps between
//!   1900 and a day from now);
//! - **freshness**: seconds since the newest date or timestamp value, or since
//!   the newest table was written when no such column exists.
//!
//! A declared column missing from a table, or of another type, is a
//! [`QualityError`] naming the column.

use std::time::UNIX_EPOCH;

use arrow_array::cast::AsArray as _;
use arrow_array::types::{Date32Type, Float32Type, Float64Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::{DataType, TimeUnit};

use crate::TableStore;

const DAY_MS: i64 = 86_400_000;
/// 1900-01-01 in Unix milliseconds.
const EARLIEST_MS: i64 = -2_208_988_800_000;

/// A table as a product declares it: its name, and its columns' names and
/// types (`int64`, `utf8`, `decimal(12,2)`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredTable {
    /// The table's name.
    pub name: String,
    /// (name, type) of each declared column.
    pub columns: Vec<(String, String)>,
}

/// What was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// Non-null cells / all cells.
    pub completeness: f64,
    /// Plausible values / non-null values.
    pub validity: f64,
    /// Seconds since the newest date, timestamp or write.
    pub freshness_seconds: i64,
}

/// Why a product's tables could not be measured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QualityError {
    /// A declared column is not in the table.
    #[error("column {column:?} is not in table {table_name}")]
    MissingColumn {
        /// Index of the table in the declaration.
        table: usize,
        /// Index of the column in the table's declaration.
        column: usize,
        /// The table's name.
        table_name: String,
        /// The column's name.
        column_name: String,
    },
    /// A declared column holds another type.
    #[error("declared {declared} but table {table_name} holds {actual}")]
    WrongType {
        /// Index of the table in the declaration.
        table: usize,
        /// Index of the column in the table's declaration.
        column: usize,
        /// The table's name.
        table_name: String,
        /// The declared type.
        declared: String,
        /// The type stored.
        actual: String,
    },
    /// A table cannot be read.
    #[error("cannot read table {table}: {reason}")]
    Unreadable {
        /// The table's name.
        table: String,
        /// Why.
        reason: String,
    },
}

impl QualityError {
    /// The field of a product spec this error is about
    /// (`spec.tables[0].columns[1].name`), if it is about one.
    #[must_use]
    pub fn field(&self) -> Option<String> {
        match self {
            Self::MissingColumn { table, column, .. } => {
                Some(format!("spec.tables[{table}].columns[{column}].name"))
            }
            Self::WrongType { table, column, .. } => {
                Some(format!("spec.tables[{table}].columns[{column}].type"))
            }
            Self::Unreadable { .. } => None,
        }
    }
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

/// Measures `tables` of `store` at `now_ms` (Unix milliseconds).
///
/// # Errors
/// [`QualityError`]: a table that cannot be read, or a declared column
/// missing or of another type.
pub fn measure(
    store: &dyn TableStore,
    tables: &[DeclaredTable],
    now_ms: i64,
) -> Result<Quality, QualityError> {
    let mut tally = Tally::default();
    let mut newest_write_ms: Option<i64> = None;
    for (t, table) in tables.iter().enumerate() {
        let unreadable = |reason: String| QualityError::Unreadable {
            table: table.name.clone(),
            reason,
        };
        if !store.tables().contains(&table.name) {
            return Err(unreadable("no such table in the product's folder".into()));
        }
        let schema = store.schema(&table.name).map_err(unreadable)?;
        let mut indices = Vec::with_capacity(table.columns.len());
        for (c, (name, declared)) in table.columns.iter().enumerate() {
            let Some((index, field)) = schema.column_with_name(name) else {
                return Err(QualityError::MissingColumn {
                    table: t,
                    column: c,
                    table_name: table.name.clone(),
                    column_name: name.clone(),
                });
            };
            if !compatible(declared, field.data_type()) {
                return Err(QualityError::WrongType {
                    table: t,
                    column: c,
                    table_name: table.name.clone(),
                    declared: declared.clone(),
                    actual: field.data_type().to_string(),
                });
            }
            indices.push(index);
        }
        let written = store
            .modified(&table.name)
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .and_then(|since| i64::try_from(since.as_millis()).ok());
        newest_write_ms = newest_write_ms.max(written);
        let scan = store.scan(&table.name, &indices).map_err(unreadable)?;
        for batch in scan {
            let batch = batch.map_err(unreadable)?;
            for column in batch.columns() {
                tally.column(column, now_ms);
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
    let newest = tally.newest_ms.or(newest_write_ms).unwrap_or(now_ms);
    Ok(Quality {
        completeness: ratio(non_null, tally.cells),
        validity: ratio(non_null - tally.invalid, non_null),
        freshness_seconds: ((now_ms - newest) / 1000).max(0),
    })
}
