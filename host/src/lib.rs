//! Qflow runs flows: DAGs of steps, each a WebAssembly component that a user
//! wrote in any component-model language and dropped into a plugins directory.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let host = qflow::Host::new(qflow::HostConfig::new("plugins"))?;
//! let flow = qflow::Flow::load("examples/orders-report.toml")?;
//! let summary = host.run(&flow, serde_json::json!({})).await?;
//! println!("{}", serde_json::to_string_pretty(&summary)?);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod assets;
mod bindings;
mod cache;
mod catalog;
mod disk;
mod engine;
mod events;
mod exec;
mod flow;
mod input;
mod instance;
mod plan;
mod pool;
mod sandbox;
mod store;
mod warm;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

pub use self::cache::CacheStats;
pub use self::catalog::{Catalog, Kind, PluginError, PluginInfo};
pub use self::engine::EngineConfig;
pub use self::events::Event;
pub use self::exec::{
    PlanFigures, RunOptions, RunStatus, RunSummary, StepFailure, StepReport, StepStatus,
};
pub use self::flow::{
    Flow, FlowError, Format, LoaderSpec, Mount, PluginRef, Problem, RetryPolicy, Step, Strategy,
};
pub use self::plan::{Conflict, Plan, Redundant};
pub use self::pool::{Manager, Pool, PoolConfig, PoolError, PoolStats, Pooled};
pub use self::store::{ComponentStats, Stats, StoreConfig};
pub use self::warm::PoolSettings;
pub use self::watch::Watch;
pub use tokio_util::sync::CancellationToken;

/// How a [`Host`] is set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The directory of plugin components (`NAME.wasm`).
    pub plugins_dir: PathBuf,
    /// The wasmtime engine's settings.
    pub engine: EngineConfig,
    /// How compiled components and assets are cached.
    pub store: StoreConfig,
    /// Load the plugins and assets used most (see
    /// [`StoreConfig::preload_threshold`]) in the background when the host
    /// starts; on by default.
    pub preload: bool,
    /// The largest output a step may return, in bytes (a flow may set its
    /// own): 16 MiB, far above what a step should pass on, far below what
    /// would hurt the host.
    pub max_output_bytes: u64,
    /// The default linear memory limit of every step, in bytes (a flow or
    /// step may set its own): 256 MiB, plenty for a step, and what stops a
    /// runaway guest long before it hurts the host.
    pub max_memory_bytes: u64,
    /// The most a step call may print and log (stdout, stderr, `host.log`)
    /// into its report, in bytes; the rest is counted and dropped: 1 MiB.
    pub max_log_bytes: u64,
    /// Instance pool settings for every step (a plugin's `NAME.plugin.toml` and a
    /// step's `pool` table override them).
    pub pool: PoolSettings,
}

impl HostConfig {
    /// The defaults, with plugins from `plugins_dir`.
    pub fn new(plugins_dir: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            plugins_dir: plugins_dir.into(),
            engine: EngineConfig::default(),
            store: StoreConfig::default(),
            preload: true,
            max_output_bytes: 16 << 20,
            max_memory_bytes: 256 << 20,
            max_log_bytes: 1 << 20,
            pool: PoolSettings::default(),
        }
    }
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The wasmtime engine could not be created.
    #[error("could not create the WebAssembly engine: {0}")]
    Engine(String),
    /// The plugins directory could not be watched.
    #[error("cannot watch the plugins directory {0}")]
    Watch(String),
}

/// A Qflow host: the engine, the plugins directory, and the runs on them.
/// Cheap to share: clone an `Arc<Host>` across tasks.
pub struct Host {
    catalog: Arc<Catalog>,
    assets: Arc<assets::AssetCache>,
    events: broadcast::Sender<Event>,
    preload_threshold: u64,
    max_output_bytes: u64,
    max_memory_bytes: u64,
    max_log_bytes: u64,
    pools: Arc<warm::Pools>,
    /// How long each step took lately (`flow/step` → ms, a moving average),
    /// for the critical path; kept beside the disk cache between hosts.
    history: Mutex<HashMap<String, f64>>,
}

/// The file, in the cache directory, of the step durations.
const HISTORY: &str = "history.json";

/// How much the latest duration of a step counts in its moving average.
const HISTORY_WEIGHT: f64 = 0.3;

fn history_key(flow: &Flow, step: &Step) -> String {
    format!("{}/{}", flow.name, step.id)
}

/// How many events a slow subscriber may fall behind before it misses some.
const EVENT_BUFFER: usize = 4096;

