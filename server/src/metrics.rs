//! `GET /metrics`: Prometheus (OpenMetrics text). Run and step figures are
//! counted from each finished run's summary, exactly; cache and pool figures
//! are read from the host at scrape time.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use qflow::{Host, RunSummary};

use crate::{ApiError, AppState};

type Labels = Vec<(&'static str, String)>;

fn duration_histogram() -> Histogram {
    // 0.1 ms to about 26 s: trivial steps to slow ones.
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

/// The server's registry and the series it counts itself.
pub(crate) struct Metrics {
    registry: Registry,
    runs: Family<Labels, Counter>,
    run_duration: Family<Labels, Histogram, fn() -> Histogram>,
    steps: Family<Labels, Counter>,
    step_duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    pub(crate) fn new(host: Arc<Host>) -> Metrics {
        let mut registry = Registry::with_prefix("qflow");
        let runs = Family::<Labels, Counter>::default();
        registry.register("runs", "Runs finished, by flow and status", runs.clone());
        let run_duration: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "run_duration",
            "Wall time of finished runs, by flow",
            Unit::Seconds,
            run_duration.clone(),
        );
        let steps = Family::<Labels, Counter>::default();
        registry.register("steps", "Steps ended, by plugin and status", steps.clone());
        let step_duration: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "step_duration",
            "Time of steps that ran, first attempt to last, by plugin",
            Unit::Seconds,
            step_duration.clone(),
        );
        registry.register_collector(Box::new(HostFigures { host }));
        Metrics { registry, runs, run_duration, steps, step_duration }
    }

    /// Counts a finished run: called with every summary, never sampled.
    pub(crate) fn record(&self, summary: &RunSummary) {
        let flow = ("flow", summary.flow.clone());
        let status = ("status", format!("{:?}", summary.status).to_lowercase());
        self.runs.get_or_create(&vec![flow.clone(), status]).inc();
        self.run_duration.get_or_create(&vec![flow]).observe(summary.wall_ms / 1e3);
        for step in &summary.steps {
            let plugin = ("plugin", step.plugin.clone());
            let status = ("status", format!("{:?}", step.status).to_lowercase());
            self.steps.get_or_create(&vec![plugin.clone(), status]).inc();
            if let Some(ms) = step.duration_ms() {
                self.step_duration.get_or_create(&vec![plugin]).observe(ms / 1e3);
            }
        }
    }
}

/// What the host knows at scrape time: its caches and pools.
struct HostFigures {
    host: Arc<Host>,
}

impl std::fmt::Debug for HostFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostFigures")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(0u64);
    let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    for (labels, value) in values {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(0.0f64);
    let mut family = encoder.encode_descriptor(name, help, unit, metric.metric_type())?;
    for (labels, value) in values {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for HostFigures {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.host.stats();
        let cache = |name: &'static str| vec![("cache", name.to_owned())];
        let (components, assets) = (&stats.components.memory, &stats.assets);
        counter(
            &mut encoder,
            "cache_hits",
            "Requests served from memory",
            &[(cache("components"), components.hits), (cache("assets"), assets.hits)],
        )?;
        counter(
            &mut encoder,
            "cache_misses",
            "Requests that started a load",
            &[(cache("components"), components.misses), (cache("assets"), assets.misses)],
        )?;
        counter(
            &mut encoder,
            "cache_evictions",
            "Entries dropped to keep under the limit",
            &[(cache("components"), components.evictions), (cache("assets"), assets.evictions)],
        )?;
        gauge(
            &mut encoder,
            "cache_bytes",
            "Bytes held in memory",
            Some(&Unit::Bytes),
            &[
                (cache("components"), components.bytes as f64),
                (cache("assets"), assets.bytes as f64),
            ],
        )?;
        counter(
            &mut encoder,
            "components_compiled",
            "Components compiled with Cranelift",
            &[(Vec::new(), stats.components.compiles)],
        )?;
        counter(
            &mut encoder,
            "components_disk_hits",
            "Components loaded precompiled from disk",
            &[(Vec::new(), stats.components.disk_hits)],
        )?;
        // One plugin may have several pools (one per config): a series per
        // plugin, summed; the slowest pool's quantiles.
        let mut pools: Vec<(&str, String, qflow::PoolStats)> = Vec::new();
        for (plugin, s) in self.host.pool_stats() {
            match pools.iter_mut().find(|(_, p, _)| *p == plugin) {
                Some((_, _, sum)) => {
                    sum.total += s.total;
                    sum.available += s.available;
                    sum.in_use += s.in_use;
                    sum.acquisitions += s.acquisitions;
                    sum.acquire_p50_us = sum.acquire_p50_us.max(s.acquire_p50_us);
                    sum.acquire_p99_us = sum.acquire_p99_us.max(s.acquire_p99_us);
                }
                None => pools.push(("wasm", plugin, s)),
            }
        }
        // Outbound HTTP: a pool per origin; databases: a pool per id.
        pools
            .extend(self.host.http_pool_stats().into_iter().map(|(origin, s)| ("http", origin, s)));
        pools.extend(self.host.db_pool_stats().into_iter().map(|(id, s)| ("db", id, s)));
        let by_pool = |f: &dyn Fn(&qflow::PoolStats) -> f64| -> Vec<(Labels, f64)> {
            pools
                .iter()
                .map(|(kind, key, s)| {
                    (vec![("kind", (*kind).to_owned()), ("key", key.clone())], f(s))
                })
                .collect()
        };
        gauge(
            &mut encoder,
            "pool_resources",
            "Resources alive in a pool",
            None,
            &by_pool(&|s| s.total as f64),
        )?;
        gauge(
            &mut encoder,
            "pool_in_use",
            "Resources handed out",
            None,
            &by_pool(&|s| s.in_use as f64),
        )?;
        let acquisitions: Vec<(Labels, u64)> = pools
            .iter()
            .map(|(kind, key, s)| {
                (vec![("kind", (*kind).to_owned()), ("key", key.clone())], s.acquisitions)
            })
            .collect();
        counter(&mut encoder, "pool_acquisitions", "Resources handed out so far", &acquisitions)?;
        let mut quantiles = Vec::new();
        for (kind, key, s) in &pools {
            for (quantile, us) in [("0.5", s.acquire_p50_us), ("0.99", s.acquire_p99_us)] {
                let labels = vec![
                    ("kind", (*kind).to_owned()),
                    ("key", key.clone()),
                    ("quantile", quantile.to_owned()),
                ];
                quantiles.push((labels, us / 1e6));
            }
        }
        gauge(
            &mut encoder,
            "pool_acquire",
            "Acquisition time over recent acquisitions",
            Some(&Unit::Seconds),
            &quantiles,
        )?;
        Ok(())
    }
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OpenMetrics text")))]
pub(crate) async fn prometheus(
    State(state): State<Arc<AppState>>,
) -> Result<impl IntoResponse, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e.to_string()))?;
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text))
}
