//! What a run reports: how each step ended and why, and the run as a whole.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Json;

use super::stats::Stats;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RunStatus {
    /// Every step succeeded.
    Succeeded,
    /// A step failed (after its retries).
    Failed,
    /// The run was cancelled before it ended.
    Cancelled,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// What kind of failure ended a step's attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FailureKind {
    /// Its plugin (or a plugin or asset it needs) could not be loaded.
    Plugin,
    /// Its `input` mapping did not resolve.
    Input,
    /// Its plugin's `init` rejected the config.
    Config,
    /// `run` returned an error.
    StepError,
    /// The guest trapped (a panic, a memory limit, a stack overflow …).
    Trap,
    /// It did not finish within its timeout.
    Timeout,
    /// It returned something that is not JSON.
    InvalidOutput,
    /// It returned more than the output limit.
    OutputTooLarge,
    /// A grant could not be given (a directory that cannot be opened).
    Sandbox,
    /// No instance could be had from its pool.
    Pool,
    /// A bug in the host, not in the plugin.
    Internal,
}

impl FailureKind {
    /// The name the summary uses, such as `step-error`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Plugin => "plugin",
            FailureKind::Input => "input",
            FailureKind::Config => "config",
            FailureKind::StepError => "step-error",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::InvalidOutput => "invalid-output",
            FailureKind::OutputTooLarge => "output-too-large",
            FailureKind::Sandbox => "sandbox",
            FailureKind::Pool => "pool",
            FailureKind::Internal => "internal",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The plugin's error code, for `config` and `step-error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What went wrong, naming the step and its plugin.
    pub message: String,
    /// Whether another attempt may succeed: a `step-error` that says so, a
    /// `timeout`, or a `pool` wait that timed out. Only these are retried.
    pub retryable: bool,
}

impl StepFailure {
    /// A failure of `step` (running `plugin`), not retryable: the message
    /// names both, then says `what`.
    pub fn new(step: &str, plugin: &impl fmt::Display, kind: FailureKind, what: &str) -> Self {
        StepFailure {
            kind,
            code: None,
            message: format!("step `{step}` (plugin {plugin}): {what}"),
            retryable: false,
        }
    }

    /// The same failure with the plugin's error code.
    pub fn with_code(self, code: String) -> Self {
        StepFailure { code: Some(code), ..self }
    }

    /// The same failure, marked worth another attempt (or not).
    pub fn retryable(self, retryable: bool) -> Self {
        StepFailure { retryable, ..self }
    }
}

/// What a step call printed and logged, line by line, under a byte budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepLog {
    /// The lines, each marked `stdout:`, `stderr:` or with its `host.log` level.
    pub lines: Vec<String>,
    /// Bytes over the budget, dropped (line breaks included).
    pub dropped: u64,
    /// Lines dropped whole.
    #[serde(default)]
    pub dropped_lines: u64,
}

/// What happened to one step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Of that time, the load phase, in ms: its plugin loaded (from memory,
    /// the disk cache, or compiled), and its first instance made ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<f64>,
    /// The rest: the step's own run (its attempts, and any backoff between
    /// them), in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_ms: Option<f64>,
    /// Its output, if it succeeded: the JSON it returned, as it returned it
    /// (or, where the run kept no more than a digest of a large one,
    /// `{"sha256", "bytes"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub output: Option<Json>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepFailure>,
    /// What its last attempt printed and logged, line by line, each marked
    /// `stdout:`, `stderr:` or with its `host.log` level.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
    /// Log bytes over the limit, dropped.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub log_dropped_bytes: u64,
    /// Log lines over the limit, dropped whole.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub log_dropped_lines: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StepReport {
    /// A step that has not started (yet).
    pub fn pending(id: &str, plugin: &impl fmt::Display) -> StepReport {
        StepReport {
            id: id.to_owned(),
            plugin: plugin.to_string(),
            status: StepStatus::Skipped,
            attempts: 0,
            start_ms: None,
            end_ms: None,
            load_ms: None,
            run_ms: None,
            output: None,
            error: None,
            log: Vec::new(),
            log_dropped_bytes: 0,
            log_dropped_lines: 0,
        }
    }

    /// How long it ran, first attempt to last, in ms.
    pub fn duration_ms(&self) -> Option<f64> {
        Some(self.end_ms? - self.start_ms?)
    }
}

/// The plan's figures, as the run's summary reports them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    #[serde(default)]
    pub store: Stats,
}

impl RunSummary {
    /// The report of the step `id`.
    pub fn step(&self, id: &str) -> Option<&StepReport> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The output of the step `id`, if it succeeded, parsed.
    pub fn output(&self, id: &str) -> Option<Value> {
        Some(self.output_json(id)?.value())
    }

    /// The output of the step `id`, if it succeeded, as its JSON text.
    pub fn output_json(&self, id: &str) -> Option<&Json> {
        self.step(id)?.output.as_ref()
    }

    /// Keeps only the outputs `keep` selects, each up to `max_bytes` of
    /// JSON (a larger one becomes its digest): what a caller embeds in what
    /// it prints or sends. (A summary does not carry the graph: `flow` is
    /// the run's flow, whose steps it reports in order.)
    pub fn select_outputs(&mut self, flow: &super::Flow, keep: Keep, max_bytes: u64) {
        let needed = flow.needed();
        for (i, step) in self.steps.iter_mut().enumerate() {
            let kept = match keep {
                Keep::All => true,
                Keep::Leaves => !needed.get(i).copied().unwrap_or(false),
                Keep::None => false,
            };
            if !kept {
                step.output = None;
            } else if let Some(output) = &step.output
                && output.len() as u64 > max_bytes
            {
                step.output = Some(output.digest());
            }
        }
    }
}

/// Which step outputs a summary embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// Every step's.
    All,
    /// Those of the steps nothing depends on: the flow's results.
    #[default]
    Leaves,
    /// None.
    None,
}

impl std::str::FromStr for Keep {
    type Err = String;

    fn from_str(text: &str) -> Result<Keep, String> {
        match text {
            "all" => Ok(Keep::All),
            "leaves" => Ok(Keep::Leaves),
            "none" => Ok(Keep::None),
            other => Err(format!("{other:?}: expected leaves, all or none")),
        }
    }
}
