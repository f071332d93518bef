//! The scheduler: starts each step as soon as the steps it needs are done,
//! longest remaining critical path first, at most `max_parallel` at once,
//! never two holding the same resource; runs each attempt in its own
//! instance under a deadline; applies the failure strategies; reports.
//!
//! Every step is a task on tokio: a waiting step (a WASI sleep, a backoff)
//! holds no thread, and a CPU-bound guest yields at every epoch tick.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::assets::{AssetCache, Assets};
use crate::catalog::{Catalog, PluginError};
use crate::events::Event;
use crate::flow::{Flow, Step, Strategy};
use crate::input::Source;
use crate::instance::{Caller, Limits, describe_failure};
use crate::plan::Plan;
use crate::pool::PoolError;
use crate::sandbox::{Captured, Grants};
use crate::store::{Plugin, Stats};
use crate::warm::{InitError, PoolKey, PoolSource, Pools};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Every step succeeded.
    Succeeded,
    /// A step failed (after its retries).
    Failed,
    /// The run was cancelled before it ended.
    Cancelled,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// It returned an output.
    Succeeded,
    /// It failed: see its error.
    Failed,
    /// It was running when the run stopped (a failure elsewhere, or a cancel).
    Cancelled,
    /// It never started: a dependency failed or the run stopped first.
    Skipped,
}

/// Why a step failed.
#[derive(Debug, Clone, Serialize)]
pub struct StepFailure {
    /// What kind of failure: `plugin` (could not be loaded, or what it needs
    /// could not), `input` (its input mapping did not resolve), `config`
    /// (`init` rejected the config), `step-error` (`run` returned an error),
    /// `trap`, `timeout`, `invalid-output` (not JSON), `output-too-large`, or
    /// `internal` (a bug in the host).
    pub kind: &'static str,
    /// The plugin's error code, for `config` and `step-error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What went wrong, naming the step and its plugin.
    pub message: String,
    /// Whether another attempt may succeed: a `step-error` that says so, or
    /// a `timeout`. Only these are retried.
    pub retryable: bool,
}

/// What happened to one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// The step's id.
    pub id: String,
    /// The plugin it ran.
    pub plugin: String,
    /// How it ended.
    pub status: StepStatus,
    /// How many attempts it made (0 if it never started).
    pub attempts: u32,
    /// When its first attempt started, in ms since the run began.
    pub start_ms: Option<f64>,
    /// When its last attempt ended, in ms since the run began.
    pub end_ms: Option<f64>,
    /// Its output, if it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<StepFailure>,
    /// What its last attempt printed and logged, line by line, each marked
    /// `stdout:`, `stderr:` or with its `host.log` level.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
    /// Log bytes over the limit, dropped.
    #[serde(skip_serializing_if = "is_zero")]
    pub log_dropped_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StepReport {
    /// How long it ran, first attempt to last, in ms.
    pub fn duration_ms(&self) -> Option<f64> {
        Some(self.end_ms? - self.start_ms?)
    }
}

/// The plan's figures, as the run's summary reports them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanFigures {
    /// The critical path the scheduler followed.
    pub critical_path: Vec<String>,
    /// Its estimated duration, in ms (from past runs, else 1 ms a step).
    pub critical_path_ms: f64,
    /// How many parallel groups the flow has.
    pub groups: usize,
    /// The plan's parallelization ratio.
    pub parallelization: f64,
}

/// What happened in a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The run's id (a UUID).
    pub run_id: String,
    /// The flow's name.
    pub flow: String,
    /// How it ended.
    pub status: RunStatus,
    /// Wall time, in ms.
    pub wall_ms: f64,
    /// The sum of the steps' times, in ms.
    pub step_ms: f64,
    /// How close the run came to the fastest schedule its limits allow:
    /// the larger of its critical path (as the steps really took) and its
    /// step time spread over `max_parallel`, divided by the wall time.
    /// 1.0 is perfect.
    pub efficiency: f64,
    /// At most this many steps ran at once.
    pub max_parallel: usize,
    /// The plan the run followed.
    pub plan: PlanFigures,
    /// Every step, in the flow's order.
    pub steps: Vec<StepReport>,
    /// The host's caches as the run ended.
    pub store: Stats,
}

