//! The plugins directory: which plugins there are, which bytes each name
//! stands for now, each plugin's settings file, what each needs, and how
//! often each is used. The compiled code itself comes from the component
//! store.
//!
//! The directory is opened once as a `cap_std::fs::Dir` and every file is
//! reached through it: a name can only ever be `NAME.wasm` directly inside
//! it, and a symbolic link that leads outside is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::components::{ComponentStore, ReadBytes};
use super::disk::FileStamp;
use super::engine::Engine;
use super::plugin::{Digest, LoadSource, Plugin, PluginError, PluginInfo, digest, valid_name};
use crate::lock;
use crate::model::{HttpGrant, Numbers, PoolSettings};

/// What identifies a file's contents without reading it: when this is the
/// same, what was read last time still holds.
type Fingerprint = FileStamp;

/// The state file (in the cache directory) of the digests of the plugin
/// files hashed before, by path: a new process does not hash an unchanged
/// 18 MB component again.
const DIGESTS: &str = "digests.json";

/// The file, in the cache directory, of the use counts (when no run store
/// keeps them).
pub(crate) const USES: &str = "uses.json";

/// What a reload found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reload {
    /// The same bytes as before (or still no file).
    Unchanged,
    /// A new plugin.
    Added { new: Digest, version: String },
    /// New bytes for a known plugin, validated and swapped in.
    Replaced { old: Digest, new: Digest, version: String },
    /// The file is gone.
    Removed { old: Digest },
}

/// A plugin's own settings file, `NAME.plugin.toml` beside `NAME.wasm`
/// (not `NAME.toml`, which is what a flow kept beside it may be called).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    #[serde(default)]
    pool: PoolSettings,
    #[serde(default)]
    http: Vec<HttpGrant>,
}

/// What the operator set for a plugin in its settings file: its pools, and
/// the origins every step of it may reach (beside each step's own grants).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct PluginSettings {
    pub(crate) pool: PoolSettings,
    pub(crate) http: Arc<[HttpGrant]>,
}

/// The plugins directory.
pub struct Catalog {
    path: PathBuf,
    dir: Arc<Dir>,
    store: Arc<ComponentStore>,
    /// The digest each name stands for, and the file it was read from.
    digests: Mutex<HashMap<String, (Fingerprint, Digest)>>,
    /// The digests of files hashed before, by this host or an earlier one
    /// on the same cache directory, by path (hex digests, as kept).
    hashed: Mutex<HashMap<String, (Fingerprint, String)>>,
    /// Each plugin's settings file as last read (`None`: there was none).
    settings: Mutex<HashMap<String, (Option<Fingerprint>, PluginSettings)>>,
    /// Whether a watcher keeps `digests` and `settings` current (see
    /// [`Catalog::resolve`]).
    watched: AtomicBool,
    /// How often each plugin and asset was used (`plugin:NAME`,
    /// `asset:KEY`), including by earlier hosts on the same cache.
    uses: Mutex<HashMap<String, u64>>,
    /// The plugins loaded by preloading.
    preloaded: Mutex<std::collections::HashSet<String>>,
}

fn wasm(name: &str) -> String {
    format!("{name}.wasm")
}

fn settings_file(name: &str) -> String {
    format!("{name}.plugin.toml")
}

impl Catalog {
    /// Opens the plugins directory `path`.
    pub(crate) fn open(path: PathBuf, store: Arc<ComponentStore>) -> Result<Catalog, PluginError> {
        let dir = Dir::open_ambient_dir(&path, ambient_authority())
            .map_err(|e| PluginError::Read { path: path.clone(), source: Arc::new(e) })?;
        let uses = store.disk().map(|disk| disk.load_state(USES)).unwrap_or_default();
        let hashed = store.disk().map(|disk| disk.load_state(DIGESTS)).unwrap_or_default();
        Ok(Catalog {
            path,
            dir: Arc::new(dir),
            store,
            digests: Mutex::default(),
            hashed: Mutex::new(hashed),
            settings: Mutex::default(),
            watched: AtomicBool::new(false),
            uses: Mutex::new(uses),
            preloaded: Mutex::default(),
        })
    }

