//! Quality reports as the marketplace keeps them.

use std::collections::HashMap;

use crate::error::{MarketError, Result};

/// Where a report stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportState {
    /// Waiting for a fix (answered or not).
    Open,
    /// The provider says a version fixed it.
    Fixed,
}

impl ReportState {
    /// The stored name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Fixed => "fixed",
        }
    }

    /// The state of a stored name.
    ///
    /// # Errors
    /// `Corrupt` for a name no state has.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "open" => Ok(Self::Open),
            "fixed" => Ok(Self::Fixed),
            other => Err(MarketError::Corrupt(format!(
                "quality report state {other:?}"
            ))),
        }
    }
}

/// A report on a product's data.
#[derive(Clone, Debug)]
pub struct QualityReport {
    /// `qr-…`.
    pub id: String,
    /// The product.
    pub product_id: String,
    /// The product's version it was found in.
    pub product_version: i64,
    /// The column (`table.column`), or empty for the product as a whole.
    pub column: String,
    /// What is wrong.
    pub description: String,
    /// The reporter's query that showed it, if given.
    pub query_id: String,
    /// Who reported it.
    pub reporter_organization_id: String,
    /// The reporting user.
    pub reporter_user_id: String,
    /// Open or fixed.
    pub state: ReportState,
    /// The provider's latest answer (or the reporter's reason to reopen).
    pub answer: String,
    /// The version that fixed it (0 while open).
    pub fixed_in_version: i64,
    /// When it was reported (Unix ms).
    pub created_at_unix_ms: i64,
    /// When it last changed (Unix ms).
    pub updated_at_unix_ms: i64,
}

/// A new report.
#[derive(Clone, Debug, Default)]
pub struct NewReport {
    /// The product.
    pub product_id: String,
    /// `table.column`, or empty.
    pub column: String,
    /// What is wrong.
    pub description: String,
    /// The query that showed it, or empty.
    pub query_id: String,
}

/// A product's open reports: how many, and when the oldest was filed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenReports {
    /// Open reports.
    pub count: i64,
    /// When the oldest open one was filed (Unix ms; 0 when none).
    pub oldest_unix_ms: i64,
}

/// Open reports per product, for the catalog.
pub type OpenByProduct = HashMap<String, OpenReports>;
