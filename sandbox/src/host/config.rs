//! Process-wide settings and the limits of one run.

use std::path::PathBuf;
use std::time::Duration;

use wasmtime::PoolingAllocationConfig;

/// Fuel per billed compute unit. Fuel counts Wasm operations, so a unit is
/// about a million of them: the same query on the same data always costs the
/// same number of units, whatever the machine is doing.
pub const FUEL_PER_COMPUTE_UNIT: u64 = 1_000_000;

/// Epoch tick: the resolution of the wall-time limit.
pub(super) const TICK: Duration = Duration::from_millis(1);

/// Process-wide settings, fixed when the engine is built.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where compiled modules are cached.
    pub cache_dir: PathBuf,
    /// Largest linear memory any run may have (each pool slot reserves it).
    pub max_memory_bytes: u64,
    /// Runs that may be alive at once (pool slots).
    pub max_concurrent_runs: u32,
    /// Wasm call-stack limit. The calling thread's own stack must be larger
    /// (tokio's blocking threads and test threads have 2 MiB).
    pub max_stack_bytes: usize,
    /// Count fuel. Only the fuel-overhead benchmark turns it off: without it
    /// runs are not metered and only the wall-time limit stops a loop.
    pub meter_fuel: bool,
    /// Split SQL scans of tables stored in several parts across instances
    /// (see [`crate::protocol::Stage`]). Whether a query splits depends only
    /// on its plan and its data, so fuel is the same on any machine; turning
    /// this off changes what queries over large tables cost.
    pub split_scans: bool,
    /// Instances of one split run alive at once: the cores it may use.
    /// Changes only speed, never results or fuel.
    pub max_parallel_instances: usize,
    /// Bytes of each pool slot's linear memory reset in place after a run
    /// rather than handed back to the kernel. On Linux 6.7 and later only the
    /// pages the run touched are reset (the `PAGEMAP_SCAN` ioctl), so the
    /// next run in the slot takes no page faults for them. Costs up to this
    /// much resident memory per slot; 0 hands every page back.
    pub memory_keep_resident_bytes: usize,
    /// Append every compiled Wasm function's address and name to
    /// `/tmp/perf-<pid>.map` as modules load, so that `perf record` and
    /// `perf report` name the guest's functions (DataFusion's, the
    /// allocator's) instead of showing anonymous JIT addresses. Off by
    /// default: the map grows by about 20 MiB each time the SQL guest loads,
    /// and names are not needed to serve.
    pub perf_map: bool,
}

/// Whether this kernel lets pool slots reset only the pages a run touched
/// (Linux 6.7+ `PAGEMAP_SCAN`). Without it,
/// [`SandboxConfig::memory_keep_resident_bytes`] has no effect and every page
/// is handed back after each run.
pub fn keeps_touched_pages_resident() -> bool {
    PoolingAllocationConfig::is_pagemap_scan_available()
}

impl SandboxConfig {
    /// Defaults sized for the SQL guest on a small machine.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            max_memory_bytes: 4 << 30,
            max_concurrent_runs: 32,
            max_stack_bytes: 1 << 20,
            meter_fuel: true,
            split_scans: true,
            max_parallel_instances: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_keep_resident_bytes: 16 << 20,
            perf_map: false,
        }
    }
}

/// Per-run limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Fuel (≈ Wasm operations) the run may use.
    pub fuel: u64,
    /// Wall time.
    pub wall_time: Duration,
    /// Linear memory.
    pub memory_bytes: u64,
    /// Function-table elements.
    pub table_elements: usize,
    /// Everything the guest emits, before the policy looks at it.
    pub max_output_bytes: u64,
    /// The guest's log.
    pub max_log_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: 200_000 * FUEL_PER_COMPUTE_UNIT,
            wall_time: Duration::from_secs(60),
            memory_bytes: 2 << 30,
            table_elements: 200_000,
            max_output_bytes: 256 << 20,
            max_log_bytes: 64 << 10,
        }
    }
}
