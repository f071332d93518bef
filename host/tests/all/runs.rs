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
    Host::new(config(plugins_dir(), None))
        .unwrap()
        .with_store(store.clone(), max_output_bytes)
        .await
        .unwrap()
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

/// A run's events, its steps' durations, the use counts and a metrics
/// snapshot all reach the store with the run.
#[tokio::test]
async fn a_runs_events_durations_uses_and_a_snapshot_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("qflow.db")).await.unwrap());
    let host = host_on(&store, 1 << 16).await;
    let summary = host.run(&flow(ECHO), json!("abc")).await.unwrap();
    assert!(host.flush_runs(Duration::from_secs(60)).await);

    let events = store.events(&summary.run_id).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.data.kind()).collect();
    assert_eq!(kinds.first(), Some(&"q.qflow.run.started.v1"), "{kinds:?}");
    assert!(kinds.contains(&"q.qflow.step.finished.v1"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"q.qflow.run.finished.v1"), "{kinds:?}");
    let sequence: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequence, (1..=events.len() as u64).collect::<Vec<_>>(), "in order, none lost");

    let durations = store.durations().await.unwrap();
    assert!(durations["echo"]["same"] >= 0.0, "{durations:?}");
    assert!(store.uses().await.unwrap()["plugin:identity"] >= 1);
    let snapshots = store.metrics(0, 10).await.unwrap();
    assert_eq!(snapshots.len(), 1, "one while the run ended");
    assert_eq!(snapshots[0].document["executionOptimization"]["runs"], 1);
}

/// The old state files beside the cache are taken into a new store once,
/// then renamed, and a second host reads the store, not the files.
#[tokio::test]
async fn the_old_history_and_uses_files_are_imported_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("history.json"), r#"{"echo/same": 42.5}"#).unwrap();
    std::fs::write(cache.join("uses.json"), r#"{"plugin:identity": 7}"#).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("qflow.db")).await.unwrap());
    let host = Host::new(config(plugins_dir(), Some(&cache)))
        .unwrap()
        .with_store(store.clone(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(host.plan(&flow(ECHO)).critical_path_ms, 42.5, "the imported estimate plans");
    assert!(host.flush_runs(Duration::from_secs(60)).await);
    assert_eq!(store.durations().await.unwrap()["echo"]["same"], 42.5);
    assert_eq!(store.uses().await.unwrap()["plugin:identity"], 7);
    assert!(!cache.join("history.json").exists() && cache.join("history.json.imported").exists());
    assert!(!cache.join("uses.json").exists() && cache.join("uses.json.imported").exists());
    drop(host);
    // Written again by hand: ignored now, the store has its own.
    std::fs::write(cache.join("history.json"), r#"{"echo/same": 1000.0}"#).unwrap();
    let again = Host::new(config(plugins_dir(), Some(&cache)))
        .unwrap()
        .with_store(store.clone(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(again.plan(&flow(ECHO)).critical_path_ms, 42.5);
}

/// 10 000 runs: every listing — newest, by flow, by state, a later page —
/// reads through an index, never the whole table.
#[tokio::test]
async fn listing_ten_thousand_runs_goes_through_an_index() {
    use qflow::model::{RunStart, StoreWrite};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("qflow.db")).await.unwrap());
    // A summary to store 10 000 times, from a host that keeps no runs.
    let finished = crate::support::host().run(&flow(ECHO), json!(0)).await.unwrap();
    for chunk in 0..20 {
        let mut batch = Vec::new();
        for n in 0..500 {
            let i = chunk * 500 + n;
            let run_id = format!("run-{i:05}");
            batch.push(StoreWrite::Started(RunStart {
                run_id: run_id.clone(),
                flow: if i % 2 == 0 { "even".into() } else { "odd".into() },
                flow_text: ECHO.into(),
                flow_origin: "<test>".into(),
                flow_hash: "0".into(),
                input: json!(i),
                started_at_ms: 1_700_000_000_000 + i,
            }));
            if i % 3 != 0 {
                let mut summary = finished.clone();
                summary.run_id = run_id;
                batch.push(StoreWrite::Finished { summary: Box::new(summary), ended_at_ms: 0 });
            }
        }
        store.write(batch).await.unwrap();
    }
    let newest = store.runs(RunQuery::newest(5)).await.unwrap();
    let ids: Vec<&str> = newest.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["run-09999", "run-09998", "run-09997", "run-09996", "run-09995"]);
    let odd = store.runs(RunQuery::newest(3).flow("odd").before("run-09999")).await.unwrap();
    assert_eq!(
        odd.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
        ["run-09997", "run-09995", "run-09993"]
    );
    let running = store.runs(RunQuery::newest(2).status(RunState::Running)).await.unwrap();
    assert_eq!(
        running.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
        ["run-09999", "run-09996"]
    );
    for query in [
        RunQuery::newest(50),
        RunQuery::newest(50).flow("odd"),
        RunQuery::newest(50).status(RunState::Running),
        RunQuery::newest(50).before("run-05000"),
        RunQuery::newest(50).flow("even").before("run-05000"),
    ] {
        let plan = store.listing_plan(&query).await.unwrap().join("; ");
        assert!(
            plan.contains("USING INDEX") || plan.contains("USING COVERING INDEX"),
            "{query:?}: {plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "{query:?} sorts the table: {plan}");
    }
}

/// A database another process holds locked: a clear error naming the
/// file once the wait is over, not a panic and not a hang.
#[tokio::test]
async fn a_locked_database_is_refused_with_its_path() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qflow.db");
    drop(SqliteStore::open(&path).await.unwrap());
    let url = format!("sqlite://{}", path.display());
    let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut holder).await.unwrap();
    let error = SqliteStore::open_waiting(&path, Duration::from_millis(200))
        .await
        .err()
        .expect("a locked file is refused");
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string()) && message.contains("locked"),
        "{message}"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert!(SqliteStore::open(&path).await.is_ok(), "usable once the lock is gone");
}

