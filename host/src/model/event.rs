//! What runs and the plugins directory tell their observers as they go, as
//! CloudEvents 1.0 (JSON format): the seam for progress bars, the server's
//! event stream, the run store and metrics.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::{broadcast, mpsc};

use super::report::{RunStatus, StepStatus};

/// Something that happened, as a CloudEvent: `id`, `source`, `type`, `time`
/// and `data`, plus `sequence`, its place among the events of the same
/// source (a run's events count 1, 2, 3 …).
///
/// Events go out on a broadcast channel ([`Host::subscribe`](crate::Host::subscribe));
/// a slow subscriber misses events rather than slowing the run, and is told
/// how many it missed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Always `1.0`.
    pub specversion: SpecVersion,
    /// Unique per event (a UUID).
    pub id: String,
    /// What it happened to: `/qflow/runs/<run id>` or `/qflow/plugins`.
    pub source: Arc<str>,
    /// When, to the microsecond (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub time: SystemTime,
    /// Its place among its source's events, from 1.
    pub sequence: u64,
    /// Its `type` and `data`.
    #[serde(flatten)]
    pub data: EventData,
}

/// The CloudEvents version these events follow: `1.0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecVersion;

impl Serialize for SpecVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("1.0")
    }
}

impl<'de> Deserialize<'de> for SpecVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SpecVersion, D::Error> {
        let version = String::deserialize(d)?;
        if version == "1.0" {
            Ok(SpecVersion)
        } else {
            Err(serde::de::Error::custom(format!("unsupported specversion {version:?}")))
        }
    }
}

fn rfc3339<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*time))
}

fn from_rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
}

/// What happened: the event's `type` and its `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
#[non_exhaustive]
pub enum EventData {
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
    /// A run whose steps overlapped in time ended: what parallel execution
    /// gave it.
    #[serde(rename = "q.qflow.optimization.parallel.completed.v1")]
    ParallelCompleted {
        /// The run.
        run_id: Arc<str>,
        /// The flow's name.
        flow: Arc<str>,
        /// The run's efficiency (see the run summary).
        efficiency: f64,
        /// The sum of the steps' times, in ms.
        step_ms: f64,
        /// Its wall time, in ms.
        wall_ms: f64,
        /// At most this many steps ran at once.
        max_parallel: usize,
    },
    /// Every step of one parallel group of the plan finished.
    #[serde(rename = "q.qflow.optimization.group.completed.v1")]
    GroupCompleted {
        /// The run.
        run_id: Arc<str>,
        /// The group's index in the plan (0: the steps that need nothing).
        group: usize,
        /// Its steps.
        steps: Vec<String>,
        /// When its last step ended, in ms since the run began.
        at_ms: f64,
    },
    /// A run got a plugin's compiled component: from memory, from the
    /// precompiled disk cache, or compiled.
    #[serde(rename = "q.qflow.optimization.lazy.loaded.v1")]
    LazyLoaded {
        /// The run.
        run_id: Arc<str>,
        /// The plugin.
        plugin: Arc<str>,
        /// `memory`, `disk` or `compile`.
        source: String,
        /// How long getting it took, in ms.
        ms: f64,
    },
    /// Entries left a cache to keep it under its memory limit.
    #[serde(rename = "q.qflow.optimization.cache.evicted.v1")]
    CacheEvicted {
        /// `components` or `assets`.
        cache: String,
        /// What left: component digests (hex) or asset names.
        entries: Vec<String>,
        /// Why.
        reason: String,
        /// Bytes freed.
        bytes_freed: u64,
    },
    /// A flow was optimized (and perhaps written back).
    #[serde(rename = "q.qflow.optimization.flow.optimized.v1")]
    FlowOptimized {
        /// The flow's name.
        flow: Arc<str>,
        /// The level.
        level: String,
        /// What changed, one line each.
        changes: Vec<String>,
    },
}

impl EventData {
    /// The event's CloudEvents `type`, such as `q.qflow.run.started.v1`.
    pub fn kind(&self) -> &'static str {
        match self {
            EventData::RunStarted { .. } => "q.qflow.run.started.v1",
            EventData::StepStarted { .. } => "q.qflow.step.started.v1",
            EventData::StepRetrying { .. } => "q.qflow.step.retrying.v1",
            EventData::StepFinished { .. } => "q.qflow.step.finished.v1",
            EventData::RunFinished { .. } => "q.qflow.run.finished.v1",
            EventData::PluginAdded { .. } => "q.qflow.plugin.added.v1",
            EventData::PluginReloaded { .. } => "q.qflow.plugin.reloaded.v1",
            EventData::PluginReloadFailed { .. } => "q.qflow.plugin.reload-failed.v1",
            EventData::PluginRemoved { .. } => "q.qflow.plugin.removed.v1",
            EventData::FlowOptimized { .. } => "q.qflow.optimization.flow.optimized.v1",
            EventData::ParallelCompleted { .. } => "q.qflow.optimization.parallel.completed.v1",
            EventData::GroupCompleted { .. } => "q.qflow.optimization.group.completed.v1",
            EventData::LazyLoaded { .. } => "q.qflow.optimization.lazy.loaded.v1",
            EventData::CacheEvicted { .. } => "q.qflow.optimization.cache.evicted.v1",
        }
    }

    /// The run it belongs to, if any.
    pub fn run_id(&self) -> Option<&str> {
        match self {
            EventData::RunStarted { run_id, .. }
            | EventData::StepStarted { run_id, .. }
            | EventData::StepRetrying { run_id, .. }
            | EventData::StepFinished { run_id, .. }
            | EventData::RunFinished { run_id, .. }
            | EventData::ParallelCompleted { run_id, .. }
            | EventData::GroupCompleted { run_id, .. }
            | EventData::LazyLoaded { run_id, .. } => Some(run_id),
            _ => None,
        }
    }
}

