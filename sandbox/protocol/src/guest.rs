//! The guest side of the host interface, for guests written in Rust: safe
//! functions over the `civicgrid` imports (see [`crate::protocol`]). The SQL
//! guest and consumer algorithms both use it.
//!
//! The only unsafe code a guest needs lives here: calling the host with
//! pointers into the guest's own memory.
#![allow(unsafe_code)]

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::writer::StreamWriter;

use crate::ipc;
use crate::protocol::{GuestFailure, ScanPredicate};

mod host {
    #[link(wasm_import_module = "civicgrid")]
    unsafe extern "C" {
        pub fn request(ptr: *mut u8, cap: i32) -> i64;
        pub fn scan_open(table: i32, columns: *const u32, len: i32) -> i32;
        pub fn scan_filter(handle: i32, ptr: *const u8, len: i32);
        pub fn scan_next(handle: i32, ptr: *mut u8, cap: i32) -> i64;
        pub fn emit(ptr: *const u8, len: i32);
        pub fn fail(ptr: *const u8, len: i32);
        pub fn log(ptr: *const u8, len: i32);
        pub fn partials_next(ptr: *mut u8, cap: i32) -> i64;
    }
}

/// Calls a host function that fills a buffer: it returns the length written,
/// 0 at the end, or minus the length it needs.
fn pull(buffer: &mut Vec<u8>, fill: impl Fn(*mut u8, i32) -> i64) -> Option<usize> {
    loop {
        let cap = i32::try_from(buffer.capacity()).unwrap_or(i32::MAX);
        let n = fill(buffer.as_mut_ptr(), cap);
        if n == 0 {
            return None;
        }
        if n > 0 {
            let len = usize::try_from(n).unwrap_or(0).min(buffer.capacity());
            // SAFETY: the host wrote exactly `len` (<= capacity) bytes into
            // the buffer it was given.
            unsafe { buffer.set_len(len) };
            return Some(len);
        }
        let needed = usize::try_from(-n).unwrap_or(0);
        buffer.clear();
        buffer.reserve_exact(needed);
    }
}

/// The request (JSON [`crate::protocol::GuestRequest`]).
pub fn request() -> Vec<u8> {
    let mut buffer = Vec::with_capacity(64 * 1024);
    // SAFETY: `pull` passes a pointer to and the capacity of `buffer`.
    match pull(&mut buffer, |ptr, cap| unsafe { host::request(ptr, cap) }) {
        Some(_) => buffer,
        None => Vec::new(),
    }
}

/// Streams `columns` of table `table` (indices into the request's tables),
/// only the rows for which every one of `predicates` holds (the host checks
/// them as it reads).
pub fn scan(
    table: usize,
    columns: &[usize],
    predicates: &[ScanPredicate],
) -> impl Iterator<Item = Result<RecordBatch, String>> + Send + use<> {
    let columns: Vec<u32> = columns.iter().map(|&c| c as u32).collect();
    // SAFETY: the pointer and length describe `columns`, alive for the call.
    let handle = unsafe { host::scan_open(table as i32, columns.as_ptr(), columns.len() as i32) };
    if !predicates.is_empty() {
        // Serializing plain data cannot fail; were it to, the scan is
        // simply unfiltered, which the engine's own filter makes right.
        if let Ok(json) = serde_json::to_vec(predicates) {
            // SAFETY: pointer and length describe `json`, alive for the call.
            unsafe { host::scan_filter(handle, json.as_ptr(), json.len() as i32) };
        }
    }
    std::iter::from_fn(move || {
        // Each batch gets a buffer of its own, exactly its size (the first
        // call, with no room, asks the host how much): the batch's arrays are
        // read in place and keep the buffer alive as long as they live.
        let mut buffer = Vec::new();
        // SAFETY: `pull` passes a pointer to and the capacity of `buffer`.
        pull(&mut buffer, |ptr, cap| unsafe {
            host::scan_next(handle, ptr, cap)
        })?;
        // SAFETY: what the host streams was written by Arrow's IPC writer
        // from batches Arrow's readers built, so it is valid (re-validating
        // every offset and every string cost the guest fuel on every row).
        // And were it not, the worst it could do is confuse this guest
        // inside its sandbox; the host validates everything the guest emits.
        Some(unsafe { ipc::read_trusted_stream(Buffer::from_vec(buffer)) })
    })
    .flatten()
}

/// In a final run, the partial aggregate states of the partial runs.
pub fn partials() -> impl Iterator<Item = Result<RecordBatch, String>> + Send + use<> {
    std::iter::from_fn(move || {
        let mut buffer = Vec::new();
        // SAFETY: `pull` passes a pointer to and the capacity of `buffer`.
        pull(&mut buffer, |ptr, cap| unsafe {
            host::partials_next(ptr, cap)
        })?;
        // Other instances' output: every array is checked.
        Some(ipc::read_stream(Buffer::from_vec(buffer)))
    })
    .flatten()
}

/// Releases one result batch (the host applies the output policy to it).
pub fn emit(batch: &RecordBatch) -> Result<(), String> {
    let mut bytes = Vec::new();
    {
        let mut writer =
            StreamWriter::try_new(&mut bytes, &batch.schema()).map_err(|e| e.to_string())?;
        writer.write(batch).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
    }
    // SAFETY: pointer and length describe `bytes`, alive for the call.
    unsafe { host::emit(bytes.as_ptr(), bytes.len() as i32) };
    Ok(())
}

/// Reports why the request failed; the guest then returns non-zero.
pub fn fail(failure: &GuestFailure) {
    let json = serde_json::to_vec(failure).unwrap_or_default();
    // SAFETY: pointer and length describe `json`, alive for the call.
    unsafe { host::fail(json.as_ptr(), json.len() as i32) };
}

/// A diagnostic line for the host's capped log.
pub fn log(line: &str) {
    // SAFETY: pointer and length describe `line`, alive for the call.
    unsafe { host::log(line.as_ptr(), line.len() as i32) };
}
