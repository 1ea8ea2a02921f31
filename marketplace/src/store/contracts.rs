//! The `contracts` table.

use prost::Message as _;
use sqlx::{AnyConnection, Row as _};

use crate::contracts::model::{Contract, ContractState};
use crate::error::{MarketError, Result};
use crate::spec::AllowedOperations;
use crate::store::now_ms;

const CONTRACT_COLUMNS: &str = "id, product_id, consumer_organization_id, provider_organization_id, plan_id, \
     operations, monthly_query_quota, state, requested_at, decided_at, expires_at, duration_days, purpose, reason";

fn contract_from_row(row: &sqlx::any::AnyRow, now: i64) -> Result<Contract> {
    let operations: Vec<u8> = row.try_get("operations")?;
    let operations = AllowedOperations::decode(operations.as_slice())
        .map_err(|error| MarketError::Corrupt(format!("stored contract operations: {error}")))?;
    let expires_at: Option<i64> = row.try_get("expires_at")?;
    let mut state = ContractState::parse(&row.try_get::<String, _>("state")?)?;
    if state == ContractState::Active && expires_at.is_some_and(|at| at <= now) {
        state = ContractState::Expired;
    }
    Ok(Contract {
        id: row.try_get("id")?,
        product_id: row.try_get("product_id")?,
        consumer_organization_id: row.try_get("consumer_organization_id")?,
        provider_organization_id: row.try_get("provider_organization_id")?,
        plan_id: row.try_get("plan_id")?,
        operations,
        monthly_query_quota: row.try_get("monthly_query_quota")?,
        state,
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

/// A contract as requested, before any decision.
pub(crate) struct RequestedContract<'a> {
    pub id: &'a str,
    pub product: &'a str,
    pub consumer: &'a str,
    pub provider: &'a str,
    pub plan: &'a str,
    pub operations: &'a AllowedOperations,
    pub monthly_query_quota: i64,
    pub duration_days: i64,
    pub purpose: &'a str,
}

/// Stores a requested contract.
pub(crate) async fn insert_requested(
    connection: &mut AnyConnection,
    contract: &RequestedContract<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO contracts (id, product_id, consumer_organization_id, provider_organization_id, plan_id, \
         operations, monthly_query_quota, state, requested_at, duration_days, purpose, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'requested', $8, $9, $10, '')",
    )
    .bind(contract.id)
    .bind(contract.product)
    .bind(contract.consumer)
    .bind(contract.provider)
    .bind(contract.plan)
    .bind(contract.operations.encode_to_vec())
    .bind(contract.monthly_query_quota)
    .bind(now_ms())
    .bind(contract.duration_days)
    .bind(contract.purpose)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Records a decision: the new state, when, the expiry an approval sets
/// (`None` keeps the stored one) and the reason.
/// Moves contract `id` from state `from` to `state`; `false` when it was no
/// longer in `from` (another decision, perhaps on another server, came
/// first).
pub(crate) async fn save_decision(
    connection: &mut AnyConnection,
    id: &str,
    (from, state): (ContractState, ContractState),
    decided_at: i64,
    expires_at: Option<i64>,
    reason: &str,
) -> Result<bool> {
    let changed = sqlx::query(
        "UPDATE contracts SET state = $1, decided_at = $2, expires_at = COALESCE($3, expires_at), reason = $4 \
         WHERE id = $5 AND state = $6",
    )
    .bind(state.name())
    .bind(decided_at)
    .bind(expires_at)
    .bind(reason)
    .bind(id)
    .bind(from.name())
    .execute(&mut *connection)
    .await?
    .rows_affected();
    Ok(changed == 1)
}
