//! The cache directory: precompiled components, and small state files (use
//! counts, step durations) that earlier hosts left.
//!
//! An artifact is `components/<sha256 of the component>-<engine hash>.cwasm`:
//! wasmtime's serialized component followed by a trailer that ties it to its
//! source (the component's digest and the engine hash) and checks its
//! integrity (an xxh3 checksum and a magic tag). It is written to a
//! temporary file and renamed, so a reader never sees half of one, and the
//! trailer is verified before wasmtime maps it: a corrupt, truncated or
//! foreign file (another plugin's artifact copied over this name) is a miss,
//! never a crash and never the wrong code.
//!
//! Reading and checksumming a whole artifact (35 MB for a Python step) on
//! every load would cost more than the load; so the full check is made once
//! per file, and the file's stamp (size, times, inode) recorded as
//! verified (`verified.json`). A later load whose file has that stamp checks
//! the trailer alone (64 bytes); a file changed in any way (written, or
//! renamed over: every save is a new inode) is checked in full again.
//!
//! The directory is opened once as a `cap_std::fs::Dir`, and every file is
//! reached through it.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use std::collections::HashMap;
use std::sync::Mutex;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde::{Deserialize, Serialize};
use wasmtime::component::Component;

use super::plugin::Digest;
use crate::lock;

const MAGIC: &[u8; 8] = b"QFLOWCW2";
/// digest, engine hash, checksum, magic.
const TRAILER: usize = 32 + 8 + 8 + MAGIC.len();

/// The state file of the artifacts checked in full.
const VERIFIED: &str = "verified.json";

/// What identifies a file's contents without reading them: its size, its
/// modification and change times and its inode. A write changes the times
/// (the change time cannot be set back by any tool), a rename-over the
/// inode. Make, git and rsync trust less than this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct FileStamp {
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
    inode: u64,
}

