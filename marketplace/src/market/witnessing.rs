//! Getting the log's checkpoints cosigned by independent witnesses (C2SP
//! tlog-witness), so a rewritten history is caught by a party the operator
//! does not control, not only by a regulator who saved a checkpoint.
//!
//! Every few seconds, when the log has grown, the server signs a checkpoint
//! of its head and posts it to each witness with a consistency proof from
//! the size that witness last cosigned (learnt from its 409 answer). A note
//! cosigned by every witness is stored and served to `audit verify
//! --witness-key`. A witness that refuses is logged and counted; the log
//! goes on, and its newest cosigned checkpoint stops advancing, which the
//! `civicgrid_marketplace_audit_cosigned_tree_size` metric shows.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::checkpoint::Checkpoint;
use crate::audit::cosignature::CosignatureVerifier;
use crate::audit::log;
use crate::audit::merkle::Hash;
use crate::error::{MarketError, Result};
use civicgrid_tlog::witness::AddCheckpoint;

use super::Marketplace;

/// How long a witness may take to answer.
const WITNESS_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an unchanged head is cosigned again by default, so that a
/// cosignature's age tells a verifier how long ago the witnesses last saw
/// the log (`audit verify --max-witness-age-secs`), even when nothing is
/// logged.
pub const COSIGNATURE_REFRESH: Duration = Duration::from_secs(300);

/// A witness the log submits to: its verifier key and where it listens.
#[derive(Clone, Debug)]
pub struct WitnessEndpoint {
    /// Checks its cosignatures (signature type 0x04).
    pub verifier: CosignatureVerifier,
    /// Its submission prefix; `/add-checkpoint` is appended.
    pub url: String,
}

impl std::str::FromStr for WitnessEndpoint {
    type Err = MarketError;

    /// `<verifier key> <URL>`, as `civicgrid-witness key` prints the key.
    fn from_str(text: &str) -> Result<Self> {
        let (key, url) = text.trim().split_once(' ').ok_or_else(|| {
            MarketError::invalid("witness", "expected '<verifier key> <http(s) URL>'")
        })?;
        let verifier = key
            .parse::<CosignatureVerifier>()
            .map_err(|error| MarketError::invalid("witness", error.to_string()))?;
        let url = url.trim().trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(MarketError::invalid(
                "witness",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }
        Ok(Self {
            verifier,
            url: url.to_owned(),
        })
    }
}

/// Why a witness did not cosign this round.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("could not reach it: {0}")]
    Unreachable(String),
    #[error("it refused with {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("its answer is not a valid cosignature: {0}")]
    BadCosignature(String),
    #[error("it has cosigned a larger tree ({0} entries) than this server's head")]
    Ahead(u64),
    #[error(transparent)]
    Log(#[from] MarketError),
}

/// The largest tree every witness cosigned, and when.
#[derive(Clone, Copy)]
struct Cosigned {
    size: u64,
    at: tokio::time::Instant,
}

struct Submitter {
    endpoint: WitnessEndpoint,
    /// The size this witness last cosigned, as far as this server knows.
    known_size: u64,
}

impl Marketplace {
    /// Starts submitting checkpoints to `witnesses` every `every` when the
    /// log grew, and every `refresh` when it did not; dropping the handle
    /// does not stop it, aborting it does.
    pub fn spawn_witnessing(
        self: &Arc<Self>,
        witnesses: Vec<WitnessEndpoint>,
        every: Duration,
        refresh: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let market = Arc::clone(self);
        tokio::spawn(async move {
            let client = match reqwest::Client::builder().timeout(WITNESS_TIMEOUT).build() {
                Ok(client) => client,
                Err(error) => {
                    tracing::error!(%error, "no HTTP client for the witnesses");
                    return;
                }
            };
            let mut submitters: Vec<Submitter> = witnesses
                .into_iter()
                .map(|endpoint| Submitter {
                    endpoint,
                    known_size: 0,
                })
                .collect();
            let mut cosigned = Cosigned {
                size: 0,
                at: tokio::time::Instant::now(),
            };
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match market
                    .witness_round(&client, &mut submitters, cosigned, refresh)
                    .await
                {
                    Ok(now) => cosigned = now,
                    Err(error) => {
                        tracing::warn!(%error, "could not read the log's head to witness it")
                    }
                }
            }
        })
    }

