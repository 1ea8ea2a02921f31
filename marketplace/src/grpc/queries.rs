//! The Queries service: running queries and reading usage.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::{MarketError, Result};
use crate::proto;
use crate::queries;

use crate::market::Marketplace;

use super::{auth, convert};

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
        let outcome = self
            .0
            .run_query(principal, convert::query_request(request.into_inner()))
            .await?;
        if let Some((kind, message)) = outcome.error {
            return Err(MarketError::Unanswered {
                query_id: outcome.summary.query_id,
                kind,
                message,
            }
            .into());
        }
        // The query was charged: a receipt that cannot be made now must not
        // cost its consumer the result (GetReceipt makes one later).
        let receipt = match self.0.query_receipt(outcome.summary.audit_index).await {
            Ok(receipt) => Some(convert::receipt_to_proto(receipt)),
            Err(error) => {
                tracing::warn!(query = %outcome.summary.query_id, %error, "no receipt for a settled query");
                None
            }
        };
        let mut summary = convert::query_summary(outcome.summary);
        summary.receipt = receipt;
        let mut messages =
            Vec::with_capacity(1 + outcome.result.len() / queries::RESULT_CHUNK_BYTES + 1);
        messages.push(Ok(proto::RunQueryResponse {
            message: Some(proto::run_query_response::Message::Summary(summary)),
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
        let queries = self
            .0
            .usage(&principal, &convert::usage_query(request.into_inner()))
            .await?;
        Ok(Response::new(proto::ListUsageResponse {
            queries: queries.into_iter().map(convert::query_summary).collect(),
        }))
    }
}
