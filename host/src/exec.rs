//! The scheduler: runs a flow's steps as soon as their dependencies are
//! done, each in its own instance, concurrently on tokio (a waiting step
//! holds no thread), and reports what happened.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use wasmtime_wasi::WasiCtxBuilder;

use crate::assets::{AssetCache, Assets};
use crate::catalog::{Catalog, PluginError};
use crate::events::Event;
use crate::flow::{Flow, Step};
use crate::input::Source;
use crate::instance::{Caller, PluginState, describe_failure};
use crate::plan::Plan;
use crate::store::{Plugin, Stats};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Every step succeeded.
    Succeeded,
    /// A step failed; the others were cancelled or skipped.
    Failed,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// It returned an output.
    Succeeded,
    /// It failed: see its error.
    Failed,
    /// It was running when another step's failure stopped the run.
    Cancelled,
    /// It never started: a dependency failed or the run stopped first.
    Skipped,
}

/// Why a step failed.
#[derive(Debug, Clone, Serialize)]
pub struct StepFailure {
    /// What kind of failure: `plugin` (could not be loaded), `input` (its
    /// input mapping did not resolve), `config` (`init` rejected the config),
    /// `step-error` (`run` returned an error), `trap`, `timeout`, or
    /// `invalid-output` (`run` returned something that is not JSON).
    pub kind: &'static str,
    /// The plugin's error code, for `config` and `step-error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What went wrong, naming the step and its plugin.
    pub message: String,
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
    /// When it started, in ms since the run began.
    pub start_ms: Option<f64>,
    /// When it ended, in ms since the run began.
    pub end_ms: Option<f64>,
    /// Its output, if it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<StepFailure>,
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

/// What every step task of one run shares.
struct RunContext {
    run_id: Arc<str>,
    flow: Arc<Flow>,
    catalog: Arc<Catalog>,
    assets: Arc<Assets>,
    events: broadcast::Sender<Event>,
    started: Instant,
}

impl RunContext {
    fn ms_since_start(&self, at: Instant) -> f64 {
        at.duration_since(self.started).as_secs_f64() * 1e3
    }
}

/// What a step task returns: its index, when it ran, and how it went.
struct Finished {
    index: usize,
    start: Instant,
    end: Instant,
    result: Result<Value, StepFailure>,
}

pub(crate) async fn run(
    catalog: Arc<Catalog>,
    asset_cache: Arc<AssetCache>,
    events: broadcast::Sender<Event>,
    flow: Arc<Flow>,
    input: Value,
) -> RunSummary {
    let ctx = Arc::new(RunContext {
        run_id: Arc::from(uuid::Uuid::new_v4().to_string()),
        assets: Arc::new(Assets::new(catalog.clone(), asset_cache, flow.loaders.clone())),
        catalog,
        flow,
        events,
        started: Instant::now(),
    });
    let flow = &ctx.flow;
    let _ = ctx.events.send(Event::RunStarted {
        run_id: ctx.run_id.clone(),
        flow: Arc::from(flow.name.as_str()),
        steps: flow.steps.len(),
    });
    prefetch_plugins(&ctx);

    let plan = Plan::new(flow);
    let mut reports: Vec<StepReport> = flow
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
        })
        .collect();
    let mut unmet: Vec<usize> = flow.steps.iter().map(|s| s.deps.len()).collect();
    let mut running = JoinSet::new();
    let mut tasks = HashMap::new();
    let mut failed = false;

    let mut ready: Vec<usize> = plan.order.iter().copied().filter(|&i| unmet[i] == 0).collect();
    loop {
        // Start everything that is ready, in plan order.
        for index in ready.drain(..) {
            let output_of = |i: usize| reports[i].output.as_ref();
            match resolve_input(&ctx.flow, index, &input, &output_of) {
                Ok(step_input) => {
                    reports[index].attempts += 1;
                    let task = running.spawn(execute(ctx.clone(), index, step_input));
                    tasks.insert(task.id(), index);
                }
                Err(failure) => {
                    let now = Instant::now();
                    finish(
                        &ctx,
                        &mut reports[index],
                        Finished { index, start: now, end: now, result: Err(failure) },
                    );
                    failed = true;
                }
            }
        }
        if failed {
            // Fail fast: stop whatever is still running.
            running.abort_all();
        }
        let Some(joined) = running.join_next_with_id().await else {
            break;
        };
        let done = match joined {
            Ok((_, done)) => done,
            // Aborted by fail-fast: marked cancelled below.
            Err(e) if e.is_cancelled() => continue,
            // A bug in the host, not in the plugin: fail the step, keep going.
            Err(e) => {
                let Some(&index) = tasks.get(&e.id()) else { continue };
                let now = Instant::now();
                let what = format!("the host failed while running it: {e}");
                let result = Err(failure(&ctx.flow.steps[index], "internal", None, what));
                Finished { index, start: now, end: now, result }
            }
        };
        let index = done.index;
        let succeeded = done.result.is_ok();
        finish(&ctx, &mut reports[index], done);
        if succeeded && !failed {
            for &next in &plan.dependents[index] {
                unmet[next] -= 1;
                if unmet[next] == 0 {
                    ready.push(next);
                }
            }
        } else if !succeeded {
            failed = true;
        }
    }

    for report in reports.iter_mut().filter(|r| r.attempts > 0 && r.end_ms.is_none()) {
        report.status = StepStatus::Cancelled;
    }
    for report in &reports {
        if matches!(report.status, StepStatus::Cancelled | StepStatus::Skipped) {
            let _ = ctx.events.send(Event::StepFinished {
                run_id: ctx.run_id.clone(),
                step: Arc::from(report.id.as_str()),
                status: report.status,
            });
        }
    }
    let status = if failed { RunStatus::Failed } else { RunStatus::Succeeded };
    let wall_ms = ctx.ms_since_start(Instant::now());
    let _ = ctx.events.send(Event::RunFinished { run_id: ctx.run_id.clone(), status, wall_ms });
    RunSummary {
        run_id: ctx.run_id.to_string(),
        flow: ctx.flow.name.clone(),
        status,
        wall_ms,
        steps: reports,
        store: Stats::default(),
    }
}

