//! Billing: what a query costs under its price plan, holds on prepaid
//! balances, and a double-entry ledger whose postings always sum to zero.
//!
//! Money is integer minor units (`i64`) everywhere; every sum is checked, so
//! an overflow is an error and never a wrapped balance.

use std::collections::BTreeMap;

use crate::error::{MarketError, Result};
use crate::spec::{PriceKind, PricePlan};

/// Most rows a per-row plan holds funds for; a query never costs more than
/// its hold, so rows beyond this in one query are not charged.
pub const MAX_HELD_ROWS: i64 = 100_000;

/// The platform's share of every charge, in basis points, unless configured.
pub const DEFAULT_PLATFORM_FEE_BPS: i64 = 1_000;

/// A consumer organization's prepaid balance in one currency.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balance {
    /// The organization.
    pub organization_id: String,
    /// ISO 4217.
    pub currency: String,
    /// What the account holds.
    pub balance_minor: i64,
    /// Held for queries running now.
    pub held_minor: i64,
    /// What a new query may hold.
    pub available_minor: i64,
}

/// One contract's line on an invoice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvoiceLine {
    /// The contract.
    pub contract_id: String,
    /// Its product.
    pub product_id: String,
    /// Its price plan.
    pub plan_id: String,
    /// Queries that counted.
    pub queries: i64,
    /// Compute units they used (0 for withheld ones).
    pub compute_units: i64,
    /// Rows they released.
    pub rows_released: i64,
    /// Charged (consumer) or earned after the platform fee (provider).
    pub amount_minor: i64,
    /// ISO 4217.
    pub currency: String,
}

/// An organization's invoice for a month.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Invoice {
    /// The organization.
    pub organization_id: String,
    /// "YYYY-MM" (UTC).
    pub period: String,
    /// "consumer" (charges) or "provider" (earnings after the platform fee).
    pub role: String,
    /// One per contract.
    pub lines: Vec<InvoiceLine>,
    /// Totals per currency.
    pub total_minor: BTreeMap<String, i64>,
}

/// The ledger's health: totals (zero in a sound ledger), open holds and
/// accounts whose cached balance disagrees with their postings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerSummary {
    /// Sum of every posting per currency.
    pub totals_minor: BTreeMap<String, i64>,
    /// Postings written.
    pub postings: i64,
    /// Queries holding funds now.
    pub open_holds: i64,
    /// What they hold.
    pub open_held_minor: i64,
    /// Accounts whose balance differs from the sum of their postings.
    pub unbalanced_accounts: Vec<String>,
}

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
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
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

/// The ledger entry crediting a consumer's prepaid balance from outside:
/// its funding account pays in, its consumer account receives.
///
/// # Errors
/// `InvalidArgument` for a non-positive amount or a bad currency.
pub fn deposit_postings(
    organization: &str,
    amount_minor: i64,
    currency: &str,
) -> Result<[Posting; 2]> {
    validate_currency("currency", currency)?;
    if amount_minor <= 0 {
        return Err(MarketError::invalid(
            "amount_minor",
            "a positive amount in minor units",
        ));
    }
    Ok([
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
    ])
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
