//! The `queries` table and what a query's reservation and settlement read
//! and write beside it: usage counters and privacy budgets.

use sqlx::{AnyConnection, Row as _};

use crate::audit::log::{self, Event};
use crate::audit::merkle::Frontier;
use crate::billing::{self, AccountKind, PeriodUsage};
use crate::error::{Result, Unanswered};
use crate::queries::model::{QuerySummary, UsageView};
use crate::registry::model::Product;
use crate::store::{Backend, Param, Store, WriteBatch, now_ms};

const SUMMARY_COLUMNS: &str = "id, consumer_organization_id, provider_organization_id, user_id, \
    product_id, contract_id, plan_id, request_sha256, sql_text, algorithm_sha256, state, error, \
    error_code, fuel, compute_units, rows_read, bytes_read, rows_released, bytes_released, \
    truncated, privacy_spent, wall_time_ms, currency, held_minor, charge_minor, audit_index, \
    created_at, metering, data_center";

fn summary_from_row(row: &sqlx::any::AnyRow) -> Result<QuerySummary> {
    Ok(QuerySummary {
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
        data_center: row.try_get("data_center")?,
    })
}

fn error_of(row: &sqlx::any::AnyRow) -> Result<Option<(Unanswered, String)>> {
    Ok(match Unanswered::from_stored(row.try_get("error_code")?) {
        Some(kind) => Some((kind, row.try_get("error")?)),
        None => None,
    })
}

/// How old a running query stored without a server's id (by a version
/// before several servers shared a database, perhaps still running in a
/// rolling upgrade) must be before a sweep gives it up: longer than any
/// query may run, so one such server still running it is not robbed of it.
pub(crate) const LEGACY_RUN_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Which running queries to give up as interrupted.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Interrupted<'a> {
    /// This one, whose settlement failed in a live server.
    One(&'a str),
    /// Those of replicas, other than `me`, that have not renewed their
    /// lease for `lease_ms` (see [`super::replicas`]), and those stored
    /// with no replica more than `legacy_grace_ms` ago.
    OfStoppedReplicas {
        me: &'a str,
        lease_ms: i64,
        legacy_grace_ms: i64,
    },
}

impl Interrupted<'_> {
    fn condition(self, backend: Backend) -> String {
        match self {
            Self::One(_) => "id = $1".into(),
            Self::OfStoppedReplicas { .. } => super::replicas::of_stopped_replica(backend),
        }
    }

    fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
        match self {
            Self::One(id) => query.bind(id.to_owned()),
            Self::OfStoppedReplicas {
                me,
                lease_ms,
                legacy_grace_ms,
            } => query
                .bind(me.to_owned())
                .bind(lease_ms)
                .bind(legacy_grace_ms),
        }
    }
}

/// How many running queries `which` names, read without a lock: the
/// periodic sweep takes the log's lock only when there is something to do.
pub(crate) async fn count_interrupted(store: &Store, which: Interrupted<'_>) -> Result<i64> {
    let sql = format!(
        "SELECT COUNT(*) AS n FROM queries WHERE state = 'running' AND {}",
        which.condition(store.backend())
    );
    let row = which
        .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .fetch_one(store.reader())
        .await?;
    Ok(row.try_get("n")?)
}

