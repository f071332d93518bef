//! The host's [`StepInvoker`]: one run's steps, called on instances from the
//! pre-warmed pools. This is where the scheduler meets WebAssembly; it
//! lives in the facade so that `run` needs no wasmtime and `runtime` no
//! scheduling.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::time::Instant;

use crate::model::{
    Database, Emitter, EventData, FailureKind, Flow, Json, Step, StepFailure, error_chain,
};
use crate::run::{Attempt, StepInvoker};
use crate::runtime::{
    AssetCache, AssetSource, Assets, CallFailure, Caller, Catalog, Grants, Limits, Plugin,
    PluginError, PoolKey, PoolSource, Pools,
};

/// A plugin being loaded for a run; every step that uses it awaits the same load.
type PluginLoad = Shared<BoxFuture<'static, Result<Arc<Plugin>, PluginError>>>;

/// The limits a run's steps get where the flow says nothing.
#[derive(Clone, Copy)]
pub(crate) struct Defaults {
    pub(crate) max_output_bytes: u64,
    pub(crate) max_memory_bytes: u64,
    pub(crate) max_log_bytes: u64,
}

/// What a step needs for its calls, found once per run.
struct Prepared {
    plugin: Arc<Plugin>,
    key: PoolKey,
    caller: Caller,
}

/// One run's access to instances.
pub(crate) struct WasmInvoker {
    flow: Arc<Flow>,
    catalog: Arc<Catalog>,
    pools: Arc<Pools>,
    assets: Arc<Assets>,
    /// Every plugin the flow's steps use, loading since the run started:
    /// the whole run uses those versions, whatever is reloaded meanwhile.
    plugins: OnceLock<HashMap<String, PluginLoad>>,
    /// Whose loads the `lazy.loaded` events are about.
    run_id: Arc<str>,
    events: Emitter,
    prepared: Vec<OnceLock<Prepared>>,
    limits: Limits,
    max_output_bytes: u64,
    /// The databases the host declares, beside the flow's.
    databases: Arc<[Database]>,
}

impl WasmInvoker {
    /// One run's invoker over `flow`; nothing is loaded until the run
    /// starts ([`StepInvoker::start`]).
    pub(crate) fn new(
        flow: Arc<Flow>,
        catalog: Arc<Catalog>,
        asset_cache: Arc<AssetCache>,
        pools: Arc<Pools>,
        (defaults, databases): (Defaults, Arc<[Database]>),
        (run_id, events): (Arc<str>, Emitter),
    ) -> WasmInvoker {
        let assets = Arc::new(Assets::new(catalog.clone(), asset_cache, flow.loaders.clone()));
        WasmInvoker {
            prepared: flow.steps.iter().map(|_| OnceLock::new()).collect(),
            // The host's limits are ceilings: a flow (which may come over
            // the network) can ask for less, never for more.
            limits: Limits {
                memory: usize::try_from(defaults.max_memory_bytes).unwrap_or(usize::MAX),
                log: usize::try_from(
                    flow.max_log_bytes
                        .map_or(defaults.max_log_bytes, |own| own.min(defaults.max_log_bytes)),
                )
                .unwrap_or(usize::MAX),
            },
            max_output_bytes: flow
                .max_output_bytes
                .map_or(defaults.max_output_bytes, |own| own.min(defaults.max_output_bytes)),
            flow,
            catalog,
            pools,
            assets,
            plugins: OnceLock::new(),
            databases,
            run_id,
            events,
        }
    }

    /// Starts loading every plugin the flow uses, at once, each in its own
    /// task: compiles overlap each other and the first steps.
    fn spawn_loads(&self) -> HashMap<String, PluginLoad> {
        let mut plugins = HashMap::new();
        for step in &self.flow.steps {
            let name = &step.plugin.name;
            if plugins.contains_key(name) {
                continue;
            }
            let (catalog, owned) = (self.catalog.clone(), name.clone());
            let (run_id, events) = (self.run_id.clone(), self.events.clone());
            let span = tracing::info_span!("load", run_id = &*run_id, plugin = %owned);
            let mut load = Box::pin(tracing::Instrument::instrument(
                async move {
                    let started = Instant::now();
                    let (plugin, source) = catalog.load_traced(&owned).await?;
                    events.emit(|| EventData::LazyLoaded {
                        run_id,
                        plugin: Arc::from(owned.as_str()),
                        source: source.as_str().to_owned(),
                        ms: started.elapsed().as_secs_f64() * 1e3,
                    });
                    Ok(plugin)
                },
                span,
            ));
            // A plugin already in memory is loaded by the first poll: no
            // task, no other thread woken. Otherwise the same load goes on
            // in a task of its own, so compiles overlap the first steps.
            let load = match (&mut load).now_or_never() {
                Some(loaded) => futures::future::ready(loaded).boxed(),
                None => {
                    let task = tokio::spawn(load);
                    async move { task.await.unwrap_or_else(|e| Err(PluginError::Host(e.to_string()))) }
                        .boxed()
                }
            };
            plugins.insert(name.clone(), load.shared());
        }
        plugins
    }

