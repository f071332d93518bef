//! The run store's contract: what is kept of every run, and the trait a
//! backend implements (embedded SQLite now, PostgreSQL for many workers
//! later). Plain data and a trait — no database here.

use std::fmt;
use std::str::FromStr;

use std::collections::HashMap;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::event::Event;
use super::report::{RunStatus, RunSummary};

/// Where a run stands, as the store knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RunState {
    /// Started, not finished.
    Running,
    /// Every step succeeded.
    Succeeded,
    /// A step failed.
    Failed,
    /// It was cancelled.
    Cancelled,
    /// The process running it ended before it did.
    Interrupted,
}

impl RunState {
    /// The name used in the store, the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<RunStatus> for RunState {
    fn from(status: RunStatus) -> RunState {
        match status {
            RunStatus::Succeeded => RunState::Succeeded,
            RunStatus::Failed => RunState::Failed,
            RunStatus::Cancelled => RunState::Cancelled,
        }
    }
}

/// A state name that is none of [`RunState`]'s.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown run state {given:?}: expected running, succeeded, failed, cancelled or interrupted"
)]
pub struct ParseStateError {
    /// The name as given.
    pub given: String,
}

impl FromStr for RunState {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<RunState, ParseStateError> {
        Ok(match s {
            "running" => RunState::Running,
            "succeeded" => RunState::Succeeded,
            "failed" => RunState::Failed,
            "cancelled" => RunState::Cancelled,
            "interrupted" => RunState::Interrupted,
            _ => return Err(ParseStateError { given: s.to_owned() }),
        })
    }
}

/// A run as it starts: what it takes to show it, and to run it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStart {
    /// The run's id.
    pub run_id: String,
    /// The flow's name (its id).
    pub flow: String,
    /// The flow's text, as it was run.
    pub flow_text: String,
    /// Where the flow came from (its file), for messages and for `rerun`,
    /// whose relative paths are resolved against it.
    pub flow_origin: String,
    /// The xxh3 of the flow's text, in hex: runs of the same text share it.
    pub flow_hash: String,
    /// The run's input.
    pub input: Value,
    /// When it started, in ms since the Unix epoch.
    pub started_at_ms: i64,
}

/// One run, as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunRecord {
    /// The run's id.
    pub run_id: String,
    /// The flow's name.
    pub flow: String,
    /// The xxh3 of the flow's text, in hex.
    pub flow_hash: String,
    /// Where it stands.
    pub status: RunState,
    /// When it started, in ms since the Unix epoch.
    pub started_at_ms: i64,
    /// When it ended, in ms since the Unix epoch.
    pub ended_at_ms: Option<i64>,
    /// Its input.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub input: Value,
    /// Its summary, once it finished; step outputs over the store's size
    /// limit are kept as `{"sha256", "bytes"}` instead.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub summary: Option<RunSummary>,
}

/// Which runs to list: newest first, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunQuery {
    /// Only this flow's.
    pub flow: Option<String>,
    /// Only runs in this state.
    pub status: Option<RunState>,
    /// Only runs that started before this run did (the previous page ends
    /// there).
    pub before: Option<String>,
    /// At most this many.
    pub limit: u32,
}

impl RunQuery {
    /// The newest `limit` runs of every flow.
    pub fn newest(limit: u32) -> RunQuery {
        RunQuery { limit, ..RunQuery::default() }
    }

    /// Only the runs of `flow`.
    pub fn flow(mut self, flow: impl Into<String>) -> RunQuery {
        self.flow = Some(flow.into());
        self
    }

    /// Only the runs in `status`.
    pub fn status(mut self, status: RunState) -> RunQuery {
        self.status = Some(status);
        self
    }

    /// Only the runs that started before `run_id`.
    pub fn before(mut self, run_id: impl Into<String>) -> RunQuery {
        self.before = Some(run_id.into());
        self
    }
}

