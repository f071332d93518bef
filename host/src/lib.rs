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
//!
//! The crate is three layers, and dependencies point one way:
//! [`model`] (flows, plans, reports, events: plain data) ←
//! `runtime` (everything wasmtime) ← `run` (the scheduler, which reaches
//! instances only through its `StepInvoker` seam) ← this facade, [`Host`].
#![deny(missing_docs)]

mod invoke;
pub mod model;
pub mod pool;
mod run;
mod runtime;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tracing::Instrument;

pub use self::model::{
    CacheStats, ComponentStats, Conflict, Event, EventData, FailureKind, Flow, FlowError,
    FlowLimits, Format, Json, Keep, LoaderSpec, Mount, OptimizationMetrics, Plan, PlanFigures,
    PluginRef, PoolSettings, PoolStats, Problem, Redundant, RetryPolicy, RunStatus, RunSummary,
    RunTotals, Stats, Step, StepFailure, StepLog, StepReport, StepStatus, Strategy, error_chain,
};
pub use self::run::RunOptions;
pub use self::runtime::{
    CacheConfig, Catalog, Cause, EngineConfig, HttpConfig, Kind, MemoryStats, PluginError,
    PluginInfo, ResetPath, SqlConfig, Watch,
};
pub use tokio_util::sync::CancellationToken;

use self::invoke::{Defaults, WasmInvoker};
use self::model::{Emitter, EventBus};
use self::model::{RunQuery, RunStart, RunStore, StoreError, StoreWrite};
use self::runtime::{AssetCache, AssetKey, ComponentStore, Engine, Pools, Reloader};
use self::store::RunWriter;

/// How a [`Host`] is set up: [`HostConfig::new`], then change what you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HostConfig {
    /// The directory of plugin components (`NAME.wasm`).
    pub plugins_dir: PathBuf,
    /// The wasmtime engine's settings.
    pub engine: EngineConfig,
    /// How compiled components and assets are cached.
    pub cache: CacheConfig,
    /// Load the plugins and assets used most (see
    /// [`CacheConfig::preload_threshold`]) in the background when the host
    /// starts; on by default.
    pub preload: bool,
    /// The largest output a step may return, in bytes (a flow may set a
    /// lower limit, never a higher one): 16 MiB, far above what a step
    /// should pass on, far below what would hurt the host.
    pub max_output_bytes: u64,
    /// The linear memory limit of every step, in bytes (a flow or step may
    /// set a lower one): 256 MiB, plenty for a step, and what stops a
    /// runaway guest long before it hurts the host.
    pub max_memory_bytes: u64,
    /// The most a step call may print and log (stdout, stderr, `host.log`)
    /// into its report, in bytes; the rest is counted and dropped: 1 MiB (a
    /// flow may set a lower limit).
    pub max_log_bytes: u64,
    /// Instance pool settings for every step (a plugin's `NAME.plugin.toml` and a
    /// step's `pool` table override them).
    pub pool: PoolSettings,
    /// The timeout of a step that has none in its flow: 15 minutes, so a
    /// step that waits forever cannot hang its run.
    pub step_timeout: std::time::Duration,
    /// How long a run may take in all: 24 hours, a net under the step
    /// timeouts rather than a budget.
    pub run_timeout: std::time::Duration,
    /// Databases every flow's steps may be granted by id, beside those a
    /// flow declares itself (`[[database]]`).
    pub databases: Vec<model::Database>,
}

