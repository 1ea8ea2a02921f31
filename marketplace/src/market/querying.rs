//! Query use cases: running a query under a contract, and reading usage.

use std::sync::Arc;

use tracing::Instrument as _;

use crate::error::{MarketError, Result};
use crate::identity::{OrganizationKind, Principal};
use crate::queries::{self, QueryOutcome, QueryRequest, QuerySummary, UsageQuery, UsageView};

use super::Marketplace;

impl Marketplace {
    /// Runs a query for the caller (see [`queries::run`]). It runs in a
    /// task of its own: a client that hangs up mid-query must not stop it
    /// between its hold and its settlement, which would leave the hold (and
    /// the query `running`) until the next restart.
    ///
    /// # Errors
    /// `Unavailable` without a query engine; otherwise as [`queries::run`].
    pub async fn run_query(
        self: &Arc<Self>,
        principal: Principal,
        request: QueryRequest,
    ) -> Result<QueryOutcome> {
        let engine = Arc::clone(self.engine()?);
        let market: Arc<dyn queries::Market> = Arc::clone(self) as _;
        tokio::spawn(
            async move { queries::run(&market, &engine, &principal, request).await }
                .in_current_span(),
        )
        .await
        .map_err(|error| MarketError::Corrupt(format!("query task: {error}")))?
    }

    /// Queries run: the caller's organization's as a consumer, or on its
    /// products as a provider (`usage:read` there); every organization's, or
    /// one named, for cross-tenant readers.
    ///
    /// # Errors
    /// `PermissionDenied` naming the tenant asked about.
    pub async fn usage(
        &self,
        principal: &Principal,
        request: &UsageQuery,
    ) -> Result<Vec<QuerySummary>> {
        let organization = principal.organization.id.clone();
        let view = if self.cross_tenant(principal, "usage:read").await? {
            UsageView::Everything
        } else {
            self.require(principal, &organization, "usage:read").await?;
            if !request.organization_id.is_empty() && request.organization_id != organization {
                return Err(MarketError::PermissionDenied {
                    permission: "usage:read".into(),
                    context: format!(" in tenant {}", request.organization_id),
                });
            }
            match principal.organization.kind {
                OrganizationKind::Provider => UsageView::Provider,
                _ => UsageView::Consumer,
            }
        };
        let mut connection = self.store.acquire().await?;
        queries::list_usage(&mut connection, view, &organization, request).await
    }
}
