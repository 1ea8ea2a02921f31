//! The tamper-evident audit log: an RFC 9162 Merkle tree over every
//! authorization, contract, registration and policy change, with checkpoints
//! signed in the C2SP tlog-checkpoint format (the regulator's verifier is
//! `civicgrid_cli::verify`).

pub use civicgrid_tlog::{checkpoint, cosignature, merkle};

pub mod log;

/// Reads the log's Ed25519 signing key from `path` (32 raw bytes), creating
/// it (mode 0600) on first use. The key lives in a file of its own, never in
/// the database.
///
/// # Errors
/// `InvalidArgument` naming `signing-key-file` for a file that is not a key;
/// an I/O error when it cannot be read or created.
pub fn load_or_create_signing_key(
    path: &std::path::Path,
) -> crate::error::Result<checkpoint::SigningKey> {
    use civicgrid_tlog::key_file::{self, KeyFileError};
    key_file::load_or_create(path).map_err(|error| match error {
        KeyFileError::WrongLength { .. } => {
            crate::error::MarketError::invalid("signing-key-file", error.to_string())
        }
        KeyFileError::Io {
            context,
            path,
            source,
        } => crate::error::MarketError::Io {
            context: format!("{context} {}", path.display()),
            source,
        },
    })
}

/// The lower-case hex SHA-256 of `bytes`: how entries record what they
/// stand for (SQL, results, report texts) without holding it, so that a
/// receipt covers it. Verifiers recompute it the same way.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Most audit entries one `GetEntries` call returns: the server pages by it,
/// and the verifier asks for no more at once.
pub const MAX_ENTRIES_PER_CALL: u64 = 1000;
