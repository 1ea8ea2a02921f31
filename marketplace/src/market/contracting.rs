//! Contract use cases: requests, decisions, reads and operation checks.

use crate::audit::log::Event;
use crate::contracts::{self, Check, Contract, ContractRequest, Decision, OperationQuestion};
use crate::error::{MarketError, Result};
use crate::identity::Principal;
use crate::registry::{self, ProductState};

use super::Marketplace;

/// The answer to "may my organization do this on that product now".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationCheck {
    /// Whether an active contract allows it.
    pub allowed: bool,
    /// The contract that allows it (empty when denied).
    pub contract_id: String,
    /// Why not (empty when allowed).
    pub reason: String,
}

impl Marketplace {
    /// Requests a contract for the caller's organization
    /// (`contract:request` there).
    ///
    /// # Errors
    /// `PermissionDenied`, `NotFound`, `InvalidArgument` naming the field.
    pub async fn request_contract(
        &self,
        principal: &Principal,
        request: &ContractRequest,
    ) -> Result<Contract> {
        let consumer = principal.organization.id.clone();
        self.require(principal, &consumer, "contract:request")
            .await?;
        let mut transaction = self.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        let contract = contracts::request(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            &consumer,
            &product,
            request,
        )
        .await?;
        transaction.commit().await?;
        Ok(contract)
    }

    /// A contract, for either party (`contract:read` in the consumer's or
    /// the provider's organization); anyone else is told it does not exist.
    ///
    /// # Errors
    /// `NotFound`.
    pub async fn contract(&self, principal: &Principal, id: &str) -> Result<Contract> {
        let mut connection = self.store.acquire().await?;
        let contract = contracts::get(&mut connection, id).await?;
        let user = &principal.user.id;
        let consumer_may = self
            .access
            .allows(user, &contract.consumer_organization_id, "contract:read")
            .await?;
        let provider_may = self
            .access
            .allows(user, &contract.provider_organization_id, "contract:read")
            .await?;
        if !consumer_may && !provider_may {
            return Err(MarketError::NotFound {
                what: "contract",
                id: id.to_owned(),
            });
        }
        Ok(contract)
    }

    /// The caller's organization's contracts (every contract for
    /// cross-tenant readers), optionally of one product.
    ///
    /// # Errors
    /// `PermissionDenied`.
    pub async fn contracts(
        &self,
        principal: &Principal,
        product_id: &str,
    ) -> Result<Vec<Contract>> {
        let own = principal.organization.id.clone();
        self.require(principal, &own, "contract:read").await?;
        let everything = self
            .access
            .allows(&principal.user.id, "platform:cross-tenant", "contract:read")
            .await?;
        let mut connection = self.store.acquire().await?;
        contracts::list(
            &mut connection,
            (!everything).then_some(own.as_str()),
            product_id,
        )
        .await
    }

    /// Whether an active contract lets the caller's organization run
    /// `request`'s operation on a published product now; audited either way.
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument` naming `operation`, `NotFound`.
    pub async fn check_operation(
        &self,
        principal: &Principal,
        request: &OperationQuestion,
    ) -> Result<OperationCheck> {
        let consumer = principal.organization.id.clone();
        self.require(principal, &consumer, "contract:check").await?;
        let Some(operation) = request.operation else {
            return Err(MarketError::invalid(
                "operation",
                "set aggregate_sql, list_sql or algorithm",
            ));
        };
        let mut connection = self.store.acquire().await?;
        let product = registry::get(&mut connection, &request.product_id).await?;
        drop(connection);
        let check = if product.state == ProductState::Published {
            self.contracts
                .check(&consumer, request, crate::store::now_ms())
        } else {
            Check::Denied(format!(
                "product {} is {}",
                product.id,
                product.state.name()
            ))
        };
        let answer = match check {
            Check::Allowed { contract_id } => OperationCheck {
                allowed: true,
                contract_id,
                reason: String::new(),
            },
            Check::Denied(reason) => OperationCheck {
                allowed: false,
                contract_id: String::new(),
                reason,
            },
        };
        self.audit(Event {
            kind: if answer.allowed {
                "authorization.allowed"
            } else {
                "authorization.denied"
            }
            .into(),
            actor: principal.user.id.clone(),
            tenant: consumer,
            subject: request.product_id.clone(),
            details: serde_json::json!({
                "operation": operation.audit_name(),
                "columns": request.columns,
                "algorithm_sha256": request.algorithm_sha256,
                "contract": answer.contract_id,
                "reason": answer.reason,
            }),
        })
        .await?;
        Ok(answer)
    }

    /// Approves or rejects (the provider, `contract:decide`) or revokes
    /// (either party, `contract:revoke`) a contract; the contract index
    /// changes once the decision is committed.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `FailedPrecondition` for a decision
    /// the contract's state does not allow.
    pub async fn decide_contract(
        &self,
        principal: &Principal,
        contract_id: &str,
        decision: Decision,
        reason: &str,
    ) -> Result<Contract> {
        let mut transaction = self.store.begin().await?;
        let contract = contracts::get(&mut transaction, contract_id).await?;
        match decision {
            Decision::Approve | Decision::Reject => {
                self.require(
                    principal,
                    &contract.provider_organization_id,
                    "contract:decide",
                )
                .await?;
            }
            Decision::Revoke => {
                let provider = self
                    .access
                    .allows(
                        &principal.user.id,
                        &contract.provider_organization_id,
                        "contract:revoke",
                    )
                    .await?;
                if !provider {
                    self.require(
                        principal,
                        &contract.consumer_organization_id,
                        "contract:revoke",
                    )
                    .await?;
                }
            }
        }
        let contract = contracts::decide(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            contract_id,
            decision,
            reason,
        )
        .await?;
        crate::store::replicas::announce(
            &mut transaction,
            self.store.backend(),
            &crate::store::replicas::Change::Contract(contract.id.clone()),
        )
        .await?;
        transaction.commit().await?;
        self.contracts.update(&contract);
        Ok(contract)
    }
}
