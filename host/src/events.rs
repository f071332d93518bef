//! What a run tells its observers as it goes: the seam for progress bars,
//! the server's event stream and metrics.

use std::sync::Arc;

use serde::Serialize;

use crate::exec::{RunStatus, StepStatus};

/// Something that happened in a run. Events go out on a broadcast channel
/// ([`Host::subscribe`](crate::Host::subscribe)); a slow subscriber misses
/// events rather than slowing the run.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum Event {
    /// A run began.
    #[serde(rename = "q.qflow.run.started.v1")]
    RunStarted {
        /// The run.
        run_id: Arc<str>,
        /// The flow's name.
        flow: Arc<str>,
        /// How many steps it has.
        steps: usize,
    },
    /// A step began its attempt.
    #[serde(rename = "q.qflow.step.started.v1")]
    StepStarted {
        /// The run.
        run_id: Arc<str>,
        /// The step's id.
        step: Arc<str>,
    },
    /// A step's attempt failed and it will be tried again after a delay.
    #[serde(rename = "q.qflow.step.retrying.v1")]
    StepRetrying {
        /// The run.
        run_id: Arc<str>,
        /// The step's id.
        step: Arc<str>,
        /// The attempt about to be made (2 for the first retry).
        attempt: u32,
        /// How long until then, in ms.
        delay_ms: u64,
        /// Why the last attempt failed.
        error: String,
    },
    /// A step ended: succeeded, failed, or was cancelled or skipped.
    #[serde(rename = "q.qflow.step.finished.v1")]
    StepFinished {
        /// The run.
        run_id: Arc<str>,
        /// The step's id.
        step: Arc<str>,
        /// How it ended.
        status: StepStatus,
    },
    /// A new plugin appeared in the plugins directory and was loaded.
    #[serde(rename = "q.qflow.plugin.added.v1")]
    PluginAdded {
        /// The plugin's name.
        plugin: Arc<str>,
        /// The version it reports.
        version: String,
    },
    /// A plugin's file changed; the new version was validated and now serves.
    #[serde(rename = "q.qflow.plugin.reloaded.v1")]
    PluginReloaded {
        /// The plugin's name.
        plugin: Arc<str>,
        /// The version it reports now.
        version: String,
    },
    /// A plugin's file changed but the new version is unusable; the old one
    /// goes on serving.
    #[serde(rename = "q.qflow.plugin.reload-failed.v1")]
    PluginReloadFailed {
        /// The plugin's name.
        plugin: Arc<str>,
        /// Why, naming the file.
        error: String,
    },
    /// A plugin's file was removed; new runs that name it fail.
    #[serde(rename = "q.qflow.plugin.removed.v1")]
    PluginRemoved {
        /// The plugin's name.
        plugin: Arc<str>,
    },
    /// A run ended.
    #[serde(rename = "q.qflow.run.finished.v1")]
    RunFinished {
        /// The run.
        run_id: Arc<str>,
        /// How it ended.
        status: RunStatus,
        /// Its wall time in milliseconds.
        wall_ms: f64,
    },
}