impl FileStamp {
    /// The stamp of a file's metadata (`std`'s converts with
    /// `cap_std::fs::Metadata::from_just_metadata`).
    pub(crate) fn of(meta: &cap_std::fs::Metadata) -> FileStamp {
        use cap_std::fs::MetadataExt;
        FileStamp {
            len: meta.len(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
            inode: meta.ino(),
        }
    }
}

/// What looking for an artifact found.
pub(crate) enum Lookup {
    Hit(Component),
    Miss,
    /// There was a file, but not a usable one: it will be overwritten.
    Corrupt(String),
}

pub(crate) struct DiskCache {
    root: Dir,
    components: Dir,
    /// Where `components` is, for wasmtime's `deserialize_file` and messages.
    components_path: PathBuf,
    /// The engine's compatibility hash, in every artifact's name and trailer.
    engine_hash: u64,
    /// Cleared after the first failed write: the cache is then read-only
    /// (or, if nothing can be read either, memory-only) with one warning.
    writable: AtomicBool,
    /// The artifacts checked in full, by name, as their files were then.
    verified: Mutex<HashMap<String, FileStamp>>,
}

impl DiskCache {
    /// Opens (creating if need be) the cache at `root`; `None`, with a
    /// warning, when it cannot be created.
    pub(crate) fn open(root: &Path, engine: &wasmtime::Engine) -> Option<DiskCache> {
        let components_path = root.join("components");
        let opened = std::fs::create_dir_all(&components_path).and_then(|()| {
            let root = Dir::open_ambient_dir(root, ambient_authority())?;
            let components = root.open_dir("components")?;
            Ok((root, components))
        });
        let (root, components) = match opened {
            Ok(dirs) => dirs,
            Err(e) => {
                tracing::warn!(
                    "the cache directory {} is unusable ({e}); compiled components are kept in memory only",
                    components_path.display()
                );
                return None;
            }
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let verified = read_state(&root, VERIFIED);
        Some(DiskCache {
            root,
            components,
            components_path,
            engine_hash: hasher.finish(),
            writable: AtomicBool::new(true),
            verified: Mutex::new(verified),
        })
    }

    fn name(&self, digest: &Digest) -> String {
        format!("{}-{:016x}.cwasm", hex::encode(digest), self.engine_hash)
    }

    /// The precompiled component for `digest`, if a sound one is on disk.
    /// Blocking: call it off the async workers.
    pub(crate) fn load(&self, engine: &wasmtime::Engine, digest: &Digest) -> Lookup {
        let name = self.name(digest);
        let stamp = match self.components.metadata(&name) {
            Ok(meta) => FileStamp::of(&meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Corrupt(format!("unreadable: {e}")),
        };
        let known = lock(&self.verified).get(&name) == Some(&stamp);
        let checked = if known {
            self.trailer(&name, stamp.len).and_then(|trailer| {
                check_trailer(&trailer, digest, self.engine_hash).map(drop).map_err(str::to_owned)
            })
        } else {
            self.verify(&name, digest, stamp)
        };
        if let Err(why) = checked {
            return Lookup::Corrupt(why);
        }
        // SAFETY: wasmtime requires that the file holds what its own
        // `serialize` produced for an engine like this one, and that it does
        // not change while mapped. Both hold because of how artifacts are
        // written: only by `save`, from wasmtime's own serialisation, into a
        // temporary file that is synced to disk and then renamed over the
        // name — never written in place. So the name always denotes a
        // complete artifact, even after a crash. The file
        // was checked in full (checksum, component digest and engine hash in
        // its trailer) either just now, or when it had the very stamp it has
        // now (size, times, inode: no write or rename since), and its
        // trailer again now; it is either the one wasmtime maps or a newer
        // complete artifact for the same digest and engine, renamed in
        // since. wasmtime maps it privately, so a later rename cannot change
        // code already loaded. (Another process writing into the cache
        // directory by hand, or the disk rotting a verified file in place,
        // is outside what any cache can defend against.)
        #[allow(unsafe_code)]
        let loaded =
            unsafe { Component::deserialize_file(engine, self.components_path.join(&name)) };
        match loaded {
            Ok(component) => Lookup::Hit(component),
            Err(e) => Lookup::Corrupt(format!("{e:#}")),
        }
    }

    /// The last bytes of the artifact `name`, `len` long: its trailer.
    fn trailer(&self, name: &str, len: u64) -> Result<[u8; TRAILER], String> {
        use std::os::unix::fs::FileExt;
        let at = len.checked_sub(TRAILER as u64).ok_or("truncated or not an artifact")?;
        let file = self.components.open(name).map_err(|e| format!("unreadable: {e}"))?;
        let mut trailer = [0; TRAILER];
        file.into_std().read_exact_at(&mut trailer, at).map_err(|e| format!("unreadable: {e}"))?;
        Ok(trailer)
    }

    /// The artifact `name` checked in full, and recorded as verified with
    /// `stamp` (the file as it was before reading; a change meanwhile gives
    /// it another stamp, so the record never covers bytes not checked).
    fn verify(&self, name: &str, digest: &Digest, stamp: FileStamp) -> Result<(), String> {
        let bytes = self.components.read(name).map_err(|e| format!("unreadable: {e}"))?;
        let payload = verified(&bytes, digest, self.engine_hash).map_err(str::to_owned)?;
        if wasmtime::Engine::detect_precompiled(payload) != Some(wasmtime::Precompiled::Component) {
            return Err("not a precompiled component".into());
        }
        self.record(name, stamp);
        Ok(())
    }

    fn record(&self, name: &str, stamp: FileStamp) {
        let mut verified = lock(&self.verified);
        // Artifacts no longer there are forgotten.
        verified.retain(|known, _| known == name || self.components.exists(known));
        verified.insert(name.to_owned(), stamp);
        // Written under the lock, so that of two records at once the last
        // write holds both.
        self.save_state(VERIFIED, &*verified);
    }

    /// Writes `component`'s artifact for `digest`. Blocking.
    pub(crate) fn save(&self, digest: &Digest, component: &Component) {
        if !self.writable.load(Ordering::Relaxed) {
            return;
        }
        let written = component.serialize().map_err(|e| e.to_string()).and_then(|mut bytes| {
            let checksum = xxhash_rust::xxh3::xxh3_64(&bytes);
            bytes.extend_from_slice(digest);
            bytes.extend_from_slice(&self.engine_hash.to_le_bytes());
            bytes.extend_from_slice(&checksum.to_le_bytes());
            bytes.extend_from_slice(MAGIC);
            let name = self.name(digest);
            write_atomically(&self.components, &name, &bytes).map_err(|e| e.to_string())?;
            // What we just wrote is what we checked: no need to read it back.
            if let Ok(meta) = self.components.metadata(&name) {
                self.record(&name, FileStamp::of(&meta));
            }
            Ok(())
        });
        if let Err(e) = written {
            // One warning, then a read-only cache.
            if self.writable.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    "cannot write to the cache directory {} ({e}); compiled components are kept in memory only",
                    self.components_path.display()
                );
            }
        }
    }

