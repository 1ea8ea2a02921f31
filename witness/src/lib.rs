//! An independent witness for a transparency log (C2SP tlog-witness).
//!
//! The witness keeps, per log origin, the last checkpoint it cosigned, in a
//! file of its own ([`State`]). It cosigns a new checkpoint only when the
//! log's key signed it and a consistency proof shows it extends that one, so
//! a log operator who rewrites history and re-signs it cannot obtain a
//! cosignature for the rewritten tree. Checking and recording happen under
//! one lock, so two concurrent requests cannot roll the record back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State as AxumState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use civicgrid_tlog::checkpoint::{Checkpoint, NoteVerifier, split_note};
use civicgrid_tlog::cosignature::CosignatureSigner;
use civicgrid_tlog::witness::{AddCheckpoint, Cosigned, MAX_REQUEST_BYTES, Refusal};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// Why the witness's state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read, written or renamed.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Which file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A stored checkpoint does not parse (the file was damaged or edited).
    #[error("{path} does not hold a checkpoint: {message}")]
    Damaged {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The last checkpoint cosigned per log, one file per origin under a
/// folder; each update is written to a new file, flushed and renamed over
/// the old one, so a crash leaves the old or the new record, never half.
#[derive(Debug)]
pub struct State {
    folder: PathBuf,
}

impl State {
    /// The state kept in `folder` (created if missing).
    ///
    /// # Errors
    /// [`StateError::Io`] when the folder cannot be created.
    pub fn open(folder: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(folder).map_err(|source| StateError::Io {
            context: "creating",
            path: folder.to_owned(),
            source,
        })?;
        Ok(Self {
            folder: folder.to_owned(),
        })
    }

    fn path(&self, origin: &str) -> PathBuf {
        let digest = Sha256::digest(origin.as_bytes());
        self.folder
            .join(format!("{}.checkpoint", hex::encode(digest)))
    }

    /// The checkpoint last cosigned for `origin`, if any.
    ///
    /// # Errors
    /// [`StateError`] when the record cannot be read or is damaged.
    pub fn latest(&self, origin: &str) -> Result<Option<Cosigned>, StateError> {
        let path = self.path(origin);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    context: "reading",
                    path,
                    source,
                });
            }
        };
        let damaged = |message: String| StateError::Damaged {
            path: path.clone(),
            message,
        };
        // Only the checkpoint matters here; the signature lines kept with it
        // were checked when it was cosigned (and may include lines a relay
        // added that a stricter parser would refuse).
        let body = text
            .split_once("\n\n")
            .map(|(body, _)| format!("{body}\n"))
            .ok_or_else(|| damaged("no blank line after the checkpoint".to_owned()))?;
        let checkpoint = Checkpoint::parse_body(&body).map_err(|e| damaged(e.to_string()))?;
        if checkpoint.origin != origin {
            return Err(damaged(format!("it is for log {:?}", checkpoint.origin)));
        }
        Ok(Some(Cosigned {
            size: checkpoint.size,
            root: checkpoint.root,
        }))
    }

    /// Records `note` (already checked) as the latest for `origin`.
    ///
    /// # Errors
    /// [`StateError::Io`] when it cannot be written durably.
    pub fn record(&self, origin: &str, note: &str) -> Result<(), StateError> {
        use std::io::Write as _;
        let path = self.path(origin);
        let partial = path.with_extension("partial");
        let io = |context: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io {
                context,
                path,
                source,
            }
        };
        let mut file = std::fs::File::create(&partial).map_err(io("creating", &partial))?;
        file.write_all(note.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io("writing", &partial))?;
        std::fs::rename(&partial, &path).map_err(io("renaming", &partial))?;
        std::fs::File::open(&self.folder)
            .and_then(|folder| folder.sync_all())
            .map_err(io("syncing", &self.folder))?;
        Ok(())
    }

    /// Keeps a fork: the checkpoint `note` the log signed for a size whose
    /// other tree this witness cosigned. With the note on record, the two
    /// signed notes prove the log showed two histories.
    fn keep_evidence(&self, origin: &str, note: &str) {
        let recorded = std::fs::read_to_string(self.path(origin)).unwrap_or_default();
        let evidence = format!(
            "the checkpoint this witness cosigned:\n{recorded}\nanother checkpoint the log signed for the same size:\n{note}"
        );
        // Named by the checkpoint, not the whole note: signature lines of
        // unknown keys, which anyone can add, do not make another file.
        let body = note.split_once("\n\n").map_or(note, |(body, _)| body);
        let digest = hex::encode(Sha256::digest(body.as_bytes()));
        let folder = self.folder.join("evidence");
        let path = folder.join(format!("{digest}.txt"));
        let written =
            std::fs::create_dir_all(&folder).and_then(|()| std::fs::write(&path, evidence));
        if let Err(error) = written {
            tracing::error!(origin, path = %path.display(), %error, "could not keep the evidence");
        }
    }
}

