//! The optimization metrics document: the shape users of the execution
//! optimization service know (`optimizationEnabled`,
//! `executionOptimization`, `lazyLoading`, `resourcePools`), with Qflow's
//! real figures. camelCase, times in ms.

use serde::{Deserialize, Serialize};

use super::report::RunSummary;
use super::stats::{ComponentStats, PoolStats};

/// `GET /api/v1/optimization/metrics` and `qflow optimization metrics --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OptimizationMetrics {
    /// Always true: Qflow always optimizes execution.
    pub optimization_enabled: bool,
    /// The level `optimize` uses unless told otherwise.
    pub optimization_level: String,
    /// What parallel execution did.
    pub execution_optimization: ExecutionOptimization,
    /// The compiled-component cache.
    pub lazy_loading: LazyLoading,
    /// The resource pools, by kind.
    pub resource_pools: ResourcePools,
}

/// Figures over the runs this host has finished.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecutionOptimization {
    /// Runs in which at least two steps overlapped in time.
    pub parallel_execution_count: u64,
    /// The component cache's hit rate (memory hits over requests).
    pub lazy_load_hit_rate: f64,
    /// Instances in use over instances alive, across the wasm pools.
    pub resource_pool_utilization: f64,
    /// Mean wall time of a run, in ms.
    pub average_execution_time: f64,
    /// The sum over runs of (step time − wall time), in ms: the time
    /// parallel execution saved against running the steps one by one. A run
    /// whose steps never overlapped counts 0, not its overhead.
    pub optimization_savings: f64,
    /// Runs finished (an extra key).
    pub runs: u64,
}

/// The compiled-component cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LazyLoading {
    /// Compiled components held in memory.
    pub total_entries: u64,
    /// Their size, in bytes.
    pub total_size: u64,
    /// Memory hits over requests.
    pub hit_rate: f64,
    /// `totalSize` as a fraction of the cache's limit.
    pub memory_usage: f64,
    /// Components loaded from the precompiled disk cache (an extra key).
    pub disk_hits: u64,
    /// Components compiled (an extra key).
    pub compiles: u64,
}

impl LazyLoading {
    /// The figures of a component store.
    pub fn from_stats(stats: &ComponentStats) -> LazyLoading {
        let memory = &stats.memory;
        LazyLoading {
            total_entries: memory.entries as u64,
            total_size: memory.bytes,
            hit_rate: memory.hit_rate,
            memory_usage: if memory.limit_bytes == 0 {
                0.0
            } else {
                memory.bytes as f64 / memory.limit_bytes as f64
            },
            disk_hits: stats.disk_hits,
            compiles: stats.compiles,
        }
    }
}

/// The resource pools, by kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResourcePools {
    /// The pre-warmed WebAssembly instance pools, by plugin.
    pub wasm: PoolSummary,
    /// Steps' outbound HTTP connections, by origin (`scheme://host:port`).
    #[serde(default)]
    pub http: PoolSummary,
    /// Steps' database connections, by database id.
    #[serde(default)]
    pub db: PoolSummary,
}

impl ResourcePools {
    /// Each kind's summary from its pools' figures.
    pub fn new(
        wasm: &[(String, PoolStats)],
        http: &[(String, PoolStats)],
        db: &[(String, PoolStats)],
    ) -> ResourcePools {
        ResourcePools {
            wasm: PoolSummary::of(wasm),
            http: PoolSummary::of(http),
            db: PoolSummary::of(db),
        }
    }
}

/// A kind of pool, summed over its pools, with a breakdown by key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolSummary {
    /// Resources alive.
    pub total_resources: u64,
    /// Idle resources, ready.
    pub available_resources: u64,
    /// Resources handed out.
    pub in_use_resources: u64,
    /// Acquisitions so far.
    pub acquisition_count: u64,
    /// Mean acquisition time, in ms.
    pub average_acquisition_time: f64,
    /// The worst 99th-percentile acquisition time of any pool, in ms.
    pub p99_acquisition_time: f64,
    /// Each pool, by key (the plugin, for wasm pools).
    pub by_key: Vec<KeyedPool>,
}

/// One pool's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyedPool {
    /// What it pools for: a plugin, a host, a database.
    pub key: String,
    /// Its figures.
    pub stats: PoolStats,
}

impl PoolSummary {
    /// The sum of some pools' figures.
    pub fn of(pools: &[(String, PoolStats)]) -> PoolSummary {
        let mut summary = PoolSummary::default();
        let mut weighted_mean_us = 0.0;
        for (key, stats) in pools {
            summary.total_resources += stats.total as u64;
            summary.available_resources += stats.available as u64;
            summary.in_use_resources += stats.in_use as u64;
            summary.acquisition_count += stats.acquisitions;
            weighted_mean_us += stats.acquire_mean_us * stats.acquisitions as f64;
            summary.p99_acquisition_time =
                summary.p99_acquisition_time.max(stats.acquire_p99_us / 1e3);
            summary.by_key.push(KeyedPool { key: key.clone(), stats: *stats });
        }
        if summary.acquisition_count > 0 {
            summary.average_acquisition_time =
                weighted_mean_us / summary.acquisition_count as f64 / 1e3;
        }
        summary
    }

