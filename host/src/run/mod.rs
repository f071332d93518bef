//! The scheduler: starts each step as soon as the steps it needs are done,
//! longest remaining critical path first, at most `max_parallel` at once,
//! never two holding the same resource; bounds each attempt by its
//! deadline; applies the failure strategies and retries; reports.
//!
//! It knows nothing of WebAssembly: it reaches a step's instances only
//! through a [`StepInvoker`], so it is tested with a fake one under tokio's
//! paused clock (`tests.rs`), exactly and without a wall clock.
//!
//! Every step is a task on tokio: a waiting step (a WASI sleep, a backoff)
//! holds no thread.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{
    Emitter, EventData, FailureKind, Flow, Json, Plan, PlanFigures, RunStatus, RunSummary, Source,
    Stats, Step, StepFailure, StepLog, StepReport, StepStatus, Strategy,
};

#[cfg(test)]
mod tests;

/// How the scheduler reaches a step's instances: the one seam between
/// scheduling and WebAssembly. The host's implementation pulls instances
/// from the pools; the scheduler's tests use a fake.
pub(crate) trait StepInvoker: Send + Sync + 'static {
    /// The run has been announced and no step has started: begin whatever
    /// may overlap the first steps (the host starts loading every plugin
    /// the flow uses). Called once per run.
    fn start(&self) {}

    /// Readies step `index` for its attempts (loads its plugin, and what
    /// that needs). Called once per step, in the step's task, before its
    /// first attempt.
    fn prepare(&self, index: usize) -> impl Future<Output = Result<(), StepFailure>> + Send;

    /// One attempt of step `index` on `input`. `deadline` is when the
    /// scheduler cuts the attempt; the invoker should stop its guest by
    /// then. Dropping the future cuts the attempt.
    fn invoke(
        &self,
        index: usize,
        input: &Json,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Attempt> + Send;
}

/// What one attempt gave.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) result: Result<Json, StepFailure>,
    /// What the guest printed and logged during the attempt.
    pub(crate) log: StepLog,
    /// How long getting an instance ready took (from its pool, or made and
    /// initialised there): load time, not the step's own.
    pub(crate) ready: Duration,
}

/// How to run a flow, beyond what the flow itself says.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RunOptions {
    /// At most this many steps at once; overrides the flow's `max_parallel`.
    pub max_parallel: Option<usize>,
    /// Cancelling this token stops the run: running steps are cut, the rest
    /// skipped, and the summary says which.
    pub cancel: CancellationToken,
    /// The run's id, when the caller must know it before the run starts (a
    /// server answers with it at once); a new UUID otherwise.
    pub run_id: Option<String>,
    /// The timeout of a step whose flow gives it none (a host sets its
    /// default, 15 minutes, where this is `None`).
    pub step_timeout: Option<Duration>,
    /// How long the whole run may take: at that point its running steps
    /// fail with a timeout and the rest are skipped (a host sets its
    /// default, 24 hours, where this is `None`).
    pub run_timeout: Option<Duration>,
    /// Outputs larger than this (in bytes of JSON) are replaced by their
    /// digest (`{"sha256", "bytes"}`) in the summary as soon as every step
    /// that needs them has started, unless nothing depends on them (the
    /// flow's results are kept): a long chain of large outputs holds one
    /// or two at a time, not all. `None` keeps every output.
    pub retain_output_bytes: Option<u64>,
    /// With a run store: wait until the run's start is in the store before
    /// it starts (then notify `stored`, if given), and until its end is
    /// before the run returns. A server answers only for runs it cannot
    /// lose; a host process that dies can then only leave them
    /// interrupted, never forgotten.
    pub durable: bool,
    /// Notified once the run's start is in the store (at once without a
    /// store).
    pub stored: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl RunOptions {
    /// The defaults: the flow's own parallelism, not cancelled.
    pub fn new() -> RunOptions {
        RunOptions::default()
    }

    /// At most `n` steps at once, whatever the flow says.
    pub fn max_parallel(mut self, n: usize) -> RunOptions {
        self.max_parallel = Some(n);
        self
    }

    /// Stops the run when `cancel` is cancelled.
    pub fn cancel(mut self, cancel: CancellationToken) -> RunOptions {
        self.cancel = cancel;
        self
    }

    /// Gives the run this id.
    pub fn run_id(mut self, id: String) -> RunOptions {
        self.run_id = Some(id);
        self
    }

    /// Steps with no timeout of their own get this one.
    pub fn step_timeout(mut self, timeout: Duration) -> RunOptions {
        self.step_timeout = Some(timeout);
        self
    }

    /// The whole run may take at most this long.
    pub fn run_timeout(mut self, timeout: Duration) -> RunOptions {
        self.run_timeout = Some(timeout);
        self
    }

    /// The run is in the store before it starts and before it returns.
    pub fn durable(mut self) -> RunOptions {
        self.durable = true;
        self
    }

    /// Outputs over `bytes` that only feed other steps are kept as their
    /// digest once those steps have them.
    pub fn retain_output_bytes(mut self, bytes: u64) -> RunOptions {
        self.retain_output_bytes = Some(bytes);
        self
    }
}

