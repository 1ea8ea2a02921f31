//! C2SP tlog-cosignature `cosignature/v1` with Ed25519: a witness's
//! timestamped statement that a checkpoint is the largest consistent tree it
//! has seen of that log.
//!
//! The signed message is `cosignature/v1\n`, `time <POSIX seconds>\n` and the
//! checkpoint's note body. The signature line is
//! `— <name> base64(key ID || timestamp as u64 big-endian || signature)`, with
//! the key ID computed as for a note key but with signature type 0x04.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};

use crate::checkpoint::{NoteError, format_verifier_key, key_id, parse_verifier_key, split_note};

const COSIGNATURE_V1: u8 = 0x04;

fn message(body: &str, timestamp: u64) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{body}")
}

/// A witness's cosigning key with its name.
pub struct CosignatureSigner {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for CosignatureSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CosignatureSigner")
            .field("name", &self.name)
            .field("key", &"<secret>")
            .finish()
    }
}

impl CosignatureSigner {
    /// A cosigner named `name` (a schema-less URL such as
    /// `witness.example.org/w1`); the name must not contain spaces or `+`.
    ///
    /// # Errors
    /// [`NoteError::MalformedKey`] for a name a note cannot carry.
    pub fn new(name: impl Into<String>, key: SigningKey) -> Result<Self, NoteError> {
        let name = name.into();
        if name.is_empty() || name.contains('+') || name.chars().any(char::is_whitespace) {
            return Err(NoteError::MalformedKey(
                "a key name is not empty and has no spaces or '+'",
            ));
        }
        Ok(Self { name, key })
    }

    /// The verifier key (signature type 0x04) that logs and verifiers are
    /// given.
    #[must_use]
    pub fn verifier(&self) -> CosignatureVerifier {
        CosignatureVerifier {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The signature line (ending in a newline) cosigning the note `body`
    /// at `timestamp` (POSIX seconds).
    #[must_use]
    pub fn cosign(&self, body: &str, timestamp: u64) -> String {
        let signature = self.key.sign(message(body, timestamp).as_bytes());
        let mut blob = key_id(&self.name, COSIGNATURE_V1, &self.key.verifying_key()).to_vec();
        blob.extend_from_slice(&timestamp.to_be_bytes());
        blob.extend_from_slice(&signature.to_bytes());
        format!("\u{2014} {} {}\n", self.name, STANDARD.encode(blob))
    }
}

/// A witness's public key: checks its cosignatures on checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CosignatureVerifier {
    name: String,
    key: VerifyingKey,
}

impl std::fmt::Display for CosignatureVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_verifier_key(&self.name, COSIGNATURE_V1, &self.key))
    }
}

impl std::str::FromStr for CosignatureVerifier {
    type Err = NoteError;

    fn from_str(text: &str) -> Result<Self, NoteError> {
        let (name, key) = parse_verifier_key(text, COSIGNATURE_V1)?;
        Ok(Self { name, key })
    }
}

impl CosignatureVerifier {
    /// The witness's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The time (POSIX seconds) of this witness's valid cosignature on
    /// `note`; the note's own signatures are not checked here.
    ///
    /// # Errors
    /// [`NoteError::NoSignatureByKey`] when the note carries no cosignature
    /// by this key, [`NoteError::BadSignature`] when one does not verify,
    /// [`NoteError::Malformed`] for a note that is not a signed note.
    pub fn verify(&self, note: &str) -> Result<u64, NoteError> {
        let (body, lines) = split_note(note)?;
        let id = key_id(&self.name, COSIGNATURE_V1, &self.key);
        let mut newest = None;
        for line in lines {
            if line.name != self.name || line.blob[..4] != id {
                continue;
            }
            if line.blob.len() != 4 + 8 + 64 {
                return Err(NoteError::BadSignature(self.name.clone()));
            }
            let mut time = [0u8; 8];
            time.copy_from_slice(&line.blob[4..12]);
            let timestamp = u64::from_be_bytes(time);
            if timestamp > i64::MAX as u64 {
                return Err(NoteError::BadSignature(self.name.clone()));
            }
            let signature = ed25519_dalek::Signature::from_slice(&line.blob[12..])
                .map_err(|_| NoteError::Malformed("signature has the wrong length"))?;
            self.key
                .verify(message(&body, timestamp).as_bytes(), &signature)
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
            newest = newest.max(Some(timestamp));
        }
        newest.ok_or_else(|| NoteError::NoSignatureByKey(self.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, NoteSigner};

    fn log() -> NoteSigner {
        NoteSigner::new("audit.civicgrid.test", SigningKey::from_bytes(&[7u8; 32]))
    }

    fn witness() -> CosignatureSigner {
        CosignatureSigner::new(
            "witness.civicgrid.test/w1",
            SigningKey::from_bytes(&[3u8; 32]),
        )
        .unwrap()
    }

    fn cosigned() -> String {
        let note = log().sign(&Checkpoint {
            origin: "audit.civicgrid.test".into(),
            size: 5,
            root: [1u8; 32],
        });
        let body = &note[..=note.find("\n\n").unwrap()];
        format!("{note}{}", witness().cosign(body, 1_700_000_000))
    }

    #[test]
    fn a_cosigned_note_verifies_for_both_the_log_and_the_witness() {
        let note = cosigned();
        let verifier: CosignatureVerifier = witness().verifier().to_string().parse().unwrap();
        assert_eq!(verifier.verify(&note), Ok(1_700_000_000));
        assert_eq!(
            log()
                .verifier()
                .verify(&note, "audit.civicgrid.test")
                .unwrap()
                .size,
            5
        );
    }

    #[test]
    fn a_moved_timestamp_or_an_altered_body_breaks_the_cosignature() {
        let note = cosigned();
        let verifier = witness().verifier();
        let altered = note.replacen("\n5\n", "\n6\n", 1);
        assert_eq!(
            verifier.verify(&altered),
            Err(NoteError::BadSignature("witness.civicgrid.test/w1".into()))
        );
        let line = note.lines().last().unwrap();
        let (prefix, blob) = line.rsplit_once(' ').unwrap();
        let mut blob = STANDARD.decode(blob).unwrap();
        blob[11] ^= 1;
        let retimed = note.replace(line, &format!("{prefix} {}", STANDARD.encode(blob)));
        assert_eq!(
            verifier.verify(&retimed),
            Err(NoteError::BadSignature("witness.civicgrid.test/w1".into()))
        );
    }

    #[test]
    fn a_log_key_is_not_a_cosignature_key_and_another_witness_is_not_this_one() {
        let log_key = log().verifier().to_string();
        assert!(matches!(
            log_key.parse::<CosignatureVerifier>(),
            Err(NoteError::MalformedKey(_))
        ));
        let other = CosignatureSigner::new(
            "witness.civicgrid.test/w1",
            SigningKey::from_bytes(&[4u8; 32]),
        )
        .unwrap();
        assert_eq!(
            other.verifier().verify(&cosigned()),
            Err(NoteError::NoSignatureByKey(
                "witness.civicgrid.test/w1".into()
            ))
        );
    }

    #[test]
    fn names_a_note_cannot_carry_are_refused() {
        for name in ["", "has space", "a+b"] {
            assert!(CosignatureSigner::new(name, SigningKey::from_bytes(&[3u8; 32])).is_err());
        }
    }
}
