//! Pre-warmed instance pools: per (component, step config, loaders, pool
//! settings), instances already instantiated from the cached `InstancePre`
//! and initialised (`init(config)` has run), so that a step pays neither
//! compile, nor instantiation, nor init on its path.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use wasmtime::Store;

use crate::assets::Assets;
use crate::bindings::step::{Step as StepInstance, StepPre};
use crate::disk::Digest;
use crate::engine::Engine;
use crate::instance::{Caller, Limits, PluginState, describe_failure};
use crate::pool::{Manager, Pool, PoolConfig, PoolStats};
use crate::sandbox::Grants;

/// Pool settings, any of them: a step's (`pool = { … }` in the flow) over
/// its plugin's (`[pool]` in `NAME.plugin.toml` beside `NAME.wasm`) over the host's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// Initialised instances kept ready while the pool is in use (default 1).
    pub min: Option<usize>,
    /// Instances alive at most, ready and busy (default: the engine's `max_instances`).
    pub max: Option<usize>,
    /// How many calls one instance serves: 1 (the default) gives every call
    /// a fresh instance — the strongest isolation, with the pool keeping
    /// spares warm; more reuses an instance (and its `init`) that often.
    pub reuse: Option<u32>,
    /// An idle instance above `min` is dropped after this long (ms; 60 000);
    /// a pool nobody used for this long drops its `min` too.
    pub idle_timeout_ms: Option<u64>,
    /// How often idle instances are checked (ms; 30 000).
    pub health_check_ms: Option<u64>,
    /// How long instantiating and initialising one may take (ms; 10 000).
    pub create_timeout_ms: Option<u64>,
    /// How long a step waits for an instance when `max` are busy (ms; 30 000).
    pub acquire_timeout_ms: Option<u64>,
}

impl PoolSettings {
    /// These settings, with `fallback`'s where these say nothing.
    pub fn or(self, fallback: PoolSettings) -> PoolSettings {
        PoolSettings {
            min: self.min.or(fallback.min),
            max: self.max.or(fallback.max),
            reuse: self.reuse.or(fallback.reuse),
            idle_timeout_ms: self.idle_timeout_ms.or(fallback.idle_timeout_ms),
            health_check_ms: self.health_check_ms.or(fallback.health_check_ms),
            create_timeout_ms: self.create_timeout_ms.or(fallback.create_timeout_ms),
            acquire_timeout_ms: self.acquire_timeout_ms.or(fallback.acquire_timeout_ms),
        }
    }

    fn resolve(self, max_instances: usize) -> (PoolConfig, u32) {
        let defaults = PoolConfig { max: max_instances, ..PoolConfig::default() };
        let config = PoolConfig {
            min: self.min.unwrap_or(defaults.min),
            max: self.max.unwrap_or(defaults.max),
            idle_timeout_ms: self.idle_timeout_ms.unwrap_or(defaults.idle_timeout_ms),
            health_check_ms: self.health_check_ms.unwrap_or(defaults.health_check_ms),
            create_timeout_ms: self.create_timeout_ms.unwrap_or(defaults.create_timeout_ms),
            acquire_timeout_ms: self.acquire_timeout_ms.unwrap_or(defaults.acquire_timeout_ms),
        };
        (config, self.reuse.unwrap_or(1).max(1))
    }
}

/// A plugin's own settings file, `NAME.plugin.toml` beside `NAME.wasm`
/// (not `NAME.toml`, which is what a flow kept beside it may be called).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PluginFile {
    #[serde(default)]
    pool: PoolSettings,
}

