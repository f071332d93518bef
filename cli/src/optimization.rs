//! `qflow optimization …`: the metrics document, a flow's recommendations,
//! its optimization (a diff; `--apply` writes it back) and the pools —
//! in this process, or from a server (`--server URL`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use qflow::OptimizationMetrics;
use qflow::model::RunQuery;
use qflow::model::optimize::{self, Level, Recommendation};
use serde_json::{Value, json};

use crate::{HostArgs, host, host_with_store};

/// How many past runs of a flow the in-process optimizer reads from the
/// run store: enough for its rates and averages, few enough to read fast.
const HISTORY_RUNS: u32 = 200;

/// How many runs the in-process metrics document adds up.
const METRICS_RUNS: u32 = 10_000;

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Print the optimization metrics document.
    Metrics {
        #[command(flatten)]
        target: Target,
    },
    /// What could make a flow better, with the evidence.
    Recommend {
        /// A flow file; with --server, a flow id.
        flow: String,
        #[command(flatten)]
        target: Target,
    },
    /// Rewrite a flow at a level and print the diff; --apply writes it back
    /// (keeping the old file as NAME.toml.bak).
    Optimize {
        /// A flow file; with --server, a flow id.
        flow: String,
        /// conservative (never changes what the flow computes), balanced
        /// (adds retries), or aggressive (may change ordering and isolation).
        #[arg(long, default_value = "balanced")]
        level: Level,
        /// Write the optimized flow back.
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print the resource pools.
    Pools {
        #[command(flatten)]
        target: Target,
    },
}

