//! Receipts: an audit entry with a signed checkpoint and the inclusion
//! proof that puts it in the checkpoint's tree. A consumer keeps one for
//! each query (what ran, on which product version, what it returned and
//! cost); a provider for each query on its products. Both check them offline
//! with the log's verifier key alone.

use crate::audit::checkpoint::Checkpoint;
use crate::audit::log;
use crate::audit::merkle::Hash;
use crate::error::{MarketError, Result};
use crate::identity::Principal;

use super::Marketplace;

/// One entry and the proof that a signed tree holds it.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The entry's index.
    pub index: u64,
    /// Its exact bytes.
    pub entry: Vec<u8>,
    /// A signed checkpoint note of a tree holding it.
    pub checkpoint: String,
    /// The inclusion proof in that tree.
    pub path: Vec<Hash>,
}

fn not_found(index: i64) -> MarketError {
    MarketError::NotFound {
        what: "audit entry",
        id: index.to_string(),
    }
}

/// Whether the entry `body` is one `organization` may have a receipt for:
/// a query or a quality report, whose consumer (the entry's tenant) or
/// product's provider it is. Other entries of its tenant (role grants,
/// tokens, contracts) stay with those who read the log.
fn concerns(body: &[u8], organization: &str) -> bool {
    let Ok(entry) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let tenant = entry["tenant"].as_str();
    let kind = entry["kind"].as_str().unwrap_or_default();
    let provider = entry["details"]["provider"].as_str();
    (kind.starts_with("query.") || kind.starts_with("quality."))
        && (tenant == Some(organization) || provider == Some(organization))
}

impl Marketplace {
    /// The receipt for entry `index`, proved against the live head or, when
    /// `witnessed`, the newest checkpoint the witnesses cosigned.
    ///
    /// # Errors
    /// `NotFound` for an entry the caller may not see (or none at that
    /// index), `FailedPrecondition` when `witnessed` and no cosigned
    /// checkpoint covers it yet.
    pub async fn receipt(
        &self,
        principal: &Principal,
        index: i64,
        witnessed: bool,
    ) -> Result<Receipt> {
        let everything = self.cross_tenant(principal, "audit:read").await?;
        if !everything {
            self.require(principal, &principal.organization.id, "usage:read")
                .await?;
        }
        let entry = self.entry_at(index).await?;
        if !everything && !concerns(&entry.body, &principal.organization.id) {
            return Err(not_found(index));
        }
        self.prove(entry.index, entry.body, witnessed).await
    }

    /// The receipt for `index` (whose bytes are `entry`), for a caller
    /// already known to concern it.
    pub(crate) async fn prove(
        &self,
        index: u64,
        entry: Vec<u8>,
        witnessed: bool,
    ) -> Result<Receipt> {
        let (checkpoint, note) = if witnessed {
            let signed = self.cosigned_checkpoint().await?;
            (signed.checkpoint, signed.note)
        } else {
            let mut connection = self.store.acquire().await?;
            let head = log::head(&mut connection, self.store.backend()).await?;
            let checkpoint = Checkpoint {
                origin: self.origin.clone(),
                size: head.size(),
                root: head.root(),
            };
            let note = self.signer.sign(&checkpoint);
            (checkpoint, note)
        };
        if index >= checkpoint.size {
            return Err(MarketError::FailedPrecondition(format!(
                "entry {index} is not in the witnessed checkpoint of {} entries yet; try again after the next witnessing round",
                checkpoint.size
            )));
        }
        let mut connection = self.store.acquire().await?;
        let (_, path) = log::inclusion_proof(
            &mut connection,
            self.store.backend(),
            index,
            checkpoint.size,
        )
        .await?;
        Ok(Receipt {
            index,
            entry,
            checkpoint: note,
            path,
        })
    }

    /// The receipt of a query just settled by this server, entry `index`.
    ///
    /// # Errors
    /// Database failures.
    pub(crate) async fn query_receipt(&self, index: i64) -> Result<Receipt> {
        let entry = self.entry_at(index).await?;
        self.prove(entry.index, entry.body, false).await
    }

    /// Entry `index`, or `NotFound` (also for a negative index).
    async fn entry_at(&self, index: i64) -> Result<log::StoredEntry> {
        let position = u64::try_from(index).map_err(|_| not_found(index))?;
        let mut connection = self.store.acquire().await?;
        log::entries(&mut connection, position, position + 1, "", "", 1)
            .await?
            .pop()
            .ok_or_else(|| not_found(index))
    }
}

#[cfg(test)]
mod tests {
    use super::concerns;

    #[test]
    fn an_entry_concerns_its_tenant_and_a_querys_provider_only() {
        let query =
            br#"{"kind":"query.completed","tenant":"acme","details":{"provider":"city-data"}}"#;
        assert!(concerns(query, "acme"));
        assert!(concerns(query, "city-data"));
        assert!(!concerns(query, "rival"));
        let fixed =
            br#"{"kind":"quality.fixed","tenant":"acme","details":{"provider":"city-data"}}"#;
        assert!(concerns(fixed, "city-data"));
        assert!(!concerns(fixed, "rival"));
        // A provider named in another kind of entry does not make it theirs.
        let contract =
            br#"{"kind":"contract.approved","tenant":"acme","details":{"provider":"city-data"}}"#;
        assert!(!concerns(contract, "city-data"));
        assert!(!concerns(b"not json", "acme"));
    }
}
