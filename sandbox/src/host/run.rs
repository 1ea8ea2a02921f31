//! One run's state inside its `Store`, and the `civicgrid` imports that read
//! tables and take results.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use arrow_array::{Array, RecordBatch};
use arrow_buffer::Buffer;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use wasmtime::{Caller, ResourceLimiter};

use super::Imports;

use super::data::{TableScan, TableStore};
use super::error::Abort;
use super::filter::ScanFilter;
use super::release::Release;
use crate::protocol::{GuestFailure, IMPORT_MODULE, ScanPredicate};

/// Seed of the guest's randomness: fixed, so hash tables (and fuel) repeat.
const RANDOM_SEED: u64 = 0x00c1_71c6_71d0;

#[derive(Clone)]
pub(crate) struct Table {
    pub(crate) name: String,
    /// Column indices the guest may stream (not blocked, or a privacy unit).
    pub(crate) readable: Vec<bool>,
    pub(crate) columns: Vec<String>,
}

pub(crate) struct RunState {
    pub(crate) request: Vec<u8>,
    pub(crate) store: Arc<dyn TableStore>,
    pub(crate) tables: Vec<Table>,
    scans: Vec<OpenScan>,
    pending: Option<(i32, EncodedBatch)>,
    pub(crate) release: Release,
    pub(crate) failure: Option<GuestFailure>,
    pub(crate) log: String,
    max_log_bytes: usize,
    pub(crate) output_bytes: u64,
    max_output_bytes: u64,
    pub(crate) rows_read: u64,
    pub(crate) bytes_read: u64,
    pub(crate) logical_time_ns: u64,
    pub(crate) random: ChaCha8Rng,
    pub(crate) limiter: RunLimiter,
    split: Split,
    /// A partial run's output: intermediate state for the final run.
    pub(crate) partials_out: Vec<Vec<u8>>,
    /// A final run's input: the batches of the share being read.
    partials_in: VecDeque<Vec<u8>>,
}

/// A scan the guest opened: its batches, and the host's first cut of the
/// query's filter once the guest has pushed one down.
struct OpenScan {
    batches: TableScan,
    table: String,
    columns: Vec<usize>,
    filter: Option<ScanFilter>,
}

/// What part of a split run a store does (see [`crate::protocol::Stage`]).
pub(crate) enum Split {
    Whole,
    /// Scans of `table` stream only share `part` of `parts`, no other table
    /// may be scanned, and what the guest emits is kept for the final run,
    /// up to `max_bytes` (it must fit the final instance's memory).
    Partial {
        table: usize,
        part: usize,
        parts: usize,
        max_bytes: u64,
    },
    /// The first scan streams share 0 of `parts` of `table` (the partial
    /// aggregate's), later ones whole tables; `partials_next` reads the other
    /// shares' states from `states` in share order, waiting at most until
    /// `deadline`, and at most `max_bytes` of them in all (they must fit in
    /// the instance's memory).
    Final {
        table: usize,
        parts: usize,
        states: Arc<ShareStates>,
        deadline: Instant,
        max_bytes: u64,
        /// Whether share 0's scan is open yet.
        share_opened: bool,
        /// The next share to read states from, and the bytes read so far.
        next_share: usize,
        bytes_read: u64,
    },
}

/// The partial states of a split run's shares, handed from the instances
/// that computed them to the final instance as each finishes.
pub(crate) struct ShareStates {
    shares: Mutex<SharesDone>,
    changed: Condvar,
}

struct SharesDone {
    states: Vec<Option<Vec<Vec<u8>>>>,
    /// A share failed, or will not run: the final instance stops waiting.
    cancelled: bool,
}

