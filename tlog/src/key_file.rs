//! Ed25519 keys kept as a 32-byte seed in a file of their own (mode 0600):
//! the log's checkpoint key and a witness's cosigning key. Neither is ever
//! written to a database, so a copy of the database cannot sign.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file exists but does not hold a seed.
    #[error("{path} must hold exactly 32 bytes (an Ed25519 seed), it holds {len}")]
    WrongLength {
        /// The file.
        path: PathBuf,
        /// What it holds.
        len: usize,
    },
    /// Reading, creating or writing failed.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the key at `path`, creating a new random one there on first use.
///
/// # Errors
/// [`KeyFileError`] when the file cannot be read or created, or does not
/// hold 32 bytes.
pub fn load_or_create(path: &Path) -> Result<SigningKey, KeyFileError> {
    let io = |context: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| KeyFileError::Io {
            context,
            path,
            source,
        }
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let len = bytes.len();
            let seed: [u8; 32] = bytes.try_into().map_err(|_| KeyFileError::WrongLength {
                path: path.to_owned(),
                len,
            })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io("creating", path))?;
            file.write_all(&key.to_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io("writing", path))?;
            tracing::info!(path = %path.display(), "created a new Ed25519 key");
            Ok(key)
        }
        Err(error) => Err(io("reading", path)(error)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_key_is_created_private_once_and_read_back_the_same() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("keys/log.key");
        let created = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_or_create(&path).unwrap().to_bytes(),
            created.to_bytes()
        );
    }

    #[test]
    fn a_file_of_another_length_is_refused_not_replaced() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("log.key");
        std::fs::write(&path, b"short").unwrap();
        let error = load_or_create(&path).unwrap_err();
        assert!(
            matches!(error, KeyFileError::WrongLength { len: 5, .. }),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
    }
}
