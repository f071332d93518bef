//! OpenTelemetry export (`--features otlp`): the real binary runs the
//! example flow and sends its spans over OTLP/HTTP to a collector on
//! loopback; the collector's requests hold the span tree.
#![cfg(feature = "otlp")]
// A test that panics on a broken expectation is doing its job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};

use qflow_tests::{plugins_dir, repo};
use serde_json::Value;

/// A collector that answers every OTLP/HTTP request with 200 and keeps the
/// JSON bodies posted to `/v1/traces`.
fn collector() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let kept = kept.clone();
            std::thread::spawn(move || serve(stream, &kept));
        }
    });
    (format!("http://{addr}"), bodies)
}

/// Serves one connection's requests (the exporter keeps it alive).
fn serve(stream: TcpStream, bodies: &Mutex<Vec<Value>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        assert!(request_line.starts_with("POST /v1/traces "), "{request_line}");
        bodies.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        stream.write_all(answer.as_bytes()).unwrap();
    }
}

/// One exported span: what the tree is made of.
#[derive(Debug)]
struct Span {
    name: String,
    trace: String,
    parent: String,
    attributes: HashMap<String, String>,
}

fn spans(bodies: &[Value]) -> HashMap<String, Span> {
    let mut spans = HashMap::new();
    for body in bodies {
        for resource in body["resourceSpans"].as_array().unwrap() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == "service.name")
                .map(|a| a["value"]["stringValue"].clone());
            assert_eq!(service, Some(Value::from("qflow")));
            for scope in resource["scopeSpans"].as_array().unwrap() {
                for span in scope["spans"].as_array().unwrap() {
                    let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                    let attributes = span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| {
                            let value = a["value"]["stringValue"].as_str()?;
                            Some((a["key"].as_str()?.to_owned(), value.to_owned()))
                        })
                        .collect();
                    let span = Span {
                        name: text("name"),
                        trace: text("traceId"),
                        parent: text("parentSpanId"),
                        attributes,
                    };
                    spans.insert(text("spanId"), span);
                }
            }
        }
    }
    spans
}

#[test]
fn a_run_exports_its_span_tree_over_otlp() {
    let (endpoint, bodies) = collector();
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qflow"))
        .args(["run", "examples/orders-report.toml", "--json", "--plugins"])
        .arg(plugins_dir())
        .arg("--cache-dir")
        .arg(cache.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("QFLOW_DATA_DIR", data.path())
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let run_id = summary["run_id"].as_str().unwrap();

    // The process flushed its spans before it exited.
    let spans = spans(&bodies.lock().unwrap());
    let named =
        |name: &'static str| spans.iter().filter(move |(_, s)| s.name == name).collect::<Vec<_>>();
    let runs = named("run");
    assert_eq!(runs.len(), 1, "{spans:#?}");
    let (run_span, run) = runs[0];
    assert_eq!(run.attributes.get("run_id").map(String::as_str), Some(run_id));
    assert_eq!(run.attributes.get("flow").map(String::as_str), Some("orders-report"));
    assert!(run.parent.is_empty(), "the run is the root: {run:?}");

    // Each step under the run, each acquisition under its step.
    let mut steps: Vec<&str> = named("step")
        .into_iter()
        .map(|(_, step)| {
            assert_eq!((&step.parent, &step.trace), (run_span, &run.trace), "{step:?}");
            step.attributes["step"].as_str()
        })
        .collect();
    steps.sort_unstable();
    assert_eq!(steps, ["checksum", "orders", "report", "totals"]);
    let acquires = named("acquire");
    assert_eq!(acquires.len(), 4, "one acquisition per step: {spans:#?}");
    for (_, acquire) in acquires {
        assert_eq!(spans[&acquire.parent].name, "step", "{acquire:?}");
    }
    // The plugins' loads, started with the run, under it too.
    let loads = named("load");
    assert_eq!(loads.len(), 4, "csv, jq, hash and template: {spans:#?}");
    for (_, load) in loads {
        assert_eq!(&load.parent, run_span, "{load:?}");
        assert_eq!(load.attributes.get("run_id").map(String::as_str), Some(run_id));
    }
}
