//! What the HTTP API adds to a run: N concurrent `POST /flows/one/runs`
//! with `wait: true` of a one-step flow over loopback, against `Host::run`
//! of the same flow in-process, measured in the same run. Bounded in count
//! and time; loopback only.
//!
//! `cargo bench -p qflow-server`

// A benchmark that cannot set itself up has nothing to report: panicking
// with the reason is the right thing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qflow::{Flow, Format, Host, HostConfig, RunStatus};
use qflow_server::{AppState, ServerConfig};
use serde_json::json;

/// Runs per measurement, and clients at once for the throughput figures.
/// Latency is measured with one client at a time: with many, it is mostly
/// queueing on the two cores the client shares with the server.
const RUNS: usize = 4000;
const CLIENTS: usize = 16;
const SEQUENTIAL: usize = 1000;

const FLOW: &str = "[flow]\nname = \"one\"\n[[step]]\nid = \"s\"\nplugin = \"identity\"\n";

fn main() {
    #[allow(unsafe_code)]
    // SAFETY: nothing else runs yet. Errors capture a backtrace when
    // RUST_BACKTRACE is set; a benchmark must not pay for that.
    unsafe {
        std::env::set_var("RUST_LIB_BACKTRACE", "0")
    };
    let plugins = qflow_tests::plugins_dir();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut config = HostConfig::new(plugins);
        config.cache.dir = None;
        config.preload = false;
        // The server keeps every run in a store, durably before it answers:
        // the in-process baseline does the same, so the difference is HTTP.
        let data = tempfile::tempdir().unwrap();
        let store = qflow::store::SqliteStore::open(&data.path().join("qflow.db")).await.unwrap();
        let host = Host::new(config).unwrap().with_store(Arc::new(store), 1 << 16).await.unwrap();
        let host = Arc::new(host);
        let flow = Arc::new(Flow::parse(FLOW, Format::Toml, "bench", plugins).unwrap());
        let durable = || qflow::RunOptions::new().durable();

        // The baseline: the same runs in-process, CLIENTS at a time.
        host.run(&flow, json!(1)).await.unwrap();
        let (in_process, in_process_latencies) = timed(RUNS, CLIENTS, {
            let (host, flow) = (host.clone(), flow.clone());
            move || {
                let (host, flow) = (host.clone(), flow.clone());
                async move {
                    let summary = host.run_with(&flow, json!(1), durable()).await.unwrap();
                    assert_eq!(summary.status, RunStatus::Succeeded);
                }
            }
        })
        .await;

        let (_, in_process_alone) = timed(SEQUENTIAL, 1, {
            let (host, flow) = (host.clone(), flow.clone());
            move || {
                let (host, flow) = (host.clone(), flow.clone());
                async move {
                    host.run_with(&flow, json!(1), durable()).await.unwrap();
                }
            }
        })
        .await;

        // The same over HTTP.
        let mut server = ServerConfig::default();
        server.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let state = AppState::new(host.clone(), server).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, address) = tokio::sync::oneshot::channel();
        let serving = tokio::spawn(qflow_server::serve(
            state,
            async move {
                let _ = stopped.await;
            },
            move |addr| {
                let _ = bound.send(addr);
            },
        ));
        let base = format!("http://{}", address.await.unwrap());
        let client = reqwest::Client::new();
        let registered = client
            .post(format!("{base}/api/v1/flows"))
            .header("content-type", "application/toml")
            .body(FLOW)
            .send()
            .await
            .unwrap();
        assert!(registered.status().is_success());
        let url = format!("{base}/api/v1/flows/one/runs");
        let call = {
            move || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let response =
                        client.post(&url).json(&json!({"input": 1, "wait": true})).send().await.unwrap();
                    assert!(response.status().is_success());
                    let summary: serde_json::Value = response.json().await.unwrap();
                    assert_eq!(summary["status"], "succeeded");
                }
            }
        };
        let (over_http, http_latencies) = timed(RUNS, CLIENTS, call.clone()).await;
        let (_, http_alone) = timed(SEQUENTIAL, 1, call).await;
        let _ = stop.send(());
        serving.await.unwrap().unwrap();

        let rate = |took: Duration| RUNS as f64 / took.as_secs_f64();
        let (p50, p99) = (percentile(&http_latencies, 0.5), percentile(&http_latencies, 0.99));
        let (b50, b99) =
            (percentile(&in_process_latencies, 0.5), percentile(&in_process_latencies, 0.99));
        println!("| scenario | baseline | baseline | qflow serve | detail |");
        println!("| --- | --- | --- | --- | --- |");
        println!(
            "| {RUNS} one-step runs, {CLIENTS} at once: throughput | Host::run in-process | {:.0}/s | {:.0}/s | {:.2}x the in-process rate |",
            rate(in_process),
            rate(over_http),
            rate(over_http) / rate(in_process)
        );
        println!(
            "| the same: latency p50 / p99 | Host::run in-process | {b50:.0} / {b99:.0} µs | {p50:.0} / {p99:.0} µs | mostly queueing: the client shares the 2 cores |"
        );
        let (a50, a99) = (percentile(&in_process_alone, 0.5), percentile(&in_process_alone, 0.99));
        let (h50, h99) = (percentile(&http_alone, 0.5), percentile(&http_alone, 0.99));
        println!(
            "| {SEQUENTIAL} one-step runs, one at a time: latency p50 | Host::run in-process | {a50:.1} µs | {h50:.1} µs | HTTP adds {:.1} µs (goal < 150 µs) |",
            h50 - a50
        );
        println!(
            "| the same: latency p99 | Host::run in-process | {a99:.1} µs | {h99:.1} µs | HTTP adds {:.1} µs |",
            h99 - a99
        );
    });
}

/// Makes `runs` calls, `clients` at a time; the wall time and each call's
/// latency in µs.
async fn timed<F, Fut>(runs: usize, clients: usize, call: F) -> (Duration, Vec<f64>)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (call, next) = (call.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < runs {
                    let one = Instant::now();
                    call().await;
                    latencies.push(one.elapsed().as_secs_f64() * 1e6);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(runs);
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    (started.elapsed(), all)
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
