//! Pre-warmed instance pools, and the call of a step on one of their
//! instances.
//!
//! A pool holds, per (component, instance key, limits, settings), instances
//! already instantiated from the cached `InstancePre` and initialised
//! (`init(config)` has run), so that a step pays neither compile, nor
//! instantiation, nor init on its path. A call acquires one, runs `run`
//! under the caller's deadline, and releases it (or discards it, if it
//! trapped or its reuses are spent).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use tokio::time::Instant;
use wasmtime::Store;

use super::bindings::StepError;
use super::bindings::step::{Step as StepInstance, StepPre};
use super::catalog::PluginSettings;
use super::engine::{Engine, Reclaim};
use super::plugin::Digest;
use super::sandbox::Grants;
use super::state::{AssetSource, Caller, Limits, PluginState, describe_failure};
use crate::model::{FailureKind, InstanceKey, PoolSettings, PoolStats, StepLog};
use crate::pool::{Manager, Pool, PoolConfig, PoolError};

/// Below this average time to make an instance (instantiate and `init`),
/// the default spare is not kept: handing one over costs about 15–20 µs.
const SPARE_WORTH_US: u64 = 100;

/// The pool's limits and timings from merged settings, and how many calls
/// an instance serves.
fn resolve(settings: PoolSettings, max_instances: usize) -> (PoolConfig, u32) {
    let defaults = PoolConfig { max: max_instances, ..PoolConfig::default() };
    let config = PoolConfig {
        // The default spare is kept only for plugins whose instances take
        // a while to make (a slow `init`): a trivial one is made on the
        // spot faster than a spare is handed over from another thread. A
        // `min` that someone set is kept whatever it costs.
        min_only_if_slower_than_us: settings.min.is_none().then_some(SPARE_WORTH_US),
        ..defaults.with_settings(&settings)
    };
    (config, settings.reuse.unwrap_or(1).max(1))
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
    /// Every instance slot is taken (a spare is not made then).
    NoSlot,
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Config { message, .. } => write!(f, "rejected its config: {message}"),
            InitError::Trap { phase, message } => write!(f, "trapped in {phase}: {message}"),
            InitError::Grant(message) => f.write_str(message),
            InitError::NoSlot => f.write_str("every instance slot is taken"),
        }
    }
}

/// An instance, initialised, ready for `run`.
pub(crate) struct Warm {
    store: Store<PluginState>,
    instance: StepInstance,
    /// Calls it has served.
    calls: u32,
}

/// Makes instances of one step plugin with one config.
pub(crate) struct InstanceManager {
    engine: Engine,
    pre: StepPre<PluginState>,
    config: Arc<str>,
    assets: Arc<dyn AssetSource>,
    plugin: Arc<str>,
    grants: Grants,
    limits: Limits,
}

impl InstanceManager {
    fn caller(&self) -> Caller {
        Caller { name: Arc::from("(warming)"), plugin: self.plugin.clone() }
    }

