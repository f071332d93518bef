//! The plugins directory: which plugins there are, which bytes each name
//! stands for now, what each needs, and how often each is used. The compiled
//! code itself comes from the component store.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;

use crate::bindings;
use crate::disk::Digest;
use crate::store::{ComponentStore, Plugin, World};

/// Why a plugin could not be used.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// No `NAME.wasm` in the plugins directory.
    #[error("no plugin `{name}` in {dir} (it has: {available})", available = list_or_none(.available))]
    NotFound {
        /// The name asked for.
        name: String,
        /// The plugins directory.
        dir: PathBuf,
        /// The plugins it does have.
        available: Vec<String>,
    },
    /// The plugins directory or a component file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// The file is not a valid WebAssembly component.
    #[error("{path} is not a valid WebAssembly component: {message}")]
    Compile {
        /// The component file.
        path: PathBuf,
        /// wasmtime's account.
        message: String,
    },
    /// The component imports something the host does not provide, or
    /// exports neither Qflow world.
    #[error(
        "{path} does not match a Qflow world (qflow:plugin/step or qflow:plugin/loader @0.1.0): {message}"
    )]
    NoWorld {
        /// The component file.
        path: PathBuf,
        /// What is missing or extra.
        message: String,
    },
    /// `describe()` trapped or said something inconsistent.
    #[error("{path}: describe() failed: {message}")]
    Describe {
        /// The component file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The flow asks for a version the plugin is not.
    #[error("plugin `{name}` is version {found}, but the flow asks for {wanted}")]
    Version {
        /// The plugin.
        name: String,
        /// The version the flow names.
        wanted: String,
        /// The version `describe()` reports.
        found: String,
    },
    /// A plugin needs another that could not be loaded.
    #[error("plugin `{name}` needs `{needs}`: {source}")]
    Dependency {
        /// The plugin.
        name: String,
        /// The plugin it needs.
        needs: String,
        /// Why that one could not be loaded.
        source: Box<PluginError>,
    },
    /// Plugins need each other in a circle.
    #[error("plugins need each other in a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// The host failed while loading it: a bug in the host, not the plugin.
    #[error("the host failed while loading a plugin: {0}")]
    Host(String),
    /// A step names a loader plugin, or a loader names a step plugin.
    #[error("plugin `{name}` is a {found}, not a {wanted}")]
    WrongKind {
        /// The plugin.
        name: String,
        /// What the flow needs here.
        wanted: Kind,
        /// What the plugin is.
        found: Kind,
    },
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() { "no plugins".to_owned() } else { names.join(", ") }
}

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A step of a flow.
    Step,
    /// A source of assets.
    Loader,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Step => "step",
            Kind::Loader => "loader",
        })
    }
}

/// What a plugin says about itself through `describe()`, and where it is.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    /// The name flows use: the file's stem.
    pub name: String,
    /// The version it reports.
    pub version: String,
    /// What it does.
    pub description: String,
    /// Its world.
    pub kind: Kind,
    /// The assets it reads, as `loader-id/name`.
    pub assets: Vec<String>,
    /// The plugins it needs loaded.
    pub needs: Vec<String>,
    /// Its component file.
    pub path: PathBuf,
    /// The SHA-256 digest of the file, in hex.
    pub digest: String,
}

impl Plugin {
    pub(crate) fn step(
        &self,
        name: &str,
    ) -> Result<&crate::bindings::step::StepPre<crate::instance::PluginState>, PluginError> {
        match &self.world {
            World::Step(pre) => Ok(pre),
            World::Loader(_) => Err(self.wrong_kind(name, Kind::Step)),
        }
    }

    pub(crate) fn loader(
        &self,
        name: &str,
    ) -> Result<&crate::bindings::loader::LoaderPre<crate::instance::PluginState>, PluginError>
    {
        match &self.world {
            World::Loader(pre) => Ok(pre),
            World::Step(_) => Err(self.wrong_kind(name, Kind::Loader)),
        }
    }

    /// Checks the version a flow asks for (`name@version`), if any.
    pub(crate) fn check_version(
        &self,
        name: &str,
        wanted: Option<&str>,
    ) -> Result<(), PluginError> {
        match wanted {
            Some(wanted) if wanted != self.described.version => Err(PluginError::Version {
                name: name.to_owned(),
                wanted: wanted.to_owned(),
                found: self.described.version.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn wrong_kind(&self, name: &str, wanted: Kind) -> PluginError {
        PluginError::WrongKind { name: name.to_owned(), wanted, found: self.described.kind }
    }
}

impl From<bindings::PluginKind> for Kind {
    fn from(kind: bindings::PluginKind) -> Kind {
        match kind {
            bindings::PluginKind::Step => Kind::Step,
            bindings::PluginKind::Loader => Kind::Loader,
        }
    }
}

/// What identifies a file's contents without reading it: when these are the
/// same, the digest computed last time still holds.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
}

/// The file, in the cache directory, of the use counts.
const USES: &str = "uses.json";

/// The fingerprint of the file at `path`, if it is one.
fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
    Some(Fingerprint { len: meta.len(), modified: meta.modified().ok() })
}

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

/// The plugins directory.
pub struct Catalog {
    dir: PathBuf,
    store: Arc<ComponentStore>,
    /// The digest each name stands for, and the file it was read from.
    digests: Mutex<HashMap<String, (Fingerprint, Digest)>>,
    /// Whether a watcher keeps `digests` current (see [`Catalog::resolve`]).
    watched: AtomicBool,
    /// How often each plugin and asset was used (`plugin:NAME`,
    /// `asset:KEY`), including by earlier hosts on the same cache.
    uses: Mutex<HashMap<String, u64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; recover the data if it ever did.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Catalog {
    pub(crate) fn new(dir: PathBuf, store: Arc<ComponentStore>) -> Catalog {
        let uses = store.disk().map(|disk| disk.load_state(USES)).unwrap_or_default();
        Catalog {
            dir,
            store,
            digests: Mutex::default(),
            watched: AtomicBool::new(false),
            uses: Mutex::new(uses),
        }
    }

    /// The plugins directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn store(&self) -> &Arc<ComponentStore> {
        &self.store
    }

    /// The names of the plugins in the directory (`NAME.wasm`), sorted.
    pub fn names(&self) -> Result<Vec<String>, PluginError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| PluginError::Read { path: self.dir.clone(), message: e.to_string() })?;
        let mut names: Vec<String> = entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let is_wasm = path.extension().is_some_and(|ext| ext == "wasm") && path.is_file();
                is_wasm.then(|| path.file_stem()?.to_str().map(str::to_owned))?
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Whether the directory has a plugin called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.path_of(name).is_file()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.wasm"))
    }

