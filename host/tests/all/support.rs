//! What every test shares: the bundled plugins and the hostile ones (built
//! once per process by `qflow-tests`), and hosts on them.

use std::path::Path;

use std::time::Duration;

use qflow::{Event, EventData, Flow, Format, Host, HostConfig, RunSummary};
use serde_json::Value;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;

pub use qflow_tests::{hostile_dir, plugins_dir, repo};

/// A host's settings for tests: compiled code in memory only (unless a test
/// gives a cache directory), nothing preloaded behind the test's back.
pub fn config(plugins: &Path, cache_dir: Option<&Path>) -> HostConfig {
    let mut config = HostConfig::new(plugins);
    config.cache.dir = cache_dir.map(Path::to_path_buf);
    config.preload = false;
    config
}

/// A host on the bundled plugins.
pub fn host() -> Host {
    Host::new(config(plugins_dir(), None)).expect("the host starts")
}

/// A host on the bundled and the hostile plugins.
pub fn hostile_host() -> Host {
    Host::new(config(hostile_dir(), None)).expect("the host starts")
}

/// Waits (a generous minute at most) until the steps `ids` of some run have
/// all started, as their events say: a test acts while steps run without
/// guessing how long the machine takes to get there.
pub async fn started(events: &mut Receiver<Event>, ids: &[&str]) {
    let mut waiting: Vec<&str> = ids.to_vec();
    let wait = async {
        while !waiting.is_empty() {
            match events.recv().await.map(|event| event.data) {
                Ok(EventData::StepStarted { step, .. }) => waiting.retain(|id| *id != &*step),
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => panic!("the host is gone"),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), wait).await.is_err() {
        panic!("steps {ids:?} did not all start within a minute");
    }
}

pub fn flow(toml: &str) -> Flow {
    Flow::parse(toml, Format::Toml, "<test>", repo()).unwrap_or_else(|e| panic!("{e}"))
}

pub async fn run(host: &Host, toml: &str, input: Value) -> RunSummary {
    host.run(&flow(toml), input).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts that each step started only after every step it needs had ended.
pub fn assert_dependencies_respected(flow: &Flow, summary: &RunSummary) {
    for step in &flow.steps {
        let start = summary.step(&step.id).and_then(|s| s.start_ms).expect("the step ran");
        for need in &step.needs {
            let end = summary.step(need).and_then(|s| s.end_ms).expect("the dependency ran");
            assert!(
                start >= end,
                "`{}` started at {start} ms, before `{need}` ended at {end} ms",
                step.id
            );
        }
    }
}