impl HostConfig {
    /// The defaults, with plugins from `plugins_dir`.
    pub fn new(plugins_dir: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            plugins_dir: plugins_dir.into(),
            engine: EngineConfig::default(),
            cache: CacheConfig::default(),
            preload: true,
            max_output_bytes: 16 << 20,
            max_memory_bytes: 256 << 20,
            max_log_bytes: 1 << 20,
            pool: PoolSettings::default(),
            step_timeout: std::time::Duration::from_secs(15 * 60),
            run_timeout: std::time::Duration::from_secs(24 * 60 * 60),
            databases: Vec::new(),
        }
    }

    /// Adds a database steps may be granted.
    pub fn database(mut self, database: model::Database) -> HostConfig {
        self.databases.push(database);
        self
    }

    /// Keeps precompiled components in `dir` (`None`: in memory only).
    pub fn cache_dir(mut self, dir: Option<PathBuf>) -> HostConfig {
        self.cache.dir = dir;
        self
    }

    /// Whether to preload hot plugins and assets at start-up.
    pub fn preload(mut self, preload: bool) -> HostConfig {
        self.preload = preload;
        self
    }

    /// Instance pool settings for every step.
    pub fn pool(mut self, pool: PoolSettings) -> HostConfig {
        self.pool = pool;
        self
    }

    /// Every number in range, as in a flow.
    fn check(&self) -> Result<(), HostError> {
        let mut problems = Vec::new();
        let mut numbers = model::Numbers::of("", &mut problems);
        let memory_mb = self.max_memory_bytes.div_ceil(1 << 20);
        numbers.check("max_memory_bytes", Some(memory_mb), model::MEMORY_MB, "MiB");
        numbers.check(
            "max_output_bytes",
            Some(self.max_output_bytes),
            model::OUTPUT_BYTES,
            "bytes",
        );
        numbers.check("max_log_bytes", Some(self.max_log_bytes), model::LOG_BYTES, "bytes");
        numbers.pool("pool", &self.pool);
        let engine = &self.engine;
        numbers.check(
            "engine.max_instances",
            Some(engine.max_instances.into()),
            1..=100_000,
            "instances",
        );
        numbers.check(
            "engine.max_total_memory_mb",
            Some(engine.max_total_memory_mb),
            16..=1 << 30,
            "MiB",
        );
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        numbers.check("engine.epoch_tick", Some(ms(engine.epoch_tick)), 1..=1000, "ms");
        let cache = &self.cache;
        numbers.check("cache.memory_limit", Some(cache.memory_limit), 1 << 20..=u64::MAX, "bytes");
        numbers.check(
            "cache.asset_memory_limit",
            Some(cache.asset_memory_limit),
            0..=1 << 40,
            "bytes",
        );
        numbers.check("cache.load_timeout", Some(ms(cache.load_timeout)), 1..=86_400_000, "ms");
        numbers.check(
            "cache.compile_concurrency",
            Some(cache.compile_concurrency as u64),
            1..=1024,
            "compiles",
        );
        numbers.check("step_timeout", Some(ms(self.step_timeout)), model::TIMEOUT_MS, "ms");
        numbers.check("run_timeout", Some(ms(self.run_timeout)), model::TIMEOUT_MS, "ms");
        let mut ids = std::collections::HashSet::new();
        for database in &self.databases {
            model::check_database(database, &mut problems);
            if !ids.insert(database.id.as_str()) {
                problems.push(Problem::DuplicateId { what: "database", id: database.id.clone() });
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(HostError::Config(problems)) }
    }
}

/// Why a host could not start, or could not watch its plugins.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The wasmtime engine could not be created.
    #[error("could not create the WebAssembly engine")]
    Engine(#[source] Cause),
    /// The plugins directory could not be opened.
    #[error("cannot use the plugins directory")]
    Plugins(#[source] PluginError),
    /// A setting is out of range (each problem names the field).
    #[error("invalid host configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Config(Vec<Problem>),
    /// The plugins directory could not be watched.
    #[error("cannot watch the plugins directory {path}")]
    Watch {
        /// The plugins directory.
        path: PathBuf,
        /// What the file watcher said.
        #[source]
        source: Arc<notify_debouncer_mini::notify::Error>,
    },
}

fn cause(error: wasmtime::Error) -> Cause {
    Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(error))
}

/// A Qflow host: the engine, the plugins directory, and the runs on them.
/// Cheap to share: clone an `Arc<Host>` across tasks.
pub struct Host {
    catalog: Arc<Catalog>,
    assets: Arc<AssetCache>,
    events: EventBus,
    plugin_events: Emitter,
    optimizer_events: Emitter,
    preload_threshold: u64,
    defaults: Defaults,
    pools: Arc<Pools>,
    /// How long each step took lately (`flow/step` → ms, a moving average),
    /// for the critical path; kept beside the disk cache between hosts.
    history: Mutex<Durations>,
    /// Each flow's graph analysis, by the hash of its text: a run only adds
    /// its estimates.
    analyses: Mutex<lru::LruCache<u128, Arc<model::Analysis>>>,
    /// What the finished runs add up to, counted as each ends.
    totals: Mutex<RunTotals>,
    /// Where runs are kept, and the task that writes them there.
    runs: Option<(Arc<dyn RunStore>, RunWriter)>,
    /// The default step and run timeouts.
    timeouts: (std::time::Duration, std::time::Duration),
    /// Whether hot plugins are preloaded (again once a store says which).
    preload: bool,
    /// The databases the host declares.
    databases: Arc<[model::Database]>,
    /// When the last metrics snapshot went to the store.
    snapshot: Mutex<Option<std::time::Instant>>,
}

