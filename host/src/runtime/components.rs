//! The component store: "give me the component with this digest, ready to
//! instantiate" — from memory (a byte-bounded LRU), else from the precompiled
//! artifact on disk, else compiled with Cranelift (off the async workers,
//! once however many ask at the same time) and saved for next time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};

use super::bindings::{self, loader::LoaderPre, step::StepPre};
use super::cache::{Cache, LoadError, Outcome};
use super::disk::{DiskCache, Lookup};
use super::engine::Engine;
use super::plugin::{Described, Digest, Kind, LoadSource, Plugin, PluginError, World, digest};
use super::preflight;
use super::sandbox::Grants;
use super::sql::StepSql;
use super::state::{Caller, Limits, PluginState, describe_failure};
use crate::model::{ComponentStats, Emitter, EventData, printable};

/// How compiled components and loader assets are cached.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CacheConfig {
    /// The most bytes of compiled code kept in memory; 256 MiB holds a few
    /// hundred typical plugins.
    pub memory_limit: u64,
    /// Where precompiled components are kept between processes; `None` keeps
    /// them in memory only. Default: `QFLOW_CACHE_DIR`, else the platform's
    /// cache directory (`~/.cache/qflow` on Linux).
    pub dir: Option<PathBuf>,
    /// A plugin or asset used at least this many times (counted across
    /// processes, beside the disk cache) is loaded when a host starts.
    pub preload_threshold: u64,
    /// How long one compile, or one loader call, may take before the
    /// request fails (the wait for a compile slot does not count); the
    /// compile itself goes on and fills the disk cache.
    pub load_timeout: Duration,
    /// How many components compile at once (Cranelift is parallel inside
    /// each): one per core. More would only share the cores among them, so
    /// that every compile, not only the last, ends late.
    pub compile_concurrency: usize,
    /// The most bytes of loader assets kept in memory.
    pub asset_memory_limit: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_limit: 256 << 20,
            dir: std::env::var_os("QFLOW_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| dirs::cache_dir().map(|dir| dir.join("qflow"))),
            preload_threshold: 3,
            load_timeout: Duration::from_secs(60),
            compile_concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            asset_memory_limit: 64 << 20,
        }
    }
}

/// `describe()` only returns constants: a plugin that takes longer is broken.
const DESCRIBE_TIME_LIMIT: Duration = Duration::from_secs(10);

/// Reads a component's bytes (blocking: it runs off the async workers).
pub(crate) type ReadBytes = Box<dyn FnOnce() -> std::io::Result<Vec<u8>> + Send + 'static>;

