//! How the server runs queries: its limits, flags and the engine that holds
//! the sandbox, the SQL guest, the admission of consumers and the products
//! recently read.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use civicgrid_sandbox::{FooterCache, Guest, GuestRole, Sandbox, SandboxConfig};

use crate::billing;
use crate::error::{MarketError, Result};

use super::reserve::StoredProduct;

/// How the server runs queries.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The SQL guest (`civicgrid_sandbox_guest.wasm`).
    pub sql_guest: PathBuf,
    /// Where compiled modules are cached.
    pub cache_dir: PathBuf,
    /// Compute units a query may use when it does not say.
    pub default_compute_units: i64,
    /// Most compute units a query may ask for.
    pub max_compute_units: i64,
    /// Wall time per query.
    pub wall_time: Duration,
    /// Linear memory per query (at least what the SQL guest starts with, at
    /// most the 4 GiB a 32-bit Wasm memory can address).
    pub memory_bytes: u64,
    /// Queries running in the sandbox at once (its pool's instance slots);
    /// more wait for a slot, up to their wall time.
    pub concurrent_queries: u32,
    /// The platform's share of each charge, in basis points.
    pub platform_fee_bps: i64,
    /// Refused or failed queries a consumer organization may have in any
    /// minute before further queries are turned away until the minute has
    /// passed: each such query is one probe of the policy (or, failing at
    /// run time, one bit), and a consumer asking real questions rarely
    /// makes many in a row. 0: no limit.
    pub unanswered_per_minute: u32,
}

impl EngineConfig {
    /// Defaults around a SQL guest and a cache directory.
    #[must_use]
    pub fn new(sql_guest: impl Into<PathBuf>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            sql_guest: sql_guest.into(),
            cache_dir: cache_dir.into(),
            default_compute_units: 20_000,
            max_compute_units: 200_000,
            wall_time: Duration::from_secs(60),
            memory_bytes: 2 << 30,
            concurrent_queries: 32,
            platform_fee_bps: billing::DEFAULT_PLATFORM_FEE_BPS,
            unanswered_per_minute: 30,
        }
    }
}

/// The query limits a server takes as flags, the same in
/// `civicgrid-marketplace serve` and `civicgrid up`, with their defaults
/// (those of [`EngineConfig::new`]).
#[derive(Clone, Debug, clap::Args)]
pub struct EngineFlags {
    /// Compute units a query may use when it does not say (1 unit = 1,000,000 fuel).
    #[arg(long, default_value_t = 20_000)]
    pub default_compute_units: i64,
    /// Most compute units a query may ask for; a query's hold on the
    /// consumer's balance is at most this times the plan's unit price.
    #[arg(long, default_value_t = 200_000)]
    pub max_compute_units: i64,
    /// Wall time a query may run, in seconds, queueing for a sandbox slot included.
    #[arg(long, default_value_t = 60)]
    pub query_wall_time_secs: u64,
    /// Linear memory a query may use, in MiB: at least what the SQL guest
    /// starts with (16), at most 4096.
    #[arg(long, default_value_t = 2048)]
    pub query_memory_mib: u64,
    /// Queries run in the sandbox at once; more wait for a slot.
    #[arg(long, default_value_t = 32)]
    pub concurrent_queries: u32,
    /// The platform's share of each charge, in basis points (1,000 = 10%).
    #[arg(long, default_value_t = billing::DEFAULT_PLATFORM_FEE_BPS)]
    pub platform_fee_bps: i64,
}

impl EngineFlags {
    /// The engine's configuration under these limits, checked before anything
    /// is loaded or written.
    ///
    /// # Errors
    /// `InvalidArgument` whose field is the flag (`--query-wall-time-secs`).
    pub fn config(
        &self,
        sql_guest: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
    ) -> Result<EngineConfig> {
        let mut config = EngineConfig::new(sql_guest, cache_dir);
        config.default_compute_units = self.default_compute_units;
        config.max_compute_units = self.max_compute_units;
        config.wall_time = Duration::from_secs(self.query_wall_time_secs);
        config.memory_bytes = self.query_memory_mib.saturating_mul(1 << 20);
        config.concurrent_queries = self.concurrent_queries;
        config.platform_fee_bps = self.platform_fee_bps;
        config.validate().map_err(named_as_flag)?;
        Ok(config)
    }

    /// Opens the engine for `config` (from [`EngineFlags::config`]); a limit
    /// the SQL guest cannot run under is refused naming its flag.
    ///
    /// # Errors
    /// As [`QueryEngine::open`], with flags as fields.
    pub fn open(config: EngineConfig) -> Result<QueryEngine> {
        QueryEngine::open(config).map_err(named_as_flag)
    }
}

