//! One plugin instance's store: its WASI context (what the operator granted,
//! nothing more), its limits, the host functions of the contract, and the
//! capture of what it prints.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use futures::future::BoxFuture;

use super::bindings::{LogLevel, StepError, host, v0_1};
use super::engine::Engine;
use super::http::StepHttp;
use super::sandbox::{Granted, Grants, Limiter, Log, Stream};
use super::sql::StepSql;
use crate::model::{StepLog, printable};

/// An asset's contents, shared by every step that reads it.
pub(crate) type Bytes = Arc<[u8]>;

/// Where `host.asset` is served from: an instance depends on this view, not
/// on the asset cache behind it (the same seam wasmtime-wasi's `WasiView`
/// gives WASI, and the one outbound HTTP and SQL will take).
pub(crate) trait AssetSource: Send + Sync + 'static {
    /// The asset `loader-id/name`.
    fn asset<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Bytes, StepError>>;
}

/// An instance's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Limits {
    /// Linear memory, in bytes.
    pub(crate) memory: usize,
    /// Captured output (stdout, stderr, `host.log`) per call, in bytes.
    pub(crate) log: usize,
}

impl Default for Limits {
    /// For the host's own calls (`describe`, loaders): generous, not unbounded.
    fn default() -> Self {
        Limits { memory: 256 << 20, log: 64 << 10 }
    }
}

/// Who is calling: named in log lines and error messages.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The step id, or `loader:<id>` for a loader.
    pub(crate) name: Arc<str>,
    pub(crate) plugin: Arc<str>,
}

/// The data of one plugin instance's `Store`.
pub(crate) struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    log: Log,
    limiter: Limiter,
    caller: Caller,
    /// Where `host.asset` is served from; `None` for loaders, which do not
    /// read assets themselves.
    assets: Option<Arc<dyn AssetSource>>,
    /// This instance's place among the engine's `max_instances`.
    _permit: OwnedSemaphorePermit,
    /// When the current call must end; checked at every epoch tick.
    deadline: Option<Instant>,
    /// `wasi:http`: the caller's grants over the host's connection pools.
    http: StepHttp,
    http_ctx: WasiHttpCtx,
    /// `qflow:plugin/sql`: the caller's grants over the host's databases.
    sql: StepSql,
}

impl PluginState {
    /// A store for one instance of a plugin: only what `grants` gives it
    /// (no network, no inherited environment), its memory limited, its
    /// stdout and stderr captured. Waits while the engine has
    /// `max_instances` alive. Past `deadline`, the guest is interrupted at
    /// its next epoch tick.
    pub(crate) async fn store(
        engine: &Engine,
        caller: Caller,
        assets: Option<Arc<dyn AssetSource>>,
        grants: &Grants,
        limits: Limits,
        deadline: Option<Instant>,
    ) -> Result<Store<PluginState>, String> {
        let granted = grants.granted()?;
        let permit = engine.instance_permit().await;
        Ok(PluginState::build(engine, permit, granted, caller, assets, limits, deadline))
    }

    /// [`PluginState::store`] for one of the host's own calls (`describe`,
    /// a loader's `load`), in the slots kept for them: busy steps never
    /// keep a plugin from loading. Such an instance reads no assets.
    pub(crate) async fn host_call_store(
        engine: &Engine,
        caller: Caller,
        grants: &Grants,
        limits: Limits,
        deadline: Option<Instant>,
    ) -> Result<Store<PluginState>, String> {
        let granted = grants.granted()?;
        let permit = engine.host_call_permit().await;
        Ok(PluginState::build(engine, permit, granted, caller, None, limits, deadline))
    }

    /// [`PluginState::store`] for a spare instance, only if a slot is free
    /// now: a spare never queues ahead of a step, nor pushes out an idle
    /// instance. `Ok(None)` when there is no free slot.
    pub(crate) fn spare_store(
        engine: &Engine,
        caller: Caller,
        assets: Option<Arc<dyn AssetSource>>,
        grants: &Grants,
        limits: Limits,
    ) -> Result<Option<Store<PluginState>>, String> {
        let granted = grants.granted()?;
        let Some(permit) = engine.try_instance_permit() else { return Ok(None) };
        let mut store = PluginState::build(engine, permit, granted, caller, assets, limits, None);
        store.data_mut().limiter.spare = true;
        Ok(Some(store))
    }

    /// The spare is made: from now on its growth may wait for memory like
    /// any instance's.
    pub(crate) fn spare_made(&mut self) {
        self.limiter.spare = false;
    }

