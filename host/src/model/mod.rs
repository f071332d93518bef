//! The model: flows and their validation, plans, reports, events and the
//! figures the runtime reports. Plain data with serde — no wasmtime, no
//! scheduling — so that the optimizer, a run store and an API can use flows
//! without an engine. The layering test in `lib.rs` keeps it so.

mod check;
mod database;
mod event;
mod flow;
mod grant;
mod graph;
mod input;
mod json;
mod metrics;
pub mod optimize;
mod plan;
mod printable;
mod report;
mod settings;
mod stats;
mod store;

pub use self::database::{Database, DatabaseKind};
pub use self::event::{Event, EventData, SpecVersion};
pub use self::flow::{
    Flow, FlowError, FlowLimits, Format, LoaderSpec, Mount, PluginRef, Problem, RetryPolicy, Step,
    Strategy, read_text,
};
pub use self::grant::{HttpGrant, HttpScheme, is_internal};
pub use self::json::Json;
pub use self::metrics::{
    ExecutionOptimization, KeyedPool, LazyLoading, OptimizationMetrics, PoolSummary, ResourcePools,
    RunTotals, overlapped,
};
pub use self::plan::{Analysis, Conflict, Plan, Redundant};
pub use self::printable::{printable, printable_lines};
pub use self::report::{
    FailureKind, Keep, PlanFigures, RunStatus, RunSummary, StepFailure, StepLog, StepReport,
    StepStatus,
};
pub use self::settings::PoolSettings;
pub use self::stats::{CacheStats, ComponentStats, PoolStats, Stats};
pub use self::store::{
    Durations, MetricsSnapshot, ParseStateError, Retention, RunQuery, RunRecord, RunStart,
    RunState, RunStore, StoreError, StoreWrite,
};

pub(crate) use self::check::{LOG_BYTES, MEMORY_MB, Numbers, OUTPUT_BYTES, TIMEOUT_MS};
pub(crate) use self::event::{Emitter, EventBus};
pub(crate) use self::flow::{InstanceKey, check_database};
pub(crate) use self::input::Source;

/// An error and every cause under it, on one line: `outer: inner: root`.
/// What a user reads wherever a library error is shown as text.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their cause in their own message.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