/// How often, at most, a metrics snapshot is kept while runs end.
const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The file, in the cache directory, of the step durations.
const HISTORY: &str = "history.json";

/// How much the latest duration of a step counts in its moving average.
const HISTORY_WEIGHT: f64 = 0.3;

/// Now, in ms since the Unix epoch, as the run store keeps times.
fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What the store keeps of a run as it starts.
fn run_start(run_id: &str, flow: &Flow, input: &serde_json::Value) -> RunStart {
    RunStart {
        run_id: run_id.to_owned(),
        flow: flow.name.clone(),
        flow_text: flow.text.to_string(),
        flow_origin: flow.origin.clone(),
        flow_hash: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(flow.text.as_bytes())),
        input: input.clone(),
        started_at_ms: unix_ms(),
    }
}

/// Each step's recent duration in ms (a moving average), by flow and step:
/// looked up per run without building a key.
#[derive(Default)]
struct Durations(HashMap<String, HashMap<String, f64>>);

impl Durations {
    /// From the file's form, `{"flow/step": ms}`.
    fn from_file(flat: HashMap<String, f64>) -> Durations {
        let mut durations = Durations::default();
        for (key, ms) in flat {
            if let Some((flow, step)) = key.split_once('/') {
                durations.0.entry(flow.to_owned()).or_default().insert(step.to_owned(), ms);
            }
        }
        durations
    }

    /// To the file's form.
    fn to_file(&self) -> HashMap<String, f64> {
        let steps = self.0.iter().flat_map(|(flow, steps)| {
            steps.iter().map(move |(step, ms)| (format!("{flow}/{step}"), *ms))
        });
        steps.collect()
    }

    fn of(&self, flow: &Flow) -> Option<&HashMap<String, f64>> {
        self.0.get(&flow.name)
    }
}

/// How many flows' analyses a host keeps.
const ANALYSES: usize = 256;

