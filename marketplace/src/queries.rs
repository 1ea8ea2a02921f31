//! Authorized queries: authenticate → authorize (role and contract) → quota
//! and funds (a hold for the plan's maximum) → the sandbox under the
//! product's output policy → capture the actual charge and free the rest.
//!
//! A query is two short transactions around the sandbox run. The first
//! reserves: it records the query as `running` under its idempotency key with
//! its hold. The second settles: the outcome, the usage counters, the ledger
//! postings, the privacy budget and the audit entry commit together, and the
//! hold closes. A crash between them leaves a `running` row, which
//! [`recover_interrupted`] deletes on the next start (nothing was charged and
//! nothing released), so a retry under the same key runs afresh and is
//! charged once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::{
    DeclaredColumns, FUEL_PER_COMPUTE_UNIT, FooterCache, Guest, GuestRole, Job, Limits,
    LocalDirectory, RunFailure, Sandbox, SandboxConfig, SandboxError, TableStore,
};
use sha2::{Digest as _, Sha256};
use sqlx::{AnyConnection, Row as _};

use crate::audit::log::{self, Event};
use crate::audit::merkle::Frontier;
use crate::billing::{self, AccountKind, PeriodUsage, Posting, QueryUse};
use crate::error::{MarketError, Result, Unanswered};
use crate::identity::Principal;
use crate::metering::Metering;
pub use crate::policy::sandbox_policy;
use crate::proto;
use crate::store::{Backend, Param, Store, WriteBatch, now_ms};

/// The organization id the platform's fee account is kept under.
pub const PLATFORM_ACCOUNT: &str = "platform";

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The longest SQL text (or algorithm input) a query may send. Work per
/// kept row grows with a query's length, and a row's cost is what the
/// output policy must not let count withheld rows.
pub const MAX_SQL_BYTES: usize = 64 << 10;

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
    sandbox: Sandbox,
    sql_guest: Arc<Guest>,
    config: EngineConfig,
    /// Parquet footers of every product's files, parsed once per file.
    footers: Arc<FooterCache>,
    /// Each product as a reservation last read it. Only a hint: the
    /// reservation's standing statement confirms it against the stored row
    /// and reads the product afresh when it has changed, so a query never
    /// runs on a stale state, spec or price. Products are never deleted, so
    /// this holds at most one entry per product in the catalog.
    products_seen: std::sync::RwLock<HashMap<String, Arc<StoredProduct>>>,
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
struct Admission<'a> {
    engine: &'a QueryEngine,
    /// `None` when the limit is off.
    consumer: Option<String>,
    answered: bool,
}

