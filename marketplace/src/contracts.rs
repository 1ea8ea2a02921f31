//! Contracts: a consumer requests a product under a plan, the provider approves
//! or rejects, and an active contract lists the operations allowed until it
//! expires or is revoked — both take effect on the next request.
//!
//! [`ContractIndex`] answers "may this organization run this operation on
//! this product now" from memory in O(contracts of that pair), so casbin never
//! scans contracts. It is rebuilt from the database at start and updated after
//! every committed change. (One server process owns it; replicas behind one
//! PostgreSQL would each need change notification, which is not built yet.)

use std::collections::HashMap;

use prost::Message as _;
use sqlx::{AnyConnection, Row as _};

use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result};
use crate::identity::new_id;
use crate::proto::{
    AllowedOperations, CheckOperationRequest, Contract, ContractState, OperationKind,
    RequestContractRequest,
};
use crate::registry::{Product, ProductState};
use crate::store::{Backend, now_ms};

const DAY_MS: i64 = 86_400_000;

fn state_name(state: ContractState) -> &'static str {
    match state {
        ContractState::Unspecified => "unspecified",
        ContractState::Requested => "requested",
        ContractState::Active => "active",
        ContractState::Rejected => "rejected",
        ContractState::Revoked => "revoked",
        ContractState::Expired => "expired",
    }
}

fn parse_state(name: &str) -> Result<ContractState> {
    Ok(match name {
        "requested" => ContractState::Requested,
        "active" => ContractState::Active,
        "rejected" => ContractState::Rejected,
        "revoked" => ContractState::Revoked,
        other => return Err(MarketError::Corrupt(format!("contract state {other:?}"))),
    })
}

const CONTRACT_COLUMNS: &str = "id, product_id, consumer_organization_id, provider_organization_id, plan_id, \
     operations, monthly_query_quota, state, requested_at, decided_at, expires_at, duration_days, purpose, reason";

fn contract_from_row(row: &sqlx::any::AnyRow, now: i64) -> Result<Contract> {
    let operations: Vec<u8> = row.try_get("operations")?;
    let operations = AllowedOperations::decode(operations.as_slice())
        .map_err(|error| MarketError::Corrupt(format!("stored contract operations: {error}")))?;
    let expires_at: Option<i64> = row.try_get("expires_at")?;
    let mut state = parse_state(&row.try_get::<String, _>("state")?)?;
    if state == ContractState::Active && expires_at.is_some_and(|at| at <= now) {
        state = ContractState::Expired;
    }
    Ok(Contract {
        id: row.try_get("id")?,
        product_id: row.try_get("product_id")?,
        consumer_organization_id: row.try_get("consumer_organization_id")?,
        provider_organization_id: row.try_get("provider_organization_id")?,
        plan_id: row.try_get("plan_id")?,
        operations: Some(operations),
        monthly_query_quota: row.try_get("monthly_query_quota")?,
        state: state as i32,
        requested_at_unix_ms: row.try_get("requested_at")?,
        decided_at_unix_ms: row
            .try_get::<Option<i64>, _>("decided_at")?
            .unwrap_or_default(),
        expires_at_unix_ms: expires_at.unwrap_or_default(),
        purpose: row.try_get("purpose")?,
        reason: row.try_get("reason")?,
        duration_days: row.try_get("duration_days")?,
    })
}

