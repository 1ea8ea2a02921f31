//! The host: one wasmtime engine per process, modules compiled once and
//! cached, and every run in a fresh store under hard limits.
//!
//! Our own narrow API over wasmtime: callers load a [`Guest`] and [`run`]
//! a [`Job`] on it; nothing of wasmtime leaks out.
//!
//! [`run`]: Sandbox::run

mod cache;
mod component;
mod data;
mod error;
mod filter;
mod release;
mod run;
mod wasi;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, InstancePre, IntoFunc, Linker, OptLevel,
    PoolingAllocationConfig, ProfilingStrategy, Store, Trap,
};

pub use cache::CacheOutcome;
pub use data::{
    BATCH_ROWS, DeclaredColumns, FooterCache, LocalDirectory, MAX_PARTS, SHARE_ROWS, TableScan,
    TableStore,
};
pub use error::{RunFailure, SandboxError};
pub use filter::ScanFilter;
pub use release::MIN_UNITS_METADATA;

use error::Abort;
use release::Release;
use run::{RunLimiter, RunSetup, RunState, ShareStates, Split, Table};

use crate::policy::OutputPolicy;
use crate::protocol::{GuestFailure, GuestRequest, RUN_EXPORT, Stage, TableInfo};

/// Fuel per billed compute unit. Fuel counts Wasm operations, so a unit is
/// about a million of them: the same query on the same data always costs the
/// same number of units, whatever the machine is doing.
pub const FUEL_PER_COMPUTE_UNIT: u64 = 1_000_000;

/// Epoch tick: the resolution of the wall-time limit.
const TICK: Duration = Duration::from_millis(1);

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

/// Which kind of guest a module is: our SQL engine, or a consumer's algorithm
/// (which runs only when the product's policy approves its sha256).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestRole {
    /// The SQL guest shipped with CivicGrid.
    Sql,
    /// A consumer's compute-to-data algorithm.
    Algorithm,
}

/// A module or component compiled (or loaded from the cache) and linked,
/// ready to run.
pub struct Guest {
    sha256: String,
    role: GuestRole,
    linked: Linked,
    cache: CacheOutcome,
    initial_memory_bytes: u64,
}

/// A guest's form: a core module over the `civicgrid` imports, or a
/// component of the `algorithm` world (consumer algorithms only).
enum Linked {
    Module(InstancePre<RunState>),
    Component(component::AlgorithmPre<RunState>),
}

impl Guest {
    /// The module's sha256 (lower-case hex).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether loading it hit the cache.
    pub fn cache_outcome(&self) -> CacheOutcome {
        self.cache
    }

    /// The linear memory the module declares it starts with: a run whose
    /// memory limit is below this cannot even be instantiated. 0 for a
    /// component, whose memories are inside it (the limit still applies
    /// when it is instantiated).
    pub fn initial_memory_bytes(&self) -> u64 {
        self.initial_memory_bytes
    }
}

/// One query or algorithm run over a product.
pub struct Job<'a> {
    /// SQL for the SQL guest; the input of an algorithm.
    pub sql: &'a str,
    /// The product's tables.
    pub tables: Arc<dyn TableStore>,
    /// The product's output policy.
    pub policy: &'a OutputPolicy,
    /// Epsilon the consumer has left for this product (differential privacy).
    pub privacy_budget: f64,
    /// What the guest's clock reads for the whole run (SQL's `now()`), in
    /// Unix seconds. The caller fixes it, say to the data's last update,
    /// because fuel depends on it: with the wall clock, the same query cost a
    /// few units more or less from one second to the next.
    pub as_of_unix_seconds: u64,
}

/// What a run used: returned with every result, the basis of billing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metering {
    /// Fuel consumed (deterministic for the same guest, query and data).
    pub fuel: u64,
    /// `fuel` in billed compute units, rounded up.
    pub compute_units: u64,
    /// Rows streamed into the guest.
    pub rows_read: u64,
    /// Arrow bytes streamed into the guest.
    pub bytes_read: u64,
    /// Rows released.
    pub rows_released: u64,
    /// Arrow bytes released.
    pub bytes_released: u64,
    /// Wall time of the run, instantiation included.
    pub wall_time: Duration,
    /// The part of the wall time spent starting instances: instantiating
    /// each (its memory image and tables) and running its initialiser,
    /// summed over the run's instances. The rest is the query itself (and
    /// any wait for a free slot). Like the wall time, not deterministic.
    pub startup: Duration,
    /// Instances the run took: 1, or one per share of a split scan (the
    /// final instance aggregates share 0). Fixed by the plan and the data,
    /// like the fuel.
    pub instances: u32,
}