#[derive(Default)]
struct Counters {
    disk_hits: AtomicU64,
    compiles: AtomicU64,
    compile_nanos: AtomicU64,
    disk_rejects: AtomicU64,
    files_hashed: AtomicU64,
    /// (compiles, disk hits) by plugin name, for the optimizer's evidence.
    by_name: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

pub(crate) struct ComponentStore {
    engine: Engine,
    /// A place among the compiles that may run at once.
    compiles: Arc<tokio::sync::Semaphore>,
    /// How long one compile may take.
    compile_timeout: Duration,
    linker: Linker<PluginState>,
    memory: Arc<Cache<Digest, Arc<Plugin>, PluginError>>,
    disk: Option<Arc<DiskCache>>,
    counters: Counters,
}

impl ComponentStore {
    pub(crate) fn new(
        engine: Engine,
        config: &CacheConfig,
        events: Emitter,
    ) -> wasmtime::Result<ComponentStore> {
        let mut linker = Linker::new(engine.wasmtime());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        super::sandbox::guard_symlinks(&mut linker)?;
        bindings::host::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |state| state)?;
        bindings::sql::add_to_linker::<_, HasSelf<StepSql>>(&mut linker, PluginState::sql)?;
        // Every older contract's imports, for components built against it.
        bindings::v0_1::qflow::plugin::host::add_to_linker::<_, HasSelf<PluginState>>(
            &mut linker,
            |state| state,
        )?;
        let disk = config
            .dir
            .as_deref()
            .and_then(|dir| DiskCache::open(dir, engine.wasmtime()))
            .map(Arc::new);
        Ok(ComponentStore {
            // A compile is timed by itself (not its wait for a slot); a load
            // is otherwise bounded by its parts' own limits (describe's).
            memory: Arc::new(Cache::new(config.memory_limit, None).on_evict(Box::new(
                move |evicted: Vec<(Digest, u64)>| {
                    events.emit(|| EventData::CacheEvicted {
                        cache: "components".into(),
                        bytes_freed: evicted.iter().map(|(_, size)| size).sum(),
                        entries: evicted.iter().map(|(digest, _)| hex::encode(digest)).collect(),
                        reason: "over the memory limit".into(),
                    })
                },
            ))),
            engine,
            compiles: Arc::new(tokio::sync::Semaphore::new(config.compile_concurrency.max(1))),
            compile_timeout: config.load_timeout,
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

    /// The plugin with `digest`. Its bytes come from `read` (the file
    /// `path`, named in messages), called only if neither memory nor disk has
    /// it; `name` is for messages.
    pub(crate) async fn get(
        self: &Arc<Self>,
        digest: Digest,
        name: &str,
        path: &Path,
        read: ReadBytes,
    ) -> Result<(Arc<Plugin>, LoadSource), PluginError> {
        let store = self.clone();
        let (name, path_owned) = (name.to_owned(), path.to_path_buf());
        let (loaded, outcome) = self
            .memory
            .get_or_load_traced(&digest, move || async move {
                let plugin = store.load(digest, &name, &path_owned, read).await?;
                let size = plugin.size();
                Ok((Arc::new(plugin), size))
            })
            .await;
        let source = |plugin: &Arc<Plugin>| match outcome {
            Outcome::Hit => LoadSource::Memory,
            Outcome::Loaded | Outcome::Joined => plugin.loaded_from,
        };
        let loaded = loaded.map(|plugin| {
            let source = source(&plugin);
            (plugin, source)
        });
        loaded.map_err(|e| match e {
            LoadError::Failed(e) => e,
            LoadError::TimedOut(limit) => PluginError::Timeout {
                path: path.to_path_buf(),
                timeout_ms: limit.as_millis() as u64,
            },
            LoadError::Panicked(message) => PluginError::Host(message),
        })
    }

    /// Disk, else compile; then link and describe.
    async fn load(
        &self,
        digest: Digest,
        name: &str,
        path: &Path,
        read: ReadBytes,
    ) -> Result<Plugin, PluginError> {
        let engine = self.engine.wasmtime().clone();
        let (component, compiled) = match self.load_precompiled(&engine, digest).await {
            Some(component) => (component, false),
            None => (self.compile(&engine, digest, path, read).await?, true),
        };
        {
            let mut by_name =
                self.counters.by_name.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let (compiles, disk_hits) = by_name.entry(name.to_owned()).or_default();
            *(if compiled { compiles } else { disk_hits }) += 1;
        }
        let source = if compiled { LoadSource::Compile } else { LoadSource::Disk };
        self.link(component, digest, name, path, source).await
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
        read: ReadBytes,
    ) -> Result<Component, PluginError> {
        let read_error =
            |e: std::io::Error| PluginError::Read { path: path.to_path_buf(), source: Arc::new(e) };
        let bytes = tokio::task::spawn_blocking(read)
            .await
            .map_err(|e| PluginError::Host(e.to_string()))?
            .map_err(read_error)?;
        if self::digest(&bytes) != digest {
            return Err(PluginError::Changed { path: path.to_path_buf() });
        }
        // Seconds of Cranelift are not spent on a component that cannot link.
        let problems = preflight::problems(&bytes);
        if !problems.is_empty() {
            return Err(PluginError::NoWorld {
                path: path.to_path_buf(),
                message: problems.join("; "),
            });
        }
        // Cranelift is CPU-bound for up to seconds: keep it off the async
        // workers, and at most `compile_concurrency` at once. The place is
        // held until the compile ends, even if its caller stopped waiting.
        let permit = self.compiles.clone().acquire_owned().await;
        let permit = permit.map_err(|e| PluginError::Host(e.to_string()))?;
        let (engine, disk) = (engine.clone(), self.disk.clone());
        let started = Instant::now();
        let compiling = tokio::task::spawn_blocking(move || {
            let component = Component::new(&engine, &bytes)?;
            let compiled_in = started.elapsed();
            if let Some(disk) = disk {
                disk.save(&digest, &component);
            }
            drop(permit);
            Ok::<_, wasmtime::Error>((component, compiled_in))
        });
        let compiled =
            tokio::time::timeout(self.compile_timeout, compiling).await.map_err(|_| {
                PluginError::Timeout {
                    path: path.to_path_buf(),
                    timeout_ms: self.compile_timeout.as_millis() as u64,
                }
            })?;
        let (component, took) =
            compiled.map_err(|e| PluginError::Host(e.to_string()))?.map_err(|e| {
                PluginError::Compile {
                    path: path.to_path_buf(),
                    source: Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(e)),
                }
            })?;
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
        loaded_from: LoadSource,
    ) -> Result<Plugin, PluginError> {
        let contract = contract(&component, self.engine.wasmtime())
            .map_err(|message| PluginError::NoWorld { path: path.to_path_buf(), message })?;
        let no_world = |e: wasmtime::Error| {
            let mut message = format!("{e:#}");
            // The version matched, the shapes did not: a changed copy of the WIT.
            if let Some(version) = contract.filter(|_| message.contains("qflow:plugin/")) {
                message = format!(
                    "its qflow:plugin@{version} imports differ from this host's qflow:plugin@{version} (was it built against a changed copy of wit/{version}?): {message}"
                );
            }
            PluginError::NoWorld { path: path.to_path_buf(), message }
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
        let mut warnings = Vec::new();
        let caller = Caller { name: Arc::from("describe"), plugin: Arc::from(name) };
        let deadline = tokio::time::Instant::now() + DESCRIBE_TIME_LIMIT;
        let grants = Grants::default();
        let limits = Limits::default();
        let described = |message| PluginError::Describe { path: path.to_path_buf(), message };
        let mut store =
            PluginState::host_call_store(&self.engine, caller, &grants, limits, Some(deadline))
                .await
                .map_err(described)?;
        // The epoch deadline stops a guest; this stops a host call the guest
        // is stuck in, and frees the instance's slot with it.
        let info = match tokio::time::timeout_at(deadline, world.describe(&mut store)).await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => return Err(described(describe_failure(&e, &store))),
            Err(_) => {
                let limit = DESCRIBE_TIME_LIMIT.as_millis();
                return Err(described(format!("describe() did not return within {limit} ms")));
            }
        };
        if info.name != name {
            let (path, said) = (path.display(), printable(&info.name));
            let warning = format!(
                "{path}: describe() says it is `{said}`, but flows know it by its file name, `{name}`: rename the file or the plugin"
            );
            tracing::warn!("{warning}");
            warnings.push(warning);
        }
        let (kind, said) = (world.kind(), Kind::from(info.kind));
        if said != kind {
            return Err(PluginError::Describe {
                path: path.to_path_buf(),
                message: format!("it says it is a {said} but implements the {kind} world"),
            });
        }
        let described = Described {
            warnings,
            version: info.version,
            description: info.description,
            kind,
            assets: info.assets,
            needs: info.needs,
        };
        Ok(Plugin { digest, described, world, loaded_from, contract })
    }

    /// A component file was read and hashed for its digest.
    pub(crate) fn count_hash(&self) {
        self.counters.files_hashed.fetch_add(1, Ordering::Relaxed);
    }

    /// (compiles, disk hits) by plugin name, since this host started.
    pub(crate) fn loads_by_name(&self) -> std::collections::HashMap<String, (u64, u64)> {
        self.counters.by_name.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub(crate) fn stats(&self) -> ComponentStats {
        ComponentStats {
            memory: self.memory.stats(),
            disk_hits: self.counters.disk_hits.load(Ordering::Relaxed),
            compiles: self.counters.compiles.load(Ordering::Relaxed),
            compile_ms: self.counters.compile_nanos.load(Ordering::Relaxed) as f64 / 1e6,
            disk_rejects: self.counters.disk_rejects.load(Ordering::Relaxed),
            files_hashed: self.counters.files_hashed.load(Ordering::Relaxed),
        }
    }
}

/// The contract version a component's imports name (`qflow:plugin/host@0.2.0`
/// → `0.2.0`), or why this host cannot run it: a version it does not know
/// (a newer one, most likely), or two versions at once.
fn contract(
    component: &Component,
    engine: &wasmtime::Engine,
) -> Result<Option<&'static str>, String> {
    let mut found: Option<&'static str> = None;
    for (name, _) in component.component_type().imports(engine) {
        let Some(interface) = name.strip_prefix("qflow:plugin/") else { continue };
        let version = interface.split_once('@').map_or("", |(_, version)| version);
        let Some(known) = bindings::CONTRACTS.iter().find(|&&v| v == version) else {
            return Err(format!(
                "it imports `{name}`, but this host speaks qflow:plugin@{} (build the plugin against one of them, or upgrade Qflow)",
                bindings::CONTRACTS.join(" and @")
            ));
        };
        match found {
            Some(other) if other != *known => {
                return Err(format!(
                    "it imports qflow:plugin@{other} and @{known} at once; build it against one contract"
                ));
            }
            _ => found = Some(known),
        }
    }
    Ok(found)
}
