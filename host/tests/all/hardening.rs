//! Every limit holds, nothing hangs or starves: the hardening suite, on
//! real hostile plugins through the library. (What needs a whole process —
//! signals, the terminal, the process's own memory — is in `tests/cli`.)

use std::time::Duration;

use qflow::{FailureKind, Host, PoolSettings, RunStatus, StepStatus};
use serde_json::json;

use crate::support::{config, flow, hostile_dir, run};

fn host_with(edit: impl FnOnce(&mut qflow::HostConfig)) -> Host {
    let mut config = config(hostile_dir(), None);
    edit(&mut config);
    Host::new(config).expect("the host starts")
}

/// One hostile step with `config` (a TOML inline table body) and `extra`.
fn one(config: &str, extra: &str) -> String {
    format!(
        "[flow]\nname = \"hard\"\n[[step]]\nid = \"bad\"\nplugin = \"hostile\"\nconfig = {{ {config} }}\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_empty_lines_costs_the_budget_and_is_counted() {
    let host = host_with(|c| c.max_log_bytes = 64 << 10);
    let summary =
        run(&host, &one("mode = \"empty-lines\", lines = 200000, logs = 100000", ""), json!(1))
            .await;
    let bad = summary.step("bad").unwrap();
    assert_eq!(bad.status, StepStatus::Succeeded, "{bad:#?}");
    // Each kept line costs its overhead (80 bytes): at most 819 are kept,
    // all of them printed lines, which came first.
    assert!(bad.log.len() <= 819, "{} lines kept", bad.log.len());
    assert!(!bad.log.is_empty() && bad.log.iter().all(|l| l == "stdout: "), "{:?}", &bad.log[..3]);
    let kept = bad.log.len() as u64;
    assert_eq!(bad.log_dropped_lines, 200_000 + 100_000 - kept);
    // A dropped printed line counts its line break; an empty log record has none.
    assert_eq!(bad.log_dropped_bytes, 200_000 - kept);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_nested_deeper_than_a_tree_can_hold_is_refused() {
    let toml = format!(
        "{}[[step]]\nid = \"next\"\nplugin = \"identity\"\nneeds = [\"bad\"]\n",
        one("mode = \"deep-output\"", "")
    );
    let summary = run(&host_with(|_| {}), &toml, json!(1)).await;
    let bad = summary.step("bad").unwrap();
    let error = bad.error.as_ref().unwrap();
    assert_eq!(error.kind, FailureKind::InvalidOutput, "{error:?}");
    assert!(error.message.contains("recursion limit exceeded"), "{}", error.message);
    assert_eq!(summary.step("next").unwrap().status, StepStatus::Skipped);
}

/// What one call leaves in memory is gone for the next on a fresh instance,
/// whatever the reset path keeps resident; the same instance reused finds
/// it (which shows the search can find it at all).
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_instance_sees_nothing_of_the_previous_call() {
    // With the reset path that scans for dirty pages, and with the one that
    // falls back to memset and madvise (a kernel without PAGEMAP_SCAN).
    for pagemap_scan in [true, false] {
        let host = host_with(|c| c.engine.reset.pagemap_scan = pagemap_scan);
        for (pool, expected) in [("", false), ("pool = { reuse = 2, min = 0 }", true)] {
            let toml = one("mode = \"secret\"", pool);
            let written = run(&host, &toml, json!({"write": 4711})).await;
            assert_eq!(written.output("bad"), Some(json!("written")), "{written:#?}");
            let found = run(&host, &toml, json!({"find": 4711})).await;
            let what = format!("pagemap_scan {pagemap_scan}, {pool:?}");
            assert_eq!(found.output("bad"), Some(json!({"found": expected})), "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_with_no_timeout_gets_the_hosts_default() {
    let host = host_with(|c| c.step_timeout = Duration::from_millis(500));
    let summary = run(&host, &one("mode = \"sleep-forever\"", ""), json!(1)).await;
    let bad = summary.step("bad").unwrap();
    assert_eq!(bad.status, StepStatus::Failed);
    let error = bad.error.as_ref().unwrap();
    assert_eq!(error.kind, FailureKind::Timeout, "{error:?}");
    assert!(error.message.contains("within its timeout of 500 ms"), "{}", error.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_past_its_timeout_fails_its_running_steps_and_skips_the_rest() {
    let host = host_with(|c| c.run_timeout = Duration::from_millis(500));
    let toml = format!(
        "{}[[step]]\nid = \"after\"\nplugin = \"identity\"\nneeds = [\"bad\"]\n",
        one("mode = \"sleep-forever\"", "")
    );
    let summary = run(&host, &toml, json!(1)).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let bad = summary.step("bad").unwrap();
    assert_eq!(bad.status, StepStatus::Failed);
    let error = bad.error.as_ref().unwrap();
    assert_eq!(error.kind, FailureKind::Timeout);
    assert!(error.message.contains("cut by the run's timeout of 500 ms"), "{}", error.message);
    assert_eq!(summary.step("after").unwrap().status, StepStatus::Skipped);
}

/// Waits (a minute at most) until `check` holds, looking every 10 ms.
async fn until(what: &str, check: impl Fn() -> bool) {
    let wait = async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), wait).await.is_err() {
        panic!("{what} did not happen within a minute");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_waits_for_the_hosts_memory_budget_instead_of_overrunning_it() {
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let host = std::sync::Arc::new(host_with(|c| c.engine.max_total_memory_mb = 300));
    let toml = format!(
        "[flow]\nname = \"memory\"\n\
         [[step]]\nid = \"first\"\nplugin = \"hostile\"\ndirs = {{ \"/w\" = {dir:?} }}\n\
         config = {{ mode = \"hold\", mb = 200, path = \"/w/release\" }}\n\
         [[step]]\nid = \"second\"\nplugin = \"hostile\"\ndirs = {{ \"/w\" = {dir:?} }}\n\
         config = {{ mode = \"hold\", mb = 200, path = \"/w/release\", other = 1 }}\n",
        dir = dir.path()
    );
    let flow = flow(&toml);
    let running = {
        let host = host.clone();
        tokio::spawn(async move { host.run(&flow, json!(null)).await.unwrap() })
    };
    // Each holds 200 MiB, of 300: one of them waits in memory.grow.
    until("an instance waiting for memory", || host.memory_stats().waits >= 1).await;
    let stats = host.memory_stats();
    assert!(stats.in_use_bytes <= stats.limit_bytes, "{stats:?}");
    assert_eq!(stats.limit_bytes, 300 << 20);
    std::fs::write(&release, "go").unwrap();
    let summary = running.await.unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
    let stats = host.memory_stats();
    assert!(stats.peak_bytes <= 300 << 20, "{stats:?}");
    assert!(stats.peak_bytes >= 200 << 20, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_beyond_the_whole_budget_is_refused_at_once() {
    let host = host_with(|c| c.engine.max_total_memory_mb = 64);
    let summary = run(&host, &one("mode = \"alloc\"", "max_memory_mb = 256"), json!(1)).await;
    let bad = summary.step("bad").unwrap();
    assert_eq!(bad.status, StepStatus::Failed);
    let message = &bad.error.as_ref().unwrap().message;
    assert!(message.contains("the host's memory budget of 64 MiB"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_spares_never_starve_a_long_chain_of_distinct_steps() {
    // Eight slots; twelve steps, each with its own config (its own pool,
    // whose spare would once hold a slot for good).
    let host = host_with(|c| c.engine.max_instances = 8);
    let mut toml = String::from("[flow]\nname = \"chain\"\n");
    for i in 0..12 {
        let needs = if i == 0 { String::new() } else { format!("needs = [\"s{}\"]\n", i - 1) };
        toml += &format!(
            "[[step]]\nid = \"s{i}\"\nplugin = \"hostile\"\nconfig = {{ mode = \"ok\", n = {i} }}\n{needs}"
        );
    }
    let summary = run(&host, &toml, json!("x")).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
    assert!(host.instances_in_use() <= 8);
}

/// Reused instances go back to their pools idle, each holding a slot: the
/// fifth step of a chain over four slots gets one only because the least
/// recently used idle instance is dropped for it.
#[tokio::test(flavor = "multi_thread")]
async fn idle_instances_are_dropped_for_a_step_that_needs_their_slot() {
    let host = host_with(|c| c.engine.max_instances = 4);
    let mut toml = String::from("[flow]\nname = \"reused\"\n");
    for i in 0..6 {
        let needs = if i == 0 { String::new() } else { format!("needs = [\"s{}\"]\n", i - 1) };
        toml += &format!(
            "[[step]]\nid = \"s{i}\"\nplugin = \"hostile\"\nconfig = {{ mode = \"ok\", n = {i} }}\n\
             pool = {{ reuse = 100, min = 0, create_timeout_ms = 2000 }}\n{needs}"
        );
    }
    let summary = run(&host, &toml, json!("x")).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
    let idle: usize = host.pool_stats().iter().map(|(_, s)| s.available).sum();
    assert_eq!(idle, 4, "the four most recent stay idle: {:?}", host.pool_stats());
    assert_eq!(host.instances_in_use(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_min_is_capped_and_starves_no_other_step() {
    let host = host_with(|c| c.engine.max_instances = 8);
    let toml = format!(
        "{}[[step]]\nid = \"other\"\nplugin = \"identity\"\nneeds = [\"bad\"]\n",
        one("mode = \"ok\"", "pool = { min = 1000 }")
    );
    let summary = run(&host, &toml, json!("x")).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
    let held: usize = host.pool_stats().iter().map(|(_, s)| s.total).sum();
    assert!(held <= 8, "{:?}", host.pool_stats());
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_slot_is_busy_the_error_says_so_and_by_whom() {
    let dir = tempfile::tempdir().unwrap();
    let host = std::sync::Arc::new(host_with(|c| {
        c.engine.max_instances = 2;
        c.pool = PoolSettings::default().with_min(0);
    }));
    let holding = flow(&format!(
        "[flow]\nname = \"holding\"\n\
         [[step]]\nid = \"h1\"\nplugin = \"hostile\"\ndirs = {{ \"/w\" = {dir:?} }}\n\
         config = {{ mode = \"hold\", path = \"/w/release\" }}\n\
         [[step]]\nid = \"h2\"\nplugin = \"hostile\"\ndirs = {{ \"/w\" = {dir:?} }}\n\
         config = {{ mode = \"hold\", path = \"/w/release\" }}\n",
        dir = dir.path()
    ));
    let running = {
        let host = host.clone();
        tokio::spawn(async move { host.run(&holding, json!(null)).await.unwrap() })
    };
    until("both slots busy", || host.instances_in_use() == 2).await;
    let starved = run(
        &host,
        "[flow]\nname = \"starved\"\n[[step]]\nid = \"late\"\nplugin = \"identity\"\n\
         pool = { create_timeout_ms = 300 }\n",
        json!(1),
    )
    .await;
    let late = starved.step("late").unwrap();
    assert_eq!(late.status, StepStatus::Failed);
    let message = &late.error.as_ref().unwrap().message;
    assert!(message.contains("all 2 instance slots are taken"), "{message}");
    assert!(message.contains("hostile: 2 busy"), "{message}");
    std::fs::write(dir.path().join("release"), "go").unwrap();
    assert_eq!(running.await.unwrap().status, RunStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_that_climbs_out_of_a_writable_grant_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let host = host_with(|_| {});
    let grant = format!("dirs = {{ \"/out\" = {{ path = {:?}, writable = true }} }}", dir.path());
    let escaping = run(
        &host,
        &one("mode = \"symlink\", target = \"../../../../etc/passwd\", link = \"evil\"", &grant),
        json!(1),
    )
    .await;
    let bad = escaping.step("bad").unwrap();
    assert_eq!(bad.status, StepStatus::Failed, "{bad:#?}");
    assert!(bad.error.as_ref().unwrap().message.contains("not-permitted"), "{bad:#?}");
    assert!(std::fs::symlink_metadata(dir.path().join("evil")).is_err(), "no link was made");

    std::fs::write(dir.path().join("data"), "x").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let inside = run(
        &host,
        &one("mode = \"symlink\", target = \"sub/../data\", link = \"ok\"", &grant),
        json!(1),
    )
    .await;
    assert_eq!(inside.status, RunStatus::Succeeded, "{inside:#?}");
    assert_eq!(std::fs::read_to_string(dir.path().join("ok")).unwrap(), "x");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_need_outside_the_plugins_directory_is_refused_by_name() {
    let host = host_with(|_| {});
    let summary = run(
        &host,
        "[flow]\nname = \"needs\"\n[[step]]\nid = \"a\"\nplugin = \"needs-escape\"\n",
        json!(1),
    )
    .await;
    let a = summary.step("a").unwrap();
    assert_eq!(a.status, StepStatus::Failed);
    let message = &a.error.as_ref().unwrap().message;
    assert!(message.contains("../outside/evil"), "{message}");
    assert!(message.contains("is not a plugin name"), "{message}");
}
