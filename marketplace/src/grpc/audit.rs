//! The Audit service: checkpoints, entries and proofs of the log.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::Result;
use crate::market::{EntryRange, Marketplace};
use crate::proto;

use super::auth;

/// The Audit service.
#[derive(Debug, Clone)]
pub struct AuditService(pub Arc<Marketplace>);

#[tonic::async_trait]
impl proto::audit_server::Audit for AuditService {
    async fn get_checkpoint(
        &self,
        request: Request<proto::GetCheckpointRequest>,
    ) -> Result<Response<proto::Checkpoint>, Status> {
        let principal = auth::principal(&request)?;
        let signed = if request.get_ref().witnessed {
            self.0.witnessed_checkpoint(&principal).await?
        } else {
            self.0.checkpoint(&principal).await?
        };
        Ok(Response::new(proto::Checkpoint {
            note: signed.note,
            tree_size: i64::try_from(signed.checkpoint.size).unwrap_or(i64::MAX),
            root_hash: signed.checkpoint.root.to_vec(),
            origin: signed.checkpoint.origin,
            verifier_key: self.0.verifier_key(),
        }))
    }

    async fn get_entries(
        &self,
        request: Request<proto::GetEntriesRequest>,
    ) -> Result<Response<proto::GetEntriesResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let range = EntryRange {
            start: request.start,
            end: request.end,
            kind_prefix: &request.kind_prefix,
            tenant: &request.tenant,
        };
        let entries = self.0.entries(&principal, &range).await?;
        Ok(Response::new(proto::GetEntriesResponse {
            entries: entries
                .into_iter()
                .map(|entry| proto::AuditEntry {
                    index: i64::try_from(entry.index).unwrap_or(i64::MAX),
                    body: entry.body,
                })
                .collect(),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<proto::GetInclusionProofRequest>,
    ) -> Result<Response<proto::InclusionProof>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let (leaf, path) = self
            .0
            .inclusion_proof(&principal, request.index, request.tree_size)
            .await?;
        Ok(Response::new(proto::InclusionProof {
            index: request.index,
            tree_size: request.tree_size,
            leaf_hash: leaf.to_vec(),
            path: path.iter().map(|hash| hash.to_vec()).collect(),
        }))
    }

    async fn get_receipt(
        &self,
        request: Request<proto::GetReceiptRequest>,
    ) -> Result<Response<proto::Receipt>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let receipt = self
            .0
            .receipt(&principal, request.entry_index, request.witnessed)
            .await?;
        Ok(Response::new(super::convert::receipt_to_proto(receipt)))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<proto::GetConsistencyProofRequest>,
    ) -> Result<Response<proto::ConsistencyProof>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let path = self
            .0
            .consistency_proof(&principal, request.old_size, request.new_size)
            .await?;
        Ok(Response::new(proto::ConsistencyProof {
            old_size: request.old_size,
            new_size: request.new_size,
            path: path.iter().map(|hash| hash.to_vec()).collect(),
        }))
    }
}
