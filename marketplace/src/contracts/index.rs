//! The active contracts in memory: "may this organization run this
//! operation on this product now" in O(contracts of that pair).

use std::collections::HashMap;

use sqlx::AnyConnection;

use crate::error::Result;
use crate::spec::AllowedOperations;
use crate::store;

use super::{Contract, ContractState, OperationKind, OperationQuestion};

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
        for contract in store::contracts::list(connection, None, "").await? {
            index.update(&contract);
        }
        Ok(index)
    }

    /// Takes every grant from `fresh`, an index loaded since another server
    /// changed contracts this one may not have heard of.
    pub fn replace_with(&self, fresh: Self) {
        let grants = fresh.grants.into_inner().expect("contract index lock");
        *self.grants.write().expect("contract index lock") = grants;
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
        if contract.state == ContractState::Active {
            entry.push(Grant {
                contract_id: contract.id.clone(),
                operations: contract.operations.clone(),
                expires_at: contract.expires_at_unix_ms,
                plan_id: contract.plan_id.clone(),
                monthly_query_quota: contract.monthly_query_quota,
            });
            // In one order whatever order the grants were heard in, so every
            // server runs a query under the same contract.
            entry.sort_by(|a, b| a.contract_id.cmp(&b.contract_id));
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
    pub fn check(&self, consumer: &str, request: &OperationQuestion, now: i64) -> Check {
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
            let allowed = match request.operation {
                Some(OperationKind::AggregateSql) => ops.aggregate_sql,
                Some(OperationKind::ListSql) => {
                    !request.columns.is_empty()
                        && request.columns.iter().all(|c| ops.list_columns.contains(c))
                }
                Some(OperationKind::Algorithm) => {
                    ops.algorithm_sha256.contains(&request.algorithm_sha256)
                }
                None => false,
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
            provider_organization_id: "city".into(),
            plan_id: String::new(),
            operations: ops,
            monthly_query_quota: 0,
            state: ContractState::Active,
            requested_at_unix_ms: 0,
            decided_at_unix_ms: 0,
            expires_at_unix_ms: expires_at,
            purpose: String::new(),
            reason: String::new(),
            duration_days: 1,
        }
    }

    fn ask(operation: OperationKind, columns: &[&str]) -> OperationQuestion {
        OperationQuestion {
            product_id: "population".into(),
            operation: Some(operation),
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
        revoked.state = ContractState::Revoked;
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
