//! The Contracts service: requests, decisions and operation checks.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::contracts::Decision;
use crate::error::Result;
use crate::proto;

use crate::market::Marketplace;

use super::{auth, convert};

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
        let request = convert::contract_request_from_proto(request.into_inner());
        let contract = self.0.request_contract(&principal, &request).await?;
        Ok(Response::new(convert::contract_to_proto(contract)))
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
        let contract = self
            .0
            .contract(&principal, &request.into_inner().contract_id)
            .await?;
        Ok(Response::new(convert::contract_to_proto(contract)))
    }

    async fn list_contracts(
        &self,
        request: Request<proto::ListContractsRequest>,
    ) -> Result<Response<proto::ListContractsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let contracts = self
            .0
            .contracts(&principal, &request.into_inner().product_id)
            .await?;
        Ok(Response::new(proto::ListContractsResponse {
            contracts: contracts
                .into_iter()
                .map(convert::contract_to_proto)
                .collect(),
        }))
    }

    async fn check_operation(
        &self,
        request: Request<proto::CheckOperationRequest>,
    ) -> Result<Response<proto::CheckOperationResponse>, Status> {
        let principal = auth::principal(&request)?;
        let question = convert::operation_question_from_proto(request.into_inner());
        let check = self.0.check_operation(&principal, &question).await?;
        Ok(Response::new(proto::CheckOperationResponse {
            allowed: check.allowed,
            contract_id: check.contract_id,
            reason: check.reason,
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
        let contract = self
            .0
            .decide_contract(&principal, &request.contract_id, decision, &request.reason)
            .await?;
        Ok(Response::new(convert::contract_to_proto(contract)))
    }
}