    /// Describes every plugin in the directory, loading those not yet loaded.
    pub async fn describe_all(&self) -> Result<Vec<Result<PluginInfo, PluginError>>, PluginError> {
        let names = self.names()?;
        let loads = names.iter().map(|name| self.describe(name));
        Ok(futures::future::join_all(loads).await)
    }

    /// Loads the plugin `name` (and what it needs) if it is not loaded yet,
    /// and says what it is.
    pub async fn describe(&self, name: &str) -> Result<PluginInfo, PluginError> {
        let plugin = self.load_with_needs(name, Vec::new()).await?;
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
            path: self.path_of(name),
            digest: hex::encode(plugin.digest),
        }
    }

    /// The plugin `name`, ready to instantiate, with the plugins it needs
    /// loaded too; counts as a use.
    pub(crate) async fn load(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        self.count_use(format!("plugin:{name}"));
        self.load_with_needs(name, Vec::new()).await
    }

    /// Loads `name` and what it needs without counting a use: for preloading.
    pub(crate) async fn preload(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        self.load_with_needs(name, Vec::new()).await
    }

    /// Loads `name`, then what it needs, in parallel; `chain` holds the
    /// plugins whose needs led here, to catch a cycle.
    fn load_with_needs<'a>(
        &'a self,
        name: &'a str,
        chain: Vec<&'a str>,
    ) -> BoxFuture<'a, Result<Arc<Plugin>, PluginError>> {
        async move {
            let plugin = self.load_one(name).await?;
            if plugin.described.needs.is_empty() {
                return Ok(plugin);
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
            Ok(plugin)
        }
        .boxed()
    }

    /// One plugin, without its needs: the digest its name stands for, then
    /// the component store.
    async fn load_one(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        let digest = self.resolve(name).await?;
        self.store.get(digest, name, &self.path_of(name)).await
    }

    /// The digest the name `name` stands for now. A watched catalog keeps
    /// what the last reload validated (a broken or half-written file never
    /// replaces a working version); otherwise the file is checked on every
    /// use and re-read only when it changed.
    async fn resolve(&self, name: &str) -> Result<Digest, PluginError> {
        if self.watched.load(Ordering::Acquire)
            && let Some((_, digest)) = lock(&self.digests).get(name)
        {
            return Ok(*digest);
        }
        let path = self.path_of(name);
        let Some(fingerprint) = fingerprint(&path) else {
            return Err(PluginError::NotFound {
                name: name.to_owned(),
                dir: self.dir.clone(),
                available: self.names().unwrap_or_default(),
            });
        };
        let known =
            lock(&self.digests).get(name).filter(|(f, _)| *f == fingerprint).map(|(_, d)| *d);
        if let Some(digest) = known {
            return Ok(digest);
        }
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| PluginError::Read { path: path.clone(), message: e.to_string() })?;
        let digest = crate::store::digest(&bytes);
        lock(&self.digests).insert(name.to_owned(), (fingerprint, digest));
        Ok(digest)
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
        let path = self.path_of(name);
        let Some(fingerprint) = fingerprint(&path) else {
            let old = lock(&self.digests).remove(name);
            return Ok(match old {
                Some((_, digest)) => Reload::Removed { old: digest },
                None => Reload::Unchanged,
            });
        };
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| PluginError::Read { path: path.clone(), message: e.to_string() })?;
        let digest = crate::store::digest(&bytes);
        let old = lock(&self.digests).get(name).map(|(_, d)| *d);
        if old == Some(digest) {
            lock(&self.digests).insert(name.to_owned(), (fingerprint, digest));
            return Ok(Reload::Unchanged);
        }
        let plugin = self.store.get(digest, name, &path).await?;
        lock(&self.digests).insert(name.to_owned(), (fingerprint, digest));
        let version = plugin.described.version.clone();
        Ok(match old {
            Some(old) => Reload::Replaced { old, new: digest, version },
            None => Reload::Added { new: digest, version },
        })
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

    pub(crate) fn engine(&self) -> &crate::engine::Engine {
        self.store.engine()
    }
}