/// Removes the running queries `which` names, with a `query.interrupted`
/// audit entry each, in one transaction.
///
/// The log's head is locked first, as a settlement locks it before it
/// confirms its query still runs: the two queue on one lock in one order,
/// so a query is either settled or given up, never both, and they never
/// deadlock.
pub(crate) async fn remove_running(
    store: &Store,
    which: Interrupted<'_>,
    why: &str,
) -> Result<u64> {
    let backend = store.backend();
    let mut transaction = store.begin().await?;
    if backend == Backend::Postgres && matches!(which, Interrupted::OfStoppedReplicas { .. }) {
        // A sweep that waits long for the head would hold up nothing of its
        // own, but its next round comes soon: give up this one.
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *transaction)
            .await?;
    }
    let frontier = log::head_for_append(&mut transaction, backend).await?;
    // One statement decides and removes: a lease renewed in between cannot
    // leave a query audited as given up but still running, or removed
    // without its audit entry.
    let sql = format!(
        "DELETE FROM queries WHERE state = 'running' AND {} \
         RETURNING id, consumer_organization_id, product_id, idempotency_key, held_minor",
        which.condition(backend)
    );
    let rows = which
        .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .fetch_all(&mut *transaction)
        .await?;
    if rows.is_empty() {
        transaction.rollback().await?;
        return Ok(0);
    }
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
    let mut batch = WriteBatch::new();
    log::append_after(&mut batch, backend, frontier, &events)?;
    batch.execute(&mut transaction).await?;
    transaction.commit().await?;
    Ok(rows.len() as u64)
}

/// What a settlement reads, in one statement (on SQLite one trip to the
/// writer's thread instead of two): the contract's use in the period so far,
/// the audit log's head, locked for the settlement's append, and whether
/// query `query_id` still runs. A server that stalled beyond its lease may
/// find its query given up as interrupted by another (see
/// [`remove_running`]); it must then not charge for it.
pub(crate) async fn usage_and_audit_head(
    connection: &mut AnyConnection,
    backend: Backend,
    contract_id: &str,
    period: &str,
    query_id: &str,
) -> Result<(PeriodUsage, Frontier, bool)> {
    // On PostgreSQL the head's lock may be waited for, and a subquery here
    // would still see the rows as they were before the wait: the query is
    // confirmed by a statement of its own once the lock is held.
    let still_running = match backend {
        Backend::Sqlite => {
            "(SELECT COUNT(*) FROM queries WHERE id = $3 AND state = 'running') AS still_running"
        }
        Backend::Postgres => "1 AS still_running",
    };
    let sql = format!(
        "SELECT COALESCE(counters.queries, 0) AS queries, \
         COALESCE(counters.compute_units, 0) AS compute_units, \
         COALESCE(counters.rows_released, 0) AS rows_released, \
         COALESCE(counters.subscription_charged, 0) AS subscription_charged, \
         {still_running}, {head} \
         FROM audit_head AS head \
         LEFT JOIN usage_counters AS counters \
           ON counters.contract_id = $1 AND counters.period = $2 \
         WHERE head.id = 1{lock}",
        head = log::HEAD_FOR_APPEND_COLUMNS,
        lock = log::head_for_append_lock(backend),
    );
    let mut statement = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(contract_id)
        .bind(period);
    if backend == Backend::Sqlite {
        statement = statement.bind(query_id);
    }
    let row = statement.fetch_one(&mut *connection).await?;
    let mut still_running = row.try_get::<i64, _>("still_running")? == 1;
    if backend == Backend::Postgres {
        still_running =
            sqlx::query("SELECT id FROM queries WHERE id = $1 AND state = 'running' FOR UPDATE")
                .bind(query_id)
                .fetch_optional(&mut *connection)
                .await?
                .is_some();
    }
    Ok((
        usage_from_row(&row)?,
        log::head_for_append_from_row(&row)?,
        still_running,
    ))
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
pub(crate) struct Standing {
    pub usage: PeriodUsage,
    pub running: i64,
    pub balance: i64,
    pub held: i64,
    pub privacy_spent: f64,
    /// Whether the product's row is still the one the reservation's terms
    /// were worked out from.
    pub product_unchanged: bool,
    /// Whether the contract is still active as stored: another server may
    /// have revoked it since this one's index was last told.
    pub contract_active: bool,
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
     (SELECT COUNT(*) FROM contracts WHERE id = $1 AND state = 'active') AS contract_active, \
     COALESCE(account.balance_minor, 0) AS balance, ",
    super::ledger::open_holds_sum!("$4", "$5"),
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

/// A product's row as a reservation read it, to confirm it unchanged.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProductAsRead<'a> {
    pub id: &'a str,
    pub state: &'a str,
    pub version: i64,
    pub updated_at: i64,
    pub provider: &'a str,
    pub spec: &'a [u8],
}

impl<'a> ProductAsRead<'a> {
    /// The row `product` was read from, with its spec's stored bytes.
    pub(crate) fn of(product: &'a Product, spec: &'a [u8]) -> Self {
        Self {
            id: &product.id,
            state: product.state.name(),
            version: product.version,
            updated_at: product.updated_at_unix_ms,
            provider: &product.provider_organization_id,
            spec,
        }
    }
}

pub(crate) async fn standing(
    connection: &mut AnyConnection,
    contract_id: &str,
    period: &str,
    consumer: &str,
    currency: &str,
    read: ProductAsRead<'_>,
) -> Result<Standing> {
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
        .bind(read.id)
        .bind(read.state)
        .bind(read.version)
        .bind(read.updated_at)
        .bind(read.provider)
        .bind(read.spec)
        .fetch_one(&mut *connection)
        .await?;
    Ok(Standing {
        usage: usage_from_row(&row)?,
        running: row.try_get("running")?,
        balance: row.try_get("balance")?,
        held: row.try_get("held")?,
        privacy_spent: row.try_get("privacy_spent")?,
        product_unchanged: row.try_get::<i64, _>("product_unchanged")? == 1,
        contract_active: row.try_get::<i64, _>("contract_active")? == 1,
    })
}

/// A query stored under a consumer's idempotency key.
pub(crate) struct StoredQuery {
    /// The digest of the request first sent under the key.
    pub request_sha256: String,
    pub summary: QuerySummary,
    pub error: Option<(Unanswered, String)>,
    pub result: Vec<u8>,
}

/// The consumer organization and product of query `query_id`, if any.
pub(crate) async fn consumer_and_product(
    connection: &mut AnyConnection,
    query_id: &str,
) -> Result<Option<(String, String)>> {
    let row = sqlx::query("SELECT consumer_organization_id, product_id FROM queries WHERE id = $1")
        .bind(query_id)
        .fetch_optional(&mut *connection)
        .await?;
    row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .transpose()
}

/// The query under `consumer`'s idempotency `key`, if any.
pub(crate) async fn find_by_key(
    connection: &mut AnyConnection,
    consumer: &str,
    key: &str,
) -> Result<Option<StoredQuery>> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, result FROM queries \
         WHERE consumer_organization_id = $1 AND idempotency_key = $2"
    );
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(consumer)
        .bind(key)
        .fetch_optional(&mut *connection)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(StoredQuery {
        request_sha256: row.try_get("request_sha256")?,
        summary: summary_from_row(&row)?,
        error: error_of(&row)?,
        result: row
            .try_get::<Option<Vec<u8>>, _>("result")?
            .unwrap_or_default(),
    }))
}

