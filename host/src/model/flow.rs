//! Flows: the model, parsing from TOML or JSON, and validation whose errors
//! name the file, the step and the problem.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::check::{LOG_BYTES, MAX_PARALLEL, MEMORY_MB, Numbers, OUTPUT_BYTES, TIMEOUT_MS, mib};
use super::database::Database;
use super::grant::HttpGrant;
use super::graph;
use super::input::{Source, Template};
use super::settings::PoolSettings;

/// A validated flow: a DAG of steps, and the loaders that serve its assets.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The flow's name.
    pub name: String,
    /// What it does, if the file says.
    pub description: Option<String>,
    /// Its steps, in the order the file lists them.
    pub steps: Vec<Step>,
    /// Its loaders.
    pub loaders: Vec<LoaderSpec>,
    /// The databases it declares (`[[database]]`), beside the host's.
    pub databases: Vec<Database>,
    /// How many steps may run at once (`None`: as many as are ready).
    pub max_parallel: Option<usize>,
    /// The largest output a step may return, in bytes (`None`: the host's limit).
    pub max_output_bytes: Option<u64>,
    /// The most log bytes kept per step call (`None`: the host's limit).
    pub max_log_bytes: Option<u64>,
    /// Where it came from: a file path, or `<inline>`.
    pub origin: String,
    /// The text it was parsed from, as written: what a rewrite (the
    /// optimizer) edits and what a run store keeps.
    pub text: Arc<str>,
    /// The text's format.
    pub format: Format,
    /// The directory relative paths in it are resolved against.
    pub base: PathBuf,
    /// Each step's index by id, made when the flow is read.
    index: Arc<HashMap<String, usize>>,
}

/// What happens when a step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Cancel the rest of the run (the default).
    #[default]
    FailFast,
    /// Run every step whose dependencies succeeded; skip the dependents of
    /// the failed step.
    ContinueOnError,
    /// Retry the step (see [`RetryPolicy`]); if it still fails, fail fast.
    RetryFailed,
}

/// How a failing step is retried: exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The delay before the first retry, in ms; it doubles for each one after.
    pub backoff_ms: u64,
    /// The longest delay between two attempts, in ms.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 3, backoff_ms: 100, max_backoff_ms: 10_000 }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1` (attempt counts from 1): half
    /// of the exponential backoff fixed, half random ("equal jitter"), so
    /// that retries of many steps spread out but never come too early.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let exponential = self.backoff_ms.saturating_mul(1 << attempt.saturating_sub(1).min(32));
        let full = exponential.min(self.max_backoff_ms);
        let half = full / 2;
        Duration::from_millis(half + random % (full - half + 1))
    }
}

/// One step of a flow.
#[derive(Debug, Clone)]
pub struct Step {
    /// Its id, unique in the flow.
    pub id: String,
    /// The plugin it runs.
    pub plugin: PluginRef,
    /// Its configuration, passed to the plugin's `init`.
    pub config: Map<String, Value>,
    /// The ids of the steps it depends on.
    pub needs: Vec<String>,
    /// How long one attempt may take.
    pub timeout: Option<Duration>,
    /// What happens when it fails.
    pub strategy: Strategy,
    /// How it is retried, when its strategy retries.
    pub retry: RetryPolicy,
    /// Exclusive resources it holds while it runs: steps that name the same
    /// resource never run at once.
    pub resources: Vec<String>,
    /// Its instance pool's settings (over its plugin's and the host's).
    pub pool: PoolSettings,
    /// Host directories it may use.
    pub dirs: Vec<Mount>,
    /// Environment variables it sees (and no others).
    pub env: Vec<(String, String)>,
    /// The origins it may send HTTP requests to (none: no HTTP at all).
    pub http: Vec<HttpGrant>,
    /// The databases it may query, by id: the flow's or the host's.
    pub databases: Vec<String>,
    /// Its linear memory limit in bytes (`None`: the flow's, else the host's).
    pub max_memory_bytes: Option<u64>,
    /// The indices (in `Flow::steps`) of `needs`.
    pub(crate) deps: Vec<usize>,
    /// The `input` mapping, if the file gives one.
    pub(crate) input: Option<Template>,
    /// What makes two steps share instances, computed once here.
    pub(crate) instance_key: InstanceKey,
}

/// Everything in a flow that decides what a step's instances are, beyond
/// the plugin's bytes and the host's limits: its config, grants, memory
/// limit and pool settings, and the flow's loaders (an `init` may read
/// assets). Encoded once when the flow is read (JSON, whose object keys are
/// sorted: stable), and hashed once, so that finding a step's pool costs a
/// hash-map probe, not a serialisation.
#[derive(Debug, Clone)]
pub(crate) struct InstanceKey {
    hash: u64,
    /// The step's part, and the flow's loaders and databases (encoded
    /// once, shared by every step of the flow).
    text: Arc<str>,
    flow: Arc<str>,
}

impl InstanceKey {
    fn new(step: &Step, flow: &Arc<str>) -> InstanceKey {
        let encoded = serde_json::json!({
            "config": step.config,
            "dirs": step.dirs,
            "env": step.env,
            "http": step.http,
            "databases": step.databases,
            "max_memory_bytes": step.max_memory_bytes,
            "pool": step.pool,
        });
        let text: Arc<str> = Arc::from(encoded.to_string());
        let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes())
            ^ xxhash_rust::xxh3::xxh3_64(flow.as_bytes()).rotate_left(1);
        InstanceKey { hash, text, flow: flow.clone() }
    }
}