/// Records a finished attempt in its report (which keeps the output for the
/// dependents) and announces it.
fn finish(ctx: &RunContext, report: &mut StepReport, done: Finished) {
    report.start_ms = Some(ctx.ms_since_start(done.start));
    report.end_ms = Some(ctx.ms_since_start(done.end));
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
    let _ = ctx.events.send(Event::StepFinished {
        run_id: ctx.run_id.clone(),
        step: Arc::from(report.id.as_str()),
        status: report.status,
    });
}

/// Starts compiling every plugin the flow uses, so that compiles overlap
/// each other and the first steps instead of each waiting for its turn.
fn prefetch_plugins(ctx: &Arc<RunContext>) {
    let mut names: Vec<&str> = ctx.flow.steps.iter().map(|s| s.plugin.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.len() < 2 {
        return;
    }
    for name in names {
        let (catalog, name) = (ctx.catalog.clone(), name.to_owned());
        // Errors surface again, with the step named, when the step loads it.
        tokio::spawn(async move { catalog.preload(&name).await.map(drop) });
    }
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
    }
}

/// One attempt at a step: load its plugin, then run it under the step's timeout.
async fn execute(ctx: Arc<RunContext>, index: usize, input: Value) -> Finished {
    let start = Instant::now();
    let step = &ctx.flow.steps[index];
    let _ = ctx
        .events
        .send(Event::StepStarted { run_id: ctx.run_id.clone(), step: Arc::from(step.id.as_str()) });
    let result = match load_step_plugin(&ctx, step).await {
        // The timeout bounds the plugin's own work, not compiling it.
        Ok(plugin) => match step.timeout {
            Some(limit) => tokio::time::timeout(limit, attempt(&ctx, step, &plugin, &input))
                .await
                .unwrap_or_else(|_| Err(timed_out(step, limit))),
            None => attempt(&ctx, step, &plugin, &input).await,
        },
        Err(failure) => Err(failure),
    };
    Finished { index, start, end: Instant::now(), result }
}

async fn load_step_plugin(ctx: &RunContext, step: &Step) -> Result<Arc<Plugin>, StepFailure> {
    let plugin_failed = |e: PluginError| failure(step, "plugin", None, e.to_string());
    let name = &step.plugin.name;
    let plugin = ctx.catalog.load(name).await.map_err(plugin_failed)?;
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
    failure(
        step,
        "timeout",
        None,
        format!("did not finish within its timeout of {} ms", limit.as_millis()),
    )
}

/// Instantiate, `init`, `run`: one attempt on a loaded step plugin.
async fn attempt(
    ctx: &RunContext,
    step: &Step,
    plugin: &Plugin,
    input: &Value,
) -> Result<Value, StepFailure> {
    let pre =
        plugin.step(&step.plugin.name).map_err(|e| failure(step, "plugin", None, e.to_string()))?;

    let caller =
        Caller { name: Arc::from(step.id.as_str()), plugin: Arc::from(step.plugin.name.as_str()) };
    let mut store = PluginState::store(
        ctx.catalog.engine(),
        caller,
        Some(ctx.assets.clone()),
        &mut WasiCtxBuilder::new(),
    );
    let trapped = |phase: &str, e: wasmtime::Error, store: &wasmtime::Store<PluginState>| {
        failure(step, "trap", None, format!("trapped in {phase}: {}", describe_failure(&e, store)))
    };

    let instance = match pre.instantiate_async(&mut store).await {
        Ok(instance) => instance,
        Err(e) => return Err(trapped("instantiation", e, &store)),
    };
    let config = serde_json::to_string(&step.config).unwrap_or_else(|_| "{}".to_owned());
    match instance.call_init(&mut store, &config).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(failure(
                step,
                "config",
                Some(e.code),
                format!("rejected its config: {}", e.message),
            ));
        }
        Err(e) => return Err(trapped("init", e, &store)),
    }
    let input = input.to_string();
    let output = match instance.call_run(&mut store, &input).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            let what = format!("failed: {}: {}", e.code, e.message);
            return Err(failure(step, "step-error", Some(e.code), what));
        }
        Err(e) => return Err(trapped("run", e, &store)),
    };
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
        let pos = |i: usize| plan.order.iter().position(|&x| x == i).unwrap();
        assert!(pos(0) < pos(1) && pos(1) < pos(2) && pos(1) < pos(3));
        assert_eq!(plan.dependents[0], vec![1, 2]);
        assert_eq!(plan.dependents[1], vec![2, 3]);
    }
}
