//! The component store: "give me the component with this digest, ready to
//! instantiate" — from memory (a byte-bounded LRU), else from the precompiled
//! artifact on disk, else compiled with Cranelift (off the async workers,
//! once however many ask at the same time) and saved for next time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::Digest as _;
use wasmtime::component::{Component, HasSelf, Linker};

use crate::bindings::{self, loader::LoaderPre, step::StepPre};
use crate::cache::{Cache, CacheStats, LoadError};
use crate::catalog::{Kind, PluginError};
use crate::disk::{Digest, DiskCache, Lookup};
use crate::engine::Engine;
use crate::instance::{Caller, Limits, PluginState, describe_failure};
use crate::sandbox::Grants;

/// How compiled components and loader assets are cached.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The most bytes of compiled code kept in memory; 256 MiB holds a few
    /// hundred typical plugins.
    pub memory_limit: u64,
    /// Where precompiled components are kept between processes; `None` keeps
    /// them in memory only. Default: `QFLOW_CACHE_DIR`, else the platform's
    /// cache directory (`~/.cache/qflow` on Linux).
    pub cache_dir: Option<PathBuf>,
    /// A plugin or asset used at least this many times (counted across
    /// processes, beside the disk cache) is loaded when a host starts.
    pub preload_threshold: u64,
    /// How long one load (a compile, a loader call) may take before the
    /// request fails; the load itself goes on and fills the cache.
    pub load_timeout: Duration,
    /// The most bytes of loader assets kept in memory.
    pub asset_memory_limit: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            memory_limit: 256 << 20,
            cache_dir: std::env::var_os("QFLOW_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| dirs::cache_dir().map(|dir| dir.join("qflow"))),
            preload_threshold: 3,
            load_timeout: Duration::from_secs(60),
            asset_memory_limit: 64 << 20,
        }
    }
}

/// The component store's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ComponentStats {
    /// The in-memory LRU of compiled components.
    #[serde(flatten)]
    pub memory: CacheStats,
    /// Components loaded from a precompiled artifact on disk.
    pub disk_hits: u64,
    /// Components compiled with Cranelift.
    pub compiles: u64,
    /// Time spent compiling, in ms.
    pub compile_ms: f64,
    /// Artifacts on disk that were unusable (corrupt, truncated, foreign)
    /// and were replaced.
    pub disk_rejects: u64,
}

/// `describe()` only returns constants: a plugin that takes longer is broken.
const DESCRIBE_TIME_LIMIT: Duration = Duration::from_secs(10);

/// The host's caches: compiled components and loader assets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Compiled components.
    pub components: ComponentStats,
    /// Loader assets.
    pub assets: CacheStats,
}

/// What `describe()` said, checked against the world the component implements.
#[derive(Debug, Clone)]
pub(crate) struct Described {
    pub(crate) version: String,
    pub(crate) description: String,
    pub(crate) kind: Kind,
    pub(crate) assets: Vec<String>,
    pub(crate) needs: Vec<String>,
}

/// A plugin compiled, linked against the host, and described: ready to
/// instantiate. Shared by every use of the same bytes, whatever their name.
pub(crate) struct Plugin {
    pub(crate) digest: Digest,
    pub(crate) described: Described,
    pub(crate) world: World,
}

pub(crate) enum World {
    Step(StepPre<PluginState>),
    Loader(LoaderPre<PluginState>),
}

impl World {
    fn kind(&self) -> Kind {
        match self {
            World::Step(_) => Kind::Step,
            World::Loader(_) => Kind::Loader,
        }
    }

