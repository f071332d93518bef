//! The optimizer: what a flow's structure and its run history say could be
//! faster ([`recommend`]), and a rewrite of the flow file that applies the
//! safe part of it ([`optimize`]), level by level. It works from the model
//! and the figures a host reports only: it needs no engine and runs nothing.
//!
//! # Recommendations
//!
//! [`recommend`] reports, each with the figures it is based on:
//!
//! - **redundant-dependency**: a step needs another one that one of its
//!   other needs already waits for.
//! - **independent-steps**: a step needs another one but its `input` never
//!   reads that step's output, so the edge only orders them.
//! - **undersized-pool**: a step plugin's instance pool made calls wait (a
//!   p99 acquisition over 1 ms after enough calls, waiters, or failures).
//! - **oversized-pool**: a pool keeps more instances ready than the flow
//!   ever uses at once, and most were never handed out.
//! - **disk-cache-off**: a plugin of the flow was compiled with Cranelift and
//!   no disk cache is in use, or it was compiled more than once.
//! - **hot-not-preloaded**: a plugin used at least the preload threshold's
//!   number of times is not preloaded.
//! - **reuse-instances**: a hot plugin's steps get a fresh instance per call.
//! - **critical-path-dominated**: one step takes half or more of the
//!   critical path, as the runs really took it.
//! - **max-parallel-bound**: runs limited below the flow's widest group took
//!   much longer than their critical path.
//! - **transient-failure-without-retry**: a step failed with a retryable
//!   error (a timeout, a retryable step error, a pool wait) and is not retried.
//!
//! # Levels
//!
//! [`optimize`] applies the recommendations whose
//! [`apply_level`](Recommendation::apply_level) is at or below the level it
//! is given; the others are for a person (or an operator's setting) to act on.
//!
//! - **conservative** never changes what a flow computes, nor which steps run
//!   in what dependency order. It removes a redundant `needs` entry only from
//!   a step with an explicit `input` that does not refer to that dependency
//!   (a step without `input` gets an object keyed by its needs, so removing
//!   one would change its input; the dependency it keeps still orders the
//!   two). It raises `[flow] max_parallel` to the plan's widest parallel
//!   group when runs were bounded by it. It raises `pool.min` of the steps of
//!   hot plugins (used at least the preload threshold's number of times)
//!   whose pools were undersized. It never touches `retry`, `strategy`,
//!   `reuse` or the steps' order.
//! - **balanced** does what conservative does, and adds
//!   `retry = { max_attempts = 3, backoff_ms = 100, max_backoff_ms = 2000 }`
//!   (and `strategy = "retry-failed"` where the step sets another strategy)
//!   to steps that failed transiently: it changes what a failing run does,
//!   never what a succeeding one computes.
//! - **aggressive** does what balanced does, and removes the edges of
//!   independent steps (which changes the order, and matters if the steps
//!   have side effects, or if the dependent must be skipped when the other
//!   fails), and sets `pool.reuse = 100` on hot plugins' steps (an instance
//!   then keeps state from one call to the next: it changes isolation). It is
//!   the level that may change a flow's meaning.
//!
//! Preloading, the disk cache and the size of an oversized pool are host or
//! plugin settings, not flow changes: they are recommendations only, as are
//! a step that dominates the critical path and a bound that comes from the
//! run options rather than the flow.
//!
//! A TOML flow is edited with `toml_edit`, so its comments and layout stay
//! as they are; a JSON flow is printed again (pretty, keys in alphabetical
//! order). Either way the result is parsed and validated again before it is
//! returned, and [`apply`] writes it next to a backup of the old file.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::input::Source;
use super::{
    FailureKind, Flow, FlowError, Format, Plan, PoolStats, RunSummary, Step, StepReport,
    StepStatus, Strategy,
};

/// A warm pool hands out an instance in microseconds (the design's target is
/// a p99 under 50 µs); a p99 over 1 ms means calls waited for an instance to
/// be made and initialised: the pool ran out of ready ones.
const UNDERSIZED_P99_US: f64 = 1_000.0;

/// Below this many acquisitions a p99 is only the slowest sample or two, and
/// the first acquisition from every cold pool waits for a creation: too few
/// to call a pool undersized on latency alone. Waiters and failures count
/// from the first.
const UNDERSIZED_MIN_ACQUISITIONS: u64 = 20;

/// A pool is oversized only if at least this many instances sit idle: one
/// spare is what `min = 1` keeps anyway.
const OVERSIZED_MIN_IDLE: usize = 2;

/// ... and if it handed out at most this share of the instances it made:
/// with one instance per call, a busy pool hands out nearly all it makes,
/// while one that mostly makes spares nobody takes stays far below.
const OVERSIZED_USE_RATIO: f64 = 0.5;

/// A step that takes half the critical path or more is what the run waits
/// for: no schedule can hide it.
const CRITICAL_SHARE: f64 = 0.5;

/// ... provided halving it shortens the critical path by at least this
/// share: two equally long parallel steps each take most of the path, but
/// speeding up one of them alone gains nothing.
const CRITICAL_MIN_SAVING_SHARE: f64 = 0.1;

/// A run whose critical path (as the steps took it) is under 80% of its wall
/// time spent the rest waiting for a slot; the scheduler itself gets within
/// a few percent of the critical path when nothing bounds it.
const BOUND_EFFICIENCY: f64 = 0.8;

/// A step "often" fails transiently when it does so in at least one run in
/// twenty of those it ran in: rarer failures are not worth a flow change, and
/// a retry costs nothing on the runs that succeed.
const TRANSIENT_SHARE: f64 = 0.05;

/// The retry policy balanced adds: three attempts cover a passing failure
/// (a busy service, a slow start) without tripling a run that is really
/// broken; 100 ms doubling up to 2 s keeps the extra wait under 2.5 s.
const RETRY_ATTEMPTS: u32 = 3;
const RETRY_BACKOFF_MS: u64 = 100;
const RETRY_MAX_BACKOFF_MS: u64 = 2_000;

/// The reuse aggressive sets: high enough that instantiation and `init` no
/// longer count for a hot plugin, low enough that an instance whose memory
/// grows or leaks is still replaced now and then.
const REUSE: u32 = 100;

/// The host's own default preload threshold (`CacheConfig`), used when a
/// [`History`] does not say.
const DEFAULT_PRELOAD_THRESHOLD: u64 = 3;

/// How far the optimizer may go in rewriting a flow: see the module docs for
/// exactly what each level changes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Level {
    /// Changes that never alter what a flow computes or its dependency order.
    Conservative,
    /// Conservative, plus retries for steps that failed transiently (the default).
    #[default]
    Balanced,
    /// Balanced, plus changes to ordering and isolation that may alter a
    /// flow's meaning if its steps have side effects or keep state.
    Aggressive,
}

impl Level {
    /// The level's name, as the CLI and the flow docs write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Conservative => "conservative",
            Level::Balanced => "balanced",
            Level::Aggressive => "aggressive",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A level name that is not one of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown optimization level {given:?}: use conservative, balanced or aggressive")]
pub struct ParseLevelError {
    /// The name as given.
    pub given: String,
}

impl FromStr for Level {
    type Err = ParseLevelError;

    fn from_str(s: &str) -> Result<Level, ParseLevelError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "conservative" => Ok(Level::Conservative),
            "balanced" => Ok(Level::Balanced),
            "aggressive" => Ok(Level::Aggressive),
            _ => Err(ParseLevelError { given: s.to_owned() }),
        }
    }
}

/// What the optimizer knows besides the flow: its past runs and the host's
/// figures. The default is empty: the optimizer then goes by the flow alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct History {
    /// Past runs of this flow, oldest first.
    pub runs: Vec<RunSummary>,
    /// The instance pools' figures and the settings they ran with.
    pub pools: Vec<PoolFigures>,
    /// The plugins' use and compile counts.
    pub plugins: Vec<PluginFigures>,
    /// Whether the host keeps compiled components in a disk cache directory.
    pub disk_cache: bool,
    /// How many uses make a plugin hot: the host preloads it then
    /// (`CacheConfig::preload_threshold`).
    pub preload_threshold: u64,
}

impl Default for History {
    fn default() -> Self {
        History {
            runs: Vec::new(),
            pools: Vec::new(),
            plugins: Vec::new(),
            disk_cache: false,
            preload_threshold: DEFAULT_PRELOAD_THRESHOLD,
        }
    }
}

/// One instance pool's figures, with the settings in force while they were
/// gathered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolFigures {
    /// The plugin whose instances it holds (`name` or `name@version`).
    pub plugin: String,
    /// Its figures.
    pub stats: PoolStats,
    /// Its `min` setting.
    pub min: usize,
    /// Its `max` setting.
    pub max: usize,
    /// Its `reuse` setting.
    pub reuse: u32,
}

/// One plugin's counters, as the host keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginFigures {
    /// The plugin's name.
    pub name: String,
    /// How often it was used, counted across processes.
    pub uses: u64,
    /// How often this host compiled it with Cranelift.
    pub compiles: u64,
    /// How often this host loaded it from the disk cache.
    pub disk_hits: u64,
    /// Whether it is preloaded when a host starts.
    pub preloaded: bool,
}

/// What a recommendation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RecommendationKind {
    /// A step needs a step that another of its needs already waits for.
    RedundantDependency,
    /// A step declared after another one never reads that one's output.
    IndependentSteps,
    /// A pool made calls wait for instances.
    UndersizedPool,
    /// A pool keeps instances ready that nobody uses.
    OversizedPool,
    /// Plugins are compiled where a disk cache would load them.
    DiskCacheOff,
    /// A plugin used often is not preloaded.
    HotNotPreloaded,
    /// A hot plugin's steps get a fresh instance for every call.
    ReuseInstances,
    /// One step takes most of the critical path.
    CriticalPathDominated,
    /// `max_parallel` kept runs from going as fast as their steps allow.
    MaxParallelBound,
    /// A step fails transiently and is not retried.
    TransientFailureWithoutRetry,
}

impl RecommendationKind {
    /// The kind's name, as JSON writes it (`redundant-dependency`).
    pub fn as_str(self) -> &'static str {
        match self {
            RecommendationKind::RedundantDependency => "redundant-dependency",
            RecommendationKind::IndependentSteps => "independent-steps",
            RecommendationKind::UndersizedPool => "undersized-pool",
            RecommendationKind::OversizedPool => "oversized-pool",
            RecommendationKind::DiskCacheOff => "disk-cache-off",
            RecommendationKind::HotNotPreloaded => "hot-not-preloaded",
            RecommendationKind::ReuseInstances => "reuse-instances",
            RecommendationKind::CriticalPathDominated => "critical-path-dominated",
            RecommendationKind::MaxParallelBound => "max-parallel-bound",
            RecommendationKind::TransientFailureWithoutRetry => "transient-failure-without-retry",
        }
    }
}

impl fmt::Display for RecommendationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that could make a flow faster or sturdier, and why the
/// optimizer thinks so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Recommendation {
    /// What it is about.
    pub kind: RecommendationKind,
    /// What to do and why, in a sentence that names the step or plugin.
    pub message: String,
    /// The steps concerned; for a dependency, the step, then the step it needs.
    pub steps: Vec<String>,
    /// The plugin concerned, if one is.
    pub plugin: Option<String>,
    /// The figures it is based on (`p99_ms`, `runs`, `failures`, `share` …).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub evidence: Map<String, Value>,
    /// About how many ms a run would save, where the figures tell.
    pub estimated_saving_ms: Option<f64>,
    /// The lowest level at which [`optimize`] acts on it; `None` if it never
    /// does (a host setting, or a change that would alter what the flow computes).
    pub apply_level: Option<Level>,
}

