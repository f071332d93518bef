//! Flows that succeed: outputs, dependency order, concurrency, input mapping.

use qflow::{Flow, RunStatus, StepStatus};
use serde_json::json;

use crate::support::{assert_dependencies_respected, flow, host, repo, run};

#[tokio::test(flavor = "multi_thread")]
async fn the_orders_report_example_totals_and_renders() {
    let host = host();
    let flow = Flow::load(repo().join("examples/orders-report.toml")).unwrap();
    let summary = host.run(&flow, json!(null)).await.unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");

    let orders = summary.output("orders").unwrap();
    let orders = orders.as_array().unwrap();
    assert_eq!(orders.len(), 8);
    assert_eq!(orders[0]["customer"], "Acme Corp");
    assert_eq!(orders[0]["amount"], json!(1250.0));

    let totals = summary.output("totals").unwrap();
    assert_eq!(totals["count"], 8);
    let revenue = totals["revenue"].as_f64().unwrap();
    assert!((revenue - 22645.84).abs() < 1e-6, "revenue {revenue}");
    assert_eq!(totals["regions"].as_array().unwrap().len(), 4);

    let checksum = summary.output("checksum").unwrap();
    let checksum = checksum["sha256"].as_str().unwrap();
    assert_eq!(checksum.len(), 64);
    let report = summary.output("report").unwrap();
    let report = report.as_str().unwrap();
    assert!(report.contains("8 orders, 22645.84 in revenue."), "{report}");
    assert!(report.contains(checksum), "{report}");

    assert_dependencies_respected(&flow, &summary);
}

#[tokio::test(flavor = "multi_thread")]
async fn independent_steps_overlap_in_time() {
    let host = host();
    let toml = r#"
        [flow]
        name = "overlap"
        [[step]]
        id = "a"
        plugin = "sleep"
        config = { ms = 400 }
        [[step]]
        id = "b"
        plugin = "sleep"
        config = { ms = 400 }
        [[step]]
        id = "c"
        plugin = "sleep"
        input = { ms = 400 }
        [[step]]
        id = "after"
        plugin = "identity"
        needs = ["a", "b", "c"]
    "#;
    let summary = run(&host, toml, json!({"tag": 1})).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
    let span = |id: &str| {
        let s = summary.step(id).unwrap();
        (s.start_ms.unwrap(), s.end_ms.unwrap())
    };
    // Every pair of the three waits was running at the same moment.
    for (x, y) in [("a", "b"), ("a", "c"), ("b", "c")] {
        let ((xs, xe), (ys, ye)) = (span(x), span(y));
        assert!(xs < ye && ys < xe, "{x} ran {xs}..{xe} and {y} ran {ys}..{ye}: no overlap");
    }
    // `after` got the outputs of all three.
    assert_eq!(summary.output("a").unwrap(), json!({"tag": 1}));
    assert_eq!(
        summary.output("after").unwrap(),
        json!({"a": {"tag": 1}, "b": {"tag": 1}, "c": {"ms": 400}})
    );
    assert_dependencies_respected(&flow(toml), &summary);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_runs_in_dependency_order_and_passes_outputs() {
    let host = host();
    let toml = r#"
        [flow]
        name = "chain"
        [[step]]
        id = "n"
        plugin = "jq"
        config = { filter = ".n + 1" }
        [[step]]
        id = "fib"
        plugin = "fib"
        needs = ["n"]
        [[step]]
        id = "digest"
        plugin = "hash"
        needs = ["fib"]
        input = "fib(${steps.fib.output.n}) = ${steps.fib.output.fib}"
        [[step]]
        id = "message"
        plugin = "template"
        needs = ["fib", "digest"]
        input = { who = "${input.who}", fib = "${steps.fib.output}", sha = "${steps.digest.output.sha256}" }
        config = { template = "{{ who }}: fib({{ fib.n }}) = {{ fib.fib }} [{{ sha[:8] }}]" }
    "#;
    let summary = run(&host, toml, json!({"n": 19, "who": "ada"})).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
    assert_eq!(summary.output("fib").unwrap(), json!({"n": 20, "fib": 6765}));
    let digest = summary.output("digest").unwrap();
    assert_eq!(digest["bytes"], "fib(20) = 6765".len());
    let sha = digest["sha256"].as_str().unwrap();
    assert_eq!(
        summary.output("message").unwrap(),
        json!(format!("ada: fib(20) = 6765 [{}]", &sha[..8]))
    );
    assert_dependencies_respected(&flow(toml), &summary);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_hash_plugin_agrees_with_a_known_digest() {
    let host = host();
    let toml = r#"
        [flow]
        name = "digest"
        [[step]]
        id = "h"
        plugin = "hash"
    "#;
    let summary = run(&host, toml, json!("abc")).await;
    // SHA-256("abc"), from FIPS 180-2.
    assert_eq!(
        summary.output("h").unwrap()["sha256"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_host_runs_many_flows_at_once() {
    let host = std::sync::Arc::new(host());
    let toml = r#"
        [flow]
        name = "square"
        [[step]]
        id = "sq"
        plugin = "jq"
        config = { filter = ". * ." }
    "#;
    let runs = (0..16).map(|i| {
        let host = host.clone();
        tokio::spawn(async move { (i, run(&host, toml, json!(i)).await) })
    });
    for joined in futures::future::join_all(runs).await {
        let (i, summary) = joined.unwrap();
        assert_eq!(summary.output("sq").unwrap(), json!(i * i));
        assert_eq!(summary.step("sq").unwrap().status, StepStatus::Succeeded);
    }
}