    /// Instantiates and initialises an instance in `store`.
    async fn warm(&self, mut store: Store<PluginState>) -> Result<Warm, InitError> {
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

impl Manager for InstanceManager {
    type Resource = Warm;
    type Error = InitError;

    async fn create(&self) -> Result<Warm, InitError> {
        let assets = Some(self.assets.clone());
        let (grants, limits) = (&self.grants, self.limits);
        let store = PluginState::store(&self.engine, self.caller(), assets, grants, limits, None)
            .await
            .map_err(InitError::Grant)?;
        self.warm(store).await
    }

    async fn create_spare(&self) -> Result<Warm, InitError> {
        let assets = Some(self.assets.clone());
        let (grants, limits) = (&self.grants, self.limits);
        let store = PluginState::spare_store(&self.engine, self.caller(), assets, grants, limits)
            .map_err(InitError::Grant)?;
        let mut warm = self.warm(store.ok_or(InitError::NoSlot)?).await?;
        warm.store.data_mut().spare_made();
        Ok(warm)
    }
}

/// Why a call failed, for the caller to attribute to its step.
#[derive(Debug, Clone)]
pub(crate) struct CallFailure {
    pub(crate) kind: FailureKind,
    pub(crate) code: Option<String>,
    pub(crate) what: String,
    pub(crate) retryable: bool,
}

impl CallFailure {
    fn new(kind: FailureKind, what: String) -> CallFailure {
        CallFailure { kind, code: None, what, retryable: false }
    }
}

/// What one call of `run` gave: the plugin's own answer (its output, or
/// the error it returned), or a failure of the call itself.
pub(crate) type Called = Result<Result<String, StepError>, CallFailure>;

/// One step plugin's pool, and how often its instances may be reused.
pub(crate) struct StepPool {
    pool: Pool<InstanceManager>,
    reuse: u32,
    plugin: Arc<str>,
    engine: Engine,
}

/// A pool's figures and the settings it runs with.
#[derive(Debug, Clone)]
pub(crate) struct PoolReport {
    pub(crate) plugin: String,
    pub(crate) stats: PoolStats,
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) reuse: u32,
}

impl StepPool {
    /// One call of `run` on an initialised instance from this pool, as
    /// `caller`, interrupted at `deadline`. An instance that trapped (or was
    /// cut: dropping this future drops it) is discarded; one that returned
    /// goes back to the pool while it has reuses left.
    pub(crate) async fn call(
        &self,
        caller: Caller,
        input: &str,
        deadline: Option<Instant>,
    ) -> (Called, StepLog, Duration) {
        let asked = Instant::now();
        let acquire = self.pool.acquire();
        let span = tracing::debug_span!("acquire", plugin = &*self.plugin);
        let mut pooled = match tracing::Instrument::instrument(acquire, span).await {
            Ok(pooled) => pooled,
            Err(e) => {
                let mut failed = acquire_failed(e);
                // When every slot is busy, that is the cause worth naming.
                if failed.kind == FailureKind::Pool
                    && let Some(why) = self.engine.slots_taken()
                {
                    failed.what = format!("{}: {why}", failed.what);
                }
                return (Err(failed), StepLog::default(), asked.elapsed());
            }
        };
        let ready = asked.elapsed();
        let warm = pooled.get();
        warm.store.data_mut().prepare(caller, deadline);
        let ran = warm.instance.call_run(&mut warm.store, input).await;
        let returned = match ran {
            Ok(returned) => returned,
            Err(e) => {
                // Described before the log is taken: it quotes the guest's stderr.
                let what = format!("trapped in run: {}", describe_failure(&e, &warm.store));
                let log = warm.store.data().take_log();
                // Dropping `pooled` discards the instance: it is never reused.
                return (Err(CallFailure::new(FailureKind::Trap, what)), log, ready);
            }
        };
        let log = warm.store.data().take_log();
        warm.calls += 1;
        if warm.calls < self.reuse {
            pooled.release();
        }
        (Ok(returned), log, ready)
    }
}

fn acquire_failed(e: PoolError<InitError>) -> CallFailure {
    match e {
        PoolError::Create(InitError::Config { code, message }) => CallFailure {
            code: Some(code),
            ..CallFailure::new(FailureKind::Config, format!("rejected its config: {message}"))
        },
        PoolError::Create(trap @ InitError::Trap { .. }) => {
            CallFailure::new(FailureKind::Trap, trap.to_string())
        }
        PoolError::Create(InitError::Grant(message)) => {
            CallFailure::new(FailureKind::Sandbox, message)
        }
        PoolError::Timeout { .. } => CallFailure {
            retryable: true,
            ..CallFailure::new(FailureKind::Pool, format!("waited for an instance: {e}"))
        },
        other => CallFailure::new(FailureKind::Pool, format!("no instance: {other}")),
    }
}

/// What makes two steps share a pool: the same bytes, the same instance
/// key (config, grants, pool settings, the flow's loaders), the same limits,
/// and the same settings file.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) digest: Digest,
    pub(crate) instance: InstanceKey,
    pub(crate) limits: Limits,
    /// The plugin's settings file, as read when the key was made.
    pub(crate) file: PluginSettings,
}

/// What a new pool is made of.
pub(crate) struct PoolSource<'a> {
    pub(crate) engine: &'a Engine,
    pub(crate) pre: &'a StepPre<PluginState>,
    pub(crate) plugin: &'a str,
    /// The step's config, as `init` receives it (JSON).
    pub(crate) config: String,
    pub(crate) grants: Grants,
    /// The step's own pool settings.
    pub(crate) settings: PoolSettings,
    pub(crate) assets: Arc<dyn AssetSource>,
}

/// Every instance pool of a host.
pub(crate) struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<StepPool>>>,
    defaults: PoolSettings,
    max_instances: usize,
}

