//! The entry point the sandbox calls, over `civicgrid_guest_protocol::guest`.
#![allow(unsafe_code)]

use std::sync::Arc;

use civicgrid_guest_protocol::guest;
use civicgrid_guest_protocol::protocol::{GuestFailure, GuestRequest, ScanPredicate};
use datafusion::arrow::record_batch::RecordBatch;

use crate::{BatchIter, BatchSource};

struct HostSource;

impl BatchSource for HostSource {
    fn scan(
        &self,
        table: usize,
        columns: &[usize],
        predicates: &[ScanPredicate],
    ) -> Result<BatchIter, String> {
        Ok(Box::new(guest::scan(table, columns, predicates)))
    }

    fn partials(&self) -> Result<BatchIter, String> {
        Ok(Box::new(guest::partials()))
    }
}

fn run() -> Result<(), GuestFailure> {
    let request: GuestRequest =
        serde_json::from_slice(&guest::request()).map_err(|e| GuestFailure::Query {
            message: format!("malformed request: {e}"),
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| GuestFailure::Execution {
            message: format!("runtime: {e}"),
        })?;
    let emit = |batch: RecordBatch| guest::emit(&batch);
    runtime.block_on(crate::run(&request, Arc::new(HostSource), 1, emit))?;
    Ok(())
}

/// Reads the request, runs it, emits the result; 0 on success.
// SAFETY: the one exported symbol of this module; no other item is named so.
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