impl Admission<'_> {
    fn answered(mut self) {
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
    fn admit(&self, consumer: &str) -> Result<Admission<'_>> {
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
            unanswered: std::sync::Mutex::default(),
        })
    }

    fn product_seen(&self, id: &str) -> Option<Arc<StoredProduct>> {
        self.products_seen
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn remember_product(&self, product: Arc<StoredProduct>) {
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

/// Checks a RunQuery request's own fields.
fn validate(request: &proto::RunQueryRequest, max_compute_units: i64) -> Result<()> {
    if request.product_id.is_empty() {
        return Err(MarketError::invalid("product_id", "is required"));
    }
    let key = &request.idempotency_key;
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(MarketError::invalid(
            "idempotency_key",
            format!("1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters, unique per request"),
        ));
    }
    if request.sql.len() > MAX_SQL_BYTES {
        return Err(MarketError::invalid(
            "sql",
            format!("at most {MAX_SQL_BYTES} bytes"),
        ));
    }
    if request.algorithm_wasm.is_empty() && request.sql.trim().is_empty() {
        return Err(MarketError::invalid(
            "sql",
            "send SQL, or an algorithm in algorithm_wasm",
        ));
    }
    if !(0..=max_compute_units).contains(&request.max_compute_units) {
        return Err(MarketError::invalid(
            "max_compute_units",
            format!("between 0 (the default) and {max_compute_units}"),
        ));
    }
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What identifies a request for idempotency: the same key with a different
/// digest is a different request.
fn request_digest(request: &proto::RunQueryRequest, algorithm_sha256: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [
        request.product_id.as_bytes(),
        request.sql.as_bytes(),
        algorithm_sha256.as_bytes(),
        &request.max_compute_units.to_le_bytes(),
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// A query's outcome: its summary and, when it completed, its result as an
/// Arrow IPC stream.
#[derive(Clone, Debug)]
pub struct QueryOutcome {
    /// Usage, charge and audit index.
    pub summary: proto::QuerySummary,
    /// The released result (empty unless completed).
    pub result: Vec<u8>,
    /// For queries the sandbox refused or stopped: why, and what to say.
    pub error: Option<(Unanswered, String)>,
}

const SUMMARY_COLUMNS: &str = "id, consumer_organization_id, provider_organization_id, user_id, \
    product_id, contract_id, plan_id, request_sha256, sql_text, algorithm_sha256, state, error, \
    error_code, fuel, compute_units, rows_read, bytes_read, rows_released, bytes_released, \
    truncated, privacy_spent, wall_time_ms, currency, held_minor, charge_minor, audit_index, \
    created_at, metering";

fn summary_from_row(row: &sqlx::any::AnyRow) -> Result<proto::QuerySummary> {
    Ok(proto::QuerySummary {
        query_id: row.try_get("id")?,
        contract_id: row.try_get("contract_id")?,
        plan_id: row.try_get("plan_id")?,
        state: row.try_get("state")?,
        error: row.try_get("error")?,
        fuel: row.try_get("fuel")?,
        compute_units: row.try_get("compute_units")?,
        rows_read: row.try_get("rows_read")?,
        bytes_read: row.try_get("bytes_read")?,
        rows_released: row.try_get("rows_released")?,
        bytes_released: row.try_get("bytes_released")?,
        // Withheld groups are not counted for anyone (the column holds
        // counts only from before they were withheld).
        suppressed_rows: 0,
        truncated: row.try_get::<i64, _>("truncated")? != 0,
        privacy_spent: row.try_get("privacy_spent")?,
        wall_time_ms: row.try_get("wall_time_ms")?,
        currency: row.try_get("currency")?,
        held_minor: row.try_get("held_minor")?,
        charge_minor: row.try_get("charge_minor")?,
        metering: row.try_get("metering")?,
        audit_index: row.try_get::<Option<i64>, _>("audit_index")?.unwrap_or(-1),
        replayed: false,
        sql: row.try_get("sql_text")?,
        algorithm_sha256: row.try_get("algorithm_sha256")?,
        consumer_organization_id: row.try_get("consumer_organization_id")?,
        product_id: row.try_get("product_id")?,
        user_id: row.try_get("user_id")?,
        created_at_unix_ms: row.try_get("created_at")?,
        provider_organization_id: row.try_get("provider_organization_id")?,
    })
}

fn error_of(row: &sqlx::any::AnyRow) -> Result<Option<(Unanswered, String)>> {
    Ok(match Unanswered::from_stored(row.try_get("error_code")?) {
        Some(kind) => Some((kind, row.try_get("error")?)),
        None => None,
    })
}

/// Deletes queries left `running` by a process that stopped mid-query: none
/// was charged or released, their holds vanish with them, and each is audited
/// as interrupted. Call before serving.
///
/// # Errors
/// Database failures.
pub async fn recover_interrupted(store: &Store) -> Result<u64> {
    remove_running(store, None, "the server stopped while the query ran").await
}

/// Removes running queries (one, or all) with an `query.interrupted` audit
/// entry each, in one transaction.
async fn remove_running(store: &Store, only: Option<&str>, why: &str) -> Result<u64> {
    let mut transaction = store.begin().await?;
    let rows = sqlx::query(
        "SELECT id, consumer_organization_id, product_id, idempotency_key, held_minor \
         FROM queries WHERE state = 'running' AND ($1 = '' OR id = $1)",
    )
    .bind(only.unwrap_or(""))
    .fetch_all(&mut *transaction)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = row.try_get("id")?;
        events.push(Event {
            kind: "query.interrupted".into(),
            actor: "system".into(),
            tenant: row.try_get("consumer_organization_id")?,
            subject: row.try_get("product_id")?,
            details: serde_json::json!({
                "query": id,
                "idempotency_key": row.try_get::<String, _>("idempotency_key")?,
                "held_minor": row.try_get::<i64, _>("held_minor")?,
                "outcome": format!("{why}; nothing was charged or released"),
            }),
        });
    }
    sqlx::query("DELETE FROM queries WHERE state = 'running' AND ($1 = '' OR id = $1)")
        .bind(only.unwrap_or(""))
        .execute(&mut *transaction)
        .await?;
    log::append(&mut transaction, store.backend(), &events).await?;
    transaction.commit().await?;
    Ok(rows.len() as u64)
}

/// What a settlement reads, in one statement (on SQLite one trip to the
/// writer's thread instead of two): the contract's use in the period so far,
/// and the audit log's head, locked for the settlement's append.
async fn usage_and_audit_head(
    connection: &mut AnyConnection,
    backend: Backend,
    contract_id: &str,
    period: &str,
) -> Result<(PeriodUsage, Frontier)> {
    let sql = format!(
        "SELECT COALESCE(counters.queries, 0) AS queries, \
         COALESCE(counters.compute_units, 0) AS compute_units, \
         COALESCE(counters.rows_released, 0) AS rows_released, \
         COALESCE(counters.subscription_charged, 0) AS subscription_charged, \
         {head} \
         FROM audit_head AS head \
         LEFT JOIN usage_counters AS counters \
           ON counters.contract_id = $1 AND counters.period = $2 \
         WHERE head.id = 1{lock}",
        head = log::HEAD_FOR_APPEND_COLUMNS,
        lock = log::head_for_append_lock(backend),
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(contract_id)
        .bind(period)
        .fetch_one(&mut *connection)
        .await?;
    Ok((usage_from_row(&row)?, log::head_for_append_from_row(&row)?))
}

/// A contract's use in a period, from a row with the `usage_counters`
/// columns.
fn usage_from_row(row: &sqlx::any::AnyRow) -> Result<PeriodUsage> {
    Ok(PeriodUsage {
        queries: row.try_get("queries")?,
        compute_units: row.try_get("compute_units")?,
        rows_released: row.try_get("rows_released")?,
        subscription_charged: row.try_get::<i64, _>("subscription_charged")? != 0,
    })
}

/// Where a contract stands when a query asks to run on it: what the period
/// has used, its queries still running, the consumer's balance and holds,
/// and the privacy budget spent.
#[derive(Debug)]
struct Standing {
    usage: PeriodUsage,
    running: i64,
    balance: i64,
    held: i64,
    privacy_spent: f64,
    /// Whether the product's row is still the one the reservation's terms
    /// were worked out from.
    product_unchanged: bool,
}

/// Reads a reservation's [`Standing`] in one statement. On SQLite every
/// reservation queues for the one writer, and each statement there is a
/// round trip to its thread: five statements as one take four round trips
/// off every query's turn. The running count and the holds read through the
/// `queries_running` and `queries_open_holds` indexes.
///
/// Parameters: `$1` contract, `$2` period, `$3` the consumer's ledger
/// account, `$4` the consumer, `$5` currency, `$6` product; `$7` to `$11`
/// the product's state, version, update time, provider and spec bytes as
/// they were read.
const STANDING: &str = concat!(
    "SELECT \
     COALESCE(counters.queries, 0) AS queries, \
     COALESCE(counters.compute_units, 0) AS compute_units, \
     COALESCE(counters.rows_released, 0) AS rows_released, \
     COALESCE(counters.subscription_charged, 0) AS subscription_charged, \
     (SELECT COUNT(*) FROM queries WHERE contract_id = $1 AND state = 'running') AS running, \
     COALESCE(account.balance_minor, 0) AS balance, ",
    billing::open_holds_sum!("$4", "$5"),
    " AS held, \
     COALESCE(budget.spent, 0.0) AS privacy_spent, \
     (SELECT COUNT(*) FROM products WHERE id = $6 AND state = $7 AND version = $8 \
       AND updated_at = $9 AND provider_organization_id = $10 AND spec = $11) \
       AS product_unchanged \
     FROM (SELECT 1 AS one) AS standing \
     LEFT JOIN usage_counters AS counters \
       ON counters.contract_id = $1 AND counters.period = $2 \
     LEFT JOIN ledger_accounts AS account ON account.id = $3 \
     LEFT JOIN privacy_budgets AS budget \
       ON budget.consumer_organization_id = $4 AND budget.product_id = $6 \
       AND budget.period = $2"
);

async fn standing(
    connection: &mut AnyConnection,
    contract_id: &str,
    period: &str,
    consumer: &str,
    currency: &str,
    product: &StoredProduct,
) -> Result<Standing> {
    let (read, spec_bytes) = product;
    let row = sqlx::query(STANDING)
        .bind(contract_id)
        .bind(period)
        .bind(billing::account_id(
            AccountKind::Consumer,
            consumer,
            currency,
        ))
        .bind(consumer)
        .bind(currency)
        .bind(&read.id)
        .bind(crate::registry::state_name(read.state()))
        .bind(read.version)
        .bind(read.updated_at_unix_ms)
        .bind(&read.provider_organization_id)
        .bind(spec_bytes.as_slice())
        .fetch_one(&mut *connection)
        .await?;
    Ok(Standing {
        usage: usage_from_row(&row)?,
        running: row.try_get("running")?,
        balance: row.try_get("balance")?,
        held: row.try_get("held")?,
        privacy_spent: row.try_get("privacy_spent")?,
        product_unchanged: row.try_get::<i64, _>("product_unchanged")? == 1,
    })
}

/// A product as read, with its spec's bytes as stored.
type StoredProduct = (proto::Product, Vec<u8>);

/// Everything decided before the sandbox runs.
struct Reservation {
    query_id: String,
    consumer: String,
    provider: String,
    product_id: String,
    contract_id: String,
    plan: proto::PricePlan,
    period: String,
    hold: i64,
    compute_units: i64,
    /// Withheld where the product's policy withholds rows (see [`crate::metering`]).
    metering: Metering,
    /// When it was reserved: the time every view of the query shows (the
    /// time it settled would tell how long it ran).
    created_at: i64,
    policy: OutputPolicy,
    privacy_budget: f64,
    storage: ProductFiles,
    /// The product's last update: what `now()` reads inside the query, so the
    /// same query on the same data always meters the same fuel.
    as_of_unix_seconds: u64,
    algorithm: Option<Vec<u8>>,
    algorithm_sha256: String,
}

/// What the query path needs of the marketplace around it: its permission
/// check, database, metrics, contract index and data directory. The
/// server's [`crate::market::Marketplace`] is one; the query path does not
/// reach up into the service that calls it.
pub trait Market: Send + Sync {
    /// `Ok` when `principal` holds `permission` in `domain` (casbin).
    fn require_permission<'a>(
        &'a self,
        principal: &'a Principal,
        domain: &'a str,
        permission: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;
    /// The database.
    fn store(&self) -> &Store;
    /// The server's metrics.
    fn metrics(&self) -> &Arc<crate::metrics::Metrics>;
    /// The active contracts, kept in memory.
    fn contract_index(&self) -> &crate::contracts::ContractIndex;
    /// Where products' folders are.
    fn data_dir(&self) -> &std::path::Path;
}

/// Runs one query for `principal`, from authorization to settlement.
///
/// # Errors
/// Refusals before the run (authentication aside): `InvalidArgument`,
/// `PermissionDenied` (role or contract), `ResourceExhausted` (quota),
/// `FailedPrecondition` (funds, product state), `Aborted` (the same key is
/// running). A query the sandbox refuses or stops is settled (counted and
/// charged for the compute it used) and returned as an outcome with its
/// error.
#[tracing::instrument(
    name = "query",
    skip_all,
    fields(product = %request.product_id, consumer = %principal.organization.id)
)]
pub async fn run(
    market: &Arc<dyn Market>,
    engine: &Arc<QueryEngine>,
    principal: &Principal,
    request: proto::RunQueryRequest,
) -> Result<QueryOutcome> {
    let config = engine.config();
    validate(&request, config.max_compute_units)?;
    let consumer = principal.organization.id.clone();
    market
        .require_permission(principal, &consumer, "query:run")
        .await?;
    let algorithm_sha256 = if request.algorithm_wasm.is_empty() {
        String::new()
    } else {
        sha256_hex(&request.algorithm_wasm)
    };
    let digest = request_digest(&request, &algorithm_sha256);
    let admission = engine.admit(&consumer)?;
    if let Some(outcome) = replay(market.store(), &consumer, &request, &digest).await? {
        // A replay hands out released rows again: only under a contract
        // that would let the query run now (not one revoked or expired since).
        market
            .contract_index()
            .grant_for_query(&consumer, &request.product_id, &algorithm_sha256, now_ms())
            .map_err(|reason| MarketError::PermissionDenied {
                permission: "query:run".into(),
                context: format!(" on product {}: {reason}", request.product_id),
            })?;
        market.metrics().outcome("replayed");
        admission.answered();
        return Ok(outcome);
    }
    let seen = engine.product_seen(&request.product_id);
    let started = std::time::Instant::now();
    let request = Arc::new(request);
    let reserved = {
        let store = market.store().clone();
        let (market, engine, principal, request) = (
            Arc::clone(market),
            Arc::clone(engine),
            principal.clone(),
            Arc::clone(&request),
        );
        let algorithm_sha256 = algorithm_sha256.clone();
        store
            .grouped(move |connection| {
                Box::pin(async move {
                    reserve(
                        connection,
                        market.as_ref(),
                        &engine,
                        &principal,
                        &request,
                        (&algorithm_sha256, &digest),
                        seen,
                    )
                    .await
                })
            })
            .await
    };
    market.metrics().stage("authorize", started.elapsed());
    let reservation = match reserved {
        Ok(reservation) => reservation,
        Err(refusal) => {
            market.metrics().outcome("denied");
            audit_refusal(
                market.as_ref(),
                principal,
                &request,
                &algorithm_sha256,
                &refusal,
            )
            .await?;
            return Err(refusal);
        }
    };
    let sql = request.sql.clone();
    let engine_for_run = Arc::clone(engine);
    let run = SandboxRun {
        storage: reservation.storage.clone(),
        policy: reservation.policy.clone(),
        privacy_budget: reservation.privacy_budget,
        compute_units: reservation.compute_units,
        metering: reservation.metering,
        algorithm: reservation.algorithm.clone(),
        as_of_unix_seconds: reservation.as_of_unix_seconds,
    };
    let sandbox_span = tracing::info_span!("sandbox");
    let sandbox_started = std::time::Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let _entered = sandbox_span.enter();
        run_in_sandbox(&engine_for_run, &run, &sql)
    })
    .await
    .map_err(|error| MarketError::Corrupt(format!("sandbox task: {error}")));
    let sandbox_elapsed = sandbox_started.elapsed();
    market.metrics().stage("sandbox", sandbox_elapsed);
    if let Ok(Ok(ran)) = &outcome {
        let startup = ran.metering.startup;
        market.metrics().stage("sandbox_start", startup);
        market
            .metrics()
            .stage("query", sandbox_elapsed.saturating_sub(startup));
    }
    let settle_started = std::time::Instant::now();
    let query_id = reservation.query_id.clone();
    let settled = match outcome {
        Ok(outcome) => {
            let backend = market.store().backend();
            let platform_fee_bps = config.platform_fee_bps;
            let (principal, request) = (principal.clone(), Arc::clone(&request));
            let metrics = Arc::clone(market.metrics());
            market
                .store()
                .grouped(move |connection| {
                    Box::pin(async move {
                        settle(
                            connection,
                            SettleContext {
                                backend,
                                platform_fee_bps,
                                metrics: &metrics,
                            },
                            &principal,
                            &request,
                            reservation,
                            outcome,
                        )
                        .await
                    })
                })
                .await
        }
        Err(error) => Err(error),
    };
    let settled = match settled {
        Ok(settled) => settled,
        Err(error) => {
            // Leave no hold behind in a live server: the query was not
            // charged or released, so it goes as a crash would, and a retry
            // under the same key runs afresh.
            if let Err(cleanup) =
                remove_running(market.store(), Some(&query_id), "settling it failed").await
            {
                tracing::error!(error = %cleanup, query = %query_id, "could not release a hold");
            }
            return Err(error);
        }
    };
    let metrics = market.metrics();
    metrics.stage("settle", settle_started.elapsed());
    metrics.stage("total", started.elapsed());
    metrics.outcome(&settled.summary.state);
    // A query that found no free sandbox slot is the platform's busyness,
    // not the consumer's probe.
    let busy = matches!(&settled.error, Some((Unanswered::Busy, _)));
    if matches!(settled.summary.state.as_str(), "rejected" | "failed") && !busy {
        metrics.unanswered(&consumer);
    } else {
        admission.answered();
    }
    metrics.charged(
        &settled.summary.currency,
        settled.summary.charge_minor,
        settled.summary.compute_units,
    );
    Ok(settled)
}