/// The engine names a limit by its flag without the dashes; a command line
/// user reads it with them.
fn named_as_flag(error: MarketError) -> MarketError {
    match error {
        MarketError::InvalidArgument { field, message } => MarketError::InvalidArgument {
            field: format!("--{field}"),
            message,
        },
        other => other,
    }
}

/// The most linear memory a query may have: all a 32-bit Wasm memory can
/// address.
pub const MAX_QUERY_MEMORY_BYTES: u64 = 4 << 30;

/// Longest wall time a query may be given.
pub const MAX_QUERY_WALL_TIME: Duration = Duration::from_secs(3_600);

/// Most queries the sandbox may run at once (each holds a pool slot).
pub const MAX_CONCURRENT_QUERIES: u32 = 1_024;

impl EngineConfig {
    /// Checks every limit, naming the server flag of the first out of range.
    ///
    /// # Errors
    /// `InvalidArgument` with the flag (e.g. `query-wall-time-secs`) as the field.
    pub fn validate(&self) -> Result<()> {
        if self.max_compute_units < 1 {
            return Err(MarketError::invalid("max-compute-units", "at least 1"));
        }
        if !(1..=self.max_compute_units).contains(&self.default_compute_units) {
            return Err(MarketError::invalid(
                "default-compute-units",
                format!(
                    "between 1 and the maximum compute units ({})",
                    self.max_compute_units
                ),
            ));
        }
        if self.wall_time.is_zero() || self.wall_time > MAX_QUERY_WALL_TIME {
            return Err(MarketError::invalid(
                "query-wall-time-secs",
                format!("between 1 and {} seconds", MAX_QUERY_WALL_TIME.as_secs()),
            ));
        }
        if self.memory_bytes == 0 || self.memory_bytes > MAX_QUERY_MEMORY_BYTES {
            return Err(MarketError::invalid(
                "query-memory-mib",
                format!(
                    "between 1 and {} MiB (a 32-bit Wasm memory addresses no more)",
                    MAX_QUERY_MEMORY_BYTES >> 20
                ),
            ));
        }
        if !(1..=MAX_CONCURRENT_QUERIES).contains(&self.concurrent_queries) {
            return Err(MarketError::invalid(
                "concurrent-queries",
                format!("between 1 and {MAX_CONCURRENT_QUERIES}"),
            ));
        }
        if !(0..=10_000).contains(&self.platform_fee_bps) {
            return Err(MarketError::invalid(
                "platform-fee-bps",
                "between 0 and 10000",
            ));
        }
        Ok(())
    }
}

/// The sandbox with the SQL guest loaded, shared by every query.
pub struct QueryEngine {
    pub(super) sandbox: Sandbox,
    pub(super) sql_guest: Arc<Guest>,
    config: EngineConfig,
    /// Parquet footers of every product's files, parsed once per file.
    pub(super) footers: Arc<FooterCache>,
    /// Each product as a reservation last read it. Only a hint: the
    /// reservation's standing statement confirms it against the stored row
    /// and reads the product afresh when it has changed, so a query never
    /// runs on a stale state, spec or price. Products are never deleted, so
    /// this holds at most one entry per product in the catalog.
    products_seen: std::sync::RwLock<HashMap<String, Arc<StoredProduct>>>,
    /// Data versions as queries read them, by (product, version): immutable
    /// once published.
    pub(super) versions_read:
        std::sync::RwLock<HashMap<(String, i64), Arc<super::reserve::ReadVersion>>>,
    /// Each consumer organization's recent refused or failed queries and
    /// its queries running, for [`EngineConfig::unanswered_per_minute`].
    unanswered: std::sync::Mutex<HashMap<String, RecentRefusals>>,
}

#[derive(Debug, Default)]
struct RecentRefusals {
    /// When the last minute's refused or failed queries ended (at most the
    /// limit's number: a burst beyond it adds nothing).
    recent: std::collections::VecDeque<std::time::Instant>,
    running: usize,
}

/// A query let in by [`QueryEngine::admit`]. Unless it is marked answered,
/// it counts as refused or failed when it ends, however it ends: an error
/// or a panic on the way is no way around the limit.
pub(super) struct Admission<'a> {
    engine: &'a QueryEngine,
    /// `None` when the limit is off.
    consumer: Option<String>,
    answered: bool,
}