/// What every step task of one run shares.
struct RunContext<I> {
    run_id: Arc<str>,
    flow: Arc<Flow>,
    invoker: Arc<I>,
    events: Emitter,
    started: Instant,
    /// The timeout of steps with none of their own.
    step_timeout: Option<Duration>,
}

impl<I> RunContext<I> {
    fn ms_since_start(&self, at: Instant) -> f64 {
        at.duration_since(self.started).as_secs_f64() * 1e3
    }
}

/// A step run in the scheduler's own task, and its index.
type Inline = (usize, Pin<Box<dyn Future<Output = std::thread::Result<Finished>> + Send>>);

/// What a step task returns: its index, when it ran, and how it went.
struct Finished {
    index: usize,
    start: Instant,
    end: Instant,
    /// The load phase: readying the step (its plugin loaded or compiled,
    /// what it needs) and its first instance.
    load: Duration,
    attempts: u32,
    result: Result<Json, StepFailure>,
    log: StepLog,
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

/// Runs `flow` on `input` to the end, through `invoker`, following `plan`;
/// announces what happens through `events` (whose source is the run).
pub(crate) async fn run<I: StepInvoker>(
    run_id: Arc<str>,
    flow: Arc<Flow>,
    plan: &Plan,
    input: Value,
    options: RunOptions,
    invoker: Arc<I>,
    events: Emitter,
) -> RunSummary {
    let started = Instant::now();
    let step_timeout = options.step_timeout;
    let ctx = Arc::new(RunContext { run_id, flow, invoker, events, started, step_timeout });
    let n = ctx.flow.steps.len();
    let limit = options.max_parallel.or(ctx.flow.max_parallel).unwrap_or(n).clamp(1, n.max(1));
    ctx.events.emit(|| EventData::RunStarted {
        run_id: ctx.run_id.clone(),
        flow: Arc::from(ctx.flow.name.as_str()),
        steps: n,
    });
    ctx.invoker.start();

    let mut scheduler = Scheduler {
        reports: ctx.flow.steps.iter().map(|s| StepReport::pending(&s.id, &s.plugin)).collect(),
        unmet: ctx.flow.steps.iter().map(|s| s.deps.len()).collect(),
        ready: (0..n)
            .filter(|&i| ctx.flow.steps[i].deps.is_empty())
            .map(|index| Ready { priority: plan.priority[index], index })
            .collect(),
        held: HashSet::new(),
        running: JoinSet::new(),
        inline: None,
        tasks: HashMap::new(),
        failed: false,
        stopping: false,
        group_left: plan.groups.iter().map(Vec::len).collect(),
        group_of: {
            let mut group_of = vec![0; n];
            for (k, group) in plan.groups.iter().enumerate() {
                for i in group.iter().filter_map(|id| ctx.flow.step_index(id)) {
                    group_of[i] = k;
                }
            }
            group_of
        },
        consumers: ctx.flow.steps.iter().map(|_| 0).collect(),
        started: vec![None; ctx.flow.steps.len()],
        retain: options.retain_output_bytes,
        ctx: ctx.clone(),
        plan,
        input_json: Json::from_value(&input),
        // The tree is kept only if a mapping reads it; otherwise the text
        // is all the run needs.
        input: reads_input(&ctx.flow).then_some(input),
        limit,
    };
    for step in &ctx.flow.steps {
        for &dep in &step.deps {
            scheduler.consumers[dep] += 1;
        }
    }
    let deadline = options.run_timeout.and_then(|limit| started.checked_add(limit));
    let ended = scheduler.run(&options.cancel, deadline).await;
    let Scheduler { reports, failed, started: started_at, .. } = scheduler;
    let timed_out = matches!(ended, Ended::TimedOut).then_some(options.run_timeout).flatten();
    let failed = failed || timed_out.is_some();
    summarize(&ctx, plan, reports, &started_at, failed, ended, timed_out, limit)
}

/// How the scheduler's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Nothing more could start.
    Done,
    /// The run was cancelled.
    Cancelled,
    /// The run's timeout passed.
    TimedOut,
}