/// In this process (on the plugins directory), or on a server.
#[derive(clap::Args)]
pub(crate) struct Target {
    #[command(flatten)]
    host: HostArgs,
    /// Ask the server at this URL (such as http://127.0.0.1:8080) instead.
    #[arg(long, env = "QFLOW_SERVER")]
    server: Option<String>,
    /// The server's bearer token.
    #[arg(long, env = "QFLOW_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// A server's API, as a client.
struct Server {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl Server {
    fn new(base: &str, token: Option<String>) -> Server {
        Server {
            base: base.trim_end_matches('/').to_owned(),
            token,
            client: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut request = self.client.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let body: Value =
            response.json().await.with_context(|| format!("{url} did not answer JSON"))?;
        if !status.is_success() {
            let message = body["message"].as_str().unwrap_or("no message");
            bail!("{url}: {status}: {message}");
        }
        Ok(body)
    }
}

pub(crate) async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Metrics { target } => {
            let metrics: Value = match &target.server {
                Some(url) => {
                    Server::new(url, target.token.clone())
                        .call(reqwest::Method::GET, "/optimization/metrics", None)
                        .await?
                }
                None => {
                    // This process has run nothing: the runs are the store's.
                    let host = host_with_store(&target.host).await?;
                    let mut totals = qflow::RunTotals::default();
                    if let Some(store) = host.store() {
                        let records = store.runs(RunQuery::newest(METRICS_RUNS)).await?;
                        for summary in records.iter().filter_map(|r| r.summary.as_ref()) {
                            totals.add(summary);
                        }
                    }
                    serde_json::to_value(host.metrics_of(Level::default().as_str(), &totals))?
                }
            };
            if target.json {
                println!("{}", serde_json::to_string_pretty(&metrics)?);
            } else {
                let metrics: OptimizationMetrics = serde_json::from_value(metrics)?;
                print_metrics(&metrics);
            }
        }
        Command::Pools { target } => {
            let pools = match &target.server {
                Some(url) => {
                    Server::new(url, target.token.clone())
                        .call(reqwest::Method::GET, "/optimization/pools/stats", None)
                        .await?
                }
                None => {
                    let host = host(&target.host)?;
                    serde_json::to_value(host.resource_pools())?
                }
            };
            if target.json {
                println!("{}", serde_json::to_string_pretty(&pools)?);
            } else {
                print_pools(&pools);
            }
        }
        Command::Recommend { flow, target } => {
            let recommendations: Vec<Recommendation> = match &target.server {
                Some(url) => {
                    let found = Server::new(url, target.token.clone())
                        .call(reqwest::Method::GET, &format!("/flows/{flow}/recommendations"), None)
                        .await?;
                    serde_json::from_value(found["recommendations"].clone())?
                }
                None => {
                    let flow = crate::load_flow(std::path::Path::new(&flow))?;
                    let host = host_with_store(&target.host).await?;
                    host.check(&flow)?;
                    let runs = host.past_runs(&flow.name, HISTORY_RUNS).await?;
                    host.recommend(&flow, runs)
                }
            };
            if target.json {
                println!("{}", serde_json::to_string_pretty(&recommendations)?);
            } else if recommendations.is_empty() {
                println!("nothing to recommend");
            } else {
                for r in &recommendations {
                    let saving = r
                        .estimated_saving_ms
                        .map(|ms| format!(" (saves about {ms:.1} ms)"))
                        .unwrap_or_default();
                    println!("{}: {}{saving}", kind_name(r), r.message);
                }
            }
        }
        Command::Optimize { flow, level, apply, target } => {
            let answer = match &target.server {
                Some(url) => {
                    Server::new(url, target.token.clone())
                        .call(
                            reqwest::Method::POST,
                            &format!("/flows/{flow}/optimize"),
                            Some(json!({"level": level, "apply": apply})),
                        )
                        .await?
                }
                None => {
                    let path = Path::new(&flow);
                    let flow = crate::load_flow(path)?;
                    let host = host_with_store(&target.host).await?;
                    host.check(&flow)?;
                    let runs = host.past_runs(&flow.name, HISTORY_RUNS).await?;
                    let optimized = host.optimize(&flow, level, runs)?;
                    let applied = apply && !optimized.is_unchanged();
                    if applied {
                        optimize::apply(path, &optimized.text)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                    }
                    json!({
                        "flow": flow.name,
                        "level": level,
                        "applied": applied,
                        "changes": optimized.changes,
                        "diff": optimized.diff(&flow),
                        "text": optimized.text,
                    })
                }
            };
            if target.json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", answer["diff"].as_str().unwrap_or_default());
                let changes = answer["changes"].as_array().cloned().unwrap_or_default();
                if changes.is_empty() {
                    println!("nothing to change at level {level}");
                }
                for change in &changes {
                    println!(
                        "- {}: {}",
                        change["what"].as_str().unwrap_or("?"),
                        change["reason"].as_str().unwrap_or("")
                    );
                }
                if answer["applied"] == true {
                    println!("written back (the old version is kept as .bak)");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn kind_name(r: &Recommendation) -> String {
    serde_json::to_value(r.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn print_metrics(m: &OptimizationMetrics) {
    let e = &m.execution_optimization;
    println!(
        "optimization: {} (level {})",
        if m.optimization_enabled { "on" } else { "off" },
        m.optimization_level
    );
    println!(
        "runs: {} ({} in parallel), {:.1} ms on average, {:.1} ms saved by parallelism",
        e.runs, e.parallel_execution_count, e.average_execution_time, e.optimization_savings
    );
    let l = &m.lazy_loading;
    println!(
        "components: {} in memory ({} bytes, {:.0}% of the limit), hit rate {:.0}%, {} compiled, {} from disk",
        l.total_entries,
        l.total_size,
        l.memory_usage * 100.0,
        l.hit_rate * 100.0,
        l.compiles,
        l.disk_hits
    );
    print_pools(&json!({ "wasm": m.resource_pools.wasm }));
}

fn print_pools(pools: &Value) {
    for (kind, pool) in pools.as_object().into_iter().flatten() {
        println!(
            "{kind} pools: {} alive, {} ready, {} in use, {} acquisitions, {:.3} ms average",
            pool["totalResources"],
            pool["availableResources"],
            pool["inUseResources"],
            pool["acquisitionCount"],
            pool["averageAcquisitionTime"].as_f64().unwrap_or(0.0)
        );
        for keyed in pool["byKey"].as_array().into_iter().flatten() {
            let s = &keyed["stats"];
            println!(
                "  {:14} {} alive, {} ready, {} in use, p99 {:.1} µs",
                keyed["key"].as_str().unwrap_or("?"),
                s["total"],
                s["available"],
                s["in_use"],
                s["acquire_p99_us"].as_f64().unwrap_or(0.0)
            );
        }
    }
}
