//! What every test shares: the bundled plugins and the hostile ones, built
//! once per process, and hosts on them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qflow::{Flow, Format, Host, HostConfig, RunSummary};
use serde_json::Value;

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Builds a plugin workspace into `out`, emptied first so that no component
/// of an earlier version of the repository lingers there.
fn build(workspace: &str, out: &Path) {
    let _ = std::fs::remove_dir_all(out);
    let options = qflow_plugin_build::Options::default();
    if let Err(e) = qflow_plugin_build::build(&repo().join(workspace), out, &options) {
        panic!("building {workspace} failed: {e}");
    }
}

/// A plugins directory holding every bundled plugin, built from `plugins/`
/// on first use (cargo rebuilds only what changed since the last time).
pub fn plugins_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugins");
        build("plugins", &out);
        out
    })
}

/// The bundled plugins plus the hostile ones from `plugins/hostile`.
pub fn hostile_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-plugins");
        build("plugins/hostile", &out);
        for entry in std::fs::read_dir(plugins_dir()).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, out.join(path.file_name().unwrap())).unwrap();
        }
        out
    })
}

/// A host's settings for tests: compiled code in memory only (unless a test
/// gives a cache directory), nothing preloaded behind the test's back.
pub fn config(plugins: &Path, cache_dir: Option<&Path>) -> HostConfig {
    let mut config = HostConfig::new(plugins);
    config.store.cache_dir = cache_dir.map(Path::to_path_buf);
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
