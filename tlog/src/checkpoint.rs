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

use crate::merkle::Hash;

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
    key_id(name, ED25519_ALGORITHM, key)
}

/// Most signature lines a note may carry (as the Go reference allows):
/// each costs a verification, and a witness verifies under its lock.
pub const MAX_SIGNATURES: usize = 100;

/// A signed-note key ID: the first four bytes of
/// `SHA-256(name || "\n" || algorithm || public key)`.
pub(crate) fn key_id(name: &str, algorithm: u8, key: &VerifyingKey) -> [u8; 4] {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update(b"\n");
    hasher.update([algorithm]);
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// One signature line of a note: the signer's name and the decoded
/// `key ID || signature` blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureLine {
    /// The key name.
    pub name: String,
    /// Key ID (4 bytes) followed by the signature.
    pub blob: Vec<u8>,
}

/// A signed note split into its body (ending in a newline) and its
/// signature lines.
///
/// # Errors
/// [`NoteError::Malformed`] when there is no blank line before the
/// signatures or a signature line is not `— name base64`.
pub fn split_note(note: &str) -> Result<(String, Vec<SignatureLine>), NoteError> {
    // The signatures follow the last blank line (C2SP signed-note).
    let (body, signatures) = note
        .rsplit_once("\n\n")
        .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
    if body.is_empty() {
        return Err(NoteError::Malformed("the note has no text"));
    }
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed(
            "a note holds no control characters but newlines",
        ));
    }
    let signatures = signatures
        .strip_suffix('\n')
        .ok_or(NoteError::Malformed("a note ends in a newline"))?;
    let mut lines = Vec::new();
    for line in signatures.split('\n') {
        if lines.len() == MAX_SIGNATURES {
            return Err(NoteError::Malformed("more than 100 signatures"));
        }
        let rest = line.strip_prefix("\u{2014} ").ok_or(NoteError::Malformed(
            "a signature line must start with '— '",
        ))?;
        let (name, blob) = rest.split_once(' ').ok_or(NoteError::Malformed(
            "a signature line is '— name signature'",
        ))?;
        if name.is_empty() || name.contains('+') {
            return Err(NoteError::Malformed(
                "a signature's key name is empty or has a '+'",
            ));
        }
        let blob = STANDARD
            .decode(blob)
            .map_err(|_| NoteError::Malformed("signature is not base64"))?;
        if blob.len() < 5 {
            return Err(NoteError::Malformed(
                "a signature is a 4-byte key ID and at least one byte",
            ));
        }
        lines.push(SignatureLine {
            name: name.to_owned(),
            blob,
        });
    }
    Ok((format!("{body}\n"), lines))
}

impl Checkpoint {
    /// The checkpoint in a note body (extension lines after the root are
    /// allowed and ignored).
    ///
    /// # Errors
    /// [`NoteError::Malformed`] naming the line that is wrong.
    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        if body.split('\n').rev().skip(1).any(str::is_empty) {
            return Err(NoteError::Malformed("a checkpoint has no empty lines"));
        }
        let mut lines = body.lines();
        let origin = lines.next().ok_or(NoteError::Malformed("no origin line"))?;
        if origin.is_empty() {
            return Err(NoteError::Malformed("the origin line is empty"));
        }
        let size_line = lines
            .next()
            .ok_or(NoteError::Malformed("no tree size line"))?;
        if size_line.is_empty() || !size_line.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NoteError::Malformed("tree size is not a decimal number"));
        }
        if size_line.len() > 1 && size_line.starts_with('0') {
            return Err(NoteError::Malformed("tree size has leading zeroes"));
        }
        let size = size_line
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
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
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
        f.write_str(&format_verifier_key(
            &self.name,
            ED25519_ALGORITHM,
            &self.key,
        ))
    }
}

impl std::str::FromStr for NoteVerifier {
    type Err = NoteError;

    fn from_str(text: &str) -> Result<Self, NoteError> {
        let (name, key) = parse_verifier_key(text, ED25519_ALGORITHM)?;
        Ok(Self { name, key })
    }
}

/// A verifier key, `<name>+<key ID hex>+<base64(algorithm || public key)>`.
pub(crate) fn format_verifier_key(name: &str, algorithm: u8, key: &VerifyingKey) -> String {
    let mut encoded = vec![algorithm];
    encoded.extend_from_slice(key.as_bytes());
    let id = key_id(name, algorithm, key);
    format!(
        "{name}+{:02x}{:02x}{:02x}{:02x}+{}",
        id[0],
        id[1],
        id[2],
        id[3],
        STANDARD.encode(encoded)
    )
}