/// What the writer hands a store, many at once.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreWrite {
    /// A run started.
    Started(RunStart),
    /// A run ended, at `ended_at_ms`.
    Finished {
        /// Its summary.
        summary: Box<RunSummary>,
        /// When, in ms since the Unix epoch.
        ended_at_ms: i64,
    },
    /// Events, in the order they were sent: a run's, written with its end,
    /// or the host's own (plugins, caches, the optimizer).
    Events(Vec<Event>),
    /// The metrics document at `at_ms`: the dashboard's time series.
    Metrics {
        /// When, in ms since the Unix epoch.
        at_ms: i64,
        /// The document (`OptimizationMetrics`, as JSON).
        document: Value,
    },
    /// A flow's steps' recent durations (moving averages, in ms): what
    /// the critical path is estimated from.
    Durations {
        /// The flow.
        flow: String,
        /// Each step's average.
        steps: Vec<(String, f64)>,
    },
    /// How often each plugin and asset was used (`plugin:NAME`,
    /// `asset:KEY`), in all: what a host preloads.
    Uses(Vec<(String, u64)>),
}

/// How long runs are kept: the newest `keep_runs`, none older than
/// `keep_days`. A run still running is never removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Retention {
    /// At most this many runs.
    pub keep_runs: Option<u64>,
    /// None that started more than this many days ago.
    pub keep_days: Option<u64>,
}

impl Retention {
    /// Keep everything.
    pub fn forever() -> Retention {
        Retention::default()
    }

    /// At most `runs` runs.
    pub fn keep_runs(mut self, runs: u64) -> Retention {
        self.keep_runs = Some(runs);
        self
    }

    /// None older than `days`.
    pub fn keep_days(mut self, days: u64) -> Retention {
        self.keep_days = Some(days);
        self
    }
}

/// A metrics document as it was at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsSnapshot {
    /// When, in ms since the Unix epoch.
    pub at_ms: i64,
    /// The document.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub document: Value,
}

/// Why the store failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened or migrated; `path` says which.
    #[error("cannot open the run store {path}: {message}")]
    Open {
        /// The database file (or URL).
        path: String,
        /// What the database said.
        message: String,
    },
    /// A read or write failed.
    #[error("the run store failed: {0}")]
    Database(String),
    /// A record could not be read back.
    #[error("the run store holds a record it cannot read ({0})")]
    Corrupt(String),
}

/// A place runs are kept. Writes come in batches from one writer task, so
/// a backend may make each batch one transaction.
pub trait RunStore: Send + Sync + 'static {
    /// Writes `batch`, in order, all or nothing.
    fn write(&self, batch: Vec<StoreWrite>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The run `run_id`, if the store has it.
    fn run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Option<RunRecord>, StoreError>>;

    /// The runs `query` asks for, newest first.
    fn runs(&self, query: RunQuery) -> BoxFuture<'_, Result<Vec<RunRecord>, StoreError>>;

    /// The text and origin of the flow run `run_id` ran, to run it again.
    fn flow_of<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<(String, String)>, StoreError>>;

    /// The events of the run `run_id`, in order.
    fn events<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Vec<Event>, StoreError>>;

    /// The metrics snapshots taken since `since_ms`, oldest first, at most
    /// `limit` (the newest of them, if there are more).
    fn metrics(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<MetricsSnapshot>, StoreError>>;

    /// The newest `limit` events that belong to no run (plugins, caches,
    /// the optimizer) whose type starts with `prefix`, oldest first.
    fn host_events<'a>(
        &'a self,
        prefix: &'a str,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>>;

    /// Every flow's steps' recent durations: flow → step → ms.
    fn durations(&self) -> BoxFuture<'_, Result<Durations, StoreError>>;

    /// How often each plugin and asset was used.
    fn uses(&self) -> BoxFuture<'_, Result<HashMap<String, u64>, StoreError>>;

    /// Removes what `retention` no longer keeps (runs, their events, old
    /// snapshots) and gives the space back; how many runs it removed.
    fn prune(&self, retention: Retention) -> BoxFuture<'_, Result<u64, StoreError>>;
}

/// Every flow's steps' recent durations: flow → step → ms.
pub type Durations = HashMap<String, HashMap<String, f64>>;