/// Reads `NAME.plugin.toml` beside the component, if there is one.
pub(crate) fn plugin_settings(dir: &Path, name: &str) -> Result<PoolSettings, String> {
    let path = dir.join(format!("{name}.plugin.toml"));
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str::<PluginFile>(&text)
            .map(|file| file.pool)
            .map_err(|e| format!("{}: {}", path.display(), e.to_string().trim_end())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PoolSettings::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Why an instance could not be made ready.
#[derive(Debug, Clone)]
pub(crate) enum InitError {
    /// `init` returned an error: the config is bad.
    Config { code: String, message: String },
    /// Instantiation or `init` trapped.
    Trap { phase: &'static str, message: String },
    /// A granted directory could not be opened.
    Grant(String),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Config { message, .. } => write!(f, "rejected its config: {message}"),
            InitError::Trap { phase, message } => write!(f, "trapped in {phase}: {message}"),
            InitError::Grant(message) => f.write_str(message),
        }
    }
}

/// An instance, initialised, ready for `run`.
pub(crate) struct Warm {
    pub(crate) store: Store<PluginState>,
    pub(crate) instance: StepInstance,
    /// Calls it has served.
    pub(crate) calls: u32,
}

/// Makes instances of one step plugin with one config.
pub(crate) struct InstanceManager {
    engine: Engine,
    pre: StepPre<PluginState>,
    config: String,
    assets: Arc<Assets>,
    plugin: Arc<str>,
    grants: Grants,
    limits: Limits,
}

impl Manager for InstanceManager {
    type Resource = Warm;
    type Error = InitError;

    async fn create(&self) -> Result<Warm, InitError> {
        let caller = Caller { name: Arc::from("(warming)"), plugin: self.plugin.clone() };
        let assets = Some(self.assets.clone());
        let (grants, limits) = (&self.grants, self.limits);
        let mut store = PluginState::store(&self.engine, caller, assets, grants, limits, None)
            .await
            .map_err(InitError::Grant)?;
        let trap = |phase, e: wasmtime::Error, store: &Store<PluginState>| InitError::Trap {
            phase,
            message: describe_failure(&e, store),
        };
        let instance = match self.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            Err(e) => return Err(trap("instantiation", e, &store)),
        };
        match instance.call_init(&mut store, &self.config).await {
            Ok(Ok(())) => Ok(Warm { store, instance, calls: 0 }),
            Ok(Err(e)) => Err(InitError::Config { code: e.code, message: e.message }),
            Err(e) => Err(trap("init", e, &store)),
        }
    }
}

/// One step plugin's pool, and how often its instances may be reused.
pub(crate) struct StepPool {
    pub(crate) pool: Pool<InstanceManager>,
    pub(crate) reuse: u32,
    plugin: Arc<str>,
}

/// What makes two steps share a pool: the same bytes, the same config, the
/// same loaders (their `init` may read assets), the same grants and limits,
/// and the same settings.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) digest: Digest,
    pub(crate) config: String,
    pub(crate) loaders: Arc<str>,
    pub(crate) grants: Grants,
    pub(crate) limits: Limits,
    pub(crate) settings: PoolSettings,
}

/// Every instance pool of a host.
pub(crate) struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<StepPool>>>,
    defaults: PoolSettings,
    max_instances: usize,
}

/// What a new pool is made of.
pub(crate) struct PoolSource<'a> {
    pub(crate) engine: &'a Engine,
    pub(crate) pre: &'a StepPre<PluginState>,
    pub(crate) plugin: &'a str,
    pub(crate) plugins_dir: &'a Path,
    pub(crate) assets: &'a Arc<Assets>,
}

impl Pools {
    pub(crate) fn new(defaults: PoolSettings, max_instances: usize) -> Pools {
        Pools { pools: Mutex::default(), defaults, max_instances }
    }

    /// The pool for `key`, made on first use.
    pub(crate) fn get(
        &self,
        key: &PoolKey,
        source: PoolSource<'_>,
    ) -> Result<Arc<StepPool>, String> {
        let mut pools = self.pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(pool) = pools.get(key) {
            return Ok(pool.clone());
        }
        // Forget pools nobody uses any more (a flow run once with a config
        // of its own): their maintenance tasks end with them.
        pools.retain(|_, pool| !pool.pool.is_abandoned());
        let from_file = plugin_settings(source.plugins_dir, source.plugin)?;
        let (config, reuse) =
            key.settings.or(from_file).or(self.defaults).resolve(self.max_instances);
        let manager = InstanceManager {
            engine: source.engine.clone(),
            pre: source.pre.clone(),
            config: key.config.clone(),
            assets: source.assets.clone(),
            plugin: Arc::from(source.plugin),
            grants: key.grants.clone(),
            limits: key.limits,
        };
        let pool = Arc::new(StepPool {
            pool: Pool::new(manager, config),
            reuse,
            plugin: Arc::from(source.plugin),
        });
        pools.insert(key.clone(), pool.clone());
        Ok(pool)
    }

    /// Drops the pools of a component that was replaced or removed: no new
    /// step gets them; their idle instances go now, busy ones when their
    /// call ends. (A run still pinned to that version gets a new pool.)
    pub(crate) fn retire(&self, digest: &Digest) {
        let mut pools = self.pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let retired: Vec<Arc<StepPool>> =
            pools.extract_if(|key, _| key.digest == *digest).map(|(_, pool)| pool).collect();
        drop(pools);
        for retired in retired {
            tokio::spawn(async move { retired.pool.drain().await });
        }
    }

    /// Each pool's figures, by plugin.
    pub(crate) fn stats(&self) -> Vec<(String, PoolStats)> {
        let pools = self.pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut stats: Vec<(String, PoolStats)> =
            pools.values().map(|p| (p.plugin.to_string(), p.pool.stats())).collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }
}