/// The stored outcome of an earlier request under the same key.
async fn replay(
    store: &Store,
    consumer: &str,
    request: &proto::RunQueryRequest,
    digest: &str,
) -> Result<Option<QueryOutcome>> {
    // A read of its own: a key first used by a request still settling is
    // caught when the reservation inserts it (unique), not here.
    let mut connection = store.reader().acquire().await?;
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, result FROM queries \
         WHERE consumer_organization_id = $1 AND idempotency_key = $2"
    );
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(consumer)
        .bind(&request.idempotency_key)
        .fetch_optional(&mut *connection)
        .await?
    else {
        return Ok(None);
    };
    let stored_digest: String = row.try_get("request_sha256")?;
    let mut summary = summary_from_row(&row)?;
    if stored_digest != digest {
        return Err(MarketError::invalid(
            "idempotency_key",
            format!(
                "already used by query {} for a different request; use a new key",
                summary.query_id
            ),
        ));
    }
    if summary.state == "running" {
        return Err(MarketError::Aborted(format!(
            "query {} with this idempotency key is still running; retry shortly",
            summary.query_id
        )));
    }
    summary.replayed = true;
    Ok(Some(QueryOutcome {
        error: error_of(&row)?,
        result: row
            .try_get::<Option<Vec<u8>>, _>("result")?
            .unwrap_or_default(),
        summary,
    }))
}

/// A product's folder and what of it the product declares: only those
/// tables and columns are served.
#[derive(Debug, Clone)]
struct ProductFiles {
    dir: PathBuf,
    declared: HashMap<String, Vec<String>>,
}

/// What a product and the consumer's contract on it set for a query,
/// worked out before the consumer's standing is read.
struct Terms {
    contract_id: String,
    monthly_query_quota: i64,
    plan: proto::PricePlan,
    policy: OutputPolicy,
    storage: ProductFiles,
    dp_epsilon_budget: f64,
}