/// One change [`optimize`] made to a flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Change {
    /// The recommendation it applies.
    pub kind: RecommendationKind,
    /// The step it changed (`None` for the `[flow]` table).
    pub step: Option<String>,
    /// What changed, such as "removed `a` from the `needs` of `d`".
    pub what: String,
    /// Why: the recommendation's message.
    pub reason: String,
    /// The figures behind it.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub evidence: Map<String, Value>,
}

/// A flow as [`optimize`] rewrote it.
#[derive(Debug, Clone, Serialize)]
pub struct Optimized {
    /// The level it was optimized at.
    pub level: Level,
    /// The rewritten flow, parsed and validated again.
    #[serde(skip)]
    pub flow: Flow,
    /// Its new file text (the old text, byte for byte, if nothing changed).
    pub text: String,
    /// What changed, and why.
    pub changes: Vec<Change>,
}

impl Optimized {
    /// A unified diff from `original` (the flow that was optimized) to the
    /// new text, with headers naming the flow's file; empty if nothing changed.
    pub fn diff(&self, original: &Flow) -> String {
        let new_name = format!("{} (optimized: {})", original.origin, self.level);
        similar::TextDiff::from_lines(&*original.text, self.text.as_str())
            .unified_diff()
            .context_radius(3)
            .header(&original.origin, &new_name)
            .to_string()
    }

    /// Whether the optimizer changed nothing.
    pub fn is_unchanged(&self) -> bool {
        self.changes.is_empty()
    }
}

/// Why a flow could not be optimized. Each is a bug in the optimizer (the
/// flow was valid, and every edit is checked), reported rather than panicked on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptimizeError {
    /// The flow's text could not be read as TOML or JSON for editing.
    #[error("{origin}: cannot edit the flow's text: {reason}")]
    Text {
        /// The flow's file.
        origin: String,
        /// What the parser said.
        reason: String,
    },
    /// A change could not be made to the text: it lacks what the flow has.
    #[error("{origin}: cannot make the change \"{what}\": {reason}")]
    Edit {
        /// The flow's file.
        origin: String,
        /// The change.
        what: String,
        /// What was missing.
        reason: String,
    },
    /// The rewritten flow does not parse or validate.
    #[error(
        "{origin}: the optimized flow is not valid (a bug in the optimizer; nothing was written)"
    )]
    Reparse {
        /// The flow's file.
        origin: String,
        /// What is wrong with the rewritten text.
        #[source]
        source: FlowError,
    },
}

/// What the flow and its history say could be better, in a stable order:
/// by rule, then by the flow's order of steps (or plugin names).
pub fn recommend(flow: &Flow, plan: &Plan, history: &History) -> Vec<Recommendation> {
    findings(flow, plan, history).into_iter().map(|f| f.recommendation).collect()
}

/// Rewrites the flow's text with the recommendations [`optimize`] acts on
/// at `level` (see the module docs), and parses the result again.
pub fn optimize(flow: &Flow, level: Level, history: &History) -> Result<Optimized, OptimizeError> {
    let plan = Plan::new(flow);
    let chosen: Vec<Finding> = findings(flow, &plan, history)
        .into_iter()
        .filter(|f| f.recommendation.apply_level.is_some_and(|at| at <= level))
        .collect();
    if chosen.is_empty() {
        return Ok(Optimized {
            level,
            flow: flow.clone(),
            text: flow.text.to_string(),
            changes: Vec::new(),
        });
    }
    let edits: Vec<&Edit> = chosen.iter().flat_map(|f| &f.edits).collect();
    let text = match flow.format {
        Format::Toml => rewrite_toml(flow, &edits)?,
        Format::Json => rewrite_json(flow, &edits)?,
    };
    let rewritten = Flow::parse(&text, flow.format, &flow.origin, &flow.base)
        .map_err(|source| OptimizeError::Reparse { origin: flow.origin.clone(), source })?;
    let changes = chosen
        .iter()
        .flat_map(|f| {
            f.edits.iter().map(|edit| Change {
                kind: f.recommendation.kind,
                step: edit.step().map(str::to_owned),
                what: edit.what(),
                reason: f.recommendation.message.clone(),
                evidence: f.recommendation.evidence.clone(),
            })
        })
        .collect();
    Ok(Optimized { level, flow: rewritten, text, changes })
}

/// Writes `text` to `path` as [`write_atomically`] does, after copying the
/// current file (if there is one) to the same path with `.bak` appended.
pub fn apply(path: &Path, text: &str) -> io::Result<()> {
    let mut backup = path.as_os_str().to_owned();
    backup.push(".bak");
    let backup = PathBuf::from(backup);
    match fs::copy(path, &backup) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            let what = format!("cannot back up {} to {}: {e}", path.display(), backup.display());
            return Err(io::Error::new(e.kind(), what));
        }
    }
    write_atomically(path, text)
}

/// Writes `text` to `path` atomically — into a temporary file in the same
/// directory, then renamed over it, so that a reader sees the old file or
/// the new one, never half of one — keeping the old file's permissions.
pub fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    // Two writes in one process must not share a temporary file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let context = |e: io::Error, what: String| io::Error::new(e.kind(), format!("{what}: {e}"));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", path.display()))
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let permissions = match fs::metadata(path) {
        Ok(meta) => Some(meta.permissions()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(context(e, format!("cannot read {}", path.display()))),
    };
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}-{}.tmp", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let temp = dir.join(temp_name);
    let written = (|| -> io::Result<()> {
        let mut file = fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        if let Some(permissions) = permissions {
            fs::set_permissions(&temp, permissions)?;
        }
        fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        // The write already failed and that is the error to report; a
        // temporary file left behind is harmless.
        let _ = fs::remove_file(&temp);
        return Err(context(e, format!("cannot write {}", path.display())));
    }
    Ok(())
}

/// A recommendation and the edits that apply it (empty if none do).
struct Finding {
    recommendation: Recommendation,
    edits: Vec<Edit>,
}

/// One edit of a flow file.
enum Edit {
    /// Removes `need` (every time it appears) from the step's `needs`.
    RemoveNeed { step: String, need: String },
    /// Sets `[flow] max_parallel`.
    MaxParallel(usize),
    /// Sets `pool.FIELD` of the step.
    Pool { step: String, field: &'static str, value: u64 },
    /// Makes the step retry: adds the retry policy (unless it has a usable
    /// one) and sets its own strategy, if it has one, to `retry-failed`.
    Retry { step: String },
}

impl Edit {
    fn step(&self) -> Option<&str> {
        match self {
            Edit::RemoveNeed { step, .. } | Edit::Pool { step, .. } | Edit::Retry { step } => {
                Some(step)
            }
            Edit::MaxParallel(_) => None,
        }
    }

    fn what(&self) -> String {
        match self {
            Edit::RemoveNeed { step, need } => {
                format!("removed `{need}` from the `needs` of step `{step}`")
            }
            Edit::MaxParallel(n) => format!("set `max_parallel = {n}` in [flow]"),
            Edit::Pool { step, field, value } => {
                format!("set `pool.{field} = {value}` on step `{step}`")
            }
            Edit::Retry { step } => format!(
                "made step `{step}` retry: `retry = {{ max_attempts = {RETRY_ATTEMPTS}, \
                 backoff_ms = {RETRY_BACKOFF_MS}, max_backoff_ms = {RETRY_MAX_BACKOFF_MS} }}`"
            ),
        }
    }
}

/// What every rule looks at, computed once.
struct Context<'a> {
    flow: &'a Flow,
    plan: &'a Plan,
    history: &'a History,
    /// Step indices, each after the steps it needs.
    order: Vec<usize>,
    /// For each run, each step's duration in ms (`None`: it did not run).
    durations: Vec<Vec<Option<f64>>>,
}

impl<'a> Context<'a> {
    fn new(flow: &'a Flow, plan: &'a Plan, history: &'a History) -> Context<'a> {
        let order_of = |plan: &Plan| -> Vec<usize> {
            plan.order.iter().filter_map(|id| flow.step_index(id)).collect()
        };
        let mut order = order_of(plan);
        if order.len() != flow.steps.len() {
            // The plan is of another version of the flow: plan this one.
            order = order_of(&Plan::new(flow));
        }
        let durations = history
            .runs
            .iter()
            .map(|run| {
                flow.steps
                    .iter()
                    .map(|s| run.step(&s.id).and_then(StepReport::duration_ms))
                    .collect()
            })
            .collect();
        Context { flow, plan, history, order, durations }
    }

    /// The critical path as the steps took it: the longest chain of
    /// dependent durations, in ms.
    fn critical_ms(&self, durations: &[Option<f64>]) -> f64 {
        let mut longest = vec![0.0f64; self.flow.steps.len()];
        for &i in &self.order {
            let before = self.flow.steps[i].deps.iter().map(|&d| longest[d]).fold(0.0, f64::max);
            longest[i] = before + durations.get(i).copied().flatten().unwrap_or(0.0);
        }
        longest.into_iter().fold(0.0, f64::max)
    }

    fn steps_of(&self, plugin: &str) -> Vec<&'a Step> {
        self.flow.steps.iter().filter(|s| s.plugin.name == plugin).collect()
    }

    /// The plugins the flow's steps and loaders run, by name.
    fn plugins(&self) -> BTreeSet<&'a str> {
        let steps = self.flow.steps.iter().map(|s| s.plugin.name.as_str());
        steps.chain(self.flow.loaders.iter().map(|l| l.plugin.name.as_str())).collect()
    }

    fn figures(&self, plugin: &str) -> Option<&'a PluginFigures> {
        self.history.plugins.iter().find(|p| p.name == plugin)
    }

    fn hot_threshold(&self) -> u64 {
        self.history.preload_threshold.max(1)
    }

    fn is_hot(&self, plugin: &str) -> bool {
        self.figures(plugin).is_some_and(|p| p.uses >= self.hot_threshold())
    }

    /// The most steps of `plugin` the flow can run at once: the most in one
    /// parallel group, within `max_parallel`.
    fn width_of(&self, plugin: &str) -> usize {
        let per_group = self.plan.groups.iter().map(|group| {
            group
                .iter()
                .filter_map(|id| self.flow.step_index(id))
                .filter(|&i| self.flow.steps[i].plugin.name == plugin)
                .count()
        });
        per_group.max().unwrap_or(0).min(self.flow.max_parallel.unwrap_or(usize::MAX)).max(1)
    }

    /// The pools of the flow's step plugins, by plugin name.
    /// The mean time `steps` ran for (their `run_ms`, the load phase not
    /// counted) over the runs that report it.
    fn run_ms(&self, steps: &[&Step]) -> Option<f64> {
        let times: Vec<f64> = self
            .history
            .runs
            .iter()
            .flat_map(|run| steps.iter().filter_map(move |s| run.step(&s.id)?.run_ms))
            .collect();
        mean(&times)
    }

    fn pools(&self) -> BTreeMap<&'a str, Vec<&'a PoolFigures>> {
        let mut pools: BTreeMap<&str, Vec<&PoolFigures>> = BTreeMap::new();
        for figures in &self.history.pools {
            let step = self.flow.steps.iter().find(|s| {
                s.plugin.name == figures.plugin || s.plugin.to_string() == figures.plugin
            });
            if let Some(step) = step {
                pools.entry(step.plugin.name.as_str()).or_default().push(figures);
            }
        }
        pools
    }
}