impl Host {
    /// Creates the engine and opens the plugins directory (nothing is
    /// compiled until a flow uses it).
    pub fn new(config: HostConfig) -> Result<Host, HostError> {
        let engine =
            engine::Engine::new(&config.engine).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        if !engine.pooling() {
            tracing::debug!("instances are allocated on demand (pooling off)");
        }
        let store = store::ComponentStore::new(engine, &config.store)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let catalog = Arc::new(Catalog::new(config.plugins_dir, Arc::new(store)));
        let assets =
            Arc::new(cache::Cache::new(config.store.asset_memory_limit, config.store.load_timeout));
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let history =
            catalog.store().disk().map(|disk| disk.load_state(HISTORY)).unwrap_or_default();
        let host = Host {
            catalog,
            assets,
            events,
            preload_threshold: config.store.preload_threshold,
            max_output_bytes: config.max_output_bytes,
            max_memory_bytes: config.max_memory_bytes,
            max_log_bytes: config.max_log_bytes,
            pools: Arc::new(warm::Pools::new(config.pool, config.engine.max_instances as usize)),
            history: Mutex::new(history),
        };
        if config.preload
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (catalog, assets, threshold) =
                (host.catalog.clone(), host.assets.clone(), host.preload_threshold);
            runtime.spawn(async move { preload(&catalog, &assets, threshold).await });
        }
        Ok(host)
    }

    /// Loads, now, the plugins and assets used at least
    /// [`StoreConfig::preload_threshold`] times (as counted by this host and
    /// earlier ones on the same cache directory); returns how many it loaded.
    /// A host does this by itself in the background when it starts.
    pub async fn preload(&self) -> usize {
        preload(&self.catalog, &self.assets, self.preload_threshold).await
    }

    /// The component store's and the asset cache's figures.
    pub fn stats(&self) -> Stats {
        Stats { components: self.catalog.store().stats(), assets: self.assets.stats() }
    }

    /// The plugins directory.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Events of every run on this host from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs a flow on `input` to the end. Fails before running anything if
    /// the flow names a plugin the plugins directory does not have; a step
    /// that fails is reported in the summary, not as an error.
    pub async fn run(
        &self,
        flow: &Flow,
        input: serde_json::Value,
    ) -> Result<RunSummary, FlowError> {
        self.run_with(flow, input, RunOptions::default()).await
    }

    /// [`Host::run`] with a parallelism limit and a cancellation token.
    pub async fn run_with(
        &self,
        flow: &Flow,
        input: serde_json::Value,
        options: RunOptions,
    ) -> Result<RunSummary, FlowError> {
        flow.check_plugins(&self.catalog)?;
        let plan = self.plan(flow);
        let inputs = exec::RunInputs {
            catalog: self.catalog.clone(),
            asset_cache: self.assets.clone(),
            events: self.events.clone(),
            max_output_bytes: self.max_output_bytes,
            max_memory_bytes: self.max_memory_bytes,
            max_log_bytes: self.max_log_bytes,
            pools: self.pools.clone(),
        };
        let mut summary = exec::run(inputs, Arc::new(flow.clone()), &plan, input, options).await;
        summary.store = self.stats();
        self.remember_durations(flow, &summary);
        Ok(summary)
    }

    /// The flow's dependency analysis, with step durations estimated from
    /// this host's (and earlier hosts') runs of it.
    pub fn plan(&self, flow: &Flow) -> Plan {
        let history = lock(&self.history);
        Plan::with_estimates(flow, |step| history.get(&history_key(flow, step)).copied())
    }

    fn remember_durations(&self, flow: &Flow, summary: &RunSummary) {
        let mut history = lock(&self.history);
        for (step, report) in flow.steps.iter().zip(&summary.steps) {
            if let (StepStatus::Succeeded, Some(ms)) = (report.status, report.duration_ms()) {
                let average = history.entry(history_key(flow, step)).or_insert(ms);
                *average += HISTORY_WEIGHT * (ms - *average);
            }
        }
    }

    /// Reloads the plugin `name` now: a new or changed `NAME.wasm` is
    /// validated and swapped in, a removed one retired, and events say so
    /// ([`Event::PluginAdded`] and the like). On failure the old version
    /// goes on serving.
    pub async fn reload(&self, name: &str) -> Result<(), PluginError> {
        self.reloader().reload(name).await
    }

    /// Watches the plugins directory and reloads what changes there, until
    /// the returned [`Watch`] is dropped. Must be called inside a tokio
    /// runtime.
    pub fn watch(&self) -> Result<Watch, HostError> {
        watch::start(self.catalog.dir(), self.reloader())
            .map_err(|e| HostError::Watch(format!("{}: {e}", self.catalog.dir().display())))
    }

    fn reloader(&self) -> watch::Reloader {
        watch::Reloader {
            catalog: self.catalog.clone(),
            pools: self.pools.clone(),
            events: self.events.clone(),
        }
    }

    /// Each instance pool's figures, by plugin name.
    pub fn pool_stats(&self) -> Vec<(String, PoolStats)> {
        self.pools.stats()
    }

    /// How many plugin instances are alive right now (running steps,
    /// loaders, `describe` calls).
    pub fn instances_in_use(&self) -> usize {
        self.catalog.engine().instances_in_use()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding the lock; recover the data if it ever did.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for Host {
    /// Saves the use counts and step durations, so that the next host
    /// preloads what this one used most and plans with what it learnt.
    fn drop(&mut self) {
        self.catalog.save_uses();
        if let Some(disk) = self.catalog.store().disk() {
            disk.save_state(HISTORY, &*lock(&self.history));
        }
    }
}

/// Loads every hot plugin that is still in the directory and every hot asset.
async fn preload(
    catalog: &Arc<Catalog>,
    assets: &Arc<assets::AssetCache>,
    threshold: u64,
) -> usize {
    let loads = catalog.hot(threshold).into_iter().map(|key| async move {
        if let Some(name) = key.strip_prefix("plugin:") {
            catalog.contains(name) && catalog.preload(name).await.is_ok()
        } else if let Some(asset) = assets::AssetKey::from_use_key(&key) {
            assets::fetch(catalog, assets, asset).await.is_ok()
        } else {
            false
        }
    });
    futures::future::join_all(loads).await.into_iter().filter(|loaded| *loaded).count()
}
