//! Billing: what a query costs under its price plan, holds on prepaid
//! balances, and a double-entry ledger whose postings always sum to zero.
//!
//! Money is integer minor units (`i64`) everywhere; every sum is checked, so
//! an overflow is an error and never a wrapped balance.

use sqlx::{AnyConnection, Row as _};

use crate::error::{MarketError, Result};
use crate::proto::{self, PriceKind, PricePlan};
use crate::store::{Backend, Param, WriteBatch, now_ms};

/// The SQL condition, over `queries` as `q`, of a settled query that counts
/// against its contract's quota (and so is invoiced): all but those that
/// found no free sandbox slot, which `queries::classify` alone settles as
/// [`crate::error::Unanswered::Busy`] (stored as 14).
pub(crate) const COUNTED_QUERY: &str = "q.state <> 'running' AND q.error_code <> 14";

/// Most rows a per-row plan holds funds for; a query never costs more than
/// its hold, so rows beyond this in one query are not charged.
pub const MAX_HELD_ROWS: i64 = 100_000;

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

/// The platform's share of every charge, in basis points, unless configured.
pub const DEFAULT_PLATFORM_FEE_BPS: i64 = 1_000;

/// What a contract has used so far in a billing period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodUsage {
    /// Queries that counted against the quota: completed, refused by the
    /// policy or the planner, or failed while they ran.
    pub queries: i64,
    /// Compute units of those queries.
    pub compute_units: i64,
    /// Rows they released.
    pub rows_released: i64,
    /// Whether this period's subscription fee has been charged.
    pub subscription_charged: bool,
}

/// What one query used, as billed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryUse {
    /// Compute units (fuel / 1,000,000, rounded up).
    pub compute_units: i64,
    /// Rows released to the consumer.
    pub rows_released: i64,
}

fn overflow() -> MarketError {
    MarketError::invalid("price_plans", "the charge overflows 64-bit minor units")
}

/// Units beyond the included ones: of `used` this query, how many are billable
/// when `before` had been used already this period.
fn billable(before: i64, used: i64, included: i64) -> i64 {
    let after = before.saturating_add(used);
    (after - before.max(included)).max(0).min(used)
}

/// The charge for one query under `plan`, given what the contract used
/// before it this period.
///
/// # Errors
/// When the charge does not fit in 64 bits.
pub fn charge(plan: &PricePlan, before: PeriodUsage, used: QueryUse) -> Result<i64> {
    let unit = plan.unit_price_minor;
    let units = match plan.kind() {
        PriceKind::Free | PriceKind::Unspecified => return Ok(0),
        PriceKind::PerQuery => billable(before.queries, 1, plan.included_units),
        PriceKind::PerComputeUnit => billable(
            before.compute_units,
            used.compute_units,
            plan.included_units,
        ),
        PriceKind::PerRowReleased => billable(
            before.rows_released,
            used.rows_released,
            plan.included_units,
        ),
        PriceKind::Subscription => {
            let queries = billable(before.queries, 1, plan.included_units);
            let fee = if before.subscription_charged {
                0
            } else {
                plan.monthly_fee_minor
            };
            return unit
                .checked_mul(queries)
                .and_then(|usage| usage.checked_add(fee))
                .ok_or_else(overflow);
        }
    };
    unit.checked_mul(units).ok_or_else(overflow)
}

/// The most one query can cost: what is held before it runs.
///
/// # Errors
/// When the maximum does not fit in 64 bits.
pub fn maximum(plan: &PricePlan, before: PeriodUsage, max_compute_units: i64) -> Result<i64> {
    charge(
        plan,
        before,
        QueryUse {
            compute_units: max_compute_units,
            rows_released: MAX_HELD_ROWS,
        },
    )
}