fn findings(flow: &Flow, plan: &Plan, history: &History) -> Vec<Finding> {
    let ctx = Context::new(flow, plan, history);
    let mut out = Vec::new();
    redundant_dependencies(&ctx, &mut out);
    independent_steps(&ctx, &mut out);
    pools(&ctx, &mut out);
    disk_cache(&ctx, &mut out);
    hot_plugins(&ctx, &mut out);
    critical_path(&ctx, &mut out);
    max_parallel(&ctx, &mut out);
    transient_failures(&ctx, &mut out);
    out
}

/// Builds a finding: its apply level is `level` if it has edits, else none.
fn finding(recommendation: Recommendation, level: Level, edits: Vec<Edit>) -> Finding {
    let apply_level = (!edits.is_empty()).then_some(level);
    Finding { recommendation: Recommendation { apply_level, ..recommendation }, edits }
}

/// Whether the step's `input` reads `need`'s output: `None` if it has no
/// `input` (then its input is made of its needs' outputs).
fn reads_output_of(step: &Step, need: &str) -> Option<bool> {
    let template = step.input.as_ref()?;
    Some(template.refs().iter().any(|r| matches!(&r.source, Source::Step(id) if id == need)))
}

/// Rule 1: each redundant dependency the plan found.
fn redundant_dependencies(ctx: &Context<'_>, out: &mut Vec<Finding>) {
    for r in &ctx.plan.redundant {
        let Some(i) = ctx.flow.step_index(&r.step) else { continue };
        let step = &ctx.flow.steps[i];
        let (step_id, need, via) = (&r.step, &r.needs, &r.implied_by);
        let head =
            format!("step `{step_id}` needs `{need}`, which it already waits for through `{via}`");
        let (message, edits) = match reads_output_of(step, need) {
            Some(false) => (
                format!(
                    "{head}, and its `input` does not read `{need}`'s output: drop `{need}` \
                     from its `needs` (the order stays the same)"
                ),
                vec![Edit::RemoveNeed { step: step_id.clone(), need: need.clone() }],
            ),
            Some(true) => (
                format!(
                    "{head}; its `input` reads `{need}`'s output, so `{need}` must stay in its \
                     `needs`: nothing to change unless the input can read it through `{via}`"
                ),
                Vec::new(),
            ),
            None => (
                format!(
                    "{head}; without an `input` it gets an object keyed by its needs, so \
                     dropping `{need}` would change its input: give it an `input` that does not \
                     read `{need}` first, or keep it"
                ),
                Vec::new(),
            ),
        };
        let mut evidence = Map::new();
        evidence.insert("step".into(), json!(step_id));
        evidence.insert("needs".into(), json!(need));
        evidence.insert("implied_by".into(), json!(via));
        let recommendation = Recommendation {
            kind: RecommendationKind::RedundantDependency,
            message,
            steps: vec![step_id.clone(), need.clone()],
            plugin: None,
            evidence,
            estimated_saving_ms: None,
            apply_level: None,
        };
        out.push(finding(recommendation, Level::Conservative, edits));
    }
}

/// Rule 2: a step with an `input` that never reads a step it needs. Edges
/// the plan calls redundant are rule 1's.
fn independent_steps(ctx: &Context<'_>, out: &mut Vec<Finding>) {
    let redundant: HashSet<(&str, &str)> =
        ctx.plan.redundant.iter().map(|r| (r.step.as_str(), r.needs.as_str())).collect();
    for step in &ctx.flow.steps {
        for &dep in &step.deps {
            let need = &ctx.flow.steps[dep].id;
            if reads_output_of(step, need) != Some(false)
                || redundant.contains(&(step.id.as_str(), need.as_str()))
            {
                continue;
            }
            // How much sooner the step could have started: the time between
            // its other needs' end (or the run's start) and this one's.
            let others: Vec<usize> = step.deps.iter().copied().filter(|&d| d != dep).collect();
            let waits: Vec<f64> = ctx
                .history
                .runs
                .iter()
                .filter_map(|run| {
                    let end = run.step(need)?.end_ms?;
                    let others_end = others
                        .iter()
                        .map(|&o| run.step(&ctx.flow.steps[o].id).and_then(|r| r.end_ms))
                        .try_fold(0.0f64, |at, end| end.map(|end| at.max(end)))?;
                    Some((end - others_end).max(0.0))
                })
                .collect();
            let saving = mean(&waits);
            let sooner = saving.map_or(String::new(), |ms| {
                format!(" (it would have started {} sooner on average)", format_ms(ms))
            });
            let message = format!(
                "step `{}` needs `{need}` but its `input` never reads `{need}`'s output: if it \
                 does not rely on `{need}`'s side effects, drop `{need}` from its `needs` so \
                 that the two can run at the same time{sooner}",
                step.id
            );
            let mut evidence = Map::new();
            evidence.insert("step".into(), json!(step.id));
            evidence.insert("needs".into(), json!(need));
            evidence.insert("runs".into(), json!(waits.len()));
            let recommendation = Recommendation {
                kind: RecommendationKind::IndependentSteps,
                message,
                steps: vec![step.id.clone(), need.clone()],
                plugin: None,
                evidence,
                estimated_saving_ms: saving.map(round3),
                apply_level: None,
            };
            let edit = Edit::RemoveNeed { step: step.id.clone(), need: need.clone() };
            out.push(finding(recommendation, Level::Aggressive, vec![edit]));
        }
    }
}

fn is_undersized(stats: &PoolStats) -> bool {
    stats.waiters > 0
        || stats.failures > 0
        || (stats.acquisitions >= UNDERSIZED_MIN_ACQUISITIONS
            && stats.acquire_p99_us > UNDERSIZED_P99_US)
}

