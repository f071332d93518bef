//! Outbound HTTP from steps (`wasi:http`, the bundled `http-get`), against
//! a real HTTP/1.1 server on loopback that counts the connections it
//! accepts: grants, internal addresses, pooled keep-alive connections, the
//! time and size limits.

use std::time::Duration;

use qflow::pool::PoolConfig;
use qflow::{Host, HttpConfig, RunStatus, StepStatus};
use serde_json::json;

use qflow_tests::HttpServer as Server;

use crate::support::{config, flow, plugins_dir};

fn host_with(http: HttpConfig) -> Host {
    let mut config = config(plugins_dir(), None);
    config.engine.http = http;
    Host::new(config).expect("the host starts")
}

/// A flow of `n` independent `http-get` steps fetching `url`, each with `grants`.
fn fetches(n: usize, url: &str, grants: &str) -> String {
    let mut toml = format!("[flow]\nname = \"fetch\"\nmax_parallel = {n}\n");
    for i in 0..n {
        toml += &format!(
            "[[step]]\nid = \"get{i}\"\nplugin = \"http-get\"\nconfig = {{ url = \"{url}\" }}\nhttp = [{grants}]\n"
        );
    }
    toml
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_requests_open_no_more_connections_than_the_pool_allows() {
    let server = Server::start();
    let mut pool = PoolConfig::default();
    pool.min = 0;
    pool.max = 4;
    let host = host_with(HttpConfig::default().pool(pool));
    let url = format!("http://127.0.0.1:{}/json", server.port);
    let toml = fetches(200, &url, &format!("\"127.0.0.1:{}\"", server.port));
    let summary = host.run(&flow(&toml), json!({})).await.unwrap();
    assert_eq!(
        summary.status,
        RunStatus::Succeeded,
        "{:?}",
        summary.steps.iter().find_map(|s| s.error.as_ref())
    );
    for i in 0..200 {
        let output = summary.output(&format!("get{i}")).unwrap();
        assert_eq!(output, json!({"status": 200, "body": {"n": 1}}));
    }
    let connections = server.accepted();
    assert!((1..=4).contains(&connections), "{connections} connections for 200 requests");
    let stats = host.http_pool_stats();
    let origin = format!("http://127.0.0.1:{}", server.port);
    let (_, stats) = stats.iter().find(|(o, _)| *o == origin).expect("the origin's pool");
    assert_eq!(stats.acquisitions, 200, "{stats:?}");
    assert_eq!(stats.in_use, 0, "every connection went back: {stats:?}");
    let metrics = host.metrics("balanced");
    assert!(metrics.resource_pools.http.by_key.iter().any(|k| k.key == origin), "{metrics:?}");
}

/// The one step's failure message, its run failed.
async fn failure(host: &Host, toml: &str) -> String {
    let summary = host.run(&flow(toml), json!({})).await.unwrap();
    assert_eq!(summary.status, RunStatus::Failed);
    let step = &summary.steps[0];
    assert_eq!(step.status, StepStatus::Failed);
    step.error.as_ref().unwrap().message.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_without_a_grant_is_refused_naming_the_origin() {
    let server = Server::start();
    let host = host_with(HttpConfig::default());
    let url = format!("http://127.0.0.1:{}/json", server.port);
    // No grant at all, then a grant for another port.
    for grants in ["", "\"127.0.0.1:1\""] {
        let message = failure(&host, &fetches(1, &url, grants)).await;
        let origin = format!("http://127.0.0.1:{}", server.port);
        assert!(message.contains(&format!("no http grant for {origin}")), "{message}");
    }
    assert_eq!(server.accepted(), 0, "nothing reached the server");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_that_resolves_to_loopback_is_refused_unless_the_address_is_granted() {
    let server = Server::start();
    let host = host_with(HttpConfig::default());
    let url = format!("http://localhost:{}/json", server.port);
    let message =
        failure(&host, &fetches(1, &url, &format!("\"localhost:{}\"", server.port))).await;
    assert!(message.contains("an internal address"), "{message}");
    assert_eq!(server.accepted(), 0, "nothing reached the server");
    // Granted by address, the same server answers.
    let url = format!("http://127.0.0.1:{}/json", server.port);
    let toml = fetches(1, &url, &format!("\"127.0.0.1:{}\"", server.port));
    let summary = host.run(&flow(&toml), json!({})).await.unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_server_and_an_endless_body_fail_their_request_with_the_limit() {
    let server = Server::start();
    let host = host_with(
        HttpConfig::default()
            .request_timeout(Duration::from_millis(300))
            .max_response_bytes(1 << 20),
    );
    let grant = format!("\"127.0.0.1:{}\"", server.port);
    let stall = format!("http://127.0.0.1:{}/stall", server.port);
    let message = failure(&host, &fetches(1, &stall, &grant)).await;
    assert!(message.contains("no response within the time limit"), "{message}");
    let huge = format!("http://127.0.0.1:{}/huge", server.port);
    let message = failure(&host, &fetches(1, &huge, &grant)).await;
    assert!(message.contains("limit") && message.contains("1048576 bytes"), "{message}");
    // The host is fine: the next request is served (on a host whose time
    // limit no loaded machine could miss).
    let host = host_with(HttpConfig::default().max_response_bytes(1 << 20));
    let ok = format!("http://127.0.0.1:{}/json", server.port);
    let summary = host.run(&flow(&fetches(1, &ok, &grant)), json!({})).await.unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded);
}

/// A step may ask for a shorter wait than the host allows (`wasi:http`'s
/// request options), never a longer one.
#[tokio::test(flavor = "multi_thread")]
async fn a_steps_own_shorter_timeout_is_kept_and_a_longer_one_is_not() {
    let server = Server::start();
    let stall = format!("http://127.0.0.1:{}/stall", server.port);
    let step = |timeout_ms: u64| {
        format!(
            "[flow]\nname = \"wait\"\n[[step]]\nid = \"get0\"\nplugin = \"http-get\"\ntimeout_ms = 20000\n\
             http = [\"127.0.0.1:{}\"]\nconfig = {{ url = \"{stall}\", timeout_ms = {timeout_ms} }}\n",
            server.port
        )
    };
    // The host would wait a minute; the step asks for 200 ms and gets it
    // (ignored, the step's own 20 s timeout would end it instead).
    let patient = host_with(HttpConfig::default().request_timeout(Duration::from_secs(60)));
    let summary = patient.run(&flow(&step(200)), json!({})).await.unwrap();
    let error = summary.steps[0].error.as_ref().unwrap();
    assert_eq!(error.code.as_deref(), Some("http-timeout"), "{error:?}");
    // The host allows 300 ms; asking for a minute changes nothing.
    let strict = host_with(HttpConfig::default().request_timeout(Duration::from_millis(300)));
    let summary = strict.run(&flow(&step(60_000)), json!({})).await.unwrap();
    let error = summary.steps[0].error.as_ref().unwrap();
    assert_eq!(error.code.as_deref(), Some("http-timeout"), "{error:?}");
}

#[test]
fn a_grant_that_is_not_one_is_a_problem_naming_the_step() {
    let toml = fetches(1, "http://x/", "\"ftp://example.org\"");
    let error = qflow::Flow::parse(&toml, qflow::Format::Toml, "<test>", std::path::Path::new("."))
        .expect_err("refused");
    let text = error.to_string();
    assert!(text.contains("step `get0`") && text.contains("ftp://example.org"), "{text}");
}

/// The operator grants a plugin's steps an origin in its settings file
/// (`NAME.plugin.toml`), beside each step's own grants; a grant there that
/// is not one fails the step naming the file.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugins_settings_file_grants_its_steps() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugins_dir().join("http-get.wasm"), dir.path().join("http-get.wasm")).unwrap();
    let settings = dir.path().join("http-get.plugin.toml");
    std::fs::write(&settings, format!("http = [\"127.0.0.1:{}\"]\n", server.port)).unwrap();
    let host = Host::new(config(dir.path(), None)).expect("the host starts");
    let url = format!("http://127.0.0.1:{}/json", server.port);
    let summary = host.run(&flow(&fetches(1, &url, "")), json!({})).await.unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.steps[0].error);

    std::fs::write(&settings, "http = [\"ftp://x\"]\n").unwrap();
    let host = Host::new(config(dir.path(), None)).expect("the host starts");
    let message = failure(&host, &fetches(1, &url, "")).await;
    assert!(message.contains("http-get.plugin.toml") && message.contains("ftp://x"), "{message}");
}

/// A pooled connection the server closed while it sat idle (its keep-alive
/// ran out) is not a failed request: the request goes on a new connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_server_closed_is_replaced_not_a_failure() {
    let server = Server::start();
    let host = host_with(HttpConfig::default());
    let url = format!("http://127.0.0.1:{}/once", server.port);
    let toml = fetches(1, &url, &format!("\"127.0.0.1:{}\"", server.port));
    for round in 0..20 {
        let summary = host.run(&flow(&toml), json!({})).await.unwrap();
        assert_eq!(
            summary.status,
            RunStatus::Succeeded,
            "round {round}: {:?}",
            summary.steps[0].error
        );
    }
    assert_eq!(server.accepted(), 20, "a connection per request: the server closed each one");
}

#[test]
fn a_loaders_grant_is_checked_like_a_steps() {
    let toml = "[flow]\nname = \"l\"\n[[loader]]\nid = \"web\"\nplugin = \"file-loader\"\nhttp = [\"*\"]\n\
                [[step]]\nid = \"s\"\nplugin = \"identity\"\n";
    let error = qflow::Flow::parse(toml, qflow::Format::Toml, "<test>", std::path::Path::new("."))
        .expect_err("refused");
    let text = error.to_string();
    assert!(text.contains("loader `web`") && text.contains("http grant `*`"), "{text}");
}
