//! The cache directory: precompiled components, and the use counts that
//! decide what to preload when a host starts.
//!
//! An artifact is `components/<sha256 of the component>-<engine hash>.cwasm`:
//! wasmtime's serialized component followed by a trailer (an xxh3 checksum of
//! it and a magic tag). It is written to a temporary file and renamed, so a
//! reader never sees half of one, and its checksum is verified before
//! wasmtime maps it, so a corrupt or truncated file is a miss, never a crash.
//! A file made by another wasmtime or with other settings has another name.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::component::Component;

const MAGIC: &[u8; 8] = b"QFLOWCW1";
const TRAILER: usize = 8 + MAGIC.len();

/// A content digest: SHA-256 of a component's bytes.
pub(crate) type Digest = [u8; 32];

/// What looking for an artifact found.
pub(crate) enum Lookup {
    Hit(Component),
    Miss,
    /// There was a file, but not a usable one: it will be overwritten.
    Corrupt(String),
}

pub(crate) struct DiskCache {
    root: PathBuf,
    components: PathBuf,
    /// The engine's compatibility hash, in every artifact's name.
    engine_hash: String,
    /// Cleared after the first failed write: the cache is then read-only
    /// (or, if nothing can be read either, memory-only) with one warning.
    writable: AtomicBool,
}

impl DiskCache {
    /// Opens (creating if need be) the cache at `root`; `None`, with a
    /// warning, when it cannot be created.
    pub(crate) fn open(root: &Path, engine: &wasmtime::Engine) -> Option<DiskCache> {
        let components = root.join("components");
        if let Err(e) = std::fs::create_dir_all(&components) {
            tracing::warn!(
                "the cache directory {} is unusable ({e}); compiled components are kept in memory only",
                components.display()
            );
            return None;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Some(DiskCache {
            root: root.to_path_buf(),
            components,
            engine_hash: format!("{:016x}", hasher.finish()),
            writable: AtomicBool::new(true),
        })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.components.join(format!("{}-{}.cwasm", hex::encode(digest), self.engine_hash))
    }

    /// The precompiled component for `digest`, if a sound one is on disk.
    /// Blocking: call it off the async workers.
    pub(crate) fn load(&self, engine: &wasmtime::Engine, digest: &Digest) -> Lookup {
        let path = self.path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Corrupt(format!("unreadable: {e}")),
        };
        let Some(payload) = verified(&bytes) else {
            return Lookup::Corrupt("truncated or corrupt (checksum mismatch)".into());
        };
        if wasmtime::Engine::detect_precompiled(payload) != Some(wasmtime::Precompiled::Component) {
            return Lookup::Corrupt("not a precompiled component".into());
        }
        // SAFETY: the file is ours: written by `save` from wasmtime's own
        // serialisation, for this engine's settings (they are in its name),
        // and its checksum was verified just now. wasmtime maps it read-only
        // and copy-on-write, so a later change to the file cannot reach code
        // already loaded.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Lookup::Hit(component),
            Err(e) => Lookup::Corrupt(format!("{e:#}")),
        }
    }

    /// Writes `component`'s artifact for `digest`. Blocking.
    pub(crate) fn save(&self, digest: &Digest, component: &Component) {
        if !self.writable.load(Ordering::Relaxed) {
            return;
        }
        let written = component.serialize().map_err(|e| e.to_string()).and_then(|mut bytes| {
            let checksum = xxhash_rust::xxh3::xxh3_64(&bytes);
            bytes.extend_from_slice(&checksum.to_le_bytes());
            bytes.extend_from_slice(MAGIC);
            write_atomically(&self.path(digest), &bytes).map_err(|e| e.to_string())
        });
        if let Err(e) = written {
            // One warning, then a read-only cache.
            if self.writable.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    "cannot write to the cache directory {} ({e}); compiled components are kept in memory only",
                    self.components.display()
                );
            }
        }
    }

    /// A small state file beside the artifacts (use counts, step
    /// durations), as saved by earlier hosts; empty if there is none.
    pub(crate) fn load_state<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> T {
        std::fs::read(self.root.join(name))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    pub(crate) fn save_state<T: serde::Serialize>(&self, name: &str, state: &T) {
        if !self.writable.load(Ordering::Relaxed) {
            return;
        }
        let path = self.root.join(name);
        let saved = serde_json::to_vec(state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomically(&path, &bytes));
        if let Err(e) = saved {
            tracing::debug!("could not save {}: {e}", path.display());
        }
    }
}

/// The payload of an artifact whose trailer checks out.
fn verified(bytes: &[u8]) -> Option<&[u8]> {
    let (payload, trailer) = bytes.split_at_checked(bytes.len().checked_sub(TRAILER)?)?;
    let (checksum, magic) = trailer.split_at(8);
    let checksum = u64::from_le_bytes(checksum.try_into().ok()?);
    (magic == MAGIC && xxhash_rust::xxh3::xxh3_64(payload) == checksum).then_some(payload)
}

/// Writes through a temporary file in the same directory and renames it
/// into place, so that no reader (in this process or another) sees half.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}.{}", std::process::id(), unique()));
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trailer_catches_truncation_and_corruption() {
        let mut bytes = b"payload".to_vec();
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(b"payload").to_le_bytes());
        bytes.extend_from_slice(MAGIC);
        assert_eq!(verified(&bytes), Some(&b"payload"[..]));
        assert_eq!(verified(&bytes[1..]), None);
        assert_eq!(verified(&bytes[..bytes.len() - 1]), None);
        assert_eq!(verified(b"short"), None);
        bytes[0] ^= 1;
        assert_eq!(verified(&bytes), None);
    }
}
