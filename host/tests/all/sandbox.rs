//! The hostile suite: each misbehaving plugin fails only its own step, with
//! a clear error, the host keeps running, the other steps of the run
//! complete, and the next run is unaffected.

use std::path::Path;

use qflow::{Flow, Format, Host, RunStatus, StepStatus};
use serde_json::json;

use crate::support::{config, hostile_dir, hostile_host, plugins_dir, run};

/// A flow where `bad` runs the hostile plugin with `config` (TOML inline
/// table body) and `good` runs beside it.
fn beside(config: &str, extra: &str) -> String {
    format!(
        r#"
        [flow]
        name = "hostile"
        strategy = "continue-on-error"
        [[step]]
        id = "bad"
        plugin = "hostile"
        config = {{ {config} }}
        {extra}
        [[step]]
        id = "good"
        plugin = "identity"
        "#
    )
}

/// Runs `bad` beside `good`; `good` must succeed; returns `bad`'s report.
async fn hostile(host: &Host, config: &str, extra: &str) -> qflow::StepReport {
    let summary = run(host, &beside(config, extra), json!({"fine": true})).await;
    assert_eq!(summary.output("good"), Some(json!({"fine": true})), "{summary:#?}");
    summary.step("bad").unwrap().clone()
}

fn message(report: &qflow::StepReport) -> &str {
    &report.error.as_ref().unwrap_or_else(|| panic!("no error: {report:#?}")).message
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_bomb_hits_its_limit_and_the_memory_comes_back() {
    let host = hostile_host();
    let before = rss_bytes();
    for _ in 0..5 {
        let bad = hostile(&host, r#"mode = "alloc""#, "max_memory_mb = 64").await;
        assert_eq!(bad.status, StepStatus::Failed);
        assert!(message(&bad).contains("hit its memory limit of 64 MiB"), "{}", message(&bad));
    }
    // Kept, the five bombs would hold 320 MiB; other tests in this process
    // allocate too, so allow them half of that.
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 160 << 20, "the host kept {} MiB after five 64 MiB bombs", grown >> 20);
    let pools = host.pool_stats();
    assert!(pools.iter().all(|(_, s)| s.in_use == 0), "{pools:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_recursion_is_a_stack_overflow_trap() {
    let bad = hostile(&hostile_host(), r#"mode = "recurse""#, "").await;
    assert_eq!(bad.error.as_ref().unwrap().kind, qflow::FailureKind::Trap);
    assert!(message(&bad).contains("call stack exhausted"), "{}", message(&bad));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_flood_is_capped_and_counted() {
    let mut settings = config(hostile_dir(), None);
    settings.max_log_bytes = 64 << 10;
    let host = Host::new(settings).unwrap();
    let bad = hostile(&host, r#"mode = "log-flood", bytes = 5000000"#, "").await;
    assert_eq!(bad.status, StepStatus::Succeeded, "{bad:#?}");
    let kept: usize = bad.log.iter().map(String::len).sum();
    assert!(kept <= 80 << 10, "{kept} bytes of log kept");
    assert!(bad.log_dropped_bytes > 4_000_000, "{}", bad.log_dropped_bytes);
    for stream in ["stdout: flood", "stderr: flood", "info: flood"] {
        assert!(bad.log.iter().any(|l| l.starts_with(stream)), "no {stream} line");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_reads_only_what_it_was_granted() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("ok.txt"), "granted").unwrap();
    std::fs::write(root.path().join("secret.txt"), "TOP SECRET").unwrap();
    std::os::unix::fs::symlink(root.path().join("secret.txt"), data.join("link")).unwrap();
    let host = hostile_host();
    let dirs = format!("dirs = {{ \"/data\" = {:?} }}", data.display().to_string());

    let ok = hostile(&host, r#"mode = "read", path = "/data/ok.txt""#, &dirs).await;
    assert_eq!(ok.output, Some(json!("granted").into()));
    for path in [
        "/data/../secret.txt",
        "/data/link",
        &root.path().join("secret.txt").display().to_string(),
        "/etc/passwd",
    ] {
        let bad = hostile(&host, &format!(r#"mode = "read", path = {path:?}"#), &dirs).await;
        assert_eq!(bad.status, StepStatus::Failed, "{path} was readable: {bad:#?}");
        assert!(message(&bad).contains(path), "{}", message(&bad));
        assert!(!format!("{bad:?}").contains("TOP SECRET"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_writes_only_where_it_was_granted_writable() {
    let root = tempfile::tempdir().unwrap();
    let (ro, rw) = (root.path().join("ro"), root.path().join("rw"));
    std::fs::create_dir(&ro).unwrap();
    std::fs::create_dir(&rw).unwrap();
    let host = hostile_host();
    let dirs = format!(
        "dirs = {{ \"/ro\" = {:?}, \"/rw\" = {{ path = {:?}, writable = true }} }}",
        ro.display().to_string(),
        rw.display().to_string()
    );
    let bad = hostile(&host, r#"mode = "write", path = "/ro/x.txt", text = "no""#, &dirs).await;
    assert_eq!(bad.status, StepStatus::Failed);
    assert!(!ro.join("x.txt").exists());
    let ok = hostile(&host, r#"mode = "write", path = "/rw/x.txt", text = "yes""#, &dirs).await;
    assert_eq!(ok.status, StepStatus::Succeeded, "{ok:#?}");
    assert_eq!(std::fs::read_to_string(rw.join("x.txt")).unwrap(), "yes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_sees_only_the_environment_it_was_given() {
    let host = hostile_host();
    let bad = hostile(&host, r#"mode = "env", name = "PATH""#, "").await;
    assert_eq!(bad.status, StepStatus::Failed);
    assert!(message(&bad).contains("PATH"), "{}", message(&bad));
    let given =
        hostile(&host, r#"mode = "env", name = "GREETING""#, r#"env = { GREETING = "hi" }"#).await;
    assert_eq!(given.output, Some(json!("hi").into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_that_matches_no_world_is_named_as_such() {
    let host = hostile_host();
    let toml = "[flow]\nname = \"n\"\n[[step]]\nid = \"n\"\nplugin = \"no-world\"\n";
    let summary = run(&host, toml, json!(null)).await;
    let error = summary.step("n").unwrap().error.as_ref().unwrap();
    assert_eq!(error.kind, qflow::FailureKind::Plugin);
    assert!(
        error.message.contains("no-world.wasm does not match a Qflow world"),
        "{}",
        error.message
    );
    // Found from its exports, before any compile.
    assert!(
        error.message.contains("but a step exports `describe`, `init` and `run`"),
        "{}",
        error.message
    );
    assert_eq!(summary.store.components.compiles, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn files_that_are_not_components_are_ignored_or_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(hostile_dir().join("identity.wasm"), dir.path().join("identity.wasm")).unwrap();
    std::fs::write(dir.path().join("README.txt"), "not a plugin").unwrap();
    std::fs::write(dir.path().join("fake.wasm"), "not wasm either").unwrap();
    // A core module (built for wasm32-wasip1, say) is said to be one.
    std::fs::write(dir.path().join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let host = Host::new(config(dir.path(), None)).unwrap();
    assert_eq!(host.catalog().names().unwrap(), ["core", "fake", "identity"]);
    let listed = host.catalog().describe_all().await.unwrap();
    let error = |name: &str| {
        let (_, described) = listed.iter().find(|(n, _)| n == name).unwrap();
        described.as_ref().err().unwrap_or_else(|| panic!("{name} was described")).to_string()
    };
    let fake = error("fake");
    assert!(fake.contains("fake.wasm is not a valid WebAssembly component"), "{fake}");
    let core = error("core");
    assert!(core.contains("core.wasm") && core.contains("a core WebAssembly module"), "{core}");
}

#[tokio::test(flavor = "multi_thread")]
async fn after_every_hostile_case_the_next_run_is_unaffected() {
    let host = hostile_host();
    for config in [
        r#"mode = "trap""#,
        r#"mode = "alloc""#,
        r#"mode = "recurse""#,
        r#"mode = "invalid-json""#,
        r#"mode = "big-output", bytes = 20000000"#,
        r#"mode = "loop""#,
    ] {
        let bad = hostile(&host, config, "timeout_ms = 300\nmax_memory_mb = 32").await;
        assert_eq!(bad.status, StepStatus::Failed, "{config}: {bad:#?}");
    }
    let toml = "[flow]\nname = \"after\"\n[[step]]\nid = \"h\"\nplugin = \"hash\"\n";
    let summary = run(&host, toml, json!("abc")).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(summary.output("h").unwrap()["bytes"], 3);
}

/// The plugins directory is a capability: a link in it that leads outside
/// is refused with a clear error (naming the link), a link that stays
/// inside works, and the host keeps serving everything else.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_link_that_leads_outside_the_plugins_directory_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(plugins_dir().join("identity.wasm"), outside.path().join("evil.wasm")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugins_dir().join("identity.wasm"), dir.path().join("identity.wasm")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("evil.wasm"), dir.path().join("evil.wasm"))
        .unwrap();
    std::os::unix::fs::symlink("../x/../identity.wasm", dir.path().join("sneaky.wasm")).unwrap();
    std::os::unix::fs::symlink("identity.wasm", dir.path().join("alias.wasm")).unwrap();
    let host = Host::new(config(dir.path(), None)).unwrap();

    let toml = r#"
        [flow]
        name = "links"
        strategy = "continue-on-error"
        [[step]]
        id = "evil"
        plugin = "evil"
        [[step]]
        id = "sneaky"
        plugin = "sneaky"
        [[step]]
        id = "alias"
        plugin = "alias"
    "#;
    let summary = run(&host, toml, json!("ok")).await;
    for id in ["evil", "sneaky"] {
        let error = summary.step(id).unwrap().error.as_ref().unwrap();
        assert_eq!(error.kind, qflow::FailureKind::Plugin);
        assert!(
            error.message.contains(&format!("{id}.wasm leads outside the plugins directory")),
            "{}",
            error.message
        );
    }
    assert_eq!(summary.output("alias"), Some(json!("ok")), "a link inside the directory works");
    // Listing says the same, per plugin.
    let listed = host.catalog().describe_all().await.unwrap();
    let errors: Vec<String> = listed
        .iter()
        .filter_map(|(_, d)| d.as_ref().err())
        .map(|e| qflow::error_chain(e))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|e| e.contains("leads outside the plugins directory")), "{errors:?}");
}

/// A plugin name is a name, not a path: `..` and separators are refused
/// before any file is touched, wherever the name comes from (a flow, the
/// library, a plugin's declared needs).
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_name_that_is_a_path_is_refused() {
    let host = crate::support::host();
    for name in ["../identity", "x/../identity", "/etc/passwd", "", "a.b"] {
        let err = host.catalog().describe(name).await.unwrap_err();
        assert!(matches!(err, qflow::PluginError::BadName(ref n) if n == name), "{name}: {err}");
        assert!(err.to_string().contains("is not a plugin name"), "{err}");
    }
    let err = Flow::parse(
        "[flow]\nname = \"p\"\n[[step]]\nid = \"a\"\nplugin = \"../identity\"\n",
        Format::Toml,
        "<test>",
        Path::new("."),
    )
    .unwrap_err();
    assert!(err.to_string().contains("is not `name` or `name@version`"), "{err}");
}
