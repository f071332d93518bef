//! The optimizer against real runs: what its conservative level rewrites
//! must compute exactly what the original flow computed.

use std::path::{Path, PathBuf};

use qflow::model::optimize::{History, Level, PluginFigures, PoolFigures, optimize};
use qflow::{Flow, Host, PoolStats, RunStatus, RunSummary};
use serde_json::{Value, json};

use crate::support::{assert_dependencies_respected, flow, host, repo};

/// The shipped examples copied into `dir`, the web server they fetch from
/// (`127.0.0.1:8089`) replaced by `server`: the runs write their databases
/// there rather than into the repository.
fn examples_in(dir: &Path, server: &qflow_tests::HttpServer) -> Vec<PathBuf> {
    let (from, data) = (repo().join("examples"), dir.join("data"));
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(from.join("data")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e != "db") {
            std::fs::copy(&path, data.join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let copy = dir.join(path.file_name().unwrap());
            std::fs::write(&copy, text.replace("8089", &server.port.to_string())).unwrap();
            paths.push(copy);
        }
    }
    paths.sort();
    paths
}

/// What an example needs as input: `fan-out` passes `${input.label}` on.
fn input_for(flow: &Flow) -> Value {
    match flow.name.as_str() {
        "fan-out" => json!({"label": "optimized"}),
        _ => json!(null),
    }
}

async fn run(host: &Host, flow: &Flow, input: &Value) -> RunSummary {
    let summary = host.run(flow, input.clone()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.status, RunStatus::Succeeded, "{}: {summary:#?}", flow.origin);
    summary
}

/// Every step of `after` produced what it produced in `before`.
fn assert_same_outputs(flow: &Flow, before: &RunSummary, after: &RunSummary) {
    assert_eq!(before.steps.len(), after.steps.len());
    for step in &flow.steps {
        let (old, new) = (before.output(&step.id), after.output(&step.id));
        assert!(old.is_some(), "{}: step `{}` has no output", flow.origin, step.id);
        assert_eq!(old, new, "{}: step `{}` computed something else", flow.origin, step.id);
    }
}

/// A history in which every step plugin of the flow is hot and its pool
/// made calls wait, so that the conservative level has pools to grow.
fn contended(flow: &Flow, run: RunSummary) -> History {
    let mut plugins: Vec<&str> = flow.steps.iter().map(|s| s.plugin.name.as_str()).collect();
    plugins.sort_unstable();
    plugins.dedup();
    let slow = PoolStats { acquisitions: 100, acquire_p99_us: 5_000.0, ..PoolStats::default() };
    History {
        runs: vec![run],
        pools: plugins
            .iter()
            .map(|p| PoolFigures { plugin: (*p).into(), stats: slow, min: 1, max: 64, reuse: 1 })
            .collect(),
        plugins: plugins
            .iter()
            .map(|p| PluginFigures {
                name: (*p).into(),
                uses: 100,
                compiles: 0,
                disk_hits: 1,
                preloaded: true,
            })
            .collect(),
        disk_cache: true,
        ..History::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn conservative_optimization_keeps_every_example_output() {
    let host = host();
    let (server, dir) = (qflow_tests::HttpServer::start(), tempfile::tempdir().unwrap());
    let paths = examples_in(dir.path(), &server);
    assert!(paths.len() >= 3, "{paths:?}");
    for path in &paths {
        let example = Path::new("examples").join(path.file_name().unwrap());
        let flow = Flow::load(path).unwrap_or_else(|e| panic!("{e}"));
        let input = input_for(&flow);
        let original = run(&host, &flow, &input).await;

        let history = History { runs: vec![original.clone()], ..History::default() };
        let optimized = optimize(&flow, Level::Conservative, &history).unwrap();
        let rerun = run(&host, &optimized.flow, &input).await;
        assert_same_outputs(&flow, &original, &rerun);

        // With pools to grow, the flow does change, and still computes the same.
        let optimized =
            optimize(&flow, Level::Conservative, &contended(&flow, original.clone())).unwrap();
        assert!(!optimized.is_unchanged(), "{}: nothing changed", example.display());
        assert!(
            optimized.flow.steps.iter().all(|s| s.pool.min.is_some_and(|min| min >= 2)),
            "{}: {:#?}",
            example.display(),
            optimized.changes
        );
        let rerun = run(&host, &optimized.flow, &input).await;
        assert_same_outputs(&flow, &original, &rerun);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_redundant_need_changes_neither_order_nor_outputs() {
    let host = host();
    let original_flow = flow(
        r#"
        [flow]
        name = "redundant"
        [[step]]
        id = "a"
        plugin = "identity"
        input = { n = 1 }
        [[step]]
        id = "b"
        plugin = "identity"
        needs = ["a"]
        input = { from_a = "${steps.a.output.n}" }
        [[step]]
        id = "c"
        plugin = "identity"
        needs = ["a", "b"]
        input = { from_b = "${steps.b.output}", label = "${input.label}" }
        "#,
    );
    let input = json!({"label": "x"});
    let original = run(&host, &original_flow, &input).await;
    let history = History { runs: vec![original.clone()], ..History::default() };
    let optimized = optimize(&original_flow, Level::Conservative, &history).unwrap();
    let c = &optimized.flow.steps[2];
    assert_eq!(c.needs, vec!["b"], "{}", optimized.text);
    let rerun = run(&host, &optimized.flow, &input).await;
    assert_same_outputs(&original_flow, &original, &rerun);
    assert_eq!(rerun.output("c"), Some(json!({"from_b": {"from_a": 1}, "label": "x"})));
    // `c` still starts after `a` ends: through `b`.
    assert_dependencies_respected(&original_flow, &rerun);
}