impl RunSummary {
    /// The report of the step `id`.
    pub fn step(&self, id: &str) -> Option<&StepReport> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The output of the step `id`, if it succeeded.
    pub fn output(&self, id: &str) -> Option<&Value> {
        self.step(id)?.output.as_ref()
    }
}

/// How to run a flow, beyond what the flow itself says.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// At most this many steps at once; overrides the flow's `max_parallel`.
    pub max_parallel: Option<usize>,
    /// Cancelling this token stops the run: running steps are cut, the rest
    /// skipped, and the summary says which.
    pub cancel: CancellationToken,
}

/// What every step task of one run shares.
struct RunContext {
    run_id: Arc<str>,
    flow: Arc<Flow>,
    catalog: Arc<Catalog>,
    assets: Arc<Assets>,
    events: broadcast::Sender<Event>,
    max_output_bytes: u64,
    /// The host's default memory limit per step, in bytes.
    max_memory_bytes: u64,
    /// The most log bytes kept per step call.
    max_log_bytes: u64,
    pools: Arc<Pools>,
    /// The flow's loaders, as part of its steps' pool keys.
    loaders_key: Arc<str>,
    /// Every plugin the flow's steps use, loaded when the run starts: the
    /// whole run uses those versions, whatever is reloaded meanwhile.
    plugins: HashMap<String, PluginLoad>,
    started: Instant,
}

/// A plugin being loaded for a run; every step that uses it awaits the same load.
type PluginLoad = Shared<BoxFuture<'static, Result<Arc<Plugin>, PluginError>>>;

impl RunContext {
    fn ms_since_start(&self, at: Instant) -> f64 {
        at.duration_since(self.started).as_secs_f64() * 1e3
    }

    fn emit(&self, event: Event) {
        // No subscriber is fine: nobody is watching.
        let _ = self.events.send(event);
    }
}

/// What a step task returns: its index, when it ran, and how it went.
struct Finished {
    index: usize,
    start: Instant,
    end: Instant,
    attempts: u32,
    result: Result<Value, StepFailure>,
    log: Captured,
}

/// What the host hands the scheduler for one run.
pub(crate) struct RunInputs {
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) asset_cache: Arc<AssetCache>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) max_output_bytes: u64,
    pub(crate) max_memory_bytes: u64,
    pub(crate) max_log_bytes: u64,
    pub(crate) pools: Arc<Pools>,
}

/// A ready step, ordered by its remaining critical path (then flow order).
#[derive(PartialEq)]
struct Ready {
    priority: f64,
    index: usize,
}

impl Eq for Ready {}

impl PartialOrd for Ready {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ready {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority.total_cmp(&other.priority).then(other.index.cmp(&self.index))
    }
}