/// The name and Ed25519 key of a verifier key of signature type
/// `algorithm`, after checking its key ID.
pub(crate) fn parse_verifier_key(
    text: &str,
    algorithm: u8,
) -> Result<(String, VerifyingKey), NoteError> {
    // Names cannot contain '+'; base64 keys can.
    let mut parts = text.trim().splitn(3, '+');
    let name = parts.next().ok_or(NoteError::MalformedKey("no name"))?;
    let hash = parts.next().ok_or(NoteError::MalformedKey("no key hash"))?;
    let key = parts.next().ok_or(NoteError::MalformedKey("no key"))?;
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(NoteError::MalformedKey("the name is empty or has spaces"));
    }
    let key = STANDARD
        .decode(key)
        .map_err(|_| NoteError::MalformedKey("key is not base64"))?;
    let (found, key) = key
        .split_first()
        .ok_or(NoteError::MalformedKey("empty key"))?;
    if *found != algorithm {
        return Err(NoteError::MalformedKey(if algorithm == ED25519_ALGORITHM {
            "not an Ed25519 signing key (type 0x01)"
        } else {
            "not an Ed25519 cosignature key (type 0x04)"
        }));
    }
    let key: [u8; 32] = key
        .try_into()
        .map_err(|_| NoteError::MalformedKey("an Ed25519 key is 32 bytes"))?;
    let key = VerifyingKey::from_bytes(&key)
        .map_err(|_| NoteError::MalformedKey("not a valid Ed25519 point"))?;
    let id = key_id(name, algorithm, &key);
    if hash != format!("{:02x}{:02x}{:02x}{:02x}", id[0], id[1], id[2], id[3]) {
        return Err(NoteError::MalformedKey(
            "the key hash does not match the name and key",
        ));
    }
    Ok((name.to_owned(), key))
}

impl NoteVerifier {
    /// Checks `note`'s signature by this key and parses the checkpoint in it;
    /// the checkpoint must be for `origin`.
    ///
    /// # Errors
    /// [`NoteError`] when the note is malformed, unsigned by this key, altered,
    /// or for another log.
    pub fn verify(&self, note: &str, origin: &str) -> Result<Checkpoint, NoteError> {
        let (body, signatures) = split_note(note)?;
        let expected_hash = key_hash(&self.name, &self.key);
        let mut found = false;
        for line in signatures {
            if line.name != self.name || line.blob[..4] != expected_hash {
                continue;
            }
            // A line under this key's name and ID must verify: one that
            // cannot (any length but 64) condemns the note, as the spec asks.
            if line.blob.len() != 4 + 64 {
                return Err(NoteError::BadSignature(self.name.clone()));
            }
            found = true;
            let signature = ed25519_dalek::Signature::from_slice(&line.blob[4..])
                .map_err(|_| NoteError::Malformed("signature has the wrong length"))?;
            self.key
                .verify(body.as_bytes(), &signature)
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
        }
        if !found {
            return Err(NoteError::NoSignatureByKey(self.name.clone()));
        }
        let checkpoint = Checkpoint::parse_body(&body)?;
        if checkpoint.origin != origin {
            return Err(NoteError::WrongOrigin {
                expected: origin.to_owned(),
                found: checkpoint.origin,
            });
        }
        Ok(checkpoint)
    }

    /// The key's name (conventionally the log's origin).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
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
    fn notes_outside_the_signed_note_grammar_are_refused() {
        let note = signer().sign(&checkpoint());
        let verifier = signer().verifier();
        for (bad, why) in [
            (note.replacen("\n42\n", "\n42\r\n", 1), "a carriage return"),
            (note.trim_end_matches('\n').to_owned(), "no final newline"),
            (
                format!("{note}{}", note.lines().last().unwrap().to_owned() + "\n").repeat(1)
                    + &(note.lines().last().unwrap().to_owned() + "\n").repeat(100),
                "more than 100 signatures",
            ),
        ] {
            assert!(
                matches!(
                    verifier.verify(&bad, "audit.civicgrid.test"),
                    Err(NoteError::Malformed(_))
                ),
                "{why}"
            );
        }
        assert!(matches!(
            Checkpoint::parse_body("audit.civicgrid.test\n+42\nAAAA\n"),
            Err(NoteError::Malformed(_))
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
