//! Pre-warmed instance pools with real instances: reuse, discarding
//! trapped instances, the acquisition timeout, per-plugin settings files.

use std::path::Path;

use qflow::{Host, PoolSettings, RunStatus, StepStatus};
use serde_json::{Value, json};

use crate::support::{config, hostile_dir, hostile_host, run};

/// One step of the hostile plugin counting the calls its instance served.
fn counter_flow(pool: &str) -> String {
    format!(
        "[flow]\nname = \"count\"\n[[step]]\nid = \"c\"\nplugin = \"hostile\"\n\
         config = {{ mode = \"counter\" }}\n{pool}\n"
    )
}

async fn calls(host: &Host, toml: &str, input: Value) -> Option<u64> {
    let summary = run(host, toml, input).await;
    summary.output("c").and_then(|o| o["calls"].as_u64())
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_every_call_gets_a_fresh_instance() {
    let host = hostile_host();
    let toml = counter_flow("");
    for _ in 0..4 {
        assert_eq!(calls(&host, &toml, json!({})).await, Some(1));
    }
    let (_, stats) = host.pool_stats().into_iter().find(|(p, _)| p == "hostile").unwrap();
    assert_eq!(stats.acquisitions, 4);
    assert!(stats.creations >= 4, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reuse_serves_several_calls_and_a_trapped_instance_is_never_reused() {
    let host = hostile_host();
    let toml = counter_flow("pool = { reuse = 100, min = 0 }");
    assert_eq!(calls(&host, &toml, json!({})).await, Some(1));
    assert_eq!(calls(&host, &toml, json!({})).await, Some(2));
    assert_eq!(calls(&host, &toml, json!({})).await, Some(3));
    // This call traps: its instance (three calls old) must go.
    let summary = run(&host, &toml, json!({"trap": true})).await;
    let error = summary.step("c").unwrap().error.as_ref().unwrap();
    assert_eq!(error.kind, qflow::FailureKind::Trap);
    assert!(error.message.contains("trapping on request after 4 calls"), "{}", error.message);
    assert_eq!(calls(&host, &toml, json!({})).await, Some(1), "a fresh instance after the trap");
    assert_eq!(calls(&host, &toml, json!({})).await, Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_is_retired_after_its_reuses() {
    let host = hostile_host();
    let toml = counter_flow("pool = { reuse = 2, min = 0 }");
    let seen: Vec<Option<u64>> = {
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(calls(&host, &toml, json!({})).await);
        }
        seen
    };
    assert_eq!(seen, [Some(1), Some(2), Some(1), Some(2), Some(1)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_acquisition_timeout_fires_with_a_clear_error_when_the_pool_is_exhausted() {
    let host = hostile_host();
    let toml = r#"
        [flow]
        name = "exhausted"
        strategy = "continue-on-error"
        [[step]]
        id = "first"
        plugin = "sleep"
        config = { ms = 600 }
        pool = { max = 1, min = 0, acquire_timeout_ms = 100 }
        [[step]]
        id = "second"
        plugin = "sleep"
        config = { ms = 600 }
        pool = { max = 1, min = 0, acquire_timeout_ms = 100 }
    "#;
    let summary = run(&host, toml, json!(null)).await;
    let failed: Vec<_> = summary.steps.iter().filter(|s| s.status == StepStatus::Failed).collect();
    assert_eq!(failed.len(), 1, "{summary:#?}");
    let error = failed[0].error.as_ref().unwrap();
    assert_eq!(error.kind, qflow::FailureKind::Pool);
    assert!(error.retryable);
    assert!(
        error.message.contains("no instance came free within 100 ms: all 1 are in use"),
        "{}",
        error.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_settings_file_sets_its_pools() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(hostile_dir().join("hostile.wasm"), dir.path().join("hostile.wasm")).unwrap();
    std::fs::write(dir.path().join("hostile.plugin.toml"), "[pool]\nreuse = 3\nmin = 0\n").unwrap();
    let host = Host::new(config(dir.path(), None)).unwrap();
    let toml = counter_flow("");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(calls(&host, &toml, json!({})).await);
    }
    assert_eq!(seen, [Some(1), Some(2), Some(3), Some(1)]);
    // A step's own settings win over the file.
    let fresh = counter_flow("pool = { reuse = 1 }");
    assert_eq!(calls(&host, &fresh, json!({})).await, Some(1));
    assert_eq!(calls(&host, &fresh, json!({})).await, Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_plugin_settings_file_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(hostile_dir().join("hostile.wasm"), dir.path().join("hostile.wasm")).unwrap();
    std::fs::write(dir.path().join("hostile.plugin.toml"), "[pool]\nreuse = \"often\"\n").unwrap();
    let host = Host::new(config(dir.path(), None)).unwrap();
    let summary = run(&host, &counter_flow(""), json!({})).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let message = &summary.step("c").unwrap().error.as_ref().unwrap().message;
    assert!(
        message.contains(&format!("{}", Path::new("hostile.plugin.toml").display())),
        "{message}"
    );
    assert!(message.contains("reuse"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_wide_settings_apply_to_every_step() {
    let mut settings = config(hostile_dir(), None);
    settings.pool = PoolSettings::default().with_reuse(10).with_min(0);
    let host = Host::new(settings).unwrap();
    let toml = counter_flow("");
    assert_eq!(calls(&host, &toml, json!({})).await, Some(1));
    assert_eq!(calls(&host, &toml, json!({})).await, Some(2));
}
