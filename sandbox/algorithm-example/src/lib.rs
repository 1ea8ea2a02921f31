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
use civicgrid_guest_protocol::protocol::{GuestFailure, GuestRequest, UNITS_COLUMN};
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

/// The component: the `algorithm` world of sandbox/wit/algorithm.wit.
// The bindings wit-bindgen generates (the canonical ABI's exports and
// allocator) are the only unsafe code, and this crate writes none.
#[cfg(target_family = "wasm")]
#[allow(unsafe_code)]
mod component {
    use std::io::Cursor;

    use arrow_array::RecordBatch;
    use arrow_ipc::reader::StreamReader;
    use arrow_ipc::writer::StreamWriter;
    use civicgrid_guest_protocol::protocol::{GuestFailure, GuestRequest};

    wit_bindgen::generate!({ world: "algorithm", path: "../wit" });

    use civicgrid::sandbox::host;

    struct Counter;

    impl Guest for Counter {
        fn run() -> Result<(), Failure> {
            let request: GuestRequest = serde_json::from_str(&host::request())
                .map_err(|e| Failure::Query(format!("request: {e}")))?;
            let result = super::count(&request, |table, columns| Box::new(scan(table, columns)))
                .map_err(|failure| match failure {
                    GuestFailure::Query { message } => Failure::Query(message),
                    other => Failure::Execution(other.to_string()),
                })?;
            host::emit(&encode(&result).map_err(Failure::Execution)?);
            Ok(())
        }
    }

    /// The batches of `columns` of `table`, decoded from the host's IPC streams.
    fn scan(
        table: usize,
        columns: &[usize],
    ) -> impl Iterator<Item = Result<RecordBatch, String>> + use<> {
        let columns: Vec<u32> = columns.iter().map(|&c| c as u32).collect();
        let handle = host::scan_open(table as u32, &columns);
        std::iter::from_fn(move || host::scan_next(handle)).flat_map(|bytes| {
            match StreamReader::try_new(Cursor::new(bytes), None) {
                Ok(reader) => reader.map(|b| b.map_err(|e| e.to_string())).collect(),
                Err(e) => vec![Err(e.to_string())],
            }
        })
    }

    fn encode(batch: &RecordBatch) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        let mut writer =
            StreamWriter::try_new(&mut bytes, &batch.schema()).map_err(|e| e.to_string())?;
        writer.write(batch).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        drop(writer);
        Ok(bytes)
    }

    export!(Counter);
}