/// How many of `consumer`'s queries on `product` are running.
pub(crate) async fn running_on_product(
    connection: &mut AnyConnection,
    consumer: &str,
    product: &str,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM queries WHERE consumer_organization_id = $1 \
         AND product_id = $2 AND state = 'running'",
    )
    .bind(consumer)
    .bind(product)
    .fetch_one(&mut *connection)
    .await?)
}

/// A query about to run, with its hold.
pub(crate) struct RunningQuery<'a> {
    pub id: &'a str,
    pub consumer: &'a str,
    pub user: &'a str,
    pub product: &'a str,
    pub provider: &'a str,
    pub contract: &'a str,
    pub plan: &'a str,
    pub idempotency_key: &'a str,
    pub request_sha256: &'a str,
    pub sql: &'a str,
    pub algorithm_sha256: &'a str,
    pub period: &'a str,
    pub currency: &'a str,
    pub held_minor: i64,
    pub created_at: i64,
    /// The data center whose runner will run it (empty: this server).
    pub data_center: &'a str,
    /// The server that runs it (see [`super::replicas`]).
    pub replica: &'a str,
}

/// Records a query as running with its hold open; `false` when its
/// consumer's idempotency key is already taken.
pub(crate) async fn insert_running(
    connection: &mut AnyConnection,
    query: &RunningQuery<'_>,
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO queries (id, consumer_organization_id, user_id, product_id, \
         provider_organization_id, contract_id, plan_id, idempotency_key, request_sha256, \
         sql_text, algorithm_sha256, period, state, error, error_code, currency, held_minor, \
         hold_open, created_at, data_center, replica_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'running', '', 0, $13, $14, \
         1, $15, $16, $17)",
    )
    .bind(query.id)
    .bind(query.consumer)
    .bind(query.user)
    .bind(query.product)
    .bind(query.provider)
    .bind(query.contract)
    .bind(query.plan)
    .bind(query.idempotency_key)
    .bind(query.request_sha256)
    .bind(query.sql)
    .bind(query.algorithm_sha256)
    .bind(query.period)
    .bind(query.currency)
    .bind(query.held_minor)
    .bind(query.created_at)
    .bind(query.data_center)
    .bind(query.replica)
    .execute(&mut *connection)
    .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(error)
            if error
                .as_database_error()
                .is_some_and(sqlx::error::DatabaseError::is_unique_violation) =>
        {
            Ok(false)
        }
        Err(error) => Err(error.into()),
    }
}