impl PartialEq for InstanceKey {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || a == b;
        self.hash == other.hash && same(&self.text, &other.text) && same(&self.flow, &other.flow)
    }
}

impl Eq for InstanceKey {}

impl Hash for InstanceKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// A loader: a plugin that serves assets named `ID/NAME` to steps.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderSpec {
    /// The loader's id: the first part of the asset names it serves.
    pub id: String,
    /// The plugin it runs.
    pub plugin: PluginRef,
    /// Its parameters, passed to every `load`.
    pub params: Map<String, Value>,
    /// Host directories it may read, each mounted read-only at a guest path.
    pub dirs: Vec<Mount>,
    /// The origins it may send HTTP requests to (none: no HTTP at all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpGrant>,
}

/// A host directory granted to a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mount {
    /// Where the plugin sees it.
    pub guest: String,
    /// The directory on the host (resolved against the flow file's directory).
    pub host: PathBuf,
    /// Whether the plugin may change it (read-only unless granted).
    pub writable: bool,
}

/// A directory grant as the flow writes it: `"/data" = "dir"` (read-only) or
/// `"/out" = { path = "dir", writable = true }`.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawMount {
    Path(PathBuf),
    Full {
        path: PathBuf,
        #[serde(default)]
        writable: bool,
    },
}

/// Checks directory grants: absolute guest paths, existing host directories.
/// A step's `http` grants; each one that is not a grant is a problem.
fn grants(owner: &str, raw: &[String], problems: &mut Vec<Problem>) -> Vec<HttpGrant> {
    raw.iter()
        .filter_map(|text| {
            HttpGrant::parse(text)
                .map_err(|message| {
                    problems.push(Problem::BadGrant { owner: owner.to_owned(), message })
                })
                .ok()
        })
        .collect()
}

fn mounts(
    owner: &str,
    raw: BTreeMap<String, RawMount>,
    base: &Path,
    problems: &mut Vec<Problem>,
) -> Vec<Mount> {
    raw.into_iter()
        .filter_map(|(guest, raw)| {
            let (host, writable) = match raw {
                RawMount::Path(path) => (base.join(path), false),
                RawMount::Full { path, writable } => (base.join(path), writable),
            };
            let reason = if !guest.starts_with('/') {
                Some("the guest path must be absolute, such as \"/data\"")
            } else if !host.is_dir() {
                Some("no such directory on the host")
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    problems.push(Problem::BadMount {
                        owner: owner.to_owned(),
                        guest,
                        host: host.display().to_string(),
                        reason: reason.to_owned(),
                    });
                    None
                }
                None => Some(Mount { guest, host, writable }),
            }
        })
        .collect()
}

/// A plugin by name, optionally pinned to a version: `jq` or `jq@0.1.0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PluginRef {
    /// The plugin's name (its file's stem in the plugins directory).
    pub name: String,
    /// The version it must report, if pinned.
    pub version: Option<String>,
}

impl fmt::Display for PluginRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A flow that could not be read or is not valid: every problem found, with
/// the file it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowError {
    /// The flow file, or `<inline>`.
    pub origin: String,
    /// What is wrong, one entry per problem.
    pub problems: Vec<Problem>,
}

impl std::error::Error for FlowError {}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "{}: {one}", self.origin),
            many => {
                write!(f, "{}: {} problems", self.origin, many.len())?;
                many.iter().try_for_each(|p| write!(f, "\n  {p}"))
            }
        }
    }
}

