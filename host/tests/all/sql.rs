//! SQL from steps (`qflow:plugin/sql`, the bundled `sql` plugin) against
//! real databases: SQLite files in a temporary directory, and PostgreSQL
//! (CI's server, or a throwaway cluster of the test's own). Round trips,
//! bound parameters, read-only grants, typed errors, pooled connections,
//! and a database restarted in the middle of a run.

use std::sync::Arc;
use std::time::Duration;

use qflow::model::{Database, PoolSettings};
use qflow::{Host, RunStatus, RunSummary, StepStatus};
use serde_json::{Value, json};

use qflow_tests::{HttpServer, Postgres, postgres_url};

use crate::support::{config, flow, plugins_dir};

fn host(databases: Vec<Database>) -> Host {
    let mut config = config(plugins_dir(), None);
    config.databases = databases;
    Host::new(config).expect("the host starts")
}

/// A `sql` step granted `databases`: `head` is more lines of its table
/// (`needs`, `input`), `config` the body of its `[step.config]`.
fn step(id: &str, databases: &[&str], head: &str, config: &str) -> String {
    let list = databases.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ");
    format!(
        "[[step]]\nid = \"{id}\"\nplugin = \"sql\"\ndatabases = [{list}]\n{head}\n[step.config]\n{config}\n"
    )
}

fn flow_of(steps: &[String]) -> String {
    format!("[flow]\nname = \"sql\"\n{}", steps.concat())
}

async fn run(host: &Host, steps: &[String], input: Value) -> RunSummary {
    host.run(&flow(&flow_of(steps)), input).await.unwrap_or_else(|e| panic!("{e}"))
}

fn assert_succeeded(summary: &RunSummary) {
    assert_eq!(
        summary.status,
        RunStatus::Succeeded,
        "{:?}",
        summary.steps.iter().filter_map(|s| s.error.as_ref()).collect::<Vec<_>>()
    );
}

/// The failed step's (code, message).
fn failure(summary: &RunSummary, id: &str) -> (String, String) {
    let step = summary.step(id).unwrap_or_else(|| panic!("no step {id}"));
    assert_eq!(step.status, StepStatus::Failed, "{id}: {:?}", step.output);
    let error = step.error.as_ref().unwrap();
    (error.code.clone().unwrap_or_default(), error.message.clone())
}

/// A table name of this test's own, on a server other tests share.
fn table(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}_{:x}_{}", nanos & 0xffff_ffff_ffff, std::process::id())
}

