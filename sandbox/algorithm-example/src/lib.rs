//! An example compute-to-data algorithm: counts rows per value of a text
//! column, and how many distinct privacy units each count covers, so the
//! sandbox can hold back counts that would single someone out.
//!
//! Its input (the job's `sql` field) is JSON:
//! `{"table": "residents", "group_by": "district", "unit": "person_id"}`.
//! See docs/sandbox.md for how to write, build, approve and run one.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use civicgrid_sandbox::protocol::{GuestFailure, GuestRequest, UNITS_COLUMN};
use serde::Deserialize;

/// What to count.
#[derive(Debug, Deserialize)]
pub struct Input {
    /// The table to read.
    pub table: String,
    /// A text column to group by.
    pub group_by: String,
    /// An int64 column identifying privacy units.
    pub unit: String,
}

fn invalid(message: String) -> GuestFailure {
    GuestFailure::Query { message }
}

/// Counts per group: (rows, distinct units). Pure, so it is tested natively.
pub fn count(
    request: &GuestRequest,
    scan: impl FnOnce(usize, &[usize]) -> Box<dyn Iterator<Item = Result<RecordBatch, String>>>,
) -> Result<RecordBatch, GuestFailure> {
    let input: Input =
        serde_json::from_str(&request.sql).map_err(|e| invalid(format!("input: {e}")))?;
    let (index, table) = request
        .tables
        .iter()
        .enumerate()
        .find(|(_, t)| t.name == input.table)
        .ok_or_else(|| invalid(format!("no table {}", input.table)))?;
    let column = |name: &str| {
        table
            .schema
            .index_of(name)
            .map_err(|_| invalid(format!("table {} has no column {name}", input.table)))
    };
    let (group, unit) = (column(&input.group_by)?, column(&input.unit)?);
    let mut groups: BTreeMap<String, (i64, HashSet<i64>)> = BTreeMap::new();
    for batch in scan(index, &[group, unit]) {
        let batch = batch.map_err(|message| GuestFailure::Execution { message })?;
        let keys = batch
            .column(0)
            .as_string_opt::<i32>()
            .ok_or_else(|| invalid(format!("{} must be text", input.group_by)))?;
        let units = batch
            .column(1)
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| invalid(format!("{} must be int64", input.unit)))?;
        for (key, unit) in keys.iter().zip(units.iter()) {
            let (Some(key), Some(unit)) = (key, unit) else {
                continue;
            };
            let entry = groups.entry(key.to_owned()).or_default();
            entry.0 += 1;
            entry.1.insert(unit);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new(&input.group_by, DataType::Utf8, false),
        Field::new("rows", DataType::Int64, false),
        Field::new(UNITS_COLUMN, DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(groups.keys())),
        Arc::new(Int64Array::from_iter_values(
            groups.values().map(|(n, _)| *n),
        )),
        Arc::new(Int64Array::from_iter_values(
            groups.values().map(|(_, u)| u.len() as i64),
        )),
    ];
    RecordBatch::try_new(schema, columns).map_err(|e| GuestFailure::Execution {
        message: e.to_string(),
    })
}

#[cfg(target_family = "wasm")]
mod entry {
    use civicgrid_sandbox::guest;
    use civicgrid_sandbox::protocol::{GuestFailure, GuestRequest};

    fn run() -> Result<(), GuestFailure> {
        let request: GuestRequest = serde_json::from_slice(&guest::request())
            .map_err(|e| super::invalid(format!("request: {e}")))?;
        let result = super::count(&request, |table, columns| {
            Box::new(guest::scan(table, columns))
        })?;
        guest::emit(&result).map_err(|message| GuestFailure::Execution { message })
    }

    /// The sandbox's entry point; 0 on success.
    #[allow(unsafe_code)]
    #[unsafe(no_mangle)]
    pub extern "C" fn civicgrid_run() -> i32 {
        match run() {
            Ok(()) => 0,
            Err(failure) => {
                guest::fail(&failure);
                1
            }
        }
    }
}
