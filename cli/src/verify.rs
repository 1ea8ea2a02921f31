//! What a regulator runs: check the live log against a checkpoint saved
//! earlier, trusting only the log's public key.
//!
//! 1. The latest checkpoint must carry a valid signature by the key.
//! 2. It must extend the saved one (a consistency proof), so nothing logged
//!    before was rewritten or dropped.
//! 3. Every entry is downloaded and hashed; the entries must hash to the
//!    signed root. If they do not, each entry is checked against the leaf hash
//!    the signed tree commits to at its index (an inclusion proof), which names
//!    the entries that were changed, moved or deleted.

use std::collections::HashMap;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use civicgrid_marketplace::audit::checkpoint::{Checkpoint, NoteError, NoteVerifier};
use civicgrid_marketplace::audit::cosignature::CosignatureVerifier;
use civicgrid_marketplace::audit::merkle::{self, Hash};
use civicgrid_marketplace::proto;
use civicgrid_marketplace::proto::audit_client::AuditClient;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

impl BearerToken {
    /// A token to send.
    ///
    /// # Errors
    /// A token that is not printable ASCII.
    pub fn new(token: &str) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        Ok(Self(format!("Bearer {token}").parse()?))
    }
}

/// An audit client whose calls carry a token.
pub type AuthedAuditClient = AuditClient<InterceptedService<Channel, BearerToken>>;

/// An audit client on `channel` sending `token`.
///
/// # Errors
/// A token that is not printable ASCII.
pub fn authed_client(
    channel: Channel,
    token: &str,
) -> Result<AuthedAuditClient, tonic::metadata::errors::InvalidMetadataValue> {
    Ok(AuditClient::with_interceptor(
        channel,
        BearerToken::new(token)?,
    ))
}

/// Something wrong with the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The log is smaller than the saved checkpoint: entries were dropped.
    Shrunk {
        /// Entries in the saved checkpoint.
        saved: u64,
        /// Entries now.
        now: u64,
    },
    /// The current tree does not extend the saved one: history was rewritten.
    Inconsistent {
        /// Entries in the saved checkpoint.
        saved: u64,
    },
    /// The server did not return this entry.
    Missing {
        /// Its index.
        index: u64,
    },
    /// This entry's content is not what the signed tree holds at its index.
    Changed {
        /// Its index.
        index: u64,
    },
    /// This entry's content is what the signed tree holds at another index.
    Moved {
        /// Where it is now.
        index: u64,
        /// Where the signed tree has it.
        signed_at: u64,
    },
    /// The entries do not hash to the signed root, and the server's proofs do
    /// not say where (its tree data was rewritten too).
    RootMismatch,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shrunk { saved, now } => write!(
                f,
                "the log has {now} entries but the saved checkpoint had {saved}: entries were dropped"
            ),
            Self::Inconsistent { saved } => write!(
                f,
                "the log does not extend the saved checkpoint of {saved} entries: history was rewritten"
            ),
            Self::Missing { index } => write!(f, "entry {index} is missing (dropped)"),
            Self::Changed { index } => write!(
                f,
                "entry {index} was rewritten: its content does not match the signed tree"
            ),
            Self::Moved { index, signed_at } => write!(
                f,
                "entry {index} holds the entry signed at index {signed_at} (reordered)"
            ),
            Self::RootMismatch => write!(
                f,
                "the entries do not hash to the signed root, and the server's tree data was rewritten as well"
            ),
        }
    }
}

/// The outcome of a verification.
#[derive(Clone, Debug)]
pub struct Report {
    /// The latest checkpoint, verified; what to save for next time.
    pub checkpoint: Checkpoint,
    /// Its note, byte for byte.
    pub note: String,
    /// Entries checked.
    pub entries_checked: u64,
    /// What is wrong; empty when the log is intact.
    pub findings: Vec<Finding>,
    /// Each required witness's name and when (POSIX seconds) it cosigned
    /// the checkpoint, in the order they were required.
    pub cosigned_at: Vec<(String, u64)>,
    /// With witnesses: the live log's size, and when (Unix ms) the oldest
    /// entry the witnesses have not yet seen was logged (none when they
    /// have seen them all). A log whose witnessing stalled shows here,
    /// however fresh the cosignatures of its old size are.
    pub unwitnessed: Option<(u64, i64)>,
}

