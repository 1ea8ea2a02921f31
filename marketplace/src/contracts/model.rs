//! A contract as the marketplace keeps it, and the questions asked of it.

use crate::error::{MarketError, Result};
use crate::spec::AllowedOperations;

/// Where a contract stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContractState {
    /// Waiting for the provider.
    Requested,
    /// In force until it expires or is revoked.
    Active,
    /// Refused by the provider.
    Rejected,
    /// Ended by either party.
    Revoked,
    /// Active once, past its expiry (never stored: read as such).
    Expired,
}

impl ContractState {
    /// The stored (and reported) name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Active => "active",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    /// The state stored under `name`.
    ///
    /// # Errors
    /// `Corrupt` for a name no stored state has.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "requested" => Self::Requested,
            "active" => Self::Active,
            "rejected" => Self::Rejected,
            "revoked" => Self::Revoked,
            other => return Err(MarketError::Corrupt(format!("contract state {other:?}"))),
        })
    }
}

/// A contract between a consumer and a product's provider.
#[derive(Clone, Debug, PartialEq)]
pub struct Contract {
    /// Its id.
    pub id: String,
    /// The product.
    pub product_id: String,
    /// The consumer.
    pub consumer_organization_id: String,
    /// The product's provider (it moves with a transferred product).
    pub provider_organization_id: String,
    /// The price plan, fixed when the contract is made.
    pub plan_id: String,
    /// What the consumer may run.
    pub operations: AllowedOperations,
    /// Queries a month (0: no quota).
    pub monthly_query_quota: i64,
    /// Where it stands.
    pub state: ContractState,
    /// When it was requested.
    pub requested_at_unix_ms: i64,
    /// When it was decided (0 before).
    pub decided_at_unix_ms: i64,
    /// When it expires (0 before it is approved).
    pub expires_at_unix_ms: i64,
    /// Why the consumer wants the data.
    pub purpose: String,
    /// Why it was rejected or revoked.
    pub reason: String,
    /// How long it runs once approved.
    pub duration_days: i64,
}

/// What a consumer asks for when it requests a contract.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContractRequest {
    /// The product.
    pub product_id: String,
    /// One of the product's price plans.
    pub plan_id: String,
    /// What it wants to run (required).
    pub operations: Option<AllowedOperations>,
    /// Queries a month (0: unlimited).
    pub monthly_query_quota: i64,
    /// 1 to 1,096 days.
    pub duration_days: i64,
    /// Why, in 1 to 2,000 characters.
    pub purpose: String,
}

/// A kind of operation a contract may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationKind {
    /// Aggregate SQL under the product's threshold.
    AggregateSql,
    /// A list query returning some columns.
    ListSql,
    /// An approved algorithm.
    Algorithm,
}

impl OperationKind {
    /// The name audit entries record (the API's enum value name).
    #[must_use]
    pub fn audit_name(self) -> &'static str {
        match self {
            Self::AggregateSql => "OPERATION_KIND_AGGREGATE_SQL",
            Self::ListSql => "OPERATION_KIND_LIST_SQL",
            Self::Algorithm => "OPERATION_KIND_ALGORITHM",
        }
    }
}

/// "May my organization run this on that product now?"
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationQuestion {
    /// The product.
    pub product_id: String,
    /// The operation (`None`: the caller named none).
    pub operation: Option<OperationKind>,
    /// For list queries: the columns the query returns.
    pub columns: Vec<String>,
    /// For algorithms: the sha256 (hex).
    pub algorithm_sha256: String,
}

/// A decision on a contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// requested → active.
    Approve,
    /// requested → rejected.
    Reject,
    /// active → revoked.
    Revoke,
}
