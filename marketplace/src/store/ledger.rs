//! The ledger's tables: accounts with cached balances, balanced postings,
//! and the holds open queries keep on consumers' balances.

use sqlx::{AnyConnection, Row as _};

use crate::billing::{
    AccountKind, Balance, Invoice, InvoiceLine, LedgerSummary, Posting, account_id, validate_period,
};
use crate::error::{MarketError, Result};
use crate::store::{Backend, Param, WriteBatch, now_ms};

/// The SQL condition, over `queries` as `q`, of a settled query that counts
/// against its contract's quota (and so is invoiced): all but those that
/// found no free sandbox slot, which `queries::classify` alone settles as
/// [`crate::error::Unanswered::Busy`] (stored as 14).
pub(crate) const COUNTED_QUERY: &str = "q.state <> 'running' AND q.error_code <> 14";

/// The SQL of a scalar subquery: what a consumer has on hold in one
/// currency, the sum over its queries whose hold is still open. It is the
/// one definition of "held" for the balance a consumer sees and for the
/// funds check a reservation makes, so the two cannot disagree. The
/// arguments are SQL expressions for the consumer and the currency
/// (parameters or correlated columns); the sum reads through the
/// `queries_open_holds` index. PostgreSQL sums BIGINT to NUMERIC, hence the
/// cast back.
macro_rules! open_holds_sum {
    ($consumer:literal, $currency:literal) => {
        concat!(
            "(SELECT CAST(COALESCE(SUM(held_minor), 0) AS BIGINT) FROM queries \
             WHERE hold_open = 1 AND consumer_organization_id = ",
            $consumer,
            " AND currency = ",
            $currency,
            ")"
        )
    };
}
pub(crate) use open_holds_sum;