fn query_terms(
    market: &dyn Market,
    consumer: &str,
    product: &proto::Product,
    algorithm_sha256: &str,
    now: i64,
) -> Result<Terms> {
    if product.state() != proto::ProductState::Published {
        return Err(MarketError::FailedPrecondition(format!(
            "product {} is {}, not published",
            product.id,
            crate::registry::state_name(product.state())
        )));
    }
    let spec = product.spec.clone().unwrap_or_default();
    let grant = market
        .contract_index()
        .grant_for_query(consumer, &product.id, algorithm_sha256, now)
        .map_err(|reason| MarketError::PermissionDenied {
            permission: "query:run".into(),
            context: format!(" on product {}: {reason}", product.id),
        })?;
    let plan = spec
        .price_plans
        .iter()
        .find(|plan| plan.id == grant.plan_id)
        .cloned()
        .ok_or_else(|| {
            MarketError::FailedPrecondition(format!(
                "contract {}'s plan {:?} is no longer offered by product {}",
                grant.contract_id, grant.plan_id, product.id
            ))
        })?;
    let policy = sandbox_policy(&spec, &grant.operations).map_err(|error| {
        MarketError::FailedPrecondition(format!(
            "product {}'s output policy cannot be enforced: {error}",
            product.id
        ))
    })?;
    let dir = crate::quality::resolve_location(market.data_dir(), &spec.storage_location).map_err(
        |error| {
            MarketError::FailedPrecondition(format!(
                "product {}'s storage cannot be served: {error}",
                product.id
            ))
        },
    )?;
    let storage = ProductFiles {
        dir,
        declared: spec
            .tables
            .iter()
            .map(|table| {
                (
                    table.name.clone(),
                    table.columns.iter().map(|c| c.name.clone()).collect(),
                )
            })
            .collect(),
    };
    Ok(Terms {
        contract_id: grant.contract_id,
        monthly_query_quota: grant.monthly_query_quota,
        plan,
        policy,
        storage,
        dp_epsilon_budget: spec
            .output_policy
            .as_ref()
            .map_or(0.0, |policy| policy.dp_epsilon_budget),
    })
}

/// Authorizes the query and records it as running with its hold.
///
/// `seen` is the product as an earlier reservation read it. On SQLite every
/// statement here is a trip to the one writer's thread while every other
/// reservation and settlement waits, so the product is not read again while
/// that earlier read still holds: the standing's statement confirms it is
/// the stored row. When it is not, or when it would refuse the query, the
/// product is read here and decides.
#[tracing::instrument(name = "authorize", skip_all)]
async fn reserve(
    connection: &mut AnyConnection,
    market: &dyn Market,
    engine: &QueryEngine,
    principal: &Principal,
    request: &proto::RunQueryRequest,
    (algorithm_sha256, digest): (&str, &str),
    mut seen: Option<Arc<StoredProduct>>,
) -> Result<Reservation> {
    let config = engine.config();
    let consumer = principal.organization.id.clone();
    let now = now_ms();
    let period = billing::period_of(now);
    let (product, terms, standing) = loop {
        let (product, from_memory) = match seen.take() {
            Some(product) => (product, true),
            None => {
                let product = Arc::new(
                    crate::registry::get_as_stored(connection, &request.product_id).await?,
                );
                engine.remember_product(Arc::clone(&product));
                (product, false)
            }
        };
        let terms = match query_terms(market, &consumer, &product.0, algorithm_sha256, now) {
            Ok(terms) => terms,
            Err(_) if from_memory => continue,
            Err(refusal) => return Err(refusal),
        };
        billing::lock_for_hold(
            connection,
            market.store().backend(),
            &consumer,
            &terms.plan.currency,
        )
        .await?;
        let standing = standing(
            connection,
            &terms.contract_id,
            &period,
            &consumer,
            &terms.plan.currency,
            &product,
        )
        .await?;
        if from_memory && !standing.product_unchanged {
            continue;
        }
        break (product, terms, standing);
    };
    let product = &product.0;
    let Terms {
        contract_id,
        monthly_query_quota: quota,
        plan,
        policy,
        storage,
        dp_epsilon_budget,
    } = terms;
    let metering = Metering::for_product(product.spec.as_ref(), &policy);
    let compute_units = match metering {
        Metering::Exact if request.max_compute_units > 0 => request.max_compute_units,
        Metering::Exact => config.default_compute_units,
        // The budget a run may use would be a threshold on its cost, which
        // counts withheld rows.
        Metering::Withheld if request.max_compute_units > 0 => {
            return Err(MarketError::invalid(
                "max_compute_units",
                format!(
                    "product {} withholds rows, so every query on it has the server's compute \
                     budget (a budget of your choosing would tell how much a query cost, and with \
                     it how many rows it filtered); leave it 0",
                    product.id
                ),
            ));
        }
        Metering::Withheld => config.default_compute_units,
    };
    if metering == Metering::Withheld && plan.kind() == proto::PriceKind::PerComputeUnit {
        return Err(MarketError::FailedPrecondition(format!(
            "product {}'s plan {} is priced by compute, which on a product that withholds rows \
             would bill by the rows a query filtered; its provider must price it another way",
            product.id, plan.id
        )));
    }
    let Standing {
        usage,
        running,
        balance,
        held,
        privacy_spent,
        product_unchanged: _,
    } = standing;
    if quota > 0 && usage.queries + running >= quota {
        return Err(MarketError::ResourceExhausted(format!(
            "contract {contract_id}'s quota of {quota} queries in {period} is used up"
        )));
    }
    let hold = billing::maximum(&plan, usage, compute_units)?;
    if hold > 0 && balance - held < hold {
        return Err(MarketError::FailedPrecondition(format!(
            "insufficient funds: this query holds up to {hold} {currency} (minor units) and \
             {available} is available; deposit more, or lower max_compute_units",
            currency = plan.currency,
            available = balance - held,
        )));
    }
    let privacy_budget = if dp_epsilon_budget > 0.0 {
        // The budget is read here and debited at settlement, so two runs at
        // once would each be offered the whole remainder. Reservations of
        // one consumer are serialized (the account lock, or SQLite's one
        // writer), so one running query per consumer and product makes the
        // remainder read here exact.
        let running: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM queries WHERE consumer_organization_id = $1 \
             AND product_id = $2 AND state = 'running'",
        )
        .bind(&consumer)
        .bind(&product.id)
        .fetch_one(&mut *connection)
        .await?;
        if running > 0 {
            return Err(MarketError::Aborted(
                "another query of your organization on this differentially private product is \
                 still running; its privacy budget is spent one query at a time, so retry when \
                 that one has finished"
                    .into(),
            ));
        }
        (dp_epsilon_budget - privacy_spent).max(0.0)
    } else {
        0.0
    };
    let query_id = crate::identity::new_id("q");
    let inserted = sqlx::query(
        "INSERT INTO queries (id, consumer_organization_id, user_id, product_id, \
         provider_organization_id, contract_id, plan_id, idempotency_key, request_sha256, \
         sql_text, algorithm_sha256, period, state, error, error_code, currency, held_minor, \
         hold_open, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'running', '', 0, $13, $14, \
         1, $15)",
    )
    .bind(&query_id)
    .bind(&consumer)
    .bind(&principal.user.id)
    .bind(&product.id)
    .bind(&product.provider_organization_id)
    .bind(&contract_id)
    .bind(&plan.id)
    .bind(&request.idempotency_key)
    .bind(digest)
    .bind(&request.sql)
    .bind(algorithm_sha256)
    .bind(&period)
    .bind(&plan.currency)
    .bind(hold)
    .bind(now)
    .execute(&mut *connection)
    .await;
    if let Err(error) = inserted {
        if error
            .as_database_error()
            .is_some_and(sqlx::error::DatabaseError::is_unique_violation)
        {
            return Err(MarketError::Aborted(
                "a query with this idempotency key started just now; retry shortly".into(),
            ));
        }
        return Err(error.into());
    }
    Ok(Reservation {
        query_id,
        consumer,
        provider: product.provider_organization_id.clone(),
        product_id: product.id.clone(),
        contract_id,
        plan,
        period,
        hold,
        compute_units,
        metering,
        created_at: now,
        policy,
        privacy_budget,
        storage,
        as_of_unix_seconds: u64::try_from(product.updated_at_unix_ms / 1000).unwrap_or(0),
        algorithm: (!request.algorithm_wasm.is_empty()).then(|| request.algorithm_wasm.clone()),
        algorithm_sha256: algorithm_sha256.to_owned(),
    })
}