/// A released result.
#[derive(Debug)]
pub struct Outcome {
    /// The result, after the output policy.
    pub batches: Vec<RecordBatch>,
    /// What the run used.
    pub metering: Metering,
    /// Aggregate rows withheld for covering too few privacy units.
    pub suppressed_rows: u64,
    /// Whether a list result was cut at the row cap.
    pub truncated: bool,
    /// Epsilon this run spent (0 unless differential privacy noised a column).
    pub privacy_spent: f64,
    /// The budget left after this run.
    pub privacy_budget_left: f64,
    /// The guest's log (capped).
    pub log: String,
}

/// The linker, and the name of every import it defines (so a module that
/// imports anything else is refused by name, before it is instantiated).
pub(crate) struct Imports {
    linker: Linker<RunState>,
    provided: HashSet<(String, String)>,
}

impl Imports {
    pub(crate) fn func_wrap<Params, Args>(
        &mut self,
        module: &str,
        name: &str,
        func: impl IntoFunc<RunState, Params, Args>,
    ) -> wasmtime::Result<()> {
        self.linker.func_wrap(module, name, func)?;
        self.provided.insert((module.to_owned(), name.to_owned()));
        Ok(())
    }
}

/// The sandbox: one per process.
pub struct Sandbox {
    engine: Engine,
    /// For consumer algorithms that are components: `host` only.
    algorithm_components: component::Components,
    /// For consumer algorithms: no file-system call is defined at all.
    algorithm_imports: Imports,
    /// For the SQL guest: the same, plus the file-system calls its standard
    /// library links in, each failing with EBADF (there is no directory
    /// descriptor to resolve a path against, so nothing can be opened).
    sql_imports: Imports,
    cache: cache::ModuleCache,
    loaded: Mutex<HashMap<(String, GuestRole), Arc<Guest>>>,
    ticking: Arc<AtomicBool>,
    meter_fuel: bool,
    split_scans: bool,
    max_parallel_instances: usize,
    /// The pool's instance slots. A split run takes extra instances only
    /// from free ones.
    slots: Slots,
}

/// The pooling allocator's instance slots, counted so that a run waits for
/// a free one, up to its wall-time limit: instantiating with every slot in
/// use fails at once, so a burst of more queries than slots would otherwise
/// fail instead of queueing.
struct Slots {
    total: usize,
    in_use: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn new(total: usize) -> Self {
        Self {
            total,
            in_use: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        // The count is only ever incremented or decremented whole, so a
        // panic elsewhere cannot leave it half-updated.
        self.in_use.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn free(&self) -> usize {
        self.total.saturating_sub(*self.lock())
    }

    /// A slot, once one is free; `None` if none is before `deadline` (no
    /// deadline: wait as long as it takes).
    fn take(&self, deadline: Option<Instant>) -> Option<Slot<'_>> {
        let mut in_use = self.lock();
        while *in_use >= self.total {
            in_use = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.freed
                        .wait_timeout(in_use, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .freed
                    .wait(in_use)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
        *in_use += 1;
        Some(Slot(self))
    }
}

/// Holds one pool slot; drop it only after the instance's store is gone.
struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.lock() -= 1;
        self.0.freed.notify_one();
    }
}

/// Host threads running a split run's instances: the Wasm stack limit plus
/// room for the host frames beneath it.
const WORKER_STACK_BYTES: usize = 8 << 20;

/// Everything an instance of one run needs, whatever its stage.
struct RunPlan<'a> {
    request: GuestRequest,
    store: &'a Arc<dyn TableStore>,
    tables: &'a [Table],
    policy: &'a OutputPolicy,
    limits: &'a Limits,
    logical_time_ns: u64,
    started: Instant,
    /// Nanoseconds every instance of the run spent starting (shares of a
    /// split scan start on several threads at once).
    startup_ns: AtomicU64,
    /// Fuel every instance of the run burnt, whether it ran to its end or
    /// failed: what a failed run is metered at.
    fuel_burnt: AtomicU64,
}

/// A finished instance: its fuel and its state.
struct Ran {
    fuel: u64,
    state: RunState,
}

/// How an instance that did not fail ended.
enum Ended {
    Ran(Box<Ran>),
    /// An instance of a split run found the plan cannot be split.
    NotSplittable,
}