/// Writes rows, reads them back by a bound parameter, and shows that
/// values crafted as SQL stay values.
async fn round_trip(host: &Host, db: &str, create: &str, t: &str) {
    let evil = format!("x'); DROP TABLE {t}; --");
    let write = step(
        "write",
        &[db],
        // No spare instance: two `setup`s at once race in PostgreSQL.
        "input = \"${input.rows}\"\npool = { min = 0 }",
        &format!(
            "db = {db:?}\neach = true\nparams = [\"id\", \"name\", \"total\"]\nsetup = [{create:?}]\nstatement = \"INSERT INTO {t} (id, name, total) VALUES ($1, $2, $3)\""
        ),
    );
    let read = step(
        "read",
        &[db],
        "needs = [\"write\"]\ninput = { name = \"${input.lookup}\" }",
        &format!(
            "db = {db:?}\nparams = [\"name\"]\nstatement = \"SELECT id, name, total, NULL AS missing FROM {t} WHERE name = $1 ORDER BY id\""
        ),
    );
    let rows = json!([
        {"id": 1, "name": "Ada", "total": 12.5},
        {"id": 2, "name": evil, "total": 3.0},
        {"id": 3, "name": "x' OR '1'='1", "total": 1.0},
    ]);
    let summary = run(host, &[write, read], json!({"rows": rows, "lookup": evil})).await;
    assert_succeeded(&summary);
    assert_eq!(summary.output("write"), Some(json!({"rows_affected": 3})));
    // The crafted name is found as the data it is; the table is still there.
    assert_eq!(
        summary.output("read"),
        Some(json!([{"id": 2, "name": evil, "total": 3.0, "missing": null}]))
    );
    // "x' OR '1'='1" bound as $1 matches only the row that holds that text.
    let count = step(
        "count",
        &[db],
        "",
        &format!(
            "db = {db:?}\nparams = [\"name\"]\nstatement = \"SELECT count(*) AS n FROM {t} WHERE name = $1\""
        ),
    );
    let summary = run(host, &[count], json!({"name": "x' OR '1'='1"})).await;
    assert_succeeded(&summary);
    assert_eq!(summary.output("count"), Some(json!([{"n": 1}])));
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_round_trips_with_bound_parameters_and_injection_stays_data() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("orders.db").display());
    let host = host(vec![Database::new("orders", url)]);
    let create =
        "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, total REAL)";
    round_trip(&host, "orders", create, "t").await;
    // SQLite's own types come back as JSON: a blob as base64.
    let types = step(
        "types",
        &["orders"],
        "",
        "db = \"orders\"\nstatement = \"SELECT 1 AS i, 2.5 AS r, 'text' AS s, x'00ff' AS b, NULL AS n, $1 AS echoed\"",
    );
    let summary = run(&host, &[types], json!(["bound"])).await;
    assert_succeeded(&summary);
    assert_eq!(
        summary.output("types"),
        Some(json!([{"i": 1, "r": 2.5, "s": "text", "b": "AP8=", "n": null, "echoed": "bound"}]))
    );
    // A query is told by its first word after any comments.
    let commented = step(
        "commented",
        &["orders"],
        "",
        "db = \"orders\"\nstatement = \"/* how many */ -- rows\\n SELECT count(*) AS n FROM t\"",
    );
    let summary = run(&host, &[commented], json!(null)).await;
    assert_succeeded(&summary);
    assert_eq!(summary.output("commented"), Some(json!([{"n": 3}])));
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_round_trips_with_bound_parameters_and_injection_stays_data() {
    let Some((url, _server)) = postgres_url() else { return };
    let host = host(vec![Database::new("pg", url)]);
    let t = table("qflow_round_trip");
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {t} (id INT8 PRIMARY KEY, name TEXT NOT NULL, total FLOAT8)"
    );
    round_trip(&host, "pg", &create, &t).await;
    // PostgreSQL's types come back as their JSON values.
    let types = step(
        "types",
        &["pg"],
        "",
        r#"db = "pg"
statement = '''SELECT 1::int4 AS i, 2.5::numeric AS d, 0.25::float4 AS f, true AS b, '{"k": [1]}'::jsonb AS j,
  '\x00ff'::bytea AS bytes, NULL::text AS n, DATE '2026-12-03' AS day,
  TIMESTAMPTZ '2026-12-03 10:00:00+00' AS at, $1::text AS echoed, $2::int8 + 1 AS next, $3::int4 IS NULL AS null_param'''"#,
    );
    let summary = run(&host, &[types], json!(["bound", 41, null])).await;
    assert_succeeded(&summary);
    assert_eq!(
        summary.output("types"),
        Some(json!([{
            "i": 1, "d": 2.5, "f": 0.25, "b": true, "j": {"k": [1]}, "bytes": "AP8=", "n": null,
            "day": "2026-12-03", "at": "2026-12-03T10:00:00Z", "echoed": "bound", "next": 42,
            "null_param": true,
        }]))
    );
    // A type with no JSON form is named, with the way out.
    let point = step("point", &["pg"], "", "db = \"pg\"\nstatement = \"SELECT point(1, 2) AS p\"");
    let summary = run(&host, &[point], json!(null)).await;
    let (code, message) = failure(&summary, "point");
    assert_eq!(code, "sql-unsupported");
    assert!(
        message.contains("column `p` has type POINT") && message.contains("::text"),
        "{message}"
    );
}

/// Eight steps whose instances start at once, each creating the table it
/// writes to: in PostgreSQL, concurrent `CREATE TABLE IF NOT EXISTS`
/// collide on the catalog's unique index, and the `sql` plugin's setup
/// tries the loser again, which then finds the table.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_setups_of_one_table_all_succeed_in_postgres() {
    let Some((url, _server)) = postgres_url() else { return };
    let host = host(vec![Database::new("pg", url)]);
    for round in 0..3 {
        let t = table(&format!("qflow_setup_race{round}"));
        let steps: Vec<String> = (0..8)
            .map(|i| {
                step(
                    &format!("w{i}"),
                    &["pg"],
                    // Each its own plugin instance: eight `init`s at once.
                    &format!("input = [{i}]
pool = {{ min = 0 }}"),
                    &format!(
                        "db = \"pg\"\nsetup = [\"CREATE TABLE IF NOT EXISTS {t} (id INT4 PRIMARY KEY)\"]\nstatement = \"INSERT INTO {t} (id) VALUES ($1)\""
                    ),
                )
            })
            .collect();
        let summary = run(&host, &steps, json!(null)).await;
        assert_succeeded(&summary);
        let count = step(
            "count",
            &["pg"],
            "",
            &format!("db = \"pg\"\nstatement = \"SELECT count(*)::int4 AS n FROM {t}\""),
        );
        assert_eq!(
            run(&host, &[count], json!(null)).await.output("count"),
            Some(json!([{"n": 8}]))
        );
    }
}