/// One thing wrong with a flow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The file could not be read.
    #[error("cannot read the file: {0}")]
    Read(String),
    /// The text is not valid TOML or JSON, or not shaped like a flow.
    #[error("{0}")]
    Syntax(String),
    /// A step or loader id is empty or has characters other than letters,
    /// digits, `-` and `_`.
    #[error("{what} id {id:?} is not valid: use letters, digits, `-` and `_`")]
    BadId {
        /// `step` or `loader`.
        what: &'static str,
        /// The id as written.
        id: String,
    },
    /// Two steps (or two loaders) share an id.
    #[error("{what} id `{id}` is used more than once")]
    DuplicateId {
        /// `step` or `loader`.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// A plugin reference is not `name` or `name@version`.
    #[error("{owner}: plugin {plugin:?} is not `name` or `name@version`")]
    BadPluginRef {
        /// The step or loader, as `step \`id\``.
        owner: String,
        /// The reference as written.
        plugin: String,
    },
    /// No such plugin in the plugins directory.
    #[error("{owner}: no plugin `{plugin}` in {dir} (it has: {available})")]
    UnknownPlugin {
        /// The step or loader, as `step \`id\``.
        owner: String,
        /// The plugin's name.
        plugin: String,
        /// The plugins directory.
        dir: String,
        /// The plugins there are.
        available: String,
    },
    /// `needs` names a step that does not exist.
    #[error("step `{step}`: needs `{needs}`, which is not a step of this flow (steps: {steps})")]
    UnknownDependency {
        /// The step.
        step: String,
        /// The missing id.
        needs: String,
        /// The ids there are.
        steps: String,
    },
    /// The steps depend on each other in a circle.
    #[error("the steps {} depend on each other in a cycle", .0.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(" -> "))]
    Cycle(Vec<String>),
    /// `config` (or a loader's `params`) is not a table.
    #[error("{owner}: `{field}` must be a table (a JSON object), not {found}")]
    BadConfig {
        /// The step or loader.
        owner: String,
        /// `config` or `params`.
        field: &'static str,
        /// What it is instead.
        found: String,
    },
    /// An `input` reference is malformed or names a step this one does not need.
    #[error("step `{step}`: input {reason}")]
    BadReference {
        /// The step.
        step: String,
        /// What is wrong.
        reason: String,
    },
    /// A number is outside what the field allows.
    #[error("{field} = {value} is out of range: it must be {range}")]
    OutOfRange {
        /// The field, with its owner: ``step `a`: pool.min``.
        field: String,
        /// The number as written.
        value: u64,
        /// What it may be, such as `1 ..= 4096 (MiB)`.
        range: String,
    },
    /// The flow is larger than the host accepts.
    #[error("the flow is too large: {what} (raise the limit if it is meant to be)")]
    TooLarge {
        /// What is over which limit.
        what: String,
    },
    /// More problems than are worth listing.
    #[error("… and {0} more problems")]
    More(usize),
    /// A loader's directory grant is unusable.
    #[error("{owner}: dir {guest:?} = {host:?}: {reason}")]
    BadMount {
        /// The step or loader, as `step \`id\``.
        owner: String,
        /// The guest path.
        guest: String,
        /// The host path.
        host: String,
        /// What is wrong.
        reason: String,
    },
    /// A database declaration or grant that is not usable.
    #[error("{owner}: {message}")]
    BadDatabase {
        /// The step, as `step \`id\``, or the database, as `database \`id\``.
        owner: String,
        /// What is wrong, naming the database.
        message: String,
    },
    /// A grant that is not one (`http = [...]`).
    #[error("{owner}: {message}")]
    BadGrant {
        /// The step, as `step \`id\``.
        owner: String,
        /// What is wrong, naming the grant.
        message: String,
    },
}

/// The text format of a flow.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// TOML (`.toml`, the default).
    Toml,
    /// JSON (`.json`).
    Json,
}

/// How large a flow may be. Flows arrive over the network, and planning
/// one costs O(V·E/64) time and V²/8 bytes: the defaults leave room for any
/// real flow and keep the worst case under a second and a few MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlowLimits {
    /// Steps and loaders in one flow: 10 000.
    pub max_steps: usize,
    /// `needs` entries in one flow, every step's together: 100 000.
    pub max_edges: usize,
    /// The flow's text, in bytes: 64 MiB.
    pub max_bytes: u64,
}

impl Default for FlowLimits {
    fn default() -> FlowLimits {
        FlowLimits { max_steps: 10_000, max_edges: 100_000, max_bytes: 64 << 20 }
    }
}

/// At most this many problems are listed; the rest are counted.
const MAX_PROBLEMS: usize = 100;

/// Reads the text file at `path`, refusing one over `limit` bytes without
/// reading past the limit (`/dev/zero` ends too).
pub fn read_text(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(limit.saturating_add(1)).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(std::io::Error::other(format!("it is larger than the limit of {limit} bytes")));
    }
    Ok(text)
}

