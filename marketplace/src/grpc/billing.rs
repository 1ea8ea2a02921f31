//! The Billing service: deposits, balances, invoices and the ledger.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::audit::log::{self, Event};
use crate::billing;
use crate::error::{MarketError, Result};
use crate::identity::{self, OrganizationKind, Principal};
use crate::proto;

use crate::market::Marketplace;

use super::auth;

/// The Billing service.
#[derive(Debug, Clone)]
pub struct BillingService(pub Arc<Marketplace>);

impl BillingService {
    /// The organization a billing read is about: the caller's own unless a
    /// cross-tenant role asks about another.
    async fn subject(&self, principal: &Principal, requested: &str) -> Result<String> {
        let own = &principal.organization.id;
        if requested.is_empty() || requested == own {
            self.0.require(principal, own, "billing:read").await?;
            return Ok(own.clone());
        }
        self.0
            .require(principal, "platform:cross-tenant", "billing:read")
            .await?;
        Ok(requested.to_owned())
    }
}

#[tonic::async_trait]
impl proto::billing_server::Billing for BillingService {
    async fn deposit(
        &self,
        request: Request<proto::DepositRequest>,
    ) -> Result<Response<proto::Balance>, Status> {
        let principal = auth::principal(&request)?;
        self.0
            .require(&principal, "platform:cross-tenant", "billing:deposit")
            .await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let organization = identity::find_organization(&mut transaction, &request.organization_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: request.organization_id.clone(),
            })?;
        if organization.kind != OrganizationKind::Consumer {
            return Err(MarketError::invalid(
                "organization_id",
                format!("{} is not a consumer organization", organization.id),
            )
            .into());
        }
        billing::deposit(
            &mut transaction,
            &organization.id,
            request.amount_minor,
            &request.currency,
        )
        .await?;
        log::append(
            &mut transaction,
            self.0.store.backend(),
            &[Event {
                kind: "billing.deposit".into(),
                actor: principal.user.id.clone(),
                tenant: organization.id.clone(),
                subject: organization.id.clone(),
                details: serde_json::json!({
                    "amount_minor": request.amount_minor,
                    "currency": request.currency,
                    "reference": request.reference,
                }),
            }],
        )
        .await?;
        let balance = billing::balances(&mut transaction, &organization.id)
            .await?
            .into_iter()
            .find(|balance| balance.currency == request.currency)
            .unwrap_or_default();
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(balance))
    }

    async fn get_balance(
        &self,
        request: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::GetBalanceResponse>, Status> {
        let principal = auth::principal(&request)?;
        let organization = self
            .subject(&principal, &request.get_ref().organization_id)
            .await?;
        let mut connection = self.0.store.acquire().await?;
        let balances = billing::balances(&mut connection, &organization).await?;
        Ok(Response::new(proto::GetBalanceResponse { balances }))
    }

    async fn get_invoice(
        &self,
        request: Request<proto::GetInvoiceRequest>,
    ) -> Result<Response<proto::Invoice>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let organization = self.subject(&principal, &request.organization_id).await?;
        let mut connection = self.0.store.acquire().await?;
        let kind = identity::find_organization(&mut connection, &organization)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: organization.clone(),
            })?
            .kind;
        let invoice = billing::invoice(
            &mut connection,
            &organization,
            &request.period,
            kind == OrganizationKind::Provider,
        )
        .await?;
        Ok(Response::new(invoice))
    }

    async fn get_ledger_summary(
        &self,
        request: Request<proto::GetLedgerSummaryRequest>,
    ) -> Result<Response<proto::LedgerSummary>, Status> {
        let principal = auth::principal(&request)?;
        self.0
            .require(&principal, "platform:cross-tenant", "billing:read")
            .await?;
        let mut connection = self.0.store.acquire().await?;
        Ok(Response::new(billing::summary(&mut connection).await?))
    }
}
