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
mod catalog;
mod engine;
mod events;
mod exec;
mod flow;
mod input;
mod instance;
mod plan;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::broadcast;

pub use self::catalog::{Catalog, Kind, PluginError, PluginInfo};
pub use self::engine::EngineConfig;
pub use self::events::Event;
pub use self::exec::{RunStatus, RunSummary, StepFailure, StepReport, StepStatus};
pub use self::flow::{Flow, FlowError, Format, LoaderSpec, Mount, PluginRef, Problem, Step};
pub use self::plan::Plan;

/// How a [`Host`] is set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The directory of plugin components (`NAME.wasm`).
    pub plugins_dir: PathBuf,
    /// The wasmtime engine's settings.
    pub engine: EngineConfig,
}

impl HostConfig {
    /// The defaults, with plugins from `plugins_dir`.
    pub fn new(plugins_dir: impl Into<PathBuf>) -> HostConfig {
        HostConfig { plugins_dir: plugins_dir.into(), engine: EngineConfig::default() }
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
    events: broadcast::Sender<Event>,
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
        let catalog = Catalog::new(config.plugins_dir, engine)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Host { catalog: Arc::new(catalog), events })
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
        Ok(exec::run(self.catalog.clone(), self.events.clone(), Arc::new(flow.clone()), input)
            .await)
    }
}