struct Scheduler<'p, I> {
    ctx: Arc<RunContext<I>>,
    plan: &'p Plan,
    /// The flow's input, as text, and as a tree if an `input` mapping
    /// reads it.
    input: Option<Value>,
    input_json: Json,
    limit: usize,
    /// For each step, how many steps that need it have not started yet.
    consumers: Vec<usize>,
    /// Outputs over this size are kept as digests once consumed.
    retain: Option<u64>,
    /// When each step's task was started.
    started: Vec<Option<Instant>>,
    reports: Vec<StepReport>,
    /// For each step, how many of its dependencies have not succeeded yet.
    unmet: Vec<usize>,
    ready: BinaryHeap<Ready>,
    /// The exclusive resources held by running steps.
    held: HashSet<String>,
    running: JoinSet<Finished>,
    /// One step run in the scheduler's own task rather than spawned: a
    /// chain, or the first step of a group, then costs no task spawn and no
    /// wake-up of another thread. The others are spawned, so steps still
    /// run on every core.
    inline: Option<Inline>,
    tasks: HashMap<tokio::task::Id, usize>,
    failed: bool,
    /// No new step starts: a fail-fast failure, or a cancel.
    stopping: bool,
    /// Each step's parallel group in the plan, and how many steps of each
    /// group have not finished: a group whose count reaches 0 is announced.
    group_of: Vec<usize>,
    group_left: Vec<usize>,
}