impl Ended {
    /// A whole instance, which never answers "not splittable".
    fn ran(self) -> Result<Ran, SandboxError> {
        match self {
            Self::Ran(ran) => Ok(*ran),
            Self::NotSplittable => Err(SandboxError::Internal(
                "only a partial run can find a plan not splittable".into(),
            )),
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

fn internal(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Internal(e.to_string())
}

impl Sandbox {
    /// Builds the engine (pooling allocator, copy-on-write memory images,
    /// fuel, epochs) and starts its epoch clock.
    pub fn new(config: &SandboxConfig) -> Result<Self, SandboxError> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(config.max_concurrent_runs * run::MAX_CORE_INSTANCES_PER_RUN)
            .total_memories(config.max_concurrent_runs)
            .total_tables(config.max_concurrent_runs * 4)
            .max_memory_size(config.max_memory_bytes as usize)
            .table_elements(Limits::default().table_elements)
            .max_core_instance_size(4 << 20)
            // The SQL guest's function table is large and filled lazily on
            // every run; resetting it in place rather than handing its pages
            // back to the kernel saves the page faults and TLB flushes of
            // refilling it (select 1: p50 and p99 about 10% lower).
            .table_keep_resident(4 << 20);
        // Without the ioctl, keeping memory resident would memset all of it
        // after every run, touched or not; with it, only what the run
        // dirtied. So on kernels without it every page goes back instead.
        if keeps_touched_pages_resident() {
            pool.pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(config.memory_keep_resident_bytes);
        }
        let mut wasm = Config::new();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true)
            .consume_fuel(config.meter_fuel)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_stack_bytes)
            .wasm_simd(true)
            // The SQL guest is built with 128-bit multiply and add
            // instructions (see .cargo/config.toml).
            .wasm_wide_arithmetic(true)
            .cranelift_opt_level(OptLevel::Speed);
        if config.perf_map {
            wasm.profiler(ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&wasm).map_err(internal)?;
        let imports = |dead_file_calls: bool| -> Result<Imports, SandboxError> {
            let mut imports = Imports {
                linker: Linker::new(&engine),
                provided: HashSet::new(),
            };
            wasi::add_to_linker(&mut imports, dead_file_calls).map_err(internal)?;
            run::add_to_linker(&mut imports).map_err(internal)?;
            Ok(imports)
        };
        let algorithm_imports = imports(false)?;
        let algorithm_components = component::Components::new(&engine).map_err(internal)?;
        let sql_imports = imports(true)?;
        let cache = cache::ModuleCache::new(&config.cache_dir, &engine)?;
        let ticking = Arc::new(AtomicBool::new(true));
        {
            let engine = engine.clone();
            let ticking = Arc::clone(&ticking);
            std::thread::Builder::new()
                .name("sandbox-epoch".into())
                .spawn(move || {
                    while ticking.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(internal)?;
        }
        Ok(Self {
            engine,
            algorithm_components,
            algorithm_imports,
            sql_imports,
            cache,
            loaded: Mutex::new(HashMap::new()),
            ticking,
            meter_fuel: config.meter_fuel,
            split_scans: config.split_scans,
            max_parallel_instances: config.max_parallel_instances.max(1),
            slots: Slots::new(config.max_concurrent_runs as usize),
        })
    }

    /// Where the compiled form of a module with this sha256 is cached.
    pub fn cache_path(&self, module_sha256: &str) -> PathBuf {
        self.cache.path_for(module_sha256)
    }

    /// Compiles a module (or loads it from the cache) and links it. Modules
    /// importing anything the sandbox does not give fail here, by name.
    pub fn load(&self, wasm: &[u8], role: GuestRole) -> Result<Arc<Guest>, SandboxError> {
        let sha256 = hex::encode(Sha256::digest(wasm));
        if let Some(guest) = self
            .loaded
            .lock()
            .map_err(internal)?
            .get(&(sha256.clone(), role))
        {
            return Ok(Arc::clone(guest));
        }
        if component::is_component(wasm) {
            return self.load_component(wasm, role, sha256);
        }
        let (module, cache) =
            self.cache
                .load_or_compile::<wasmtime::Module>(&self.engine, wasm, &sha256)?;
        let imports = match role {
            GuestRole::Sql => &self.sql_imports,
            GuestRole::Algorithm => &self.algorithm_imports,
        };
        for import in module.imports() {
            if !imports
                .provided
                .contains(&(import.module().to_owned(), import.name().to_owned()))
            {
                return Err(SandboxError::Link {
                    module: import.module().to_owned(),
                    name: import.name().to_owned(),
                });
            }
        }
        let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
        for needed in ["memory", RUN_EXPORT] {
            if !exports.contains(&needed) {
                return Err(SandboxError::InvalidModule(format!(
                    "the module does not export {needed}"
                )));
            }
        }
        let initial_memory_bytes = module
            .exports()
            .filter_map(|export| export.ty().memory().cloned())
            .map(|memory| memory.minimum().saturating_mul(memory.page_size()))
            .max()
            .unwrap_or(0);
        let pre = imports
            .linker
            .instantiate_pre(&module)
            .map_err(|e| SandboxError::InvalidModule(format!("{e:#}")))?;
        self.remember(Guest {
            sha256,
            role,
            linked: Linked::Module(pre),
            cache,
            initial_memory_bytes,
        })
    }

    /// [`Sandbox::load`] for a component: an algorithm of the `algorithm`
    /// world (sandbox/wit/algorithm.wit), importing `host` and nothing else.
    fn load_component(
        &self,
        wasm: &[u8],
        role: GuestRole,
        sha256: String,
    ) -> Result<Arc<Guest>, SandboxError> {
        if role != GuestRole::Algorithm {
            return Err(SandboxError::InvalidModule(
                "the SQL guest is a core module; components run only as consumer algorithms".into(),
            ));
        }
        let (component, cache) = self
            .cache
            .load_or_compile::<wasmtime::component::Component>(&self.engine, wasm, &sha256)?;
        let pre = self.algorithm_components.link(&self.engine, &component)?;
        self.remember(Guest {
            sha256,
            role,
            linked: Linked::Component(pre),
            cache,
            initial_memory_bytes: 0,
        })
    }

    fn remember(&self, guest: Guest) -> Result<Arc<Guest>, SandboxError> {
        let guest = Arc::new(guest);
        self.loaded
            .lock()
            .map_err(internal)?
            .insert((guest.sha256.clone(), guest.role), Arc::clone(&guest));
        Ok(guest)
    }

    /// Runs `job` on `guest` in a fresh store under `limits`.
    ///
    /// # Errors
    /// The [`SandboxError`] that ended the run; [`Sandbox::run_metered`]
    /// also says how much fuel it burnt first.
    pub fn run(
        &self,
        guest: &Guest,
        job: Job<'_>,
        limits: &Limits,
    ) -> Result<Outcome, SandboxError> {
        self.run_metered(guest, job, limits)
            .map_err(|failure| failure.error)
    }

    /// [`Sandbox::run`], with the fuel a failed run burnt before it ended,
    /// so that a run that fails can be billed like one that completes.
    ///
    /// # Errors
    /// A [`RunFailure`]: its error, and its fuel. The fuel counts every
    /// instance the run started (the planning of a split run that turned out
    /// not to split aside, as for a completed run); it is the whole budget
    /// when the run ran out of fuel, and 0 when no instance started (an
    /// unapproved algorithm, a privacy budget too small, no free slot).
    pub fn run_metered(
        &self,
        guest: &Guest,
        job: Job<'_>,
        limits: &Limits,
    ) -> Result<Outcome, RunFailure> {
        let started = Instant::now();
        if guest.role == GuestRole::Algorithm
            && !job.policy.approved_algorithms.contains(&guest.sha256)
        {
            return Err(SandboxError::AlgorithmNotApproved {
                sha256: guest.sha256.clone(),
            }
            .into());
        }
        job.policy.validate().map_err(|e| SandboxError::Policy {
            rule: "policy".into(),
            column: None,
            message: e.to_string(),
        })?;
        let epsilon = job
            .policy
            .differential_privacy
            .as_ref()
            .map(|dp| dp.epsilon_per_query);
        if let Some(needed) = epsilon {
            if guest.role == GuestRole::Algorithm {
                return Err(SandboxError::Policy {
                    rule: "differential-privacy".into(),
                    column: None,
                    message: "this product's results are released only with noise, which the sandbox can add to SQL aggregates but not to an algorithm's output".into(),
                }
                .into());
            }
            if job.privacy_budget < needed {
                return Err(SandboxError::PrivacyBudget {
                    remaining: job.privacy_budget,
                    needed,
                }
                .into());
            }
        }
        let (tables, infos) = describe(job.tables.as_ref(), job.policy)?;
        let plan = RunPlan {
            request: GuestRequest {
                sql: job.sql.to_owned(),
                tables: infos,
                policy: job.policy.clone(),
                min_units: job.policy.aggregation.as_ref().map_or(0, |a| a.min_units),
                stage: Stage::Whole,
            },
            store: &job.tables,
            tables: &tables,
            policy: job.policy,
            limits,
            logical_time_ns: job.as_of_unix_seconds.saturating_mul(1_000_000_000),
            started,
            startup_ns: AtomicU64::new(0),
            fuel_burnt: AtomicU64::new(0),
        };
        let ((ran, fuel_before, read_before), instances) =
            self.instances(guest, &plan).map_err(|error| {
                let fuel = match error {
                    // What the budget allowed, whatever a split run's shares
                    // burnt between them.
                    SandboxError::FuelExhausted { fuel } => fuel,
                    _ => plan.fuel_burnt.load(Ordering::Relaxed).min(limits.fuel),
                };
                RunFailure { error, fuel }
            })?;
        let fuel = fuel_before + ran.fuel;
        let state = ran.state;
        let release = state.release;
        let privacy_spent = match (epsilon, release.noised) {
            (Some(epsilon), true) => epsilon,
            _ => 0.0,
        };
        Ok(Outcome {
            metering: Metering {
                fuel,
                compute_units: fuel.div_ceil(FUEL_PER_COMPUTE_UNIT),
                rows_read: read_before.0 + state.rows_read,
                bytes_read: read_before.1 + state.bytes_read,
                rows_released: release.rows,
                bytes_released: release.bytes,
                wall_time: started.elapsed(),
                startup: Duration::from_nanos(plan.startup_ns.load(Ordering::Relaxed)),
                instances,
            },
            batches: release.batches,
            suppressed_rows: release.suppressed_rows,
            truncated: release.truncated,
            privacy_spent,
            privacy_budget_left: job.privacy_budget - privacy_spent,
            log: state.log,
        })
    }

    /// Runs the plan's instances: split when the SQL guest's plan splits,
    /// whole otherwise. Returns the final (or only) instance, the fuel and
    /// (rows, bytes) read of the others, and how many instances there were.
    #[allow(clippy::type_complexity)]
    fn instances(
        &self,
        guest: &Guest,
        plan: &RunPlan<'_>,
    ) -> Result<((Ran, u64, (u64, u64)), u32), SandboxError> {
        let split = match guest.role {
            GuestRole::Sql if self.split_scans => self.split_table(plan)?,
            _ => None,
        };
        if let Some((table, parts)) = split {
            if let Some(done) = self.run_split(guest, plan, table, parts)? {
                return Ok((done, parts as u32));
            }
            // The split run's planning is not billed: only the whole run's.
            plan.fuel_burnt.store(0, Ordering::Relaxed);
        }
        Ok(((self.whole(guest, plan)?, 0, (0, 0)), 1))
    }

    fn whole(&self, guest: &Guest, plan: &RunPlan<'_>) -> Result<Ran, SandboxError> {
        self.instance(guest, plan, Stage::Whole, None, 0, &|| {})?
            .ran()
    }

    /// The table a SQL run splits: the one stored in the most parts, if any
    /// is stored in more than one.
    fn split_table(&self, plan: &RunPlan<'_>) -> Result<Option<(usize, usize)>, SandboxError> {
        let mut best: Option<(usize, usize)> = None;
        for (index, table) in plan.tables.iter().enumerate() {
            let parts = plan.store.parts(&table.name).map_err(SandboxError::Data)?;
            if parts > 1 && best.is_none_or(|(_, most)| parts > most) {
                best = Some((index, parts.min(MAX_PARTS)));
            }
        }
        Ok(best)
    }

    /// Runs the partial aggregates of shares 1.. of `parts` shares of
    /// `table`, and the final instance, which aggregates share 0 itself and
    /// then merges the others' states as they finish: as many at once as
    /// there are cores and free pool slots. `None` when the guest finds the
    /// plan cannot be split: the caller then runs it whole, and the planning
    /// the split run did is not billed. Returns the final instance, and the
    /// fuel and (rows, bytes) read of the partial ones.
    #[allow(clippy::type_complexity)]
    fn run_split(
        &self,
        guest: &Guest,
        plan: &RunPlan<'_>,
        table: usize,
        parts: usize,
    ) -> Result<Option<(Ran, u64, (u64, u64))>, SandboxError> {
        let free = self.slots.free();
        let workers = parts.min(self.max_parallel_instances).min(free).max(1);
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let spent = AtomicU64::new(0);
        let shares = Arc::new(ShareStates::new(parts));
        // Instances of shares that hold a pool slot (or failed to get one).
        let holding = (Mutex::new(0usize), Condvar::new());
        let held = || {
            *holding.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            holding.1.notify_all();
        };
        let results: Vec<Mutex<Option<Result<Ended, SandboxError>>>> =
            (0..parts).map(|_| Mutex::new(None)).collect();
        let work = || {
            loop {
                let turn = next.fetch_add(1, Ordering::Relaxed);
                if turn >= parts || stop.load(Ordering::Relaxed) {
                    break;
                }
                // Shares 1.. first and the final instance last: it waits for
                // their states, so on one core it must run after them. It
                // starts only once every share holds a pool slot, so its own
                // slot can never be the one a share is waiting for.
                let part = (turn + 1) % parts;
                let ran = if part == 0 {
                    let mut holding_now = holding.0.lock().unwrap_or_else(PoisonError::into_inner);
                    while *holding_now < parts - 1 && !stop.load(Ordering::Relaxed) {
                        holding_now = holding
                            .1
                            .wait_timeout(holding_now, Duration::from_millis(10))
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    drop(holding_now);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let stage = Stage::Final { table, parts };
                    self.instance(
                        guest,
                        plan,
                        stage,
                        Some(Arc::clone(&shares)),
                        spent.load(Ordering::Relaxed),
                        &|| {},
                    )
                } else {
                    let stage = Stage::Partial { table, part, parts };
                    // Each share may use what the finished ones left. Whether
                    // the run fits its budget depends only on the sum, so the
                    // outcome is the same in any order; this only stops a run
                    // that is over budget from burning the budget once per
                    // share.
                    let took_slot = std::cell::Cell::new(false);
                    let mut ran = self.instance(
                        guest,
                        plan,
                        stage,
                        None,
                        spent.load(Ordering::Relaxed),
                        &|| {
                            took_slot.set(true);
                            held();
                        },
                    );
                    match &mut ran {
                        Ok(Ended::Ran(ran)) => {
                            shares.publish(part, std::mem::take(&mut ran.state.partials_out));
                        }
                        _ => {
                            if !took_slot.get() {
                                held();
                            }
                            shares.cancel();
                        }
                    }
                    ran
                };
                let over_budget = match &ran {
                    Ok(Ended::Ran(ran)) => {
                        let total = spent.fetch_add(ran.fuel, Ordering::Relaxed) + ran.fuel;
                        self.meter_fuel && total >= plan.limits.fuel
                    }
                    _ => true,
                };
                if over_budget {
                    stop.store(true, Ordering::Relaxed);
                    shares.cancel();
                }
                if let Ok(mut slot) = results[part].lock() {
                    *slot = Some(ran);
                }
            }
        };
        // Workers report to the caller's subscriber, inside the caller's
        // span, so a split run's instances stay in the query's trace.
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let caller = tracing::Span::current();
        std::thread::scope(|scope| {
            for worker in 1..workers {
                let (dispatch, caller, work) = (dispatch.clone(), caller.clone(), &work);
                // A worker that cannot start leaves its shares to the others.
                let _ = std::thread::Builder::new()
                    .name(format!("sandbox-part-{worker}"))
                    .stack_size(WORKER_STACK_BYTES)
                    .spawn_scoped(scope, move || {
                        tracing::dispatcher::with_default(&dispatch, || caller.in_scope(work));
                    });
            }
            work();
        });
        let mut results = results
            .into_iter()
            .map(|slot| slot.into_inner().map_err(internal))
            .collect::<Result<Vec<_>, _>>()?;
        let final_run = results[0].take();
        let mut fuel = 0u64;
        let mut read = (0u64, 0u64);
        // A share's own failure comes before the final instance's, which
        // may only be that it stopped waiting for that share.
        for ran in results.into_iter().skip(1) {
            match ran {
                Some(Ok(Ended::Ran(ran))) => {
                    fuel += ran.fuel;
                    read.0 += ran.state.rows_read;
                    read.1 += ran.state.bytes_read;
                }
                Some(Ok(Ended::NotSplittable)) => return Ok(None),
                Some(Err(error)) => return Err(error),
                // Skipped after another share failed; that failure comes first
                // in part order only if it is earlier, so keep looking.
                None => continue,
            }
        }
        let ran = match final_run {
            Some(Ok(Ended::NotSplittable)) => return Ok(None),
            Some(Ok(Ended::Ran(ran))) => Some(*ran),
            Some(Err(error)) if self.meter_fuel && fuel >= plan.limits.fuel => {
                // It stopped because the shares had spent the budget.
                drop(error);
                None
            }
            Some(Err(error)) => return Err(error),
            None => None,
        };
        let total = fuel + ran.as_ref().map_or(0, |ran| ran.fuel);
        if self.meter_fuel && total >= plan.limits.fuel {
            return Err(SandboxError::FuelExhausted {
                fuel: plan.limits.fuel,
            });
        }
        match ran {
            Some(ran) => Ok(Some((ran, fuel, read))),
            None => Err(SandboxError::Internal(
                "the final instance of a split run never ran".into(),
            )),
        }
    }

    /// One instance in a fresh store: `stage` of `plan`, with the fuel left
    /// after `fuel_spent` and the wall time left since the run started; a
    /// final instance reads the other shares' states from `shares`.
    /// `slot_taken` is called once the instance holds its pool slot.
    fn instance(
        &self,
        guest: &Guest,
        plan: &RunPlan<'_>,
        stage: Stage,
        shares: Option<Arc<ShareStates>>,
        fuel_spent: u64,
        slot_taken: &dyn Fn(),
    ) -> Result<Ended, SandboxError> {
        let span = instance_span(stage);
        let _entered = span.enter();
        let limits = plan.limits;
        let wall_left = limits.wall_time.saturating_sub(plan.started.elapsed());
        if wall_left.is_zero() {
            return Err(SandboxError::Deadline {
                limit_ms: limits.wall_time.as_millis() as u64,
            });
        }
        let request = GuestRequest {
            stage,
            ..plan.request.clone()
        };
        let request = serde_json::to_vec(&request).map_err(internal)?;
        let split = match stage {
            Stage::Whole => Split::Whole,
            Stage::Partial { table, part, parts } => Split::Partial {
                table,
                part,
                parts,
                max_bytes: limits.memory_bytes,
            },
            Stage::Final { table, parts } => Split::Final {
                table,
                parts,
                // Without the shares' states it would wait until the deadline.
                states: shares.ok_or_else(|| {
                    SandboxError::Internal("a final instance needs its shares' states".into())
                })?,
                deadline: plan.started + limits.wall_time,
                max_bytes: limits.memory_bytes,
                share_opened: false,
                next_share: 1,
                bytes_read: 0,
            },
        };
        let state = RunState::new(RunSetup {
            request,
            store: Arc::clone(plan.store),
            tables: plan.tables.iter().map(Table::clone).collect(),
            release: Release::new(plan.policy.clone()),
            max_log_bytes: limits.max_log_bytes,
            max_output_bytes: limits.max_output_bytes,
            logical_time_ns: plan.logical_time_ns,
            limiter: RunLimiter {
                memory_bytes: limits.memory_bytes as usize,
                table_elements: limits.table_elements,
            },
            split,
        });
        let fuel_budget = limits.fuel.saturating_sub(fuel_spent);
        let limit_ms = limits.wall_time.as_millis() as u64;
        // Waiting for a slot counts against the wall-time limit: it is the
        // consumer's time too, and it bounds the queue.
        let _slot = self
            .slots
            .take(plan.started.checked_add(limits.wall_time))
            .ok_or(SandboxError::Busy {
                slots: self.slots.total,
                limit_ms,
            })?;
        slot_taken();
        let wall_left = limits.wall_time.saturating_sub(plan.started.elapsed());
        if wall_left.is_zero() {
            return Err(SandboxError::Deadline { limit_ms });
        }
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        if self.meter_fuel {
            store.set_fuel(fuel_budget).map_err(internal)?;
        }
        let ticks = (wall_left.as_nanos() / TICK.as_nanos()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();

        let starting = Instant::now();
        let started_up = || {
            let startup = starting.elapsed();
            span.record("startup_us", startup.as_micros() as u64);
            plan.startup_ns.fetch_add(
                u64::try_from(startup.as_nanos()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        };
        let result = match &guest.linked {
            Linked::Module(pre) => pre.instantiate(&mut store).and_then(|instance| {
                if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
                    init.call(&mut store, ())?;
                }
                started_up();
                let run = instance.get_typed_func::<(), i32>(&mut store, RUN_EXPORT)?;
                run.call(&mut store, ())
            }),
            Linked::Component(pre) => pre.instantiate(&mut store).and_then(|algorithm| {
                started_up();
                Ok(match algorithm.call_run(&mut store)? {
                    Ok(()) => 0,
                    Err(failure) => {
                        store.data_mut().failure = Some(failure.into());
                        1
                    }
                })
            }),
        };
        let fuel = match self.meter_fuel {
            true => fuel_budget - store.get_fuel().unwrap_or(fuel_budget),
            false => 0,
        };
        span.record("fuel", fuel);
        span.record("ran_us", starting.elapsed().as_micros() as u64);
        plan.fuel_burnt.fetch_add(fuel, Ordering::Relaxed);
        let mut state = store.into_data();
        // Either kind of instance of a split run may find the plan does not
        // split: a whole instance never asks.
        let partial = !matches!(stage, Stage::Whole);
        if let Err(error) = &result
            && partial
            && matches!(error.downcast_ref::<Abort>(), Some(Abort::NotSplittable(_)))
        {
            return Ok(Ended::NotSplittable);
        }
        let code = result.map_err(|e| classify(e, limits, &state))?;
        if code != 0 || state.failure.is_some() {
            return Err(match state.failure.take() {
                Some(GuestFailure::NotSplittable { .. }) if partial => {
                    return Ok(Ended::NotSplittable);
                }
                Some(failure) => failure.into(),
                None => SandboxError::Execution(format!(
                    "the guest returned {code}: {}",
                    state.log.trim()
                )),
            });
        }
        Ok(Ended::Ran(Box::new(Ran { fuel, state })))
    }
}

/// The span of one instance: which stage of the run it is, and (recorded as
/// it ends) its fuel and the microseconds from the start of instantiation to
/// the guest's entry point (`startup_us`) and to its return (`ran_us`). A
/// split run's shares show how evenly its cores were loaded, and the final
/// instance what merging cost.
fn instance_span(stage: Stage) -> tracing::Span {
    use tracing::field::Empty;
    match stage {
        Stage::Whole => tracing::info_span!(
            "sandbox_instance",
            stage = "whole",
            fuel = Empty,
            startup_us = Empty,
            ran_us = Empty
        ),
        Stage::Partial { table, part, parts } => tracing::info_span!(
            "sandbox_instance",
            stage = "partial",
            table,
            part,
            parts,
            fuel = Empty,
            startup_us = Empty,
            ran_us = Empty
        ),
        Stage::Final { table, parts } => tracing::info_span!(
            "sandbox_instance",
            stage = "final",
            table,
            part = 0,
            parts,
            fuel = Empty,
            startup_us = Empty,
            ran_us = Empty
        ),
    }
}

fn describe(
    store: &dyn TableStore,
    policy: &OutputPolicy,
) -> Result<(Vec<Table>, Vec<TableInfo>), SandboxError> {
    let units: Vec<&String> = policy
        .aggregation
        .iter()
        .flat_map(|a| a.privacy_unit_columns.iter())
        .collect();
    let mut tables = Vec::new();
    let mut infos = Vec::new();
    for name in store.tables() {
        let schema = store.schema(&name).map_err(SandboxError::Data)?;
        let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let readable = columns
            .iter()
            .map(|c| !policy.blocked_columns.contains(c) || units.contains(&c))
            .collect();
        tables.push(Table {
            name: name.clone(),
            readable,
            columns,
        });
        infos.push(TableInfo {
            name,
            schema: schema.as_ref().clone(),
        });
    }
    Ok((tables, infos))
}

fn classify(error: wasmtime::Error, limits: &Limits, state: &RunState) -> SandboxError {
    if let Some(abort) = error.downcast_ref::<Abort>() {
        return match abort {
            Abort::Memory => SandboxError::MemoryLimit {
                limit_bytes: limits.memory_bytes,
            },
            Abort::ResultTooLarge { limit_bytes, rule } => SandboxError::ResultTooLarge {
                limit_bytes: *limit_bytes,
                rule,
            },
            Abort::Policy {
                rule,
                column,
                message,
            } => SandboxError::Policy {
                rule: rule.clone(),
                column: column.clone(),
                message: message.clone(),
            },
            Abort::Data(message) => SandboxError::Data(message.clone()),
            Abort::Protocol(message) => {
                SandboxError::Trap(format!("broke the host protocol: {message}"))
            }
            Abort::Exit(code) => SandboxError::Execution(format!(
                "the guest exited with {code}: {}",
                state.log.trim()
            )),
            Abort::NotSplittable(reason) => SandboxError::Internal(format!(
                "a whole run was refused as not splittable: {reason}"
            )),
            Abort::Deadline => SandboxError::Deadline {
                limit_ms: limits.wall_time.as_millis() as u64,
            },
            Abort::ShareFailed => {
                SandboxError::Internal("a share of the split run failed or never ran".into())
            }
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => SandboxError::FuelExhausted { fuel: limits.fuel },
        Some(Trap::Interrupt) => SandboxError::Deadline {
            limit_ms: limits.wall_time.as_millis() as u64,
        },
        Some(Trap::StackOverflow) => SandboxError::StackOverflow,
        Some(trap) => SandboxError::Trap(format!("{trap}{}", log_suffix(state))),
        None => SandboxError::Trap(format!("{error:#}{}", log_suffix(state))),
    }
}

fn log_suffix(state: &RunState) -> String {
    if state.log.is_empty() {
        String::new()
    } else {
        format!(" (guest log: {})", state.log.trim())
    }
}
