//! The C2SP tlog-witness protocol's `add-checkpoint` request, and the checks
//! a witness makes before it cosigns.
//!
//! A log posts `old <size>\n`, up to 63 base64 consistency-proof lines, a
//! blank line and its signed checkpoint. The witness cosigns only a
//! checkpoint signed by a key it trusts for that origin that extends, by a
//! verified RFC 9162 consistency proof, the last checkpoint it cosigned for
//! that log. A log that rewrote its history can still sign a checkpoint of
//! the rewritten tree, but it cannot prove that tree consistent with what
//! the witness saw, so it gets no cosignature.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::checkpoint::{Checkpoint, NoteError, NoteVerifier, split_note};
use crate::merkle::{self, Hash};

/// Most consistency-proof lines a request may carry (a proof in a tree of
/// up to 2^63 leaves is shorter).
pub const MAX_PROOF_LINES: usize = 63;

/// Most bytes of an `add-checkpoint` body a witness reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// An `add-checkpoint` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddCheckpoint {
    /// The size of the checkpoint the log believes the witness last cosigned.
    pub old_size: u64,
    /// The consistency proof from `old_size` to the checkpoint's size.
    pub proof: Vec<Hash>,
    /// The signed checkpoint note.
    pub note: String,
}

/// The size and root a witness last cosigned for one log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cosigned {
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: Hash,
}

/// Why a witness does not cosign, with the HTTP status the protocol gives it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request is malformed (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The witness trusts no key for this origin (404).
    #[error("unknown log {0:?}")]
    UnknownLog(String),
    /// No trusted key's signature verifies (403).
    #[error("no signature by a trusted key verifies: {0}")]
    Forbidden(String),
    /// `old` is not the size the witness last cosigned (409; the body is
    /// that size).
    #[error("the witness last cosigned size {latest}")]
    Conflict {
        /// What the witness last cosigned.
        latest: u64,
    },
    /// Same size as last cosigned, other root: the log forked (409).
    #[error("the log signed two different trees of size {latest}")]
    Fork {
        /// The size both trees claim.
        latest: u64,
    },
    /// The proof does not show the checkpoint extends the one last cosigned
    /// (422).
    #[error("the consistency proof from size {old_size} does not verify")]
    Inconsistent {
        /// The size the proof starts from.
        old_size: u64,
    },
}

impl Refusal {
    /// The HTTP status code the protocol assigns.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::UnknownLog(_) => 404,
            Self::Forbidden(_) => 403,
            Self::Conflict { .. } | Self::Fork { .. } => 409,
            Self::Inconsistent { .. } => 422,
        }
    }
}

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::BadRequest(message.into())
}

