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

mod engine;
pub(crate) mod model;
pub mod remote;
mod reserve;
mod sandbox_run;
mod settle;
mod usage;

use std::sync::Arc;

use crate::contracts::ContractIndex;
use crate::error::{MarketError, Result, Unanswered};
use crate::identity::Principal;
use crate::metrics::Metrics;
pub use crate::policy::sandbox_policy;
use crate::store::{self, Store, now_ms};

use reserve::{Reservation, reserve};
use sandbox_run::{SandboxRun, run_in_sandbox};
use settle::{SettleContext, audit_refusal, settle};

pub use engine::{
    EngineConfig, EngineFlags, MAX_CONCURRENT_QUERIES, MAX_QUERY_MEMORY_BYTES, MAX_QUERY_WALL_TIME,
    QueryEngine,
};
pub use model::{QueryOutcome, QueryRequest, QuerySummary, UsageQuery, UsageView};
pub use usage::list_usage;

/// The organization id the platform's fee account is kept under.
pub const PLATFORM_ACCOUNT: &str = "platform";

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The longest SQL text (or algorithm input) a query may send. Work per
/// kept row grows with a query's length, and a row's cost is what the
/// output policy must not let count withheld rows.
pub const MAX_SQL_BYTES: usize = 64 << 10;

/// How long apart a server tries again, until it succeeds, to release the
/// hold of a query whose settlement failed: at first, and at most.
const RELEASE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
const RELEASE_RETRY_AT_MOST: std::time::Duration = std::time::Duration::from_secs(60);

/// Splits an IPC stream into response chunks of at most this many bytes.
pub const RESULT_CHUNK_BYTES: usize = 1 << 20;

/// Deletes queries left `running` by servers that stopped mid-query (every
/// server but `me` that has not renewed its lease for `lease`, and queries
/// stored with no server more than `legacy_grace` ago): none was
/// charged or released, their holds vanish with them, and each is audited
/// as interrupted. Servers call it at start and then every few seconds.
///
/// # Errors
/// Database failures.
pub async fn recover_interrupted(
    store: &Store,
    me: &str,
    lease: std::time::Duration,
    legacy_grace: std::time::Duration,
) -> Result<u64> {
    let millis =
        |duration: std::time::Duration| i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
    let which = store::queries::Interrupted::OfStoppedReplicas {
        me,
        lease_ms: millis(lease),
        legacy_grace_ms: millis(legacy_grace),
    };
    if store::queries::count_interrupted(store, which).await? == 0 {
        return Ok(0);
    }
    store::queries::remove_running(store, which, "the server running it stopped").await
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
    fn metrics(&self) -> &Arc<Metrics>;
    /// The active contracts, kept in memory.
    fn contract_index(&self) -> &ContractIndex;
    /// Where products' folders are (when the marketplace runs queries
    /// itself).
    fn data_dir(&self) -> &std::path::Path;
    /// The runners queries go to, when the marketplace routes them; `None`
    /// runs them in this process.
    fn runners(&self) -> Option<std::sync::Arc<dyn remote::Runners>>;
    /// This server's id among the servers sharing its database: the
    /// queries it runs carry it, so that no other gives them up while it
    /// lives.
    fn replica_id(&self) -> &str;
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
    request: QueryRequest,
) -> Result<QueryOutcome> {
    request.validate(engine.config().max_compute_units)?;
    let consumer = principal.organization.id.clone();
    market
        .require_permission(principal, &consumer, "query:run")
        .await?;
    let algorithm_sha256 = if request.algorithm_wasm.is_empty() {
        String::new()
    } else {
        crate::audit::sha256_hex(&request.algorithm_wasm)
    };
    let digest = request.digest(&algorithm_sha256);
    let admission = engine.admit(&consumer)?;
    if let Some(outcome) = replay(market, &consumer, &request, &algorithm_sha256, &digest).await? {
        market.metrics().outcome("replayed");
        admission.answered();
        return Ok(outcome);
    }
    let started = std::time::Instant::now();
    let request = Arc::new(request);
    let reserved = reserve_in_turn(
        market,
        engine,
        principal,
        &request,
        &algorithm_sha256,
        digest,
    )
    .await;
    market.metrics().stage("authorize", started.elapsed());
    let mut reservation = match reserved {
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
    let outcome = run_in_sandbox_task(market, engine, &reservation, &request.sql)
        .await
        .map(|(ran_on, outcome)| {
            // The record names the data center that ran it.
            if ran_on.is_some() {
                reservation.runner = ran_on;
            }
            outcome
        });
    let settled = settle_in_turn(market, engine, principal, &request, reservation, outcome).await?;
    let metrics = market.metrics();
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

/// Reserves the query in the store's turn (on SQLite, the one writer's;
/// see [`Store::grouped`]).
async fn reserve_in_turn(
    market: &Arc<dyn Market>,
    engine: &Arc<QueryEngine>,
    principal: &Principal,
    request: &Arc<QueryRequest>,
    algorithm_sha256: &str,
    digest: String,
) -> Result<Reservation> {
    let seen = engine.product_seen(&request.product_id);
    let (market, engine, principal, request) = (
        Arc::clone(market),
        Arc::clone(engine),
        principal.clone(),
        Arc::clone(request),
    );
    let algorithm_sha256 = algorithm_sha256.to_owned();
    let store = market.store().clone();
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
}

/// Runs the reserved query on a blocking thread, timing its start-up and
/// its run.
async fn run_in_sandbox_task(
    market: &Arc<dyn Market>,
    engine: &Arc<QueryEngine>,
    reservation: &Reservation,
    sql: &str,
) -> Result<(
    Option<remote::RunnerChoice>,
    std::result::Result<civicgrid_sandbox::Outcome, civicgrid_sandbox::RunFailure>,
)> {
    if let (Some(choice), Some(runners)) = (reservation.runner.clone(), market.runners()) {
        let job = remote::RemoteJob {
            query_id: reservation.query_id.clone(),
            product_id: reservation.product_id.clone(),
            storage_location: reservation.storage.location.clone(),
            declared: reservation.storage.declared.clone(),
            policy: reservation.policy.clone(),
            privacy_budget: reservation.privacy_budget,
            sql: sql.to_owned(),
            algorithm: reservation.algorithm.clone().unwrap_or_default(),
            as_of_unix_seconds: reservation.as_of_unix_seconds,
            limits: sandbox_run::limits_for(
                engine,
                reservation.metering,
                reservation.compute_units,
                engine.sql_guest.initial_memory_bytes(),
            ),
            data_centers: reservation.hosting_data_centers.clone(),
            version: reservation
                .storage
                .version
                .as_ref()
                .map(|read| read.manifest.clone()),
        };
        let started = std::time::Instant::now();
        let outcome = runners.run(choice, job).await;
        market.metrics().stage("sandbox", started.elapsed());
        return outcome.map(|(ran_on, outcome)| (Some(ran_on), outcome));
    }
    let run = SandboxRun {
        storage: reservation.storage.clone(),
        policy: reservation.policy.clone(),
        privacy_budget: reservation.privacy_budget,
        compute_units: reservation.compute_units,
        metering: reservation.metering,
        algorithm: reservation.algorithm.clone(),
        as_of_unix_seconds: reservation.as_of_unix_seconds,
    };
    let (engine, sql) = (Arc::clone(engine), sql.to_owned());
    let sandbox_span = tracing::info_span!("sandbox");
    let started = std::time::Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let _entered = sandbox_span.enter();
        run_in_sandbox(&engine, &run, &sql)
    })
    .await
    .map(|outcome| (None, outcome))
    .map_err(|error| MarketError::Corrupt(format!("sandbox task: {error}")));
    let elapsed = started.elapsed();
    let metrics = market.metrics();
    metrics.stage("sandbox", elapsed);
    if let Ok((_, Ok(ran))) = &outcome {
        let startup = ran.metering.startup;
        metrics.stage("sandbox_start", startup);
        metrics.stage("query", elapsed.saturating_sub(startup));
    }
    outcome
}