impl Host {
    /// Creates the engine and opens the plugins directory (nothing is
    /// compiled until a flow uses it).
    pub fn new(config: HostConfig) -> Result<Host, HostError> {
        config.check()?;
        let engine = Engine::new(&config.engine).map_err(|e| HostError::Engine(cause(e)))?;
        if !engine.pooling() {
            tracing::debug!("instances are allocated on demand (pooling off)");
        }
        let max_instances = config.engine.max_instances as usize;
        let events = EventBus::new();
        let components = events.emitter("/qflow/components".into());
        let store = ComponentStore::new(engine, &config.cache, components)
            .map_err(|e| HostError::Engine(cause(e)))?;
        let catalog =
            Catalog::open(config.plugins_dir, Arc::new(store)).map_err(HostError::Plugins)?;
        let catalog = Arc::new(catalog);
        let history =
            catalog.store().disk().map(|disk| disk.load_state(HISTORY)).unwrap_or_default();
        let history = Durations::from_file(history);
        let pools = Arc::new(Pools::new(config.pool, max_instances));
        // When slots or memory run short, idle pooled instances go first.
        let reclaim: std::sync::Weak<dyn runtime::Reclaim> = Arc::downgrade(&pools) as _;
        catalog.engine().set_reclaimer(reclaim);
        let assets = runtime::asset_cache(&config.cache, events.emitter("/qflow/assets".into()));
        let host = Host {
            assets: Arc::new(assets),
            plugin_events: events.emitter("/qflow/plugins".into()),
            optimizer_events: events.emitter("/qflow/optimization".into()),
            events,
            catalog,
            preload_threshold: config.cache.preload_threshold,
            defaults: Defaults {
                max_output_bytes: config.max_output_bytes,
                max_memory_bytes: config.max_memory_bytes,
                max_log_bytes: config.max_log_bytes,
            },
            pools: pools.clone(),
            timeouts: (config.step_timeout, config.run_timeout),
            preload: config.preload,
            databases: config.databases.into(),
            snapshot: Mutex::new(None),
            history: Mutex::new(history),
            analyses: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(ANALYSES).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            totals: Mutex::default(),
            runs: None,
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
    /// [`CacheConfig::preload_threshold`] times (as counted by this host and
    /// earlier ones on the same cache directory); returns how many it loaded.
    /// A host does this by itself in the background when it starts.
    pub async fn preload(&self) -> usize {
        preload(&self.catalog, &self.assets, self.preload_threshold).await
    }

    /// Keeps every run of this host in `store`: its start, its flow and
    /// input, its events and its summary; the host's own events; a metrics
    /// snapshot every 10 s while runs end; each step's recent duration and
    /// each plugin's use count — written in batches by a task of the host's
    /// (so this must be called inside a tokio runtime), never on a step's
    /// path. Step outputs over `max_output_bytes` of JSON are kept as their
    /// SHA-256 and size.
    ///
    /// The durations and use counts are read from the store; a store that
    /// has none yet takes those of the cache directory's old `history.json`
    /// and `uses.json`, once (the files are then renamed `*.imported`).
    pub async fn with_store(
        mut self,
        store: Arc<dyn RunStore>,
        max_output_bytes: usize,
    ) -> Result<Host, StoreError> {
        let writer = RunWriter::spawn(store.clone(), max_output_bytes);
        let mut durations = store.durations().await?;
        if durations.is_empty() {
            let old = std::mem::take(&mut lock(&self.history).0);
            for (flow, steps) in &old {
                let steps = steps.iter().map(|(step, ms)| (step.clone(), *ms)).collect();
                writer.send(StoreWrite::Durations { flow: flow.clone(), steps }).await;
            }
            durations = old;
        }
        let mut uses = store.uses().await?;
        if uses.is_empty() {
            uses = self.catalog.uses_snapshot().into_iter().collect();
            if !uses.is_empty() {
                writer.send(StoreWrite::Uses(uses.clone().into_iter().collect())).await;
            }
        }
        if let Some(disk) = self.catalog.store().disk() {
            disk.retire_state(HISTORY);
            disk.retire_state(runtime::USES);
        }
        lock(&self.history).0 = durations;
        self.catalog.set_uses(uses);
        // The host's own events (plugins, caches, the optimizer) go to the
        // store as they come; a run's go with its end.
        let (sink, mut events) = tokio::sync::mpsc::unbounded_channel();
        self.events.set_sink(sink);
        let forward = writer.clone();
        tokio::spawn(async move {
            while let Some(first) = events.recv().await {
                let mut batch = vec![first];
                while let Ok(next) = events.try_recv() {
                    batch.push(next);
                }
                forward.send(StoreWrite::Events(batch)).await;
            }
        });
        if self.preload {
            let (catalog, assets, threshold) =
                (self.catalog.clone(), self.assets.clone(), self.preload_threshold);
            tokio::spawn(async move { preload(&catalog, &assets, threshold).await });
        }
        self.runs = Some((store, writer));
        Ok(self)
    }

    /// The run store, if the host keeps its runs.
    pub fn store(&self) -> Option<&Arc<dyn RunStore>> {
        self.runs.as_ref().map(|(store, _)| store)
    }

    /// Waits until every run that ended so far is in the store, or `within`
    /// has passed; says whether it is (true without a store). A process
    /// calls it before it exits.
    pub async fn flush_runs(&self, within: std::time::Duration) -> bool {
        match &self.runs {
            Some((_, writer)) => writer.flush(within).await,
            None => true,
        }
    }

    /// The past runs of `flow` in the store, oldest first, at most `limit`:
    /// the optimizer's evidence. None without a store.
    pub async fn past_runs(&self, flow: &str, limit: u32) -> Result<Vec<RunSummary>, StoreError> {
        let Some(store) = self.store() else { return Ok(Vec::new()) };
        let records = store.runs(RunQuery::newest(limit).flow(flow)).await?;
        Ok(records.into_iter().rev().filter_map(|r| r.summary).collect())
    }

    /// The component store's and the asset cache's figures.
    pub fn stats(&self) -> Stats {
        Stats { components: self.catalog.store().stats(), assets: self.assets.stats() }
    }

    /// The plugins directory.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Events of every run and of the plugins directory from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Checks that every plugin the flow names is in the plugins directory,
    /// and every database its steps name is declared.
    pub fn check(&self, flow: &Flow) -> Result<(), FlowError> {
        let owners = flow
            .steps
            .iter()
            .map(|s| (format!("step `{}`", s.id), &s.plugin))
            .chain(flow.loaders.iter().map(|l| (format!("loader `{}`", l.id), &l.plugin)));
        let mut available = None;
        let problems: Vec<Problem> = owners
            .filter(|(_, plugin)| !self.catalog.contains(&plugin.name))
            .map(|(owner, plugin)| {
                let available = available
                    .get_or_insert_with(|| match self.catalog.names() {
                        Ok(names) if names.is_empty() => "no plugins".to_owned(),
                        Ok(names) => names.join(", "),
                        Err(e) => error_chain(&e),
                    })
                    .clone();
                Problem::UnknownPlugin {
                    owner,
                    plugin: plugin.name.clone(),
                    dir: self.catalog.dir().display().to_string(),
                    available,
                }
            })
            .collect();
        let mut problems = problems;
        self.check_databases(flow, &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FlowError { origin: flow.origin.clone(), problems })
        }
    }

    /// Every database a step names is the flow's or the host's, and no id
    /// is both.
    fn check_databases(&self, flow: &Flow, problems: &mut Vec<Problem>) {
        for database in &flow.databases {
            if self.databases.iter().any(|d| d.id == database.id) {
                problems.push(Problem::BadDatabase {
                    owner: format!("database `{}`", database.id),
                    message: "the host declares a database by this id too; rename one".to_owned(),
                });
            }
        }
        let declared = || {
            let ids: Vec<&str> =
                flow.databases.iter().chain(self.databases.iter()).map(|d| d.id.as_str()).collect();
            if ids.is_empty() { "none".to_owned() } else { ids.join(", ") }
        };
        for step in &flow.steps {
            for id in &step.databases {
                if flow.database(id, &self.databases).is_none() {
                    problems.push(Problem::BadDatabase {
                        owner: format!("step `{}`", step.id),
                        message: format!(
                            "no database `{id}` is declared by the flow or the host (declared: {})",
                            declared()
                        ),
                    });
                }
            }
        }
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
        mut options: RunOptions,
    ) -> Result<RunSummary, FlowError> {
        self.check(flow)?;
        options.step_timeout = options.step_timeout.or(Some(self.timeouts.0));
        options.run_timeout = options.run_timeout.or(Some(self.timeouts.1));
        let plan = self.plan(flow);
        let flow = Arc::new(flow.clone());
        let run_id: Arc<str> = match &options.run_id {
            Some(id) => Arc::from(id.as_str()),
            None => Arc::from(uuid::Uuid::new_v4().to_string()),
        };
        if let Some((_, writer)) = &self.runs {
            // Waits here, before the run starts, if the store is behind.
            let start = StoreWrite::Started(run_start(&run_id, &flow, &input));
            if options.durable {
                // The writer lives as long as the host.
                let _ = writer.send_written(start).await.await;
            } else {
                writer.send(start).await;
            }
        }
        if let Some(stored) = &options.stored {
            stored.notify_one();
        }
        let durable = options.durable;
        let source = format!("/qflow/runs/{run_id}");
        // With a store, the run's events are kept with it.
        let (events, recorded) = match &self.runs {
            Some(_) => {
                let (events, recorded) = self.events.recording_emitter(source);
                (events, Some(recorded))
            }
            None => (self.events.emitter(source), None),
        };
        let invoker = WasmInvoker::new(
            flow.clone(),
            self.catalog.clone(),
            self.assets.clone(),
            self.pools.clone(),
            (self.defaults, self.databases.clone()),
            (run_id.clone(), events.clone()),
        );
        let invoker = Arc::new(invoker);
        // The run's span: its steps' spans, their loads and acquisitions
        // nest under it, with the run and step ids as fields.
        let span = tracing::info_span!("run", run_id = &*run_id, flow = %flow.name);
        let mut summary =
            run::run(run_id.clone(), flow.clone(), &plan, input, options, invoker, events.clone())
                .instrument(span)
                .await;
        if model::overlapped(&summary) {
            events.emit(|| EventData::ParallelCompleted {
                run_id,
                flow: Arc::from(flow.name.as_str()),
                efficiency: summary.efficiency,
                step_ms: summary.step_ms,
                wall_ms: summary.wall_ms,
                max_parallel: summary.max_parallel,
            });
        }
        summary.store = self.stats();
        let durations = self.remember_durations(&flow, &summary);
        lock(&self.totals).add(&summary);
        if let Some((_, writer)) = &self.runs {
            if let Some(recorded) = recorded {
                let recorded = std::mem::take(&mut *lock(&recorded));
                writer.send(StoreWrite::Events(recorded)).await;
            }
            writer.send(StoreWrite::Durations { flow: flow.name.clone(), steps: durations }).await;
            writer.send(StoreWrite::Uses(self.catalog.uses_snapshot())).await;
            if let Some(document) = self.snapshot_due() {
                writer.send(StoreWrite::Metrics { at_ms: unix_ms(), document }).await;
            }
            let (summary, ended_at_ms) = (Box::new(summary.clone()), unix_ms());
            let end = StoreWrite::Finished { summary, ended_at_ms };
            if durable {
                let _ = writer.send_written(end).await.await;
            } else {
                writer.send(end).await;
            }
        }
        Ok(summary)
    }

    /// What the runs this host finished add up to.
    pub fn run_totals(&self) -> RunTotals {
        *lock(&self.totals)
    }

    /// The optimization metrics document, with `level` as the level in force.
    pub fn metrics(&self, level: &str) -> OptimizationMetrics {
        self.metrics_of(level, &self.run_totals())
    }

    /// The metrics document with `totals` for the runs (those of a run
    /// store, say, rather than this host's own) and this host's caches and
    /// pools.
    pub fn metrics_of(&self, level: &str, totals: &RunTotals) -> OptimizationMetrics {
        let components = self.catalog.store().stats();
        OptimizationMetrics::new(level, totals, &components, self.resource_pools())
    }

    /// The flow's dependency analysis, with step durations estimated from
    /// this host's (and earlier hosts') runs of it.
    pub fn plan(&self, flow: &Flow) -> Plan {
        let analysis = self.analysis(flow);
        let history = lock(&self.history);
        let durations = history.of(flow);
        Plan::estimated(flow, &analysis, |step| durations?.get(&step.id).copied())
    }

    /// `flow`'s graph analysis, made once per flow text (a flow is read from
    /// its text, so the same text is the same graph).
    fn analysis(&self, flow: &Flow) -> Arc<model::Analysis> {
        let key = xxhash_rust::xxh3::xxh3_128(flow.text.as_bytes());
        if let Some(analysis) = lock(&self.analyses).get(&key) {
            return analysis.clone();
        }
        let analysis = Arc::new(model::Analysis::new(flow));
        lock(&self.analyses).put(key, analysis.clone());
        analysis
    }

    /// The metrics document, if the last snapshot is older than
    /// [`SNAPSHOT_EVERY`] (the clock restarts then).
    fn snapshot_due(&self) -> Option<serde_json::Value> {
        let now = std::time::Instant::now();
        {
            let mut last = lock(&self.snapshot);
            if last.is_some_and(|at| now.duration_since(at) < SNAPSHOT_EVERY) {
                return None;
            }
            *last = Some(now);
        }
        let level = model::optimize::Level::default().to_string();
        serde_json::to_value(self.metrics(&level)).ok()
    }

    /// Folds the run's step times into the moving averages; the flow's
    /// averages as they are now.
    fn remember_durations(&self, flow: &Flow, summary: &RunSummary) -> Vec<(String, f64)> {
        let mut history = lock(&self.history);
        // Keys are made the first time only: this runs after every run.
        if !history.0.contains_key(&flow.name) {
            history.0.insert(flow.name.clone(), HashMap::new());
        }
        let Some(durations) = history.0.get_mut(&flow.name) else { return Vec::new() };
        for (step, report) in flow.steps.iter().zip(&summary.steps) {
            if let (StepStatus::Succeeded, Some(ms)) = (report.status, report.duration_ms()) {
                match durations.get_mut(&step.id) {
                    Some(average) => *average += HISTORY_WEIGHT * (ms - *average),
                    None => {
                        durations.insert(step.id.clone(), ms);
                    }
                }
            }
        }
        if self.runs.is_none() {
            return Vec::new();
        }
        durations.iter().map(|(step, ms)| (step.clone(), *ms)).collect()
    }

    /// Reloads the plugin `name` now: a new or changed `NAME.wasm` is
    /// validated and swapped in, a removed one retired, and events say so
    /// ([`EventData::PluginAdded`] and the like). On failure the old version
    /// goes on serving.
    pub async fn reload(&self, name: &str) -> Result<(), PluginError> {
        self.reloader().reload(name).await
    }

    /// Watches the plugins directory and reloads what changes there, until
    /// the returned [`Watch`] is dropped. Must be called inside a tokio
    /// runtime.
    pub fn watch(&self) -> Result<Watch, HostError> {
        runtime::watch(self.catalog.dir(), self.reloader()).map_err(|e| HostError::Watch {
            path: self.catalog.dir().to_path_buf(),
            source: Arc::new(e),
        })
    }

    fn reloader(&self) -> Reloader {
        Reloader {
            catalog: self.catalog.clone(),
            pools: self.pools.clone(),
            events: self.plugin_events.clone(),
        }
    }

    /// What the optimizer knows of this host besides a flow: `runs` (that
    /// flow's past runs, oldest first) and the host's pools, plugins and
    /// caches as they are now.
    pub fn history(&self, runs: Vec<RunSummary>) -> model::optimize::History {
        use model::optimize::{History, PluginFigures, PoolFigures};
        let loads = self.catalog.store().loads_by_name();
        let plugins = self
            .catalog
            .names()
            .unwrap_or_default()
            .into_iter()
            .map(|name| {
                let (compiles, disk_hits) = loads.get(&name).copied().unwrap_or_default();
                PluginFigures {
                    uses: self.catalog.uses(&name),
                    preloaded: self.catalog.was_preloaded(&name),
                    name,
                    compiles,
                    disk_hits,
                }
            })
            .collect();
        let pools = self
            .pools
            .reports()
            .into_iter()
            .map(|p| PoolFigures {
                plugin: p.plugin,
                stats: p.stats,
                min: p.min,
                max: p.max,
                reuse: p.reuse,
            })
            .collect();
        History {
            runs,
            pools,
            plugins,
            disk_cache: self.catalog.store().disk().is_some(),
            preload_threshold: self.preload_threshold,
        }
    }

    /// What could make `flow` better, from its past `runs` (oldest first)
    /// and this host's figures.
    pub fn recommend(
        &self,
        flow: &Flow,
        runs: Vec<RunSummary>,
    ) -> Vec<model::optimize::Recommendation> {
        model::optimize::recommend(flow, &self.plan(flow), &self.history(runs))
    }

    /// `flow` rewritten at `level` from its past `runs` and this host's
    /// figures; announced as `q.qflow.optimization.flow.optimized.v1`.
    /// Writing it back is the caller's choice ([`model::optimize::apply`]).
    pub fn optimize(
        &self,
        flow: &Flow,
        level: model::optimize::Level,
        runs: Vec<RunSummary>,
    ) -> Result<model::optimize::Optimized, model::optimize::OptimizeError> {
        let optimized = model::optimize::optimize(flow, level, &self.history(runs))?;
        self.optimizer_events.emit(|| EventData::FlowOptimized {
            flow: Arc::from(flow.name.as_str()),
            level: level.to_string(),
            changes: optimized.changes.iter().map(|c| c.what.clone()).collect(),
        });
        Ok(optimized)
    }

    /// Each instance pool's figures, by plugin name.
    pub fn pool_stats(&self) -> Vec<(String, PoolStats)> {
        self.pools.stats()
    }

    /// Each outbound HTTP connection pool's figures, by origin
    /// (`scheme://host:port`).
    pub fn http_pool_stats(&self) -> Vec<(String, PoolStats)> {
        self.catalog.engine().http().stats()
    }

    /// Each database connection pool's figures, by database id.
    pub fn db_pool_stats(&self) -> Vec<(String, PoolStats)> {
        self.catalog.engine().databases().stats()
    }

    /// Every resource pool's summary, by kind: `wasm` (by plugin), `http`
    /// (by origin) and `db` (by database).
    pub fn resource_pools(&self) -> model::ResourcePools {
        model::ResourcePools::new(
            &self.pool_stats(),
            &self.http_pool_stats(),
            &self.db_pool_stats(),
        )
    }

    /// How many plugin instances are alive right now (running steps,
    /// loaders, `describe` calls).
    pub fn instances_in_use(&self) -> usize {
        self.catalog.engine().instances_in_use()
    }

    /// The host-wide memory budget: its limit, what instances hold now,
    /// the most they held at once, and how often one waited.
    pub fn memory_stats(&self) -> MemoryStats {
        self.catalog.engine().memory_stats()
    }
}

/// A mutex's data. Nothing panics while holding Qflow's locks; should
/// something ever, the data is recovered rather than every later user
/// failing too.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for Host {
    /// Saves the use counts and step durations, so that the next host
    /// preloads what this one used most and plans with what it learnt (a
    /// host with a run store has written them there as it went).
    fn drop(&mut self) {
        if self.runs.is_some() {
            return;
        }
        self.catalog.save_uses();
        if let Some(disk) = self.catalog.store().disk() {
            disk.save_state(HISTORY, &lock(&self.history).to_file());
        }
    }
}

