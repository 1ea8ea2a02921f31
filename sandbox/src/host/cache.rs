//! Compiled modules on disk, keyed by the module's sha256 and the engine's
//! compatibility hash, each with the sha256 of its contents in a file beside it.
//!
//! A compiled artifact is native code: loading a corrupt one is undefined
//! behaviour, so a file whose checksum does not match is deleted and the
//! module compiled again, never loaded. A verified file is mapped, not
//! copied: the SQL guest's artifact is over 300 MB, and reading it into the
//! heap and copying it again into executable memory took half of a load.
//! Files are only ever replaced by renaming, so a mapped file never changes
//! under a loaded module.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use super::SandboxError;

/// What a load did, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from disk.
    Hit,
    /// Compiled and stored (no entry yet).
    Compiled,
    /// An entry was there but corrupt or incompatible: deleted, compiled, stored.
    Rebuilt,
}

pub(crate) struct ModuleCache {
    dir: PathBuf,
    engine_key: String,
}

const CHECKSUM_LEN: usize = 32;

impl ModuleCache {
    pub(crate) fn new(dir: &Path, engine: &Engine) -> Result<Self, SandboxError> {
        fs::create_dir_all(dir).map_err(|e| {
            SandboxError::Internal(format!("cache directory {}: {e}", dir.display()))
        })?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_owned(),
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    pub(crate) fn path_for(&self, module_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{module_sha256}-{}.cwasm", self.engine_key))
    }

    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        module_sha256: &str,
    ) -> Result<(Module, CacheOutcome), SandboxError> {
        let path = self.path_for(module_sha256);
        let checksum_path = checksum_path(&path);
        let mut outcome = CacheOutcome::Compiled;
        if let Ok(file) = fs::File::open(&path) {
            match self.deserialize(engine, file, &checksum_path) {
                Ok(module) => return Ok((module, CacheOutcome::Hit)),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "discarding a cached module");
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_file(&checksum_path);
                    outcome = CacheOutcome::Rebuilt;
                }
            }
        }
        let module =
            Module::new(engine, wasm).map_err(|e| SandboxError::InvalidModule(format!("{e:#}")))?;
        let artifact = module
            .serialize()
            .map_err(|e| SandboxError::Internal(format!("serialising a module: {e}")))?;
        self.store(&path, &artifact)?;
        Ok((module, outcome))
    }

    /// The module in `file`, if its contents hash to the checksum stored at
    /// `checksum_path`. The file is hashed and then mapped through the same
    /// open handle, so what is mapped is the file that was verified.
    fn deserialize(
        &self,
        engine: &Engine,
        mut file: fs::File,
        checksum_path: &Path,
    ) -> Result<Module, String> {
        let expected = fs::read(checksum_path).map_err(|e| format!("its checksum: {e}"))?;
        if expected.len() != CHECKSUM_LEN {
            return Err("its checksum is truncated".into());
        }
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let read = file.read(&mut chunk).map_err(|e| format!("reading: {e}"))?;
            if read == 0 {
                break;
            }
            hasher.update(&chunk[..read]);
        }
        if hasher.finalize()[..] != *expected {
            return Err("checksum mismatch".into());
        }
        #[allow(unsafe_code)]
        // SAFETY: the file is byte-for-byte what `Module::serialize` produced
        // in `store` (its sha256 matches the one written beside it), cache
        // files are replaced only by renaming (so the mapped inode keeps
        // those bytes), and wasmtime itself rejects artifacts from an
        // incompatible engine.
        let module = unsafe { Module::deserialize_open_file(engine, file) };
        module.map_err(|e| format!("{e}"))
    }

    fn store(&self, path: &Path, artifact: &[u8]) -> Result<(), SandboxError> {
        // The artifact first: a crash before its checksum is written leaves
        // an entry that fails verification and is rebuilt.
        write_by_renaming(path, artifact)?;
        write_by_renaming(&checksum_path(path), &Sha256::digest(artifact))
    }
}

/// Where the sha256 of the artifact at `path` is kept.
fn checksum_path(path: &Path) -> PathBuf {
    path.with_extension("cwasm.sha256")
}

/// Writes `contents` beside `path` and renames it into place: a crash never
/// leaves half a file under the real name, and a file a loaded module has
/// mapped is never written to.
fn write_by_renaming(path: &Path, contents: &[u8]) -> Result<(), SandboxError> {
    let io = |e: std::io::Error| SandboxError::Internal(format!("writing {}: {e}", path.display()));
    // Unique per writer (other processes may share the directory).
    let tmp = path.with_extension(format!(
        "tmp{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}