    /// A small state file beside the artifacts (use counts, step
    /// durations), as saved by earlier hosts; empty if there is none.
    pub(crate) fn load_state<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> T {
        read_state(&self.root, name)
    }

    /// Renames a state file that something else now keeps to
    /// `NAME.imported`, so it is taken only once.
    pub(crate) fn retire_state(&self, name: &str) {
        if self.root.exists(name) {
            let _ = self.root.rename(name, &self.root, format!("{name}.imported"));
        }
    }

    pub(crate) fn save_state<T: serde::Serialize>(&self, name: &str, state: &T) {
        if !self.writable.load(Ordering::Relaxed) {
            return;
        }
        let saved = serde_json::to_vec(state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomically(&self.root, name, &bytes));
        if let Err(e) = saved {
            tracing::debug!("could not save {name} in the cache directory: {e}");
        }
    }
}

/// The state file `name` in `root`, or the default if it is missing or
/// unreadable (state is a saving, never a necessity).
fn read_state<T: serde::de::DeserializeOwned + Default>(root: &Dir, name: &str) -> T {
    root.read(name).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}

/// A trailer that names `digest` and an engine with `engine_hash`: the
/// payload's checksum it holds (checking that needs the payload).
fn check_trailer(
    trailer: &[u8; TRAILER],
    digest: &Digest,
    engine_hash: u64,
) -> Result<u64, &'static str> {
    let le = |b: &[u8]| b.try_into().map(u64::from_le_bytes).unwrap_or_default();
    let (source, rest) = trailer.split_at(32);
    let (engine, rest) = rest.split_at(8);
    let (checksum, magic) = rest.split_at(8);
    if magic != MAGIC {
        return Err("truncated or not an artifact");
    }
    if source != digest {
        return Err("compiled from another component");
    }
    if le(engine) != engine_hash {
        return Err("compiled for another engine");
    }
    Ok(le(checksum))
}

/// The payload of an artifact whose trailer checks out for `digest` on an
/// engine with `engine_hash`, and whose checksum matches; otherwise why not.
fn verified<'a>(
    bytes: &'a [u8],
    digest: &Digest,
    engine_hash: u64,
) -> Result<&'a [u8], &'static str> {
    let truncated = "truncated or not an artifact";
    let at = bytes.len().checked_sub(TRAILER).ok_or(truncated)?;
    let (payload, trailer) = bytes.split_at(at);
    let checksum = check_trailer(trailer.try_into().map_err(|_| truncated)?, digest, engine_hash)?;
    if xxhash_rust::xxh3::xxh3_64(payload) != checksum {
        return Err("corrupt (checksum mismatch)");
    }
    Ok(payload)
}

/// Writes through a temporary file in the same directory and renames it
/// into place, so that no reader (in this process or another) sees half.
/// The data reaches the disk before the rename: after a crash, the name
/// holds the old file or the whole new one, never a new file's size and
/// times over blocks never written (which a stamp, trusted without reading
/// the file again, would not notice).
fn write_atomically(dir: &Dir, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = format!("{name}.tmp.{}.{}", std::process::id(), unique());
    let written = dir
        .create(&tmp)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_data()))
        .and_then(|()| dir.rename(&tmp, dir, name));
    written.inspect_err(|_| {
        let _ = dir.remove_file(&tmp);
    })
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(payload: &[u8], digest: &Digest, engine: u64) -> Vec<u8> {
        let mut bytes = payload.to_vec();
        bytes.extend_from_slice(digest);
        bytes.extend_from_slice(&engine.to_le_bytes());
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(payload).to_le_bytes());
        bytes.extend_from_slice(MAGIC);
        bytes
    }

    #[test]
    fn the_trailer_catches_truncation_corruption_and_foreign_artifacts() {
        let (digest, other) = ([7; 32], [8; 32]);
        let mut bytes = artifact(b"payload", &digest, 42);
        assert_eq!(verified(&bytes, &digest, 42), Ok(&b"payload"[..]));
        assert!(verified(&bytes[1..], &digest, 42).is_err());
        assert!(verified(&bytes[..bytes.len() - 1], &digest, 42).is_err());
        assert!(verified(b"short", &digest, 42).is_err());
        assert_eq!(verified(&bytes, &other, 42), Err("compiled from another component"));
        assert_eq!(verified(&bytes, &digest, 43), Err("compiled for another engine"));
        bytes[0] ^= 1;
        assert_eq!(verified(&bytes, &digest, 42), Err("corrupt (checksum mismatch)"));
    }
}