/// The platform's fee out of `charge` (rounded down, so the provider never
/// gets less than its share).
#[must_use]
pub fn platform_fee(charge: i64, fee_bps: i64) -> i64 {
    // i128: charge × 10,000 cannot overflow.
    let fee = i128::from(charge) * i128::from(fee_bps) / 10_000;
    i64::try_from(fee).unwrap_or(charge).clamp(0, charge)
}

/// Which side of the ledger an account is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountKind {
    /// A consumer's prepaid balance.
    Consumer,
    /// A provider's earnings.
    Provider,
    /// The platform's fees.
    Platform,
    /// Money from outside (deposits): its balance is minus everything paid in.
    Funding,
}

impl AccountKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Consumer => "consumer",
            Self::Provider => "provider",
            Self::Platform => "platform",
            Self::Funding => "funding",
        }
    }
}

/// The id of an organization's account of `kind` in `currency`.
#[must_use]
pub fn account_id(kind: AccountKind, organization: &str, currency: &str) -> String {
    format!("{}:{organization}:{currency}", kind.as_str())
}

/// Checks an ISO 4217-style currency code.
///
/// # Errors
/// `InvalidArgument` naming `field`.
pub fn validate_currency(field: &str, currency: &str) -> Result<()> {
    if currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(MarketError::invalid(
            field,
            "an ISO 4217 code: three upper-case letters, e.g. EUR",
        ))
    }
}

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