/// Loads every hot plugin that is still in the directory and every hot asset.
async fn preload(catalog: &Arc<Catalog>, assets: &Arc<AssetCache>, threshold: u64) -> usize {
    let loads = catalog.hot(threshold).into_iter().map(|key| async move {
        if let Some(name) = key.strip_prefix("plugin:") {
            catalog.contains(name) && catalog.preload(name).await.is_ok()
        } else if let Some(asset) = AssetKey::from_use_key(&key) {
            runtime::fetch_asset(catalog, assets, asset).await.is_ok()
        } else {
            false
        }
    });
    futures::future::join_all(loads).await.into_iter().filter(|loaded| *loaded).count()
}

#[cfg(test)]
mod layering {
    use std::path::Path;

    /// Which layers each layer may not reach. The arrows point one way:
    /// model ← runtime ← run ← lib; and the scheduler reaches instances
    /// only through `StepInvoker`, so `run` does not know `runtime` either.
    /// A module is named by its path segment, however the `use` is
    /// written (`crate::run::X`, `use crate::{run::X}`, `super::super::run`).
    const RULES: &[(&str, &[&str])] = &[
        ("model", &["runtime", "run", "pool", "invoke", "wasmtime"]),
        ("runtime", &["run", "invoke"]),
        ("run", &["runtime", "pool", "invoke", "wasmtime"]),
    ];