impl ShareStates {
    pub(crate) fn new(parts: usize) -> Self {
        Self {
            shares: Mutex::new(SharesDone {
                states: vec![None; parts],
                cancelled: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharesDone> {
        self.shares.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Share `part` finished with `states`.
    pub(crate) fn publish(&self, part: usize, states: Vec<Vec<u8>>) {
        if let Some(slot) = self.lock().states.get_mut(part) {
            *slot = Some(states);
        }
        self.changed.notify_all();
    }

    /// A share failed or will not run: nothing more will be published.
    pub(crate) fn cancel(&self) {
        self.lock().cancelled = true;
        self.changed.notify_all();
    }

    /// Share `part`'s states, once published.
    fn take(&self, part: usize, deadline: Instant) -> Result<Vec<Vec<u8>>, Abort> {
        let mut shares = self.lock();
        loop {
            if let Some(states) = shares.states.get_mut(part).and_then(Option::take) {
                return Ok(states);
            }
            if shares.cancelled {
                return Err(Abort::ShareFailed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Abort::Deadline);
            }
            shares = self
                .changed
                .wait_timeout(shares, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Core instances one run may create (see [`RunLimiter::instances`]).
pub(crate) const MAX_CORE_INSTANCES_PER_RUN: u32 = 4;

pub(crate) struct RunLimiter {
    pub(crate) memory_bytes: usize,
    pub(crate) table_elements: usize,
}

impl ResourceLimiter for RunLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            return Err(wasmtime::Error::new(Abort::Memory));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements)
    }

    // A component made by wit-component is its module plus up to two small
    // glue modules (an indirect-call shim and its fix-up); each is a core
    // instance. Memories stay at one.
    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES_PER_RUN as usize
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }
}

pub(crate) struct RunSetup {
    pub(crate) request: Vec<u8>,
    pub(crate) store: Arc<dyn TableStore>,
    pub(crate) tables: Vec<Table>,
    pub(crate) release: Release,
    pub(crate) max_log_bytes: usize,
    pub(crate) max_output_bytes: u64,
    pub(crate) logical_time_ns: u64,
    pub(crate) limiter: RunLimiter,
    pub(crate) split: Split,
}

impl RunState {
    pub(crate) fn new(setup: RunSetup) -> Self {
        Self {
            split: setup.split,
            partials_out: Vec::new(),
            partials_in: VecDeque::new(),
            request: setup.request,
            store: setup.store,
            tables: setup.tables,
            scans: Vec::new(),
            pending: None,
            release: setup.release,
            failure: None,
            log: String::new(),
            max_log_bytes: setup.max_log_bytes,
            output_bytes: 0,
            max_output_bytes: setup.max_output_bytes,
            rows_read: 0,
            bytes_read: 0,
            logical_time_ns: setup.logical_time_ns,
            random: ChaCha8Rng::seed_from_u64(RANDOM_SEED),
            limiter: setup.limiter,
        }
    }

    pub(crate) fn log_bytes(&mut self, bytes: &[u8]) {
        let room = self.max_log_bytes.saturating_sub(self.log.len());
        if room == 0 {
            return;
        }
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(room)]);
        self.log.push_str(&text);
        if bytes.len() > room {
            self.log.push_str("\n[log truncated]");
            self.max_log_bytes = 0;
        }
    }

    pub(crate) fn open_scan(&mut self, table: usize, columns: Vec<usize>) -> Result<i32, Abort> {
        let info = self
            .tables
            .get(table)
            .ok_or_else(|| Abort::Protocol(format!("no table {table}")))?;
        for &c in &columns {
            match info.readable.get(c) {
                Some(true) => {}
                Some(false) => {
                    return Err(Abort::Policy {
                        rule: "blocked-columns".into(),
                        column: Some(info.columns[c].clone()),
                        message: format!(
                            "column {} is blocked and is never streamed into the sandbox",
                            info.columns[c]
                        ),
                    });
                }
                None => {
                    return Err(Abort::Protocol(format!(
                        "table {} has no column {c}",
                        info.name
                    )));
                }
            }
        }
        let scan = match self.split {
            Split::Partial {
                table: split,
                part,
                parts,
                ..
            } => {
                // The guest checked that its partial aggregate reads one
                // scan; if that scan is of another table, every part would
                // aggregate all of it. Refuse, and the host runs it whole.
                if table != split {
                    return Err(Abort::NotSplittable(format!(
                        "the partial aggregate reads {}, not the split table",
                        info.name
                    )));
                }
                self.store.scan_part(&info.name, &columns, part, parts)
            }
            Split::Final {
                table: split,
                parts,
                ref mut share_opened,
                ..
            } if !*share_opened => {
                if table != split {
                    return Err(Abort::NotSplittable(format!(
                        "the partial aggregate reads {}, not the split table",
                        info.name
                    )));
                }
                *share_opened = true;
                self.store.scan_part(&info.name, &columns, 0, parts)
            }
            Split::Whole | Split::Final { .. } => self.store.scan(&info.name, &columns),
        }
        .map_err(Abort::Data)?;
        self.scans.push(OpenScan {
            batches: scan,
            table: info.name.clone(),
            columns,
            filter: None,
        });
        Ok((self.scans.len() - 1) as i32)
    }

    /// Applies `predicates` (JSON, from the guest) to scan `handle`'s rows
    /// from its next batch on.
    pub(crate) fn filter_scan(&mut self, handle: i32, predicates: &[u8]) -> Result<(), Abort> {
        let scan = usize::try_from(handle)
            .ok()
            .and_then(|h| self.scans.get_mut(h))
            .ok_or_else(|| Abort::Protocol(format!("no scan {handle}")))?;
        let predicates: Vec<ScanPredicate> = serde_json::from_slice(predicates)
            .map_err(|e| Abort::Protocol(format!("scan filter: {e}")))?;
        let schema = self
            .store
            .schema(&scan.table)
            .and_then(|stored| stored.project(&scan.columns).map_err(|e| e.to_string()))
            .map_err(Abort::Data)?;
        scan.filter = Some(ScanFilter::new(&schema, &predicates).map_err(Abort::Protocol)?);
        Ok(())
    }

    pub(crate) fn next_batch(&mut self, handle: i32) -> Result<Option<EncodedBatch>, Abort> {
        let scan = usize::try_from(handle)
            .ok()
            .and_then(|h| self.scans.get_mut(h))
            .ok_or_else(|| Abort::Protocol(format!("no scan {handle}")))?;
        // Rows read are what the store read, before the filter: a query is
        // metered for the data it scanned, not for what it kept.
        loop {
            let Some(batch) = scan.batches.next() else {
                return Ok(None);
            };
            let batch = batch.map_err(Abort::Data)?;
            self.rows_read += batch.num_rows() as u64;
            self.bytes_read += data_bytes(&batch);
            let batch = match &scan.filter {
                Some(filter) => filter.apply(batch).map_err(Abort::Data)?,
                None => batch,
            };
            // A batch the filter emptied is not worth a trip into the guest,
            // unless the scan reads no columns (COUNT(*) counts its rows).
            if batch.num_rows() == 0 && batch.num_columns() > 0 {
                continue;
            }
            return encode(&batch).map(Some);
        }
    }

    /// The next batch of the other shares' partial states, in share order,
    /// waiting for a share still running; `None` after the last share's, and
    /// in any run but a final one.
    fn next_partial(&mut self) -> Result<Option<Vec<u8>>, Abort> {
        let Split::Final {
            parts,
            ref states,
            deadline,
            max_bytes,
            ref mut next_share,
            ref mut bytes_read,
            ..
        } = self.split
        else {
            return Ok(None);
        };
        loop {
            if let Some(bytes) = self.partials_in.pop_front() {
                return Ok(Some(bytes));
            }
            if *next_share >= parts {
                return Ok(None);
            }
            let share = states.take(*next_share, deadline)?;
            *next_share += 1;
            *bytes_read += share.iter().map(|bytes| bytes.len() as u64).sum::<u64>();
            if *bytes_read > max_bytes {
                return Err(Abort::Memory);
            }
            self.partials_in.extend(share);
        }
    }

    pub(crate) fn emitted(&mut self, bytes: &[u8]) -> Result<(), Abort> {
        self.output_bytes += bytes.len() as u64;
        if let Split::Partial { max_bytes, .. } = self.split {
            if self.output_bytes > max_bytes {
                return Err(Abort::Memory);
            }
            // Intermediate state: never released, only read by the final run.
            self.partials_out.push(bytes.to_vec());
            return Ok(());
        }
        if self.output_bytes > self.max_output_bytes {
            return Err(Abort::ResultTooLarge {
                limit_bytes: self.max_output_bytes,
                rule: "sandbox.max_output_bytes",
            });
        }
        let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| Abort::Protocol(format!("emit: {e}")))?;
        for batch in reader {
            let batch = batch.map_err(|e| Abort::Protocol(format!("emit: {e}")))?;
            self.release.accept(batch)?;
        }
        Ok(())
    }
}

/// The bytes of a batch's data, not of the buffers holding it: buffer
/// capacity depends on how the reader cut the batches, so the same rows read
/// in smaller batches (a split scan) would count several times more.
fn data_bytes(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|column| {
            let data = column.to_data();
            data.get_slice_memory_size()
                .unwrap_or_else(|_| column.get_array_memory_size()) as u64
        })
        .sum()
}

/// A batch as an Arrow IPC stream (schema, batch, end of stream), in pieces
/// that are mostly the batch's own buffers: the stream's bytes are copied
/// once, into the guest's memory. Writing the stream into a `Vec` first, as
/// Arrow's `StreamWriter` does, copied every scanned byte twice.
pub(crate) struct EncodedBatch {
    pieces: Vec<Buffer>,
    len: usize,
}

impl EncodedBatch {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Writes the stream to the start of `into`, which holds at least
    /// [`Self::len`] bytes.
    fn write_to(&self, into: &mut [u8]) {
        let mut at = 0;
        for piece in &self.pieces {
            into[at..at + piece.len()].copy_from_slice(piece.as_slice());
            at += piece.len();
        }
    }