impl Flow {
    /// Reads and validates a flow file within the default [`FlowLimits`];
    /// `.json` files are JSON, all others TOML. Relative directories in the
    /// flow are resolved against the file's directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Flow, FlowError> {
        Flow::load_with(path, &FlowLimits::default())
    }

    /// [`Flow::load`] within `limits`: a file over `max_bytes` is not read
    /// past its limit.
    pub fn load_with(path: impl AsRef<Path>, limits: &FlowLimits) -> Result<Flow, FlowError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text = read_text(path, limits.max_bytes).map_err(|e| FlowError {
            origin: origin.clone(),
            problems: vec![Problem::Read(e.to_string())],
        })?;
        let format =
            if path.extension().is_some_and(|e| e == "json") { Format::Json } else { Format::Toml };
        let base = path.parent().unwrap_or(Path::new("."));
        Flow::parse_with(&text, format, &origin, base, limits)
    }

    /// Parses and validates a flow's text within the default [`FlowLimits`].
    /// `origin` names it in errors; `base` is the directory relative paths
    /// in it are resolved against.
    pub fn parse(text: &str, format: Format, origin: &str, base: &Path) -> Result<Flow, FlowError> {
        Flow::parse_with(text, format, origin, base, &FlowLimits::default())
    }

    /// [`Flow::parse`] within `limits`.
    pub fn parse_with(
        text: &str,
        format: Format,
        origin: &str,
        base: &Path,
        limits: &FlowLimits,
    ) -> Result<Flow, FlowError> {
        let error = |problems| FlowError { origin: origin.to_owned(), problems };
        if text.len() as u64 > limits.max_bytes {
            let what = format!("{} bytes, over the limit of {}", text.len(), limits.max_bytes);
            return Err(error(vec![Problem::TooLarge { what }]));
        }
        let raw: RawFlow = match format {
            Format::Toml => toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned()),
            Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
        }
        .map_err(|message| error(vec![Problem::Syntax(message)]))?;
        // Before anything costs more than the text: planning is O(V·E/64),
        // and a resource shared by many steps costs pairs of them.
        let steps = raw.step.len() + raw.loader.len();
        let edges: usize = raw.step.iter().map(|s| s.needs.len() + s.resources.len()).sum();
        if steps > limits.max_steps {
            let what = format!("{steps} steps and loaders, over the limit of {}", limits.max_steps);
            return Err(error(vec![Problem::TooLarge { what }]));
        }
        if edges > limits.max_edges {
            let what = format!(
                "{edges} needs and resources in all, over the limit of {}",
                limits.max_edges
            );
            return Err(error(vec![Problem::TooLarge { what }]));
        }
        let mut problems = Vec::new();
        let (mut flow, unlisted) = raw.validate(origin, base, &mut problems);
        flow.text = Arc::from(text);
        flow.format = format;
        if problems.is_empty() {
            return Ok(flow);
        }
        if problems.len() > MAX_PROBLEMS || unlisted > 0 {
            let more = problems.len().saturating_sub(MAX_PROBLEMS) + unlisted;
            problems.truncate(MAX_PROBLEMS);
            problems.push(Problem::More(more));
        }
        Err(error(problems))
    }

    /// The index of the step `id`.
    pub fn step_index(&self, id: &str) -> Option<usize> {
        match self.index.get(id) {
            // The index is of the steps as read; `steps` is public, so check.
            Some(&i) if self.steps.get(i).is_some_and(|s| s.id == id) => Some(i),
            _ => self.steps.iter().position(|s| s.id == id),
        }
    }

    /// The database `id` as this flow declares it, else as `host` does.
    pub fn database<'a>(&'a self, id: &str, host: &'a [Database]) -> Option<&'a Database> {
        self.databases.iter().chain(host).find(|d| d.id == id)
    }

    /// For each step, whether another step needs it: the steps nobody
    /// needs are the flow's results.
    pub fn needed(&self) -> Vec<bool> {
        let mut needed = vec![false; self.steps.len()];
        for step in &self.steps {
            for &dep in &step.deps {
                needed[dep] = true;
            }
        }
        needed
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    flow: RawHeader,
    #[serde(default, alias = "steps")]
    step: Vec<RawStep>,
    #[serde(default, alias = "loaders")]
    loader: Vec<RawLoader>,
    #[serde(default, alias = "databases")]
    database: Vec<Database>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    description: Option<String>,
    max_parallel: Option<usize>,
    #[serde(default)]
    strategy: Strategy,
    retry: Option<RetryPolicy>,
    /// The default per-step timeout.
    timeout_ms: Option<u64>,
    max_output_bytes: Option<u64>,
    /// The default memory limit of every step, in MiB.
    max_memory_mb: Option<u64>,
    /// The most log bytes (stdout, stderr, `host.log`) kept per step call.
    max_log_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: String,
    plugin: String,
    config: Option<Value>,
    #[serde(default)]
    needs: Vec<String>,
    input: Option<Value>,
    timeout_ms: Option<u64>,
    strategy: Option<Strategy>,
    retry: Option<RetryPolicy>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    pool: PoolSettings,
    #[serde(default)]
    dirs: BTreeMap<String, RawMount>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    http: Vec<String>,
    #[serde(default)]
    databases: Vec<String>,
    max_memory_mb: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoader {
    id: String,
    plugin: String,
    params: Option<Value>,
    /// Guest path → host directory.
    #[serde(default)]
    dirs: BTreeMap<String, RawMount>,
    #[serde(default)]
    http: Vec<String>,
}

impl RawFlow {
    /// Every number the header sets, in range.
    fn check_header(&self, problems: &mut Vec<Problem>) {
        let header = &self.flow;
        let mut numbers = Numbers::of("flow.", problems);
        numbers.check("max_parallel", header.max_parallel.map(|n| n as u64), MAX_PARALLEL, "steps");
        numbers.retry(header.retry.as_ref());
        numbers.check("timeout_ms", header.timeout_ms, TIMEOUT_MS, "ms");
        numbers.check("max_output_bytes", header.max_output_bytes, OUTPUT_BYTES, "bytes");
        numbers.check("max_memory_mb", header.max_memory_mb, MEMORY_MB, "MiB");
        numbers.check("max_log_bytes", header.max_log_bytes, LOG_BYTES, "bytes");
    }

    /// The flow, and how many problems were found but not listed (beyond
    /// what would ever be shown, they are only counted).
    fn validate(self, origin: &str, base: &Path, problems: &mut Vec<Problem>) -> (Flow, usize) {
        let mut unlisted = 0;
        let ids: HashMap<&str, usize> =
            self.step.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
        // A flow's name is its id in a server and a file name in a flows
        // directory: the same rule as step ids keeps it a plain name.
        check_ids("flow", std::iter::once(self.flow.name.as_str()), problems);
        check_ids("step", self.step.iter().map(|s| s.id.as_str()), problems);
        check_ids("loader", self.loader.iter().map(|l| l.id.as_str()), problems);
        check_ids("database", self.database.iter().map(|d| d.id.as_str()), problems);
        for database in &self.database {
            check_database(database, problems);
        }
        self.check_header(problems);
        // Listed once (the first few), for every unknown dependency.
        let mut all_ids: Option<String> = None;

        let steps: Vec<Step> = self
            .step
            .iter()
            .map(|raw| {
                let owner = format!("step `{}`", raw.id);
                let prefix = format!("{owner}: ");
                let mut numbers = Numbers::of(&prefix, problems);
                numbers.check("timeout_ms", raw.timeout_ms, TIMEOUT_MS, "ms");
                numbers.check("max_memory_mb", raw.max_memory_mb, MEMORY_MB, "MiB");
                numbers.retry(raw.retry.as_ref());
                numbers.pool("pool", &raw.pool);
                let mut deps = Vec::with_capacity(raw.needs.len());
                let mut seen = HashSet::with_capacity(raw.needs.len());
                for need in &raw.needs {
                    match ids.get(need.as_str()) {
                        Some(&i) => {
                            if seen.insert(i) {
                                deps.push(i);
                            }
                        }
                        None if problems.len() > MAX_PROBLEMS => unlisted += 1,
                        None => problems.push(Problem::UnknownDependency {
                            step: raw.id.clone(),
                            needs: need.clone(),
                            steps: all_ids
                                .get_or_insert_with(|| {
                                    let mut ids: Vec<&str> =
                                        self.step.iter().take(20).map(|s| s.id.as_str()).collect();
                                    let more = format!("… {} in all", self.step.len());
                                    if self.step.len() > ids.len() {
                                        ids.push(&more);
                                    }
                                    ids.join(", ")
                                })
                                .clone(),
                        }),
                    }
                }
                let input = raw.input.as_ref().and_then(|value| match Template::parse(value) {
                    Ok(t) => {
                        check_refs(raw, &t, problems);
                        Some(t)
                    }
                    Err(reason) => {
                        problems.push(Problem::BadReference { step: raw.id.clone(), reason });
                        None
                    }
                });
                // A step's own `retry` implies retrying it; otherwise its
                // strategy (or the flow's) decides.
                let strategy = match (raw.strategy, raw.retry) {
                    (Some(strategy), _) => strategy,
                    (None, Some(_)) => Strategy::RetryFailed,
                    (None, None) => self.flow.strategy,
                };
                Step {
                    id: raw.id.clone(),
                    plugin: plugin_ref(&owner, &raw.plugin, problems),
                    config: table(&owner, "config", raw.config.clone(), problems),
                    needs: raw.needs.clone(),
                    timeout: raw.timeout_ms.or(self.flow.timeout_ms).map(Duration::from_millis),
                    strategy,
                    retry: raw.retry.or(self.flow.retry).unwrap_or_default(),
                    resources: raw.resources.clone(),
                    pool: raw.pool,
                    dirs: mounts(&owner, raw.dirs.clone(), base, problems),
                    env: raw.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    http: grants(&owner, &raw.http, problems),
                    databases: raw.databases.clone(),
                    max_memory_bytes: raw.max_memory_mb.or(self.flow.max_memory_mb).map(mib),
                    deps,
                    input,
                    instance_key: InstanceKey { hash: 0, text: Arc::from(""), flow: Arc::from("") },
                }
            })
            .collect();

        let deps: Vec<&[usize]> = steps.iter().map(|s| s.deps.as_slice()).collect();
        for cycle in graph::cycles(&deps) {
            problems.push(Problem::Cycle(cycle.iter().map(|&i| steps[i].id.clone()).collect()));
        }

        let loaders: Vec<LoaderSpec> = self
            .loader
            .into_iter()
            .map(|raw| {
                let owner = format!("loader `{}`", raw.id);
                let dirs = mounts(&owner, raw.dirs, base, problems);
                let http = grants(&owner, &raw.http, problems);
                LoaderSpec {
                    plugin: plugin_ref(&owner, &raw.plugin, problems),
                    params: table(&owner, "params", raw.params, problems),
                    id: raw.id,
                    dirs,
                    http,
                }
            })
            .collect();

        let mut steps = steps;
        let databases: Vec<Database> =
            self.database.into_iter().map(|d| d.resolved(base)).collect();
        // What every step's instances share: the flow's loaders and databases.
        let encoded: Arc<str> = Arc::from(
            serde_json::json!({ "loaders": loaders, "databases": databases }).to_string(),
        );
        for step in &mut steps {
            step.instance_key = InstanceKey::new(step, &encoded);
        }
        let flow = Flow {
            name: self.flow.name,
            description: self.flow.description,
            steps,
            loaders,
            databases,
            max_parallel: self.flow.max_parallel,
            max_output_bytes: self.flow.max_output_bytes,
            max_log_bytes: self.flow.max_log_bytes,
            origin: origin.to_owned(),
            text: Arc::from(""),
            format: Format::Toml,
            base: base.to_path_buf(),
            index: Arc::new(ids.iter().map(|(id, &i)| ((*id).to_owned(), i)).collect()),
        };
        (flow, unlisted)
    }
}

/// A declared database: a URL Qflow has a driver for, its pool and timeout
/// in range.
pub(crate) fn check_database(database: &Database, problems: &mut Vec<Problem>) {
    let owner = format!("database `{}`", database.id);
    if let Err(message) = database.kind() {
        problems.push(Problem::BadDatabase { owner: owner.clone(), message });
    }
    if database.pool.reuse.is_some() {
        let message = "pool.reuse is for instance pools; a connection serves any number of calls";
        problems.push(Problem::BadDatabase { owner: owner.clone(), message: message.to_owned() });
    }
    let prefix = format!("{owner}: ");
    let mut numbers = Numbers::of(&prefix, problems);
    numbers.pool("pool", &database.pool);
    numbers.check("statement_timeout_ms", database.statement_timeout_ms, TIMEOUT_MS, "ms");
}

fn check_ids<'a>(
    what: &'static str,
    ids: impl Iterator<Item = &'a str>,
    problems: &mut Vec<Problem>,
) {
    let mut seen = HashSet::new();
    for id in ids {
        let valid =
            !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            problems.push(Problem::BadId { what, id: id.to_owned() });
        } else if !seen.insert(id) {
            problems.push(Problem::DuplicateId { what, id: id.to_owned() });
        }
    }
}

