//! Account use cases: deposits, balances, invoices and the ledger's
//! summary, as the billing module's types.

use crate::audit::log::{self, Event};
use crate::billing::{self, Balance, Invoice, LedgerSummary};
use crate::error::{MarketError, Result};
use crate::identity::{self, OrganizationKind, Principal};
use crate::store;

use super::Marketplace;

/// A deposit into a consumer organization's account.
#[derive(Debug, Clone)]
pub struct Deposit<'a> {
    /// The consumer organization.
    pub organization_id: &'a str,
    /// Minor units (cents), positive.
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: &'a str,
    /// The payment's reference, kept in the audit entry.
    pub reference: &'a str,
}

impl Marketplace {
    /// The organization a billing read is about: the caller's own
    /// (`billing:read` there) unless a cross-tenant reader asks about
    /// another.
    async fn billed(&self, principal: &Principal, requested: &str) -> Result<String> {
        let own = &principal.organization.id;
        if requested.is_empty() || requested == own {
            self.require(principal, own, "billing:read").await?;
            return Ok(own.clone());
        }
        self.require(principal, "platform:cross-tenant", "billing:read")
            .await?;
        Ok(requested.to_owned())
    }

    /// Credits a consumer organization (`billing:deposit`, platform-wide);
    /// returns its balance in that currency.
    ///
    /// # Errors
    /// `PermissionDenied`, `NotFound`, `InvalidArgument` naming the field.
    pub async fn deposit(&self, principal: &Principal, deposit: &Deposit<'_>) -> Result<Balance> {
        self.require(principal, "platform:cross-tenant", "billing:deposit")
            .await?;
        let mut transaction = self.store.begin().await?;
        crate::store::lock_audit_head(&mut transaction).await?;
        let organization = identity::find_organization(&mut transaction, deposit.organization_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: deposit.organization_id.to_owned(),
            })?;
        if organization.kind != OrganizationKind::Consumer {
            return Err(MarketError::invalid(
                "organization_id",
                format!("{} is not a consumer organization", organization.id),
            ));
        }
        let postings =
            billing::deposit_postings(&organization.id, deposit.amount_minor, deposit.currency)?;
        store::ledger::post(
            &mut transaction,
            "deposit",
            deposit.currency,
            None,
            &postings,
        )
        .await?;
        log::append(
            &mut transaction,
            self.store.backend(),
            &[Event {
                kind: "billing.deposit".into(),
                actor: principal.user.id.clone(),
                tenant: organization.id.clone(),
                subject: organization.id.clone(),
                details: serde_json::json!({
                    "amount_minor": deposit.amount_minor,
                    "currency": deposit.currency,
                    "reference": deposit.reference,
                }),
            }],
        )
        .await?;
        let balance = store::ledger::balances(&mut transaction, &organization.id)
            .await?
            .into_iter()
            .find(|balance| balance.currency == deposit.currency)
            .unwrap_or_default();
        transaction.commit().await?;
        Ok(balance)
    }

    /// An organization's balances (see `billed` for whose).
    ///
    /// # Errors
    /// `PermissionDenied`.
    pub async fn balances(
        &self,
        principal: &Principal,
        organization_id: &str,
    ) -> Result<Vec<Balance>> {
        let organization = self.billed(principal, organization_id).await?;
        let mut connection = self.store.acquire().await?;
        store::ledger::balances(&mut connection, &organization).await
    }

    /// An organization's invoice for a month: what it was charged as a
    /// consumer, or earned as a provider.
    ///
    /// # Errors
    /// `PermissionDenied`, `NotFound`, `InvalidArgument` naming `period`.
    pub async fn invoice(
        &self,
        principal: &Principal,
        organization_id: &str,
        period: &str,
    ) -> Result<Invoice> {
        let organization = self.billed(principal, organization_id).await?;
        let mut connection = self.store.acquire().await?;
        let kind = identity::find_organization(&mut connection, &organization)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: organization.clone(),
            })?
            .kind;
        store::ledger::invoice(
            &mut connection,
            &organization,
            period,
            kind == OrganizationKind::Provider,
        )
        .await
    }

    /// The ledger's totals per currency (`billing:read`, platform-wide).
    ///
    /// # Errors
    /// `PermissionDenied`.
    pub async fn ledger_summary(&self, principal: &Principal) -> Result<LedgerSummary> {
        self.require(principal, "platform:cross-tenant", "billing:read")
            .await?;
        let mut connection = self.store.acquire().await?;
        store::ledger::summary(&mut connection).await
    }
}