pub(crate) async fn run(
    inputs: RunInputs,
    flow: Arc<Flow>,
    plan: &Plan,
    input: Value,
    options: RunOptions,
) -> RunSummary {
    let RunInputs {
        catalog,
        asset_cache,
        events,
        max_output_bytes,
        max_memory_bytes,
        max_log_bytes,
        pools,
    } = inputs;
    let ctx = Arc::new(RunContext {
        max_memory_bytes,
        max_log_bytes: flow.max_log_bytes.unwrap_or(max_log_bytes),
        loaders_key: Arc::from(format!("{:?}", flow.loaders)),
        plugins: load_plugins(&catalog, &flow),
        pools,
        run_id: Arc::from(uuid::Uuid::new_v4().to_string()),
        assets: Arc::new(Assets::new(catalog.clone(), asset_cache, flow.loaders.clone())),
        max_output_bytes: flow.max_output_bytes.unwrap_or(max_output_bytes),
        catalog,
        flow,
        events,
        started: Instant::now(),
    });
    let n = ctx.flow.steps.len();
    let limit = options.max_parallel.or(ctx.flow.max_parallel).unwrap_or(n).clamp(1, n.max(1));
    ctx.emit(Event::RunStarted {
        run_id: ctx.run_id.clone(),
        flow: Arc::from(ctx.flow.name.as_str()),
        steps: n,
    });

    let mut scheduler = Scheduler {
        reports: ctx
            .flow
            .steps
            .iter()
            .map(|s| StepReport {
                id: s.id.clone(),
                plugin: s.plugin.to_string(),
                status: StepStatus::Skipped,
                attempts: 0,
                start_ms: None,
                end_ms: None,
                output: None,
                error: None,
                log: Vec::new(),
                log_dropped_bytes: 0,
            })
            .collect(),
        unmet: ctx.flow.steps.iter().map(|s| s.deps.len()).collect(),
        ready: (0..n)
            .filter(|&i| ctx.flow.steps[i].deps.is_empty())
            .map(|index| Ready { priority: plan.priority[index], index })
            .collect(),
        held: HashSet::new(),
        running: JoinSet::new(),
        tasks: HashMap::new(),
        failed: false,
        stopping: false,
        ctx: ctx.clone(),
        plan,
        input,
        limit,
    };
    let cancelled = scheduler.run(&options.cancel).await;
    let Scheduler { reports, failed, .. } = scheduler;
    summarize(&ctx, plan, reports, failed, cancelled, limit)
}

struct Scheduler<'p> {
    ctx: Arc<RunContext>,
    plan: &'p Plan,
    input: Value,
    limit: usize,
    reports: Vec<StepReport>,
    /// For each step, how many of its dependencies have not succeeded yet.
    unmet: Vec<usize>,
    ready: BinaryHeap<Ready>,
    /// The exclusive resources held by running steps.
    held: HashSet<String>,
    running: JoinSet<Finished>,
    tasks: HashMap<tokio::task::Id, usize>,
    failed: bool,
    /// No new step starts: a fail-fast failure, or a cancel.
    stopping: bool,
}

impl Scheduler<'_> {
    /// Runs until nothing is running and nothing more can start; returns
    /// whether the run was cancelled.
    async fn run(&mut self, cancel: &CancellationToken) -> bool {
        let mut cancelled = false;
        loop {
            if !self.stopping {
                self.start_ready();
            }
            if self.running.is_empty() {
                return cancelled;
            }
            tokio::select! {
                _ = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    self.stop();
                }
                Some(joined) = self.running.join_next_with_id() => self.joined(joined),
            }
        }
    }

    /// Starts ready steps, most critical first, while there is room and
    /// their resources are free.
    fn start_ready(&mut self) {
        let mut blocked = Vec::new();
        while self.running.len() < self.limit {
            let Some(next) = self.ready.pop() else { break };
            let step = &self.ctx.flow.steps[next.index];
            if step.resources.iter().any(|r| self.held.contains(r)) {
                blocked.push(next);
                continue;
            }
            self.start(next.index);
            if self.stopping {
                break;
            }
        }
        self.ready.extend(blocked);
    }

    fn start(&mut self, index: usize) {
        let step = &self.ctx.flow.steps[index];
        let output_of = |i: usize| self.reports[i].output.as_ref();
        match resolve_input(&self.ctx.flow, index, &self.input, &output_of) {
            Ok(input) => {
                self.held.extend(step.resources.iter().cloned());
                let task = self.running.spawn(execute(self.ctx.clone(), index, input));
                self.tasks.insert(task.id(), index);
                // Until it reports back, it counts as started.
                self.reports[index].attempts = 1;
            }
            Err(failure) => {
                let now = Instant::now();
                self.finished(Finished {
                    index,
                    start: now,
                    end: now,
                    attempts: 0,
                    result: Err(failure),
                    log: Captured::default(),
                });
            }
        }
    }

    fn joined(&mut self, joined: Result<(tokio::task::Id, Finished), tokio::task::JoinError>) {
        match joined {
            Ok((_, done)) => self.finished(done),
            // Aborted when the run stopped: reported as cancelled at the end.
            Err(e) if e.is_cancelled() => {}
            // A bug in the host, not in the plugin: fail the step, keep going.
            Err(e) => {
                let Some(&index) = self.tasks.get(&e.id()) else { return };
                let now = Instant::now();
                let what = format!("the host failed while running it: {e}");
                let failure = failure(&self.ctx.flow.steps[index], "internal", None, what);
                self.finished(Finished {
                    index,
                    start: now,
                    end: now,
                    attempts: 1,
                    result: Err(failure),
                    log: Captured::default(),
                });
            }
        }
    }

    fn finished(&mut self, done: Finished) {
        let index = done.index;
        let step = &self.ctx.flow.steps[index];
        for resource in &step.resources {
            self.held.remove(resource);
        }
        let succeeded = done.result.is_ok();
        record(&self.ctx, &mut self.reports[index], done);
        if succeeded {
            for &next in &self.plan.dependents[index] {
                self.unmet[next] -= 1;
                if self.unmet[next] == 0 {
                    self.ready.push(Ready { priority: self.plan.priority[next], index: next });
                }
            }
        } else {
            self.failed = true;
            // Continue-on-error: its dependents never become ready and are
            // reported skipped; everything else goes on.
            if step.strategy != Strategy::ContinueOnError {
                self.stop();
            }
        }
    }

    /// No new step starts; running ones are cut.
    fn stop(&mut self) {
        self.stopping = true;
        self.running.abort_all();
    }
}