/// Every `${steps.X.output}` must name a step this one needs, so that its
/// output exists when this step starts.
fn check_refs(raw: &RawStep, template: &Template, problems: &mut Vec<Problem>) {
    let refs = template.refs();
    if refs.is_empty() {
        return;
    }
    let needs: HashSet<&str> = raw.needs.iter().map(String::as_str).collect();
    for r in refs {
        if let Source::Step(id) = &r.source
            && !needs.contains(id.as_str())
        {
            problems.push(Problem::BadReference {
                step: raw.id.clone(),
                reason: format!(
                    "`{}` refers to step `{id}`, which this step does not need (add it to `needs`)",
                    r.text
                ),
            });
        }
    }
}

fn plugin_ref(owner: &str, text: &str, problems: &mut Vec<Problem>) -> PluginRef {
    let (name, version) = match text.split_once('@') {
        Some((name, version)) => (name, Some(version.to_owned())),
        None => (text, None),
    };
    let valid_name =
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid_name || version.as_deref().is_some_and(str::is_empty) {
        problems.push(Problem::BadPluginRef { owner: owner.to_owned(), plugin: text.to_owned() });
    }
    PluginRef { name: name.to_owned(), version }
}

fn table(
    owner: &str,
    field: &'static str,
    value: Option<Value>,
    problems: &mut Vec<Problem>,
) -> Map<String, Value> {
    match value {
        None => Map::new(),
        Some(Value::Object(map)) => map,
        Some(other) => {
            let found = match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            };
            problems.push(Problem::BadConfig {
                owner: owner.to_owned(),
                field,
                found: found.to_owned(),
            });
            Map::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Flow, FlowError> {
        Flow::parse(toml, Format::Toml, "flows/test.toml", Path::new("."))
    }

    fn problems(toml: &str) -> Vec<Problem> {
        match parse(toml) {
            Ok(_) => panic!("the flow should not be valid"),
            Err(e) => {
                assert_eq!(e.origin, "flows/test.toml");
                e.problems
            }
        }
    }

    const HEADER: &str = "[flow]\nname = \"t\"\n";

    fn steps(body: &str) -> String {
        format!("{HEADER}{body}")
    }

    #[test]
    fn the_examples_are_valid() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml" || e == "json") {
                Flow::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2);
    }

    #[test]
    fn a_full_step_parses() {
        let flow = parse(&steps(
            r#"
            [[step]]
            id = "a"
            plugin = "csv"
            [[step]]
            id = "b"
            plugin = "jq@0.1.0"
            needs = ["a"]
            config = { filter = "." }
            input = { rows = "${steps.a.output}" }
            timeout_ms = 250
            "#,
        ))
        .unwrap();
        let b = &flow.steps[1];
        assert_eq!(b.plugin, PluginRef { name: "jq".into(), version: Some("0.1.0".into()) });
        assert_eq!(b.deps, vec![0]);
        assert_eq!(b.config["filter"], ".");
        assert_eq!(b.timeout, Some(Duration::from_millis(250)));
        assert!(b.input.is_some());
    }

    #[test]
    fn json_flows_parse_too() {
        let json = r#"{"flow": {"name": "j"}, "steps": [{"id": "a", "plugin": "identity"}]}"#;
        let flow = Flow::parse(json, Format::Json, "x.json", Path::new(".")).unwrap();
        assert_eq!(flow.steps[0].id, "a");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let message = problems("[flow]\nname = \"t\"\n[[step]]\nid = \"a\"\nplugin = \n")
            .remove(0)
            .to_string();
        assert!(message.contains("line 5"), "{message}");
        let message = problems(
            "[flow]\nname = \"t\"\n[[step]]\nid = \"a\"\nplugin = \"x\"\nneed = [\"b\"]\n",
        )
        .remove(0)
        .to_string();
        assert!(
            message.contains("unknown field `need`") && message.contains("line 6"),
            "{message}"
        );
    }

    #[test]
    fn duplicate_and_malformed_ids() {
        let found = problems(&steps(
            "[[step]]\nid = \"a\"\nplugin = \"x\"\n[[step]]\nid = \"a\"\nplugin = \"x\"\n\
             [[step]]\nid = \"b.c\"\nplugin = \"x\"\n",
        ));
        assert!(
            found.contains(&Problem::DuplicateId { what: "step", id: "a".into() }),
            "{found:?}"
        );
        assert!(found.contains(&Problem::BadId { what: "step", id: "b.c".into() }), "{found:?}");
    }

    #[test]
    fn an_unknown_dependency_lists_the_steps_there_are() {
        let found = problems(&steps(
            "[[step]]\nid = \"orders\"\nplugin = \"x\"\n\
             [[step]]\nid = \"totals\"\nplugin = \"x\"\nneeds = [\"order\"]\n",
        ));
        assert_eq!(
            found[0].to_string(),
            "step `totals`: needs `order`, which is not a step of this flow (steps: orders, totals)"
        );
    }

    #[test]
    fn a_cycle_names_its_steps_in_order() {
        let found = problems(&steps(
            "[[step]]\nid = \"a\"\nplugin = \"x\"\nneeds = [\"c\"]\n\
             [[step]]\nid = \"b\"\nplugin = \"x\"\nneeds = [\"a\"]\n\
             [[step]]\nid = \"c\"\nplugin = \"x\"\nneeds = [\"b\"]\n\
             [[step]]\nid = \"free\"\nplugin = \"x\"\n\
             [[step]]\nid = \"me\"\nplugin = \"x\"\nneeds = [\"me\"]\n",
        ));
        assert_eq!(
            found,
            vec![
                Problem::Cycle(vec!["a".into(), "b".into(), "c".into()]),
                Problem::Cycle(vec!["me".into()]),
            ]
        );
        assert_eq!(
            found[0].to_string(),
            "the steps `a` -> `b` -> `c` depend on each other in a cycle"
        );
    }

    #[test]
    fn config_must_be_a_table() {
        let found = problems(&steps("[[step]]\nid = \"a\"\nplugin = \"x\"\nconfig = [1, 2]\n"));
        assert_eq!(
            found[0].to_string(),
            "step `a`: `config` must be a table (a JSON object), not an array"
        );
    }

    #[test]
    fn references_must_parse_and_name_a_needed_step() {
        let found = problems(&steps(
            "[[step]]\nid = \"a\"\nplugin = \"x\"\n\
             [[step]]\nid = \"b\"\nplugin = \"x\"\ninput = \"${steps.a.output}\"\n\
             [[step]]\nid = \"c\"\nplugin = \"x\"\nneeds = [\"a\"]\ninput = \"${steps.a}\"\n",
        ));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0]
                .to_string()
                .starts_with("step `b`: input `${steps.a.output}` refers to step `a`")
        );
        assert!(found[1].to_string().contains("write `${steps.a.output}`"), "{}", found[1]);
    }

    #[test]
    fn plugin_references_and_mounts_are_checked() {
        let found = problems(&steps(
            "[[step]]\nid = \"a\"\nplugin = \"jq@\"\n\
             [[loader]]\nid = \"d\"\nplugin = \"file-loader\"\ndirs = { \"rel\" = \".\", \"/x\" = \"no/such/dir\" }\n",
        ));
        assert!(
            matches!(&found[0], Problem::BadPluginRef { plugin, .. } if plugin == "jq@"),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| matches!(p, Problem::BadMount { guest, .. } if guest == "rel"))
        );
        assert!(found.iter().any(
            |p| matches!(p, Problem::BadMount { reason, .. } if reason == "no such directory on the host")
        ));
    }

    #[test]
    fn numbers_that_would_wrap_are_refused_naming_the_field() {
        let found = problems(
            "[flow]\nname = \"t\"\nmax_parallel = 0\ntimeout_ms = 18446744073709551615\n\
             [[step]]\nid = \"a\"\nplugin = \"x\"\nmax_memory_mb = 17592186044416\n\
             retry = { max_attempts = 0 }\npool = { min = 1000000, reuse = 0 }\n\
             [[step]]\nid = \"b\"\nplugin = \"x\"\nmax_memory_mb = 17592186044480\n",
        );
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        for expected in [
            "flow.max_parallel = 0 is out of range: it must be 1 ..= 1000000 (steps)",
            "flow.timeout_ms = 18446744073709551615 is out of range",
            "step `a`: max_memory_mb = 17592186044416 is out of range: it must be 1 ..= 4096 (MiB)",
            "step `a`: retry.max_attempts = 0 is out of range",
            "step `a`: pool.min = 1000000 is out of range",
            "step `a`: pool.reuse = 0 is out of range",
            // 2^44 + 64 MiB once became 64 MiB.
            "step `b`: max_memory_mb = 17592186044480 is out of range",
        ] {
            assert!(text.iter().any(|t| t.starts_with(expected)), "{expected}\n{text:#?}");
        }
        assert_eq!(text.len(), 7, "{text:#?}");
    }

    #[test]
    fn a_flow_over_the_limits_is_refused_before_it_is_checked() {
        let limits = FlowLimits { max_steps: 3, max_edges: 2, ..FlowLimits::default() };
        let parse = |text: &str| {
            Flow::parse_with(text, Format::Toml, "big.toml", Path::new("."), &limits).unwrap_err()
        };
        let four = steps(&"[[step]]\nid = \"a\"\nplugin = \"x\"\n".repeat(4));
        assert_eq!(
            parse(&four).problems,
            [Problem::TooLarge { what: "4 steps and loaders, over the limit of 3".into() }]
        );
        let edges = steps(
            "[[step]]\nid = \"a\"\nplugin = \"x\"\n\
             [[step]]\nid = \"b\"\nplugin = \"x\"\nneeds = [\"a\", \"a\", \"a\"]\n",
        );
        let err = parse(&edges);
        assert_eq!(
            err.to_string(),
            "big.toml: the flow is too large: 3 needs and resources in all, over the limit of 2 (raise the limit if it is meant to be)"
        );
        let bytes = FlowLimits { max_bytes: 10, ..limits };
        let err = Flow::parse_with(&four, Format::Toml, "big.toml", Path::new("."), &bytes);
        assert!(err.unwrap_err().to_string().contains("over the limit of 10"));
    }

    #[test]
    fn a_file_is_read_no_further_than_its_limit() {
        let err = read_text(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("larger than the limit of 1048576 bytes"), "{err}");
        let err =
            Flow::load_with("/dev/zero", &FlowLimits { max_bytes: 4096, ..FlowLimits::default() })
                .unwrap_err();
        assert_eq!(err.origin, "/dev/zero");
        assert!(matches!(&err.problems[0], Problem::Read(m) if m.contains("limit of 4096")));
    }

    #[test]
    fn problems_past_a_hundred_are_counted() {
        let needs: Vec<String> = (0..150).map(|i| format!("\"missing{i}\"")).collect();
        let found = problems(&steps(&format!(
            "[[step]]\nid = \"a\"\nplugin = \"x\"\nneeds = [{}]\n",
            needs.join(", ")
        )));
        assert_eq!(found.len(), 101);
        assert_eq!(found[100], Problem::More(50));
    }

    #[test]
    fn a_dense_flow_has_every_implied_need_found() {
        // 250 steps, each needing every earlier one: all but the last need of
        // each step is implied by it.
        let mut text = String::from(HEADER);
        for i in 0..250 {
            let needs: Vec<String> = (0..i).map(|j| format!("\"s{j}\"")).collect();
            text += &format!(
                "[[step]]\nid = \"s{i}\"\nplugin = \"x\"\nneeds = [{}]\n",
                needs.join(",")
            );
        }
        let flow = parse(&text).unwrap();
        let plan = crate::model::Plan::new(&flow);
        assert_eq!(plan.redundant.len(), 249 * 248 / 2);
        assert_eq!(plan.groups.len(), 250);
        let last = plan.redundant.iter().find(|r| r.step == "s249" && r.needs == "s0").unwrap();
        // The first need (in the step's own order) that implies it.
        assert_eq!(last.implied_by, "s1");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = parse(&steps(
            "[[step]]\nid = \"a\"\nplugin = \"x\"\nneeds = [\"nope\"]\nconfig = 3\n\
             [[step]]\nid = \"a\"\nplugin = \"x\"\n",
        ))
        .unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        assert!(err.to_string().starts_with("flows/test.toml: 3 problems\n  "), "{err}");
    }
}