/// What one sandbox run needs from its reservation, moved onto the blocking
/// thread that runs it.
struct SandboxRun {
    storage: ProductFiles,
    policy: OutputPolicy,
    privacy_budget: f64,
    compute_units: i64,
    metering: Metering,
    algorithm: Option<Vec<u8>>,
    as_of_unix_seconds: u64,
}

fn run_in_sandbox(
    engine: &QueryEngine,
    run: &SandboxRun,
    sql: &str,
) -> std::result::Result<civicgrid_sandbox::Outcome, RunFailure> {
    let SandboxRun {
        storage,
        policy,
        privacy_budget,
        compute_units,
        metering,
        algorithm,
        as_of_unix_seconds,
    } = run;
    let (privacy_budget, compute_units, as_of_unix_seconds) =
        (*privacy_budget, *compute_units, *as_of_unix_seconds);
    let algorithm = algorithm.as_deref();
    let files: Arc<dyn TableStore> = Arc::new(
        LocalDirectory::discover(&storage.dir)
            .map_err(|error| SandboxError::Data(format!("the product's files: {error}")))?
            .with_footer_cache(Arc::clone(&engine.footers)),
    );
    let tables: Arc<dyn TableStore> =
        Arc::new(DeclaredColumns::new(files, storage.declared.clone()));
    let guest = match algorithm {
        Some(wasm) => engine.sandbox.load(wasm, GuestRole::Algorithm)?,
        None => Arc::clone(&engine.sql_guest),
    };
    let budget_fuel = u64::try_from(compute_units)
        .unwrap_or(0)
        .saturating_mul(FUEL_PER_COMPUTE_UNIT);
    let rng = &mut rand::thread_rng();
    let limits = Limits {
        fuel: metering.fuel_limit(budget_fuel, rng),
        wall_time: metering.wall_time_limit(engine.config.wall_time, rng),
        memory_bytes: metering.memory_limit(
            engine.config.memory_bytes,
            guest.initial_memory_bytes(),
            rng,
        ),
        ..Limits::default()
    };
    engine.sandbox.run_metered(
        &guest,
        Job {
            sql,
            tables,
            policy,
            privacy_budget,
            as_of_unix_seconds,
        },
        &limits,
    )
}

/// How a query the sandbox refused or stopped is settled and reported: the
/// one place a [`SandboxError`] becomes an [`Unanswered`] kind, an outcome
/// and the words a consumer reads (the gRPC layer alone picks the status).
#[derive(Debug)]
struct Disposition {
    /// Why, as stored and reported now and on every replay.
    code: Unanswered,
    /// The outcome: `rejected` (the policy or the planner refused the query)
    /// or `failed`.
    state: &'static str,
    /// What the consumer, the stored outcome and the audit entry say.
    message: String,
    /// Whether `message` stands in for the engine's own text, which goes
    /// only to the server's log: a failure at run time can quote the data
    /// (a cast error names the value it could not cast).
    withheld: bool,
    /// Whether the query counts against the contract's quota and pays for
    /// the fuel it burnt.
    counts: bool,
}

/// The stable codes of queries that failed while they ran, as consumers see
/// them (in `QuerySummary.error` and the status message).
mod failure_code {
    pub const EXECUTION_ERROR: &str = "execution_error";
    pub const COMPUTE_BUDGET_EXHAUSTED: &str = "compute_budget_exhausted";
    pub const TIME_LIMIT: &str = "time_limit";
    pub const MEMORY_LIMIT: &str = "memory_limit";
    pub const STACK_LIMIT: &str = "stack_limit";
    pub const RESULT_TOO_LARGE: &str = "result_too_large";
    pub const INTERNAL: &str = "internal";
}

/// `fuel` is what the run burnt before it ended: a run that found no free
/// slot for a later share after earlier shares read the data has run, and
/// when it stopped depends on the data.
fn classify(error: &SandboxError, fuel: u64) -> Disposition {
    use failure_code::*;
    // Decided before anything read the data (the host's checks, the guest's
    // parser and planner, the output policy): the reason helps and tells
    // nothing about the data.
    let precise = |code, state| Disposition {
        code,
        state,
        message: error.to_string(),
        withheld: false,
        counts: true,
    };
    let withheld = |code, failure: &str, what: &str| Disposition {
        code,
        state: "failed",
        message: format!("{what} ({failure})"),
        withheld: true,
        counts: true,
    };
    match error {
        SandboxError::Policy { .. } | SandboxError::AlgorithmNotApproved { .. } => {
            precise(Unanswered::Denied, "rejected")
        }
        SandboxError::Query(_) => precise(Unanswered::Invalid, "rejected"),
        SandboxError::PrivacyBudget { .. } => precise(Unanswered::Exhausted, "rejected"),
        SandboxError::InvalidModule(_) | SandboxError::Link { .. } => {
            precise(Unanswered::Invalid, "failed")
        }
        // Every sandbox slot stayed busy: a retry may well succeed, and the
        // consumer neither pays nor uses up its quota for the platform's
        // capacity.
        SandboxError::Busy { .. } if fuel > 0 => withheld(
            Unanswered::Exhausted,
            TIME_LIMIT,
            "the query ran past its time limit",
        ),
        SandboxError::Busy { .. } => Disposition {
            counts: false,
            ..precise(Unanswered::Busy, "failed")
        },
        SandboxError::FuelExhausted { .. } => withheld(
            Unanswered::Exhausted,
            COMPUTE_BUDGET_EXHAUSTED,
            "the query used its whole compute budget; a larger max_compute_units, where the \
             product lets you choose one, may let it finish",
        ),
        SandboxError::Deadline { .. } => withheld(
            Unanswered::Exhausted,
            TIME_LIMIT,
            "the query ran past its time limit",
        ),
        SandboxError::MemoryLimit { .. } => withheld(
            Unanswered::Exhausted,
            MEMORY_LIMIT,
            "the query needed more memory than its limit",
        ),
        SandboxError::StackOverflow => withheld(
            Unanswered::Exhausted,
            STACK_LIMIT,
            "the query exhausted its call stack",
        ),
        SandboxError::ResultTooLarge { .. } => withheld(
            Unanswered::Exhausted,
            RESULT_TOO_LARGE,
            "the query's result is larger than the product releases at once",
        ),
        // The query's own doing (a cast that fails on some value, a
        // division by zero): the same query fails again.
        SandboxError::Execution(_) => withheld(
            Unanswered::Invalid,
            EXECUTION_ERROR,
            "the query failed while running",
        ),
        // A bug in the SQL guest, or a consumer algorithm's own trap.
        SandboxError::Trap(_) => withheld(
            Unanswered::Internal,
            EXECUTION_ERROR,
            "the query failed while running",
        ),
        SandboxError::Data(_) | SandboxError::Internal(_) => withheld(
            Unanswered::Internal,
            INTERNAL,
            "the query failed inside the platform",
        ),
    }
}

fn ipc_stream(batches: &[RecordBatch]) -> std::result::Result<Vec<u8>, String> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &first.schema())
        .map_err(|e| e.to_string())?;
    for batch in batches {
        writer.write(batch).map_err(|e| e.to_string())?;
    }
    writer.into_inner().map_err(|e| e.to_string())
}

/// The server's side of a settlement: where it writes, the platform's fee,
/// and where it times its ledger and audit steps.
struct SettleContext<'a> {
    backend: Backend,
    platform_fee_bps: i64,
    metrics: &'a crate::metrics::Metrics,
}

