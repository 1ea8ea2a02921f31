//! The Contracts service: requests, decisions and operation checks.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::audit::log::Event;
use crate::contracts::{self, Check, Decision};
use crate::error::{MarketError, Result};
use crate::proto;
use crate::registry;

use crate::market::Marketplace;

use super::auth;

/// The Contracts service.
#[derive(Debug, Clone)]
pub struct ContractsService(pub Arc<Marketplace>);

#[tonic::async_trait]
impl proto::contracts_server::Contracts for ContractsService {
    async fn request_contract(
        &self,
        request: Request<proto::RequestContractRequest>,
    ) -> Result<Response<proto::Contract>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let consumer = principal.organization.id.clone();
        self.0
            .require(&principal, &consumer, "contract:request")
            .await?;
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        let contract = contracts::request(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &consumer,
            &product,
            &request,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(contract))
    }

    async fn approve_contract(
        &self,
        request: Request<proto::ContractAction>,
    ) -> Result<Response<proto::Contract>, Status> {
        self.decide(request, Decision::Approve).await
    }

    async fn reject_contract(
        &self,
        request: Request<proto::ContractAction>,
    ) -> Result<Response<proto::Contract>, Status> {
        self.decide(request, Decision::Reject).await
    }

    async fn revoke_contract(
        &self,
        request: Request<proto::ContractAction>,
    ) -> Result<Response<proto::Contract>, Status> {
        self.decide(request, Decision::Revoke).await
    }

    async fn get_contract(
        &self,
        request: Request<proto::ContractAction>,
    ) -> Result<Response<proto::Contract>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let mut connection = self.0.store.acquire().await?;
        let contract = contracts::get(&mut connection, &request.contract_id).await?;
        let consumer_may = self
            .0
            .access
            .allows(
                &principal.user.id,
                &contract.consumer_organization_id,
                "contract:read",
            )
            .await?;
        let provider_may = self
            .0
            .access
            .allows(
                &principal.user.id,
                &contract.provider_organization_id,
                "contract:read",
            )
            .await?;
        if !consumer_may && !provider_may {
            return Err(MarketError::NotFound {
                what: "contract",
                id: request.contract_id,
            }
            .into());
        }
        Ok(Response::new(contract))
    }

    async fn list_contracts(
        &self,
        request: Request<proto::ListContractsRequest>,
    ) -> Result<Response<proto::ListContractsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let own = principal.organization.id.clone();
        self.0.require(&principal, &own, "contract:read").await?;
        // Cross-tenant readers (platform admins, regulators) see every contract.
        let everything = self
            .0
            .access
            .allows(&principal.user.id, "platform:cross-tenant", "contract:read")
            .await?;
        let mut connection = self.0.store.acquire().await?;
        let contracts = contracts::list(
            &mut connection,
            (!everything).then_some(own.as_str()),
            &request.product_id,
        )
        .await?;
        Ok(Response::new(proto::ListContractsResponse { contracts }))
    }

    async fn check_operation(
        &self,
        request: Request<proto::CheckOperationRequest>,
    ) -> Result<Response<proto::CheckOperationResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let consumer = principal.organization.id.clone();
        self.0
            .require(&principal, &consumer, "contract:check")
            .await?;
        if request.operation() == proto::OperationKind::Unspecified {
            return Err(MarketError::invalid(
                "operation",
                "set aggregate_sql, list_sql or algorithm",
            )
            .into());
        }
        let mut connection = self.0.store.acquire().await?;
        let product = registry::get(&mut connection, &request.product_id).await?;
        drop(connection);
        let check = if product.state() == proto::ProductState::Published {
            self.0
                .contracts
                .check(&consumer, &request, crate::store::now_ms())
        } else {
            Check::Denied(format!(
                "product {} is {}",
                product.id,
                registry::state_name(product.state())
            ))
        };
        let (allowed, contract_id, reason) = match check {
            Check::Allowed { contract_id } => (true, contract_id, String::new()),
            Check::Denied(reason) => (false, String::new(), reason),
        };
        self.0
            .audit(Event {
                kind: if allowed {
                    "authorization.allowed"
                } else {
                    "authorization.denied"
                }
                .into(),
                actor: principal.user.id.clone(),
                tenant: consumer.clone(),
                subject: request.product_id.clone(),
                details: serde_json::json!({
                    "operation": request.operation().as_str_name(),
                    "columns": request.columns,
                    "algorithm_sha256": request.algorithm_sha256,
                    "contract": contract_id,
                    "reason": reason,
                }),
            })
            .await?;
        Ok(Response::new(proto::CheckOperationResponse {
            allowed,
            contract_id,
            reason,
        }))
    }
}

impl ContractsService {
    async fn decide(
        &self,
        request: Request<proto::ContractAction>,
        decision: Decision,
    ) -> Result<Response<proto::Contract>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let contract = contracts::get(&mut transaction, &request.contract_id).await?;
        match decision {
            Decision::Approve | Decision::Reject => {
                self.0
                    .require(
                        &principal,
                        &contract.provider_organization_id,
                        "contract:decide",
                    )
                    .await?;
            }
            Decision::Revoke => {
                let provider = self
                    .0
                    .access
                    .allows(
                        &principal.user.id,
                        &contract.provider_organization_id,
                        "contract:revoke",
                    )
                    .await?;
                if !provider {
                    self.0
                        .require(
                            &principal,
                            &contract.consumer_organization_id,
                            "contract:revoke",
                        )
                        .await?;
                }
            }
        }
        let contract = contracts::decide(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.contract_id,
            decision,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        self.0.contracts.update(&contract);
        Ok(Response::new(contract))
    }
}