/// Fuzzing the parser and validator: whatever the text, parsing returns a
/// flow or problems, never a panic; and every flow it accepts can be
/// planned. Failing cases proptest finds are kept in
/// `proptest-regressions/flow.txt` and replayed first on every run.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::{
        ProptestConfig, Strategy, prop, prop_assert, prop_assert_eq, proptest,
    };

    use super::{Flow, Format, Path};
    use crate::model::Plan;

    /// Flows built from pieces that often collide: few ids, needs among
    /// them (cycles included), references good and bad, odd configs.
    fn flow_text() -> impl Strategy<Value = String> {
        let id = prop::sample::select(vec!["a", "b", "c", "d", "a.b", "", "é"]);
        let input = prop::sample::select(vec![
            "",
            "input = \"${input}\"",
            "input = \"${steps.a.output.x}\"",
            "input = \"${steps.b}\"",
            "input = { v = \"x ${input.y} $${z}\" }",
            "input = \"${\"",
        ]);
        let config =
            prop::sample::select(vec!["", "config = {}", "config = [1]", "config = { a = 1 }"]);
        let extra = prop::sample::select(vec![
            "",
            "timeout_ms = 10",
            "retry = { max_attempts = 0 }",
            "strategy = \"continue-on-error\"",
            "resources = [\"db\"]",
            "dirs = { \"/x\" = \".\" }",
            "dirs = { \"x\" = \"nope\" }",
            "pool = { min = 0, reuse = 2 }",
            "max_memory_mb = 1",
        ]);
        let step = (id.clone(), prop::collection::vec(id, 0..3), input, config, extra).prop_map(
            |(id, needs, input, config, extra)| {
                format!(
                    "[[step]]\nid = {id:?}\nplugin = \"p\"\nneeds = {needs:?}\n{input}\n{config}\n{extra}\n"
                )
            },
        );
        (
            prop::collection::vec(step, 0..6),
            prop::sample::select(vec!["", "max_parallel = 0", "strategy = \"retry-failed\""]),
        )
            .prop_map(|(steps, header)| {
                format!("[flow]\nname = \"f\"\n{header}\n{}", steps.concat())
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn any_text_parses_or_reports_problems(text in "\\PC{0,300}") {
            for format in [Format::Toml, Format::Json] {
                if let Err(e) = Flow::parse(&text, format, "fuzz", Path::new(".")) {
                    prop_assert!(!e.problems.is_empty());
                }
            }
        }

        #[test]
        fn any_flow_shaped_text_is_valid_and_plannable_or_rejected(text in flow_text()) {
            match Flow::parse(&text, Format::Toml, "fuzz", Path::new(".")) {
                Ok(flow) => {
                    let plan = Plan::new(&flow);
                    prop_assert_eq!(plan.order.len(), flow.steps.len());
                    let groups: usize = plan.groups.iter().map(Vec::len).sum();
                    prop_assert_eq!(groups, flow.steps.len());
                }
                Err(e) => prop_assert!(!e.problems.is_empty()),
            }
        }
    }
}
