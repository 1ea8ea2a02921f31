//! The host: one wasmtime engine per process, modules compiled once and
//! cached, and every run in a fresh store under hard limits.
//!
//! Our own narrow API over wasmtime: callers load a [`Guest`] and [`run`]
//! a [`Job`] on it; nothing of wasmtime leaks out.
//!
//! [`run`]: Sandbox::run

mod cache;
mod component;
mod config;
mod data;
mod error;
mod filter;
mod instance;
mod objects;
mod release;
mod run;
mod slots;
mod split;
mod versioned;
mod wasi;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, InstancePre, IntoFunc, Linker, OptLevel,
    PoolingAllocationConfig, ProfilingStrategy,
};

pub use cache::CacheOutcome;
pub use config::{FUEL_PER_COMPUTE_UNIT, Limits, SandboxConfig, keeps_touched_pages_resident};
pub use data::open as open_plain_file;
pub use data::{
    BATCH_ROWS, DeclaredColumns, FooterCache, LocalDirectory, MAX_PARTS, SHARE_ROWS, TableScan,
    TableStore,
};
pub use error::{RunFailure, SandboxError};
pub use filter::ScanFilter;
pub use objects::{ListError, MAX_ARROW_OBJECT_BYTES, ObjectTables, folder as object_folder};
pub use release::MIN_UNITS_METADATA;
pub use versioned::VersionTables;

use config::TICK;
use instance::describe;
use run::{RunState, Table};
use slots::Slots;

use crate::policy::OutputPolicy;
use crate::protocol::{GuestRequest, RUN_EXPORT, Stage};

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

    /// Runs it takes at once (its pool's instance slots).
    #[must_use]
    pub fn slots(&self) -> u32 {
        u32::try_from(self.slots.total).unwrap_or(u32::MAX)
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
}