    fn build(
        engine: &Engine,
        permit: OwnedSemaphorePermit,
        granted: Granted,
        caller: Caller,
        assets: Option<Arc<dyn AssetSource>>,
        limits: Limits,
        deadline: Option<Instant>,
    ) -> Store<PluginState> {
        let log = Log::new(limits.log);
        let Granted { mut wasi, http, databases } = granted;
        let wasi = wasi.stdout(log.pipe(Stream::Stdout)).stderr(log.pipe(Stream::Stderr)).build();
        let state = PluginState {
            wasi,
            table: ResourceTable::new(),
            log,
            limiter: Limiter::new(limits.memory, engine.clone()),
            http: StepHttp {
                client: engine.http().clone(),
                grants: http,
                caller: caller.name.clone(),
            },
            http_ctx: WasiHttpCtx::new(),
            sql: StepSql {
                databases: engine.databases().clone(),
                grants: databases,
                caller: caller.name.clone(),
            },
            caller,
            assets,
            _permit: permit,
            deadline,
        };
        let mut store = Store::new(engine.wasmtime(), state);
        store.limiter_async(|state| &mut state.limiter);
        // At every epoch tick: past the deadline, interrupt the guest (a
        // trap); before it, yield to the async scheduler, so that a CPU-bound
        // guest shares its worker thread instead of holding it. tokio's own
        // yield lets the timer and I/O drivers run first; a plain wake-up
        // would leave timers waiting up to 61 scheduler ticks on a busy
        // thread (610 ms at our 10 ms tick).
        store.epoch_deadline_callback(|store| match store.data().deadline {
            Some(deadline) if Instant::now() >= deadline => Ok(UpdateDeadline::Interrupt),
            _ => Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))),
        });
        store.set_epoch_deadline(1);
        store
    }

    /// Readies a (pooled) instance for a call: whom it serves now, and until when.
    pub(crate) fn prepare(&mut self, caller: Caller, deadline: Option<Instant>) {
        self.http.caller = caller.name.clone();
        self.sql.caller = caller.name.clone();
        self.caller = caller;
        self.deadline = deadline;
        // What warming the instance printed is nobody's business now.
        self.log.take();
    }

    /// Takes what the guest printed and logged since the last `prepare`;
    /// what the budget dropped is said once in the operator's log.
    pub(crate) fn take_log(&self) -> StepLog {
        let log = self.log.take();
        if log.dropped > 0 {
            let (step, plugin) = (&*self.caller.name, &*self.caller.plugin);
            tracing::warn!(
                target: "qflow::plugin",
                step,
                plugin,
                "{} lines and {} bytes of output over the log budget were dropped",
                log.dropped_lines,
                log.dropped
            );
        }
        log
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for PluginState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http_ctx, table: &mut self.table, hooks: &mut self.http }
    }
}

impl PluginState {
    /// Where `qflow:plugin/sql` is served from.
    pub(crate) fn sql(&mut self) -> &mut StepSql {
        &mut self.sql
    }
}

/// `qflow:plugin/host@0.1.0` is 0.2.0's `host`, for components built
/// against 0.1.0.
impl v0_1::qflow::plugin::host::Host for PluginState {
    fn log(&mut self, level: LogLevel, message: String) {
        host::Host::log(self, level, message)
    }

    async fn asset(&mut self, name: String) -> Result<Vec<u8>, StepError> {
        host::Host::asset(self, name).await
    }
}

impl host::Host for PluginState {
    fn log(&mut self, level: LogLevel, message: String) {
        let (step, plugin) = (&*self.caller.name, &*self.caller.plugin);
        let label = match level {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        };
        // Forwarded to the operator's log only within the step's budget,
        // one record per line: the guest's control characters escaped.
        self.log.line(Stream::Log(label), &message, |kept| {
            let message = format!("[{step}] {}", printable(kept));
            match level {
                LogLevel::Trace => {
                    tracing::trace!(target: "qflow::plugin", step, plugin, "{message}")
                }
                LogLevel::Debug => {
                    tracing::debug!(target: "qflow::plugin", step, plugin, "{message}")
                }
                LogLevel::Info => {
                    tracing::info!(target: "qflow::plugin", step, plugin, "{message}")
                }
                LogLevel::Warn => {
                    tracing::warn!(target: "qflow::plugin", step, plugin, "{message}")
                }
                LogLevel::Error => {
                    tracing::error!(target: "qflow::plugin", step, plugin, "{message}")
                }
            }
        });
    }

    async fn asset(&mut self, name: String) -> Result<Vec<u8>, StepError> {
        match &self.assets {
            Some(assets) => assets.clone().asset(&name).await.map(|bytes| bytes.to_vec()),
            None => Err(StepError {
                code: "no-assets".into(),
                message: format!("{} is a loader; loaders cannot read assets", self.caller.name),
                retryable: false,
            }),
        }
    }
}

/// A one-line account of a failed guest call: the trap (or the host's
/// error), then what the guest last wrote to stderr, where a Rust guest's
/// panic message lands. The full error, with the guest's backtrace, goes to
/// the debug log.
pub(crate) fn describe_failure(error: &wasmtime::Error, store: &Store<PluginState>) -> String {
    let caller = &store.data().caller;
    let full = format!("{error:?}");
    tracing::debug!(
        step = &*caller.name,
        plugin = &*caller.plugin,
        "guest call failed: {}",
        printable(&full)
    );
    let mut message = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    };
    if let Some(limit) = &store.data().limiter.hit {
        message = format!("it hit {limit} ({message})");
    }
    let stderr = store.data().log.stderr_tail();
    if !stderr.is_empty() {
        message = format!("{message}; the guest wrote: {stderr}");
    }
    message
}