/// Why verification could not be carried out at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A note (saved or served) failed its signature or format check.
    #[error("checkpoint: {0}")]
    Note(#[from] NoteError),
    /// The server refused or failed a call.
    #[error("server: {0}")]
    Rpc(#[from] tonic::Status),
    /// The server sent a hash that is not 32 bytes.
    #[error("the server sent a malformed hash")]
    MalformedHash,
    /// A required witness's cosignature is missing or does not verify.
    #[error("witness {witness}: {error}")]
    NotWitnessed {
        /// The witness's name.
        witness: String,
        /// What is wrong with its cosignature.
        error: NoteError,
    },
}

fn hash(bytes: &[u8]) -> Result<Hash, VerifyError> {
    bytes.try_into().map_err(|_| VerifyError::MalformedHash)
}

/// Verifies the live log. `saved_note` is a checkpoint note saved earlier (or
/// none on the first run).
///
/// # Errors
/// [`VerifyError`] when the check cannot be done; problems found in the log
/// are [`Report::findings`].
pub async fn verify_log(
    client: &mut AuthedAuditClient,
    key: &NoteVerifier,
    origin: &str,
    saved_note: Option<&str>,
) -> Result<Report, VerifyError> {
    verify_log_witnessed(client, key, origin, saved_note, &[]).await
}

/// [`verify_log`] against the newest checkpoint that each of `witnesses`
/// cosigned, instead of the live head (when `witnesses` is not empty): the
/// log's own key alone does not show that history was not rewritten and
/// re-signed; a witness that checked consistency before cosigning does.
///
/// # Errors
/// As [`verify_log`], and [`VerifyError::NotWitnessed`] when a witness's
/// cosignature is missing or invalid.
pub async fn verify_log_witnessed(
    client: &mut AuthedAuditClient,
    key: &NoteVerifier,
    origin: &str,
    saved_note: Option<&str>,
    witnesses: &[CosignatureVerifier],
) -> Result<Report, VerifyError> {
    let latest = client
        .get_checkpoint(proto::GetCheckpointRequest {
            witnessed: !witnesses.is_empty(),
        })
        .await?
        .into_inner();
    let checkpoint = key.verify(&latest.note, origin)?;
    let cosigned_at = cosignatures(&latest.note, witnesses)
        .map_err(|(witness, error)| VerifyError::NotWitnessed { witness, error })?;
    let mut findings = Vec::new();
    let unwitnessed = if witnesses.is_empty() {
        None
    } else {
        live_beyond(client, key, origin, &checkpoint, &mut findings).await?
    };
    if let Some(saved_note) = saved_note {
        let saved = key.verify(saved_note, origin)?;
        findings.extend(extends(client, &saved, &checkpoint).await?);
    }
    // Download every entry of the signed tree.
    let size = checkpoint.size;
    let mut bodies: HashMap<u64, Vec<u8>> = HashMap::with_capacity(size as usize);
    let mut start = 0u64;
    while start < size {
        let end = (start + civicgrid_marketplace::audit::MAX_ENTRIES_PER_CALL).min(size);
        let page = client
            .get_entries(proto::GetEntriesRequest {
                start: start as i64,
                end: end as i64,
                ..Default::default()
            })
            .await?
            .into_inner();
        for entry in page.entries {
            bodies.insert(entry.index as u64, entry.body);
        }
        start = end;
    }
    let leaves: Vec<Option<Hash>> = (0..size)
        .map(|i| bodies.get(&i).map(|b| merkle::leaf_hash(b)))
        .collect();
    let complete: Option<Vec<Hash>> = leaves.iter().copied().collect();
    let intact = complete
        .as_deref()
        .is_some_and(|all| merkle::root_of(all) == checkpoint.root);
    if !intact {
        findings.extend(localise(client, &checkpoint, &leaves).await?);
    }
    Ok(Report {
        checkpoint,
        note: latest.note,
        entries_checked: size,
        findings,
        cosigned_at,
        unwitnessed,
    })
}

/// Each of `witnesses`' name and the time of its valid cosignature on
/// `note`, or the first witness whose cosignature is missing or invalid.
fn cosignatures(
    note: &str,
    witnesses: &[CosignatureVerifier],
) -> Result<Vec<(String, u64)>, (String, NoteError)> {
    witnesses
        .iter()
        .map(|witness| {
            let name = witness.name().to_owned();
            match witness.verify(note) {
                Ok(time) => Ok((name, time)),
                Err(error) => Err((name, error)),
            }
        })
        .collect()
}

/// What is wrong with `new` as an extension of the earlier checkpoint
/// `old` (both verified): nothing, a shrunk log, or one whose consistency
/// proof from `old` fails (a rewritten history).
async fn extends(
    client: &mut AuthedAuditClient,
    old: &Checkpoint,
    new: &Checkpoint,
) -> Result<Option<Finding>, VerifyError> {
    if new.size < old.size {
        return Ok(Some(Finding::Shrunk {
            saved: old.size,
            now: new.size,
        }));
    }
    let path = if new.size == old.size {
        Vec::new()
    } else {
        client
            .get_consistency_proof(proto::GetConsistencyProofRequest {
                old_size: old.size as i64,
                new_size: new.size as i64,
            })
            .await?
            .into_inner()
            .path
            .iter()
            .map(|h| hash(h))
            .collect::<Result<Vec<_>, _>>()?
    };
    let consistent =
        merkle::verify_consistency(old.size, new.size, &path, &old.root, &new.root).is_ok();
    Ok((!consistent).then_some(Finding::Inconsistent { saved: old.size }))
}

/// The live head beyond the witnessed `checkpoint`: it must extend it (a
/// consistency proof; otherwise a finding), and the oldest entry after it
/// tells how long the witnesses have not seen the log grow.
async fn live_beyond(
    client: &mut AuthedAuditClient,
    key: &NoteVerifier,
    origin: &str,
    witnessed: &Checkpoint,
    findings: &mut Vec<Finding>,
) -> Result<Option<(u64, i64)>, VerifyError> {
    let live = client
        .get_checkpoint(proto::GetCheckpointRequest::default())
        .await?
        .into_inner();
    let live = key.verify(&live.note, origin)?;
    if let Some(finding) = extends(client, witnessed, &live).await? {
        findings.push(finding);
        return Ok(None);
    }
    if live.size == witnessed.size {
        return Ok(None);
    }
    // The first unwitnessed entry's time, from an entry proven to be the
    // one the signed live tree holds at that index: a server cannot make a
    // stalled witnessing look recent with a body it made up.
    let index = witnessed.size;
    let entry = client
        .get_entries(proto::GetEntriesRequest {
            start: index as i64,
            end: index as i64 + 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .entries
        .into_iter()
        .find(|entry| entry.index == index as i64);
    let Some(entry) = entry else {
        findings.push(Finding::Missing { index });
        return Ok(None);
    };
    let proof = client
        .get_inclusion_proof(proto::GetInclusionProofRequest {
            index: index as i64,
            tree_size: live.size as i64,
        })
        .await?
        .into_inner();
    let path = proof
        .path
        .iter()
        .map(|h| hash(h))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = merkle::leaf_hash(&entry.body);
    if merkle::verify_inclusion(index, live.size, &leaf, &path, &live.root).is_err() {
        findings.push(Finding::Changed { index });
        return Ok(None);
    }
    let logged_at = serde_json::from_slice::<serde_json::Value>(&entry.body)
        .ok()
        .and_then(|entry| entry["at_unix_ms"].as_i64())
        .unwrap_or(0);
    Ok(Some((live.size, logged_at)))
}

/// Names the entries that differ from the signed tree, using the leaf hash
/// the tree commits to at each index (authenticated by an inclusion proof).
async fn localise(
    client: &mut AuthedAuditClient,
    checkpoint: &Checkpoint,
    leaves: &[Option<Hash>],
) -> Result<Vec<Finding>, VerifyError> {
    let mut signed = Vec::with_capacity(leaves.len());
    for index in 0..checkpoint.size {
        let proof = client
            .get_inclusion_proof(proto::GetInclusionProofRequest {
                index: index as i64,
                tree_size: checkpoint.size as i64,
            })
            .await?
            .into_inner();
        let leaf = hash(&proof.leaf_hash)?;
        let path = proof
            .path
            .iter()
            .map(|h| hash(h))
            .collect::<Result<Vec<_>, _>>()?;
        if merkle::verify_inclusion(index, checkpoint.size, &leaf, &path, &checkpoint.root).is_err()
        {
            return Ok(vec![Finding::RootMismatch]);
        }
        signed.push(leaf);
    }
    let position: HashMap<Hash, u64> = signed
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, i as u64))
        .collect();
    let mut findings = Vec::new();
    for (index, (leaf, signed_leaf)) in leaves.iter().zip(&signed).enumerate() {
        let index = index as u64;
        match leaf {
            None => findings.push(Finding::Missing { index }),
            Some(leaf) if leaf == signed_leaf => {}
            Some(leaf) => match position.get(leaf) {
                Some(&signed_at) => findings.push(Finding::Moved { index, signed_at }),
                None => findings.push(Finding::Changed { index }),
            },
        }
    }
    if findings.is_empty() {
        findings.push(Finding::RootMismatch);
    }
    Ok(findings)
}

/// A receipt that checked out: the entry, where it is, and the checkpoint
/// whose signed tree holds it.
#[derive(Clone, Debug)]
pub struct VerifiedReceipt {
    /// The entry's index.
    pub index: u64,
    /// The entry, parsed (canonical JSON).
    pub entry: serde_json::Value,
    /// The checkpoint the proof is against.
    pub checkpoint: Checkpoint,
    /// Each required witness's name and cosignature time (POSIX seconds).
    pub cosigned_at: Vec<(String, u64)>,
}

/// Why a receipt does not check out.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The checkpoint's signature or format.
    #[error("checkpoint: {0}")]
    Note(#[from] NoteError),
    /// A required witness did not cosign it.
    #[error("witness {witness}: {error}")]
    NotWitnessed {
        /// The witness's name.
        witness: String,
        /// What is wrong with its cosignature.
        error: NoteError,
    },
    /// A proof hash is not 32 bytes.
    #[error("the receipt holds a malformed hash")]
    MalformedHash,
    /// The entry is not in the signed tree at its index: it, its index or
    /// the proof was altered.
    #[error("entry {index} is not in the signed tree of {size} entries")]
    NotIncluded {
        /// The index the receipt claims.
        index: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// The entry is not JSON (the log never writes such entries).
    #[error("the entry is not a JSON object")]
    NotAnEntry,
}

/// Checks a receipt offline: the checkpoint is signed by `key` for
/// `origin` (and cosigned by each of `witnesses`), and the entry's leaf
/// hash is in its tree at the receipt's index.
///
/// # Errors
/// [`ReceiptError`] saying which check failed.
pub fn verify_receipt(
    receipt: &proto::Receipt,
    key: &NoteVerifier,
    origin: &str,
    witnesses: &[CosignatureVerifier],
) -> Result<VerifiedReceipt, ReceiptError> {
    let checkpoint = key.verify(&receipt.checkpoint, origin)?;
    let cosigned_at = cosignatures(&receipt.checkpoint, witnesses)
        .map_err(|(witness, error)| ReceiptError::NotWitnessed { witness, error })?;
    let index = u64::try_from(receipt.entry_index).map_err(|_| ReceiptError::NotIncluded {
        index: 0,
        size: checkpoint.size,
    })?;
    let path = receipt
        .inclusion_path
        .iter()
        .map(|h| Hash::try_from(h.as_slice()).map_err(|_| ReceiptError::MalformedHash))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = merkle::leaf_hash(&receipt.entry);
    merkle::verify_inclusion(index, checkpoint.size, &leaf, &path, &checkpoint.root).map_err(
        |_| ReceiptError::NotIncluded {
            index,
            size: checkpoint.size,
        },
    )?;
    let entry: serde_json::Value =
        serde_json::from_slice(&receipt.entry).map_err(|_| ReceiptError::NotAnEntry)?;
    if !entry.is_object() {
        return Err(ReceiptError::NotAnEntry);
    }
    Ok(VerifiedReceipt {
        index,
        entry,
        checkpoint,
        cosigned_at,
    })
}

/// Whether the receipt's entry (at `index`) records the query `summary`
/// describes: its index, query id, product and charge.
#[must_use]
pub fn entry_records_query(entry: &[u8], index: i64, summary: &proto::QuerySummary) -> bool {
    let Ok(entry) = serde_json::from_slice::<serde_json::Value>(entry) else {
        return false;
    };
    let details = &entry["details"];
    index == summary.audit_index
        && entry["kind"]
            .as_str()
            .is_some_and(|kind| kind.starts_with("query."))
        && details["query"].as_str() == Some(summary.query_id.as_str())
        && entry["subject"].as_str() == Some(summary.product_id.as_str())
        && details["charge_minor"].as_i64() == Some(summary.charge_minor)
}

/// Whether `result` (the Arrow IPC bytes a query returned) is the result
/// its audit entry records: the entry's `details.result_sha256`.
#[must_use]
pub fn result_matches_entry(entry: &[u8], result: &[u8]) -> bool {
    let Ok(entry) = serde_json::from_slice::<serde_json::Value>(entry) else {
        return false;
    };
    entry["details"]["result_sha256"].as_str()
        == Some(civicgrid_marketplace::audit::sha256_hex(result).as_str())
}
