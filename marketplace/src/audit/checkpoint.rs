//! Checkpoints in the C2SP tlog-checkpoint format, signed as C2SP signed notes
//! with Ed25519.
//!
//! A checkpoint body is three lines: the log's origin, the tree size in
//! decimal, and the root hash in standard base64. The note appends a blank line
//! and one signature line per signer: `— <name> <base64(key hash || signature)>`,
//! where the key hash is the first four bytes of
//! `SHA-256(name || "\n" || 0x01 || public key)` and the signature covers the
//! body. A verifier key is written `<name>+<key hash hex>+<base64(0x01 || public key)>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signer as _, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use super::merkle::Hash;

const ED25519_ALGORITHM: u8 = 0x01;

/// A checkpoint's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity, e.g. `civicgrid.example.city/audit`.
    pub origin: String,
    /// Leaves in the tree.
    pub size: u64,
    /// The RFC 9162 root hash of those leaves.
    pub root: Hash,
}

impl Checkpoint {
    /// The note body: the text the signature covers.
    #[must_use]
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }
}

/// Why a note is not a valid checkpoint of the expected log and key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    /// The text does not have the shape of a signed checkpoint.
    #[error("malformed checkpoint note: {0}")]
    Malformed(&'static str),
    /// A verifier key string is not `name+hash+key`.
    #[error("malformed verifier key: {0}")]
    MalformedKey(&'static str),
    /// No signature line is by the expected key.
    #[error("the note carries no signature by key {0}")]
    NoSignatureByKey(String),
    /// The expected key's signature does not verify.
    #[error("the signature by {0} does not verify: the note was altered or forged")]
    BadSignature(String),
    /// The note is for another log.
    #[error("the checkpoint is for log {found:?}, expected {expected:?}")]
    WrongOrigin {
        /// The origin the caller trusts.
        expected: String,
        /// The origin in the note.
        found: String,
    },
}

fn key_hash(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update(b"\n");
    hasher.update([ED25519_ALGORITHM]);
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// The log's signing key with the name its signature lines carry.
pub struct NoteSigner {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .field("key", &"<secret>")
            .finish()
    }
}

impl NoteSigner {
    /// A signer named `name` (conventionally the log's origin).
    #[must_use]
    pub fn new(name: impl Into<String>, key: SigningKey) -> Self {
        Self {
            name: name.into(),
            key,
        }
    }

    /// The verifier key a regulator is given out of band.
    #[must_use]
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The signed note for `checkpoint`.
    #[must_use]
    pub fn sign(&self, checkpoint: &Checkpoint) -> String {
        let body = checkpoint.body();
        let signature = self.key.sign(body.as_bytes());
        let mut blob = key_hash(&self.name, &self.key.verifying_key()).to_vec();
        blob.extend_from_slice(&signature.to_bytes());
        format!("{body}\n\u{2014} {} {}\n", self.name, STANDARD.encode(blob))
    }
}

/// A public key that verifies checkpoint notes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key: VerifyingKey,
}

impl std::fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut encoded = vec![ED25519_ALGORITHM];
        encoded.extend_from_slice(self.key.as_bytes());
        let hash = key_hash(&self.name, &self.key);
        write!(
            f,
            "{}+{:02x}{:02x}{:02x}{:02x}+{}",
            self.name,
            hash[0],
            hash[1],
            hash[2],
            hash[3],
            STANDARD.encode(encoded)
        )
    }
}

impl std::str::FromStr for NoteVerifier {
    type Err = NoteError;