    /// The plugins directory.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub(crate) fn store(&self) -> &Arc<ComponentStore> {
        &self.store
    }

    pub(crate) fn engine(&self) -> &Engine {
        self.store.engine()
    }

    /// The names of the plugins in the directory (`NAME.wasm`), sorted.
    pub fn names(&self) -> Result<Vec<String>, PluginError> {
        let entries = self
            .dir
            .entries()
            .map_err(|e| PluginError::Read { path: self.path.clone(), source: Arc::new(e) })?;
        let mut names: Vec<String> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let file_name = entry.file_name().into_string().ok()?;
                let name = file_name.strip_suffix(".wasm")?;
                let kind = entry.file_type().ok()?;
                // Links are listed: using one that leads outside says so.
                let listed = valid_name(name) && (kind.is_file() || kind.is_symlink());
                listed.then(|| name.to_owned())
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Whether the directory has a plugin called `name`.
    pub fn contains(&self, name: &str) -> bool {
        if !valid_name(name) {
            return false;
        }
        // A name already resolved is looked at again when it is loaded (or
        // kept current by the watcher): no second `stat` on a run's path.
        if lock(&self.digests).contains_key(name) {
            return true;
        }
        // A valid name is a plain file name, so the path stays in the
        // directory; reading goes through the capability (see `read`).
        std::fs::symlink_metadata(self.path_of(&wasm(name))).is_ok_and(|m| !m.is_dir())
    }

    fn path_of(&self, file: &str) -> PathBuf {
        self.path.join(file)
    }

    /// The fingerprint of `file` in the directory; `None` if there is no
    /// such file. This is on every run's path, so it is one plain `stat`:
    /// `file` is a validated plain name, so the path cannot leave the
    /// directory, and a link that does is refused when the file is read,
    /// which only ever happens through the directory's capability.
    fn stat(&self, file: &str) -> Result<Option<Fingerprint>, PluginError> {
        match std::fs::metadata(self.path_of(file)) {
            Ok(meta) if meta.is_file() => {
                Ok(Some(FileStamp::of(&cap_std::fs::Metadata::from_just_metadata(meta))))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A link whose target is missing outside (`../x/…`) is not
                // "no such plugin": say where it leads.
                let is_link = std::fs::symlink_metadata(self.path_of(file))
                    .is_ok_and(|m| m.file_type().is_symlink());
                match self.dir.metadata(file) {
                    Err(e) if is_link && e.kind() != std::io::ErrorKind::NotFound => {
                        Err(PluginError::Escapes { path: self.path_of(file) })
                    }
                    _ => Ok(None),
                }
            }
            Err(e) => Err(PluginError::Read { path: self.path_of(file), source: Arc::new(e) }),
        }
    }

    /// Why reading `file` through the capability failed: a link that leads
    /// outside, or an I/O error.
    fn read_error(&self, file: &str, e: std::io::Error) -> PluginError {
        let is_link = self.dir.symlink_metadata(file).is_ok_and(|m| m.is_symlink());
        let path = self.path_of(file);
        if is_link && e.kind() != std::io::ErrorKind::NotFound {
            PluginError::Escapes { path }
        } else {
            PluginError::Read { path, source: Arc::new(e) }
        }
    }

    /// Reads `file` from the directory, off the async workers.
    fn reader(&self, file: String) -> ReadBytes {
        let dir = self.dir.clone();
        Box::new(move || dir.read(file))
    }

    async fn read(&self, file: &str) -> Result<Vec<u8>, PluginError> {
        let read = self.reader(file.to_owned());
        tokio::task::spawn_blocking(read)
            .await
            .map_err(|e| PluginError::Host(e.to_string()))?
            .map_err(|e| self.read_error(file, e))
    }

    /// Describes every plugin in the directory, loading those not yet loaded.
    /// Each plugin's name with what it is, or why it cannot be used.
    pub async fn describe_all(
        &self,
    ) -> Result<Vec<(String, Result<PluginInfo, PluginError>)>, PluginError> {
        let names = self.names()?;
        let loads = names.iter().map(|name| self.describe(name));
        let described = futures::future::join_all(loads).await;
        Ok(names.into_iter().zip(described).collect())
    }

    /// Loads the plugin `name` (and what it needs) if it is not loaded yet,
    /// and says what it is.
    pub async fn describe(&self, name: &str) -> Result<PluginInfo, PluginError> {
        let (plugin, _) = self.load_with_needs(name, Vec::new()).await?;
        Ok(self.info(name, &plugin))
    }

    fn info(&self, name: &str, plugin: &Plugin) -> PluginInfo {
        let d = &plugin.described;
        PluginInfo {
            name: name.to_owned(),
            version: d.version.clone(),
            description: d.description.clone(),
            kind: d.kind,
            assets: d.assets.clone(),
            needs: d.needs.clone(),
            path: self.path_of(&wasm(name)),
            digest: hex::encode(plugin.digest),
            loaded_from: plugin.loaded_from.as_str().to_owned(),
            contract: plugin.contract.map(str::to_owned),
            warnings: plugin.described.warnings.clone(),
        }
    }

    /// The plugin `name`, ready to instantiate, with the plugins it needs
    /// loaded too; counts as a use.
    pub(crate) async fn load(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        Ok(self.load_traced(name).await?.0)
    }

    /// [`Catalog::load`], saying where the plugin's own code came from.
    pub(crate) async fn load_traced(
        &self,
        name: &str,
    ) -> Result<(Arc<Plugin>, LoadSource), PluginError> {
        self.count_use(format!("plugin:{name}"));
        self.load_with_needs(name, Vec::new()).await
    }

    /// Loads `name` and what it needs without counting a use: for preloading.
    pub(crate) async fn preload(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        let (plugin, _) = self.load_with_needs(name, Vec::new()).await?;
        lock(&self.preloaded).insert(name.to_owned());
        Ok(plugin)
    }

    /// Whether `name` was loaded by preloading.
    pub(crate) fn was_preloaded(&self, name: &str) -> bool {
        lock(&self.preloaded).contains(name)
    }

    /// How often the plugin `name` was used, counted across processes.
    pub(crate) fn uses(&self, name: &str) -> u64 {
        lock(&self.uses).get(&format!("plugin:{name}")).copied().unwrap_or(0)
    }

    /// Loads `name`, then what it needs, in parallel; `chain` holds the
    /// plugins whose needs led here, to catch a cycle.
    fn load_with_needs<'a>(
        &'a self,
        name: &'a str,
        chain: Vec<&'a str>,
    ) -> BoxFuture<'a, Result<(Arc<Plugin>, LoadSource), PluginError>> {
        async move {
            let (plugin, source) = self.load_one(name).await?;
            if plugin.described.needs.is_empty() {
                return Ok((plugin, source));
            }
            let mut chain = chain;
            chain.push(name);
            let needs = plugin.described.needs.iter().map(|need| {
                let chain = chain.clone();
                async move {
                    if let Some(start) = chain.iter().position(|c| c == need) {
                        let mut cycle: Vec<String> =
                            chain[start..].iter().map(|c| (*c).to_owned()).collect();
                        cycle.push(need.clone());
                        return Err(PluginError::Cycle(cycle));
                    }
                    self.load_with_needs(need, chain).await.map_err(|e| match e {
                        cycle @ PluginError::Cycle(_) => cycle,
                        other => PluginError::Dependency {
                            name: name.to_owned(),
                            needs: need.clone(),
                            source: Box::new(other),
                        },
                    })
                }
            });
            futures::future::try_join_all(needs).await?;
            Ok((plugin, source))
        }
        .boxed()
    }

    /// One plugin, without its needs: the digest its name stands for, then
    /// the component store.
    async fn load_one(&self, name: &str) -> Result<(Arc<Plugin>, LoadSource), PluginError> {
        let digest = self.resolve(name).await?;
        let file = wasm(name);
        let path = self.path_of(&file);
        let loaded = self.store.get(digest, name, &path, self.reader(file.clone())).await;
        if let Err(PluginError::Changed { .. }) = &loaded {
            // The digest was taken from bytes half-rewritten under a stamp
            // that did not change after (the kernel's clock is coarse): it
            // must not stand for the file, here or in the cache's index.
            lock(&self.digests).remove(name);
            self.forget_hash(&file);
        }
        loaded
    }

    /// The digest the name `name` stands for now. A watched catalog keeps
    /// what the last reload validated (a broken or half-written file never
    /// replaces a working version); otherwise the file is checked on every
    /// use and re-read only when it changed.
    async fn resolve(&self, name: &str) -> Result<Digest, PluginError> {
        if !valid_name(name) {
            return Err(PluginError::BadName(name.to_owned()));
        }
        if self.watched.load(Ordering::Acquire)
            && let Some((_, digest)) = lock(&self.digests).get(name)
        {
            return Ok(*digest);
        }
        let file = wasm(name);
        let Some(fingerprint) = self.stat(&file)? else {
            return Err(PluginError::NotFound {
                name: name.to_owned(),
                dir: self.path.clone(),
                available: self.names().unwrap_or_default(),
            });
        };
        let known =
            lock(&self.digests).get(name).filter(|(f, _)| *f == fingerprint).map(|(_, d)| *d);
        if let Some(digest) = known {
            return Ok(digest);
        }
        let digest = match self.hashed_before(&file, fingerprint) {
            Some(digest) => digest,
            None => {
                let digest = digest(&self.read(&file).await?);
                self.store.count_hash();
                self.remember_hash(&file, fingerprint, digest);
                digest
            }
        };
        lock(&self.digests).insert(name.to_owned(), (fingerprint, digest));
        // A changed plugin may come with changed settings.
        self.forget_settings(name);
        Ok(digest)
    }

    /// The digest of `file`, if it was hashed before (by any host on this
    /// cache directory) and has not changed since.
    fn hashed_before(&self, file: &str, stamp: Fingerprint) -> Option<Digest> {
        let path = self.index_key(file)?;
        let hashed = lock(&self.hashed);
        let (known, hex_digest) = hashed.get(&path)?;
        let mut digest = [0; 32];
        (*known == stamp && hex::decode_to_slice(hex_digest, &mut digest).is_ok()).then_some(digest)
    }

    /// A file's key in the digest index: its absolute path.
    fn index_key(&self, file: &str) -> Option<String> {
        std::path::absolute(self.path_of(file)).ok()?.to_str().map(str::to_owned)
    }

    fn forget_hash(&self, file: &str) {
        let (Some(disk), Some(path)) = (self.store.disk(), self.index_key(file)) else { return };
        let mut hashed = lock(&self.hashed);
        if hashed.remove(&path).is_some() {
            disk.save_state(DIGESTS, &*hashed);
        }
    }

    fn remember_hash(&self, file: &str, stamp: Fingerprint, digest: Digest) {
        let (Some(disk), Some(path)) = (self.store.disk(), self.index_key(file)) else { return };
        let mut hashed = lock(&self.hashed);
        hashed.insert(path, (stamp, hex::encode(digest)));
        // Files no longer there are forgotten.
        hashed.retain(|path, _| Path::new(path).exists());
        // Written under the lock: two loads at once must not each write the
        // map as it was before the other's entry (a small file, rarely).
        disk.save_state(DIGESTS, &*hashed);
    }

    /// The plugin's own settings (pools, HTTP grants), from `NAME.plugin.toml` beside its
    /// component (none if there is no such file). Read on first use, and
    /// again once the plugin's component changes or the watcher sees the
    /// settings file change — not on every run, which would cost a `stat`
    /// each; read through the async file path, never under a lock.
    pub(crate) async fn settings(&self, name: &str) -> Result<PluginSettings, PluginError> {
        if let Some((_, settings)) = lock(&self.settings).get(name) {
            return Ok(settings.clone());
        }
        let file = settings_file(name);
        let fingerprint = self.stat(&file)?;
        let settings = match fingerprint {
            None => PluginSettings::default(),
            Some(_) => {
                let bytes = self.read(&file).await?;
                let invalid = |message: String| PluginError::Settings {
                    path: self.path_of(&file),
                    message: message.trim_end().to_owned(),
                };
                let text = String::from_utf8(bytes).map_err(|e| invalid(e.to_string()))?;
                let file =
                    toml::from_str::<SettingsFile>(&text).map_err(|e| invalid(e.to_string()))?;
                let pool = file.pool;
                let mut problems = Vec::new();
                Numbers::of("", &mut problems).pool("pool", &pool);
                if !problems.is_empty() {
                    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                    return Err(invalid(problems.join("; ")));
                }
                PluginSettings { pool, http: Arc::from(file.http) }
            }
        };
        lock(&self.settings).insert(name.to_owned(), (fingerprint, settings.clone()));
        Ok(settings)
    }

    /// Forgets `NAME.plugin.toml` as last read: the watcher saw it change.
    pub(crate) fn forget_settings(&self, name: &str) {
        lock(&self.settings).remove(name);
    }

    /// While watched, a name changes its digest only through
    /// [`Catalog::reload`]; otherwise files are checked on every use.
    pub(crate) fn set_watched(&self, watched: bool) {
        self.watched.store(watched, Ordering::Release);
    }

    /// Looks at `NAME.wasm` again: a new or changed file is compiled,
    /// linked and described, and only if all of that works does the name
    /// stand for it; a removed file retires the name.
    pub(crate) async fn reload(&self, name: &str) -> Result<Reload, PluginError> {
        if !valid_name(name) {
            return Err(PluginError::BadName(name.to_owned()));
        }
        let file = wasm(name);
        let Some(fingerprint) = self.stat(&file)? else {
            let old = lock(&self.digests).remove(name);
            return Ok(match old {
                Some((_, digest)) => Reload::Removed { old: digest },
                None => Reload::Unchanged,
            });
        };
        self.forget_settings(name);
        let bytes = self.read(&file).await?;
        let digest = digest(&bytes);
        self.store.count_hash();
        let old = lock(&self.digests).get(name).map(|(_, d)| *d);
        if old == Some(digest) {
            lock(&self.digests).insert(name.to_owned(), (fingerprint, digest));
            return Ok(Reload::Unchanged);
        }
        let read: ReadBytes = Box::new(move || Ok(bytes));
        let (plugin, _) = self.store.get(digest, name, &self.path_of(&file), read).await?;
        lock(&self.digests).insert(name.to_owned(), (fingerprint, digest));
        let version = plugin.described.version.clone();
        Ok(match old {
            Some(old) => Reload::Replaced { old, new: digest, version },
            None => Reload::Added { new: digest, version },
        })
    }

    /// Every use count.
    pub(crate) fn uses_snapshot(&self) -> Vec<(String, u64)> {
        lock(&self.uses).iter().map(|(key, n)| (key.clone(), *n)).collect()
    }

    /// Takes the use counts a run store kept.
    pub(crate) fn set_uses(&self, uses: HashMap<String, u64>) {
        *lock(&self.uses) = uses;
    }

    pub(crate) fn count_use(&self, key: String) {
        *lock(&self.uses).entry(key).or_default() += 1;
    }

    /// What was used at least `threshold` times.
    pub(crate) fn hot(&self, threshold: u64) -> Vec<String> {
        lock(&self.uses).iter().filter(|(_, n)| **n >= threshold).map(|(k, _)| k.clone()).collect()
    }

    /// Saves the use counts beside the disk cache, for the next host.
    pub(crate) fn save_uses(&self) {
        if let Some(disk) = self.store.disk() {
            disk.save_state(USES, &*lock(&self.uses));
        }
    }
}
