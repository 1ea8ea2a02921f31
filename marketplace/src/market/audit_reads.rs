//! Audit-log reads for regulators and platform admins (`audit:read`,
//! platform-wide): the signed checkpoint, entries, and the proofs a
//! verifier checks them with.

use crate::audit::MAX_ENTRIES_PER_CALL;
use crate::audit::checkpoint::Checkpoint;
use crate::audit::log::{self, StoredEntry};
use crate::audit::merkle::Hash;
use crate::error::{MarketError, Result};
use crate::identity::Principal;

use super::Marketplace;

/// The log's latest checkpoint, signed.
#[derive(Debug, Clone)]
pub struct SignedCheckpoint {
    /// The checkpoint: origin, size and root.
    pub checkpoint: Checkpoint,
    /// Its signed note (C2SP tlog-checkpoint).
    pub note: String,
}

/// Which entries to read: `[start, end)`, optionally of one kind prefix
/// and one tenant.
#[derive(Debug, Clone)]
pub struct EntryRange<'a> {
    /// First index; not negative.
    pub start: i64,
    /// One past the last index; not below `start`.
    pub end: i64,
    /// Only kinds starting with this (empty: every kind).
    pub kind_prefix: &'a str,
    /// Only this tenant's (empty: every tenant).
    pub tenant: &'a str,
}

impl Marketplace {
    async fn require_audit_reader(&self, principal: &Principal) -> Result<()> {
        self.require(principal, "platform:cross-tenant", "audit:read")
            .await
    }

    /// The latest checkpoint, signed by the log's key.
    ///
    /// # Errors
    /// `PermissionDenied`.
    pub async fn checkpoint(&self, principal: &Principal) -> Result<SignedCheckpoint> {
        self.require_audit_reader(principal).await?;
        let mut connection = self.store.acquire().await?;
        let head = log::head(&mut connection, self.store.backend()).await?;
        let checkpoint = Checkpoint {
            origin: self.origin().to_owned(),
            size: head.size(),
            root: head.root(),
        };
        Ok(SignedCheckpoint {
            note: self.signer.sign(&checkpoint),
            checkpoint,
        })
    }

    /// Entries of `range`, at most [`MAX_ENTRIES_PER_CALL`] at once.
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument` naming `start` or `end`.
    pub async fn entries(
        &self,
        principal: &Principal,
        range: &EntryRange<'_>,
    ) -> Result<Vec<StoredEntry>> {
        self.require_audit_reader(principal).await?;
        let start = u64::try_from(range.start)
            .map_err(|_| MarketError::invalid("start", "must not be negative"))?;
        if range.end < range.start {
            return Err(MarketError::invalid("end", "must not be below start"));
        }
        let end = u64::try_from(range.end).unwrap_or(start);
        let mut connection = self.store.acquire().await?;
        log::entries(
            &mut connection,
            start,
            end,
            range.kind_prefix,
            range.tenant,
            MAX_ENTRIES_PER_CALL,
        )
        .await
    }

    /// The leaf hash of entry `index` and its inclusion proof in the tree
    /// of `tree_size` entries.
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument` naming `index` or `tree_size`.
    pub async fn inclusion_proof(
        &self,
        principal: &Principal,
        index: i64,
        tree_size: i64,
    ) -> Result<(Hash, Vec<Hash>)> {
        self.require_audit_reader(principal).await?;
        let (Ok(index), Ok(tree_size)) = (u64::try_from(index), u64::try_from(tree_size)) else {
            return Err(MarketError::invalid(
                "index",
                "index and tree_size must not be negative",
            ));
        };
        let mut connection = self.store.acquire().await?;
        log::inclusion_proof(&mut connection, self.store.backend(), index, tree_size).await
    }

    /// The proof that the tree of `new_size` entries extends the tree of
    /// `old_size`.
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument` naming `old_size` or `new_size`.
    pub async fn consistency_proof(
        &self,
        principal: &Principal,
        old_size: i64,
        new_size: i64,
    ) -> Result<Vec<Hash>> {
        self.require_audit_reader(principal).await?;
        let (Ok(old_size), Ok(new_size)) = (u64::try_from(old_size), u64::try_from(new_size))
        else {
            return Err(MarketError::invalid(
                "old_size",
                "sizes must not be negative",
            ));
        };
        let mut connection = self.store.acquire().await?;
        log::consistency_proof(&mut connection, self.store.backend(), old_size, new_size).await
    }
}
