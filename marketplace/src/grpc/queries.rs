//! The Queries service: running queries and reading usage.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::error::{MarketError, Result};
use crate::identity::OrganizationKind;
use crate::proto;
use crate::queries::{self, UsageView};

use crate::market::Marketplace;

use super::auth;

/// The Queries service.
#[derive(Debug, Clone)]
pub struct QueriesService(pub Arc<Marketplace>);

type ResultStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = std::result::Result<proto::RunQueryResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl proto::queries_server::Queries for QueriesService {
    type RunQueryStream = ResultStream;

    async fn run_query(
        &self,
        request: Request<proto::RunQueryRequest>,
    ) -> Result<Response<Self::RunQueryStream>, Status> {
        let principal = auth::principal(&request)?;
        let engine = Arc::clone(self.0.engine()?);
        let market: Arc<dyn queries::Market> = Arc::clone(&self.0) as _;
        let request = request.into_inner();
        // Its own task: a client that hangs up mid-query must not stop it
        // between its hold and its settlement, which would leave the hold
        // (and the query `running`) until the next restart.
        let outcome = tokio::spawn(
            async move { queries::run(&market, &engine, &principal, request).await }
                .in_current_span(),
        )
        .await
        .map_err(|error| MarketError::Corrupt(format!("query task: {error}")))??;
        if let Some((kind, message)) = outcome.error {
            return Err(MarketError::Unanswered {
                query_id: outcome.summary.query_id,
                kind,
                message,
            }
            .into());
        }
        let mut messages =
            Vec::with_capacity(1 + outcome.result.len() / queries::RESULT_CHUNK_BYTES + 1);
        messages.push(Ok(proto::RunQueryResponse {
            message: Some(proto::run_query_response::Message::Summary(outcome.summary)),
        }));
        for chunk in outcome.result.chunks(queries::RESULT_CHUNK_BYTES) {
            messages.push(Ok(proto::RunQueryResponse {
                message: Some(proto::run_query_response::Message::ArrowIpc(chunk.to_vec())),
            }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn list_usage(
        &self,
        request: Request<proto::ListUsageRequest>,
    ) -> Result<Response<proto::ListUsageResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let organization = principal.organization.id.clone();
        let view = if self.0.cross_tenant(&principal, "usage:read").await? {
            UsageView::Everything
        } else {
            self.0
                .require(&principal, &organization, "usage:read")
                .await?;
            if !request.organization_id.is_empty() && request.organization_id != organization {
                return Err(MarketError::PermissionDenied {
                    permission: "usage:read".into(),
                    context: format!(" in tenant {}", request.organization_id),
                }
                .into());
            }
            match principal.organization.kind {
                OrganizationKind::Provider => UsageView::Provider,
                _ => UsageView::Consumer,
            }
        };
        let mut connection = self.0.store.acquire().await?;
        let queries = queries::list_usage(&mut connection, view, &organization, &request).await?;
        Ok(Response::new(proto::ListUsageResponse { queries }))
    }
}