impl Pools {
    pub(crate) fn new(defaults: PoolSettings, max_instances: usize) -> Pools {
        Pools { pools: Mutex::default(), defaults, max_instances }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Arc<StepPool>>> {
        // Nothing panics while holding the lock; recover the data if it ever did.
        self.pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pool for `key`, made on first use from `source` (called only
    /// then). No I/O happens here: everything a pool is made of was read
    /// before.
    pub(crate) fn get<'s>(
        &self,
        key: &PoolKey,
        source: impl FnOnce() -> PoolSource<'s>,
    ) -> Arc<StepPool> {
        let mut pools = self.lock();
        if let Some(pool) = pools.get(key) {
            return pool.clone();
        }
        // Forget pools nobody uses any more (a flow run once with a config
        // of its own): their maintenance tasks end with them.
        pools.retain(|_, pool| !pool.pool.is_abandoned());
        let source = source();
        let (mut config, reuse) =
            resolve(source.settings.or(key.file.pool).or(self.defaults), self.max_instances);
        // Minimums together hold at most half the slots, so that instances
        // kept ready can never starve the steps that need one.
        let held: usize = pools.values().map(|p| p.pool.config().min).sum();
        let room = (self.max_instances / 2).saturating_sub(held);
        if config.min > room {
            // The default (one spare) lowered says nothing worth a warning.
            if config.min > 1 {
                tracing::warn!(
                    plugin = source.plugin,
                    "pool min {} lowered to {room}: pool minimums may hold at most half of the {} instance slots",
                    config.min,
                    self.max_instances
                );
            }
            config.min = room;
        }
        let manager = InstanceManager {
            engine: source.engine.clone(),
            pre: source.pre.clone(),
            config: Arc::from(source.config),
            assets: source.assets,
            plugin: Arc::from(source.plugin),
            grants: source.grants,
            limits: key.limits,
        };
        let pool = Arc::new(StepPool {
            pool: Pool::new(manager, config),
            reuse,
            plugin: Arc::from(source.plugin),
            engine: source.engine.clone(),
        });
        pools.insert(key.clone(), pool.clone());
        pool
    }

    /// Drops the pools of a component that was replaced or removed: no new
    /// step gets them; their idle instances go now, busy ones when their
    /// call ends. (A run still pinned to that version gets a new pool.)
    pub(crate) fn retire(&self, digest: &Digest) {
        let retired: Vec<Arc<StepPool>> =
            self.lock().extract_if(|key, _| key.digest == *digest).map(|(_, pool)| pool).collect();
        for retired in retired {
            tokio::spawn(async move { retired.pool.drain().await });
        }
    }

    /// Each pool's figures and settings, by plugin.
    pub(crate) fn reports(&self) -> Vec<PoolReport> {
        let mut reports: Vec<PoolReport> = self
            .lock()
            .values()
            .map(|p| PoolReport {
                plugin: p.plugin.to_string(),
                stats: p.pool.stats(),
                min: p.pool.config().min,
                max: p.pool.config().max,
                reuse: p.reuse,
            })
            .collect();
        reports.sort_by(|a, b| a.plugin.cmp(&b.plugin));
        reports
    }

    /// The pools with idle instances, the one whose idle instance was
    /// given back longest ago first.
    fn least_recently_used(&self) -> Vec<Arc<StepPool>> {
        let pools = self.lock();
        let mut idle: Vec<_> =
            pools.values().filter_map(|p| Some((p.pool.oldest_idle()?, p.clone()))).collect();
        idle.sort_by_key(|(since, _)| *since);
        idle.into_iter().map(|(_, pool)| pool).collect()
    }

    /// Each pool's figures, by plugin.
    pub(crate) fn stats(&self) -> Vec<(String, PoolStats)> {
        let mut stats: Vec<(String, PoolStats)> =
            self.lock().values().map(|p| (p.plugin.to_string(), p.pool.stats())).collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }
}

impl Reclaim for Pools {
    fn evict_idle(&self) -> bool {
        // The instance is dropped outside the pools' lock: its slot and
        // memory are free when this returns.
        // One that was taken meanwhile is no loss: try the next.
        self.least_recently_used().into_iter().any(|pool| pool.pool.evict_idle())
    }

    fn holders(&self) -> String {
        let mut held: HashMap<&str, (usize, usize)> = HashMap::new();
        let pools = self.lock();
        for pool in pools.values() {
            let stats = pool.pool.stats();
            let entry = held.entry(&pool.plugin).or_default();
            entry.0 += stats.in_use;
            entry.1 += stats.available;
        }
        let mut held: Vec<(&str, (usize, usize))> = held.into_iter().collect();
        held.sort_by_key(|(name, (busy, idle))| (std::cmp::Reverse(busy + idle), *name));
        let mut parts: Vec<String> = held
            .iter()
            .take(5)
            .map(|(name, (busy, idle))| format!("{name}: {busy} busy, {idle} idle"))
            .collect();
        if held.len() > 5 {
            parts.push(format!("{} more pools", held.len() - 5));
        }
        if parts.is_empty() { "by calls outside any pool".to_owned() } else { parts.join("; ") }
    }
}
