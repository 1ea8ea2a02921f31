//! A demand for data as the demand list keeps it, and the rules for a new
//! one.

use crate::error::{MarketError, Result, check_text};

/// A consumer's request for data, and the providers' answers to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    /// Its id (`dem-…`).
    pub id: String,
    /// The consumer organization that posted it.
    pub consumer_organization_id: String,
    /// What is wanted, in a line.
    pub title: String,
    /// What is wanted, in full.
    pub description: String,
    /// Words it is found by.
    pub keywords: Vec<String>,
    /// The tier wanted, or empty.
    pub tier: String,
    /// The region wanted, or empty.
    pub region: String,
    /// What the consumer would pay a month, in minor units (0: unsaid).
    pub monthly_budget_minor: i64,
    /// The budget's currency (ISO 4217), when there is a budget.
    pub currency: String,
    /// Whether it still takes answers.
    pub state: DemandState,
    /// When it was posted, Unix milliseconds.
    pub created_at: i64,
    /// Providers' answers, oldest first.
    pub answers: Vec<DemandAnswer>,
}

/// Whether a demand takes answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemandState {
    /// It does.
    Open,
    /// Its consumer closed it.
    Closed,
}

/// A provider's answer: a product of theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemandAnswer {
    /// The answering provider organization.
    pub provider_organization_id: String,
    /// Its product.
    pub product_id: String,
    /// What it says.
    pub message: String,
    /// When, Unix milliseconds.
    pub at: i64,
}

/// A demand as a consumer posts it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewDemand {
    /// See [`Demand::title`].
    pub title: String,
    /// See [`Demand::description`].
    pub description: String,
    /// See [`Demand::keywords`].
    pub keywords: Vec<String>,
    /// See [`Demand::tier`].
    pub tier: String,
    /// See [`Demand::region`].
    pub region: String,
    /// See [`Demand::monthly_budget_minor`].
    pub monthly_budget_minor: i64,
    /// See [`Demand::currency`].
    pub currency: String,
}

/// Which demands to list: every keyword must appear; closed ones only when
/// asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DemandQuery {
    /// Words that must all appear in the title, description or keywords.
    pub keywords: Vec<String>,
    /// Whether closed demands are listed too.
    pub include_closed: bool,
}

/// Checks a demand's fields; the error names the first bad one.
///
/// # Errors
/// `InvalidArgument` naming the field.
pub fn validate(request: &NewDemand) -> Result<()> {
    check_text("title", &request.title, 200, true)?;
    check_text("description", &request.description, 10_000, true)?;
    for (i, keyword) in request.keywords.iter().enumerate() {
        check_text(&format!("keywords[{i}]"), keyword, 50, true)?;
        if keyword.contains('\n') {
            return Err(MarketError::invalid(
                format!("keywords[{i}]"),
                "must be one line",
            ));
        }
    }
    if !request.tier.is_empty()
        && !["municipal", "edge", "partner"].contains(&request.tier.as_str())
    {
        return Err(MarketError::invalid(
            "tier",
            "empty, or one of municipal, edge, partner",
        ));
    }
    check_text("region", &request.region, 100, false)?;
    if request.monthly_budget_minor < 0 {
        return Err(MarketError::invalid(
            "monthly_budget_minor",
            "must not be negative",
        ));
    }
    if request.monthly_budget_minor > 0
        && (request.currency.len() != 3
            || !request.currency.chars().all(|c| c.is_ascii_uppercase()))
    {
        return Err(MarketError::invalid(
            "currency",
            "an ISO 4217 code such as EUR or CNY",
        ));
    }
    Ok(())
}
