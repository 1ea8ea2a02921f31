//! The CivicGrid sandbox: consumer SQL and algorithms run in wasmtime with no
//! file system or network, hard limits on fuel, memory and wall time,
//! deterministic metering, and the product's output policy between the query and
//! the released result.
//!
//! Without the `host` feature only [`policy`] and [`protocol`] are built: the
//! Wasm guests share them with the host.

pub mod policy;
pub mod protocol;

#[cfg(feature = "host")]
mod host;
#[cfg(feature = "host")]
pub use host::{
    BATCH_ROWS, CacheOutcome, DeclaredColumns, FUEL_PER_COMPUTE_UNIT, FooterCache, Guest,
    GuestRole, Job, Limits, LocalDirectory, MAX_PARTS, MIN_UNITS_METADATA, Metering, Outcome,
    RunFailure, SHARE_ROWS, Sandbox, SandboxConfig, SandboxError, ScanFilter, TableScan,
    TableStore, keeps_touched_pages_resident,
};

#[cfg(target_family = "wasm")]
pub mod guest;
pub mod ipc;