fn summarize(
    ctx: &RunContext,
    plan: &Plan,
    mut reports: Vec<StepReport>,
    failed: bool,
    cancelled: bool,
    limit: usize,
) -> RunSummary {
    for report in reports.iter_mut().filter(|r| r.attempts > 0 && r.end_ms.is_none()) {
        report.status = StepStatus::Cancelled;
    }
    for report in &reports {
        if matches!(report.status, StepStatus::Cancelled | StepStatus::Skipped) {
            ctx.emit(Event::StepFinished {
                run_id: ctx.run_id.clone(),
                step: Arc::from(report.id.as_str()),
                status: report.status,
            });
        }
    }
    let status = if cancelled {
        RunStatus::Cancelled
    } else if failed {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    let wall_ms = ctx.ms_since_start(Instant::now());
    let step_ms: f64 = reports.iter().filter_map(StepReport::duration_ms).sum();
    // The critical path as the steps really took: the longest chain of
    // dependent durations.
    let mut longest = vec![0.0f64; reports.len()];
    let order = plan.order.iter().filter_map(|id| ctx.flow.step_index(id));
    for i in order {
        let before = ctx.flow.steps[i].deps.iter().map(|&d| longest[d]).fold(0.0, f64::max);
        longest[i] = before + reports[i].duration_ms().unwrap_or(0.0);
    }
    let best = longest.iter().copied().fold(step_ms / limit as f64, f64::max);
    let efficiency = if wall_ms > 0.0 { (best / wall_ms).min(1.0) } else { 1.0 };
    ctx.emit(Event::RunFinished { run_id: ctx.run_id.clone(), status, wall_ms });
    RunSummary {
        run_id: ctx.run_id.to_string(),
        flow: ctx.flow.name.clone(),
        status,
        wall_ms,
        step_ms,
        efficiency,
        max_parallel: limit,
        plan: PlanFigures {
            critical_path: plan.critical_path.clone(),
            critical_path_ms: plan.critical_path_ms,
            groups: plan.groups.len(),
            parallelization: plan.parallelization,
        },
        steps: reports,
        store: Stats::default(),
    }
}

/// Records a finished step in its report (which keeps the output for the
/// dependents) and announces it.
fn record(ctx: &RunContext, report: &mut StepReport, done: Finished) {
    report.start_ms = Some(ctx.ms_since_start(done.start));
    report.end_ms = Some(ctx.ms_since_start(done.end));
    report.attempts = done.attempts;
    report.log = done.log.lines;
    report.log_dropped_bytes = done.log.dropped;
    match done.result {
        Ok(output) => {
            report.status = StepStatus::Succeeded;
            report.output = Some(output);
        }
        Err(failure) => {
            report.status = StepStatus::Failed;
            report.error = Some(failure);
        }
    }
    ctx.emit(Event::StepFinished {
        run_id: ctx.run_id.clone(),
        step: Arc::from(report.id.as_str()),
        status: report.status,
    });
}

/// Starts loading every plugin the flow uses, at once: compiles overlap
/// each other and the first steps, and the run is pinned to the versions
/// it started with.
fn load_plugins(catalog: &Arc<Catalog>, flow: &Flow) -> HashMap<String, PluginLoad> {
    let mut loads = HashMap::new();
    for step in &flow.steps {
        let name = &step.plugin.name;
        if !loads.contains_key(name) {
            let (catalog, owned) = (catalog.clone(), name.clone());
            let task = tokio::spawn(async move { catalog.load(&owned).await });
            let load =
                async move { task.await.unwrap_or_else(|e| Err(PluginError::Host(e.to_string()))) };
            loads.insert(name.clone(), load.boxed().shared());
        }
    }
    loads
}

/// The step's input: its `input` mapping resolved, or by default the flow's
/// input (no dependencies), its one dependency's output, or an object of its
/// dependencies' outputs keyed by their ids.
fn resolve_input<'v>(
    flow: &Flow,
    index: usize,
    input: &'v Value,
    output_of: &impl Fn(usize) -> Option<&'v Value>,
) -> Result<Value, StepFailure> {
    let step = &flow.steps[index];
    let output = |i: usize| output_of(i).cloned().unwrap_or(Value::Null);
    match (&step.input, step.deps.as_slice()) {
        (Some(template), _) => {
            let lookup = |source: &Source| match source {
                Source::Input => Some(input),
                Source::Step(id) => flow.step_index(id).and_then(output_of),
            };
            template
                .resolve(&lookup)
                .map_err(|reason| failure(step, "input", None, format!("input {reason}")))
        }
        (None, []) => Ok(input.clone()),
        (None, [one]) => Ok(output(*one)),
        (None, deps) => {
            Ok(Value::Object(deps.iter().map(|&d| (flow.steps[d].id.clone(), output(d))).collect()))
        }
    }
}

