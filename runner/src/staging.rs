//! Uploads being received: each a file named by its upload id in a staging
//! directory outside every product's folder, written chunk by chunk at the
//! offsets the marketplace sends, so an upload cut off resumes where the
//! staged file ends. Nothing staged is readable by a query: a file becomes
//! product data only when it is ingested, checked and renamed into place.

use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

/// Staged files older than this are an upload abandoned: removed when the
/// next upload starts.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(2 * 24 * 3600);

/// Why a chunk or a staged file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The id is not one the marketplace makes.
    #[error("upload_id: 32 lowercase hex digits")]
    Id,
    /// The staging directory failed.
    #[error("staging: {0}")]
    Io(#[from] std::io::Error),
}

/// A staging directory.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// Stages in `dir`, made if missing.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The staged file of `upload_id`.
    ///
    /// # Errors
    /// [`StagingError::Id`] for an id that could name another path.
    pub fn path(&self, upload_id: &str) -> Result<PathBuf, StagingError> {
        let plain = upload_id.len() == 32
            && upload_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !plain {
            return Err(StagingError::Id);
        }
        Ok(self.dir.join(upload_id))
    }

    /// Writes `data` at `offset` of the upload's staged file and returns the
    /// file's length. A chunk beyond the end is not written (the length
    /// says where to resume); one before it replaces what followed, since
    /// the marketplace resends from the last offset it recorded.
    ///
    /// # Errors
    /// A bad id, or the disk failing.
    pub fn stage(&self, upload_id: &str, offset: u64, data: &[u8]) -> Result<u64, StagingError> {
        let path = self.path(upload_id)?;
        std::fs::create_dir_all(&self.dir)?;
        let fresh = !path.exists();
        if fresh && offset > 0 {
            // Sealed for its ingest, or lost with a restart: nothing to
            // add to, and nothing is made that a sweep would have to find.
            return Ok(0);
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        if fresh {
            self.sweep();
        }
        let length = file.metadata()?.len();
        if offset > length {
            return Ok(length);
        }
        file.set_len(offset)?;
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(data)?;
        file.sync_data()?;
        Ok(offset + data.len() as u64)
    }

    /// Takes the upload's staged file out of reach of further chunks, for
    /// its ingest: what is hashed and converted is what was staged when the
    /// ingest began, and a second ingest of the same upload finds nothing.
    ///
    /// # Errors
    /// A bad id, or no staged file (`NotFound`).
    pub fn seal(&self, upload_id: &str) -> Result<PathBuf, StagingError> {
        let staged = self.path(upload_id)?;
        let sealed = staged.with_extension("sealed");
        std::fs::rename(&staged, &sealed)?;
        Ok(sealed)
    }

    /// The length and SHA-256 (hex) of the file at `path`, and the length
    /// of its longest line (bytes between line feeds).
    ///
    /// # Errors
    /// No such file.
    pub fn digest_of(path: &Path) -> Result<(u64, String, u64), StagingError> {
        use std::io::Read as _;
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let (mut length, mut line, mut longest) = (0u64, 0u64, 0u64);
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            let chunk = &buffer[..read];
            hasher.update(chunk);
            length += read as u64;
            for piece in chunk.split_inclusive(|b| *b == b'\n') {
                line += piece.len() as u64;
                longest = longest.max(line);
                if piece.last() == Some(&b'\n') {
                    line = 0;
                }
            }
        }
        Ok((length, hex::encode(hasher.finalize()), longest))
    }

    /// The length and SHA-256 (hex) of the upload's staged file.
    ///
    /// # Errors
    /// A bad id, or no such file.
    pub fn digest(&self, upload_id: &str) -> Result<(u64, String), StagingError> {
        let mut file = std::fs::File::open(self.path(upload_id)?)?;
        let mut hasher = Sha256::new();
        let length = std::io::copy(&mut file, &mut hasher)?;
        Ok((length, hex::encode(hasher.finalize())))
    }

    /// A scratch path beside the staged files, for what an ingest writes.
    ///
    /// # Errors
    /// A bad id.
    pub fn scratch(&self, upload_id: &str, suffix: &str) -> Result<PathBuf, StagingError> {
        let staged = self.path(upload_id)?;
        Ok(staged.with_extension(suffix))
    }

    /// Removes the upload's staged and scratch files.
    pub fn discard(&self, upload_id: &str) {
        let Ok(staged) = self.path(upload_id) else {
            return;
        };
        let _ = std::fs::remove_file(&staged);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_str()
                    .is_some_and(|name| name.starts_with(upload_id))
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// Puts back, at a runner's start, what ingests cut off by its stop left:
    /// a sealed upload becomes staged again (its commit resumes with every
    /// byte there), and half-written scratch files go. Only for a staging
    /// directory one runner process uses, as each runner's own is.
    pub fn recover(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
                continue;
            };
            match name.split_once('.') {
                Some((id, "sealed")) if self.path(id).is_ok() => {
                    let _ = std::fs::rename(&path, self.dir.join(id));
                }
                Some((id, _)) if self.path(id).is_ok() => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
    }

    /// Removes staged files nobody wrote to for [`ABANDONED_AFTER`].
    pub fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| now.duration_since(at).ok())
                .is_some_and(|age| age > ABANDONED_AFTER);
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Its directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn chunks_resume_where_the_staged_file_ends() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::new(dir.path().join("staging"));
        assert_eq!(staging.stage(ID, 0, b"hello ").unwrap(), 6);
        // A chunk past the end is not written.
        assert_eq!(staging.stage(ID, 10, b"nope").unwrap(), 6);
        // A resend of the last chunk replaces it.
        assert_eq!(staging.stage(ID, 0, b"hello ").unwrap(), 6);
        assert_eq!(staging.stage(ID, 6, b"world").unwrap(), 11);
        let (length, sha) = staging.digest(ID).unwrap();
        assert_eq!(length, 11);
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello world")));
        // Sealed for its ingest: a late chunk neither reaches it nor makes a
        // new file.
        let sealed = staging.seal(ID).unwrap();
        assert_eq!(staging.stage(ID, 11, b"!").unwrap(), 0);
        assert!(!staging.path(ID).unwrap().exists());
        assert_eq!(Staging::digest_of(&sealed).unwrap().0, 11);
        assert_eq!(Staging::digest_of(&sealed).unwrap().2, 11, "one line");
        assert!(staging.seal(ID).is_err(), "a second ingest finds nothing");
        staging.discard(ID);
        assert!(!sealed.exists());
        assert!(staging.digest(ID).is_err());
    }

    #[test]
    fn an_ingest_cut_off_by_a_stop_is_staged_again_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::new(dir.path());
        staging.stage(ID, 0, b"all of it").unwrap();
        staging.seal(ID).unwrap();
        std::fs::write(staging.scratch(ID, "parquet").unwrap(), b"half").unwrap();
        std::fs::write(dir.path().join("unrelated.txt"), b"kept").unwrap();
        staging.recover();
        assert_eq!(staging.digest(ID).unwrap().0, 9);
        assert!(!staging.scratch(ID, "parquet").unwrap().exists());
        assert!(!staging.scratch(ID, "sealed").unwrap().exists());
        assert!(dir.path().join("unrelated.txt").exists());
    }

    #[test]
    fn ids_cannot_name_other_paths() {
        let staging = Staging::new("/tmp/unused");
        for bad in [
            "../../etc/passwd",
            "0123456789ABCDEF0123456789ABCDEF",
            "",
            "a/b",
        ] {
            assert!(matches!(staging.path(bad), Err(StagingError::Id)), "{bad}");
        }
    }
}