    /// In use over alive; 0 when nothing is alive.
    pub fn utilization(&self) -> f64 {
        if self.total_resources == 0 {
            0.0
        } else {
            self.in_use_resources as f64 / self.total_resources as f64
        }
    }
}

/// What the host adds up as runs finish: exact, never sampled, never from
/// a lossy channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunTotals {
    /// Runs finished.
    pub runs: u64,
    /// Runs in which at least two steps overlapped.
    pub parallel_runs: u64,
    /// Their wall time, in ms.
    pub wall_ms: f64,
    /// Their savings (step time − wall time, at least 0 each), in ms.
    pub savings_ms: f64,
}

impl RunTotals {
    /// Counts a finished run.
    pub fn add(&mut self, summary: &RunSummary) {
        self.runs += 1;
        self.wall_ms += summary.wall_ms;
        self.savings_ms += (summary.step_ms - summary.wall_ms).max(0.0);
        if overlapped(summary) {
            self.parallel_runs += 1;
        }
    }
}

/// Whether at least two of a run's steps were running at the same moment.
pub fn overlapped(summary: &RunSummary) -> bool {
    let mut spans: Vec<(f64, f64)> =
        summary.steps.iter().filter_map(|s| Some((s.start_ms?, s.end_ms?))).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut latest_end = f64::NEG_INFINITY;
    for (start, end) in spans {
        if start < latest_end {
            return true;
        }
        latest_end = latest_end.max(end);
    }
    false
}

impl OptimizationMetrics {
    /// The document from the host's figures.
    pub fn new(
        level: &str,
        totals: &RunTotals,
        components: &ComponentStats,
        resource_pools: ResourcePools,
    ) -> OptimizationMetrics {
        OptimizationMetrics {
            optimization_enabled: true,
            optimization_level: level.to_owned(),
            execution_optimization: ExecutionOptimization {
                parallel_execution_count: totals.parallel_runs,
                lazy_load_hit_rate: components.memory.hit_rate,
                resource_pool_utilization: resource_pools.wasm.utilization(),
                average_execution_time: if totals.runs == 0 {
                    0.0
                } else {
                    totals.wall_ms / totals.runs as f64
                },
                optimization_savings: totals.savings_ms,
                runs: totals.runs,
            },
            lazy_loading: LazyLoading::from_stats(components),
            resource_pools,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{StepReport, StepStatus};

    fn summary(spans: &[(f64, f64)], wall_ms: f64) -> RunSummary {
        let steps = spans
            .iter()
            .enumerate()
            .map(|(i, &(start, end))| StepReport {
                status: StepStatus::Succeeded,
                start_ms: Some(start),
                end_ms: Some(end),
                ..StepReport::pending(&format!("s{i}"), &"p")
            })
            .collect::<Vec<_>>();
        RunSummary {
            run_id: "r".into(),
            flow: "f".into(),
            status: crate::model::RunStatus::Succeeded,
            wall_ms,
            step_ms: spans.iter().map(|(s, e)| e - s).sum(),
            efficiency: 1.0,
            max_parallel: 2,
            plan: Default::default(),
            steps,
            store: Default::default(),
        }
    }

    #[test]
    fn totals_count_overlap_and_savings_by_their_definitions() {
        let mut totals = RunTotals::default();
        totals.add(&summary(&[(0.0, 100.0), (50.0, 150.0)], 150.0));
        totals.add(&summary(&[(0.0, 10.0), (10.0, 20.0)], 21.0));
        assert_eq!((totals.runs, totals.parallel_runs), (2, 1));
        assert_eq!(totals.wall_ms, 171.0);
        // 200 − 150 for the first; the second saved nothing (not −1).
        assert_eq!(totals.savings_ms, 50.0);
    }

    #[test]
    fn the_document_has_the_seeds_keys_in_camel_case() {
        let pools = vec![(
            "jq".to_owned(),
            PoolStats {
                total: 4,
                available: 3,
                in_use: 1,
                acquisitions: 10,
                acquire_mean_us: 2.0,
                acquire_p99_us: 9.0,
                ..PoolStats::default()
            },
        )];
        let doc = OptimizationMetrics::new(
            "balanced",
            &RunTotals::default(),
            &ComponentStats::default(),
            ResourcePools::new(&pools, &[], &[]),
        );
        let json = serde_json::to_value(&doc).unwrap();
        for key in [
            "optimizationEnabled",
            "optimizationLevel",
            "executionOptimization",
            "lazyLoading",
            "resourcePools",
        ] {
            assert!(json.get(key).is_some(), "{key} missing: {json}");
        }
        let wasm = &json["resourcePools"]["wasm"];
        assert_eq!(wasm["totalResources"], 4);
        assert_eq!(wasm["inUseResources"], 1);
        assert_eq!(wasm["averageAcquisitionTime"], 0.002);
        assert_eq!(json["executionOptimization"]["resourcePoolUtilization"], 0.25);
        for key in [
            "parallelExecutionCount",
            "lazyLoadHitRate",
            "averageExecutionTime",
            "optimizationSavings",
        ] {
            assert!(json["executionOptimization"].get(key).is_some(), "{key}");
        }
        for key in ["totalEntries", "totalSize", "hitRate", "memoryUsage"] {
            assert!(json["lazyLoading"].get(key).is_some(), "{key}");
        }
    }
}