    async fn load(&self, step: &Step) -> Result<Prepared, StepFailure> {
        let plugin_failed = |e: PluginError| failure(step, FailureKind::Plugin, &error_chain(&e));
        let name = &step.plugin.name;
        let plugin = match self.plugins.get().and_then(|loads| loads.get(name)) {
            Some(load) => load.clone().await,
            None => self.catalog.load(name).await,
        };
        let plugin = plugin.map_err(plugin_failed)?;
        plugin.check_version(name, step.plugin.version.as_deref()).map_err(plugin_failed)?;
        plugin.step(name).map_err(plugin_failed)?;
        let file = self.catalog.settings(name).await.map_err(plugin_failed)?;
        // The assets the plugin says it reads are its dependencies too: load
        // them all, in parallel, before it runs.
        let assets = plugin.described.assets.iter().map(|asset| async move {
            self.assets.get(asset).await.map_err(|e| {
                let what =
                    format!("needs the asset {asset:?}, which could not be loaded: {}", e.message);
                failure(step, FailureKind::Plugin, &what).with_code(e.code)
            })
        });
        futures::future::try_join_all(assets).await?;
        let memory = step.max_memory_bytes.map_or(self.limits.memory, |bytes| {
            usize::try_from(bytes).unwrap_or(usize::MAX).min(self.limits.memory)
        });
        let key = PoolKey {
            digest: plugin.digest,
            instance: step.instance_key.clone(),
            limits: Limits { memory, ..self.limits },
            file,
        };
        let caller = Caller { name: Arc::from(step.id.as_str()), plugin: Arc::from(name.as_str()) };
        Ok(Prepared { plugin, key, caller })
    }

    /// What `run` returned, checked: an error, or JSON within the size limit
    /// (checked, not parsed into a tree: it goes on as text).
    fn output(
        &self,
        step: &Step,
        returned: Result<String, crate::runtime::StepError>,
    ) -> Result<Json, StepFailure> {
        let output = match returned {
            Ok(output) => output,
            Err(e) => {
                let what = format!("failed: {}: {}", e.code, e.message);
                return Err(failure(step, FailureKind::StepError, &what)
                    .with_code(e.code)
                    .retryable(e.retryable));
            }
        };
        if output.len() as u64 > self.max_output_bytes {
            let what = format!(
                "returned {} bytes of output, over the limit of {}",
                output.len(),
                self.max_output_bytes
            );
            return Err(failure(step, FailureKind::OutputTooLarge, &what));
        }
        let preview: String = output.chars().take(80).collect();
        Json::parse(output).map_err(|e| {
            let what = format!("returned invalid JSON ({e}): {preview:?}");
            failure(step, FailureKind::InvalidOutput, &what)
        })
    }
}

fn failure(step: &Step, kind: FailureKind, what: &str) -> StepFailure {
    StepFailure::new(&step.id, &step.plugin, kind, what)
}

impl WasmInvoker {
    /// The databases `step` names, as the flow or the host declares them
    /// (the host's check found each before the run began).
    fn granted_databases(&self, step: &Step) -> Arc<[Database]> {
        let granted =
            step.databases.iter().filter_map(|id| self.flow.database(id, &self.databases));
        granted.cloned().collect()
    }
}

impl StepInvoker for WasmInvoker {
    fn start(&self) {
        // Only the scheduler calls this, once per run; a second call would
        // find the loads already under way.
        let _ = self.plugins.get_or_init(|| self.spawn_loads());
    }

    async fn prepare(&self, index: usize) -> Result<(), StepFailure> {
        if self.prepared[index].get().is_none() {
            let prepared = self.load(&self.flow.steps[index]).await?;
            // Only this step's task prepares it: the slot is still empty.
            let _ = self.prepared[index].set(prepared);
        }
        Ok(())
    }

    async fn invoke(&self, index: usize, input: &Json, deadline: Option<Instant>) -> Attempt {
        let step = &self.flow.steps[index];
        let Some(prepared) = self.prepared[index].get() else {
            let what = "was called before it was prepared";
            return Attempt {
                result: Err(failure(step, FailureKind::Internal, what)),
                log: Default::default(),
                ready: Duration::ZERO,
            };
        };
        let pre = match prepared.plugin.step(&step.plugin.name) {
            Ok(pre) => pre,
            Err(e) => {
                let failed = failure(step, FailureKind::Plugin, &error_chain(&e));
                let log = Default::default();
                return Attempt { result: Err(failed), log, ready: Duration::ZERO };
            }
        };
        let pool = self.pools.get(&prepared.key, || PoolSource {
            engine: self.catalog.engine(),
            pre,
            plugin: &step.plugin.name,
            config: serde_json::to_string(&step.config).unwrap_or_else(|_| "{}".to_owned()),
            grants: Grants {
                dirs: step.dirs.clone(),
                env: step.env.clone(),
                // The step's own grants, and those of its plugin's settings file.
                http: if prepared.key.file.http.is_empty() {
                    Arc::from(step.http.as_slice())
                } else {
                    step.http.iter().chain(prepared.key.file.http.iter()).cloned().collect()
                },
                databases: self.granted_databases(step),
            },
            settings: step.pool,
            assets: self.assets.clone() as Arc<dyn AssetSource>,
        });
        let (called, log, ready) =
            pool.call(prepared.caller.clone(), input.as_str(), deadline).await;
        let result = match called {
            Ok(returned) => self.output(step, returned),
            Err(CallFailure { kind, code, what, retryable }) => {
                let failed = failure(step, kind, &what).retryable(retryable);
                Err(match code {
                    Some(code) => failed.with_code(code),
                    None => failed,
                })
            }
        };
        Attempt { result, log, ready }
    }
}