/// One leg of a ledger entry.
#[derive(Clone, Debug)]
pub struct Posting {
    /// Whose account.
    pub kind: AccountKind,
    /// The organization.
    pub organization: String,
    /// Signed amount: positive credits the account.
    pub amount_minor: i64,
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

/// Credits a consumer's prepaid balance from outside.
///
/// # Errors
/// `InvalidArgument` for a non-positive amount or a bad currency.
pub async fn deposit(
    connection: &mut AnyConnection,
    organization: &str,
    amount_minor: i64,
    currency: &str,
) -> Result<()> {
    validate_currency("currency", currency)?;
    if amount_minor <= 0 {
        return Err(MarketError::invalid(
            "amount_minor",
            "a positive amount in minor units",
        ));
    }
    post(
        connection,
        "deposit",
        currency,
        None,
        &[
            Posting {
                kind: AccountKind::Funding,
                organization: organization.to_owned(),
                amount_minor: -amount_minor,
            },
            Posting {
                kind: AccountKind::Consumer,
                organization: organization.to_owned(),
                amount_minor,
            },
        ],
    )
    .await
}

/// An organization's consumer balances.
///
/// # Errors
/// Database failures.
pub async fn balances(
    connection: &mut AnyConnection,
    organization: &str,
) -> Result<Vec<proto::Balance>> {
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
        balances.push(proto::Balance {
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
pub async fn summary(connection: &mut AnyConnection) -> Result<proto::LedgerSummary> {
    let mut summary = proto::LedgerSummary::default();
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
) -> Result<proto::Invoice> {
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
    let mut invoice = proto::Invoice {
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
        invoice.lines.push(proto::InvoiceLine {
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

/// Checks a "YYYY-MM" billing period.
///
/// # Errors
/// `InvalidArgument` naming `field`.
pub fn validate_period(field: &str, period: &str) -> Result<()> {
    let valid = period.len() == 7
        && period.as_bytes()[4] == b'-'
        && period[..4].bytes().all(|b| b.is_ascii_digit())
        && period[5..]
            .parse::<u8>()
            .is_ok_and(|month| (1..=12).contains(&month));
    if valid {
        Ok(())
    } else {
        Err(MarketError::invalid(
            field,
            "a month as YYYY-MM, e.g. 2026-11",
        ))
    }
}

/// The billing period (UTC calendar month) of a Unix time in milliseconds.
#[must_use]
pub fn period_of(unix_ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .format("%Y-%m")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: PriceKind, unit: i64, fee: i64, included: i64) -> PricePlan {
        PricePlan {
            id: "p".into(),
            kind: kind as i32,
            unit_price_minor: unit,
            monthly_fee_minor: fee,
            included_units: included,
            currency: "EUR".into(),
        }
    }

    fn used(compute_units: i64, rows_released: i64) -> QueryUse {
        QueryUse {
            compute_units,
            rows_released,
        }
    }

    #[test]
    fn per_query_charges_after_the_included_queries() {
        let plan = plan(PriceKind::PerQuery, 25, 0, 2);
        let mut before = PeriodUsage::default();
        let mut charges = Vec::new();
        for _ in 0..4 {
            charges.push(charge(&plan, before, used(7, 3)).unwrap());
            before.queries += 1;
        }
        assert_eq!(charges, [0, 0, 25, 25]);
    }

    #[test]
    fn per_compute_unit_bills_only_units_beyond_the_included_ones() {
        let plan = plan(PriceKind::PerComputeUnit, 3, 0, 10);
        let before = PeriodUsage {
            compute_units: 8,
            ..PeriodUsage::default()
        };
        // 8 + 5 = 13: two were included, three are billed.
        assert_eq!(charge(&plan, before, used(5, 0)).unwrap(), 9);
        let after = PeriodUsage {
            compute_units: 20,
            ..PeriodUsage::default()
        };
        assert_eq!(charge(&plan, after, used(5, 0)).unwrap(), 15);
    }

    #[test]
    fn per_row_and_free_plans() {
        assert_eq!(
            charge(
                &plan(PriceKind::PerRowReleased, 2, 0, 0),
                PeriodUsage::default(),
                used(100, 40)
            )
            .unwrap(),
            80
        );
        assert_eq!(
            charge(
                &plan(PriceKind::Free, 99, 99, 0),
                PeriodUsage::default(),
                used(100, 40)
            )
            .unwrap(),
            0
        );
    }

    #[test]
    fn a_subscription_charges_its_fee_once_a_month_then_queries_beyond_the_quota() {
        let plan = plan(PriceKind::Subscription, 10, 5_000, 1);
        let first = charge(&plan, PeriodUsage::default(), used(1, 1)).unwrap();
        let second = charge(
            &plan,
            PeriodUsage {
                queries: 1,
                subscription_charged: true,
                ..PeriodUsage::default()
            },
            used(1, 1),
        )
        .unwrap();
        assert_eq!((first, second), (5_000, 10));
    }

    #[test]
    fn the_hold_covers_the_largest_possible_charge() {
        let plan = plan(PriceKind::PerComputeUnit, 3, 0, 0);
        let before = PeriodUsage::default();
        let hold = maximum(&plan, before, 1_000).unwrap();
        assert_eq!(hold, 3_000);
        assert!(charge(&plan, before, used(999, 5)).unwrap() <= hold);
    }

    #[test]
    fn overflowing_prices_are_refused_not_wrapped() {
        let plan = plan(PriceKind::PerComputeUnit, i64::MAX / 2, 0, 0);
        assert!(charge(&plan, PeriodUsage::default(), used(3, 0)).is_err());
    }

    #[test]
    fn the_platform_fee_rounds_down_and_never_exceeds_the_charge() {
        assert_eq!(platform_fee(999, 1_000), 99);
        assert_eq!(platform_fee(0, 1_000), 0);
        assert_eq!(platform_fee(i64::MAX, 10_000), i64::MAX);
        assert_eq!(platform_fee(100, 20_000), 100);
    }

    #[test]
    fn periods_are_utc_calendar_months() {
        assert_eq!(period_of(0), "1970-01");
        // 2026-11-30T23:59:59.999Z and one millisecond later.
        assert_eq!(period_of(1_796_083_199_999), "2026-11");
        assert_eq!(period_of(1_796_083_200_000), "2026-12");
        assert_eq!(period_of(951_782_400_000), "2000-02-29"[..7].to_owned());
        assert!(validate_period("period", "2026-13").is_err());
        assert!(validate_period("period", "2026-1").is_err());
        assert!(validate_period("period", "2026-01").is_ok());
    }
}