impl<I: StepInvoker> Scheduler<'_, I> {
    /// Runs until nothing is running and nothing more can start, or until
    /// it is cancelled or its `deadline` passes.
    async fn run(&mut self, cancel: &CancellationToken, deadline: Option<Instant>) -> Ended {
        let mut ended = Ended::Done;
        let timeout = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);
        loop {
            if !self.stopping {
                self.start_ready();
            }
            if self.running.is_empty() && self.inline.is_none() {
                return ended;
            }
            let inline = async {
                match &mut self.inline {
                    Some((index, step)) => (*index, step.as_mut().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled(), if ended == Ended::Done => {
                    ended = Ended::Cancelled;
                    self.stop();
                }
                _ = &mut timeout, if ended == Ended::Done => {
                    ended = Ended::TimedOut;
                    self.stop();
                }
                (index, done) = inline => {
                    self.inline = None;
                    self.inline_finished(index, done);
                }
                Some(joined) = self.running.join_next_with_id() => self.joined(joined),
            }
        }
    }

    /// Starts ready steps, most critical first, while there is room and
    /// their resources are free.
    fn start_ready(&mut self) {
        let mut blocked = Vec::new();
        while self.running.len() + usize::from(self.inline.is_some()) < self.limit {
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
        let ctx = self.ctx.clone();
        let step = &ctx.flow.steps[index];
        let output_of = |i: usize| self.reports[i].output.as_ref();
        let resolved =
            resolve_input(&self.ctx.flow, index, &self.input_json, self.input.as_ref(), &output_of);
        self.consumed(index);
        match resolved {
            Ok(input) => {
                self.held.extend(step.resources.iter().cloned());
                let span = tracing::info_span!("step", step = %step.id, plugin = %step.plugin);
                let step =
                    tracing::Instrument::instrument(execute(ctx.clone(), index, input), span);
                if self.inline.is_none() {
                    // A panic in the host's code fails the step, as it does
                    // in a spawned task.
                    let step = AssertUnwindSafe(step).catch_unwind();
                    self.inline = Some((index, Box::pin(step)));
                } else {
                    let task = self.running.spawn(step);
                    self.tasks.insert(task.id(), index);
                }
                // Until it reports back, it counts as started.
                self.reports[index].attempts = 1;
                self.started[index] = Some(Instant::now());
            }
            Err(failure) => {
                let now = Instant::now();
                self.finished(Finished {
                    index,
                    start: now,
                    end: now,
                    load: Duration::ZERO,
                    attempts: 0,
                    result: Err(failure),
                    log: StepLog::default(),
                });
            }
        }
    }

    /// Step `index` has its input: each output it read that no other step
    /// still needs, and that feeds other steps (is not a result of the
    /// flow), is kept as its digest if it is over the retention size.
    fn consumed(&mut self, index: usize) {
        let Some(retain) = self.retain else { return };
        for &dep in &self.ctx.flow.steps[index].deps {
            self.consumers[dep] -= 1;
            let report = &mut self.reports[dep];
            if self.consumers[dep] == 0
                && let Some(output) = &report.output
                && output.len() as u64 > retain
            {
                report.output = Some(output.digest());
            }
        }
    }

    /// The inline step ended, or its future panicked (a bug in the host).
    fn inline_finished(&mut self, index: usize, done: std::thread::Result<Finished>) {
        match done {
            Ok(done) => self.finished(done),
            Err(_) => self.host_failed(index, "the host failed while running it (a panic)".into()),
        }
    }

    /// A bug in the host, not in the plugin: fail the step, keep going.
    fn host_failed(&mut self, index: usize, what: String) {
        let now = Instant::now();
        let failure = failure(&self.ctx.flow.steps[index], FailureKind::Internal, &what);
        self.finished(Finished {
            index,
            start: now,
            end: now,
            load: Duration::ZERO,
            attempts: 1,
            result: Err(failure),
            log: StepLog::default(),
        });
    }

    fn joined(&mut self, joined: Result<(tokio::task::Id, Finished), tokio::task::JoinError>) {
        match joined {
            Ok((_, done)) => self.finished(done),
            // Aborted when the run stopped: reported as cancelled at the end.
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                let Some(&index) = self.tasks.get(&e.id()) else { return };
                self.host_failed(index, format!("the host failed while running it: {e}"));
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
        let group = self.group_of[index];
        self.group_left[group] = self.group_left[group].saturating_sub(1);
        if self.group_left[group] == 0 {
            self.ctx.events.emit(|| EventData::GroupCompleted {
                run_id: self.ctx.run_id.clone(),
                group,
                steps: self.plan.groups[group].clone(),
                at_ms: self.reports[index].end_ms.unwrap_or_default(),
            });
        }
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
        // Dropped: its attempt is cut as a spawned one's is.
        self.inline = None;
    }
}

#[allow(clippy::too_many_arguments)]
fn summarize<I>(
    ctx: &RunContext<I>,
    plan: &Plan,
    mut reports: Vec<StepReport>,
    started: &[Option<Instant>],
    failed: bool,
    ended: Ended,
    timed_out: Option<Duration>,
    limit: usize,
) -> RunSummary {
    let now = ctx.ms_since_start(Instant::now());
    // Steps still running were cut: by a cancel, or failed by the run's
    // timeout. Their ends are announced here, with the skipped steps'.
    let mut cut = vec![false; reports.len()];
    for (i, report) in reports.iter_mut().enumerate() {
        if report.attempts == 0 || report.end_ms.is_some() {
            continue;
        }
        cut[i] = true;
        report.start_ms = started[i].map(|at| ctx.ms_since_start(at));
        match timed_out {
            Some(limit) => {
                let what = format!("was cut by the run's timeout of {} ms", limit.as_millis());
                report.status = StepStatus::Failed;
                report.end_ms = Some(now);
                report.error = Some(failure(&ctx.flow.steps[i], FailureKind::Timeout, &what));
            }
            None => report.status = StepStatus::Cancelled,
        }
    }
    let cancelled = ended == Ended::Cancelled;
    for (report, cut) in reports.iter().zip(cut) {
        if cut || report.status == StepStatus::Skipped {
            ctx.events.emit(|| EventData::StepFinished {
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
    ctx.events.emit(|| EventData::RunFinished { run_id: ctx.run_id.clone(), status, wall_ms });
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
fn record<I>(ctx: &RunContext<I>, report: &mut StepReport, done: Finished) {
    report.start_ms = Some(ctx.ms_since_start(done.start));
    report.end_ms = Some(ctx.ms_since_start(done.end));
    let total = done.end.saturating_duration_since(done.start);
    report.load_ms = Some(done.load.as_secs_f64() * 1e3);
    report.run_ms = Some(total.saturating_sub(done.load).as_secs_f64() * 1e3);
    report.attempts = done.attempts;
    report.log = done.log.lines;
    report.log_dropped_bytes = done.log.dropped;
    report.log_dropped_lines = done.log.dropped_lines;
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
    ctx.events.emit(|| EventData::StepFinished {
        run_id: ctx.run_id.clone(),
        step: Arc::from(report.id.as_str()),
        status: report.status,
    });
}

/// Whether some step's `input` mapping reads the flow's input.
fn reads_input(flow: &Flow) -> bool {
    flow.steps
        .iter()
        .filter_map(|s| s.input.as_ref())
        .any(|t| t.refs().iter().any(|r| r.source == Source::Input))
}

/// The step's input: its `input` mapping resolved, or by default the flow's
/// input (no dependencies), its one dependency's output (the same text,
/// shared), or an object of its dependencies' outputs keyed by their ids.
fn resolve_input<'v>(
    flow: &Flow,
    index: usize,
    input_json: &Json,
    input: Option<&Value>,
    output_of: &impl Fn(usize) -> Option<&'v Json>,
) -> Result<Json, StepFailure> {
    let step = &flow.steps[index];
    let null = Json::null();
    match (&step.input, step.deps.as_slice()) {
        (Some(template), _) => {
            // Only the outputs the mapping reads are parsed, once each.
            let mut read: HashMap<&str, Value> = HashMap::new();
            for r in template.refs() {
                if let Source::Step(id) = &r.source
                    && !read.contains_key(id.as_str())
                    && let Some(output) = flow.step_index(id).and_then(output_of)
                {
                    read.insert(id, output.value());
                }
            }
            let lookup = |source: &Source| match source {
                Source::Input => input,
                Source::Step(id) => read.get(id.as_str()),
            };
            template
                .resolve(&lookup)
                .map(|value| Json::from_value(&value))
                .map_err(|reason| failure(step, FailureKind::Input, &format!("input {reason}")))
        }
        (None, []) => Ok(input_json.clone()),
        (None, [one]) => Ok(output_of(*one).cloned().unwrap_or(null)),
        (None, deps) => Ok(Json::object(
            deps.iter().map(|&d| (flow.steps[d].id.as_str(), output_of(d).unwrap_or(&null))),
        )),
    }
}

fn failure(step: &Step, kind: FailureKind, what: &str) -> StepFailure {
    StepFailure::new(&step.id, &step.plugin, kind, what)
}

/// A step to the end: ready it, then attempts under its timeout, retried
/// with backoff as its strategy says.
async fn execute<I: StepInvoker>(ctx: Arc<RunContext<I>>, index: usize, input: Json) -> Finished {
    let start = Instant::now();
    let step = &ctx.flow.steps[index];
    tracing::debug!(run = &*ctx.run_id, "step {} started", step.id);
    ctx.events.emit(|| EventData::StepStarted {
        run_id: ctx.run_id.clone(),
        step: Arc::from(step.id.as_str()),
    });
    if let Err(failure) = ctx.invoker.prepare(index).await {
        let end = Instant::now();
        return Finished {
            index,
            start,
            end,
            load: end.saturating_duration_since(start),
            attempts: 1,
            result: Err(failure),
            log: StepLog::default(),
        };
    }
    let prepared = start.elapsed();
    let retries = step.strategy == Strategy::RetryFailed;
    let mut attempts = 1;
    let mut load = None;
    loop {
        let timeout = step.timeout.or(ctx.step_timeout);
        let Attempt { result, log, ready } =
            attempt(&*ctx.invoker, step, timeout, index, &input).await;
        let load = *load.get_or_insert(prepared + ready);
        match result {
            Err(failure) if retries && failure.retryable && attempts < step.retry.max_attempts => {
                let delay = step.retry.delay(attempts, RandomState::new().hash_one(attempts));
                ctx.events.emit(|| EventData::StepRetrying {
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
                let end = Instant::now();
                return Finished { index, start, end, load, attempts, result, log };
            }
        }
    }
}

fn timed_out(step: &Step, limit: Duration) -> StepFailure {
    let what = format!("did not finish within its timeout of {} ms", limit.as_millis());
    failure(step, FailureKind::Timeout, &what).retryable(true)
}

/// One attempt under the step's timeout: the invoker is told the deadline
/// (a guest is interrupted there), and the whole attempt, host calls
/// included, is cut at the same time.
async fn attempt<I: StepInvoker>(
    invoker: &I,
    step: &Step,
    timeout: Option<Duration>,
    index: usize,
    input: &Json,
) -> Attempt {
    let Some((limit, deadline)) =
        timeout.and_then(|limit| Some((limit, Instant::now().checked_add(limit)?)))
    else {
        return invoker.invoke(index, input, None).await;
    };
    match tokio::time::timeout_at(deadline, invoker.invoke(index, input, Some(deadline))).await {
        // An interrupted guest traps; at its deadline, that is the timeout.
        Ok(Attempt { result: Err(failure), log, ready })
            if failure.kind == FailureKind::Trap && Instant::now() >= deadline =>
        {
            Attempt { result: Err(timed_out(step, limit)), log, ready }
        }
        Ok(attempt) => attempt,
        Err(_) => Attempt {
            result: Err(timed_out(step, limit)),
            log: StepLog::default(),
            ready: Duration::ZERO,
        },
    }
}