    /// Calls `describe()` in a fresh instance.
    async fn describe(
        &self,
        store: &mut wasmtime::Store<PluginState>,
    ) -> wasmtime::Result<bindings::PluginInfo> {
        match self {
            World::Step(pre) => {
                pre.instantiate_async(&mut *store).await?.call_describe(store).await
            }
            World::Loader(pre) => {
                pre.instantiate_async(&mut *store).await?.call_describe(store).await
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    disk_hits: AtomicU64,
    compiles: AtomicU64,
    compile_nanos: AtomicU64,
    disk_rejects: AtomicU64,
}

pub(crate) struct ComponentStore {
    engine: Engine,
    linker: Linker<PluginState>,
    memory: Arc<Cache<Digest, Arc<Plugin>, PluginError>>,
    disk: Option<Arc<DiskCache>>,
    counters: Counters,
}

/// The SHA-256 digest of a component's bytes: its identity in every cache.
pub(crate) fn digest(bytes: &[u8]) -> Digest {
    sha2::Sha256::digest(bytes).into()
}

impl ComponentStore {
    pub(crate) fn new(engine: Engine, config: &StoreConfig) -> wasmtime::Result<ComponentStore> {
        let mut linker = Linker::new(engine.wasmtime());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::host::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |state| state)?;
        let disk = config
            .cache_dir
            .as_deref()
            .and_then(|dir| DiskCache::open(dir, engine.wasmtime()))
            .map(Arc::new);
        Ok(ComponentStore {
            memory: Arc::new(Cache::new(config.memory_limit, config.load_timeout)),
            engine,
            linker,
            disk,
            counters: Counters::default(),
        })
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_deref()
    }

    /// The plugin with `digest`, whose bytes are in the file `path` (read only
    /// if neither memory nor disk has it). `name` is for messages.
    pub(crate) async fn get(
        self: &Arc<Self>,
        digest: Digest,
        name: &str,
        path: &Path,
    ) -> Result<Arc<Plugin>, PluginError> {
        let store = self.clone();
        let (name, path_owned) = (name.to_owned(), path.to_path_buf());
        let loaded = self
            .memory
            .get_or_load(&digest, move || async move {
                let plugin = store.load(digest, &name, &path_owned).await?;
                let size = plugin_size(&plugin);
                Ok((Arc::new(plugin), size))
            })
            .await;
        loaded.map_err(|e| match e {
            LoadError::Failed(e) => e,
            other => PluginError::Compile { path: path.to_path_buf(), message: other.to_string() },
        })
    }

    /// Disk, else compile; then link and describe.
    async fn load(&self, digest: Digest, name: &str, path: &Path) -> Result<Plugin, PluginError> {
        let engine = self.engine.wasmtime().clone();
        let component = match self.load_precompiled(&engine, digest).await {
            Some(component) => component,
            None => self.compile(&engine, digest, path).await?,
        };
        self.link(component, digest, name, path).await
    }

    async fn load_precompiled(
        &self,
        engine: &wasmtime::Engine,
        digest: Digest,
    ) -> Option<Component> {
        let (disk, engine) = (self.disk.clone()?, engine.clone());
        let lookup = tokio::task::spawn_blocking(move || disk.load(&engine, &digest)).await.ok()?;
        match lookup {
            Lookup::Hit(component) => {
                self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                Some(component)
            }
            Lookup::Miss => None,
            Lookup::Corrupt(why) => {
                self.counters.disk_rejects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "precompiled artifact {} is unusable ({why}); recompiling",
                    hex::encode(digest)
                );
                None
            }
        }
    }

    async fn compile(
        &self,
        engine: &wasmtime::Engine,
        digest: Digest,
        path: &Path,
    ) -> Result<Component, PluginError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| PluginError::Read { path: path.to_path_buf(), message: e.to_string() })?;
        if self::digest(&bytes) != digest {
            return Err(PluginError::Read {
                path: path.to_path_buf(),
                message: "the file changed while it was being loaded; try again".into(),
            });
        }
        // Cranelift is CPU-bound for up to seconds: keep it off the async workers.
        let (engine, disk) = (engine.clone(), self.disk.clone());
        let started = Instant::now();
        let compiled = tokio::task::spawn_blocking(move || {
            let component = Component::new(&engine, &bytes)?;
            let compiled_in = started.elapsed();
            if let Some(disk) = disk {
                disk.save(&digest, &component);
            }
            Ok::<_, wasmtime::Error>((component, compiled_in))
        })
        .await;
        let compile_error =
            |message: String| PluginError::Compile { path: path.to_path_buf(), message };
        let (component, took) = compiled
            .map_err(|e| compile_error(e.to_string()))?
            .map_err(|e| compile_error(format!("{e:#}")))?;
        self.counters.compiles.fetch_add(1, Ordering::Relaxed);
        self.counters.compile_nanos.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        Ok(component)
    }

    async fn link(
        &self,
        component: Component,
        digest: Digest,
        name: &str,
        path: &Path,
    ) -> Result<Plugin, PluginError> {
        let no_world = |e: wasmtime::Error| PluginError::NoWorld {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        };
        let pre = self.linker.instantiate_pre(&component).map_err(no_world)?;
        let world = match StepPre::new(pre.clone()) {
            Ok(step) => World::Step(step),
            Err(as_step) => {
                World::Loader(LoaderPre::new(pre).map_err(|as_loader| PluginError::NoWorld {
                    path: path.to_path_buf(),
                    message: format!("as a step: {as_step:#}; as a loader: {as_loader:#}"),
                })?)
            }
        };
        let caller = Caller { name: Arc::from("describe"), plugin: Arc::from(name) };
        let deadline = Some(tokio::time::Instant::now() + DESCRIBE_TIME_LIMIT);
        let grants = Grants::default();
        let limits = Limits::default();
        let mut store = PluginState::store(&self.engine, caller, None, &grants, limits, deadline)
            .await
            .map_err(|message| PluginError::Describe { path: path.to_path_buf(), message })?;
        let info = match world.describe(&mut store).await {
            Ok(info) => info,
            Err(e) => {
                let message = describe_failure(&e, &store);
                return Err(PluginError::Describe { path: path.to_path_buf(), message });
            }
        };
        let (kind, said) = (world.kind(), Kind::from(info.kind));
        if said != kind {
            return Err(PluginError::Describe {
                path: path.to_path_buf(),
                message: format!("it says it is a {said} but implements the {kind} world"),
            });
        }
        let described = Described {
            version: info.version,
            description: info.description,
            kind,
            assets: info.assets,
            needs: info.needs,
        };
        Ok(Plugin { digest, described, world })
    }

    pub(crate) fn stats(&self) -> ComponentStats {
        ComponentStats {
            memory: self.memory.stats(),
            disk_hits: self.counters.disk_hits.load(Ordering::Relaxed),
            compiles: self.counters.compiles.load(Ordering::Relaxed),
            compile_ms: self.counters.compile_nanos.load(Ordering::Relaxed) as f64 / 1e6,
            disk_rejects: self.counters.disk_rejects.load(Ordering::Relaxed),
        }
    }
}

/// The compiled code a plugin holds, which is what memory is spent on.
fn plugin_size(plugin: &Plugin) -> u64 {
    let pre = match &plugin.world {
        World::Step(pre) => pre.instance_pre(),
        World::Loader(pre) => pre.instance_pre(),
    };
    let range = pre.component().image_range();
    (range.end as usize - range.start as usize) as u64
}
