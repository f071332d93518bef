//! Flows that fail: every failure names its step and plugin, fails only what
//! depends on it, and leaves the host able to run the next flow.

use qflow::{Problem, RunStatus, StepStatus};
use serde_json::json;

use crate::support::{config, flow, hostile_host as host, plugins_dir, run};

/// `bad` runs the hostile plugin in `mode`; `sibling` is independent of it and
/// slow enough to be running when `bad` fails; `after` needs `bad`.
fn hostile_flow(mode: &str) -> String {
    format!(
        r#"
        [flow]
        name = "hostile-{mode}"
        [[step]]
        id = "bad"
        plugin = "hostile"
        config = {{ mode = "{mode}" }}
        timeout_ms = 500
        [[step]]
        id = "sibling"
        plugin = "sleep"
        config = {{ ms = 5000 }}
        [[step]]
        id = "after"
        plugin = "identity"
        needs = ["bad"]
        "#
    )
}

async fn fails_with(mode: &str, kind: &str, says: &[&str]) {
    let host = host();
    let summary = run(&host, &hostile_flow(mode), json!({"x": 1})).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let bad = summary.step("bad").unwrap();
    assert_eq!(bad.status, StepStatus::Failed);
    let error = bad.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), kind, "{error:?}");
    assert!(error.message.starts_with("step `bad` (plugin hostile): "), "{}", error.message);
    for needle in says {
        assert!(error.message.contains(needle), "{:?} does not say {needle:?}", error.message);
    }
    // Fail-fast: what depended on it never ran; what ran beside it was stopped.
    assert_eq!(summary.step("after").unwrap().status, StepStatus::Skipped);
    // (Cancelled, not succeeded: the run did not wait for its 5 s.)
    assert_eq!(summary.step("sibling").unwrap().status, StepStatus::Cancelled);

    // The host is unharmed: the next run on it succeeds.
    let next =
        run(&host, &hostile_flow("ok").replace("ms = 5000", "ms = 1"), json!({"x": 2})).await;
    assert_eq!(next.status, RunStatus::Succeeded, "{next:#?}");
    assert_eq!(next.output("after").unwrap(), json!({"x": 2}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_fails_its_step_with_the_panic_message() {
    fails_with("trap", "trap", &["trapped in run", "unreachable", "hostile: trapping on purpose"])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_in_init_fails_its_step() {
    fails_with("trap-in-init", "trap", &["trapped in init", "hostile: trapping in init"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_returned_error_keeps_its_code_and_message() {
    fails_with("error", "step-error", &["hostile: failing on purpose"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_json_output_is_reported_not_passed_on() {
    fails_with("invalid-json", "invalid-output", &["returned invalid JSON", "{this is not json"])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_loop_is_stopped_by_the_step_timeout() {
    fails_with("loop", "timeout", &["did not finish within its timeout of 500 ms"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_the_plugin_rejects_fails_the_step() {
    let host = host();
    let toml = r#"
        [flow]
        name = "bad-filter"
        [[step]]
        id = "q"
        plugin = "jq"
        config = { filter = "map(.a" }
    "#;
    let summary = run(&host, toml, json!([])).await;
    let error = summary.step("q").unwrap().error.as_ref().unwrap();
    assert_eq!(error.kind, qflow::FailureKind::Config);
    assert_eq!(error.code.as_deref(), Some("bad-config"));
    assert!(
        error.message.starts_with("step `q` (plugin jq): rejected its config"),
        "{}",
        error.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_input_reference_to_a_missing_field_names_it() {
    let host = host();
    let toml = r#"
        [flow]
        name = "missing-field"
        [[step]]
        id = "a"
        plugin = "identity"
        [[step]]
        id = "b"
        plugin = "identity"
        needs = ["a"]
        input = "${steps.a.output.nope}"
    "#;
    let summary = run(&host, toml, json!({"yes": 1})).await;
    let error = summary.step("b").unwrap().error.as_ref().unwrap();
    assert_eq!(error.kind, qflow::FailureKind::Input);
    assert!(
        error.message.contains("${steps.a.output.nope}") && error.message.contains("yes"),
        "{}",
        error.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_plugin_is_reported_before_anything_runs() {
    let host = host();
    let toml = r#"
        [flow]
        name = "typo"
        [[step]]
        id = "a"
        plugin = "identiy"
    "#;
    let err = host.run(&flow(toml), json!(null)).await.unwrap_err();
    assert_eq!(err.origin, "<test>");
    match err.problems.as_slice() {
        [Problem::UnknownPlugin { owner, plugin, available, .. }] => {
            assert_eq!((owner.as_str(), plugin.as_str()), ("step `a`", "identiy"));
            assert!(available.contains("identity"), "{available}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_version_that_does_not_match_fails_the_step() {
    let host = host();
    let toml = r#"
        [flow]
        name = "pinned"
        [[step]]
        id = "a"
        plugin = "identity@9.9.9"
    "#;
    let summary = run(&host, toml, json!(null)).await;
    let error = summary.step("a").unwrap().error.as_ref().unwrap();
    assert_eq!(error.kind, qflow::FailureKind::Plugin);
    assert!(
        error.message.contains("is version 0.1.0, but the flow asks for 9.9.9"),
        "{}",
        error.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_asset_fails_the_step_that_asked_for_it() {
    let host = host();
    let asking = |config: &str| {
        format!(
            r#"
            [flow]
            name = "missing-asset"
            [[loader]]
            id = "data"
            plugin = "file-loader"
            dirs = {{ "/data" = "examples/data" }}
            [[step]]
            id = "t"
            plugin = "template"
            config = {config}
            "#
        )
    };
    let summary = run(&host, &asking(r#"{ template_asset = "data/nope.j2" }"#), json!(null)).await;
    let message = &summary.step("t").unwrap().error.as_ref().unwrap().message;
    assert!(message.starts_with("step `t` (plugin template): rejected its config"), "{message}");
    assert!(message.contains("loader `data` (plugin file-loader)"), "{message}");
    assert!(message.contains("nope.j2") && message.contains("No such file"), "{message}");

    let summary = run(&host, &asking(r#"{ template_asset = "other/x.j2" }"#), json!(null)).await;
    let message = &summary.step("t").unwrap().error.as_ref().unwrap().message;
    assert!(message.contains("no loader `other` (loaders: data)"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_a_component_is_a_clear_plugin_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.wasm"), b"this is not wasm").unwrap();
    std::fs::copy(plugins_dir().join("identity.wasm"), dir.path().join("identity.wasm")).unwrap();
    let host = qflow::Host::new(config(dir.path(), None)).unwrap();
    let toml = r#"
        [flow]
        name = "broken"
        [[step]]
        id = "b"
        plugin = "broken"
        [[step]]
        id = "ok"
        plugin = "identity"
    "#;
    let summary = run(&host, toml, json!(null)).await;
    let error = summary.step("b").unwrap().error.as_ref().unwrap();
    assert_eq!(error.kind, qflow::FailureKind::Plugin);
    assert!(
        error.message.contains("broken.wasm is not a valid WebAssembly component"),
        "{}",
        error.message
    );
}

/// Errors keep their causes, so that a caller (an HTTP layer) can tell a
/// missing directory from an internal fault without parsing text.
#[test]
fn a_missing_plugins_directory_is_an_error_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-plugins");
    let err = match qflow::Host::new(config(&missing, None)) {
        Ok(_) => panic!("a host on a missing directory"),
        Err(err) => err,
    };
    let io = std::error::Error::source(&err)
        .and_then(std::error::Error::source)
        .and_then(|cause| cause.downcast_ref::<std::sync::Arc<std::io::Error>>())
        .unwrap_or_else(|| panic!("no io::Error under {err:?}"));
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    let text = qflow::error_chain(&err);
    assert!(text.contains("no-such-plugins") && text.contains("No such file"), "{text}");
}