/// A contract by id.
///
/// # Errors
/// `NotFound`.
pub async fn get(connection: &mut AnyConnection, id: &str) -> Result<Contract> {
    let sql = format!("SELECT {CONTRACT_COLUMNS} FROM contracts WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_owned())
        .fetch_optional(&mut *connection)
        .await?
        .ok_or_else(|| MarketError::NotFound {
            what: "contract",
            id: id.to_owned(),
        })?;
    contract_from_row(&row, now_ms())
}

/// Contracts where `organization` is consumer or provider (every contract when
/// `None`), optionally of one product.
///
/// # Errors
/// Database failures.
pub async fn list(
    connection: &mut AnyConnection,
    organization: Option<&str>,
    product: &str,
) -> Result<Vec<Contract>> {
    let sql = format!(
        "SELECT {CONTRACT_COLUMNS} FROM contracts WHERE ($1 = '' OR consumer_organization_id = $1 \
         OR provider_organization_id = $1) AND ($2 = '' OR product_id = $2) ORDER BY requested_at, id"
    );
    let now = now_ms();
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(organization.unwrap_or_default().to_owned())
        .bind(product.to_owned())
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(|row| contract_from_row(row, now))
        .collect()
}

fn validate_operations(product: &Product, operations: &AllowedOperations) -> Result<()> {
    let policy = product.spec.output_policy.as_ref().ok_or_else(|| {
        MarketError::Corrupt(format!("product {} has no output policy", product.id))
    })?;
    if !operations.aggregate_sql
        && operations.list_columns.is_empty()
        && operations.algorithm_sha256.is_empty()
    {
        return Err(MarketError::invalid(
            "operations",
            "ask for at least one operation: aggregate_sql, list_columns or algorithm_sha256",
        ));
    }
    for (i, column) in operations.list_columns.iter().enumerate() {
        if !policy.list_columns.contains(column) {
            return Err(MarketError::invalid(
                format!("operations.list_columns[{i}]"),
                format!("column {column:?} is not one the product allows in list queries"),
            ));
        }
    }
    for (i, hash) in operations.algorithm_sha256.iter().enumerate() {
        if !policy.approved_algorithm_sha256.contains(hash) {
            return Err(MarketError::invalid(
                format!("operations.algorithm_sha256[{i}]"),
                "not an algorithm the product has approved",
            ));
        }
    }
    Ok(())
}

/// A consumer organization's request for a contract.
///
/// # Errors
/// Invalid fields, or a product that is not published.
pub async fn request(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    consumer: &str,
    product: &Product,
    request: &RequestContractRequest,
) -> Result<Contract> {
    if product.state != ProductState::Published {
        return Err(MarketError::FailedPrecondition(format!(
            "product {} is not published",
            product.id
        )));
    }
    let spec = &product.spec;
    if !spec
        .price_plans
        .iter()
        .any(|plan| plan.id == request.plan_id)
    {
        let plans: Vec<&str> = spec
            .price_plans
            .iter()
            .map(|plan| plan.id.as_str())
            .collect();
        return Err(MarketError::invalid(
            "plan_id",
            format!(
                "{:?} is not a plan of product {}; one of {}",
                request.plan_id,
                product.id,
                plans.join(", ")
            ),
        ));
    }
    let operations = request
        .operations
        .clone()
        .ok_or_else(|| MarketError::invalid("operations", "is required"))?;
    validate_operations(product, &operations)?;
    if request.monthly_query_quota < 0 {
        return Err(MarketError::invalid(
            "monthly_query_quota",
            "must not be negative",
        ));
    }
    if !(1..=1096).contains(&request.duration_days) {
        return Err(MarketError::invalid(
            "duration_days",
            "must be between 1 and 1096",
        ));
    }
    if request.purpose.trim().is_empty() || request.purpose.len() > 2000 {
        return Err(MarketError::invalid(
            "purpose",
            "state the purpose in 1 to 2000 characters",
        ));
    }
    let id = new_id("ctr");
    sqlx::query(
        "INSERT INTO contracts (id, product_id, consumer_organization_id, provider_organization_id, plan_id, \
         operations, monthly_query_quota, state, requested_at, duration_days, purpose, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'requested', $8, $9, $10, '')",
    )
    .bind(id.clone())
    .bind(product.id.clone())
    .bind(consumer.to_owned())
    .bind(product.provider_organization_id.clone())
    .bind(request.plan_id.clone())
    .bind(operations.encode_to_vec())
    .bind(request.monthly_query_quota)
    .bind(now_ms())
    .bind(request.duration_days)
    .bind(request.purpose.clone())
    .execute(&mut *connection)
    .await?;
    let contract = get(connection, &id).await?;
    audit(connection, backend, &contract, "requested", actor).await?;
    Ok(contract)
}

async fn audit(
    connection: &mut AnyConnection,
    backend: Backend,
    contract: &Contract,
    kind: &str,
    actor: &str,
) -> Result<()> {
    let operations = contract.operations.clone().unwrap_or_default();
    let details = serde_json::json!({
        "product": contract.product_id,
        "consumer": contract.consumer_organization_id,
        "provider": contract.provider_organization_id,
        "plan": contract.plan_id,
        "aggregate_sql": operations.aggregate_sql,
        "list_columns": operations.list_columns,
        "algorithm_sha256": operations.algorithm_sha256,
        "monthly_query_quota": contract.monthly_query_quota,
        "expires_at_unix_ms": contract.expires_at_unix_ms,
        "purpose": contract.purpose,
        "reason": contract.reason,
    });
    // Both parties are tenants of a contract; it is filed under the consumer's,
    // and the details name the provider.
    log::append(
        connection,
        backend,
        &[Event {
            kind: format!("contract.{kind}"),
            actor: actor.to_owned(),
            tenant: contract.consumer_organization_id.clone(),
            subject: contract.id.clone(),
            details,
        }],
    )
    .await?;
    Ok(())
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

/// Applies a decision.
///
/// # Errors
/// `FailedPrecondition` when the contract is not in the state the decision
/// needs.
pub async fn decide(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    id: &str,
    decision: Decision,
    reason: &str,
) -> Result<Contract> {
    if reason.len() > 2000 {
        return Err(MarketError::invalid("reason", "at most 2000 characters"));
    }
    if decision != Decision::Approve && reason.trim().is_empty() {
        return Err(MarketError::invalid(
            "reason",
            "is required to reject or revoke",
        ));
    }
    let contract = get(connection, id).await?;
    let (needed, next, kind) = match decision {
        Decision::Approve => (ContractState::Requested, ContractState::Active, "approved"),
        Decision::Reject => (
            ContractState::Requested,
            ContractState::Rejected,
            "rejected",
        ),
        Decision::Revoke => (ContractState::Active, ContractState::Revoked, "revoked"),
    };
    if contract.state() != needed {
        return Err(MarketError::FailedPrecondition(format!(
            "contract {id} is {}; it must be {} to be {kind}",
            state_name(contract.state()),
            state_name(needed)
        )));
    }
    let now = now_ms();
    let expires_at = (decision == Decision::Approve).then(|| now + contract.duration_days * DAY_MS);
    sqlx::query(
        "UPDATE contracts SET state = $1, decided_at = $2, expires_at = COALESCE($3, expires_at), reason = $4 \
         WHERE id = $5",
    )
    .bind(state_name(next))
    .bind(now)
    .bind(expires_at)
    .bind(reason.to_owned())
    .bind(id.to_owned())
    .execute(&mut *connection)
    .await?;
    let contract = get(connection, id).await?;
    audit(connection, backend, &contract, kind, actor).await?;
    Ok(contract)
}

/// An active contract's grant, as the index keeps it. A contract's plan and
/// quota never change once it is made (only its state, expiry and reason
/// do), so a query reads them here rather than from the contract's row.
#[derive(Clone, Debug)]
struct Grant {
    contract_id: String,
    operations: AllowedOperations,
    expires_at: i64,
    plan_id: String,
    monthly_query_quota: i64,
}

/// What a query runs under: the contract that allows it, as indexed.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryGrant {
    /// The contract's id.
    pub contract_id: String,
    /// What the contract allows; the sandbox enforces it.
    pub operations: AllowedOperations,
    /// The price plan the contract was made under.
    pub plan_id: String,
    /// Queries a month the contract includes (0: no quota).
    pub monthly_query_quota: i64,
}

/// The active contracts by (consumer organization, product).
#[derive(Debug, Default)]
pub struct ContractIndex {
    grants: std::sync::RwLock<HashMap<(String, String), Vec<Grant>>>,
}

/// The answer to "may this organization do this now".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Allowed under this contract.
    Allowed {
        /// The contract that allows it.
        contract_id: String,
    },
    /// Refused, and why.
    Denied(String),
}