impl Admission<'_> {
    pub(super) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let mut unanswered = self
            .engine
            .unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = unanswered.entry(consumer).or_default();
        state.running = state.running.saturating_sub(1);
        if !self.answered {
            state.recent.push_back(std::time::Instant::now());
            let keep = (self.engine.config.unanswered_per_minute as usize).max(1);
            while state.recent.len() > keep {
                state.recent.pop_front();
            }
        }
    }
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("sql_guest", &self.sql_guest.sha256())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl QueryEngine {
    /// Admits a consumer's query unless its refused or failed queries of the
    /// last minute are at the limit. Once one has failed, its queries still
    /// running count too, so a burst of probes sent at once cannot all get
    /// past the limit before the first of them ends.
    pub(super) fn admit(&self, consumer: &str) -> Result<Admission<'_>> {
        let limit = self.config.unanswered_per_minute as usize;
        let mut admission = Admission {
            engine: self,
            consumer: None,
            answered: false,
        };
        if limit == 0 {
            return Ok(admission);
        }
        let mut unanswered = self
            .unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let consumer_state = unanswered.entry(consumer.to_owned()).or_default();
        let minute_ago = std::time::Instant::now()
            .checked_sub(Duration::from_secs(60))
            .unwrap_or_else(std::time::Instant::now);
        let recent = &mut consumer_state.recent;
        while recent.front().is_some_and(|t| *t < minute_ago) {
            recent.pop_front();
        }
        let at_limit = recent.len() >= limit
            || (!recent.is_empty() && recent.len() + consumer_state.running >= limit);
        if at_limit {
            return Err(MarketError::ResourceExhausted(format!(
                "{limit} of your organization's queries were refused or failed in the last \
                 minute; wait a minute before the next"
            )));
        }
        consumer_state.running += 1;
        admission.consumer = Some(consumer.to_owned());
        Ok(admission)
    }

    /// Starts the sandbox and loads (compiling once, then from the cache)
    /// the SQL guest.
    ///
    /// # Errors
    /// `InvalidArgument` naming the server flag of a limit out of range;
    /// `Unavailable` when the guest cannot be read or loaded.
    pub fn open(config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let wasm = std::fs::read(&config.sql_guest).map_err(|error| {
            MarketError::Unavailable(format!(
                "reading the SQL guest {}: {error} (build it with `bash sandbox/build-guests.sh`)",
                config.sql_guest.display()
            ))
        })?;
        let mut sandbox_config = SandboxConfig::new(&config.cache_dir);
        // The pool's slots are sized for the largest memory any module may
        // start with, so that a guest too large for the configured limit
        // reaches the check below (which names the flag) rather than being
        // refused by the pool.
        sandbox_config.max_memory_bytes = MAX_QUERY_MEMORY_BYTES;
        sandbox_config.max_concurrent_runs = config.concurrent_queries;
        let sandbox = Sandbox::new(&sandbox_config)
            .map_err(|error| MarketError::Unavailable(format!("starting the sandbox: {error}")))?;
        let sql_guest = sandbox.load(&wasm, GuestRole::Sql).map_err(|error| {
            MarketError::Unavailable(format!(
                "loading the SQL guest {}: {error}",
                config.sql_guest.display()
            ))
        })?;
        if sql_guest.initial_memory_bytes() > config.memory_bytes {
            return Err(MarketError::invalid(
                "query-memory-mib",
                format!(
                    "at least {} MiB: the SQL guest {} starts with {} bytes of linear memory, \
                     and a query allowed {} bytes could not even start",
                    sql_guest.initial_memory_bytes().div_ceil(1 << 20),
                    config.sql_guest.display(),
                    sql_guest.initial_memory_bytes(),
                    config.memory_bytes
                ),
            ));
        }
        Ok(Self {
            sandbox,
            sql_guest,
            config,
            footers: Arc::default(),
            products_seen: std::sync::RwLock::default(),
            versions_read: std::sync::RwLock::default(),
            unanswered: std::sync::Mutex::default(),
        })
    }

    pub(super) fn product_seen(&self, id: &str) -> Option<Arc<StoredProduct>> {
        self.products_seen
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    pub(super) fn remember_product(&self, product: Arc<StoredProduct>) {
        self.products_seen
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(product.0.id.clone(), product);
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags' defaults are the engine's: a server started with no limit
    /// flags runs as one configured in code.
    #[test]
    fn engine_flags_default_to_the_engines_defaults() -> Result<()> {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            engine: EngineFlags,
        }
        let flags = <Command as clap::Parser>::try_parse_from(["serve"])
            .map_err(|error| MarketError::invalid("flags", error.to_string()))?
            .engine;
        let from_flags = flags.config("guest.wasm", "cache")?;
        let in_code = EngineConfig::new("guest.wasm", "cache");
        // Every field, through the derived Debug.
        assert_eq!(format!("{from_flags:?}"), format!("{in_code:?}"));
        Ok(())
    }
}
