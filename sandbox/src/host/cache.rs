//! Compiled modules on disk, keyed by the module's sha256 and the engine's
//! compatibility hash, each file carrying the sha256 of its own contents.
//!
//! A compiled artifact is native code: loading a corrupt one is undefined
//! behaviour, so a file whose checksum does not match is deleted and the
//! module compiled again, never loaded.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
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
        let mut outcome = CacheOutcome::Compiled;
        if let Ok(bytes) = fs::read(&path) {
            match self.deserialize(engine, &bytes) {
                Ok(module) => return Ok((module, CacheOutcome::Hit)),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "discarding a cached module");
                    let _ = fs::remove_file(&path);
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

    fn deserialize(&self, engine: &Engine, bytes: &[u8]) -> Result<Module, String> {
        if bytes.len() < CHECKSUM_LEN {
            return Err("truncated".into());
        }
        let (checksum, artifact) = bytes.split_at(CHECKSUM_LEN);
        if Sha256::digest(artifact)[..] != *checksum {
            return Err("checksum mismatch".into());
        }
        #[allow(unsafe_code)]
        // SAFETY: `artifact` is byte-for-byte what `Module::serialize` produced
        // in `store` (its sha256 matches the one written beside it), and
        // wasmtime itself rejects artifacts from an incompatible engine.
        let module = unsafe { Module::deserialize(engine, artifact) };
        module.map_err(|e| format!("{e}"))
    }

    fn store(&self, path: &Path, artifact: &[u8]) -> Result<(), SandboxError> {
        let io =
            |e: std::io::Error| SandboxError::Internal(format!("writing {}: {e}", path.display()));
        // Written beside and renamed into place: a crash never leaves half a file
        // under the real name (and a torn one fails its checksum anyway).
        // Unique per writer (other processes may share the directory).
        let tmp = path.with_extension(format!(
            "tmp{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(&Sha256::digest(artifact)).map_err(io)?;
        file.write_all(artifact).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)
    }
}
