//! The dashboard in a real browser: headless Chromium, driven through
//! ChromeDriver (WebDriver), against a real `qflow serve` on loopback. Every
//! page is loaded at 1280×800 and 390×844 and saved as a screenshot in
//! `target/screenshots/`; a run started from the page is followed live to
//! its timeline; and neither the browser's console (errors, failed loads)
//! nor the page's own error log (failed API requests) may show an error.
//!
//! ChromeDriver and Chromium come from Debian (`chromium`,
//! `chromium-driver`); `.ci/run` installs them. Where they are missing the
//! test says so and passes, unless `QFLOW_REQUIRE_BROWSER=1` (which CI sets)
//! makes that a failure.

// A test that panics on a broken expectation is doing its job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use qflow_tests::{Server, lines, plugins_dir, target_dir, wait_for};
use serde_json::{Value, json};

/// The flow the dashboard shows: a fan-out and a join, with a nap long
/// enough to watch a run while it runs.
const DEMO: &str = r#"
[flow]
name = "demo"
description = "A nap, a fan-out and a join"

[[step]]
id = "nap"
plugin = "sleep"
config = { ms = 1500 }

[[step]]
id = "checksum"
plugin = "hash"
needs = ["nap"]

[[step]]
id = "copy"
plugin = "identity"
needs = ["nap"]

[[step]]
id = "join"
plugin = "identity"
needs = ["checksum", "copy"]
"#;

fn chromedriver() -> Option<PathBuf> {
    let found = ["/usr/bin/chromedriver", "/usr/local/bin/chromedriver"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("QFLOW_REQUIRE_BROWSER").is_none(),
            "no chromedriver: install Debian's chromium and chromium-driver"
        );
        eprintln!("skipped: no chromedriver (apt-get install chromium chromium-driver)");
    }
    found
}

/// ChromeDriver on a free loopback port; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(path: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // It says when it listens.
        let said = lines(child.stdout.take().unwrap());
        wait_for(&said, "started successfully");
        Driver { child, url: format!("http://127.0.0.1:{port}") }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::rustls()
        .unwrap()
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a browser session")
}

/// Asks the page until `script` returns true; a page that never gets there
/// fails the test after 600 asks (a minute, idle), not hang it.
async fn until(client: &Client, what: &str, script: &str) {
    for _ in 0..600 {
        let ready = client.execute(script, vec![]).await.unwrap();
        if ready == Value::Bool(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let errors = errors(client).await;
    panic!("{what} did not happen after 600 asks (page errors: {errors:?})");
}

/// ChromeDriver's browser log since the last read: every console message,
/// failed load and uncaught exception.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(json!({"type": "browser"}).to_string()))
    }
}

/// What went wrong on the page: the console's errors (as the browser
/// logged them) and what the page recorded itself.
async fn errors(client: &Client) -> Vec<String> {
    let mut errors = Vec::new();
    let log = client.issue_cmd(BrowserLog).await.expect("the browser log");
    for entry in log.as_array().into_iter().flatten() {
        if entry["level"] == "SEVERE" {
            errors.push(format!("console: {}", entry["message"].as_str().unwrap_or_default()));
        }
    }
    let found = client.execute("return window.__qflowErrors || ['no error log'];", vec![]).await;
    let page: Vec<String> = serde_json::from_value(found.unwrap_or_default()).unwrap_or_default();
    errors.extend(page.into_iter().map(|e| format!("page: {e}")));
    errors
}

/// Loads `hash`, waits until the page says it is drawn, checks it has no
/// errors, and saves a screenshot as `name`.
async fn visit(client: &Client, server: &Server, hash: &str, ready: &str, name: &str) {
    client.goto(&format!("{}/{hash}", server.url)).await.unwrap();
    let script = format!("return document.getElementById('page').dataset.ready === '{ready}';");
    until(client, &format!("page {hash}"), &script).await;
    shoot(client, name).await;
    assert_eq!(errors(client).await, Vec::<String>::new(), "errors on {hash}");
}