    fn from_str(text: &str) -> Result<Self, NoteError> {
        // Names cannot contain '+'; base64 keys can.
        let mut parts = text.trim().splitn(3, '+');
        let name = parts.next().ok_or(NoteError::MalformedKey("no name"))?;
        let hash = parts.next().ok_or(NoteError::MalformedKey("no key hash"))?;
        let key = parts.next().ok_or(NoteError::MalformedKey("no key"))?;
        if name.is_empty() {
            return Err(NoteError::MalformedKey("empty name"));
        }
        let key = STANDARD
            .decode(key)
            .map_err(|_| NoteError::MalformedKey("key is not base64"))?;
        let (algorithm, key) = key
            .split_first()
            .ok_or(NoteError::MalformedKey("empty key"))?;
        if *algorithm != ED25519_ALGORITHM {
            return Err(NoteError::MalformedKey("not an Ed25519 key"));
        }
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| NoteError::MalformedKey("an Ed25519 key is 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| NoteError::MalformedKey("not a valid Ed25519 point"))?;
        let verifier = Self {
            name: name.to_owned(),
            key,
        };
        let expected = key_hash(name, &key);
        let expected = format!(
            "{:02x}{:02x}{:02x}{:02x}",
            expected[0], expected[1], expected[2], expected[3]
        );
        if hash != expected {
            return Err(NoteError::MalformedKey(
                "the key hash does not match the name and key",
            ));
        }
        Ok(verifier)
    }
}

impl NoteVerifier {
    /// Checks `note`'s signature by this key and parses the checkpoint in it;
    /// the checkpoint must be for `origin`.
    ///
    /// # Errors
    /// [`NoteError`] when the note is malformed, unsigned by this key, altered,
    /// or for another log.
    pub fn verify(&self, note: &str, origin: &str) -> Result<Checkpoint, NoteError> {
        let (body, signatures) = note
            .split_once("\n\n")
            .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let body = format!("{body}\n");
        let expected_hash = key_hash(&self.name, &self.key);
        let mut found = false;
        for line in signatures.lines() {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                return Err(NoteError::Malformed(
                    "a signature line must start with '— '",
                ));
            };
            let (name, blob) = rest.split_once(' ').ok_or(NoteError::Malformed(
                "a signature line is '— name signature'",
            ))?;
            if name != self.name {
                continue;
            }
            let blob = STANDARD
                .decode(blob)
                .map_err(|_| NoteError::Malformed("signature is not base64"))?;
            if blob.len() != 4 + 64 || blob[..4] != expected_hash {
                continue;
            }
            found = true;
            let signature = ed25519_dalek::Signature::from_slice(&blob[4..])
                .map_err(|_| NoteError::Malformed("signature has the wrong length"))?;
            self.key
                .verify(body.as_bytes(), &signature)
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
        }
        if !found {
            return Err(NoteError::NoSignatureByKey(self.name.clone()));
        }
        let mut lines = body.lines();
        let found_origin = lines.next().ok_or(NoteError::Malformed("no origin line"))?;
        let size = lines
            .next()
            .ok_or(NoteError::Malformed("no tree size line"))?
            .parse::<u64>()
            .map_err(|_| NoteError::Malformed("tree size is not a decimal number"))?;
        let root = STANDARD
            .decode(
                lines
                    .next()
                    .ok_or(NoteError::Malformed("no root hash line"))?,
            )
            .map_err(|_| NoteError::Malformed("root hash is not base64"))?;
        let root: Hash = root
            .try_into()
            .map_err(|_| NoteError::Malformed("root hash is not 32 bytes"))?;
        if found_origin != origin {
            return Err(NoteError::WrongOrigin {
                expected: origin.to_owned(),
                found: found_origin.to_owned(),
            });
        }
        Ok(Checkpoint {
            origin: found_origin.to_owned(),
            size,
            root,
        })
    }

    /// The key's name (conventionally the log's origin).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Reads the log's ed25519 signing key from `path` (32 raw bytes), creating
/// it (mode 0600) on first use.
///
/// # Errors
/// When the file cannot be read or created, or does not hold 32 bytes.
pub fn load_or_create_signing_key(path: &std::path::Path) -> crate::error::Result<SigningKey> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |context: String| {
        move |source: std::io::Error| crate::error::MarketError::Io { context, source }
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
                crate::error::MarketError::invalid(
                    "signing-key-file",
                    format!("{} must hold exactly 32 bytes", path.display()),
                )
            })?;
            Ok(SigningKey::from_bytes(&bytes))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("creating {}", parent.display())))?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(format!("creating {}", path.display())))?;
            file.write_all(&key.to_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(format!("writing {}", path.display())))?;
            tracing::info!(path = %path.display(), "created a new audit signing key");
            Ok(key)
        }
        Err(error) => Err(io(format!("reading {}", path.display()))(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> NoteSigner {
        NoteSigner::new("audit.civicgrid.test", SigningKey::from_bytes(&[7u8; 32]))
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: "audit.civicgrid.test".into(),
            size: 42,
            root: [9u8; 32],
        }
    }

    #[test]
    fn a_signed_note_verifies_and_round_trips_its_checkpoint() {
        let signer = signer();
        let note = signer.sign(&checkpoint());
        assert!(note.starts_with("audit.civicgrid.test\n42\n"));
        assert!(note.contains("\n\n\u{2014} audit.civicgrid.test "));
        let verifier: NoteVerifier = signer.verifier().to_string().parse().unwrap();
        assert_eq!(
            verifier.verify(&note, "audit.civicgrid.test"),
            Ok(checkpoint())
        );
    }

    #[test]
    fn an_altered_note_fails_verification() {
        let signer = signer();
        let note = signer.sign(&checkpoint()).replacen("\n42\n", "\n41\n", 1);
        assert_eq!(
            signer.verifier().verify(&note, "audit.civicgrid.test"),
            Err(NoteError::BadSignature("audit.civicgrid.test".into()))
        );
    }

    #[test]
    fn a_note_by_another_key_or_for_another_log_is_refused() {
        let other = NoteSigner::new("audit.civicgrid.test", SigningKey::from_bytes(&[8u8; 32]));
        let note = other.sign(&checkpoint());
        assert_eq!(
            signer().verifier().verify(&note, "audit.civicgrid.test"),
            Err(NoteError::NoSignatureByKey("audit.civicgrid.test".into()))
        );
        let note = signer().sign(&checkpoint());
        assert!(matches!(
            signer().verifier().verify(&note, "another.log"),
            Err(NoteError::WrongOrigin { .. })
        ));
    }

    #[test]
    fn verifier_keys_with_a_wrong_hash_are_refused() {
        let text = signer().verifier().to_string();
        let (name, rest) = text.split_once('+').unwrap();
        let (_, key) = rest.split_once('+').unwrap();
        let forged = format!("{name}+00000000+{key}");
        assert!(matches!(
            forged.parse::<NoteVerifier>(),
            Err(NoteError::MalformedKey(_))
        ));
    }
}