/// Records the outcome, the charge, the ledger postings, the privacy budget
/// and the audit entry in one transaction, and closes the hold.
///
/// Every query counts against its contract's quota and pays, under its plan
/// and never more than its hold, for the compute it used — completed,
/// refused by the policy or the planner, or stopped by an error or a limit
/// (out of fuel: the whole budget). A refusal that burnt no fuel (decided by
/// the host before any instance started) costs nothing but still counts;
/// only a query that found no free sandbox slot neither counts nor pays for
/// what it used. A query that failed while running is recorded, audited and
/// returned with a stable code only; the engine's text goes to the log. On
/// a product that withholds rows, no figure of the compute is kept or shown
/// (see [`crate::metering`]).
#[tracing::instrument(name = "settle", skip_all, fields(query = %reservation.query_id))]
async fn settle(
    connection: &mut AnyConnection,
    context: SettleContext<'_>,
    principal: &Principal,
    request: &proto::RunQueryRequest,
    reservation: Reservation,
    outcome: std::result::Result<civicgrid_sandbox::Outcome, RunFailure>,
) -> Result<QueryOutcome> {
    let SettleContext {
        backend,
        platform_fee_bps,
        metrics,
    } = context;
    let outcome = match outcome {
        Ok(outcome) => match ipc_stream(&outcome.batches) {
            Ok(bytes) => Ok((outcome, bytes)),
            Err(error) => Err(RunFailure {
                error: SandboxError::Data(format!("encoding the result: {error}")),
                fuel: outcome.metering.fuel,
            }),
        },
        Err(failure) => Err(failure),
    };
    let (usage, audit_head) = usage_and_audit_head(
        connection,
        backend,
        &reservation.contract_id,
        &reservation.period,
    )
    .await?;
    let Settled {
        mut summary,
        result,
        error,
        event_kind,
        counts,
        burnt,
    } = summarize(principal, request, &reservation, outcome);
    // Every write of the settlement goes in one batch: one trip to SQLite's
    // writer instead of ten (its reads went in one statement above, and
    // none reads what the batch writes).
    let mut writes = WriteBatch::new();
    if counts {
        let ledger_started = std::time::Instant::now();
        summary.charge_minor = charge_into(
            &mut writes,
            &reservation,
            usage,
            &summary,
            burnt,
            platform_fee_bps,
        )?;
        metrics.stage("ledger", ledger_started.elapsed());
    }
    let audit_started = std::time::Instant::now();
    let audit_index = audit_into(
        &mut writes,
        backend,
        audit_head,
        principal,
        request,
        &reservation,
        &summary,
        event_kind,
        &result,
    )?;
    metrics.stage("audit", audit_started.elapsed());
    summary.audit_index = i64::try_from(audit_index).unwrap_or(i64::MAX);
    record_outcome_into(&mut writes, &reservation, &summary, error.as_ref(), &result);
    let writes_started = std::time::Instant::now();
    writes.execute(connection).await?;
    metrics.stage("writes", writes_started.elapsed());
    summary.created_at_unix_ms = reservation.created_at;
    Ok(QueryOutcome {
        summary,
        result,
        error,
    })
}

/// A settled run before anything is written: what the consumer is told,
/// the released result, the audit event's kind, and whether it counts
/// against the quota and burnt anything to pay for.
struct Settled {
    summary: proto::QuerySummary,
    result: Vec<u8>,
    error: Option<(Unanswered, String)>,
    event_kind: &'static str,
    counts: bool,
    burnt: bool,
}

/// The summary of a run that completed or failed, with its cost withheld
/// where the product withholds rows.
fn summarize(
    principal: &Principal,
    request: &proto::RunQueryRequest,
    reservation: &Reservation,
    mut outcome: std::result::Result<(civicgrid_sandbox::Outcome, Vec<u8>), RunFailure>,
) -> Settled {
    let currency = reservation.plan.currency.clone();
    let mut summary = proto::QuerySummary {
        query_id: reservation.query_id.clone(),
        contract_id: reservation.contract_id.clone(),
        plan_id: reservation.plan.id.clone(),
        currency,
        held_minor: reservation.hold,
        metering: Metering::Exact.as_str().into(),
        sql: request.sql.clone(),
        algorithm_sha256: reservation.algorithm_sha256.clone(),
        consumer_organization_id: reservation.consumer.clone(),
        provider_organization_id: reservation.provider.clone(),
        product_id: reservation.product_id.clone(),
        user_id: principal.user.id.clone(),
        ..Default::default()
    };
    let mut result = Vec::new();
    let mut error = None;
    let event_kind;
    // Whether the query counts against the quota, and whether it burnt
    // anything to pay for.
    let (counts, burnt);
    match &mut outcome {
        Ok((released, bytes)) => {
            let metering = &released.metering;
            summary.state = "completed".into();
            summary.fuel = i64::try_from(metering.fuel).unwrap_or(i64::MAX);
            summary.compute_units = i64::try_from(metering.compute_units).unwrap_or(i64::MAX);
            summary.rows_read = i64::try_from(metering.rows_read).unwrap_or(i64::MAX);
            summary.bytes_read = i64::try_from(metering.bytes_read).unwrap_or(i64::MAX);
            summary.rows_released = i64::try_from(metering.rows_released).unwrap_or(i64::MAX);
            summary.bytes_released = i64::try_from(metering.bytes_released).unwrap_or(i64::MAX);
            // `suppressed_rows` stays 0: under `GROUP BY unit` the number of
            // withheld groups is an exact count of matching rows.
            summary.truncated = released.truncated;
            summary.privacy_spent = released.privacy_spent;
            summary.wall_time_ms =
                i64::try_from(metering.wall_time.as_millis()).unwrap_or(i64::MAX);
            result = std::mem::take(bytes);
            event_kind = "query.completed";
            (counts, burnt) = (true, true);
        }
        Err(failure) => {
            let disposition = classify(&failure.error, failure.fuel);
            if disposition.code == Unanswered::Internal {
                tracing::error!(
                    query = %reservation.query_id,
                    error = %failure.error,
                    "query failed inside the sandbox"
                );
            } else if disposition.withheld {
                tracing::warn!(
                    query = %reservation.query_id,
                    error = %failure.error,
                    "query failed while running"
                );
            }
            summary.state = disposition.state.into();
            // A run that failed on the data may still have told something
            // about it (that it failed): under differential privacy it
            // spends what a completed query may, as the budget allows.
            if disposition.state == "failed"
                && let Some(dp) = &reservation.policy.differential_privacy
            {
                summary.privacy_spent = dp.epsilon_per_query.min(reservation.privacy_budget);
            }
            summary.error = disposition.message;
            summary.fuel = i64::try_from(failure.fuel).unwrap_or(i64::MAX);
            summary.compute_units = i64::try_from(failure.compute_units()).unwrap_or(i64::MAX);

            error = Some((disposition.code, summary.error.clone()));
            event_kind = if disposition.state == "rejected" {
                "query.rejected"
            } else {
                "query.failed"
            };
            (counts, burnt) = (disposition.counts, failure.fuel > 0);
        }
    }
    withhold_cost(&mut summary, reservation);
    Settled {
        summary,
        result,
        error,
        event_kind,
        counts,
        burnt,
    }
}

/// The charge's postings, the usage counters and the privacy budget spent,
/// into `writes`; returns the charge (never more than the hold).
fn charge_into(
    writes: &mut WriteBatch,
    reservation: &Reservation,
    usage: PeriodUsage,
    summary: &proto::QuerySummary,
    burnt: bool,
    platform_fee_bps: i64,
) -> Result<i64> {
    let currency = &reservation.plan.currency;
    let used = QueryUse {
        compute_units: summary.compute_units,
        rows_released: summary.rows_released,
    };
    // Never more than was held: the hold is the price's ceiling.
    let charge = if burnt {
        billing::charge(&reservation.plan, usage, used)?.min(reservation.hold)
    } else {
        0
    };
    let fee = billing::platform_fee(charge, platform_fee_bps);
    billing::post_into(
        writes,
        "charge",
        currency,
        Some(&reservation.query_id),
        &[
            Posting {
                kind: AccountKind::Consumer,
                organization: reservation.consumer.clone(),
                amount_minor: -charge,
            },
            Posting {
                kind: AccountKind::Provider,
                organization: reservation.provider.clone(),
                amount_minor: charge - fee,
            },
            Posting {
                kind: AccountKind::Platform,
                organization: PLATFORM_ACCOUNT.into(),
                amount_minor: fee,
            },
        ],
    )?;
    // A subscription's fee is charged with the first query that pays.
    let subscription =
        i64::from(burnt && reservation.plan.kind() == proto::PriceKind::Subscription);
    writes.push(
        "INSERT INTO usage_counters (contract_id, period, queries, compute_units, \
         rows_released, subscription_charged) VALUES ($1, $2, 1, $3, $4, $5) \
         ON CONFLICT (contract_id, period) DO UPDATE SET \
         queries = usage_counters.queries + 1, \
         compute_units = usage_counters.compute_units + excluded.compute_units, \
         rows_released = usage_counters.rows_released + excluded.rows_released, \
         subscription_charged = CASE WHEN excluded.subscription_charged = 1 THEN 1 \
                                ELSE usage_counters.subscription_charged END",
        vec![
            Param::from(&reservation.contract_id),
            Param::from(&reservation.period),
            Param::Int(used.compute_units),
            Param::Int(used.rows_released),
            Param::Int(subscription),
        ],
    );
    if summary.privacy_spent > 0.0 {
        writes.push(
            "INSERT INTO privacy_budgets (consumer_organization_id, product_id, period, spent) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (consumer_organization_id, product_id, period) \
             DO UPDATE SET spent = privacy_budgets.spent + excluded.spent",
            vec![
                Param::from(&reservation.consumer),
                Param::from(&reservation.product_id),
                Param::from(&reservation.period),
                Param::Real(summary.privacy_spent),
            ],
        );
    }
    Ok(charge)
}