/// Processes that open a new database at the same moment (the first runs
/// of a fresh machine) all find it migrated; none applies a migration twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_database_opened_at_once_by_many_is_migrated_once() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qflow.db");
        let opens = (0..8).map(|_| {
            let path = path.clone();
            tokio::spawn(async move { SqliteStore::open(&path).await.map(drop) })
        });
        for open in futures::future::join_all(opens).await {
            if let Err(e) = open.unwrap() {
                panic!("round {round}: {e}");
            }
        }
    }
}

/// Retention keeps the newest runs (and none older than the days given),
/// never a running one, and takes the removed runs' events with them.
#[tokio::test]
async fn retention_removes_old_runs_and_their_events_but_never_a_running_one() {
    use qflow::model::{Retention, RunStart, StoreWrite};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("qflow.db")).await.unwrap());
    let host = host_on(&store, 1 << 16).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(host.run(&flow(ECHO), json!(n)).await.unwrap().run_id);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(host.flush_runs(Duration::from_secs(60)).await);
    // One ancient run still running, and one ancient finished run.
    let ancient = |id: &str| {
        StoreWrite::Started(RunStart {
            run_id: id.into(),
            flow: "echo".into(),
            flow_text: ECHO.into(),
            flow_origin: "<test>".into(),
            flow_hash: "0".into(),
            input: json!(null),
            started_at_ms: 1_000,
        })
    };
    let mut old_summary = host.run(&flow(ECHO), json!("old")).await.unwrap();
    assert!(host.flush_runs(Duration::from_secs(60)).await);
    old_summary.run_id = "old-done".into();
    store
        .write(vec![
            ancient("old-running"),
            ancient("old-done"),
            StoreWrite::Finished { summary: Box::new(old_summary), ended_at_ms: 2_000 },
        ])
        .await
        .unwrap();

    let removed = store.prune(Retention::forever().keep_days(1)).await.unwrap();
    assert_eq!(removed, 1, "the ancient finished run");
    assert!(store.run("old-done").await.unwrap().is_none());
    assert!(store.run("old-running").await.unwrap().is_some(), "a running run stays");

    store.prune(Retention::forever().keep_runs(3)).await.unwrap();
    let left: Vec<String> =
        store.runs(RunQuery::newest(100)).await.unwrap().into_iter().map(|r| r.run_id).collect();
    assert!(left.contains(&"old-running".to_owned()), "{left:?}");
    assert!(left.contains(&ids[5]) && !left.contains(&ids[0]), "{left:?}");
    assert!(store.events(&ids[0]).await.unwrap().is_empty(), "its events went with it");
    assert!(!store.events(&ids[5]).await.unwrap().is_empty());
}