impl ContractIndex {
    /// Builds the index from every active contract.
    ///
    /// # Errors
    /// Database failures.
    pub async fn load(connection: &mut AnyConnection) -> Result<Self> {
        let index = Self::default();
        for contract in list(connection, None, "").await? {
            index.update(&contract);
        }
        Ok(index)
    }

    /// Brings the index in line with a committed contract.
    pub fn update(&self, contract: &Contract) {
        let key = (
            contract.consumer_organization_id.clone(),
            contract.product_id.clone(),
        );
        let mut grants = self.grants.write().expect("contract index lock");
        let entry = grants.entry(key.clone()).or_default();
        entry.retain(|grant| grant.contract_id != contract.id);
        if contract.state() == ContractState::Active {
            entry.push(Grant {
                contract_id: contract.id.clone(),
                operations: contract.operations.clone().unwrap_or_default(),
                expires_at: contract.expires_at_unix_ms,
                plan_id: contract.plan_id.clone(),
                monthly_query_quota: contract.monthly_query_quota,
            });
        }
        if entry.is_empty() {
            grants.remove(&key);
        }
    }

    /// Number of active grants indexed.
    #[must_use]
    pub fn len(&self) -> usize {
        self.grants
            .read()
            .expect("contract index lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Whether no grant is indexed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The contract a query runs under, with what it allows: the first
    /// unexpired grant that allows SQL (aggregates or list columns) or, for
    /// an algorithm, its sha256. The sandbox enforces the operations within.
    ///
    /// # Errors
    /// Why no contract allows it.
    pub fn grant_for_query(
        &self,
        consumer: &str,
        product: &str,
        algorithm_sha256: &str,
        now: i64,
    ) -> std::result::Result<QueryGrant, String> {
        let grants = self.grants.read().expect("contract index lock");
        let Some(grants) = grants.get(&(consumer.to_owned(), product.to_owned())) else {
            return Err(format!("no active contract for product {product}"));
        };
        let mut reason = String::from("every active contract has expired");
        for grant in grants.iter().filter(|grant| grant.expires_at > now) {
            let ops = &grant.operations;
            let allowed = if algorithm_sha256.is_empty() {
                ops.aggregate_sql || !ops.list_columns.is_empty()
            } else {
                ops.algorithm_sha256
                    .iter()
                    .any(|hash| hash == algorithm_sha256)
            };
            if allowed {
                return Ok(QueryGrant {
                    contract_id: grant.contract_id.clone(),
                    operations: ops.clone(),
                    plan_id: grant.plan_id.clone(),
                    monthly_query_quota: grant.monthly_query_quota,
                });
            }
            reason = if algorithm_sha256.is_empty() {
                format!("contract {} allows no SQL", grant.contract_id)
            } else {
                format!(
                    "contract {} does not allow algorithm {algorithm_sha256}",
                    grant.contract_id
                )
            };
        }
        Err(reason)
    }

    /// Whether `consumer` may run `request`'s operation at `now`.
    #[must_use]
    pub fn check(&self, consumer: &str, request: &CheckOperationRequest, now: i64) -> Check {
        let grants = self.grants.read().expect("contract index lock");
        let Some(grants) = grants.get(&(consumer.to_owned(), request.product_id.clone())) else {
            return Check::Denied(format!(
                "no active contract for product {}",
                request.product_id
            ));
        };
        let mut reason = String::from("every active contract has expired");
        for grant in grants {
            if grant.expires_at <= now {
                continue;
            }
            let ops = &grant.operations;
            let allowed = match request.operation() {
                OperationKind::AggregateSql => ops.aggregate_sql,
                OperationKind::ListSql => {
                    !request.columns.is_empty()
                        && request.columns.iter().all(|c| ops.list_columns.contains(c))
                }
                OperationKind::Algorithm => {
                    ops.algorithm_sha256.contains(&request.algorithm_sha256)
                }
                OperationKind::Unspecified => false,
            };
            if allowed {
                return Check::Allowed {
                    contract_id: grant.contract_id.clone(),
                };
            }
            reason = format!(
                "contract {} does not allow this operation",
                grant.contract_id
            );
        }
        Check::Denied(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(id: &str, expires_at: i64, ops: AllowedOperations) -> Contract {
        Contract {
            id: id.into(),
            product_id: "population".into(),
            consumer_organization_id: "acme".into(),
            state: ContractState::Active as i32,
            expires_at_unix_ms: expires_at,
            operations: Some(ops),
            ..Default::default()
        }
    }

    fn ask(operation: OperationKind, columns: &[&str]) -> CheckOperationRequest {
        CheckOperationRequest {
            product_id: "population".into(),
            operation: operation as i32,
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            algorithm_sha256: String::new(),
        }
    }

    #[test]
    fn grants_allow_only_their_operations_until_expiry_or_revocation() {
        let index = ContractIndex::default();
        let ops = AllowedOperations {
            aggregate_sql: true,
            list_columns: vec!["district".into()],
            algorithm_sha256: vec![],
        };
        index.update(&active("ctr-1", 1_000, ops));
        assert!(matches!(
            index.check("acme", &ask(OperationKind::AggregateSql, &[]), 999),
            Check::Allowed { .. }
        ));
        assert!(matches!(
            index.check("acme", &ask(OperationKind::ListSql, &["district"]), 999),
            Check::Allowed { .. }
        ));
        assert!(matches!(
            index.check(
                "acme",
                &ask(OperationKind::ListSql, &["district", "age"]),
                999
            ),
            Check::Denied(_)
        ));
        assert!(
            matches!(
                index.check("acme", &ask(OperationKind::AggregateSql, &[]), 1_000),
                Check::Denied(_)
            ),
            "expired at its expiry time"
        );
        assert!(
            matches!(
                index.check("other", &ask(OperationKind::AggregateSql, &[]), 999),
                Check::Denied(_)
            ),
            "another consumer"
        );
        let mut revoked = active("ctr-1", 1_000, AllowedOperations::default());
        revoked.state = ContractState::Revoked as i32;
        index.update(&revoked);
        assert!(matches!(
            index.check("acme", &ask(OperationKind::AggregateSql, &[]), 999),
            Check::Denied(_)
        ));
        assert!(index.is_empty());
    }

    #[test]
    fn a_query_grant_carries_the_contracts_plan_and_quota() {
        let index = ContractIndex::default();
        let operations = AllowedOperations {
            aggregate_sql: true,
            ..Default::default()
        };
        let mut contract = active("ctr-2", 1_000, operations.clone());
        contract.plan_id = "per-query".into();
        contract.monthly_query_quota = 40;
        index.update(&contract);
        assert_eq!(
            index.grant_for_query("acme", "population", "", 999),
            Ok(QueryGrant {
                contract_id: "ctr-2".into(),
                operations,
                plan_id: "per-query".into(),
                monthly_query_quota: 40,
            })
        );
        assert_eq!(
            index.grant_for_query("acme", "population", "", 1_000),
            Err("every active contract has expired".into())
        );
    }
}