/// The query's audit entry, into `writes` after `audit_head`; returns its
/// index.
#[allow(clippy::too_many_arguments)]
fn audit_into(
    writes: &mut WriteBatch,
    backend: Backend,
    audit_head: Frontier,
    principal: &Principal,
    request: &proto::RunQueryRequest,
    reservation: &Reservation,
    summary: &proto::QuerySummary,
    event_kind: &'static str,
    result: &[u8],
) -> Result<u64> {
    let currency = &reservation.plan.currency;
    let audit_index = log::append_after(
        writes,
        backend,
        audit_head,
        &[Event {
            kind: event_kind.into(),
            actor: principal.user.id.clone(),
            tenant: reservation.consumer.clone(),
            subject: reservation.product_id.clone(),
            details: serde_json::json!({
                "query": reservation.query_id,
                "contract": reservation.contract_id,
                "provider": reservation.provider,
                "plan": reservation.plan.id,
                "idempotency_key": request.idempotency_key,
                "sql_sha256": sha256_hex(request.sql.as_bytes()),
                "algorithm_sha256": reservation.algorithm_sha256,
                "error": summary.error,
                "metering": summary.metering,
                "fuel": summary.fuel,
                "compute_units": summary.compute_units,
                "rows_read": summary.rows_read,
                "rows_released": summary.rows_released,
                "privacy_spent": summary.privacy_spent,
                "held_minor": reservation.hold,
                "charge_minor": summary.charge_minor,
                "currency": currency,
                "result_sha256": sha256_hex(result),
            }),
        }],
    )?[0];
    Ok(audit_index)
}

/// The query's row: its outcome, metering, charge, result and audit index.
fn record_outcome_into(
    writes: &mut WriteBatch,
    reservation: &Reservation,
    summary: &proto::QuerySummary,
    error: Option<&(Unanswered, String)>,
    result: &[u8],
) {
    let now = now_ms();
    let (error_code, error_text) = error.map_or((0, String::new()), |(code, text)| {
        (code.stored(), text.clone())
    });
    writes.push(
        "UPDATE queries SET state = $1, error = $2, error_code = $3, fuel = $4, \
         compute_units = $5, rows_read = $6, bytes_read = $7, rows_released = $8, \
         bytes_released = $9, truncated = $10, privacy_spent = $11, wall_time_ms = $12, \
         charge_minor = $13, result = $14, audit_index = $15, hold_open = 0, \
         finished_at = $16, metering = $18 WHERE id = $17 AND state = 'running'",
        vec![
            Param::from(&summary.state),
            Param::from(error_text),
            Param::Int(error_code),
            Param::Int(summary.fuel),
            Param::Int(summary.compute_units),
            Param::Int(summary.rows_read),
            Param::Int(summary.bytes_read),
            Param::Int(summary.rows_released),
            Param::Int(summary.bytes_released),
            Param::Int(i64::from(summary.truncated)),
            Param::Real(summary.privacy_spent),
            Param::Int(summary.wall_time_ms),
            Param::Int(summary.charge_minor),
            Param::Blob(result.to_vec()),
            Param::Int(summary.audit_index),
            Param::Int(now),
            Param::from(&reservation.query_id),
            Param::from(&summary.metering),
        ],
    );
}

/// Hides a run's cost when its product withholds rows: no fuel, compute
/// units, wall time or bytes and rows read (each counts rows the policy did
/// not release, and so would the charge, which is why such products are not
/// priced by compute). The exact figures go to the server's log only.
fn withhold_cost(summary: &mut proto::QuerySummary, reservation: &Reservation) {
    if reservation.metering == Metering::Exact {
        return;
    }
    tracing::info!(
        query = %reservation.query_id,
        fuel = summary.fuel,
        compute_units = summary.compute_units,
        wall_time_ms = summary.wall_time_ms,
        rows_read = summary.rows_read,
        bytes_read = summary.bytes_read,
        "the cost of a query whose compute is withheld from its consumer"
    );
    summary.metering = Metering::Withheld.as_str().into();
    summary.fuel = 0;
    summary.compute_units = 0;
    summary.wall_time_ms = 0;
    summary.rows_read = 0;
    summary.bytes_read = 0;
}

/// Audits a query refused before it ran (nothing was reserved or charged).
async fn audit_refusal(
    market: &dyn Market,
    principal: &Principal,
    request: &proto::RunQueryRequest,
    algorithm_sha256: &str,
    refusal: &MarketError,
) -> Result<()> {
    if matches!(
        refusal,
        MarketError::Database(_) | MarketError::Corrupt(_) | MarketError::Aborted(_)
    ) {
        return Ok(());
    }
    let event = Event {
        kind: "query.denied".into(),
        actor: principal.user.id.clone(),
        tenant: principal.organization.id.clone(),
        subject: request.product_id.clone(),
        details: serde_json::json!({
            "idempotency_key": request.idempotency_key,
            "sql_sha256": sha256_hex(request.sql.as_bytes()),
            "algorithm_sha256": algorithm_sha256,
            "reason": refusal.to_string(),
        }),
    };
    log::append_alone(market.store(), event).await.map(|_| ())
}

/// Who may see what in usage views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageView {
    /// Platform-admins and regulators: everything.
    Everything,
    /// A consumer: its own queries.
    Consumer,
    /// A provider: queries on its products, without their text.
    Provider,
}

/// Queries visible in `view` to `organization`, newest first.
///
/// # Errors
/// `InvalidArgument` for a bad period or limit; database failures.
pub async fn list_usage(
    connection: &mut AnyConnection,
    view: UsageView,
    organization: &str,
    request: &proto::ListUsageRequest,
) -> Result<Vec<proto::QuerySummary>> {
    if !request.period.is_empty() {
        billing::validate_period("period", &request.period)?;
    }
    if !(0..=1_000).contains(&request.limit) {
        return Err(MarketError::invalid("limit", "0 (the default) to 1,000"));
    }
    let limit = if request.limit == 0 {
        1_000
    } else {
        request.limit
    };
    let (side, who) = match view {
        UsageView::Everything => ("consumer_organization_id", request.organization_id.as_str()),
        UsageView::Consumer => ("consumer_organization_id", organization),
        UsageView::Provider => ("provider_organization_id", organization),
    };
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS} FROM queries \
         WHERE state <> 'running' AND ($1 = '' OR {side} = $1) AND ($2 = '' OR product_id = $2) \
         AND ($3 = '' OR period = $3) ORDER BY created_at DESC, id DESC LIMIT $4"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(who)
        .bind(&request.product_id)
        .bind(&request.period)
        .bind(limit)
        .fetch_all(&mut *connection)
        .await?;
    rows.iter()
        .map(|row| {
            let mut summary = summary_from_row(row)?;
            if view == UsageView::Provider {
                // Providers see that and how their data was used, not what
                // their customers asked.
                summary.sql.clear();
            }
            Ok(summary)
        })
        .collect()
}

