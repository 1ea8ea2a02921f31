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
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
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

    pub(crate) fn load_or_compile<A: Artifact>(
        &self,
        engine: &Engine,
        wasm: &[u8],
        module_sha256: &str,
    ) -> Result<(A, CacheOutcome), SandboxError> {
        let path = self.path_for(module_sha256);
        let checksum_path = checksum_path(&path);
        let mut outcome = CacheOutcome::Compiled;
        if let Ok(file) = fs::File::open(&path) {
            match self.deserialize(engine, file, &checksum_path) {
                Ok(artifact) => return Ok((artifact, CacheOutcome::Hit)),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "discarding a cached module");
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_file(&checksum_path);
                    outcome = CacheOutcome::Rebuilt;
                }
            }
        }
        let compiled =
            A::compile(engine, wasm).map_err(|e| SandboxError::InvalidModule(format!("{e:#}")))?;
        let artifact = compiled
            .serialize()
            .map_err(|e| SandboxError::Internal(format!("serialising a module: {e}")))?;
        self.store(&path, &artifact)?;
        Ok((compiled, outcome))
    }

    /// The artifact in `file`, if its contents hash to the checksum stored
    /// at `checksum_path`. The file is hashed and then loaded through the
    /// same open handle, so what is loaded is the file that was verified.
    fn deserialize<A: Artifact>(
        &self,
        engine: &Engine,
        mut file: fs::File,
        checksum_path: &Path,
    ) -> Result<A, String> {
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
        file.rewind().map_err(|e| format!("rewinding: {e}"))?;
        #[allow(unsafe_code)]
        // SAFETY: the file is byte-for-byte what `Artifact::serialize`
        // produced in `store` (its sha256 matches the one written beside
        // it), cache files are replaced only by renaming (so the open inode
        // keeps those bytes), and wasmtime itself rejects artifacts from an
        // incompatible engine.
        let artifact = unsafe { A::deserialize_verified(engine, file) };
        artifact.map_err(|e| format!("{e}"))
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

/// What the cache holds: compiled core modules (the SQL guest, core-module
/// algorithms) and compiled components (algorithms of the `algorithm` world).
pub(crate) trait Artifact: Sized {
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self>;
    fn serialize(&self) -> wasmtime::Result<Vec<u8>>;
    /// Loads an artifact `serialize` wrote.
    ///
    /// # Safety
    ///
    /// `file` must hold exactly bytes that `serialize` produced (wasmtime
    /// runs them as native code) and must not change while it is loaded.
    #[allow(unsafe_code)]
    unsafe fn deserialize_verified(engine: &Engine, file: fs::File) -> wasmtime::Result<Self>;
}

impl Artifact for Module {
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self> {
        Module::new(engine, wasm)
    }

    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Module::serialize(self)
    }

    // A verified file is mapped, not copied: the SQL guest's artifact is
    // over 300 MB.
    #[allow(unsafe_code)]
    unsafe fn deserialize_verified(engine: &Engine, file: fs::File) -> wasmtime::Result<Self> {
        // SAFETY: as the trait requires of the caller.
        unsafe { Module::deserialize_open_file(engine, file) }
    }
}

impl Artifact for Component {
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self> {
        Component::new(engine, wasm)
    }

    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Component::serialize(self)
    }

    // Algorithms are small: read the verified file through its open handle
    // (wasmtime maps components only by path, which could name another file
    // by the time it is opened again).
    #[allow(unsafe_code)]
    unsafe fn deserialize_verified(engine: &Engine, mut file: fs::File) -> wasmtime::Result<Self> {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        // SAFETY: as the trait requires of the caller.
        unsafe { Component::deserialize(engine, &bytes) }
    }
}