/// The witness: its cosigning key, the log keys it trusts by origin, and its
/// state.
pub struct Witness {
    signer: CosignatureSigner,
    logs: HashMap<String, Vec<NoteVerifier>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witness")
            .field("signer", &self.signer)
            .field("logs", &self.logs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What `add-checkpoint` answers: cosignature lines, or a refusal.
pub type Answer = Result<String, Refusal>;

impl Witness {
    /// A witness cosigning with `signer` for the logs whose keys are in
    /// `logs` (each key's name is its log's origin).
    #[must_use]
    pub fn new(signer: CosignatureSigner, logs: Vec<NoteVerifier>, state: State) -> Self {
        let mut by_origin: HashMap<String, Vec<NoteVerifier>> = HashMap::new();
        for key in logs {
            by_origin
                .entry(key.name().to_owned())
                .or_default()
                .push(key);
        }
        Self {
            signer,
            logs: by_origin,
            state: Mutex::new(state),
        }
    }

    /// Handles one `add-checkpoint` body at time `now` (POSIX seconds).
    ///
    /// # Errors
    /// [`StateError`] when the record cannot be read or written; nothing is
    /// cosigned then.
    pub async fn add_checkpoint(&self, body: &str, now: u64) -> Result<Answer, StateError> {
        let request = match AddCheckpoint::parse(body) {
            Ok(request) => request,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let origin = match request.origin() {
            Ok(origin) => origin,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let trusted = self.logs.get(&origin).map_or(&[][..], Vec::as_slice);
        // Signatures are checked before the lock: a flood of forged notes
        // must not hold up the log's own submissions.
        let checkpoint = match request.verify(trusted) {
            Ok(checkpoint) => checkpoint,
            Err(refusal) => {
                tracing::info!(origin, %refusal, "not cosigned");
                return Ok(Err(refusal));
            }
        };
        let state = self.state.lock().await;
        let latest = state.latest(&origin)?;
        if let Err(refusal) = request.extends(&checkpoint, latest) {
            match refusal {
                // Two signed trees of one size: the log's own signatures
                // prove it forked, whoever sent them.
                Refusal::Fork { .. } => {
                    tracing::error!(origin, %refusal, "the log signed two trees of the same size");
                    state.keep_evidence(&origin, &request.note);
                }
                // The proof is not signed: anyone can send a bad one, so a
                // failure is not evidence against the log.
                _ => tracing::warn!(origin, %refusal, "not cosigned"),
            }
            return Ok(Err(refusal));
        }
        if latest.is_none_or(|latest| latest.size != checkpoint.size) {
            state.record(&origin, &request.note)?;
        }
        drop(state);
        tracing::info!(origin, size = checkpoint.size, "cosigned");
        let (note_body, _) = split_note(&request.note).map_err(|e| StateError::Damaged {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        Ok(Ok(self.signer.cosign(&note_body, now)))
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

async fn add_checkpoint(AxumState(witness): AxumState<Arc<Witness>>, body: Bytes) -> Response {
    let Ok(body) = std::str::from_utf8(&body) else {
        return (StatusCode::BAD_REQUEST, "the body is not UTF-8\n").into_response();
    };
    match witness.add_checkpoint(body, now()).await {
        Ok(Ok(cosignature)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            cosignature,
        )
            .into_response(),
        Ok(Err(Refusal::Conflict { latest } | Refusal::Fork { latest })) => (
            StatusCode::CONFLICT,
            [(header::CONTENT_TYPE, "text/x.tlog.size")],
            format!("{latest}\n"),
        )
            .into_response(),
        Ok(Err(refusal)) => {
            let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
            (status, format!("{refusal}\n")).into_response()
        }
        Err(error) => {
            tracing::error!(%error, "the witness's state is unusable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the witness cannot record checkpoints now\n",
            )
                .into_response()
        }
    }
}

/// The witness's HTTP interface: `POST /add-checkpoint` and `GET /healthz`.
pub fn router(witness: Arc<Witness>) -> Router {
    Router::new()
        .route("/add-checkpoint", post(add_checkpoint))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(witness)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use civicgrid_tlog::checkpoint::NoteSigner;
    use civicgrid_tlog::merkle::{Hash, consistency_proof_ranges, leaf_hash, root_of};
    use ed25519_dalek::SigningKey;
    use tower::ServiceExt as _;

    use super::*;

    const ORIGIN: &str = "audit.civicgrid.test";

    fn log() -> NoteSigner {
        NoteSigner::new(ORIGIN, SigningKey::from_bytes(&[7u8; 32]))
    }

    fn witness(folder: &Path) -> Witness {
        let signer =
            CosignatureSigner::new("witness.test/w1", SigningKey::from_bytes(&[3u8; 32])).unwrap();
        Witness::new(signer, vec![log().verifier()], State::open(folder).unwrap())
    }

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    fn request(all: &[Hash], old: u64, size: u64) -> String {
        let proof = if old == 0 || old == size {
            vec![]
        } else {
            consistency_proof_ranges(old, size)
                .into_iter()
                .map(|r| root_of(&all[r.start as usize..r.end as usize]))
                .collect()
        };
        AddCheckpoint {
            old_size: old,
            proof,
            note: log().sign(&Checkpoint {
                origin: ORIGIN.into(),
                size,
                root: root_of(&all[..size as usize]),
            }),
        }
        .encode()
    }

    #[tokio::test]
    async fn what_was_cosigned_survives_a_restart_and_rollback_is_refused() {
        let folder = tempfile::tempdir().unwrap();
        let all = leaves(20);
        let first = witness(folder.path());
        let line = first
            .add_checkpoint(&request(&all, 0, 8), 100)
            .await
            .unwrap()
            .unwrap();
        assert!(line.starts_with("\u{2014} witness.test/w1 "), "{line}");
        let cosigned = format!(
            "{}{line}",
            log().sign(&Checkpoint {
                origin: ORIGIN.into(),
                size: 8,
                root: root_of(&all[..8]),
            })
        );
        assert_eq!(first.signer.verifier().verify(&cosigned), Ok(100));
        drop(first);

        let restarted = witness(folder.path());
        // A log that forgot what the witness saw is told the size.
        assert_eq!(
            restarted
                .add_checkpoint(&request(&all, 0, 12), 101)
                .await
                .unwrap(),
            Err(Refusal::Conflict { latest: 8 })
        );
        assert!(
            restarted
                .add_checkpoint(&request(&all, 8, 12), 102)
                .await
                .unwrap()
                .is_ok()
        );
        // A request prepared against the older state (a concurrent one, or a
        // replay) cannot roll the record back to 8 or to 10.
        assert_eq!(
            restarted
                .add_checkpoint(&request(&all, 8, 10), 103)
                .await
                .unwrap(),
            Err(Refusal::Conflict { latest: 12 })
        );
        assert_eq!(
            restarted
                .state
                .lock()
                .await
                .latest(ORIGIN)
                .unwrap()
                .unwrap()
                .size,
            12
        );
    }

    #[tokio::test]
    async fn a_bad_proof_is_refused_without_evidence_and_a_fork_is_kept() {
        let folder = tempfile::tempdir().unwrap();
        let all = leaves(10);
        let witness = witness(folder.path());
        witness
            .add_checkpoint(&request(&all, 0, 6), 1)
            .await
            .unwrap()
            .unwrap();
        // Anyone can post the log's signed checkpoint with a made-up proof:
        // refused, and not held against the log (nor filling the disk).
        for i in 0..100u8 {
            let forged = AddCheckpoint {
                old_size: 6,
                proof: vec![[i; 32]],
                note: log().sign(&Checkpoint {
                    origin: ORIGIN.into(),
                    size: 10,
                    root: root_of(&all),
                }),
            }
            .encode();
            assert_eq!(
                witness.add_checkpoint(&forged, 2).await.unwrap(),
                Err(Refusal::Inconsistent { old_size: 6 })
            );
        }
        assert!(!folder.path().join("evidence").exists());
        let latest = witness.state.lock().await.latest(ORIGIN).unwrap().unwrap();
        assert_eq!((latest.size, latest.root), (6, root_of(&all[..6])));
        // A second signed tree of size 6 is a fork, proven by the log's own
        // signatures: both notes are kept.
        let mut rewritten = all.clone();
        rewritten[2] = leaf_hash(b"rewritten");
        let fork = request(&rewritten, 6, 6);
        assert_eq!(
            witness.add_checkpoint(&fork, 3).await.unwrap(),
            Err(Refusal::Fork { latest: 6 })
        );
        // The same fork with a signature line of an unknown key added (which
        // anyone can do) is the same evidence, not another file.
        let padded = fork.replace(
            "\n\n\u{2014}",
            "\n\n\u{2014} stranger.example AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\u{2014}",
        );
        assert_ne!(padded, fork);
        assert_eq!(
            witness.add_checkpoint(&padded, 4).await.unwrap(),
            Err(Refusal::Fork { latest: 6 })
        );
        let kept: Vec<_> = std::fs::read_dir(folder.path().join("evidence"))
            .unwrap()
            .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
            .collect();
        assert_eq!(kept.len(), 1);
        let root = |leaves: &[Hash]| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(root_of(leaves))
        };
        assert!(kept[0].contains(&root(&all[..6])) && kept[0].contains(&root(&rewritten[..6])));
    }

    #[tokio::test]
    async fn a_damaged_record_stops_cosigning_instead_of_starting_over() {
        let folder = tempfile::tempdir().unwrap();
        let all = leaves(4);
        let witness = witness(folder.path());
        witness
            .add_checkpoint(&request(&all, 0, 2), 1)
            .await
            .unwrap()
            .unwrap();
        let path = witness.state.lock().await.path(ORIGIN);
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            witness.add_checkpoint(&request(&all, 0, 4), 2).await,
            Err(StateError::Damaged { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
    }

    async fn post(app: &Router, body: String) -> (StatusCode, Option<String>, String) {
        let response = app
            .clone()
            .oneshot(
                Request::post("/add-checkpoint")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let kind = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, kind, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_http_interface_gives_the_protocols_statuses() {
        let folder = tempfile::tempdir().unwrap();
        let all = leaves(9);
        let app = router(Arc::new(witness(folder.path())));
        let (status, _, body) = post(&app, request(&all, 0, 5)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, kind, body) = post(&app, request(&all, 3, 9)).await;
        assert_eq!(
            (status, kind.as_deref(), body.as_str()),
            (StatusCode::CONFLICT, Some("text/x.tlog.size"), "5\n")
        );
        let stranger = NoteSigner::new("another.log", SigningKey::from_bytes(&[9u8; 32]));
        let unknown = AddCheckpoint {
            old_size: 0,
            proof: vec![],
            note: stranger.sign(&Checkpoint {
                origin: "another.log".into(),
                size: 1,
                root: [0; 32],
            }),
        };
        assert_eq!(post(&app, unknown.encode()).await.0, StatusCode::NOT_FOUND);
        assert_eq!(
            post(&app, "old 0\n".into()).await.0,
            StatusCode::BAD_REQUEST
        );
        let mut bad_proof = request(&all, 5, 9);
        bad_proof = bad_proof.replacen(&bad_proof[6..50], &format!("{}=", "A".repeat(43)), 1);
        assert_eq!(
            post(&app, bad_proof).await.0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            post(&app, "x".repeat(MAX_REQUEST_BYTES + 1)).await.0,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