    /// The stream in one allocation, for hosts that hand the guest a list.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut bytes = vec![0; self.len];
        self.write_to(&mut bytes);
        bytes
    }
}

fn encode(batch: &RecordBatch) -> Result<EncodedBatch, Abort> {
    let encode = || {
        let mut encoder = arrow_ipc::writer::StreamEncoder::try_new(&batch.schema())?;
        let mut pieces = encoder.encode(batch)?;
        pieces.extend(encoder.finish()?);
        Ok::<_, arrow_schema::ArrowError>(pieces)
    };
    let pieces = encode().map_err(|e| Abort::Data(e.to_string()))?;
    let len = pieces.iter().map(Buffer::len).sum();
    Ok(EncodedBatch { pieces, len })
}

fn guest_memory<'a>(
    caller: &'a mut Caller<'_, RunState>,
) -> Result<(&'a mut [u8], &'a mut RunState), Abort> {
    let memory = caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| Abort::Protocol("the guest exports no memory".into()))?;
    Ok(memory.data_and_store_mut(caller))
}

fn slice(mem: &[u8], ptr: i32, len: i32) -> Result<&[u8], Abort> {
    let (Ok(ptr), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
        return Err(Abort::Protocol("negative pointer or length".into()));
    };
    mem.get(ptr..ptr.saturating_add(len))
        .ok_or_else(|| Abort::Protocol("pointer outside guest memory".into()))
}

