//! The Audit service: checkpoints, entries and proofs of the log.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::audit::checkpoint::Checkpoint as CheckpointBody;
use crate::audit::log;
use crate::error::{MarketError, Result};
use crate::proto;

use crate::audit::MAX_ENTRIES_PER_CALL;
use crate::market::Marketplace;

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
        self.0
            .require(&principal, "platform:cross-tenant", "audit:read")
            .await?;
        let mut connection = self.0.store.acquire().await?;
        let head = log::head(&mut connection, self.0.store.backend()).await?;
        let body = CheckpointBody {
            origin: self.0.origin().to_owned(),
            size: head.size(),
            root: head.root(),
        };
        Ok(Response::new(proto::Checkpoint {
            note: self.0.signer.sign(&body),
            tree_size: head.size() as i64,
            root_hash: body.root.to_vec(),
            origin: self.0.origin().to_owned(),
            verifier_key: self.0.verifier_key(),
        }))
    }

    async fn get_entries(
        &self,
        request: Request<proto::GetEntriesRequest>,
    ) -> Result<Response<proto::GetEntriesResponse>, Status> {
        let principal = auth::principal(&request)?;
        self.0
            .require(&principal, "platform:cross-tenant", "audit:read")
            .await?;
        let request = request.into_inner();
        if request.start < 0 {
            return Err(MarketError::invalid("start", "must not be negative").into());
        }
        if request.end < request.start {
            return Err(MarketError::invalid("end", "must not be below start").into());
        }
        let mut connection = self.0.store.acquire().await?;
        let entries = log::entries(
            &mut connection,
            request.start as u64,
            request.end as u64,
            &request.kind_prefix,
            &request.tenant,
            MAX_ENTRIES_PER_CALL,
        )
        .await?;
        Ok(Response::new(proto::GetEntriesResponse {
            entries: entries
                .into_iter()
                .map(|entry| proto::AuditEntry {
                    index: entry.index as i64,
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
        self.0
            .require(&principal, "platform:cross-tenant", "audit:read")
            .await?;
        let request = request.into_inner();
        if request.index < 0 || request.tree_size < 0 {
            return Err(
                MarketError::invalid("index", "index and tree_size must not be negative").into(),
            );
        }
        let mut connection = self.0.store.acquire().await?;
        let (leaf, path) = log::inclusion_proof(
            &mut connection,
            self.0.store.backend(),
            request.index as u64,
            request.tree_size as u64,
        )
        .await?;
        Ok(Response::new(proto::InclusionProof {
            index: request.index,
            tree_size: request.tree_size,
            leaf_hash: leaf.to_vec(),
            path: path.iter().map(|hash| hash.to_vec()).collect(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<proto::GetConsistencyProofRequest>,
    ) -> Result<Response<proto::ConsistencyProof>, Status> {
        let principal = auth::principal(&request)?;
        self.0
            .require(&principal, "platform:cross-tenant", "audit:read")
            .await?;
        let request = request.into_inner();
        if request.old_size < 0 || request.new_size < 0 {
            return Err(MarketError::invalid("old_size", "sizes must not be negative").into());
        }
        let mut connection = self.0.store.acquire().await?;
        let path = log::consistency_proof(
            &mut connection,
            self.0.store.backend(),
            request.old_size as u64,
            request.new_size as u64,
        )
        .await?;
        Ok(Response::new(proto::ConsistencyProof {
            old_size: request.old_size,
            new_size: request.new_size,
            path: path.iter().map(|hash| hash.to_vec()).collect(),
        }))
    }
}