async fn shoot(client: &Client, name: &str) {
    let dir = target_dir().join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_every_page_and_follows_a_run_live() {
    let Some(chromedriver) = chromedriver() else { return };
    let (data, flows, profile) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(flows.path().join("demo.toml"), DEMO).unwrap();
    let server = Server::start(data.path(), flows.path(), plugins_dir());
    // Something to show: two runs (the second one a failure).
    let (status, _) = server.http("POST", "/api/v1/flows/demo/runs", Some(&json!({"wait": true})));
    assert_eq!(status, 200);
    let failing = json!({
        "flow": {"name": "broken"},
        "step": [{"id": "bad", "plugin": "jq", "config": {"filter": ".a.b"}}],
    });
    let (status, answer) = server.http("POST", "/api/v1/flows", Some(&failing));
    assert_eq!(status, 201, "{answer}");
    let (_, failed) = server.http(
        "POST",
        "/api/v1/flows/broken/runs",
        Some(&json!({"input": [1], "wait": true})),
    );
    assert_eq!(failed["status"], "failed", "{failed}");
    // And a query, so that a database's connection pool has something to show.
    let db = format!("sqlite:{}", data.path().join("shop.db").display());
    let stored = json!({
        "flow": {"name": "stored"},
        "database": [{"id": "shop", "url": db}],
        "step": [{"id": "one", "plugin": "sql", "databases": ["shop"],
                  "config": {"db": "shop", "statement": "SELECT 1 AS one"}}],
    });
    let (status, answer) = server.http("POST", "/api/v1/flows", Some(&stored));
    assert_eq!(status, 201, "{answer}");
    let (_, queried) =
        server.http("POST", "/api/v1/flows/stored/runs", Some(&json!({"wait": true})));
    assert_eq!(queried["status"], "succeeded", "{queried}");

    let driver = Driver::start(&chromedriver);
    let client = browser(&driver, profile.path()).await;
    for (width, height) in [(1280, 800), (390, 844)] {
        client.set_window_size(width, height).await.unwrap();
        let size = format!("{width}x{height}");
        visit(&client, &server, "#/overview", "overview", &format!("overview-{size}")).await;
        visit(&client, &server, "#/flows", "flows", &format!("flows-{size}")).await;
        visit(&client, &server, "#/flows/demo", "flow", &format!("flow-demo-{size}")).await;
        visit(&client, &server, "#/runs", "runs", &format!("runs-{size}")).await;
        visit(&client, &server, "#/plugins", "plugins", &format!("plugins-{size}")).await;
        visit(
            &client,
            &server,
            &format!("#/runs/{}", failed["run_id"].as_str().unwrap()),
            "run",
            &format!("run-failed-{size}"),
        )
        .await;
    }
    client.set_window_size(1280, 800).await.unwrap();

    // The plugins page lists the database's pool beside their instances.
    visit(&client, &server, "#/plugins", "plugins", "plugins").await;
    let pools = client.find(Locator::Id("connection-pools")).await.unwrap().text().await.unwrap();
    assert!(pools.contains("db") && pools.contains("shop"), "{pools}");

    // The plan is drawn: four steps, the critical path marked.
    visit(&client, &server, "#/flows/demo", "flow", "flow-demo").await;
    let nodes = client.find_all(Locator::Css("#plan-graph g.node")).await.unwrap();
    assert_eq!(nodes.len(), 4);
    let critical = client.find_all(Locator::Css("#plan-graph g.node.critical")).await.unwrap();
    assert!(critical.len() >= 3, "nap, a branch and join are on the critical path");
    // An optimize preview.
    client.find(Locator::Id("preview")).await.unwrap().click().await.unwrap();
    until(
        &client,
        "the preview",
        "return document.getElementById('optimized').textContent.length > 0;",
    )
    .await;

    // A run started from the page: followed live, then its timeline.
    client.find(Locator::Id("run-button")).await.unwrap().click().await.unwrap();
    until(&client, "the run page", "return location.hash.startsWith('#/runs/');").await;
    until(
        &client,
        "a step shown live",
        "return !!document.querySelector('#live-steps tr[data-step]');",
    )
    .await;
    shoot(&client, "run-live").await;
    until(
        &client,
        "the timeline",
        "return document.querySelectorAll('#timeline rect.bar').length === 4;",
    )
    .await;
    let status =
        client.find(Locator::Id("run-status")).await.unwrap().attr("data-status").await.unwrap();
    assert_eq!(status.as_deref(), Some("succeeded"));
    // Each bar starts with its load phase (plugin and first instance).
    let loads = client.find_all(Locator::Css("#timeline rect.load")).await.unwrap();
    assert!(!loads.is_empty() && loads.len() <= 4, "{} load phases", loads.len());
    shoot(&client, "run-timeline").await;
    assert_eq!(errors(&client).await, Vec::<String>::new());

    // The runs list takes a run started elsewhere as it happens.
    visit(&client, &server, "#/runs", "runs", "runs-before").await;
    let (_, started) = server.http("POST", "/api/v1/flows/demo/runs", Some(&json!({})));
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    let row = format!("return !!document.querySelector('tr[data-run=\"{run_id}\"]');");
    until(&client, "the new run in the list", &row).await;
    let done = format!(
        "return !!document.querySelector('tr[data-run=\"{run_id}\"][data-status=\"succeeded\"]');"
    );
    until(&client, "the new run ending in the list", &done).await;
    shoot(&client, "runs-live").await;
    assert_eq!(errors(&client).await, Vec::<String>::new());
    client.close().await.unwrap();
}