    /// One round: when the log has grown past `cosigned` (or its
    /// cosignatures are due a refresh), gets its head cosigned by every
    /// witness and stores the note. Returns what is now cosigned by all.
    async fn witness_round(
        &self,
        client: &reqwest::Client,
        submitters: &mut [Submitter],
        cosigned: Cosigned,
        refresh: Duration,
    ) -> Result<Cosigned> {
        let head = {
            let mut connection = self.store.acquire().await?;
            log::head(&mut connection, self.store.backend()).await?
        };
        let grown = head.size() > cosigned.size;
        if head.size() == 0 || !(grown || cosigned.at.elapsed() >= refresh) {
            return Ok(cosigned);
        }
        let checkpoint = Checkpoint {
            origin: self.origin.clone(),
            size: head.size(),
            root: head.root(),
        };
        let mut note = self.signer.sign(&checkpoint);
        let mut all = true;
        for submitter in submitters.iter_mut() {
            match self.submit(client, submitter, &checkpoint, &note).await {
                Ok(lines) => note.push_str(&lines),
                Err(error) => {
                    all = false;
                    self.metrics
                        .witness_failures
                        .get_or_create(&crate::metrics::WitnessLabel {
                            witness: submitter.endpoint.verifier.name().to_owned(),
                        })
                        .inc();
                    tracing::warn!(
                        witness = submitter.endpoint.verifier.name(),
                        size = checkpoint.size,
                        %error,
                        "a witness did not cosign"
                    );
                }
            }
        }
        if !all {
            return Ok(cosigned);
        }
        crate::store::cosigned::record(self.store.pool(), checkpoint.size, &note).await?;
        self.metrics
            .audit_cosigned_tree_size
            .set(i64::try_from(checkpoint.size).unwrap_or(i64::MAX));
        Ok(Cosigned {
            size: checkpoint.size,
            at: tokio::time::Instant::now(),
        })
    }

    /// Posts `note` to one witness, learning its size on a 409 and trying
    /// again; returns its verified cosignature lines.
    async fn submit(
        &self,
        client: &reqwest::Client,
        submitter: &mut Submitter,
        checkpoint: &Checkpoint,
        note: &str,
    ) -> std::result::Result<String, Failure> {
        for _ in 0..3 {
            let old = submitter.known_size;
            if old > checkpoint.size {
                return Err(Failure::Ahead(old));
            }
            let proof: Vec<Hash> = if old == 0 || old == checkpoint.size {
                Vec::new()
            } else {
                let mut connection = self.store.acquire().await?;
                log::consistency_proof(&mut connection, self.store.backend(), old, checkpoint.size)
                    .await?
            };
            let body = AddCheckpoint {
                old_size: old,
                proof,
                note: note.to_owned(),
            }
            .encode();
            let response = client
                .post(format!("{}/add-checkpoint", submitter.endpoint.url))
                .body(body)
                .send()
                .await
                .map_err(|error| Failure::Unreachable(error.to_string()))?;
            let status = response.status().as_u16();
            let text = response
                .text()
                .await
                .map_err(|error| Failure::Unreachable(error.to_string()))?;
            match status {
                200 => {
                    let verifier = &submitter.endpoint.verifier;
                    verifier
                        .verify(&format!("{note}{text}"))
                        .map_err(|error| Failure::BadCosignature(error.to_string()))?;
                    submitter.known_size = checkpoint.size;
                    // Only this witness's lines: it may not add others'.
                    let prefix = format!("\u{2014} {} ", verifier.name());
                    return Ok(text
                        .lines()
                        .filter(|line| line.starts_with(&prefix))
                        .map(|line| format!("{line}\n"))
                        .collect());
                }
                409 => {
                    let latest = text.trim().parse::<u64>().map_err(|_| Failure::Refused {
                        status,
                        message: "409 without a tree size".into(),
                    })?;
                    if latest == old {
                        // Same size, another root: the witness saw a fork.
                        return Err(Failure::Refused {
                            status,
                            message: format!(
                                "it cosigned another tree of {latest} entries: this log forked"
                            ),
                        });
                    }
                    submitter.known_size = latest;
                }
                _ => {
                    return Err(Failure::Refused {
                        status,
                        message: text.chars().take(200).collect(),
                    });
                }
            }
        }
        Err(Failure::Refused {
            status: 409,
            message: "its size kept changing".into(),
        })
    }

    /// The newest checkpoint every configured witness cosigned.
    ///
    /// # Errors
    /// `PermissionDenied`; `FailedPrecondition` when none was cosigned yet.
    pub async fn witnessed_checkpoint(
        &self,
        principal: &crate::identity::Principal,
    ) -> Result<super::SignedCheckpoint> {
        self.require(principal, "platform:cross-tenant", "audit:read")
            .await?;
        self.cosigned_checkpoint().await
    }

    /// The newest cosigned checkpoint, for any caller already allowed it.
    pub(crate) async fn cosigned_checkpoint(&self) -> Result<super::SignedCheckpoint> {
        let note = crate::store::cosigned::latest(self.store.pool())
            .await?
            .ok_or_else(|| {
                MarketError::FailedPrecondition(
                    "no checkpoint has been cosigned yet: the server has no --witness, or its witnesses have not answered"
                        .into(),
                )
            })?;
        let checkpoint = self
            .signer
            .verifier()
            .verify(&note, &self.origin)
            .map_err(|error| MarketError::Corrupt(format!("a stored cosigned note: {error}")))?;
        Ok(super::SignedCheckpoint { checkpoint, note })
    }
}