/// A settled query's use of its contract in its period, into `writes`.
pub(crate) fn count_use_into(
    writes: &mut WriteBatch,
    contract: &str,
    period: &str,
    compute_units: i64,
    rows_released: i64,
    subscription_charged: bool,
) {
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
            Param::from(contract),
            Param::from(period),
            Param::Int(compute_units),
            Param::Int(rows_released),
            Param::Int(i64::from(subscription_charged)),
        ],
    );
}

/// Privacy budget spent by `consumer` on `product` in `period`, into
/// `writes`.
pub(crate) fn spend_privacy_into(
    writes: &mut WriteBatch,
    consumer: &str,
    product: &str,
    period: &str,
    spent: f64,
) {
    writes.push(
        "INSERT INTO privacy_budgets (consumer_organization_id, product_id, period, spent) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (consumer_organization_id, product_id, period) \
         DO UPDATE SET spent = privacy_budgets.spent + excluded.spent",
        vec![
            Param::from(consumer),
            Param::from(product),
            Param::from(period),
            Param::Real(spent),
        ],
    );
}

/// A running query's outcome, metering, charge, result and audit index,
/// closing its hold, into `writes`.
pub(crate) fn record_outcome_into(
    writes: &mut WriteBatch,
    summary: &QuerySummary,
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
         finished_at = $16, metering = $18, data_center = $19 \
         WHERE id = $17 AND state = 'running'",
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
            Param::from(&summary.query_id),
            Param::from(&summary.metering),
            Param::from(&summary.data_center),
        ],
    );
}

/// Settled queries visible in `view` to `organization`, newest first:
/// `organization_id` narrows the everything view to one consumer; empty
/// `product` and `period` match every one.
pub(crate) async fn list(
    connection: &mut AnyConnection,
    view: UsageView,
    organization: &str,
    organization_id: &str,
    product: &str,
    period: &str,
    limit: i64,
) -> Result<Vec<QuerySummary>> {
    let (side, who) = match view {
        UsageView::Everything => ("consumer_organization_id", organization_id),
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
        .bind(product)
        .bind(period)
        .bind(limit)
        .fetch_all(&mut *connection)
        .await?;
    rows.iter().map(summary_from_row).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let unchanged =
            async |connection: &mut AnyConnection, (read, spec): &(registry::Product, Vec<u8>)| {
                standing(
                    connection,
                    "contract",
                    "2026-12",
                    "acme",
                    "EUR",
                    ProductAsRead::of(read, spec),
                )
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