async fn ensure_account(
    connection: &mut AnyConnection,
    kind: AccountKind,
    organization: &str,
    currency: &str,
) -> Result<String> {
    let id = account_id(kind, organization, currency);
    sqlx::query(
        "INSERT INTO ledger_accounts (id, organization_id, kind, currency, balance_minor) \
         VALUES ($1, $2, $3, $4, 0) ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(organization)
    .bind(kind.as_str())
    .bind(currency)
    .execute(&mut *connection)
    .await?;
    Ok(id)
}

/// Writes one balanced ledger entry (its postings sum to zero) in the caller's
/// transaction, updating each account's balance.
///
/// # Errors
/// `Corrupt` when the postings do not balance (a bug, never written);
/// database failures.
pub async fn post(
    connection: &mut AnyConnection,
    entry_kind: &str,
    currency: &str,
    query_id: Option<&str>,
    postings: &[Posting],
) -> Result<()> {
    let mut batch = WriteBatch::new();
    post_into(&mut batch, entry_kind, currency, query_id, postings)?;
    batch.execute(connection).await?;
    Ok(())
}

/// Adds one balanced ledger entry's writes to `batch`: each account's
/// balance (the account is created on its first entry), then the postings.
///
/// # Errors
/// `Corrupt` when the postings do not balance or a balance change overflows
/// (a bug, never written).
#[tracing::instrument(name = "ledger", skip_all)]
pub fn post_into(
    batch: &mut WriteBatch,
    entry_kind: &str,
    currency: &str,
    query_id: Option<&str>,
    postings: &[Posting],
) -> Result<()> {
    let sum = postings
        .iter()
        .try_fold(0_i64, |sum, p| sum.checked_add(p.amount_minor));
    if sum != Some(0) {
        return Err(MarketError::Corrupt(format!(
            "ledger entry {entry_kind} does not balance: {postings:?}"
        )));
    }
    let legs: Vec<(&Posting, String)> = postings
        .iter()
        .filter(|p| p.amount_minor != 0)
        .map(|p| (p, account_id(p.kind, &p.organization, currency)))
        .collect();
    if legs.is_empty() {
        return Ok(());
    }
    // One change per account, even if an entry had two legs on one: a
    // multi-row upsert may not touch a row twice (PostgreSQL refuses).
    let mut changes: std::collections::BTreeMap<&str, (&Posting, i64)> =
        std::collections::BTreeMap::new();
    for (posting, account) in &legs {
        let (_, change) = changes.entry(account.as_str()).or_insert((posting, 0));
        *change = change
            .checked_add(posting.amount_minor)
            .ok_or_else(|| MarketError::Corrupt(format!("ledger entry {entry_kind} overflows")))?;
    }
    let placeholders = |row: usize, width: usize| {
        let cells: Vec<String> = (1..=width)
            .map(|c| format!("${}", row * width + c))
            .collect();
        format!("({})", cells.join(", "))
    };
    // Balances first: a posting references its account, which the upsert
    // creates on the account's first entry.
    let rows: Vec<String> = (0..changes.len()).map(|row| placeholders(row, 5)).collect();
    let upsert = format!(
        "INSERT INTO ledger_accounts (id, organization_id, kind, currency, balance_minor) \
         VALUES {} ON CONFLICT (id) DO UPDATE \
         SET balance_minor = ledger_accounts.balance_minor + excluded.balance_minor",
        rows.join(", ")
    );
    let mut params = Vec::with_capacity(changes.len() * 5);
    for (account, (posting, change)) in &changes {
        params.extend([
            Param::from(*account),
            Param::from(&posting.organization),
            Param::from(posting.kind.as_str()),
            Param::from(currency),
            Param::Int(*change),
        ]);
    }
    batch.push(upsert, params);
    let entry_id = crate::identity::new_id("le");
    let at = now_ms();
    let rows: Vec<String> = (0..legs.len()).map(|row| placeholders(row, 7)).collect();
    let insert = format!(
        "INSERT INTO ledger_postings (entry_id, account_id, amount_minor, currency, kind, \
         query_id, at) VALUES {}",
        rows.join(", ")
    );
    let mut params = Vec::with_capacity(legs.len() * 7);
    for (posting, account) in &legs {
        params.extend([
            Param::from(&entry_id),
            Param::from(account),
            Param::Int(posting.amount_minor),
            Param::from(currency),
            Param::from(entry_kind),
            Param::from(query_id),
            Param::Int(at),
        ]);
    }
    batch.push(insert, params);
    Ok(())
}

/// Locks the consumer's account row (PostgreSQL) until the caller's
/// transaction ends, so two holds cannot both spend the same money. SQLite
/// needs no lock: its one writer already runs every hold after the other.
///
/// # Errors
/// Database failures.
pub async fn lock_for_hold(
    connection: &mut AnyConnection,
    backend: Backend,
    organization: &str,
    currency: &str,
) -> Result<()> {
    if backend == Backend::Sqlite {
        return Ok(());
    }
    let account = ensure_account(connection, AccountKind::Consumer, organization, currency).await?;
    sqlx::query("SELECT balance_minor FROM ledger_accounts WHERE id = $1 FOR UPDATE")
        .bind(&account)
        .fetch_one(&mut *connection)
        .await?;
    Ok(())
}

/// An organization's consumer balances.
///
/// # Errors
/// Database failures.
pub async fn balances(connection: &mut AnyConnection, organization: &str) -> Result<Vec<Balance>> {
    let rows = sqlx::query(concat!(
        "SELECT account.currency AS currency, account.balance_minor AS balance_minor, ",
        open_holds_sum!("account.organization_id", "account.currency"),
        " AS held_minor FROM ledger_accounts AS account \
         WHERE account.organization_id = $1 AND account.kind = 'consumer' \
         ORDER BY account.currency",
    ))
    .bind(organization)
    .fetch_all(&mut *connection)
    .await?;
    let mut balances = Vec::with_capacity(rows.len());
    for row in rows {
        let currency: String = row.try_get("currency")?;
        let balance_minor: i64 = row.try_get("balance_minor")?;
        let held_minor: i64 = row.try_get("held_minor")?;
        balances.push(Balance {
            organization_id: organization.to_owned(),
            currency,
            balance_minor,
            held_minor,
            available_minor: balance_minor - held_minor,
        });
    }
    Ok(balances)
}

/// Ledger totals, open holds and any account whose balance disagrees with
/// its postings.
///
/// # Errors
/// Database failures.
pub async fn summary(connection: &mut AnyConnection) -> Result<LedgerSummary> {
    let mut summary = LedgerSummary::default();
    for row in sqlx::query(
        "SELECT currency, CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) AS total, COUNT(*) AS postings \
         FROM ledger_postings GROUP BY currency",
    )
    .fetch_all(&mut *connection)
    .await?
    {
        summary
            .totals_minor
            .insert(row.try_get("currency")?, row.try_get("total")?);
        summary.postings += row.try_get::<i64, _>("postings")?;
    }
    let holds = sqlx::query(
        "SELECT COUNT(*) AS open_holds, CAST(COALESCE(SUM(held_minor), 0) AS BIGINT) AS held \
         FROM queries WHERE hold_open = 1",
    )
    .fetch_one(&mut *connection)
    .await?;
    summary.open_holds = holds.try_get("open_holds")?;
    summary.open_held_minor = holds.try_get("held")?;
    for row in sqlx::query(
        "SELECT a.id AS id FROM ledger_accounts a \
         WHERE a.balance_minor <> (SELECT COALESCE(SUM(p.amount_minor), 0) \
                                   FROM ledger_postings p WHERE p.account_id = a.id) \
         ORDER BY a.id",
    )
    .fetch_all(&mut *connection)
    .await?
    {
        summary.unbalanced_accounts.push(row.try_get("id")?);
    }
    Ok(summary)
}

/// An organization's invoice for a month: charges as consumer, or earnings
/// (after the platform fee) as provider, over every query that counted
/// against its contract's quota (completed, refused or failed while it ran).
///
/// # Errors
/// Database failures.
pub async fn invoice(
    connection: &mut AnyConnection,
    organization: &str,
    period: &str,
    as_provider: bool,
) -> Result<Invoice> {
    validate_period("period", period)?;
    let (role, side, amount) = if as_provider {
        ("provider", "provider_organization_id", "provider")
    } else {
        ("consumer", "consumer_organization_id", "consumer")
    };
    let sql = format!(
        "SELECT q.contract_id AS contract_id, q.product_id AS product_id, q.plan_id AS plan_id, \
                q.currency AS currency, COUNT(*) AS queries, \
                CAST(COALESCE(SUM(q.compute_units), 0) AS BIGINT) AS compute_units, \
                CAST(COALESCE(SUM(q.rows_released), 0) AS BIGINT) AS rows_released, \
                CAST(COALESCE(SUM(p.amount_minor), 0) AS BIGINT) AS amount \
         FROM queries q LEFT JOIN ledger_postings p \
              ON p.query_id = q.id AND p.account_id = $3 || ':' || q.{side} || ':' || q.currency \
         WHERE q.{side} = $1 AND q.period = $2 AND {counted} \
         GROUP BY q.contract_id, q.product_id, q.plan_id, q.currency \
         ORDER BY q.contract_id",
        counted = COUNTED_QUERY,
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(organization)
        .bind(period)
        .bind(amount)
        .fetch_all(&mut *connection)
        .await?;
    let mut invoice = Invoice {
        organization_id: organization.to_owned(),
        period: period.to_owned(),
        role: role.to_owned(),
        ..Default::default()
    };
    for row in rows {
        let amount: i64 = row.try_get("amount")?;
        // Consumers pay (their postings are negative): show charges positive.
        let amount_minor = if as_provider { amount } else { -amount };
        let currency: String = row.try_get("currency")?;
        *invoice.total_minor.entry(currency.clone()).or_default() += amount_minor;
        invoice.lines.push(InvoiceLine {
            contract_id: row.try_get("contract_id")?,
            product_id: row.try_get("product_id")?,
            plan_id: row.try_get("plan_id")?,
            queries: row.try_get("queries")?,
            compute_units: row.try_get("compute_units")?,
            rows_released: row.try_get("rows_released")?,
            amount_minor,
            currency,
        });
    }
    Ok(invoice)
}
