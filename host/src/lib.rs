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
mod store;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::broadcast;

pub use self::cache::CacheStats;
pub use self::catalog::{Catalog, Kind, PluginError, PluginInfo};
pub use self::engine::EngineConfig;
pub use self::events::Event;
pub use self::exec::{RunStatus, RunSummary, StepFailure, StepReport, StepStatus};
pub use self::flow::{Flow, FlowError, Format, LoaderSpec, Mount, PluginRef, Problem, Step};
pub use self::plan::Plan;
pub use self::store::{ComponentStats, Stats, StoreConfig};

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
}

impl HostConfig {
    /// The defaults, with plugins from `plugins_dir`.
    pub fn new(plugins_dir: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            plugins_dir: plugins_dir.into(),
            engine: EngineConfig::default(),
            store: StoreConfig::default(),
            preload: true,
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
}

/// A Qflow host: the engine, the plugins directory, and the runs on them.
/// Cheap to share: clone an `Arc<Host>` across tasks.
pub struct Host {
    catalog: Arc<Catalog>,
    assets: Arc<assets::AssetCache>,
    events: broadcast::Sender<Event>,
    preload_threshold: u64,
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
        let host =
            Host { catalog, assets, events, preload_threshold: config.store.preload_threshold };
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
        flow.check_plugins(&self.catalog)?;
        let flow = Arc::new(flow.clone());
        let mut summary =
            exec::run(self.catalog.clone(), self.assets.clone(), self.events.clone(), flow, input)
                .await;
        summary.store = self.stats();
        Ok(summary)
    }
}

impl Drop for Host {
    /// Saves the use counts, so the next host preloads what this one used most.
    fn drop(&mut self) {
        self.catalog.save_uses();
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
