//! On-disk cache of compiled components, so a warm `selma` start skips
//! Cranelift. Key: sha256 of the component bytes + wasmtime version + a
//! fingerprint of the engine configuration; entries are written to a temp
//! file and renamed. A stale or unreadable entry is recompiled and replaced.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Feeds `Hash` output into sha256 (a stable hasher, unlike `DefaultHasher`).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        let d = self.0.clone().finalize();
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Fingerprint of everything besides the bytes that a compiled artifact
/// depends on: wasmtime's version and the engine's compatibility hash.
pub(crate) fn engine_fingerprint(engine: &Engine) -> String {
    let mut h = ShaHasher(Sha256::new());
    h.write(b"wasmtime-48.0.8;");
    engine.precompile_compatibility_hash().hash(&mut h);
    hex::encode(&h.0.finalize()[..8])
}

/// The default cache folder: `$SELMA_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/selma/components`, else `~/.cache/selma/components`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SELMA_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("selma").join("components"));
    }
    std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("selma")
            .join("components")
    })
}

/// sha256 of `bytes`, hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Compile `bytes` (already known to be a component) or load it from the cache.
pub(crate) fn load(
    engine: &Engine,
    fingerprint: &str,
    dir: Option<&Path>,
    bytes: &[u8],
    sha256: &str,
    origin: &str,
) -> Result<Component> {
    let Some(dir) = dir else {
        return compile(engine, bytes, origin);
    };
    let path = dir.join(format!("{sha256}-{fingerprint}.cwasm"));
    if path.is_file() {
        // SAFETY: the file was written by `Component::serialize` of this
        // engine configuration (the name carries its fingerprint) into the
        // user's own cache folder; wasmtime still validates the header and
        // the compatibility hash and errors on a mismatch.
        if let Ok(c) = unsafe { Component::deserialize_file(engine, &path) } {
            return Ok(c);
        }
    }
    let component = compile(engine, bytes, origin)?;
    // A cache that cannot be written is not an error: the next start just
    // compiles again.
    let _ = store(&component, dir, &path);
    Ok(component)
}

fn compile(engine: &Engine, bytes: &[u8], origin: &str) -> Result<Component> {
    Component::from_binary(engine, bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{origin}: invalid WebAssembly component"))
}

fn store(component: &Component, dir: &Path, path: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let data = component.serialize()?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &data)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}
