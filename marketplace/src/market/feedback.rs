//! Quality feedback for consumers, providers and the catalog
//! ([`crate::feedback`]).

use crate::contracts::ContractState;
use crate::error::{MarketError, Result};
use crate::feedback::{self, NewReport, OpenByProduct, QualityReport};
use crate::identity::Principal;
use crate::registry;

use super::Marketplace;

fn not_found(id: &str) -> MarketError {
    MarketError::NotFound {
        what: "quality report",
        id: id.to_owned(),
    }
}

impl Marketplace {
    /// A consumer whose organization has or had a contract on the product
    /// reports a problem in its data (`quality:report`).
    ///
    /// # Errors
    /// `PermissionDenied` without the permission or a contract, `NotFound`
    /// for a product or query that is not there (or not the reporter's),
    /// `InvalidArgument` naming the field.
    pub async fn report_quality_issue(
        &self,
        principal: &Principal,
        request: NewReport,
    ) -> Result<QualityReport> {
        let reporter = principal.organization.id.clone();
        self.require(principal, &reporter, "quality:report").await?;
        let mut transaction = self.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        let contracted = crate::contracts::list(&mut transaction, Some(&reporter), &product.id)
            .await?
            .iter()
            .any(|contract| {
                contract.consumer_organization_id == reporter
                    && matches!(
                        contract.state,
                        ContractState::Active | ContractState::Revoked | ContractState::Expired
                    )
            });
        // A product out of the catalog is none of a stranger's business: it
        // gets the answer a missing id gets.
        if !contracted && product.state != crate::registry::ProductState::Published {
            return Err(MarketError::NotFound {
                what: "product",
                id: product.id,
            });
        }
        if !contracted {
            return Err(MarketError::denied(
                "quality:report",
                format!(
                    " on product {}: {reporter} has never held a contract on it",
                    product.id
                ),
            ));
        }
        let report = feedback::report(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            &reporter,
            &product,
            &request,
        )
        .await?;
        transaction.commit().await?;
        Ok(report)
    }

    /// The product's provider answers a report, and may mark it fixed in a
    /// version (`quality:answer`). To anyone else the report does not exist.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `InvalidArgument` naming the field,
    /// `FailedPrecondition` for a report fixed already.
    pub async fn answer_quality_report(
        &self,
        principal: &Principal,
        report_id: &str,
        message: &str,
        fixed_in_version: i64,
    ) -> Result<QualityReport> {
        let mut transaction = self.store.begin().await?;
        let report = feedback::get(&mut transaction, report_id).await?;
        let product = registry::get(&mut transaction, &report.product_id).await?;
        if product.provider_organization_id != principal.organization.id {
            return Err(not_found(report_id));
        }
        self.require(
            principal,
            &product.provider_organization_id,
            "quality:answer",
        )
        .await?;
        let report = feedback::answer(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            &product,
            report,
            message,
            fixed_in_version,
        )
        .await?;
        transaction.commit().await?;
        Ok(report)
    }

    /// The reporter's organization reopens a report marked fixed
    /// (`quality:report`). To anyone else the report does not exist.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `InvalidArgument` naming `reason`,
    /// `FailedPrecondition` for an open report.
    pub async fn reopen_quality_report(
        &self,
        principal: &Principal,
        report_id: &str,
        reason: &str,
    ) -> Result<QualityReport> {
        let mut transaction = self.store.begin().await?;
        let report = feedback::get(&mut transaction, report_id).await?;
        if report.reporter_organization_id != principal.organization.id {
            return Err(not_found(report_id));
        }
        self.require(
            principal,
            &report.reporter_organization_id,
            "quality:report",
        )
        .await?;
        let product = registry::get(&mut transaction, &report.product_id).await?;
        let report = feedback::reopen(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            &product,
            report,
            reason,
        )
        .await?;
        transaction.commit().await?;
        Ok(report)
    }

    /// Reports the caller may read (`catalog:search`): its organization's
    /// own, those on its products, or every one for platform admins and
    /// regulators; of one product when `product_id` is not empty.
    ///
    /// # Errors
    /// `PermissionDenied`.
    pub async fn quality_reports(
        &self,
        principal: &Principal,
        product_id: &str,
        open_only: bool,
    ) -> Result<Vec<QualityReport>> {
        let organization = principal.organization.id.clone();
        self.require(principal, &organization, "catalog:search")
            .await?;
        let everything = self.cross_tenant(principal, "product:read").await?;
        let viewer = if everything {
            ""
        } else {
            organization.as_str()
        };
        let mut connection = self.store.acquire().await?;
        feedback::list(&mut connection, product_id, viewer, open_only).await
    }

    /// Open reports per product, for catalog views the caller may already
    /// see.
    ///
    /// # Errors
    /// Database failures.
    pub async fn open_quality_reports(&self) -> Result<OpenByProduct> {
        let mut connection = self.store.acquire().await?;
        feedback::open_by_product(&mut connection).await
    }
}