/// Rules 3 and 4: pools too small or too large for the flow's steps.
fn pools(ctx: &Context<'_>, out: &mut Vec<Finding>) {
    for (plugin, figures) in ctx.pools() {
        let steps = ctx.steps_of(plugin);
        let step_ids: Vec<String> = steps.iter().map(|s| s.id.clone()).collect();
        let width = ctx.width_of(plugin);
        // The worst pool of the plugin speaks for it: failures, then
        // waiters, then latency.
        let worst = figures.iter().filter(|f| is_undersized(&f.stats)).max_by(|a, b| {
            (a.stats.failures, a.stats.waiters)
                .cmp(&(b.stats.failures, b.stats.waiters))
                .then(a.stats.acquire_p99_us.total_cmp(&b.stats.acquire_p99_us))
        });
        if let Some(pool) = worst {
            let stats = &pool.stats;
            let ceiling = pool.max.max(1);
            let suggested_min = (pool.min + 1).max(width).min(ceiling);
            // Waiting calls with every instance alive mean `max` is the limit.
            let starved = (stats.waiters > 0 || stats.failures > 0) && stats.total >= pool.max;
            let suggested_max = starved.then(|| pool.max.saturating_mul(2).max(2));
            let p99_ms = stats.acquire_p99_us / 1000.0;
            let mut message = format!(
                "the `{plugin}` instance pool made calls wait: p99 acquisition {} (a warm pool \
                 answers in microseconds) over {} acquisitions, {} waiting, {} failed \
                 creations or timeouts; raise `pool.min` from {} to {suggested_min}",
                format_ms(p99_ms),
                stats.acquisitions,
                stats.waiters,
                stats.failures,
                pool.min
            );
            if let Some(max) = suggested_max {
                message.push_str(&format!(" and `pool.max` from {} to {max}", pool.max));
            }
            let hot = ctx.is_hot(plugin);
            if !hot {
                message.push_str(&format!(
                    " (the optimizer does so once `{plugin}` is hot: used {} times or more)",
                    ctx.hot_threshold()
                ));
            }
            let mut evidence = Map::new();
            evidence.insert("p99_ms".into(), json!(round3(p99_ms)));
            evidence.insert("mean_ms".into(), json!(round3(stats.acquire_mean_us / 1000.0)));
            evidence.insert("acquisitions".into(), json!(stats.acquisitions));
            evidence.insert("waiters".into(), json!(stats.waiters));
            evidence.insert("failures".into(), json!(stats.failures));
            evidence.insert("min".into(), json!(pool.min));
            evidence.insert("max".into(), json!(pool.max));
            evidence.insert("suggested_min".into(), json!(suggested_min));
            if let Some(max) = suggested_max {
                evidence.insert("suggested_max".into(), json!(max));
            }
            let edits = if hot {
                steps
                    .iter()
                    .filter_map(|step| {
                        let target = suggested_min.min(step.pool.max.unwrap_or(ceiling));
                        (target > step.pool.min.unwrap_or(pool.min)).then(|| Edit::Pool {
                            step: step.id.clone(),
                            field: "min",
                            value: target as u64,
                        })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let recommendation = Recommendation {
                kind: RecommendationKind::UndersizedPool,
                message,
                steps: step_ids,
                plugin: Some(plugin.to_owned()),
                evidence,
                // Each of its steps waits about the mean acquisition time.
                estimated_saving_ms: Some(round3(
                    stats.acquire_mean_us / 1000.0 * steps.len() as f64,
                )),
                apply_level: None,
            };
            out.push(finding(recommendation, Level::Conservative, edits));
            continue;
        }

        let idle = figures
            .iter()
            .filter(|f| {
                f.min > 1
                    && width < f.min
                    && f.stats.available >= OVERSIZED_MIN_IDLE
                    && (f.stats.acquisitions as f64)
                        <= f.stats.creations as f64 * OVERSIZED_USE_RATIO
            })
            .max_by_key(|f| f.stats.available);
        if let Some(pool) = idle {
            let stats = &pool.stats;
            let message = format!(
                "the `{plugin}` instance pool keeps {} instances ready (`pool.min = {}`) but \
                 handed out only {} of the {} it made, and this flow runs at most {width} of \
                 its steps at once: lower `pool.min` to {width} to save the memory and the \
                 `init` of instances nobody uses",
                stats.available, pool.min, stats.acquisitions, stats.creations
            );
            let mut evidence = Map::new();
            evidence.insert("min".into(), json!(pool.min));
            evidence.insert("available".into(), json!(stats.available));
            evidence.insert("acquisitions".into(), json!(stats.acquisitions));
            evidence.insert("creations".into(), json!(stats.creations));
            evidence.insert("suggested_min".into(), json!(width));
            let recommendation = Recommendation {
                kind: RecommendationKind::OversizedPool,
                message,
                steps: step_ids,
                plugin: Some(plugin.to_owned()),
                evidence,
                estimated_saving_ms: None,
                apply_level: None,
            };
            out.push(finding(recommendation, Level::Conservative, Vec::new()));
        }
    }
}

/// Rule 5: plugins compiled where a disk cache would have loaded them.
fn disk_cache(ctx: &Context<'_>, out: &mut Vec<Finding>) {
    let disk_cache = ctx.history.disk_cache;
    let compiled: Vec<&PluginFigures> = ctx
        .plugins()
        .into_iter()
        .filter_map(|name| ctx.figures(name))
        .filter(|p| if disk_cache { p.compiles > 1 } else { p.compiles >= 1 })
        .collect();
    if compiled.is_empty() {
        return;
    }
    let compiles: u64 = compiled.iter().map(|p| p.compiles).sum();
    let disk_hits: u64 = compiled.iter().map(|p| p.disk_hits).sum();
    let names = compiled.iter().map(|p| format!("`{}`", p.name)).collect::<Vec<_>>().join(", ");
    let message = if disk_cache {
        format!(
            "{names} compiled {compiles} times although a disk cache is in use: its artifacts \
             are not being reused; check that the cache directory is writable and kept \
             between processes (or whether the plugin changed in between)"
        )
    } else {
        format!(
            "{names} compiled with Cranelift {compiles} times and the host has no disk cache: \
             give it a cache directory (`HostConfig::cache.dir`) so that later processes load \
             precompiled code in milliseconds instead of compiling again"
        )
    };
    let mut per_plugin = Map::new();
    for p in &compiled {
        per_plugin.insert(p.name.clone(), json!(p.compiles));
    }
    let mut evidence = Map::new();
    evidence.insert("disk_cache".into(), json!(disk_cache));
    evidence.insert("compiles".into(), json!(compiles));
    evidence.insert("disk_hits".into(), json!(disk_hits));
    evidence.insert("plugins".into(), Value::Object(per_plugin));
    let steps = ctx
        .flow
        .steps
        .iter()
        .filter(|s| compiled.iter().any(|p| p.name == s.plugin.name))
        .map(|s| s.id.clone())
        .collect();
    let plugin = match compiled.as_slice() {
        [one] => Some(one.name.clone()),
        _ => None,
    };
    let recommendation = Recommendation {
        kind: RecommendationKind::DiskCacheOff,
        message,
        steps,
        plugin,
        evidence,
        estimated_saving_ms: None,
        apply_level: None,
    };
    out.push(finding(recommendation, Level::Conservative, Vec::new()));
}

/// Instantiation below this (ms) is not worth trading isolation for.
const INSTANTIATION_WORTH_MS: f64 = 0.5;

/// Rule 6 and reuse: what a hot plugin should have.
fn hot_plugins(ctx: &Context<'_>, out: &mut Vec<Finding>) {
    let threshold = ctx.hot_threshold();
    let hot: Vec<&PluginFigures> = ctx
        .plugins()
        .into_iter()
        .filter_map(|name| ctx.figures(name))
        .filter(|p| p.uses >= threshold)
        .collect();
    for p in hot.iter().filter(|p| !p.preloaded) {
        let message = format!(
            "plugin `{}` was used {} times (the preload threshold is {threshold}) but is not \
             preloaded: keep `HostConfig::preload` on and the cache directory between \
             processes, so that a host loads it before the first run needs it",
            p.name, p.uses
        );
        let mut evidence = Map::new();
        evidence.insert("uses".into(), json!(p.uses));
        evidence.insert("preload_threshold".into(), json!(threshold));
        evidence.insert("compiles".into(), json!(p.compiles));
        evidence.insert("disk_hits".into(), json!(p.disk_hits));
        let recommendation = Recommendation {
            kind: RecommendationKind::HotNotPreloaded,
            message,
            steps: ctx.steps_of(&p.name).iter().map(|s| s.id.clone()).collect(),
            plugin: Some(p.name.clone()),
            evidence,
            estimated_saving_ms: None,
            apply_level: None,
        };
        out.push(finding(recommendation, Level::Conservative, Vec::new()));
    }
    let pools = ctx.pools();
    // Hot plugins, and plugins whose instances cost more to make than their
    // steps take to run (a Python or JavaScript step's runtime): both are
    // worth an instance that serves many calls.
    let mut candidates: Vec<(&str, Option<&PluginFigures>)> =
        hot.iter().map(|p| (p.name.as_str(), Some(*p))).collect();
    for name in pools.keys() {
        if !candidates.iter().any(|(n, _)| n == name) {
            candidates.push((name, ctx.figures(name)));
        }
    }
    for (name, figures) in candidates {
        let own = pools.get(name);
        let pool_reuse = own.and_then(|f| f.iter().map(|f| f.reuse).max());
        let fresh: Vec<&Step> = ctx
            .steps_of(name)
            .into_iter()
            .filter(|s| s.pool.reuse.or(pool_reuse).unwrap_or(1) <= 1)
            .collect();
        if fresh.is_empty() {
            continue;
        }
        let instantiate_ms = own.and_then(|f| {
            let made: Vec<f64> = f
                .iter()
                .filter(|f| f.stats.creations > 0)
                .map(|f| f.stats.create_mean_us / 1e3)
                .collect();
            mean(&made)
        });
        let run_ms = ctx.run_ms(&fresh);
        let dominates = match (instantiate_ms, run_ms) {
            (Some(make), Some(run)) => make >= run && make >= INSTANTIATION_WORTH_MS,
            _ => false,
        };
        let uses = figures.map_or(0, |f| f.uses);
        let hot = uses >= threshold;
        if !hot && !dominates {
            continue;
        }
        let why = match (dominates, instantiate_ms, run_ms) {
            (true, Some(make), Some(run)) => format!(
                "making one of its instances takes {make:.2} ms, more than its steps run ({run:.2} ms)"
            ),
            _ => format!("it is hot (used {uses} times)"),
        };
        let message = format!(
            "plugin `{name}`: {why}, and each call of its steps gets a fresh instance: \
             `pool.reuse = {REUSE}` would let one instance, and its `init`, serve {REUSE} \
             calls, but a call would then see the state earlier calls left behind"
        );
        let mut evidence = Map::new();
        evidence.insert("uses".into(), json!(uses));
        evidence.insert("preload_threshold".into(), json!(threshold));
        evidence.insert("reuse".into(), json!(1));
        evidence.insert("suggested_reuse".into(), json!(REUSE));
        if let Some(make) = instantiate_ms {
            evidence.insert("instantiate_ms".into(), json!(make));
        }
        if let Some(run) = run_ms {
            evidence.insert("run_ms".into(), json!(run));
        }
        let edits = fresh
            .iter()
            .map(|s| Edit::Pool { step: s.id.clone(), field: "reuse", value: u64::from(REUSE) })
            .collect();
        let saving = match (dominates, instantiate_ms) {
            (true, Some(make)) => Some(make * fresh.len() as f64),
            _ => None,
        };
        let recommendation = Recommendation {
            kind: RecommendationKind::ReuseInstances,
            message,
            steps: fresh.iter().map(|s| s.id.clone()).collect(),
            plugin: Some(name.to_owned()),
            evidence,
            estimated_saving_ms: saving,
            apply_level: None,
        };
        out.push(finding(recommendation, Level::Aggressive, edits));
    }
}

/// Rule 7: a step that takes most of the critical path, as the runs took it.
fn critical_path(ctx: &Context<'_>, out: &mut Vec<Finding>) {
    if ctx.flow.steps.len() < 2 {
        // A flow of one step is its own critical path: nothing to learn.
        return;
    }
    let runs: Vec<(&Vec<Option<f64>>, f64)> = ctx
        .durations
        .iter()
        .map(|d| (d, ctx.critical_ms(d)))
        .filter(|(_, critical)| *critical > 0.0)
        .collect();
    let Some(mean_critical) = mean(&runs.iter().map(|(_, c)| *c).collect::<Vec<_>>()) else {
        return;
    };
    for (i, step) in ctx.flow.steps.iter().enumerate() {
        let taken: Vec<f64> = runs.iter().filter_map(|(d, _)| d[i]).collect();
        let Some(mean_ms) = mean(&taken) else { continue };
        let share = mean_ms / mean_critical;
        if share < CRITICAL_SHARE {
            continue;
        }
        let savings: Vec<f64> = runs
            .iter()
            .map(|(d, critical)| {
                let mut halved = (*d).clone();
                halved[i] = halved[i].map(|ms| ms / 2.0);
                critical - ctx.critical_ms(&halved)
            })
            .collect();
        let saving = mean(&savings).unwrap_or(0.0);
        if saving < CRITICAL_MIN_SAVING_SHARE * mean_critical {
            continue;
        }
        let message = format!(
            "step `{}` takes {:.0}% of the critical path ({} of {} on average over {}): \
             no schedule finishes sooner; halving its time would save about {} a run \
             (make it faster, or split it into steps that can run at the same time)",
            step.id,
            share * 100.0,
            format_ms(mean_ms),
            format_ms(mean_critical),
            plural(runs.len(), "run"),
            format_ms(saving)
        );
        let mut evidence = Map::new();
        evidence.insert("share".into(), json!(round3(share)));
        evidence.insert("mean_ms".into(), json!(round3(mean_ms)));
        evidence.insert("critical_path_ms".into(), json!(round3(mean_critical)));
        evidence.insert("runs".into(), json!(runs.len()));
        let recommendation = Recommendation {
            kind: RecommendationKind::CriticalPathDominated,
            message,
            steps: vec![step.id.clone()],
            plugin: Some(step.plugin.name.clone()),
            evidence,
            estimated_saving_ms: Some(round3(saving)),
            apply_level: None,
        };
        out.push(finding(recommendation, Level::Conservative, Vec::new()));
    }
}

/// Rule 8: runs that `max_parallel` kept waiting. The summary's own
/// `efficiency` measures a run against what its limit allows (so a run
/// bounded by its limit scores well); here it is measured against the
/// critical path alone: what the run would approach without the limit.
fn max_parallel(ctx: &Context<'_>, out: &mut Vec<Finding>) {
    let widest = ctx.plan.groups.iter().map(Vec::len).max().unwrap_or(0);
    let bounded: Vec<(&RunSummary, f64)> = ctx
        .history
        .runs
        .iter()
        .zip(&ctx.durations)
        .filter(|(run, _)| run.max_parallel < widest && run.wall_ms > 0.0)
        .map(|(run, d)| (run, ctx.critical_ms(d)))
        .filter(|(run, critical)| critical / run.wall_ms < BOUND_EFFICIENCY)
        .collect();
    if bounded.is_empty() {
        return;
    }
    let efficiency =
        mean(&bounded.iter().map(|(run, c)| c / run.wall_ms).collect::<Vec<_>>()).unwrap_or(0.0);
    let wall = mean(&bounded.iter().map(|(run, _)| run.wall_ms).collect::<Vec<_>>()).unwrap_or(0.0);
    let critical = mean(&bounded.iter().map(|(_, c)| *c).collect::<Vec<_>>()).unwrap_or(0.0);
    let limit = bounded.iter().map(|(run, _)| run.max_parallel).max().unwrap_or(0);
    let saving = (wall - critical).max(0.0);
    let in_flow = ctx.flow.max_parallel.is_some_and(|m| m < widest);
    let what_to_do = if in_flow {
        "raise `max_parallel` in [flow]"
    } else {
        "the limit came from the host or the run options, not the flow: raise it there"
    };
    let message = format!(
        "{} of {} ran at most {} at once while the flow has {widest} that can \
         run together, and took {} where their critical path took {} ({:.0}%): {what_to_do} to \
         {widest}, which would save up to about {} a run",
        bounded.len(),
        plural(ctx.history.runs.len(), "run"),
        plural(limit, "step"),
        format_ms(wall),
        format_ms(critical),
        efficiency * 100.0,
        format_ms(saving)
    );
    let mut evidence = Map::new();
    evidence.insert("runs".into(), json!(bounded.len()));
    evidence.insert("max_parallel".into(), json!(limit));
    evidence.insert("widest_group".into(), json!(widest));
    evidence.insert("efficiency".into(), json!(round3(efficiency)));
    evidence.insert("wall_ms".into(), json!(round3(wall)));
    evidence.insert("critical_path_ms".into(), json!(round3(critical)));
    let edits = if in_flow { vec![Edit::MaxParallel(widest)] } else { Vec::new() };
    let recommendation = Recommendation {
        kind: RecommendationKind::MaxParallelBound,
        message,
        steps: Vec::new(),
        plugin: None,
        evidence,
        estimated_saving_ms: Some(round3(saving)),
        apply_level: None,
    };
    out.push(finding(recommendation, Level::Conservative, edits));
}

/// Whether a step report is a failure another attempt may fix.
fn failed_transiently(report: &StepReport) -> Option<FailureKind> {
    let error = report.error.as_ref()?;
    let transient =
        matches!(error.kind, FailureKind::Timeout | FailureKind::StepError | FailureKind::Pool);
    (report.status == StepStatus::Failed && error.retryable && transient).then_some(error.kind)
}

/// Rule 9: steps that fail transiently and are not retried.
fn transient_failures(ctx: &Context<'_>, out: &mut Vec<Finding>) {
    for step in &ctx.flow.steps {
        let retried = step.strategy == Strategy::RetryFailed && step.retry.max_attempts >= 2;
        if retried {
            continue;
        }
        let reports: Vec<&StepReport> = ctx
            .history
            .runs
            .iter()
            .filter_map(|run| run.step(&step.id))
            .filter(|r| r.attempts > 0)
            .collect();
        let kinds: Vec<FailureKind> =
            reports.iter().filter_map(|r| failed_transiently(r)).collect();
        if kinds.is_empty() {
            continue;
        }
        let share = kinds.len() as f64 / reports.len() as f64;
        if share < TRANSIENT_SHARE {
            continue;
        }
        let names: BTreeSet<&str> = kinds.iter().map(|k| k.as_str()).collect();
        let names: Vec<&str> = names.into_iter().collect();
        let message = format!(
            "step `{}` failed with a transient error ({}) in {} of the {} it ran in, and \
             is not retried: retry it (`retry = {{ max_attempts = {RETRY_ATTEMPTS}, \
             backoff_ms = {RETRY_BACKOFF_MS}, max_backoff_ms = {RETRY_MAX_BACKOFF_MS} }}`)",
            step.id,
            names.join(", "),
            kinds.len(),
            plural(reports.len(), "run")
        );
        let mut evidence = Map::new();
        evidence.insert("failures".into(), json!(kinds.len()));
        evidence.insert("runs".into(), json!(reports.len()));
        evidence.insert("share".into(), json!(round3(share)));
        evidence.insert("kinds".into(), json!(names));
        let recommendation = Recommendation {
            kind: RecommendationKind::TransientFailureWithoutRetry,
            message,
            steps: vec![step.id.clone()],
            plugin: Some(step.plugin.name.clone()),
            evidence,
            estimated_saving_ms: None,
            apply_level: None,
        };
        // A retried step fails fast once its retries are spent: for a step
        // whose failure the flow tolerates (continue-on-error) that would
        // cancel its siblings, so there it stays a recommendation.
        let edits = if step.strategy == Strategy::ContinueOnError {
            Vec::new()
        } else {
            vec![Edit::Retry { step: step.id.clone() }]
        };
        out.push(finding(recommendation, Level::Balanced, edits));
    }
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Rounds to the µs, so that evidence reads cleanly.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn format_ms(ms: f64) -> String {
    if ms >= 10.0 { format!("{ms:.0} ms") } else { format!("{ms:.1} ms") }
}

// ----- Rewriting TOML, keeping comments and layout -----

fn rewrite_toml(flow: &Flow, edits: &[&Edit]) -> Result<String, OptimizeError> {
    let mut doc: toml_edit::DocumentMut =
        flow.text.parse().map_err(|e: toml_edit::TomlError| OptimizeError::Text {
            origin: flow.origin.clone(),
            reason: e.to_string(),
        })?;
    for edit in edits {
        edit_toml(&mut doc, edit).map_err(|reason| OptimizeError::Edit {
            origin: flow.origin.clone(),
            what: edit.what(),
            reason,
        })?;
    }
    Ok(doc.to_string())
}

fn edit_toml(doc: &mut toml_edit::DocumentMut, edit: &Edit) -> Result<(), String> {
    use toml_edit::{InlineTable, Item, Value as Toml};
    let missing = |step: &str| format!("the file has no step `{step}`");
    match edit {
        Edit::RemoveNeed { step, need } => {
            let table = toml_step(doc, step).ok_or_else(|| missing(step))?;
            let needs = table
                .get_mut("needs")
                .and_then(Item::as_array_mut)
                .ok_or_else(|| format!("step `{step}` has no `needs` list"))?;
            if !remove_need(needs, need) {
                return Err(format!("`{need}` is not in the `needs` of step `{step}`"));
            }
        }
        Edit::MaxParallel(n) => {
            let header = doc
                .get_mut("flow")
                .and_then(Item::as_table_like_mut)
                .ok_or("the file has no [flow] table")?;
            set_toml(header, "max_parallel", toml_int(*n as u64));
        }
        Edit::Pool { step, field, value } => {
            let table = toml_step(doc, step).ok_or_else(|| missing(step))?;
            match table.get_mut("pool") {
                Some(Item::Value(Toml::InlineTable(pool))) => {
                    let added = !pool.contains_key(field);
                    set_toml(pool, field, toml_int(*value));
                    // A key added to an inline table is spaced like the
                    // others only once the table is formatted again.
                    if added {
                        pool.fmt();
                    }
                }
                Some(item) => {
                    let pool = item
                        .as_table_like_mut()
                        .ok_or_else(|| format!("step `{step}`: `pool` is not a table"))?;
                    set_toml(pool, field, toml_int(*value));
                }
                None => {
                    let mut pool = InlineTable::new();
                    pool.insert(*field, toml_int(*value));
                    pool.fmt();
                    set_toml(table, "pool", Toml::InlineTable(pool));
                }
            }
        }
        Edit::Retry { step } => {
            let table = toml_step(doc, step).ok_or_else(|| missing(step))?;
            let usable = table
                .get("retry")
                .and_then(|r| r.get("max_attempts"))
                .and_then(Item::as_integer)
                .is_some_and(|n| n >= 2);
            if !usable {
                let mut retry = InlineTable::new();
                retry.insert("max_attempts", toml_int(u64::from(RETRY_ATTEMPTS)));
                retry.insert("backoff_ms", toml_int(RETRY_BACKOFF_MS));
                retry.insert("max_backoff_ms", toml_int(RETRY_MAX_BACKOFF_MS));
                retry.fmt();
                set_toml(table, "retry", Toml::InlineTable(retry));
            }
            // A step's own strategy wins over the one its `retry` implies.
            if table.contains_key("strategy") {
                set_toml(table, "strategy", Toml::from("retry-failed"));
            }
        }
    }
    Ok(())
}

fn toml_int(n: u64) -> toml_edit::Value {
    toml_edit::Value::from(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The step `id`'s table, whether the file writes `[[step]]` tables or an
/// array of inline tables (under `step` or `steps`).
fn toml_step<'d>(
    doc: &'d mut toml_edit::DocumentMut,
    id: &str,
) -> Option<&'d mut dyn toml_edit::TableLike> {
    use toml_edit::{Item, Value as Toml};
    let key = ["step", "steps"].into_iter().find(|k| doc.contains_key(k))?;
    match doc.get_mut(key)? {
        Item::ArrayOfTables(tables) => tables
            .iter_mut()
            .find(|t| t.get("id").and_then(Item::as_str) == Some(id))
            .map(|t| t as &mut dyn toml_edit::TableLike),
        Item::Value(Toml::Array(array)) => array
            .iter_mut()
            .filter_map(Toml::as_inline_table_mut)
            .find(|t| t.get("id").and_then(Toml::as_str) == Some(id))
            .map(|t| t as &mut dyn toml_edit::TableLike),
        _ => None,
    }
}

/// Sets `key`, keeping the decoration (spacing, a trailing comment) of the
/// value it replaces.
fn set_toml(table: &mut dyn toml_edit::TableLike, key: &str, value: toml_edit::Value) {
    match table.get_mut(key).and_then(toml_edit::Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = value;
            *old.decor_mut() = decor;
        }
        None => {
            // A new key is indented like the table's last one (a prefix
            // that holds comments lends only its last line's indent).
            let indent = table
                .iter()
                .last()
                .and_then(|(last, _)| table.key(last))
                .and_then(|k| k.leaf_decor().prefix())
                .and_then(|p| p.as_str())
                .map(|p| p.rsplit('\n').next().unwrap_or_default().to_owned())
                .filter(|p| p.chars().all(|c| c == ' ' || c == '\t'));
            // Space after the last value belongs before the end of its
            // line or inline table: after the new value (a comment stays put).
            let trailing = table
                .iter()
                .last()
                .map(|(last, _)| last.to_owned())
                .and_then(|last| table.get_mut(&last))
                .and_then(toml_edit::Item::as_value_mut)
                .and_then(|last| {
                    let suffix = last.decor().suffix()?.as_str()?.to_owned();
                    let blank = !suffix.is_empty() && suffix.trim().is_empty();
                    blank.then(|| {
                        last.decor_mut().set_suffix("");
                        suffix
                    })
                });
            table.insert(key, toml_edit::Item::Value(value));
            if let (Some(indent), Some(mut new)) = (indent, table.key_mut(key)) {
                new.leaf_decor_mut().set_prefix(indent);
            }
            if let (Some(trailing), Some(new)) =
                (trailing, table.get_mut(key).and_then(toml_edit::Item::as_value_mut))
            {
                new.decor_mut().set_suffix(trailing);
            }
        }
    }
}

/// `n word`, with an `s` unless `n` is 1.
fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("{n} {word}") } else { format!("{n} {word}s") }
}

/// Removes every `need` from a `needs` array; whether there was one.
fn remove_need(needs: &mut toml_edit::Array, need: &str) -> bool {
    let mut removed = false;
    loop {
        // A separate statement: the iterator (a boxed temporary) must be
        // gone before the array is changed.
        let found = needs.iter().position(|v| v.as_str().is_some_and(|s| s == need));
        let Some(at) = found else { break };
        let gone = needs.remove(at);
        removed = true;
        // On one line, the element after the removed first one starts with
        // the space after a comma: give it the removed one's place instead.
        // (On several lines, its own newline and indent are right.)
        if at == 0
            && let Some(first) = needs.get_mut(0)
        {
            let on_one_line =
                first.decor().prefix().and_then(|p| p.as_str()).is_none_or(|p| !p.contains('\n'));
            if on_one_line {
                let prefix = gone.decor().prefix().cloned().unwrap_or_default();
                first.decor_mut().set_prefix(prefix);
            }
        }
    }
    removed
}

// ----- Rewriting JSON -----

fn rewrite_json(flow: &Flow, edits: &[&Edit]) -> Result<String, OptimizeError> {
    let mut root: Value = serde_json::from_str(&flow.text)
        .map_err(|e| OptimizeError::Text { origin: flow.origin.clone(), reason: e.to_string() })?;
    for edit in edits {
        edit_json(&mut root, edit).map_err(|reason| OptimizeError::Edit {
            origin: flow.origin.clone(),
            what: edit.what(),
            reason,
        })?;
    }
    let mut text = serde_json::to_string_pretty(&root)
        .map_err(|e| OptimizeError::Text { origin: flow.origin.clone(), reason: e.to_string() })?;
    if flow.text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

fn edit_json(root: &mut Value, edit: &Edit) -> Result<(), String> {
    let missing = |step: &str| format!("the file has no step `{step}`");
    match edit {
        Edit::RemoveNeed { step, need } => {
            let object = json_step(root, step).ok_or_else(|| missing(step))?;
            let needs = object
                .get_mut("needs")
                .and_then(Value::as_array_mut)
                .ok_or_else(|| format!("step `{step}` has no `needs` list"))?;
            let before = needs.len();
            needs.retain(|v| v.as_str() != Some(need));
            if needs.len() == before {
                return Err(format!("`{need}` is not in the `needs` of step `{step}`"));
            }
        }
        Edit::MaxParallel(n) => {
            let header = root
                .get_mut("flow")
                .and_then(Value::as_object_mut)
                .ok_or("the file has no `flow` object")?;
            header.insert("max_parallel".into(), json!(n));
        }
        Edit::Pool { step, field, value } => {
            let object = json_step(root, step).ok_or_else(|| missing(step))?;
            let pool = object.entry("pool").or_insert_with(|| json!({}));
            let pool = pool
                .as_object_mut()
                .ok_or_else(|| format!("step `{step}`: `pool` is not an object"))?;
            pool.insert((*field).into(), json!(value));
        }
        Edit::Retry { step } => {
            let object = json_step(root, step).ok_or_else(|| missing(step))?;
            let usable = object
                .get("retry")
                .and_then(|r| r.get("max_attempts"))
                .and_then(Value::as_u64)
                .is_some_and(|n| n >= 2);
            if !usable {
                object.insert(
                    "retry".into(),
                    json!({
                        "max_attempts": RETRY_ATTEMPTS,
                        "backoff_ms": RETRY_BACKOFF_MS,
                        "max_backoff_ms": RETRY_MAX_BACKOFF_MS,
                    }),
                );
            }
            // A step's own strategy wins over the one its `retry` implies.
            if object.contains_key("strategy") {
                object.insert("strategy".into(), json!("retry-failed"));
            }
        }
    }
    Ok(())
}

/// The step `id`'s object in a JSON flow (under `steps` or `step`).
fn json_step<'v>(root: &'v mut Value, id: &str) -> Option<&'v mut Map<String, Value>> {
    let root = root.as_object_mut()?;
    let key = ["steps", "step"].into_iter().find(|k| root.contains_key(*k))?;
    root.get_mut(key)?
        .as_array_mut()?
        .iter_mut()
        .filter_map(Value::as_object_mut)
        .find(|s| s.get("id").and_then(Value::as_str) == Some(id))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::{PlanFigures, RetryPolicy, RunStatus, Stats, StepFailure};

    fn parse(toml: &str) -> Flow {
        Flow::parse(toml, Format::Toml, "<test>", Path::new(".")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A step that ran from `start` to `end` ms and succeeded.
    fn ran(id: &str, start: f64, end: f64) -> StepReport {
        StepReport {
            status: StepStatus::Succeeded,
            attempts: 1,
            start_ms: Some(start),
            end_ms: Some(end),
            output: Some(json!({}).into()),
            ..StepReport::pending(id, &"p")
        }
    }

    /// A step that failed once with `kind`.
    fn failed(id: &str, kind: FailureKind, retryable: bool) -> StepReport {
        StepReport {
            status: StepStatus::Failed,
            attempts: 1,
            start_ms: Some(0.0),
            end_ms: Some(10.0),
            error: Some(StepFailure::new(id, &"p", kind, "it went wrong").retryable(retryable)),
            ..StepReport::pending(id, &"p")
        }
    }

    fn summary(steps: Vec<StepReport>, wall_ms: f64, max_parallel: usize) -> RunSummary {
        RunSummary {
            run_id: "run".into(),
            flow: "t".into(),
            status: RunStatus::Succeeded,
            wall_ms,
            step_ms: steps.iter().filter_map(StepReport::duration_ms).sum(),
            efficiency: 1.0,
            max_parallel,
            plan: PlanFigures::default(),
            steps,
            store: Stats::default(),
        }
    }

    fn runs(runs: Vec<RunSummary>) -> History {
        History { runs, ..History::default() }
    }

    fn pool(plugin: &str, stats: PoolStats, min: usize, max: usize) -> PoolFigures {
        PoolFigures { plugin: plugin.into(), stats, min, max, reuse: 1 }
    }

    fn plugin(name: &str, uses: u64, compiles: u64, preloaded: bool) -> PluginFigures {
        PluginFigures { name: name.into(), uses, compiles, disk_hits: 0, preloaded }
    }

    fn recs(flow: &Flow, history: &History) -> Vec<Recommendation> {
        recommend(flow, &Plan::new(flow), history)
    }

    fn of(recs: &[Recommendation], kind: RecommendationKind) -> Vec<&Recommendation> {
        recs.iter().filter(|r| r.kind == kind).collect()
    }

    /// The one recommendation of `kind`.
    fn one(recs: &[Recommendation], kind: RecommendationKind) -> &Recommendation {
        match of(recs, kind).as_slice() {
            [one] => one,
            other => panic!("expected one {kind}, found {}: {recs:#?}", other.len()),
        }
    }

    fn evidence(rec: &Recommendation, key: &str) -> Value {
        rec.evidence.get(key).cloned().unwrap_or_else(|| panic!("no `{key}` in {rec:#?}"))
    }

    const CHAIN: &str = r#"
        [flow]
        name = "t"
        [[step]]
        id = "a"
        plugin = "p"
        [[step]]
        id = "b"
        plugin = "p"
        needs = ["a"]
    "#;

    // ----- recommend: each kind with and without its evidence -----

    #[test]
    fn a_redundant_need_is_reported_and_only_a_redundant_one() {
        let with = parse(&format!(
            "{CHAIN}[[step]]\nid = \"c\"\nplugin = \"p\"\nneeds = [\"b\", \"a\"]\n\
             input = {{ x = \"${{steps.b.output}}\" }}\n"
        ));
        let found = recs(&with, &History::default());
        let rec = one(&found, RecommendationKind::RedundantDependency);
        assert_eq!(rec.steps, vec!["c", "a"]);
        assert_eq!(evidence(rec, "implied_by"), json!("b"));
        assert_eq!(rec.apply_level, Some(Level::Conservative));
        assert!(rec.message.starts_with("step `c` needs `a`, which it already waits for"));
        assert_eq!(found.len(), 1, "a redundant edge is not also an independent one: {found:#?}");

        // Without an `input`, the need shapes the step's input: report, never apply.
        let keyed = parse(&format!(
            "{CHAIN}[[step]]\nid = \"c\"\nplugin = \"p\"\nneeds = [\"b\", \"a\"]\n"
        ));
        let found = recs(&keyed, &History::default());
        let rec = one(&found, RecommendationKind::RedundantDependency);
        assert_eq!(rec.apply_level, None);
        assert!(rec.message.contains("would change its input"), "{}", rec.message);

        let without =
            parse(&format!("{CHAIN}[[step]]\nid = \"c\"\nplugin = \"p\"\nneeds = [\"b\"]\n"));
        assert!(recs(&without, &History::default()).is_empty());
    }

    #[test]
    fn a_need_whose_output_is_never_read_is_an_independent_step() {
        let toml = |input: &str| {
            format!(
                "[flow]\nname = \"t\"\n[[step]]\nid = \"a\"\nplugin = \"p\"\n[[step]]\nid = \"b\"\nplugin = \"p\"\nneeds = [\"a\"]\n{input}\n"
            )
        };
        let flow = parse(&toml("input = { x = \"${input.x}\" }"));
        let history =
            runs(vec![summary(vec![ran("a", 0.0, 100.0), ran("b", 100.0, 150.0)], 150.0, 2)]);
        let found = recs(&flow, &history);
        let rec = one(&found, RecommendationKind::IndependentSteps);
        assert_eq!(rec.steps, vec!["b", "a"]);
        assert_eq!(rec.apply_level, Some(Level::Aggressive));
        assert!(rec.message.contains("never reads `a`'s output"), "{}", rec.message);
        assert_eq!(rec.estimated_saving_ms, Some(100.0));
        assert_eq!(evidence(rec, "runs"), json!(1));

        for input in ["input = { x = \"${steps.a.output.x}\" }", ""] {
            let flow = parse(&toml(input));
            let found = recs(&flow, &history);
            assert!(
                of(&found, RecommendationKind::IndependentSteps).is_empty(),
                "{input}: {found:#?}"
            );
        }
    }

    /// Two steps of `jq` that can run at once.
    const TWO_JQ: &str = r#"
        [flow]
        name = "t"
        [[step]]
        id = "x"
        plugin = "jq"
        [[step]]
        id = "y"
        plugin = "jq"
    "#;

    #[test]
    fn an_undersized_pool_is_reported_with_its_figures() {
        let flow = parse(TWO_JQ);
        let slow = PoolStats {
            acquisitions: 50,
            creations: 52,
            acquire_mean_us: 800.0,
            acquire_p99_us: 5_000.0,
            ..PoolStats::default()
        };
        let history = History {
            pools: vec![pool("jq", slow, 1, 64)],
            plugins: vec![plugin("jq", 10, 0, true)],
            ..History::default()
        };
        let found = recs(&flow, &history);
        let rec = one(&found, RecommendationKind::UndersizedPool);
        assert_eq!(rec.plugin.as_deref(), Some("jq"));
        assert_eq!(rec.steps, vec!["x", "y"]);
        assert_eq!(evidence(rec, "p99_ms"), json!(5.0));
        assert_eq!(evidence(rec, "waiters"), json!(0));
        assert_eq!(evidence(rec, "suggested_min"), json!(2));
        assert_eq!(rec.apply_level, Some(Level::Conservative));
        assert_eq!(rec.estimated_saving_ms, Some(1.6));
        assert!(rec.message.contains("`jq` instance pool made calls wait"), "{}", rec.message);

        // Waiting calls count from the first; they are starved by `max`.
        let waiting = PoolStats { acquisitions: 2, waiters: 3, total: 2, ..PoolStats::default() };
        let found =
            recs(&flow, &History { pools: vec![pool("jq", waiting, 1, 2)], ..History::default() });
        let rec = one(&found, RecommendationKind::UndersizedPool);
        assert_eq!(evidence(rec, "waiters"), json!(3));
        assert_eq!(evidence(rec, "suggested_max"), json!(4));
        assert_eq!(rec.apply_level, None, "`jq` is not hot in this history");

        // A warm pool, and a cold one whose only slow acquisition was its first.
        let warm = PoolStats { acquisitions: 50, acquire_p99_us: 30.0, ..PoolStats::default() };
        let cold = PoolStats { acquisitions: 1, acquire_p99_us: 9_000.0, ..PoolStats::default() };
        for stats in [warm, cold] {
            let found =
                recs(&flow, &History { pools: vec![pool("jq", stats, 1, 64)], ..history.clone() });
            assert!(of(&found, RecommendationKind::UndersizedPool).is_empty(), "{found:#?}");
        }
    }

    #[test]
    fn an_oversized_pool_is_reported_when_its_spares_go_unused() {
        let flow = parse("[flow]\nname = \"t\"\n[[step]]\nid = \"x\"\nplugin = \"jq\"\n");
        let idle = PoolStats {
            total: 4,
            available: 4,
            acquisitions: 1,
            creations: 5,
            ..PoolStats::default()
        };
        let found =
            recs(&flow, &History { pools: vec![pool("jq", idle, 4, 64)], ..History::default() });
        let rec = one(&found, RecommendationKind::OversizedPool);
        assert_eq!(evidence(rec, "suggested_min"), json!(1));
        assert_eq!(evidence(rec, "acquisitions"), json!(1));
        assert_eq!(rec.apply_level, None);
        assert!(rec.message.contains("lower `pool.min` to 1"), "{}", rec.message);

        let busy = PoolStats { acquisitions: 100, creations: 104, ..idle };
        let found =
            recs(&flow, &History { pools: vec![pool("jq", busy, 4, 64)], ..History::default() });
        assert!(found.is_empty(), "{found:#?}");
        let found =
            recs(&flow, &History { pools: vec![pool("jq", idle, 1, 64)], ..History::default() });
        assert!(found.is_empty(), "min = 1 is the default: {found:#?}");
    }

    #[test]
    fn compiling_without_a_working_disk_cache_is_reported() {
        let flow = parse(TWO_JQ);
        let compiled_once = vec![plugin("jq", 1, 1, false), plugin("other", 1, 5, false)];
        let off =
            History { plugins: compiled_once.clone(), disk_cache: false, ..History::default() };
        let found = recs(&flow, &off);
        let rec = one(&found, RecommendationKind::DiskCacheOff);
        assert_eq!(rec.plugin.as_deref(), Some("jq"), "only the flow's plugins count");
        assert_eq!(evidence(rec, "compiles"), json!(1));
        assert_eq!(evidence(rec, "disk_cache"), json!(false));
        assert!(rec.message.contains("no disk cache"), "{}", rec.message);

        let on = History { plugins: compiled_once, disk_cache: true, ..History::default() };
        assert!(of(&recs(&flow, &on), RecommendationKind::DiskCacheOff).is_empty());

        let recompiled = History {
            plugins: vec![plugin("jq", 1, 3, false)],
            disk_cache: true,
            ..History::default()
        };
        let found = recs(&flow, &recompiled);
        let rec = one(&found, RecommendationKind::DiskCacheOff);
        assert_eq!(evidence(rec, "compiles"), json!(3));
        assert!(rec.message.contains("although a disk cache is in use"), "{}", rec.message);
    }

    #[test]
    fn a_hot_plugin_that_is_not_preloaded_is_reported() {
        let flow = parse(TWO_JQ);
        let history = |uses, preloaded| History {
            plugins: vec![plugin("jq", uses, 0, preloaded)],
            ..History::default()
        };
        let found = recs(&flow, &history(10, false));
        let rec = one(&found, RecommendationKind::HotNotPreloaded);
        assert_eq!(evidence(rec, "uses"), json!(10));
        assert_eq!(evidence(rec, "preload_threshold"), json!(DEFAULT_PRELOAD_THRESHOLD));
        assert_eq!(rec.apply_level, None);
        assert!(rec.message.starts_with("plugin `jq` was used 10 times"), "{}", rec.message);

        for (uses, preloaded) in [(10, true), (2, false)] {
            let found = recs(&flow, &history(uses, preloaded));
            assert!(of(&found, RecommendationKind::HotNotPreloaded).is_empty(), "{found:#?}");
        }
    }

    #[test]
    fn a_hot_plugin_with_fresh_instances_is_offered_reuse() {
        let flow = parse(TWO_JQ);
        let hot = History { plugins: vec![plugin("jq", 10, 0, true)], ..History::default() };
        let found = recs(&flow, &hot);
        let rec = one(&found, RecommendationKind::ReuseInstances);
        assert_eq!(rec.steps, vec!["x", "y"]);
        assert_eq!(evidence(rec, "suggested_reuse"), json!(REUSE));
        assert_eq!(rec.apply_level, Some(Level::Aggressive));

        let cold = History { plugins: vec![plugin("jq", 2, 0, true)], ..History::default() };
        assert!(recs(&flow, &cold).is_empty());
        let reused = History {
            pools: vec![PoolFigures { reuse: 10, ..pool("jq", PoolStats::default(), 1, 64) }],
            ..hot.clone()
        };
        assert!(of(&recs(&flow, &reused), RecommendationKind::ReuseInstances).is_empty());
        let own =
            parse(&TWO_JQ.replace("plugin = \"jq\"\n", "plugin = \"jq\"\npool = { reuse = 5 }\n"));
        assert!(of(&recs(&own, &hot), RecommendationKind::ReuseInstances).is_empty());
    }

    /// A plugin that is not hot, but whose instances take longer to make
    /// than its steps to run (a Python step's runtime), is offered reuse,
    /// with both times as evidence; a cheap one is not.
    #[test]
    fn a_plugin_whose_instantiation_dominates_its_run_is_offered_reuse() {
        let flow = parse(TWO_JQ);
        let timed =
            |id: &str| StepReport { run_ms: Some(0.2), load_ms: Some(3.7), ..ran(id, 0.0, 3.9) };
        let run = summary(vec![timed("x"), timed("y")], 4.0, 2);
        let stats =
            |us: f64| PoolStats { creations: 20, create_mean_us: us, ..PoolStats::default() };
        let slow = History {
            plugins: vec![plugin("jq", 2, 0, true)],
            pools: vec![pool("jq", stats(3700.0), 1, 64)],
            ..runs(vec![run.clone(), run.clone()])
        };
        let found = recs(&flow, &slow);
        let rec = one(&found, RecommendationKind::ReuseInstances);
        assert_eq!(rec.steps, vec!["x", "y"]);
        assert_eq!(evidence(rec, "instantiate_ms"), json!(3.7));
        assert_eq!(evidence(rec, "run_ms"), json!(0.2));
        assert_eq!(rec.estimated_saving_ms, Some(7.4));
        assert!(
            rec.message.contains("making one of its instances takes 3.70 ms"),
            "{}",
            rec.message
        );
        // Cheap to make: a fresh instance per call is kept.
        let cheap = History { pools: vec![pool("jq", stats(20.0), 1, 64)], ..slow.clone() };
        assert!(of(&recs(&flow, &cheap), RecommendationKind::ReuseInstances).is_empty());
    }

    #[test]
    fn a_step_that_dominates_the_critical_path_is_reported() {
        let flow = parse(CHAIN);
        let history = runs(vec![
            summary(vec![ran("a", 0.0, 900.0), ran("b", 900.0, 1000.0)], 1000.0, 2),
            summary(vec![ran("a", 0.0, 700.0), ran("b", 700.0, 800.0)], 800.0, 2),
        ]);
        let found = recs(&flow, &history);
        let rec = one(&found, RecommendationKind::CriticalPathDominated);
        assert_eq!(rec.steps, vec!["a"]);
        assert_eq!(evidence(rec, "share"), json!(round3(800.0 / 900.0)));
        assert_eq!(evidence(rec, "critical_path_ms"), json!(900.0));
        assert_eq!(evidence(rec, "runs"), json!(2));
        assert_eq!(rec.estimated_saving_ms, Some(400.0));
        assert!(
            rec.message.starts_with("step `a` takes 89% of the critical path"),
            "{}",
            rec.message
        );

        // Balanced steps: none takes half.
        let three =
            parse(&format!("{CHAIN}[[step]]\nid = \"c\"\nplugin = \"p\"\nneeds = [\"b\"]\n"));
        let even = runs(vec![summary(
            vec![ran("a", 0.0, 300.0), ran("b", 300.0, 600.0), ran("c", 600.0, 1000.0)],
            1000.0,
            3,
        )]);
        assert!(recs(&three, &even).is_empty());
        // Two equally long parallel steps: halving one alone saves nothing.
        let twins = parse(
            "[flow]\nname = \"t\"\n[[step]]\nid = \"a\"\nplugin = \"p\"\n[[step]]\nid = \"b\"\n\
             plugin = \"p\"\n[[step]]\nid = \"c\"\nplugin = \"p\"\nneeds = [\"a\", \"b\"]\n",
        );
        let parallel = runs(vec![summary(
            vec![ran("a", 0.0, 900.0), ran("b", 0.0, 900.0), ran("c", 900.0, 1000.0)],
            1000.0,
            3,
        )]);
        assert!(recs(&twins, &parallel).is_empty());
    }

    /// Four independent steps of 100 ms.
    fn wide(header: &str) -> Flow {
        let steps: String = ["a", "b", "c", "d"]
            .iter()
            .map(|id| format!("[[step]]\nid = \"{id}\"\nplugin = \"p\"\n"))
            .collect();
        parse(&format!("[flow]\nname = \"t\"\n{header}\n{steps}"))
    }

    fn one_at_a_time() -> RunSummary {
        let steps = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(k, id)| ran(id, k as f64 * 100.0, (k + 1) as f64 * 100.0))
            .collect();
        summary(steps, 400.0, 1)
    }

    #[test]
    fn runs_bounded_by_max_parallel_are_reported() {
        let flow = wide("max_parallel = 1");
        let found = recs(&flow, &runs(vec![one_at_a_time()]));
        let rec = one(&found, RecommendationKind::MaxParallelBound);
        assert_eq!(evidence(rec, "efficiency"), json!(0.25));
        assert_eq!(evidence(rec, "widest_group"), json!(4));
        assert_eq!(evidence(rec, "max_parallel"), json!(1));
        assert_eq!(rec.estimated_saving_ms, Some(300.0));
        assert_eq!(rec.apply_level, Some(Level::Conservative));
        assert!(rec.message.contains("raise `max_parallel` in [flow]"), "{}", rec.message);

        // The bound came from the run options: nothing in the flow to change.
        let found = recs(&wide(""), &runs(vec![one_at_a_time()]));
        assert_eq!(one(&found, RecommendationKind::MaxParallelBound).apply_level, None);

        let together =
            summary(["a", "b", "c", "d"].iter().map(|id| ran(id, 0.0, 100.0)).collect(), 100.0, 4);
        assert!(recs(&flow, &runs(vec![together])).is_empty());
    }

    const FLAKY: &str = r#"
        [flow]
        name = "t"
        [[step]]
        id = "s"
        plugin = "p"
    "#;

    #[test]
    fn a_step_failing_transiently_without_retry_is_reported() {
        let flow = parse(FLAKY);
        let history = runs(vec![
            summary(vec![ran("s", 0.0, 10.0)], 10.0, 1),
            summary(vec![failed("s", FailureKind::Timeout, true)], 10.0, 1),
        ]);
        let found = recs(&flow, &history);
        let rec = one(&found, RecommendationKind::TransientFailureWithoutRetry);
        assert_eq!(evidence(rec, "failures"), json!(1));
        assert_eq!(evidence(rec, "runs"), json!(2));
        assert_eq!(evidence(rec, "share"), json!(0.5));
        assert_eq!(evidence(rec, "kinds"), json!(["timeout"]));
        assert_eq!(rec.apply_level, Some(Level::Balanced));
        assert!(
            rec.message
                .starts_with("step `s` failed with a transient error (timeout) in 1 of the 2 runs"),
            "{}",
            rec.message
        );

        // A trap is no transient failure; a retried step needs nothing.
        let trapped = runs(vec![summary(vec![failed("s", FailureKind::Trap, false)], 10.0, 1)]);
        assert!(recs(&flow, &trapped).is_empty());
        let retried = parse(&format!("{FLAKY}retry = {{ max_attempts = 3 }}\n"));
        assert!(recs(&retried, &history).is_empty());
    }

    // ----- optimize -----

    const COMMENTED: &str = r#"# The flow's own comment.
[flow]
name = "t"
max_parallel = 1   # one at a time, for now

[[step]]
id = "a"
plugin = "p"

[[step]]
id = "b"
plugin = "p"
needs = ["a"]

# c reads only b.
[[step]]
id = "c"
plugin = "p"
needs = ["a", "b"]   # a is implied by b
input = { x = "${steps.b.output}" }

[[step]]
id = "d"
plugin = "p"
needs = ["b", "a"]
"#;

    fn needs(flow: &Flow, id: &str) -> Vec<String> {
        flow.steps[flow.step_index(id).unwrap()].needs.clone()
    }

    #[test]
    fn conservative_drops_a_redundant_need_only_where_allowed_and_keeps_comments() {
        let flow = parse(COMMENTED);
        let optimized = optimize(&flow, Level::Conservative, &History::default()).unwrap();
        assert_eq!(needs(&optimized.flow, "c"), vec!["b"]);
        assert_eq!(needs(&optimized.flow, "d"), vec!["b", "a"], "d's input is keyed by its needs");
        assert_eq!(optimized.changes.len(), 1, "{:#?}", optimized.changes);
        let change = &optimized.changes[0];
        assert_eq!(change.kind, RecommendationKind::RedundantDependency);
        assert_eq!(change.step.as_deref(), Some("c"));
        assert_eq!(change.what, "removed `a` from the `needs` of step `c`");
        assert_eq!(change.evidence["implied_by"], json!("b"));
        assert_eq!(
            optimized.text,
            COMMENTED.replace(r#"needs = ["a", "b"]   #"#, r#"needs = ["b"]   #"#),
            "only that line changes: comments and layout stay"
        );
        assert!(!optimized.is_unchanged());
    }

    /// A flow and history that give every rule something to act on.
    fn busy() -> (Flow, History) {
        let flow = parse(
            r#"
            [flow]
            name = "t"
            max_parallel = 1
            [[step]]
            id = "a"
            plugin = "jq"
            [[step]]
            id = "b"
            plugin = "jq"
            needs = ["a"]
            input = "${input}"
            [[step]]
            id = "c"
            plugin = "p"
            strategy = "fail-fast"
            "#,
        );
        let slow = PoolStats { acquisitions: 50, acquire_p99_us: 5_000.0, ..PoolStats::default() };
        let history = History {
            runs: vec![summary(
                vec![
                    ran("a", 0.0, 100.0),
                    ran("b", 100.0, 200.0),
                    failed("c", FailureKind::StepError, true),
                ],
                400.0,
                1,
            )],
            pools: vec![pool("jq", slow, 1, 64)],
            plugins: vec![plugin("jq", 50, 1, true)],
            disk_cache: true,
            preload_threshold: 3,
        };
        (flow, history)
    }

    /// A retried step fails fast once its retries are spent: a step whose
    /// failure the flow tolerates keeps its strategy, and is recommended only.
    #[test]
    fn a_continue_on_error_step_is_not_given_retries() {
        let (flow, history) = busy();
        let flow = parse(&flow.text.replace("fail-fast", "continue-on-error"));
        let found = recommend(&flow, &Plan::new(&flow), &history);
        let transient = found
            .iter()
            .find(|r| r.kind == RecommendationKind::TransientFailureWithoutRetry)
            .unwrap();
        assert_eq!(transient.apply_level, None);
        let balanced = optimize(&flow, Level::Balanced, &history).unwrap();
        let c = &balanced.flow.steps[balanced.flow.step_index("c").unwrap()];
        assert_eq!(c.strategy, Strategy::ContinueOnError);
        assert!(!balanced.text.contains("retry"), "{}", balanced.text);
    }

    #[test]
    fn each_level_does_what_it_says_and_no_more() {
        let (flow, history) = busy();
        let step = |f: &Flow, id: &str| f.steps[f.step_index(id).unwrap()].clone();

        let conservative = optimize(&flow, Level::Conservative, &history).unwrap();
        let kinds: Vec<_> = conservative.changes.iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            vec![
                RecommendationKind::UndersizedPool,
                RecommendationKind::UndersizedPool,
                RecommendationKind::MaxParallelBound
            ]
        );
        let f = &conservative.flow;
        assert_eq!(f.max_parallel, Some(2));
        assert_eq!(step(f, "a").pool.min, Some(2));
        assert_eq!(step(f, "b").pool.min, Some(2));
        assert_eq!(step(f, "b").needs, vec!["a"], "ordering stays");
        assert_eq!(step(f, "c").strategy, Strategy::FailFast, "retry is balanced's");
        assert_eq!(step(f, "a").pool.reuse, None, "reuse is aggressive's");
        assert!(conservative.text.contains("max_parallel = 2\n"), "{}", conservative.text);

        let balanced = optimize(&flow, Level::Balanced, &history).unwrap();
        let f = &balanced.flow;
        let c = step(f, "c");
        assert_eq!(c.strategy, Strategy::RetryFailed);
        assert_eq!(c.retry, RetryPolicy { max_attempts: 3, backoff_ms: 100, max_backoff_ms: 2000 });
        // A key the optimizer adds is indented like its neighbours.
        let retried = "            strategy = \"retry-failed\"\n            \
                       retry = { max_attempts = 3, backoff_ms = 100, max_backoff_ms = 2000 }\n";
        assert!(balanced.text.contains(retried), "{}", balanced.text);
        assert_eq!(step(f, "b").needs, vec!["a"]);
        assert_eq!(step(f, "a").pool.reuse, None);
        assert_eq!(balanced.changes.len(), conservative.changes.len() + 1);

        let aggressive = optimize(&flow, Level::Aggressive, &history).unwrap();
        let f = &aggressive.flow;
        assert!(step(f, "b").needs.is_empty(), "b never reads a's output");
        assert_eq!(step(f, "a").pool.reuse, Some(REUSE));
        assert_eq!(
            step(f, "b").pool,
            crate::model::PoolSettings::default().with_min(2).with_reuse(REUSE)
        );
        assert_eq!(step(f, "c").strategy, Strategy::RetryFailed);
        assert!(
            aggressive.text.contains("\n            pool = { min = 2, reuse = 100 }\n"),
            "{}",
            aggressive.text
        );
    }

    #[test]
    fn nothing_to_do_leaves_the_text_as_it_was() {
        let flow = parse(CHAIN);
        for level in [Level::Conservative, Level::Balanced, Level::Aggressive] {
            let optimized = optimize(&flow, level, &History::default()).unwrap();
            assert!(optimized.is_unchanged());
            assert_eq!(optimized.text, CHAIN);
            assert_eq!(optimized.diff(&flow), "");
        }
    }

    #[test]
    fn steps_written_as_inline_tables_are_edited_too() {
        let toml = r#"step = [
  { id = "a", plugin = "p" },
  { id = "b", plugin = "p", needs = ["a"] },
  { id = "c", plugin = "p", needs = ["a", "b"], input = "${steps.b.output}" },
]

[flow]
name = "t"
"#;
        let flow = parse(toml);
        let history = runs(vec![summary(
            vec![ran("a", 0.0, 1.0), ran("b", 1.0, 2.0), failed("c", FailureKind::Timeout, true)],
            3.0,
            3,
        )]);
        let optimized = optimize(&flow, Level::Balanced, &history).unwrap();
        let c = &optimized.flow.steps[2];
        assert_eq!(c.needs, vec!["b"]);
        assert_eq!(c.strategy, Strategy::RetryFailed);
        assert!(
            optimized.text.contains(
                "  { id = \"c\", plugin = \"p\", needs = [\"b\"], input = \"${steps.b.output}\", \
                 retry = { max_attempts = 3, backoff_ms = 100, max_backoff_ms = 2000 } },\n"
            ),
            "{}",
            optimized.text
        );
    }

    #[test]
    fn json_flows_are_rewritten_too() {
        let json = r#"{
  "flow": {"name": "j"},
  "steps": [
    {"id": "a", "plugin": "p"},
    {"id": "b", "plugin": "p", "needs": ["a"]},
    {"id": "c", "plugin": "p", "needs": ["a", "b"], "input": {"x": "${steps.b.output}"}, "strategy": "fail-fast"}
  ]
}
"#;
        let flow = Flow::parse(json, Format::Json, "<test>.json", Path::new(".")).unwrap();
        let history = runs(vec![summary(
            vec![ran("a", 0.0, 1.0), ran("b", 1.0, 2.0), failed("c", FailureKind::Pool, true)],
            3.0,
            3,
        )]);
        let optimized = optimize(&flow, Level::Balanced, &history).unwrap();
        assert_eq!(optimized.flow.format, Format::Json);
        let c = &optimized.flow.steps[2];
        assert_eq!(c.needs, vec!["b"]);
        assert_eq!(c.strategy, Strategy::RetryFailed);
        assert_eq!(c.retry.max_attempts, 3);
        let value: Value = serde_json::from_str(&optimized.text).unwrap();
        assert_eq!(value["steps"][2]["needs"], json!(["b"]));
        assert_eq!(value["steps"][2]["retry"]["max_backoff_ms"], json!(2000));
        assert!(optimized.text.ends_with("}\n"));
        assert_eq!(optimized.changes.len(), 2, "{:#?}", optimized.changes);
    }

    #[test]
    fn the_diff_shows_the_change_under_the_flows_name() {
        let flow = parse(COMMENTED);
        let optimized = optimize(&flow, Level::Conservative, &History::default()).unwrap();
        let diff = optimized.diff(&flow);
        assert!(diff.starts_with("--- <test>\n+++ <test> (optimized: conservative)\n"), "{diff}");
        assert!(diff.contains("\n-needs = [\"a\", \"b\"]   # a is implied by b\n"), "{diff}");
        assert!(diff.contains("\n+needs = [\"b\"]   # a is implied by b\n"), "{diff}");
        assert_eq!(diff.lines().filter(|l| l.starts_with('+') || l.starts_with('-')).count(), 4);
    }

    #[test]
    fn apply_writes_the_new_text_and_keeps_the_old_as_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flow.toml");
        std::fs::write(&path, COMMENTED).unwrap();
        let flow = Flow::load(&path).unwrap();
        let optimized = optimize(&flow, Level::Conservative, &History::default()).unwrap();
        assert!(!optimized.is_unchanged());
        apply(&path, &optimized.text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), optimized.text);
        assert_eq!(std::fs::read_to_string(dir.path().join("flow.toml.bak")).unwrap(), COMMENTED);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["flow.toml", "flow.toml.bak"], "no temporary file is left");
        // The rewritten file is a valid flow.
        assert_eq!(needs(&Flow::load(&path).unwrap(), "c"), vec!["b"]);
    }

    #[test]
    fn levels_parse_print_order_and_serialize() {
        assert_eq!("Balanced".parse::<Level>(), Ok(Level::Balanced));
        assert_eq!(Level::default(), Level::Balanced);
        assert!(Level::Conservative < Level::Balanced && Level::Balanced < Level::Aggressive);
        let err = "fast".parse::<Level>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown optimization level \"fast\": use conservative, balanced or aggressive"
        );
        assert_eq!(Level::Aggressive.to_string(), "aggressive");
        assert_eq!(serde_json::to_value(Level::Conservative).unwrap(), json!("conservative"));
        assert_eq!(
            serde_json::to_value(RecommendationKind::TransientFailureWithoutRetry).unwrap(),
            json!("transient-failure-without-retry")
        );
        let history: History = serde_json::from_str("{}").unwrap();
        assert!(history.runs.is_empty());
        assert_eq!(history.preload_threshold, DEFAULT_PRELOAD_THRESHOLD);
    }
}