/// Splits an IPC stream into response chunks of at most this many bytes.
pub const RESULT_CHUNK_BYTES: usize = 1 << 20;

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

    /// One error of every kind the sandbox reports.
    fn every_sandbox_error() -> Vec<SandboxError> {
        let quoting = "Cast error: Cannot cast string 'xhealth/458' to value of Int32 type";
        vec![
            SandboxError::FuelExhausted { fuel: 5_000_000 },
            SandboxError::Deadline { limit_ms: 60_000 },
            SandboxError::MemoryLimit {
                limit_bytes: 1 << 30,
            },
            SandboxError::Busy {
                slots: 32,
                limit_ms: 60_000,
            },
            SandboxError::StackOverflow,
            SandboxError::ResultTooLarge {
                limit_bytes: 1 << 20,
                rule: "max_result_bytes",
            },
            SandboxError::Policy {
                rule: "blocked-columns".into(),
                column: Some("person_id".into()),
                message: "person_id is blocked".into(),
            },
            SandboxError::Query("no such column: salary".into()),
            SandboxError::Execution(quoting.into()),
            SandboxError::Trap(format!("unreachable (guest log: {quoting})")),
            SandboxError::Link {
                module: "wasi_snapshot_preview1".into(),
                name: "sock_open".into(),
            },
            SandboxError::InvalidModule("bad magic".into()),
            SandboxError::AlgorithmNotApproved {
                sha256: "ab".repeat(32),
            },
            SandboxError::PrivacyBudget {
                remaining: 0.1,
                needed: 0.4,
            },
            SandboxError::Data(format!("products/population/residents.parquet: {quoting}")),
            SandboxError::Internal(quoting.into()),
        ]
    }

    /// A query that failed while it ran is reported by a generic message
    /// and a stable code, whatever the engine said (it can quote the data);
    /// a refusal decided before the data was read says precisely why.
    #[test]
    fn failures_at_run_time_are_reported_by_code_alone() {
        for error in every_sandbox_error() {
            let disposition = classify(&error, 0);
            let inner = error.to_string();
            if disposition.withheld {
                assert_eq!(disposition.state, "failed", "{error}");
                assert!(!disposition.message.contains("xhealth"), "{error}");
                let code = disposition
                    .message
                    .strip_suffix(')')
                    .and_then(|message| message.rsplit_once(" ("))
                    .map(|(_, code)| code)
                    .unwrap_or_default();
                assert!(
                    !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "a snake_case code in {:?}",
                    disposition.message
                );
            } else {
                assert_eq!(disposition.message, inner);
            }
        }
        let cast = classify(&SandboxError::Execution("Cannot cast string 'x'".into()), 1);
        assert_eq!(
            (cast.code, cast.message.as_str()),
            (
                Unanswered::Invalid,
                "the query failed while running (execution_error)"
            )
        );
        let refused = classify(&SandboxError::Query("no such column: salary".into()), 1);
        assert_eq!(
            (refused.code, refused.state),
            (Unanswered::Invalid, "rejected")
        );
        assert!(refused.message.contains("salary"));
    }

    /// The invoice finds the queries that count by their stored status code:
    /// only a query that found no free sandbox slot is settled as
    /// `Unavailable`, and it alone does not count.
    #[test]
    fn only_a_query_that_found_no_slot_goes_uncounted() {
        assert!(
            crate::billing::COUNTED_QUERY.ends_with(&format!("<> {}", Unanswered::Busy.stored()))
        );
        for error in every_sandbox_error() {
            let disposition = classify(&error, 0);
            assert_eq!(
                disposition.counts,
                disposition.code != Unanswered::Busy,
                "{error}"
            );
        }
        // Unless it ran first: a later share of a split run that found no
        // slot after earlier ones read the data stopped when the data made
        // it stop, and is counted, charged and worded like a time limit.
        let ran = classify(
            &SandboxError::Busy {
                slots: 2,
                limit_ms: 1_234,
            },
            5_000_000,
        );
        assert_eq!(
            (ran.code, ran.counts, ran.message.as_str()),
            (
                Unanswered::Exhausted,
                true,
                "the query ran past its time limit (time_limit)"
            )
        );
    }

    /// The standing is read on every reservation: it must read the running
    /// queries and the open holds through their indexes, not scan every
    /// query ever run.
    #[tokio::test]
    async fn a_reservations_standing_reads_through_indexes() -> Result<()> {
        let (_dir, store) = crate::store::temporary().await?;
        let mut sql = STANDING.to_owned();
        // From the last: `$1` would otherwise take the front of `$10`.
        for (parameter, value) in [
            ("$11", "X'00'"),
            ("$10", "'provider'"),
            ("$9", "0"),
            ("$8", "1"),
            ("$7", "'published'"),
            ("$6", "'product'"),
            ("$5", "'EUR'"),
            ("$4", "'org'"),
            ("$3", "'consumer:org:EUR'"),
            ("$2", "'2026-12'"),
            ("$1", "'contract'"),
        ] {
            sql = sql.replace(parameter, value);
        }
        let plan: Vec<String> =
            sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .fetch_all(store.reader())
                .await?
                .iter()
                .map(|row| row.try_get::<String, _>("detail"))
                .collect::<std::result::Result<_, _>>()?;
        assert!(
            !plan.iter().any(|step| step.starts_with("SCAN queries")),
            "{plan:?}"
        );
        assert!(
            plan.iter()
                .any(|step| step.contains("INDEX queries_open_holds")),
            "{plan:?}"
        );
        assert!(
            plan.iter()
                .any(|step| step.contains("INDEX queries_running")),
            "{plan:?}"
        );
        Ok(())
    }

    /// A reservation works out its terms from the product as a reader saw
    /// it; the standing's statement must see any change made since, or a
    /// query would run on a suspended product or under an old price.
    #[tokio::test]
    async fn the_standing_sees_a_product_changed_since_it_was_read() -> Result<()> {
        use crate::registry::{self, Step};
        let (_dir, store) = crate::store::temporary().await?;
        let backend = store.backend();
        let mut connection = store.pool().acquire().await?;
        let (provider, product, spec) = ("city", "population", registry::tests::sample_spec());
        crate::identity::create_organization(
            &mut connection,
            provider,
            "City data",
            crate::identity::OrganizationKind::Provider,
        )
        .await?;
        registry::create(
            &mut connection,
            backend,
            "tester",
            provider,
            product,
            spec.clone(),
        )
        .await?;
        let unchanged = async |connection: &mut AnyConnection, read: &StoredProduct| {
            standing(connection, "contract", "2026-12", "acme", "EUR", read)
                .await
                .map(|standing| standing.product_unchanged)
        };
        let read = registry::get_as_stored(&mut connection, product).await?;
        assert!(unchanged(&mut connection, &read).await?);

        registry::step(
            &mut connection,
            backend,
            "tester",
            product,
            Step::Submit,
            "",
        )
        .await?;
        assert!(!unchanged(&mut connection, &read).await?, "a new state");
        let read = registry::get_as_stored(&mut connection, product).await?;
        assert!(unchanged(&mut connection, &read).await?);

        // The spec alone, as a draft's measured quality is written.
        let mut quality = spec.quality.unwrap_or_default();
        quality.completeness = 0.5;
        registry::set_quality(&mut connection, product, quality).await?;
        assert!(!unchanged(&mut connection, &read).await?, "a new spec");
        let read = registry::get_as_stored(&mut connection, product).await?;
        assert!(unchanged(&mut connection, &read).await?);

        sqlx::query("UPDATE products SET version = version + 1 WHERE id = $1")
            .bind(product)
            .execute(&mut *connection)
            .await?;
        assert!(!unchanged(&mut connection, &read).await?, "a new version");
        Ok(())
    }
}
