//! The real server on an ephemeral loopback port, driven by a real HTTP
//! client: flows, runs, optimization, plugins, events, errors, the token,
//! and shutdown.

// A test that panics on a broken expectation is doing its job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use qflow::{Host, HostConfig};
use qflow_server::{AppState, ServerConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// A server running in this process, and how to stop it.
struct Server {
    base: String,
    /// The run store's directory, alive as long as the server (unless the
    /// test gave one of its own).
    _data: Option<tempfile::TempDir>,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), qflow_server::ServeError>>,
    client: reqwest::Client,
}

impl Server {
    async fn start(config: ServerConfig) -> Server {
        Server::start_with(config, |_| {}).await
    }

    async fn start_with(config: ServerConfig, tune: impl FnOnce(&mut HostConfig)) -> Server {
        let data = tempfile::tempdir().unwrap();
        let path = data.path().join("qflow.db");
        let mut server = Server::start_on(config, &path, tune).await;
        server._data = Some(data);
        server
    }

    /// A server whose run store is the file at `store`.
    async fn start_on(
        config: ServerConfig,
        store: &std::path::Path,
        tune: impl FnOnce(&mut HostConfig),
    ) -> Server {
        let mut host = HostConfig::new(qflow_tests::plugins_dir());
        host.cache.dir = None;
        host.preload = false;
        tune(&mut host);
        let store = qflow::store::SqliteStore::open(store).await.unwrap();
        let host = Host::new(host).unwrap().with_store(Arc::new(store), 1 << 16).await.unwrap();
        let state = AppState::new(Arc::new(host), config).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound, address) = oneshot::channel::<SocketAddr>();
        let task = tokio::spawn(qflow_server::serve(
            state.clone(),
            async move {
                let _ = stopped.await;
            },
            move |addr| {
                let _ = bound.send(addr);
            },
        ));
        let addr = address.await.expect("the server binds");
        Server {
            base: format!("http://{addr}"),
            _data: None,
            state,
            stop: Some(stop),
            task,
            client: reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap(),
        }
    }

    async fn default() -> Server {
        let mut config = ServerConfig::default();
        config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Server::start(config).await
    }

    /// A server whose compiled-component cache holds about two plugins.
    async fn small_cache() -> Server {
        let mut config = ServerConfig::default();
        config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Server::start_with(config, |host| host.cache.memory_limit = 1 << 20).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(&self, path: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Stops the server and waits for it, as SIGTERM would.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

/// The JSON of the server-sent events on `body`, read until `done` says
/// so (or a generous minute passes: then the test fails, listing them).
async fn read_events(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let (mut text, mut seen) = (String::new(), Vec::new());
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                    seen.push(serde_json::from_str::<Value>(data).unwrap());
                    if done(&seen) {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the events stopped short: {seen:?}");
    seen
}

const SQUARE: &str = r#"{
    "flow": {"name": "square", "max_parallel": 4},
    "steps": [
        {"id": "a", "plugin": "identity"},
        {"id": "b", "plugin": "hash", "needs": ["a"]},
        {"id": "c", "plugin": "identity", "needs": ["a"]},
        {"id": "d", "plugin": "identity", "needs": ["b", "c", "a"], "input": {"b": "${steps.b.output}", "c": "${steps.c.output}"}}
    ]
}"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_flow_is_registered_run_and_reported() {
    let server = Server::default().await;
    let (status, created) = server.post_raw("/api/v1/flows", "application/json", SQUARE).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["id"], "square");
    assert_eq!(created["steps"], json!(["a", "b", "c", "d"]));
    // Registering again replaces it.
    let (status, _) = server.post_raw("/api/v1/flows", "application/json", SQUARE).await;
    assert_eq!(status, StatusCode::OK);

    let (status, list) = server.get("/api/v1/flows").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, shown) = server.get("/api/v1/flows/square").await;
    assert_eq!(shown["plan"]["groups"], json!([["a"], ["b", "c"], ["d"]]));
    assert!(shown["text"].as_str().unwrap().contains("\"square\""));

    // With wait: the summary.
    let (status, summary) =
        server.post("/api/v1/flows/square/runs", json!({"input": "abc", "wait": true})).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(summary["steps"][3]["output"]["b"]["bytes"], 3);
    assert_eq!(summary["steps"][3]["output"]["c"], "abc");

    // Without: 202 and the id; the run is read back when it is done.
    let (status, accepted) = server.post("/api/v1/flows/square/runs", json!({"input": "xy"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let run_id = accepted["run_id"].as_str().unwrap().to_owned();
    let run = loop {
        let (status, run) = server.get(&format!("/api/v1/runs/{run_id}")).await;
        assert_eq!(status, StatusCode::OK);
        if run["status"] != "running" {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["summary"]["run_id"], run_id.as_str());
    assert_eq!(run["summary"]["steps"][0]["output"], "xy");

    let (_, runs) = server.get("/api/v1/runs?flow=square&status=succeeded&limit=1").await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
    assert_eq!(runs[0]["run_id"], run_id.as_str(), "newest first");
    let (_, none) = server.get("/api/v1/runs?flow=other").await;
    assert_eq!(none, json!([]));

    // The metrics count what ran: two runs, each with b and c side by side
    // or not; the figures follow their definitions.
    let (status, metrics) = server.get("/api/v1/optimization/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(metrics["optimizationEnabled"], true);
    assert_eq!(metrics["optimizationLevel"], "balanced");
    let execution = &metrics["executionOptimization"];
    assert_eq!(execution["runs"], 2);
    assert!(execution["parallelExecutionCount"].as_u64().unwrap() <= 2);
    assert!(execution["averageExecutionTime"].as_f64().unwrap() > 0.0);
    assert_eq!(metrics["lazyLoading"]["totalEntries"], 2, "identity and hash compiled");
    let wasm = &metrics["resourcePools"]["wasm"];
    assert_eq!(wasm["acquisitionCount"], 8, "four steps, two runs");
    let (_, pools) = server.get("/api/v1/optimization/pools/stats").await;
    assert_eq!(pools["wasm"]["acquisitionCount"], 8);
    let keys: Vec<&str> = pools["wasm"]["byKey"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"hash") && keys.contains(&"identity"), "{keys:?}");

    // Prometheus counts the same runs.
    let text =
        server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("qflow_runs_total{flow=\"square\",status=\"succeeded\"} 2"), "{text}");
    assert!(text.contains("qflow_steps_total{plugin=\"hash\",status=\"succeeded\"} 2"), "{text}");
    assert!(text.contains("qflow_step_duration_seconds_bucket"), "{text}");
    assert!(text.contains("qflow_cache_misses_total{cache=\"components\"} 2"), "{text}");

    // The plugins.
    let (_, plugins) = server.get("/api/v1/plugins").await;
    let names: Vec<&str> =
        plugins.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"jq") && names.contains(&"file-loader"), "{names:?}");

    let (status, _) = server
        .client
        .delete(server.url("/api/v1/flows/square"))
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server.get("/api/v1/flows/square").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recommendations_and_an_applied_optimization_rewrite_the_flow_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("square.toml");
    let toml = "# kept through the rewrite\n[flow]\nname = \"square\"\n\
                [[step]]\nid = \"a\"\nplugin = \"identity\"\n\
                [[step]]\nid = \"b\"\nplugin = \"identity\"\nneeds = [\"a\"]\n\
                [[step]]\nid = \"c\"\nplugin = \"identity\"\nneeds = [\"b\", \"a\"]\ninput = \"${steps.b.output}\"\n";
    std::fs::write(&file, toml).unwrap();
    let mut config = ServerConfig::default();
    config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.flows_dir = Some(dir.path().to_path_buf());
    let server = Server::start(config).await;
    let mut events = server.state.host().subscribe();

    let (status, found) = server.get("/api/v1/flows/square/recommendations").await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let kinds: Vec<&str> = found["recommendations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"redundant-dependency"), "{found}");

    // A preview changes nothing on disk.
    let (status, preview) =
        server.post("/api/v1/flows/square/optimize", json!({"level": "conservative"})).await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(preview["applied"], false);
    assert!(preview["diff"].as_str().unwrap().contains("-needs = [\"b\", \"a\"]"), "{preview}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), toml);

    let (status, applied) = server
        .post("/api/v1/flows/square/optimize", json!({"level": "conservative", "apply": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    assert_eq!(applied["applied"], true);
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.starts_with("# kept through the rewrite"), "{written}");
    assert!(written.contains("needs = [\"b\"]"), "{written}");
    assert_eq!(std::fs::read_to_string(dir.path().join("square.toml.bak")).unwrap(), toml);
    let (_, shown) = server.get("/api/v1/flows/square").await;
    assert_eq!(shown["text"].as_str().unwrap(), written, "the server serves the new version");

    let mut optimized = 0;
    while let Ok(event) = events.try_recv() {
        if event.data.kind() == "q.qflow.optimization.flow.optimized.v1" {
            optimized += 1;
        }
    }
    assert_eq!(optimized, 2, "one event per optimize call");

    let (status, error) =
        server.post("/api/v1/flows/square/optimize", json!({"level": "max"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_request_gets_a_json_error_with_the_right_status() {
    let mut config = ServerConfig::default();
    config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.max_body_bytes = 4096;
    let server = Server::start(config).await;
    let check = |(status, body): (StatusCode, Value), want: StatusCode, code: &str| {
        assert_eq!(status, want, "{body}");
        assert_eq!(body["code"], code, "{body}");
        assert!(!body["message"].as_str().unwrap().is_empty(), "{body}");
    };
    check(server.get("/api/v1/flows/nope").await, StatusCode::NOT_FOUND, "not-found");
    check(server.get("/api/v1/runs/nope").await, StatusCode::NOT_FOUND, "not-found");
    check(server.get("/api/v1/nowhere").await, StatusCode::NOT_FOUND, "not-found");
    check(
        server.post("/api/v1/flows/nope/runs", json!({})).await,
        StatusCode::NOT_FOUND,
        "not-found",
    );
    check(
        server.post_raw("/api/v1/flows", "application/json", "{not json").await,
        StatusCode::BAD_REQUEST,
        "bad-json",
    );
    check(
        server.post_raw("/api/v1/flows", "application/toml", "[flow\nname=").await,
        StatusCode::BAD_REQUEST,
        "bad-toml",
    );
    // Valid JSON, invalid flow: every problem, named.
    let invalid = r#"{"flow": {"name": "bad"}, "steps": [
        {"id": "a", "plugin": "identity", "needs": ["zz"]},
        {"id": "b", "plugin": "no-such-plugin"}]}"#;
    let (status, body) = server.post_raw("/api/v1/flows", "application/json", invalid).await;
    check((status, body.clone()), StatusCode::UNPROCESSABLE_ENTITY, "invalid-flow");
    let problems = body["details"]["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("needs `zz`")), "{body}");
    let unknown =
        r#"{"flow": {"name": "bad"}, "steps": [{"id": "b", "plugin": "no-such-plugin"}]}"#;
    let (status, body) = server.post_raw("/api/v1/flows", "application/json", unknown).await;
    check((status, body.clone()), StatusCode::UNPROCESSABLE_ENTITY, "invalid-flow");
    assert!(body["message"].as_str().unwrap().contains("no plugin `no-such-plugin`"), "{body}");
    // Too large.
    let big = format!("{{\"flow\": {{\"name\": \"{}\"}}}}", "x".repeat(10_000));
    check(
        server.post_raw("/api/v1/flows", "application/json", &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
    );
    // A flow name that is not a plain name (it names the file in a flows
    // directory).
    let escaping =
        r#"{"flow": {"name": "../../etc/x"}, "steps": [{"id": "a", "plugin": "identity"}]}"#;
    let (status, body) = server.post_raw("/api/v1/flows", "application/json", escaping).await;
    check((status, body.clone()), StatusCode::UNPROCESSABLE_ENTITY, "invalid-flow");
    assert!(
        body["message"].as_str().unwrap().contains("flow id \"../../etc/x\" is not valid"),
        "{body}"
    );
    // A body a web page could send across origins, and a host a rebound
    // DNS name would give.
    check(
        server.post_raw("/api/v1/flows", "text/plain", SQUARE).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    );
    let rebound = server
        .client
        .get(server.url("/api/v1/flows"))
        .header("host", "attacker.example:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), StatusCode::FORBIDDEN);
    // A run request of the wrong shape, and bad queries.
    server.post_raw("/api/v1/flows", "application/json", SQUARE).await;
    check(
        server.post("/api/v1/flows/square/runs", json!({"inptu": 1})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-request",
    );
    check(
        server.post_raw("/api/v1/flows/square/runs", "application/json", "[").await,
        StatusCode::BAD_REQUEST,
        "bad-json",
    );
    check(server.get("/api/v1/runs?status=sideways").await, StatusCode::BAD_REQUEST, "bad-query");
    check(server.get("/api/v1/runs?limit=-1").await, StatusCode::BAD_REQUEST, "bad-query");
    // Cancelling a run that ended is a conflict.
    let (_, done) = server.post("/api/v1/flows/square/runs", json!({"wait": true})).await;
    let run_id = done["run_id"].as_str().unwrap();
    check(
        server.post(&format!("/api/v1/runs/{run_id}/cancel"), json!({})).await,
        StatusCode::CONFLICT,
        "not-running",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_required_off_loopback_and_checked_on_every_request() {
    let mut config = ServerConfig::default();
    config.addr = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut host = HostConfig::new(qflow_tests::plugins_dir());
    host.cache.dir = None;
    host.preload = false;
    let data = tempfile::tempdir().unwrap();
    let store = qflow::store::SqliteStore::open(&data.path().join("qflow.db")).await.unwrap();
    let host = Host::new(host).unwrap().with_store(Arc::new(store), 1 << 16).await.unwrap();
    let state = AppState::new(Arc::new(host), config).unwrap();
    let refused = qflow_server::serve(state, async {}, |_| panic!("it must not bind")).await;
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("without a token"), "{message}");

    let mut config = ServerConfig::default();
    config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.token = Some("s3cret".into());
    let server = Server::start(config).await;
    let (status, body) = server.get("/api/v1/flows").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "unauthorized");
    let wrong =
        server.client.get(server.url("/healthz")).bearer_auth("guess").send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right =
        server.client.get(server.url("/api/v1/flows")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_stream_carries_a_runs_events_as_cloudevents() {
    let server = Server::default().await;
    server.post_raw("/api/v1/flows", "application/json", SQUARE).await;
    // Subscribe first, then run, so that no event is missed.
    let response =
        server.client.get(server.url("/api/v1/events?type=q.qflow.")).send().await.unwrap();
    let mut body = response.bytes_stream();
    let (_, accepted) = server.post("/api/v1/flows/square/runs", json!({"input": "e"})).await;
    let run_id = accepted["run_id"].as_str().unwrap().to_owned();
    let seen = read_events(&mut body, |seen| {
        seen.iter().any(|e| {
            e["type"] == "q.qflow.run.finished.v1" && e["data"]["run_id"] == run_id.as_str()
        })
    })
    .await;
    let of_run: Vec<&Value> =
        seen.iter().filter(|e| e["data"]["run_id"] == run_id.as_str()).collect();
    assert_eq!(of_run[0]["type"], "q.qflow.run.started.v1");
    assert_eq!(of_run[0]["specversion"], "1.0");
    assert_eq!(of_run[0]["source"], format!("/qflow/runs/{run_id}"));
    let sequences: Vec<u64> = of_run.iter().map(|e| e["sequence"].as_u64().unwrap()).collect();
    assert!(sequences.windows(2).all(|w| w[1] == w[0] + 1), "{sequences:?}");
    let count = |kind: &str| of_run.iter().filter(|e| e["type"] == kind).count();
    assert_eq!(count("q.qflow.step.started.v1"), 4);
    assert_eq!(count("q.qflow.step.finished.v1"), 4);
    assert_eq!(count("q.qflow.optimization.group.completed.v1"), 3, "a; b and c; d");
    assert_eq!(count("q.qflow.optimization.lazy.loaded.v1"), 2, "identity and hash");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_refuses_new_runs_and_lets_runs_in_flight_finish() {
    let server = Server::default().await;
    let slow = r#"{"flow": {"name": "slow"}, "steps": [{"id": "nap", "plugin": "sleep", "config": {"ms": 1000}}]}"#;
    server.post_raw("/api/v1/flows", "application/json", slow).await;
    let mut events = server.state.host().subscribe();
    let (status, accepted) = server.post("/api/v1/flows/slow/runs", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let run_id = accepted["run_id"].as_str().unwrap().to_owned();
    // Once the step runs, shut down.
    loop {
        let event = events.recv().await.unwrap();
        if event.data.kind() == "q.qflow.step.started.v1" {
            break;
        }
    }
    let state = server.state.clone();
    state.begin_shutdown();
    let refused = server.post("/api/v1/flows/slow/runs", json!({})).await;
    assert_eq!(refused.0, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.1);
    assert_eq!(refused.1["code"], "shutting-down");
    server.stop().await;
    // serve() returned only after the run in flight had finished.
    assert_eq!(
        state.host().run_totals().runs,
        1,
        "run {run_id} finished before the server stopped"
    );
}

/// The five optimization event types reach an SSE client: a run whose
/// steps overlapped, a component loaded, a plan group completed, a flow
/// optimized, and a cache eviction.
#[tokio::test(flavor = "multi_thread")]
async fn the_event_stream_carries_every_optimization_event_type() {
    let server = Server::small_cache().await;
    // Two naps side by side: they overlap; four small plugins in a cache
    // that holds about two: some are evicted.
    let flow = r#"{"flow": {"name": "wide"}, "steps": [
        {"id": "n1", "plugin": "sleep", "config": {"ms": 1000}},
        {"id": "n2", "plugin": "sleep", "config": {"ms": 1000}},
        {"id": "h", "plugin": "hash", "needs": ["n1", "n2"]},
        {"id": "i", "plugin": "identity", "needs": ["h"]},
        {"id": "f", "plugin": "fib", "needs": ["i"], "config": {"n": 1}}
    ]}"#;
    let (status, body) = server.post_raw("/api/v1/flows", "application/json", flow).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let response = server
        .client
        .get(server.url("/api/v1/events?type=q.qflow.optimization."))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let (status, summary) = server.post("/api/v1/flows/wide/runs", json!({"wait": true})).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    server.post("/api/v1/flows/wide/optimize", json!({})).await;
    let wanted = [
        "q.qflow.optimization.parallel.completed.v1",
        "q.qflow.optimization.lazy.loaded.v1",
        "q.qflow.optimization.group.completed.v1",
        "q.qflow.optimization.flow.optimized.v1",
        "q.qflow.optimization.cache.evicted.v1",
    ];
    let seen =
        read_events(&mut body, |seen| wanted.iter().all(|w| seen.iter().any(|e| e["type"] == *w)))
            .await;
    for event in &seen {
        assert!(event["type"].as_str().unwrap().starts_with("q.qflow.optimization."));
        if event["type"] == "q.qflow.optimization.parallel.completed.v1" {
            assert_eq!(event["data"]["run_id"], summary["run_id"]);
        }
        if event["type"] == "q.qflow.optimization.cache.evicted.v1" {
            assert!(event["data"]["bytes_freed"].as_u64().unwrap() > 0, "{event}");
        }
    }

    server.stop().await;
}

/// The flows directory is watched: a flow file written there is served,
/// a changed one replaces it, a removed one goes.
#[tokio::test(flavor = "multi_thread")]
async fn flow_files_are_served_as_they_change_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.flows_dir = Some(dir.path().to_path_buf());
    let server = Server::start(config).await;
    server.state.watch_flows();
    let file = dir.path().join("late.toml");
    let write = |steps: &str| {
        let tmp = dir.path().join("late.tmp");
        std::fs::write(&tmp, format!("[flow]\nname = \"late\"\n{steps}")).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    // Until the watcher's debounce has passed: poll, bounded.
    let until = async |want: &dyn Fn(StatusCode, &Value) -> bool| {
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let (status, body) = server.get("/api/v1/flows/late").await;
                if want(status, &body) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the flows directory change was not picked up");
    };
    write("[[step]]\nid = \"a\"\nplugin = \"identity\"\n");
    until(&|status, _| status == StatusCode::OK).await;
    write("[[step]]\nid = \"a\"\nplugin = \"identity\"\n[[step]]\nid = \"b\"\nplugin = \"hash\"\n");
    until(&|_, body| body["steps"] == json!(["a", "b"])).await;
    // An invalid version leaves the old one serving: once a file written
    // after it is served, the invalid one has been read (and refused).
    std::fs::write(&file, "[flow\n").unwrap();
    std::fs::write(dir.path().join("marker.toml"), "[flow]\nname = \"marker\"\n").unwrap();
    let marker = tokio::time::timeout(Duration::from_secs(60), async {
        while server.get("/api/v1/flows/marker").await.0 != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(marker.is_ok(), "marker.toml was not picked up");
    assert_eq!(server.get("/api/v1/flows/late").await.1["steps"], json!(["a", "b"]));
    std::fs::remove_file(&file).unwrap();
    until(&|status, _| status == StatusCode::NOT_FOUND).await;
    server.stop().await;
}

/// The OpenAPI document is generated from the handlers: every route is in
/// it, with the model's types as schemas.
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_describes_every_route() {
    let server = Server::default().await;
    let (status, doc) = server.get("/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/v1/flows", "get"),
        ("/api/v1/flows", "post"),
        ("/api/v1/flows/{id}", "get"),
        ("/api/v1/flows/{id}", "delete"),
        ("/api/v1/flows/{id}/runs", "post"),
        ("/api/v1/flows/{id}/recommendations", "get"),
        ("/api/v1/flows/{id}/optimize", "post"),
        ("/api/v1/runs", "get"),
        ("/api/v1/runs/{id}", "get"),
        ("/api/v1/runs/{id}/events", "get"),
        ("/api/v1/optimization/metrics/history", "get"),
        ("/api/v1/runs/{id}/cancel", "post"),
        ("/api/v1/optimization/metrics", "get"),
        ("/api/v1/optimization/pools/stats", "get"),
        ("/api/v1/plugins", "get"),
        ("/api/v1/events", "get"),
        ("/api/v1/openapi.json", "get"),
        ("/metrics", "get"),
        ("/healthz", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is missing"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "RunSummary",
        "StepReport",
        "FailureKind",
        "OptimizationMetrics",
        "Record",
        "Line",
        "StartRun",
    ] {
        assert!(schemas.contains_key(schema), "no schema {schema}: {:?}", schemas.keys());
    }
    let runs = &paths["/api/v1/runs"]["get"]["parameters"];
    let names: Vec<&str> =
        runs.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["flow", "status", "limit", "before"]);
    server.stop().await;
}

/// A server restarted on the same run store answers for the runs of the
/// one before: each run, its events, the list by pages, and the metrics
/// history the dashboard draws.
#[tokio::test(flavor = "multi_thread")]
async fn runs_are_answered_for_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let store = data.path().join("qflow.db");
    let mut config = ServerConfig::default();
    config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let flow = "[flow]\nname = \"kept\"\n[[step]]\nid = \"same\"\nplugin = \"identity\"\n";
    let first = Server::start_on(config.clone(), &store, |_| {}).await;
    let (status, _) = first.post_raw("/api/v1/flows", "application/toml", flow).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut ids = Vec::new();
    for n in 0..3 {
        let (status, summary) =
            first.post("/api/v1/flows/kept/runs", json!({"input": n, "wait": true})).await;
        assert_eq!(status, StatusCode::OK, "{summary}");
        ids.push(summary["run_id"].as_str().unwrap().to_owned());
    }
    first.stop().await;

    let second = Server::start_on(config, &store, |_| {}).await;
    let (status, record) = second.get(&format!("/api/v1/runs/{}", ids[0])).await;
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["input"], 0);
    assert_eq!(record["summary"]["steps"][0]["output"], 0);
    let (_, events) = second.get(&format!("/api/v1/runs/{}/events", ids[0])).await;
    let kinds: Vec<&str> =
        events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"q.qflow.run.started.v1"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"q.qflow.run.finished.v1"), "{kinds:?}");
    let (_, page) = second.get("/api/v1/runs?flow=kept&limit=2").await;
    let page: Vec<&str> =
        page.as_array().unwrap().iter().map(|r| r["run_id"].as_str().unwrap()).collect();
    assert_eq!(page, [ids[2].as_str(), ids[1].as_str()], "newest first");
    let (_, rest) = second.get(&format!("/api/v1/runs?flow=kept&before={}", ids[1])).await;
    assert_eq!(rest[0]["run_id"], ids[0].as_str());
    assert!(
        rest[0]["wall_ms"].as_f64().is_some() && rest[0]["efficiency"].as_f64().is_some(),
        "{rest}"
    );
    let (_, history) = second.get("/api/v1/optimization/metrics/history").await;
    assert!(!history.as_array().unwrap().is_empty(), "a snapshot was kept");
    let (status, error) = second.get("/api/v1/runs/no-such-run/events").await;
    assert_eq!((status, error["code"].as_str()), (StatusCode::NOT_FOUND, Some("not-found")));
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn database_pools_are_reported_beside_the_instance_pools() {
    let mut config = ServerConfig::default();
    config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let data = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", data.path().join("shop.db").display());
    let server = Server::start(config).await;
    let flow = json!({
        "flow": {"name": "shop"},
        "database": [{"id": "shop", "url": url}],
        "step": [{"id": "count", "plugin": "sql", "databases": ["shop"],
                  "config": {"db": "shop", "statement": "SELECT 40 + 2 AS n"}}],
    });
    let (status, body) = server.post("/api/v1/flows", flow).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, summary) = server.post("/api/v1/flows/shop/runs", json!({"wait": true})).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["steps"][0]["output"], json!([{"n": 42}]));

    let (_, pools) = server.get("/api/v1/optimization/pools/stats").await;
    let db = &pools["db"];
    assert_eq!(db["totalResources"], 1, "{pools}");
    assert_eq!(db["byKey"][0]["key"], "shop", "{pools}");
    assert!(db["acquisitionCount"].as_u64().unwrap() >= 1, "{pools}");
    let (_, metrics) = server.get("/api/v1/optimization/metrics").await;
    assert_eq!(metrics["resourcePools"]["db"]["byKey"][0]["key"], "shop", "{metrics}");
    let text =
        server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("kind=\"db\",key=\"shop\""), "{text}");

    // A step's database nobody declares, and a URL with no driver: 422,
    // each named, the password hidden.
    let undeclared = json!({
        "flow": {"name": "lost"},
        "step": [{"id": "q", "plugin": "sql", "databases": ["gone"],
                  "config": {"db": "gone", "statement": "SELECT 1"}}],
    });
    let (status, body) = server.post("/api/v1/flows", undeclared).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["message"].as_str().unwrap().contains("step `q`: no database `gone`"), "{body}");
    let mysql = json!({
        "flow": {"name": "mysql"},
        "database": [{"id": "m", "url": "mysql://root:hunter2@db/x"}],
        "step": [{"id": "q", "plugin": "identity"}],
    });
    let (status, body) = server.post("/api/v1/flows", mysql).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("database `m`") && !message.contains("hunter2"), "{body}");
}