impl AddCheckpoint {
    /// The request body.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut body = format!("old {}\n", self.old_size);
        for hash in &self.proof {
            body.push_str(&STANDARD.encode(hash));
            body.push('\n');
        }
        body.push('\n');
        body.push_str(&self.note);
        body
    }

    /// Parses a request body.
    ///
    /// # Errors
    /// [`Refusal::BadRequest`] saying what is wrong.
    pub fn parse(body: &str) -> Result<Self, Refusal> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(bad("the request is too large"));
        }
        let (head, note) = body
            .split_once("\n\n")
            .ok_or_else(|| bad("no blank line before the checkpoint"))?;
        let mut lines = head.split('\n');
        let old = lines
            .next()
            .and_then(|line| line.strip_prefix("old "))
            .ok_or_else(|| bad("the first line must be 'old <size>'"))?;
        if (old.len() > 1 && old.starts_with('0')) || !old.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the old size is not a decimal with no leading zeroes"));
        }
        let old_size = old
            .parse::<u64>()
            .map_err(|_| bad("the old size is not a decimal number"))?;
        let mut proof = Vec::new();
        for line in lines {
            if proof.len() == MAX_PROOF_LINES {
                return Err(bad("more than 63 consistency proof lines"));
            }
            let hash = STANDARD
                .decode(line)
                .ok()
                .and_then(|bytes| Hash::try_from(bytes).ok())
                .ok_or_else(|| bad("a proof line is not a base64 SHA-256 hash"))?;
            proof.push(hash);
        }
        if !note.ends_with('\n') {
            return Err(bad("the checkpoint must end in a newline"));
        }
        Ok(Self {
            old_size,
            proof,
            note: note.to_owned(),
        })
    }

    /// The origin the checkpoint names, to find the keys trusted for it.
    ///
    /// # Errors
    /// [`Refusal::BadRequest`] when the note is not a checkpoint.
    pub fn origin(&self) -> Result<String, Refusal> {
        let (body, _) = split_note(&self.note).map_err(|e| bad(e.to_string()))?;
        Checkpoint::parse_body(&body)
            .map(|checkpoint| checkpoint.origin)
            .map_err(|e| bad(e.to_string()))
    }

    /// The checkpoint, once a signature by one of `trusted` (the keys the
    /// witness trusts for its origin) verifies. Needs no state: a witness
    /// checks this before taking its lock.
    ///
    /// # Errors
    /// [`Refusal::UnknownLog`] without trusted keys, [`Refusal::Forbidden`]
    /// when none verifies, [`Refusal::BadRequest`] for a malformed note.
    pub fn verify(&self, trusted: &[NoteVerifier]) -> Result<Checkpoint, Refusal> {
        let origin = self.origin()?;
        if trusted.is_empty() {
            return Err(Refusal::UnknownLog(origin));
        }
        let mut why = String::new();
        for key in trusted {
            match key.verify(&self.note, &origin) {
                Ok(verified) => return Ok(verified),
                Err(error @ NoteError::Malformed(_)) => return Err(bad(error.to_string())),
                Err(error) => why = error.to_string(),
            }
        }
        Err(Refusal::Forbidden(why))
    }

    /// Whether the verified `checkpoint` may be cosigned after `latest`,
    /// the checkpoint last cosigned for its log: `old_size` must be its
    /// size, and the proof must show the checkpoint extends it. The caller
    /// reads `latest` and records the checkpoint atomically.
    ///
    /// # Errors
    /// The [`Refusal`] the protocol prescribes.
    pub fn extends(
        &self,
        checkpoint: &Checkpoint,
        latest: Option<Cosigned>,
    ) -> Result<(), Refusal> {
        if self.old_size > checkpoint.size {
            return Err(bad("the old size is above the checkpoint's size"));
        }
        let latest = latest.filter(|latest| latest.size > 0);
        let latest_size = latest.map_or(0, |latest| latest.size);
        if self.old_size != latest_size {
            return Err(Refusal::Conflict {
                latest: latest_size,
            });
        }
        let Some(latest) = latest else {
            if !self.proof.is_empty() {
                return Err(bad("the proof must be empty when the old size is 0"));
            }
            return Ok(());
        };
        if latest.size == checkpoint.size {
            if latest.root != checkpoint.root {
                return Err(Refusal::Fork {
                    latest: latest.size,
                });
            }
            if !self.proof.is_empty() {
                return Err(bad("the proof must be empty when the sizes are equal"));
            }
            return Ok(());
        }
        merkle::verify_consistency(
            latest.size,
            checkpoint.size,
            &self.proof,
            &latest.root,
            &checkpoint.root,
        )
        .map_err(|_| Refusal::Inconsistent {
            old_size: latest.size,
        })
    }

    /// [`Self::verify`] then [`Self::extends`].
    ///
    /// # Errors
    /// The [`Refusal`] the protocol prescribes.
    pub fn check(
        &self,
        trusted: &[NoteVerifier],
        latest: Option<Cosigned>,
    ) -> Result<Checkpoint, Refusal> {
        let checkpoint = self.verify(trusted)?;
        self.extends(&checkpoint, latest)?;
        Ok(checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::checkpoint::NoteSigner;
    use crate::merkle::{Frontier, leaf_hash, root_of};

    const ORIGIN: &str = "audit.civicgrid.test";

    fn log() -> NoteSigner {
        NoteSigner::new(ORIGIN, SigningKey::from_bytes(&[7u8; 32]))
    }

    fn leaves(prefix: &str, n: u64) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("{prefix}{i}").as_bytes()))
            .collect()
    }

    fn note(leaves: &[Hash]) -> (String, Cosigned) {
        let root = root_of(leaves);
        let size = leaves.len() as u64;
        let note = log().sign(&Checkpoint {
            origin: ORIGIN.into(),
            size,
            root,
        });
        (note, Cosigned { size, root })
    }

    /// A consistency proof computed from the leaves by the recursive
    /// definition of RFC 9162 §2.1.4.1, independent of the log's store.
    fn proof(leaves: &[Hash], old: usize) -> Vec<Hash> {
        fn sub(leaves: &[Hash], m: usize, complete: bool) -> Vec<Hash> {
            let n = leaves.len();
            if m == n {
                return if complete {
                    vec![]
                } else {
                    vec![root_of(leaves)]
                };
            }
            // The largest power of two below n.
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            if m <= k {
                let mut path = sub(&leaves[..k], m, complete);
                path.push(root_of(&leaves[k..]));
                path
            } else {
                let mut path = sub(&leaves[k..], m - k, false);
                path.push(root_of(&leaves[..k]));
                path
            }
        }
        sub(leaves, old, true)
    }

    fn request(old_size: u64, proof: Vec<Hash>, note: &str) -> AddCheckpoint {
        AddCheckpoint {
            old_size,
            proof,
            note: note.to_owned(),
        }
    }

    #[test]
    fn the_request_round_trips_through_its_text() {
        let all = leaves("e", 9);
        let (note, _) = note(&all);
        let sent = request(4, proof(&all, 4), &note);
        let text = sent.encode();
        assert!(text.starts_with("old 4\n"));
        assert_eq!(AddCheckpoint::parse(&text), Ok(sent));
    }

    #[test]
    fn a_first_checkpoint_is_taken_on_trust_and_an_extension_needs_a_valid_proof() {
        let all = leaves("e", 13);
        let (first, seen) = note(&all[..5]);
        let trusted = [log().verifier()];
        assert_eq!(
            request(0, vec![], &first)
                .check(&trusted, None)
                .unwrap()
                .size,
            5
        );
        let (next, _) = note(&all);
        let checked = request(5, proof(&all, 5), &next).check(&trusted, Some(seen));
        assert_eq!(checked.unwrap().size, 13);
        // The same size and root again is fine (another replica of the log).
        assert!(
            request(5, vec![], &first)
                .check(&trusted, Some(seen))
                .is_ok()
        );
    }

    #[test]
    fn a_rewritten_history_gets_no_cosignature_even_when_the_log_signs_it() {
        let honest = leaves("e", 12);
        let (_, seen) = note(&honest[..7]);
        let mut rewritten = honest.clone();
        rewritten[3] = leaf_hash(b"a quieter version of entry 3");
        let (note, _) = note(&rewritten);
        let trusted = [log().verifier()];
        // The log cannot make a valid proof; its own proof of the rewritten
        // tree fails against the root the witness saw.
        assert_eq!(
            request(7, proof(&rewritten, 7), &note).check(&trusted, Some(seen)),
            Err(Refusal::Inconsistent { old_size: 7 })
        );
        // Nor can it start over from zero, or claim the witness saw less.
        assert_eq!(
            request(0, vec![], &note).check(&trusted, Some(seen)),
            Err(Refusal::Conflict { latest: 7 })
        );
        // A fork at the same size is a conflict too.
        let (fork, _) = note_of_size(&rewritten, 7);
        assert_eq!(
            request(7, vec![], &fork).check(&trusted, Some(seen)),
            Err(Refusal::Fork { latest: 7 })
        );
    }

    fn note_of_size(all: &[Hash], size: usize) -> (String, Cosigned) {
        note(&all[..size])
    }

    #[test]
    fn a_smaller_tree_than_last_cosigned_is_refused() {
        let all = leaves("e", 10);
        let (_, seen) = note(&all);
        let (older, _) = note(&all[..6]);
        let trusted = [log().verifier()];
        assert_eq!(
            request(6, vec![], &older).check(&trusted, Some(seen)),
            Err(Refusal::Conflict { latest: 10 })
        );
        assert_eq!(
            request(10, vec![], &older)
                .check(&trusted, Some(seen))
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn unknown_logs_forged_notes_and_malformed_bodies_get_their_statuses() {
        let all = leaves("e", 3);
        let (note, _) = note(&all);
        assert_eq!(
            request(0, vec![], &note)
                .check(&[], None)
                .unwrap_err()
                .status(),
            404
        );
        let stranger = NoteSigner::new(ORIGIN, SigningKey::from_bytes(&[8u8; 32]));
        assert_eq!(
            request(0, vec![], &note)
                .check(&[stranger.verifier()], None)
                .unwrap_err()
                .status(),
            403
        );
        let forged = note.replacen("\n3\n", "\n4\n", 1);
        assert_eq!(
            request(0, vec![], &forged)
                .check(&[log().verifier()], None)
                .unwrap_err()
                .status(),
            403
        );
        for body in [
            "old 1\n\n",
            "new 1\n\nx\n",
            "old 01\n\nx\n",
            "old -1\n\nx\n",
            "old 0\nnot-base64!\n\nx\n",
            "old 0\n\nno newline",
        ] {
            assert!(
                matches!(AddCheckpoint::parse(body), Err(Refusal::BadRequest(_))),
                "{body:?}"
            );
        }
        let long = format!(
            "old 0\n{}\n{note}",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n".repeat(64)
        );
        assert!(matches!(
            AddCheckpoint::parse(&long),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn the_proof_helper_agrees_with_the_verifier() {
        let all = leaves("p", 21);
        let mut frontier = Frontier::default();
        for leaf in &all {
            frontier.push(*leaf);
        }
        assert_eq!(frontier.root(), root_of(&all));
        for old in 1..=21 {
            merkle::verify_consistency(
                old as u64,
                21,
                &proof(&all, old),
                &root_of(&all[..old]),
                &root_of(&all),
            )
            .unwrap();
        }
    }
}