/// Settles the run in the store's turn. A settlement that fails leaves no
/// hold behind in a live server: the query was not charged or released,
/// so it goes as a crash would, and a retry under the same key runs afresh.
async fn settle_in_turn(
    market: &Arc<dyn Market>,
    engine: &Arc<QueryEngine>,
    principal: &Principal,
    request: &Arc<QueryRequest>,
    reservation: Reservation,
    outcome: Result<std::result::Result<civicgrid_sandbox::Outcome, civicgrid_sandbox::RunFailure>>,
) -> Result<QueryOutcome> {
    let started = std::time::Instant::now();
    let query_id = reservation.query_id.clone();
    let settled = match outcome {
        Ok(outcome) => {
            let outcome = settle::encode(outcome);
            let backend = market.store().backend();
            let platform_fee_bps = engine.config().platform_fee_bps;
            let (principal, request) = (principal.clone(), Arc::clone(request));
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
    let why = match &settled {
        Err(MarketError::Unavailable(_)) => "no runner took it",
        _ => "settling it failed",
    };
    if settled.is_err()
        && let Err(cleanup) = store::queries::remove_running(
            market.store(),
            store::queries::Interrupted::One(&query_id),
            why,
        )
        .await
    {
        // Left running, the query would hold its hold, count against its
        // quota and keep its key busy until this server stopped: no other
        // server gives up a live server's queries.
        tracing::warn!(error = %cleanup, query = %query_id, "could not release a hold; retrying");
        let store = market.store().clone();
        tokio::spawn(async move {
            let mut wait = RELEASE_RETRY_AFTER;
            loop {
                tokio::time::sleep(wait).await;
                match store::queries::remove_running(
                    &store,
                    store::queries::Interrupted::One(&query_id),
                    why,
                )
                .await
                {
                    Ok(_) => return,
                    Err(error) => {
                        tracing::warn!(%error, query = %query_id, "could not release a hold");
                        wait = (wait * 2).min(RELEASE_RETRY_AT_MOST);
                    }
                }
            }
        });
    }
    if settled.is_ok() {
        market.metrics().stage("settle", started.elapsed());
    }
    settled
}

/// The stored outcome of an earlier request under the same key. A replay
/// hands out released rows again: only under a contract that would let the
/// query run now (not one revoked or expired since).
async fn replay(
    market: &Arc<dyn Market>,
    consumer: &str,
    request: &QueryRequest,
    algorithm_sha256: &str,
    digest: &str,
) -> Result<Option<QueryOutcome>> {
    let store = market.store();
    // A read of its own: a key first used by a request still settling is
    // caught when the reservation inserts it (unique), not here.
    let mut connection = store.reader().acquire().await?;
    let Some(stored) =
        store::queries::find_by_key(&mut connection, consumer, &request.idempotency_key).await?
    else {
        return Ok(None);
    };
    let mut summary = stored.summary;
    if stored.request_sha256 != digest {
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
    market
        .contract_index()
        .grant_for_query(consumer, &request.product_id, algorithm_sha256, now_ms())
        .map_err(|reason| MarketError::PermissionDenied {
            permission: "query:run".into(),
            context: format!(" on product {}: {reason}", request.product_id),
        })?;
    summary.replayed = true;
    Ok(Some(QueryOutcome {
        error: stored.error,
        result: stored.result,
        summary,
    }))
}