/// Writes through a read-only grant, every way a step could try.
async fn read_only_refuses(host: &Host, db: &str, t: &str) {
    let execute = step(
        "execute",
        &[db],
        "",
        &format!("db = {db:?}\nstatement = \"INSERT INTO {t} (id) VALUES (2)\""),
    );
    let summary = run(host, &[execute], json!(null)).await;
    let (code, message) = failure(&summary, "execute");
    assert_eq!(code, "sql-read-only", "{message}");
    assert!(message.contains(&format!("database `{db}` is granted read-only")), "{message}");
    // A write disguised as a query is refused by the database itself.
    let returning = step(
        "returning",
        &[db],
        "",
        &format!("db = {db:?}\nstatement = \"INSERT INTO {t} (id) VALUES (3) RETURNING id\""),
    );
    let summary = run(host, &[returning], json!(null)).await;
    let (code, message) = failure(&summary, "returning");
    assert_eq!(code, "sql-read-only", "{message}");
    // Reading works, and nothing was written.
    let read = step("read", &[db], "", &format!("db = {db:?}\nstatement = \"SELECT id FROM {t}\""));
    let summary = run(host, &[read], json!(null)).await;
    assert_succeeded(&summary);
    assert_eq!(summary.output("read"), Some(json!([{"id": 1}])));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_grant_refuses_writes_in_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ro.db");
    let url = format!("sqlite:{}", file.display());
    let writer = host(vec![Database::new("rw", url.clone())]);
    let setup = step(
        "setup",
        &["rw"],
        "",
        "db = \"rw\"\nsetup = [\"CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY)\"]\nstatement = \"INSERT INTO t (id) VALUES (1)\"",
    );
    assert_succeeded(&run(&writer, &[setup], json!(null)).await);
    let reader = host(vec![Database::new("ro", url).read_only(true)]);
    read_only_refuses(&reader, "ro", "t").await;

    let Some((url, _server)) = postgres_url() else { return };
    let t = table("qflow_read_only");
    let writer = host(vec![Database::new("pg", url.clone())]);
    let setup = step(
        "setup",
        &["pg"],
        // No spare instance: two `setup`s at once race in PostgreSQL.
        "pool = { min = 0 }",
        &format!(
            "db = \"pg\"\nsetup = [\"CREATE TABLE IF NOT EXISTS {t} (id INT4 PRIMARY KEY)\"]\nstatement = \"INSERT INTO {t} (id) VALUES (1)\""
        ),
    );
    assert_succeeded(&run(&writer, &[setup], json!(null)).await);
    // One connection, so the next call gets the session the SET changed.
    let pool = PoolSettings::default().with_max(1);
    let reader = host(vec![Database::new("pgro", url).read_only(true).pool(pool)]);
    let unset = step(
        "unset",
        &["pgro"],
        "",
        "db = \"pgro\"\nstatement = \"SELECT set_config('default_transaction_read_only', 'off', false) AS was\"",
    );
    assert_succeeded(&run(&reader, &[unset], json!(null)).await);
    read_only_refuses(&reader, "pgro", &t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_typed_and_name_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("e.db").display());
    let other = format!("sqlite:{}", dir.path().join("other.db").display());
    let host = host(vec![
        Database::new("e", url).statement_timeout_ms(200),
        Database::new("other", other),
    ]);
    let setup = step(
        "setup",
        &["e"],
        "",
        "db = \"e\"\nsetup = [\"CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY)\"]\nstatement = \"INSERT INTO t (id) VALUES (1)\"",
    );
    assert_succeeded(&run(&host, &[setup], json!(null)).await);
    let attach = dir.path().join("stolen.db");
    let cases = [
        ("SELEC 1", "sql-syntax", "syntax error".to_owned()),
        ("SELECT * FROM missing", "sql-syntax", "no such table".to_owned()),
        ("INSERT INTO t (id) VALUES (1)", "sql-constraint", "UNIQUE".to_owned()),
        ("CREATE TABLE t (id INTEGER)", "sql-constraint", "already exists".to_owned()),
        (
            "WITH RECURSIVE forever(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM forever) SELECT count(*) FROM forever",
            "sql-timeout",
            "timeout".to_owned(),
        ),
        (
            &*format!("ATTACH DATABASE '{}' AS stolen", attach.display()),
            "sql-syntax",
            "ATTACH is not allowed".to_owned(),
        ),
        ("SELECT 1; DELETE FROM t", "sql-syntax", "one statement".to_owned()),
        ("SELECT $1(--);ATTACH 'x.db' AS x", "sql-syntax", "ATTACH is not".to_owned()),
        ("BEGIN IMMEDIATE", "sql-syntax", "BEGIN is not allowed".to_owned()),
        ("SELECT 1 AS a, 2 AS a", "sql-unsupported", "two columns are named `a`".to_owned()),
        // Refused by SQLite before a gigabyte is made.
        ("SELECT zeroblob(1000000000) AS b", "sql-unsupported", "too big".to_owned()),
    ];
    for (statement, code, says) in cases {
        let bad =
            step("bad", &["e"], "", &format!("db = \"e\"\nparams = []\nstatement = {statement:?}"));
        let summary = run(&host, &[bad], json!({})).await;
        let (found, message) = failure(&summary, "bad");
        assert_eq!(found, code, "{statement}: {message}");
        assert!(
            message.contains(says.as_str()) && message.contains("database `e`"),
            "{statement}: {message}"
        );
    }
    assert!(!attach.exists(), "ATTACH created no file");
    // A database the host declares but the step was not granted.
    let ungranted = step("ungranted", &["e"], "", "db = \"other\"\nstatement = \"SELECT 1\"");
    let summary = run(&host, &[ungranted], json!(null)).await;
    let (code, message) = failure(&summary, "ungranted");
    assert_eq!(code, "sql-unknown-database");
    assert!(message.contains("no grant for database `other` (it may use: e)"), "{message}");
    // A database nobody declares is refused before the run, naming the step.
    let undeclared =
        step("undeclared", &["nowhere"], "", "db = \"nowhere\"\nstatement = \"SELECT 1\"");
    let error =
        host.run(&flow(&flow_of(&[undeclared])), json!(null)).await.unwrap_err().to_string();
    assert!(error.contains("step `undeclared`: no database `nowhere`"), "{error}");
    assert!(error.contains("declared: e, other"), "{error}");
    // The host is fine, and the table holds what it held.
    let read = step("read", &["e"], "", "db = \"e\"\nstatement = \"SELECT count(*) AS n FROM t\"");
    let summary = run(&host, &[read], json!(null)).await;
    assert_succeeded(&summary);
    assert_eq!(summary.output("read"), Some(json!([{"n": 1}])));

    // PostgreSQL ends a statement at its timeout itself.
    let Some((url, _server)) = postgres_url() else { return };
    let host = self::host(vec![Database::new("pg", url).statement_timeout_ms(200)]);
    let sleep = step("sleep", &["pg"], "", "db = \"pg\"\nstatement = \"SELECT pg_sleep(30)\"");
    let summary = run(&host, &[sleep], json!(null)).await;
    let (code, message) = failure(&summary, "sleep");
    assert_eq!(code, "sql-timeout", "{message}");
    let bad = step("bad", &["pg"], "", "db = \"pg\"\nstatement = \"SELEC 1\"");
    let (code, _) = failure(&run(&host, &[bad], json!(null)).await, "bad");
    assert_eq!(code, "sql-syntax");
    // Parameters that do not fit the statement: the step's mistake.
    let short = step(
        "short",
        &["pg"],
        "",
        "db = \"pg\"\nparams = [\"a\"]\nstatement = \"SELECT $1::int4 + $2::int4 AS n\"",
    );
    let (code, message) = failure(&run(&host, &[short], json!({"a": 1})).await, "short");
    assert_eq!(code, "sql-syntax", "{message}");
    // A step cannot switch its timeout off for the calls after it (nor
    // leave a transaction open on the shared connection): each call is a
    // transaction with the timeout set in it.
    for statement in ["SET statement_timeout = 0", "BEGIN"] {
        let unset = step("unset", &["pg"], "", &format!("db = \"pg\"\nstatement = {statement:?}"));
        let sleep = step(
            "sleep",
            &["pg"],
            "needs = [\"unset\"]",
            "db = \"pg\"\nparams = []\nstatement = \"SELECT pg_sleep(30)\"",
        );
        let summary = run(&host, &[unset, sleep], json!(null)).await;
        assert_eq!(summary.step("unset").unwrap().status, StepStatus::Succeeded, "{statement}");
        let (code, message) = failure(&summary, "sleep");
        assert_eq!(code, "sql-timeout", "after {statement}: {message}");
        // Stopped by PostgreSQL itself, not by the host's late backstop.
        assert!(message.contains("canceling statement due to statement timeout"), "{message}");
    }
    let exists = step("exists", &["pg"], "", "db = \"pg\"\nstatement = \"CREATE SCHEMA public\"");
    let (code, message) = failure(&run(&host, &[exists], json!(null)).await, "exists");
    assert_eq!(code, "sql-constraint", "{message}");
    assert!(message.contains("already exists"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_steps_share_a_pool_of_three_connections() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("p.db").display());
    let pool = PoolSettings::default().with_max(3);
    let host = host(vec![Database::new("p", url).pool(pool)]);
    let steps: Vec<String> = (0..50)
        .map(|i| {
            step(
                &format!("q{i}"),
                &["p"],
                "",
                &format!("db = \"p\"\nstatement = \"SELECT {i} AS i\""),
            )
        })
        .collect();
    let summary = run(&host, &steps, json!(null)).await;
    assert_succeeded(&summary);
    for i in 0..50 {
        assert_eq!(summary.output(&format!("q{i}")), Some(json!([{"i": i}])));
    }
    let stats = host.db_pool_stats();
    let (_, p) = stats.iter().find(|(id, _)| id == "p").expect("the database's pool");
    assert!(p.creations >= 1 && p.creations <= 3, "{p:?}");
    assert!(p.total <= 3 && p.in_use == 0, "{p:?}");
    assert!(p.acquisitions >= 50, "{p:?}");
    let pools = host.resource_pools();
    assert!(pools.db.by_key.iter().any(|k| k.key == "p"), "{pools:?}");
    assert_eq!(host.metrics("balanced").resource_pools.db, pools.db);
}

/// The database pool's figures.
fn db_stats(host: &Host, id: &str) -> qflow::PoolStats {
    let stats = host.db_pool_stats();
    stats.into_iter().find(|(key, _)| key == id).map(|(_, s)| s).expect("the database's pool")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_in_the_middle_of_a_run_costs_no_step() {
    let Some(server) = Postgres::start() else { return };
    let gate = Arc::new(HttpServer::start());
    // Health checks every 100 ms: the test waits for one to drop the dead
    // connection before the run goes on.
    let pool = PoolSettings::default().with_health_check_ms(100);
    let host = Arc::new(host(vec![Database::new("pg", server.url.clone()).pool(pool)]));
    let pid = "db = \"pg\"\nparams = []\nstatement = \"SELECT pg_backend_pid() AS pid\"";
    let first = step("first", &["pg"], "", pid);
    let wait = format!(
        "[[step]]\nid = \"wait\"\nplugin = \"http-get\"\nneeds = [\"first\"]\nhttp = [\"127.0.0.1:{port}\"]\nconfig = {{ url = \"http://127.0.0.1:{port}/gate\" }}\n",
        port = gate.port
    );
    let second = step("second", &["pg"], "needs = [\"wait\"]", pid);
    let flow = flow(&flow_of(&[first, wait, second]));
    let mut running = tokio::spawn({
        let host = host.clone();
        async move { host.run(&flow, json!(null)).await }
    });
    // `first` is done, its connection idle in the pool; `wait` is at the gate.
    let waiting = gate.clone();
    tokio::select! {
        waited = tokio::task::spawn_blocking(move || waiting.wait_at_gate()) => waited.unwrap(),
        ended = &mut running => panic!("the run ended before its gate: {ended:?}"),
    }
    assert_eq!(db_stats(&host, "pg").total, 1);
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    // The health check finds the connection dead and drops it.
    let mut polls = 0;
    while db_stats(&host, "pg").total > 0 {
        polls += 1;
        assert!(polls < 1200, "the dead connection is still pooled: {:?}", db_stats(&host, "pg"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gate.open_gate();
    let summary = running.await.unwrap().unwrap();
    assert_succeeded(&summary);
    let pid = |id: &str| summary.output(id).unwrap()[0]["pid"].clone();
    assert_ne!(pid("first"), pid("second"), "a new connection, to the new server");
    assert_eq!(db_stats(&host, "pg").creations, 2);

    // Without health checks, a connection idle for longer than half a
    // second is pinged before use: the restart again costs no step.
    let pool = PoolSettings::default().with_health_check_ms(3_600_000);
    let host = self::host(vec![Database::new("pg", server.url.clone()).pool(pool)]);
    let once = step("once", &["pg"], "", pid_statement());
    assert_succeeded(&run(&host, std::slice::from_ref(&once), json!(null)).await);
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_succeeded(&run(&host, &[once], json!(null)).await);
    assert_eq!(db_stats(&host, "pg").creations, 2);
    drop(server);
}

fn pid_statement() -> &'static str {
    "db = \"pg\"\nparams = []\nstatement = \"SELECT pg_backend_pid() AS pid\""
}
