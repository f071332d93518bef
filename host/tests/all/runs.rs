//! The run store: runs kept across hosts, listed by page and filter,
//! large outputs kept as their hash, a bad database file refused clearly.

use std::sync::Arc;
use std::time::Duration;

use qflow::model::{RunQuery, RunState, RunStore, StoreError};
use qflow::store::SqliteStore;
use qflow::{Host, RunStatus};
use serde_json::json;

use crate::support::{config, flow, plugins_dir};

const ECHO: &str = r#"
    [flow]
    name = "echo"
    [[step]]
    id = "same"
    plugin = "identity"
"#;

async fn host_on(store: &Arc<SqliteStore>, max_output_bytes: usize) -> Host {
    Host::new(config(plugins_dir(), None)).unwrap().with_store(store.clone(), max_output_bytes)
}

#[tokio::test]
async fn a_run_is_kept_and_read_back_by_a_new_store_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qflow.db");
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let host = host_on(&store, 64).await;
    let small = host.run(&flow(ECHO), json!("abc")).await.unwrap();
    let large = host.run(&flow(ECHO), json!("x".repeat(100))).await.unwrap();
    assert!(host.flush_runs(Duration::from_secs(60)).await, "the writer took both runs");
    drop(host);
    drop(store);

    let reopened = SqliteStore::open(&path).await.unwrap();
    let record = reopened.run(&small.run_id).await.unwrap().expect("the first run is kept");
    assert_eq!((record.flow.as_str(), record.status), ("echo", RunState::Succeeded));
    assert_eq!(record.input, json!("abc"));
    let summary = record.summary.expect("with its summary");
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(summary.output("same"), Some(json!("abc")), "a small output is kept whole");
    assert!(record.ended_at_ms.unwrap() >= record.started_at_ms);

    let record = reopened.run(&large.run_id).await.unwrap().unwrap();
    let output = record.summary.unwrap().output("same").unwrap();
    assert_eq!(output["bytes"], 102, "100 x's and their quotes");
    assert_eq!(output["sha256"].as_str().map(str::len), Some(64), "{output}");
    let (text, origin) = reopened.flow_of(&large.run_id).await.unwrap().unwrap();
    assert_eq!((text.as_str(), origin.as_str()), (ECHO, "<test>"));
    assert!(reopened.run("no-such-run").await.unwrap().is_none());
}

#[tokio::test]
async fn runs_are_listed_newest_first_by_page_and_filter() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("qflow.db")).await.unwrap());
    let host = host_on(&store, 1 << 16).await;
    let other = ECHO.replace("\"echo\"", "\"other\"");
    let mut echoes = Vec::new();
    for n in 0..7 {
        echoes.push(host.run(&flow(ECHO), json!(n)).await.unwrap().run_id);
        host.run(&flow(&other), json!(n)).await.unwrap();
        // Distinct start times: the order under test is the store's, not a tie.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(host.flush_runs(Duration::from_secs(60)).await);
    echoes.reverse();

    let page = |query: RunQuery| {
        let store = store.clone();
        async move {
            let records = store.runs(query).await.unwrap();
            records.into_iter().map(|r| r.run_id).collect::<Vec<_>>()
        }
    };
    let first = page(RunQuery::newest(3).flow("echo")).await;
    assert_eq!(first, echoes[..3]);
    let second = page(RunQuery::newest(3).flow("echo").before(first[2].clone())).await;
    assert_eq!(second, echoes[3..6]);
    let last = page(RunQuery::newest(3).flow("echo").before(second[2].clone())).await;
    assert_eq!(last, echoes[6..]);
    assert_eq!(page(RunQuery::newest(100)).await.len(), 14, "both flows");
    assert_eq!(page(RunQuery::newest(100).status(RunState::Failed)).await.len(), 0);
    assert_eq!(page(RunQuery::newest(100).status(RunState::Succeeded)).await.len(), 14);

    // The optimizer's evidence: this flow's runs, oldest first.
    let past = host.past_runs("echo", 100).await.unwrap();
    let ids: Vec<String> = past.into_iter().map(|s| s.run_id).collect();
    assert_eq!(ids, echoes.iter().rev().cloned().collect::<Vec<_>>());
}

#[tokio::test]
async fn a_file_that_is_no_database_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qflow.db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let error = SqliteStore::open(&path).await.err().expect("a corrupt file is refused");
    assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");

    // A directory where the file should be: refused too, not a panic.
    let taken = dir.path().join("taken.db");
    std::fs::create_dir(&taken).unwrap();
    let error = SqliteStore::open(&taken).await.err().expect("a directory is refused");
    assert!(error.to_string().contains("taken.db"), "{error}");
}
