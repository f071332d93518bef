//! The scheduler with real components, end to end: strategies, retries,
//! timeouts, resources, parallelism limits, priorities, cancellation,
//! fairness to other steps. Exact timing is the job of the scheduler's own
//! tests (a fake invoker on tokio's paused clock); these assert statuses,
//! order and definitions, never how long anything took.

use std::time::Duration;

use qflow::{CancellationToken, EventData, RunOptions, RunStatus, RunSummary, StepStatus};
use serde_json::json;

use crate::support::{flow, hostile_host, run, started};

fn span(summary: &RunSummary, id: &str) -> (f64, f64) {
    let step = summary.step(id).unwrap();
    (step.start_ms.unwrap(), step.end_ms.unwrap())
}

/// Every instance still alive is an idle spare in a pool: none is running.
/// (A spare may be being made as we look: give that up to 10 s.)
async fn assert_no_instance_busy(host: &qflow::Host) {
    for _ in 0..500 {
        let pools = host.pool_stats();
        let spares: usize = pools.iter().map(|(_, s)| s.available).sum();
        let busy = pools.iter().any(|(_, s)| s.in_use > 0);
        if !busy && host.instances_in_use() == spares {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("instances still busy: {:?}, {} alive", host.pool_stats(), host.instances_in_use());
}

fn overlap(a: (f64, f64), b: (f64, f64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[tokio::test(flavor = "multi_thread")]
async fn continue_on_error_runs_every_step_whose_dependencies_succeeded() {
    let host = hostile_host();
    let toml = r#"
        [flow]
        name = "continue"
        strategy = "continue-on-error"
        [[step]]
        id = "bad"
        plugin = "hostile"
        config = { mode = "error" }
        [[step]]
        id = "after-bad"
        plugin = "identity"
        needs = ["bad"]
        [[step]]
        id = "slow"
        plugin = "sleep"
        config = { ms = 200 }
        [[step]]
        id = "after-slow"
        plugin = "identity"
        needs = ["slow"]
    "#;
    let summary = run(&host, toml, json!({"v": 1})).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let status = |id: &str| summary.step(id).unwrap().status;
    assert_eq!(status("bad"), StepStatus::Failed);
    assert_eq!(status("after-bad"), StepStatus::Skipped);
    assert_eq!(status("slow"), StepStatus::Succeeded);
    assert_eq!(status("after-slow"), StepStatus::Succeeded);
    assert_eq!(summary.output("after-slow"), Some(json!({"v": 1})));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_can_continue_on_error_inside_a_fail_fast_flow() {
    let host = hostile_host();
    let toml = r#"
        [flow]
        name = "per-step"
        [[step]]
        id = "optional"
        plugin = "hostile"
        config = { mode = "error" }
        strategy = "continue-on-error"
        [[step]]
        id = "main"
        plugin = "sleep"
        config = { ms = 100 }
    "#;
    let summary = run(&host, toml, json!(null)).await;
    assert_eq!(summary.step("optional").unwrap().status, StepStatus::Failed);
    assert_eq!(summary.step("main").unwrap().status, StepStatus::Succeeded);
}

/// Retries under tokio's paused clock: the backoff is virtual time, so the
/// test is exact and instant.
#[tokio::test]
async fn retries_are_counted_and_back_off_exponentially_with_jitter() {
    let host = hostile_host();
    // Load the plugin first, on the real clock: a paused clock would jump
    // past the load timeout while Cranelift works on another thread.
    host.catalog().describe("hostile").await.unwrap();
    let mut events = host.subscribe();
    tokio::time::pause();
    let toml = r#"
        [flow]
        name = "retry"
        strategy = "retry-failed"
        retry = { max_attempts = 4, backoff_ms = 1000, max_backoff_ms = 3000 }
        [[step]]
        id = "flaky"
        plugin = "hostile"
        config = { mode = "error-retryable" }
        [[step]]
        id = "broken"
        plugin = "hostile"
        config = { mode = "error" }
        strategy = "continue-on-error"
    "#;
    let summary = run(&host, toml, json!(null)).await;
    let flaky = summary.step("flaky").unwrap();
    assert_eq!(flaky.status, StepStatus::Failed);
    assert_eq!(flaky.attempts, 4);
    assert!(flaky.error.as_ref().unwrap().retryable);
    // Not retryable: one attempt, whatever the strategy.
    assert_eq!(summary.step("broken").unwrap().attempts, 1);

    let mut delays = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let EventData::StepRetrying { step, attempt, delay_ms, .. } = event.data {
            assert_eq!(&*step, "flaky");
            delays.push((attempt, delay_ms));
        }
    }
    // Equal jitter: each delay is between half and all of min(1000 * 2^k, 3000).
    let bounds = [(2, 500, 1000), (3, 1000, 2000), (4, 1500, 3000)];
    assert_eq!(delays.len(), 3, "{delays:?}");
    for ((attempt, delay), (want, low, high)) in delays.iter().zip(bounds) {
        assert_eq!(*attempt, want);
        assert!((low..=high).contains(delay), "retry {attempt} after {delay} ms");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_is_retried_and_reported() {
    let host = hostile_host();
    let toml = r#"
        [flow]
        name = "loop"
        [[step]]
        id = "spin"
        plugin = "hostile"
        config = { mode = "loop" }
        timeout_ms = 150
        retry = { max_attempts = 2, backoff_ms = 10 }
    "#;
    let summary = run(&host, toml, json!(null)).await;
    let spin = summary.step("spin").unwrap();
    assert_eq!(spin.attempts, 2);
    assert_eq!(spin.error.as_ref().unwrap().kind, qflow::FailureKind::Timeout);
    assert_no_instance_busy(&host).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_sharing_a_resource_never_overlap() {
    let host = hostile_host();
    let toml = r#"
        [flow]
        name = "db"
        [[step]]
        id = "w1"
        plugin = "sleep"
        config = { ms = 150 }
        resources = ["db"]
        [[step]]
        id = "w2"
        plugin = "sleep"
        config = { ms = 150 }
        resources = ["db", "disk"]
        [[step]]
        id = "w3"
        plugin = "sleep"
        config = { ms = 150 }
        resources = ["db"]
        [[step]]
        id = "free"
        plugin = "sleep"
        config = { ms = 150 }
    "#;
    let summary = run(&host, toml, json!(null)).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    for (a, b) in [("w1", "w2"), ("w1", "w3"), ("w2", "w3")] {
        assert!(!overlap(span(&summary, a), span(&summary, b)), "{a} and {b} overlapped");
    }
    let free = span(&summary, "free");
    assert!(["w1", "w2", "w3"].iter().any(|w| overlap(free, span(&summary, w))));
}

#[tokio::test(flavor = "multi_thread")]
async fn max_parallel_bounds_how_many_steps_run_at_once() {
    let host = hostile_host();
    let mut toml = String::from("[flow]\nname = \"limited\"\nmax_parallel = 2\n");
    for i in 0..6 {
        toml += &format!("[[step]]\nid = \"s{i}\"\nplugin = \"sleep\"\nconfig = {{ ms = 100 }}\n");
    }
    let summary = run(&host, &toml, json!(null)).await;
    assert_eq!(summary.max_parallel, 2);
    let spans: Vec<(f64, f64)> = (0..6).map(|i| span(&summary, &format!("s{i}"))).collect();
    for &(start, _) in &spans {
        let running = spans.iter().filter(|&&(s, e)| s <= start && start < e).count();
        assert!(running <= 2, "{running} steps running at {start} ms");
    }
    // The CLI's --max-parallel overrides the flow.
    let one =
        host.run_with(&flow(&toml), json!(null), RunOptions::new().max_parallel(6)).await.unwrap();
    assert_eq!(one.max_parallel, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_longest_critical_path_starts_first() {
    let host = hostile_host();
    let toml = r#"
        [flow]
        name = "priority"
        max_parallel = 1
        [[step]]
        id = "short"
        plugin = "identity"
        [[step]]
        id = "long1"
        plugin = "identity"
        [[step]]
        id = "long2"
        plugin = "identity"
        needs = ["long1"]
        [[step]]
        id = "long3"
        plugin = "identity"
        needs = ["long2"]
    "#;
    let summary = run(&host, toml, json!(null)).await;
    assert!(span(&summary, "long1").0 < span(&summary, "short").0);
    assert_eq!(summary.plan.critical_path, vec!["long1", "long2", "long3"]);
    assert_eq!(summary.plan.groups, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_cuts_its_steps_and_leaves_no_guest_running() {
    let host = hostile_host();
    let toml = r#"
        [flow]
        name = "cut"
        [[step]]
        id = "spin"
        plugin = "hostile"
        config = { mode = "loop" }
        [[step]]
        id = "nap"
        plugin = "sleep"
        config = { ms = 10000 }
        [[step]]
        id = "later"
        plugin = "identity"
        needs = ["nap"]
    "#;
    let cancel = CancellationToken::new();
    let options = RunOptions::new().cancel(cancel.clone());
    let mut events = host.subscribe();
    let canceller = tokio::spawn(async move {
        // Cancel once both are running, however long that takes here.
        started(&mut events, &["spin", "nap"]).await;
        cancel.cancel();
    });
    // Bounded: a cancel that does not work would otherwise spin forever.
    let flow = flow(toml);
    let run = host.run_with(&flow, json!(null), options);
    let summary = tokio::time::timeout(Duration::from_secs(120), run).await.unwrap().unwrap();
    canceller.await.unwrap();
    assert_eq!(summary.status, RunStatus::Cancelled);
    assert_eq!(summary.step("spin").unwrap().status, StepStatus::Cancelled);
    assert_eq!(summary.step("nap").unwrap().status, StepStatus::Cancelled);
    assert_eq!(summary.step("later").unwrap().status, StepStatus::Skipped);
    assert_no_instance_busy(&host).await;
}

/// One worker thread, one guest that never stops computing: the other step
/// still runs on time, because the busy guest yields at every epoch tick.
#[tokio::test(flavor = "current_thread")]
async fn a_cpu_bound_guest_does_not_starve_the_other_steps() {
    let host = hostile_host();
    for plugin in ["hostile", "sleep"] {
        host.catalog().describe(plugin).await.unwrap();
    }
    let toml = r#"
        [flow]
        name = "fair"
        [[step]]
        id = "spin"
        plugin = "hostile"
        config = { mode = "loop" }
        timeout_ms = 3000
        [[step]]
        id = "nap"
        plugin = "sleep"
        config = { ms = 100 }
        strategy = "continue-on-error"
    "#;
    let summary = run(&host, toml, json!(null)).await;
    assert_eq!(summary.step("nap").unwrap().status, StepStatus::Succeeded);
    assert_eq!(
        summary.step("spin").unwrap().error.as_ref().unwrap().kind,
        qflow::FailureKind::Timeout
    );
    // Starved, the nap could only end once the spinning guest was stopped.
    let (nap, spin) = (span(&summary, "nap"), span(&summary, "spin"));
    assert!(nap.1 < spin.1, "the nap ended at {} ms, the busy guest at {} ms", nap.1, spin.1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_over_the_limit_is_an_error() {
    let host = hostile_host();
    let toml = r#"
        [flow]
        name = "big"
        max_output_bytes = 1000
        # The big step's failure must not cancel the small one, however
        # the two finish relative to each other.
        strategy = "continue-on-error"
        [[step]]
        id = "big"
        plugin = "hostile"
        config = { mode = "big-output", bytes = 5000 }
        [[step]]
        id = "small"
        plugin = "hostile"
        config = { mode = "big-output", bytes = 900 }
    "#;
    let summary = run(&host, toml, json!(null)).await;
    let error = summary.step("big").unwrap().error.as_ref().unwrap();
    assert_eq!(error.kind, qflow::FailureKind::OutputTooLarge);
    assert!(
        error.message.contains("5000 bytes of output, over the limit of 1000"),
        "{}",
        error.message
    );
    assert_eq!(summary.output("small").unwrap().as_str().unwrap().len(), 898);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_summary_reports_step_time_and_efficiency() {
    let host = hostile_host();
    let mut toml = String::from("[flow]\nname = \"wide\"\n");
    for i in 0..4 {
        toml += &format!("[[step]]\nid = \"s{i}\"\nplugin = \"sleep\"\nconfig = {{ ms = 300 }}\n");
    }
    let summary = run(&host, &toml, json!(null)).await;
    // The definitions: step time is the sum of the steps' times, and with
    // all four at once the best schedule is the longest step.
    let durations: Vec<f64> = summary.steps.iter().filter_map(|s| s.duration_ms()).collect();
    assert_eq!(durations.len(), 4);
    assert!((summary.step_ms - durations.iter().sum::<f64>()).abs() < 1e-9);
    let longest = durations.iter().copied().fold(0.0, f64::max);
    let expected = (longest / summary.wall_ms).min(1.0);
    assert!((summary.efficiency - expected).abs() < 1e-9, "{} vs {expected}", summary.efficiency);
    assert_eq!(summary.plan.groups, 1);
    assert!((summary.plan.parallelization - 4.0).abs() < 1e-9);
    // The next plan estimates from this run: its critical path is the
    // longest step as it really took.
    let plan = host.plan(&flow(&toml));
    assert!(plan.estimated);
    assert!(
        (plan.critical_path_ms - longest).abs() < 1e-9,
        "{} vs {longest}",
        plan.critical_path_ms
    );
}