/// Copies `bytes` to `ptr` if they fit in `cap`; else returns minus the length needed.
fn fill(mem: &mut [u8], ptr: i32, cap: i32, bytes: &[u8]) -> Result<i64, Abort> {
    fill_with(mem, ptr, cap, bytes.len(), |slot| {
        slot.copy_from_slice(bytes)
    })
}

fn fill_encoded(mem: &mut [u8], ptr: i32, cap: i32, batch: &EncodedBatch) -> Result<i64, Abort> {
    fill_with(mem, ptr, cap, batch.len(), |slot| batch.write_to(slot))
}

/// Has `write` fill `len` bytes of guest memory at `ptr` and returns `len`,
/// or returns `-len` if the guest's `cap` bytes are too few.
fn fill_with(
    mem: &mut [u8],
    ptr: i32,
    cap: i32,
    len: usize,
    write: impl FnOnce(&mut [u8]),
) -> Result<i64, Abort> {
    if len > usize::try_from(cap).unwrap_or(0) {
        return Ok(-(len as i64));
    }
    let ptr = usize::try_from(ptr).map_err(|_| Abort::Protocol("negative pointer".into()))?;
    let slot = mem
        .get_mut(ptr..ptr.saturating_add(len))
        .ok_or_else(|| Abort::Protocol("pointer outside guest memory".into()))?;
    write(slot);
    Ok(len as i64)
}

