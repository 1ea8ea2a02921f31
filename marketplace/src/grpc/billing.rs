//! The Billing service: deposits, balances, invoices and the ledger.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::Result;
use crate::market::{Deposit, Marketplace};
use crate::proto;

use super::{auth, convert};

/// The Billing service.
#[derive(Debug, Clone)]
pub struct BillingService(pub Arc<Marketplace>);

#[tonic::async_trait]
impl proto::billing_server::Billing for BillingService {
    async fn deposit(
        &self,
        request: Request<proto::DepositRequest>,
    ) -> Result<Response<proto::Balance>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let deposit = Deposit {
            organization_id: &request.organization_id,
            amount_minor: request.amount_minor,
            currency: &request.currency,
            reference: &request.reference,
        };
        let balance = self.0.deposit(&principal, &deposit).await?;
        Ok(Response::new(convert::balance_to_proto(balance)))
    }

    async fn get_balance(
        &self,
        request: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::GetBalanceResponse>, Status> {
        let principal = auth::principal(&request)?;
        let balances = self
            .0
            .balances(&principal, &request.get_ref().organization_id)
            .await?;
        Ok(Response::new(proto::GetBalanceResponse {
            balances: balances
                .into_iter()
                .map(convert::balance_to_proto)
                .collect(),
        }))
    }

    async fn get_invoice(
        &self,
        request: Request<proto::GetInvoiceRequest>,
    ) -> Result<Response<proto::Invoice>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let invoice = self
            .0
            .invoice(&principal, &request.organization_id, &request.period)
            .await?;
        Ok(Response::new(convert::invoice_to_proto(invoice)))
    }

    async fn get_ledger_summary(
        &self,
        request: Request<proto::GetLedgerSummaryRequest>,
    ) -> Result<Response<proto::LedgerSummary>, Status> {
        let principal = auth::principal(&request)?;
        let summary = self.0.ledger_summary(&principal).await?;
        Ok(Response::new(convert::ledger_summary_to_proto(summary)))
    }
}
