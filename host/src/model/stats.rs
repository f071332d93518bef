//! Figures the runtime reports: the caches' and the pools'. Plain data, so
//! that summaries, the metrics document and the run store can carry them.

use serde::{Deserialize, Serialize};

/// A cache's counters, as [`Host::stats`](crate::Host::stats) reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CacheStats {
    /// Entries held.
    pub entries: usize,
    /// Bytes held (the sum of the entries' sizes).
    pub bytes: u64,
    /// The most bytes it holds.
    pub limit_bytes: u64,
    /// Requests served from memory.
    pub hits: u64,
    /// Requests that started a load.
    pub misses: u64,
    /// Requests that joined a load another request had started: neither a
    /// hit (they waited) nor a miss (nothing more was loaded).
    #[serde(default)]
    pub joins: u64,
    /// `hits / (hits + misses + joins)`; 0 before any request.
    pub hit_rate: f64,
    /// Entries dropped to keep under the limit.
    pub evictions: u64,
}

/// The component store's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ComponentStats {
    /// The in-memory LRU of compiled components.
    #[serde(flatten)]
    pub memory: CacheStats,
    /// Components loaded from a precompiled artifact on disk.
    pub disk_hits: u64,
    /// Components compiled with Cranelift.
    pub compiles: u64,
    /// Time spent compiling, in ms.
    pub compile_ms: f64,
    /// Artifacts on disk that were unusable (corrupt, truncated, foreign)
    /// and were replaced.
    pub disk_rejects: u64,
    /// Component files read and hashed for their digest: a file unchanged
    /// since this host or an earlier one on the same cache hashed it is not.
    #[serde(default)]
    pub files_hashed: u64,
}

/// The host's caches: compiled components and loader assets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stats {
    /// Compiled components.
    pub components: ComponentStats,
    /// Loader assets.
    pub assets: CacheStats,
}

/// A pool's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolStats {
    /// Resources alive (idle, in use, being made).
    pub total: usize,
    /// Idle resources, ready to hand out.
    pub available: usize,
    /// Resources handed out.
    pub in_use: usize,
    /// Requests waiting for one.
    pub waiters: usize,
    /// Successful acquisitions.
    pub acquisitions: u64,
    /// Resources made.
    pub creations: u64,
    /// Failed creations and acquisition timeouts.
    pub failures: u64,
    /// Acquisition time, mean over the recent samples, in µs.
    pub acquire_mean_us: f64,
    /// Acquisition time, median, in µs.
    pub acquire_p50_us: f64,
    /// Acquisition time, 99th percentile, in µs.
    pub acquire_p99_us: f64,
    /// Making one resource (for instances: instantiating it and running its
    /// `init`), a moving average, in µs.
    #[serde(default)]
    pub create_mean_us: f64,
}