fn failure(step: &Step, kind: &'static str, code: Option<String>, what: String) -> StepFailure {
    StepFailure {
        kind,
        code,
        message: format!("step `{}` (plugin {}): {what}", step.id, step.plugin),
        retryable: false,
    }
}

/// A step to the end: load its plugin (and what it needs), then attempts
/// under its timeout, retried with backoff as its strategy says.
async fn execute(ctx: Arc<RunContext>, index: usize, input: Value) -> Finished {
    let start = Instant::now();
    let step = &ctx.flow.steps[index];
    ctx.emit(Event::StepStarted { run_id: ctx.run_id.clone(), step: Arc::from(step.id.as_str()) });
    let plugin = match load_step_plugin(&ctx, step).await {
        Ok(plugin) => plugin,
        Err(failure) => {
            return Finished {
                index,
                start,
                end: Instant::now(),
                attempts: 1,
                result: Err(failure),
                log: Captured::default(),
            };
        }
    };
    let retries = step.strategy == Strategy::RetryFailed;
    let mut attempts = 1;
    loop {
        let (result, log) = attempt(&ctx, step, &plugin, &input).await;
        match result {
            Err(failure) if retries && failure.retryable && attempts < step.retry.max_attempts => {
                let delay = step.retry.delay(attempts, RandomState::new().hash_one(attempts));
                ctx.emit(Event::StepRetrying {
                    run_id: ctx.run_id.clone(),
                    step: Arc::from(step.id.as_str()),
                    attempt: attempts + 1,
                    delay_ms: delay.as_millis() as u64,
                    error: failure.message,
                });
                tokio::time::sleep(delay).await;
                attempts += 1;
            }
            result => {
                return Finished { index, start, end: Instant::now(), attempts, result, log };
            }
        }
    }
}

