//! The CivicGrid sandbox: consumer SQL and algorithms run in wasmtime with no
//! file system or network, hard limits on fuel, memory and wall time,
//! deterministic metering, and the product's output policy between the query and
//! the released result.
//!
//! The policy, the host–guest protocol and Arrow IPC reading live in
//! `civicgrid-guest-protocol`, which the Wasm guests link without wasmtime;
//! the host re-exports them, so its users name one crate.

pub use civicgrid_guest_protocol::{ipc, policy, protocol};

pub mod change;
pub mod ingest;
pub mod location;
pub mod manifest;
pub mod quality;

/// The object-store client product data is read with, for callers that
/// build the store [`ObjectTables`] reads.
pub use object_store;

mod host;
pub use host::{
    BATCH_ROWS, CacheOutcome, DeclaredColumns, FUEL_PER_COMPUTE_UNIT, FooterCache, Guest,
    GuestRole, Job, Limits, ListError, LocalDirectory, MAX_ARROW_OBJECT_BYTES, MAX_PARTS,
    MIN_UNITS_METADATA, Metering, ObjectTables, Outcome, RunFailure, SHARE_ROWS, Sandbox,
    SandboxConfig, SandboxError, ScanFilter, TableScan, TableStore, VersionTables,
    keeps_touched_pages_resident, object_folder, open_plain_file,
};