    /// Whether `code` names the module `name` as a path segment: `run::` or
    /// `crate::run` (but not `runtime::`, `tokio::task::spawn`, or `run(`).
    fn names(code: &str, name: &str) -> bool {
        code.match_indices(name).any(|(at, _)| {
            let before = code[..at].chars().next_back();
            let after = &code[at + name.len()..];
            let starts = !before.is_some_and(|c| c.is_alphanumeric() || c == '_');
            let segment = after.starts_with("::")
                || (before == Some(':')
                    && !after.starts_with(|c: char| c.is_alphanumeric() || c == '_'));
            starts && (segment || (name == "wasmtime" && !after.starts_with('_')))
        })
    }

    #[test]
    fn each_layer_uses_only_the_layers_below_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (layer, forbidden) in RULES {
            let dir = src.join(layer);
            let mut files = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or_default();
                    for path_name in *forbidden {
                        assert!(
                            !names(code, path_name),
                            "{}:{}: `{layer}` must not use `{path_name}`: {line}",
                            path.display(),
                            n + 1
                        );
                    }
                }
                files += 1;
            }
            assert!(files > 0, "no files in {}", dir.display());
        }
    }

    #[test]
    fn the_rule_tells_a_layer_from_its_prefix() {
        assert!(names("use crate::run::RunOptions;", "run"));
        assert!(names("use crate::run;", "run"));
        assert!(names("use crate::{model::X, runtime::Y};", "runtime"));
        assert!(names("use super::super::run::Z;", "run"));
        assert!(!names("use crate::runtime::Catalog;", "run"));
        assert!(!names("let x = run(flow);", "run"));
        assert!(!names("tokio::task::spawn(x)", "run"));
    }
}
