//! The second of a query's two transactions: its outcome, charge, usage,
//! privacy budget and audit entry written together, and its hold closed.

use civicgrid_sandbox::{RunFailure, SandboxError};
use sqlx::AnyConnection;

use crate::audit::log::{self, Event};
use crate::audit::merkle::Frontier;
use crate::billing::{self, AccountKind, PeriodUsage, Posting, QueryUse};
use crate::error::{MarketError, Result, Unanswered};
use crate::identity::Principal;
use crate::metering::Metering;
use crate::spec::PriceKind;
use crate::store::{self, Backend, WriteBatch};

use super::reserve::Reservation;
use super::sandbox_run::classify;
use super::{Market, PLATFORM_ACCOUNT, QueryOutcome, QueryRequest, QuerySummary};
use crate::audit::sha256_hex;

/// The server's side of a settlement: where it writes, the platform's fee,
/// and where it times its ledger and audit steps.
pub(super) struct SettleContext<'a> {
    pub(super) backend: Backend,
    pub(super) platform_fee_bps: i64,
    pub(super) metrics: &'a crate::metrics::Metrics,
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
pub(super) async fn settle(
    connection: &mut AnyConnection,
    context: SettleContext<'_>,
    principal: &Principal,
    request: &QueryRequest,
    reservation: Reservation,
    outcome: Encoded,
) -> Result<QueryOutcome> {
    let SettleContext {
        backend,
        platform_fee_bps,
        metrics,
    } = context;
    let (usage, audit_head, still_running) = store::queries::usage_and_audit_head(
        connection,
        backend,
        &reservation.contract_id,
        &reservation.period,
        &reservation.query_id,
    )
    .await?;
    if !still_running {
        // Another server took this one for stopped (it stalled beyond its
        // lease) and gave the query up: nothing of it may be charged now.
        return Err(MarketError::Aborted(
            "the query was given up as interrupted while it ran, and nothing was charged; \
             retry under the same idempotency key"
                .into(),
        ));
    }
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
    store::queries::record_outcome_into(&mut writes, &summary, error.as_ref(), &result);
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

/// A run's outcome with its result encoded as an Arrow IPC stream.
pub(super) type Encoded = std::result::Result<(civicgrid_sandbox::Outcome, Vec<u8>), RunFailure>;

/// Encodes a run's result for the consumer. Done before the settlement's
/// transaction: that holds the audit log's head, which every server's
/// writes queue on, and a large result would hold them all.
pub(super) fn encode(
    outcome: std::result::Result<civicgrid_sandbox::Outcome, RunFailure>,
) -> Encoded {
    match outcome {
        Ok(outcome) => match civicgrid_sandbox::ipc::write_stream(&outcome.batches) {
            Ok(bytes) => Ok((outcome, bytes)),
            Err(error) => Err(RunFailure {
                error: SandboxError::Data(format!("encoding the result: {error}")),
                fuel: outcome.metering.fuel,
            }),
        },
        Err(failure) => Err(failure),
    }
}

/// A settled run before anything is written: what the consumer is told,
/// the released result, the audit event's kind, and whether it counts
/// against the quota and burnt anything to pay for.
struct Settled {
    summary: QuerySummary,
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
    request: &QueryRequest,
    reservation: &Reservation,
    mut outcome: std::result::Result<(civicgrid_sandbox::Outcome, Vec<u8>), RunFailure>,
) -> Settled {
    let currency = reservation.plan.currency.clone();
    let mut summary = QuerySummary {
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
        data_center: reservation
            .runner
            .as_ref()
            .map(|runner| runner.data_center.clone())
            .unwrap_or_default(),
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
            // spends what a completed query may, as the budget allows. One
            // that found no free slot read nothing and spends nothing.
            if disposition.state == "failed"
                && disposition.counts
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
    summary: &QuerySummary,
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
    store::ledger::post_into(
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
    store::queries::count_use_into(
        writes,
        &reservation.contract_id,
        &reservation.period,
        used.compute_units,
        used.rows_released,
        burnt && reservation.plan.kind() == PriceKind::Subscription,
    );
    if summary.privacy_spent > 0.0 {
        store::queries::spend_privacy_into(
            writes,
            &reservation.consumer,
            &reservation.product_id,
            &reservation.period,
            summary.privacy_spent,
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
    request: &QueryRequest,
    reservation: &Reservation,
    summary: &QuerySummary,
    event_kind: &'static str,
    result: &[u8],
) -> Result<u64> {
    let currency = &reservation.plan.currency;
    let mut details = serde_json::json!({
        "query": reservation.query_id,
        "contract": reservation.contract_id,
        "provider": reservation.provider,
        "product_version": reservation.product_version,
        "data_version": reservation.storage.version.as_ref().map_or(0, |read| read.version),
        "data_fingerprint": reservation
            .storage
            .version
            .as_ref()
            .map_or("", |read| read.fingerprint.as_str()),
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
    });
    // Which data center's runner read the data and released the result.
    if let Some(runner) = &reservation.runner {
        details["data_center"] = runner.data_center.clone().into();
    }
    let audit_index = log::append_after(
        writes,
        backend,
        audit_head,
        &[Event {
            kind: event_kind.into(),
            actor: principal.user.id.clone(),
            tenant: reservation.consumer.clone(),
            subject: reservation.product_id.clone(),
            details,
        }],
    )?[0];
    Ok(audit_index)
}

/// Hides a run's cost when its product withholds rows: no fuel, compute
/// units, wall time or bytes and rows read (each counts rows the policy did
/// not release, and so would the charge, which is why such products are not
/// priced by compute). The exact figures go to the server's log only.
fn withhold_cost(summary: &mut QuerySummary, reservation: &Reservation) {
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
pub(super) async fn audit_refusal(
    market: &dyn Market,
    principal: &Principal,
    request: &QueryRequest,
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
