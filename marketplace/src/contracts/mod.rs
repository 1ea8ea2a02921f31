//! Contracts: a consumer requests a product under a plan, the provider approves
//! or rejects, and an active contract lists the operations allowed until it
//! expires or is revoked — both take effect on the next request.
//!
//! [`ContractIndex`] answers "may this organization run this operation on
//! this product now" from memory in O(contracts of that pair), so casbin never
//! scans contracts. It is rebuilt from the database at start and updated after
//! every committed change. (One server process owns it; replicas behind one
//! PostgreSQL would each need change notification, which is not built yet.)

mod index;
pub(crate) mod model;

use sqlx::AnyConnection;

use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result};
use crate::identity::new_id;
use crate::registry::{Product, ProductState};
use crate::spec::AllowedOperations;
use crate::store::{self, Backend, now_ms};

pub use index::{Check, ContractIndex, QueryGrant};
pub use model::{
    Contract, ContractRequest, ContractState, Decision, OperationKind, OperationQuestion,
};
pub use store::contracts::{get, list};

const DAY_MS: i64 = 86_400_000;

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
    request: &ContractRequest,
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
    store::contracts::insert_requested(
        connection,
        &store::contracts::RequestedContract {
            id: &id,
            product: &product.id,
            consumer,
            provider: &product.provider_organization_id,
            plan: &request.plan_id,
            operations: &operations,
            monthly_query_quota: request.monthly_query_quota,
            duration_days: request.duration_days,
            purpose: &request.purpose,
        },
    )
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
    let operations = &contract.operations;
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
    if contract.state != needed {
        return Err(MarketError::FailedPrecondition(format!(
            "contract {id} is {}; it must be {} to be {kind}",
            contract.state.name(),
            needed.name()
        )));
    }
    let now = now_ms();
    let expires_at = (decision == Decision::Approve).then(|| now + contract.duration_days * DAY_MS);
    if !store::contracts::save_decision(connection, id, (needed, next), now, expires_at, reason)
        .await?
    {
        return Err(MarketError::FailedPrecondition(format!(
            "contract {id} was decided by someone else just now; read it again"
        )));
    }
    let contract = get(connection, id).await?;
    audit(connection, backend, &contract, kind, actor).await?;
    Ok(contract)
}
