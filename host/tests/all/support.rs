//! What every test shares: the bundled plugins, built once per process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qflow::{Flow, Format, Host, HostConfig, RunSummary};
use serde_json::Value;

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A plugins directory holding every bundled plugin, built from `plugins/`
/// on first use (cargo rebuilds only what changed since the last time).
pub fn plugins_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugins");
        let options = qflow_plugin_build::Options::default();
        if let Err(e) = qflow_plugin_build::build(&repo().join("plugins"), &out, &options) {
            panic!("building the bundled plugins failed: {e}");
        }
        out
    })
}

pub fn host() -> Host {
    Host::new(HostConfig::new(plugins_dir())).expect("the host starts")
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