async fn load_step_plugin(ctx: &RunContext, step: &Step) -> Result<Arc<Plugin>, StepFailure> {
    let plugin_failed = |e: PluginError| failure(step, "plugin", None, e.to_string());
    let name = &step.plugin.name;
    let plugin = match ctx.plugins.get(name) {
        Some(load) => load.clone().await,
        None => ctx.catalog.load(name).await,
    };
    let plugin = plugin.map_err(plugin_failed)?;
    plugin.check_version(name, step.plugin.version.as_deref()).map_err(plugin_failed)?;
    plugin.step(name).map_err(plugin_failed)?;
    // The assets the plugin says it reads are its dependencies too: load
    // them all, in parallel, before it runs.
    let assets = plugin.described.assets.iter().map(|asset| async move {
        ctx.assets.get(asset).await.map_err(|e| {
            let what =
                format!("needs the asset {asset:?}, which could not be loaded: {}", e.message);
            failure(step, "plugin", Some(e.code), what)
        })
    });
    futures::future::try_join_all(assets).await?;
    Ok(plugin)
}

fn timed_out(step: &Step, limit: Duration) -> StepFailure {
    let what = format!("did not finish within its timeout of {} ms", limit.as_millis());
    StepFailure { retryable: true, ..failure(step, "timeout", None, what) }
}

/// One attempt under the step's timeout: the guest is interrupted at its
/// deadline (an epoch check), and the whole attempt, host calls included,
/// is bounded by the same time.
async fn attempt(
    ctx: &RunContext,
    step: &Step,
    plugin: &Plugin,
    input: &Value,
) -> (Result<Value, StepFailure>, Captured) {
    let Some(limit) = step.timeout else {
        return call(ctx, step, plugin, input, None).await;
    };
    let deadline = Instant::now() + limit;
    match tokio::time::timeout_at(deadline, call(ctx, step, plugin, input, Some(deadline))).await {
        Ok((Err(failure), log)) if failure.kind == "trap" && Instant::now() >= deadline => {
            (Err(timed_out(step, limit)), log)
        }
        Ok(result) => result,
        Err(_) => (Err(timed_out(step, limit)), Captured::default()),
    }
}

/// One call of `run` on an initialised instance from the step's pool. An
/// instance that trapped or ran out of time is discarded; one that returned
/// goes back to the pool while it has reuses left.
async fn call(
    ctx: &RunContext,
    step: &Step,
    plugin: &Plugin,
    input: &Value,
    deadline: Option<Instant>,
) -> (Result<Value, StepFailure>, Captured) {
    let name = &step.plugin.name;
    let pre = match plugin.step(name) {
        Ok(pre) => pre,
        Err(e) => return (Err(failure(step, "plugin", None, e.to_string())), Captured::default()),
    };
    let limits = Limits {
        memory: step.max_memory_bytes.unwrap_or(ctx.max_memory_bytes) as usize,
        log: ctx.max_log_bytes as usize,
    };
    let key = PoolKey {
        digest: plugin.digest,
        config: serde_json::to_string(&step.config).unwrap_or_else(|_| "{}".to_owned()),
        loaders: ctx.loaders_key.clone(),
        grants: Grants { dirs: step.dirs.clone(), env: step.env.clone() },
        limits,
        settings: step.pool,
    };
    let source = PoolSource {
        engine: ctx.catalog.engine(),
        pre,
        plugin: name,
        plugins_dir: ctx.catalog.dir(),
        assets: &ctx.assets,
    };
    let pool = match ctx.pools.get(&key, source) {
        Ok(pool) => pool,
        Err(e) => return (Err(failure(step, "plugin", None, e)), Captured::default()),
    };
    let mut pooled = match pool.pool.acquire().await {
        Ok(pooled) => pooled,
        Err(e) => return (Err(acquire_failed(step, e)), Captured::default()),
    };
    let warm = pooled.get();
    let caller = Caller { name: Arc::from(step.id.as_str()), plugin: Arc::from(name.as_str()) };
    warm.store.data_mut().prepare(caller, deadline);
    let ran = warm.instance.call_run(&mut warm.store, &input.to_string()).await;
    let returned = match ran {
        Err(e) => {
            let what = format!("trapped in run: {}", describe_failure(&e, &warm.store));
            let log = warm.store.data().log().take();
            // Dropping `pooled` discards the instance: it is never reused.
            return (Err(failure(step, "trap", None, what)), log);
        }
        Ok(returned) => returned,
    };
    let log = warm.store.data().log().take();
    warm.calls += 1;
    if warm.calls < pool.reuse {
        pooled.release();
    }
    (returned_value(ctx, step, returned), log)
}