fn trap(abort: Abort) -> wasmtime::Error {
    wasmtime::Error::new(abort)
}

pub(crate) fn add_to_linker(linker: &mut Imports) -> wasmtime::Result<()> {
    linker.func_wrap(
        IMPORT_MODULE,
        "request",
        |mut caller: Caller<'_, RunState>, ptr: i32, cap: i32| -> wasmtime::Result<i64> {
            let (mem, state) = guest_memory(&mut caller).map_err(trap)?;
            fill(mem, ptr, cap, &state.request).map_err(trap)
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "scan_open",
        |mut caller: Caller<'_, RunState>,
         table: i32,
         columns: i32,
         len: i32|
         -> wasmtime::Result<i32> {
            let (mem, state) = guest_memory(&mut caller).map_err(trap)?;
            let bytes = slice(mem, columns, len.saturating_mul(4)).map_err(trap)?;
            let columns = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
                .collect();
            let table = usize::try_from(table)
                .map_err(|_| trap(Abort::Protocol("negative table".into())))?;
            state.open_scan(table, columns).map_err(trap)
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "scan_filter",
        |mut caller: Caller<'_, RunState>,
         handle: i32,
         ptr: i32,
         len: i32|
         -> wasmtime::Result<()> {
            let (mem, state) = guest_memory(&mut caller).map_err(trap)?;
            let bytes = slice(mem, ptr, len).map_err(trap)?.to_vec();
            state.filter_scan(handle, &bytes).map_err(trap)
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "scan_next",
        |mut caller: Caller<'_, RunState>,
         handle: i32,
         ptr: i32,
         cap: i32|
         -> wasmtime::Result<i64> {
            let (mem, state) = guest_memory(&mut caller).map_err(trap)?;
            let bytes = match state.pending.take() {
                Some((h, bytes)) if h == handle => bytes,
                _ => match state.next_batch(handle).map_err(trap)? {
                    Some(bytes) => bytes,
                    None => return Ok(0),
                },
            };
            let n = fill_encoded(mem, ptr, cap, &bytes).map_err(trap)?;
            if n < 0 {
                state.pending = Some((handle, bytes));
            }
            Ok(n)
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "emit",
        |mut caller: Caller<'_, RunState>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let (mem, state) = guest_memory(&mut caller).map_err(trap)?;
            let bytes = slice(mem, ptr, len).map_err(trap)?;
            state.emitted(bytes).map_err(trap)
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "fail",
        |mut caller: Caller<'_, RunState>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let (mem, state) = guest_memory(&mut caller).map_err(trap)?;
            let bytes = slice(mem, ptr, len).map_err(trap)?;
            let failure =
                serde_json::from_slice(bytes).unwrap_or_else(|e| GuestFailure::Execution {
                    message: format!("the guest reported a failure the host cannot read: {e}"),
                });
            state.failure = Some(failure);
            Ok(())
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "partials_next",
        |mut caller: Caller<'_, RunState>, ptr: i32, cap: i32| -> wasmtime::Result<i64> {
            let (mem, state) = guest_memory(&mut caller).map_err(trap)?;
            let Some(bytes) = state.next_partial().map_err(trap)? else {
                return Ok(0);
            };
            let n = fill(mem, ptr, cap, &bytes).map_err(trap)?;
            if n < 0 {
                state.partials_in.push_front(bytes);
            }
            Ok(n)
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "log",
        |mut caller: Caller<'_, RunState>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let (mem, state) = guest_memory(&mut caller).map_err(trap)?;
            let bytes = slice(mem, ptr, len).map_err(trap)?.to_vec();
            state.log_bytes(&bytes);
            state.log_bytes(b"\n");
            Ok(())
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::types::Int32Type;
    use arrow_array::{
        ArrayRef, Decimal128Array, DictionaryArray, Int64Array, RecordBatch, StringArray,
        StringViewArray,
    };

    use super::{EncodedBatch, encode, fill_encoded};

    fn batch() -> RecordBatch {
        let rows = 1000;
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "id",
                Arc::new(Int64Array::from_iter(
                    (0..rows).map(|i| (i % 7 != 0).then_some(i)),
                )),
            ),
            (
                "price",
                Arc::new(
                    Decimal128Array::from_iter_values((0..rows).map(|i| i128::from(i) * 101))
                        .with_precision_and_scale(15, 2)
                        .unwrap(),
                ),
            ),
            (
                "flag",
                Arc::new(StringViewArray::from_iter_values((0..rows).map(|i| {
                    if i % 3 == 0 {
                        "A"
                    } else {
                        "a longer string than twelve"
                    }
                }))),
            ),
            (
                "name",
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("name {i}")),
                )),
            ),
            (
                "kind",
                Arc::new(
                    (0..rows)
                        .map(|i| ["bus", "tram", "metro"][i as usize % 3])
                        .collect::<DictionaryArray<Int32Type>>(),
                ),
            ),
        ];
        RecordBatch::try_from_iter(columns).unwrap()
    }

    fn stream_writers_bytes(batch: &RecordBatch) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut writer =
            arrow_ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema()).unwrap();
        writer.write(batch).unwrap();
        writer.finish().unwrap();
        drop(writer);
        bytes
    }

    fn decoded(encoded: &EncodedBatch) -> RecordBatch {
        let mut batches = crate::ipc::read_stream(encoded.to_vec().into());
        assert_eq!(batches.len(), 1);
        batches.remove(0).unwrap()
    }

    /// The pieces make the very stream Arrow's writer makes, and the
    /// guest's reader reads it back, for whole and for sliced batches.
    #[test]
    fn an_encoded_batch_is_the_stream_arrows_writer_makes() {
        let whole = batch();
        for batch in [whole.clone(), whole.slice(0, 10), whole.slice(333, 500)] {
            let encoded = encode(&batch).unwrap();
            assert_eq!(encoded.to_vec(), stream_writers_bytes(&batch));
            assert_eq!(encoded.len(), encoded.to_vec().len());
            assert_eq!(decoded(&encoded), batch);
        }
    }

    /// Too small a buffer gets the size needed and nothing written; a
    /// buffer outside the guest's memory is a protocol error.
    #[test]
    fn filling_guest_memory_needs_room_for_the_whole_stream() {
        let encoded = encode(&batch()).unwrap();
        let len = encoded.len();
        let mut memory = vec![0xAAu8; len + 64];
        let short = i32::try_from(len - 1).unwrap();
        assert_eq!(
            fill_encoded(&mut memory, 8, short, &encoded).unwrap(),
            -(len as i64)
        );
        assert!(memory.iter().all(|byte| *byte == 0xAA));
        let cap = i32::try_from(len).unwrap();
        assert_eq!(
            fill_encoded(&mut memory, 8, cap, &encoded).unwrap(),
            len as i64
        );
        assert_eq!(&memory[8..8 + len], encoded.to_vec().as_slice());
        assert!(
            memory[..8]
                .iter()
                .chain(&memory[8 + len..])
                .all(|byte| *byte == 0xAA)
        );
        let outside = i32::try_from(memory.len() - len + 1).unwrap();
        assert!(fill_encoded(&mut memory, outside, cap, &encoded).is_err());
        assert!(fill_encoded(&mut memory, -1, cap, &encoded).is_err());
    }
}