/// How many events a slow subscriber may fall behind before it misses some.
const EVENT_BUFFER: usize = 4096;

/// The host's event channel.
#[derive(Clone)]
pub(crate) struct EventBus {
    shared: Arc<Outlets>,
}

/// Where events go.
#[derive(Default)]
struct Outlets {
    /// Made by the first subscriber: a process that runs one flow and
    /// listens to nothing never allocates the buffer.
    broadcast: OnceLock<broadcast::Sender<Event>>,
    /// Every event not recorded with its run, for the run store: the
    /// host's own events are few (plugins, caches, the optimizer), so this
    /// channel loses none and never makes an emitter wait.
    sink: OnceLock<mpsc::UnboundedSender<Event>>,
}

/// The events a run's emitter has recorded, in the order they were sent.
pub(crate) type Recorded = Arc<std::sync::Mutex<Vec<Event>>>;

impl EventBus {
    pub(crate) fn new() -> EventBus {
        EventBus { shared: Arc::default() }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.broadcast.get_or_init(|| broadcast::channel(EVENT_BUFFER).0).subscribe()
    }

    /// From now on, every event that is not recorded with its run goes to
    /// `sink` too (set once).
    pub(crate) fn set_sink(&self, sink: mpsc::UnboundedSender<Event>) {
        let _ = self.shared.sink.set(sink);
    }

    /// What emits the events of `source`, numbering them from 1.
    pub(crate) fn emitter(&self, source: String) -> Emitter {
        Emitter {
            outlets: self.shared.clone(),
            source: Arc::from(source),
            sequence: Arc::default(),
            record: None,
        }
    }

    /// [`EventBus::emitter`] that also keeps every event it sends, to be
    /// stored with the run it belongs to.
    pub(crate) fn recording_emitter(&self, source: String) -> (Emitter, Recorded) {
        let recorded = Recorded::default();
        let emitter = Emitter { record: Some(recorded.clone()), ..self.emitter(source) };
        (emitter, recorded)
    }
}

/// Stamps and sends the events of one source.
#[derive(Clone)]
pub(crate) struct Emitter {
    outlets: Arc<Outlets>,
    /// Where this emitter keeps what it sends, if it records.
    record: Option<Recorded>,
    source: Arc<str>,
    /// The last sequence number given; held while the event is sent, so
    /// that events of one source go out in the order they are numbered
    /// (steps run on several threads).
    sequence: Arc<std::sync::Mutex<u64>>,
}

impl Emitter {
    /// Sends the event `data` makes. It is made only when someone listens:
    /// most runs have no subscriber, and an event's fields (ids, step
    /// lists) would otherwise be built on every step for nobody.
    pub(crate) fn emit(&self, data: impl FnOnce() -> EventData) {
        // Nobody listening costs nothing: no id, no clock read, no data.
        let sender = self.outlets.broadcast.get().filter(|s| s.receiver_count() > 0);
        let sink = if self.record.is_none() { self.outlets.sink.get() } else { None };
        if sender.is_none() && sink.is_none() && self.record.is_none() {
            return;
        }
        let data = data();
        let id = uuid::Uuid::new_v4().to_string();
        // Nothing panics while holding the lock; recover the count if it ever did.
        let mut sequence = self.sequence.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *sequence += 1;
        let event = Event {
            specversion: SpecVersion,
            id,
            source: self.source.clone(),
            time: SystemTime::now(),
            sequence: *sequence,
            data,
        };
        if let Some(record) = &self.record {
            record.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(event.clone());
        }
        if let Some(sink) = sink {
            // The store's side ends only with the host.
            let _ = sink.send(event.clone());
        }
        // A receiver may have gone since: nobody is watching.
        if let Some(sender) = sender {
            let _ = sender.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_a_cloudevent_in_json() {
        let bus = EventBus::new();
        let mut events = bus.subscribe();
        let emitter = bus.emitter("/qflow/runs/r1".into());
        emitter.emit(|| EventData::RunStarted { run_id: "r1".into(), flow: "f".into(), steps: 2 });
        emitter.emit(|| EventData::RunFinished {
            run_id: "r1".into(),
            status: RunStatus::Succeeded,
            wall_ms: 1.5,
        });
        let (first, second) = (events.try_recv().unwrap(), events.try_recv().unwrap());
        assert_eq!((first.sequence, second.sequence), (1, 2));
        assert_ne!(first.id, second.id);
        let json = serde_json::to_value(&first).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "q.qflow.run.started.v1");
        assert_eq!(json["source"], "/qflow/runs/r1");
        assert_eq!(json["data"], serde_json::json!({"run_id": "r1", "flow": "f", "steps": 2}));
        let time = json["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.len() == "2026-01-01T00:00:00.000000Z".len(), "{time}");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!((&back.id, back.sequence, &back.data), (&first.id, first.sequence, &first.data));
        assert_eq!(first.data.kind(), "q.qflow.run.started.v1");
        assert_eq!(second.data.run_id(), Some("r1"));
    }
}