fn acquire_failed(step: &Step, e: PoolError<InitError>) -> StepFailure {
    match e {
        PoolError::Create(InitError::Config { code, message }) => {
            failure(step, "config", Some(code), format!("rejected its config: {message}"))
        }
        PoolError::Create(trap @ InitError::Trap { .. }) => {
            failure(step, "trap", None, trap.to_string())
        }
        PoolError::Create(InitError::Grant(message)) => failure(step, "sandbox", None, message),
        PoolError::Timeout { .. } => StepFailure {
            retryable: true,
            ..failure(step, "pool", None, format!("waited for an instance: {e}"))
        },
        other => failure(step, "pool", None, format!("no instance: {other}")),
    }
}

/// What `run` returned, checked: an error, or JSON within the size limit.
fn returned_value(
    ctx: &RunContext,
    step: &Step,
    returned: Result<String, crate::bindings::StepError>,
) -> Result<Value, StepFailure> {
    let output = match returned {
        Ok(output) => output,
        Err(e) => {
            let what = format!("failed: {}: {}", e.code, e.message);
            let failure = failure(step, "step-error", Some(e.code), what);
            return Err(StepFailure { retryable: e.retryable, ..failure });
        }
    };
    if output.len() as u64 > ctx.max_output_bytes {
        let what = format!(
            "returned {} bytes of output, over the limit of {}",
            output.len(),
            ctx.max_output_bytes
        );
        return Err(failure(step, "output-too-large", None, what));
    }
    serde_json::from_str(&output).map_err(|e| {
        let preview: String = output.chars().take(80).collect();
        failure(step, "invalid-output", None, format!("returned invalid JSON ({e}): {preview:?}"))
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::flow::Format;

    fn flow() -> Flow {
        let toml = r#"
            [flow]
            name = "inputs"
            [[step]]
            id = "a"
            plugin = "x"
            [[step]]
            id = "b"
            plugin = "x"
            needs = ["a"]
            [[step]]
            id = "c"
            plugin = "x"
            needs = ["a", "b"]
            [[step]]
            id = "d"
            plugin = "x"
            needs = ["b"]
            input = { from_a = "${steps.b.output.n}", all = "${input}" }
        "#;
        Flow::parse(toml, Format::Toml, "<test>", Path::new(".")).unwrap()
    }

    #[test]
    fn default_inputs_follow_the_dependencies() {
        let flow = flow();
        let input = json!({"flow": "input"});
        let outputs = [Some(json!("A")), Some(json!({"n": 2})), None, None];
        let output_of = |i: usize| outputs[i].as_ref();
        let resolve = |i| resolve_input(&flow, i, &input, &output_of).unwrap();
        assert_eq!(resolve(0), input, "no dependencies: the flow's input");
        assert_eq!(resolve(1), json!("A"), "one dependency: its output");
        assert_eq!(resolve(2), json!({"a": "A", "b": {"n": 2}}), "several: keyed by id");
        assert_eq!(resolve(3), json!({"from_a": 2, "all": {"flow": "input"}}), "a mapping");
    }

    #[test]
    fn the_plan_orders_dependencies_first() {
        let flow = flow();
        let plan = Plan::new(&flow);
        let pos = |id: &str| plan.order.iter().position(|x| x == id).unwrap();
        assert!(pos("a") < pos("b") && pos("b") < pos("c") && pos("b") < pos("d"));
        assert_eq!(plan.dependents[0], vec![1, 2]);
        assert_eq!(plan.dependents[1], vec![2, 3]);
    }
}
