//! Instance pool settings as flows, plugin settings files and the host's
//! configuration write them: every field optional, merged in that order.

use serde::{Deserialize, Serialize};

/// Pool settings, any of them: a step's (`pool = { … }` in the flow) over
/// its plugin's (`[pool]` in `NAME.plugin.toml` beside `NAME.wasm`) over the host's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolSettings {
    /// Initialised instances kept ready while the pool is in use (default 1).
    pub min: Option<usize>,
    /// Instances alive at most, ready and busy (default: the engine's `max_instances`).
    pub max: Option<usize>,
    /// How many calls one instance serves: 1 (the default) gives every call
    /// a fresh instance — the strongest isolation, with the pool keeping
    /// spares warm; more reuses an instance (and its `init`) that often.
    pub reuse: Option<u32>,
    /// An idle instance above `min` is dropped after this long (ms; 60 000);
    /// a pool nobody used for this long drops its `min` too.
    pub idle_timeout_ms: Option<u64>,
    /// How often idle instances are checked (ms; 30 000).
    pub health_check_ms: Option<u64>,
    /// How long instantiating and initialising one may take (ms; 10 000).
    pub create_timeout_ms: Option<u64>,
    /// How long a step waits for an instance when `max` are busy (ms; 30 000).
    pub acquire_timeout_ms: Option<u64>,
}

impl PoolSettings {
    /// These settings, with `fallback`'s where these say nothing.
    pub fn or(self, fallback: PoolSettings) -> PoolSettings {
        PoolSettings {
            min: self.min.or(fallback.min),
            max: self.max.or(fallback.max),
            reuse: self.reuse.or(fallback.reuse),
            idle_timeout_ms: self.idle_timeout_ms.or(fallback.idle_timeout_ms),
            health_check_ms: self.health_check_ms.or(fallback.health_check_ms),
            create_timeout_ms: self.create_timeout_ms.or(fallback.create_timeout_ms),
            acquire_timeout_ms: self.acquire_timeout_ms.or(fallback.acquire_timeout_ms),
        }
    }

    /// Sets `min`.
    pub fn with_min(mut self, min: usize) -> PoolSettings {
        self.min = Some(min);
        self
    }

    /// Sets `max`.
    pub fn with_max(mut self, max: usize) -> PoolSettings {
        self.max = Some(max);
        self
    }

    /// Sets `reuse`.
    pub fn with_reuse(mut self, reuse: u32) -> PoolSettings {
        self.reuse = Some(reuse);
        self
    }

    /// Sets `idle_timeout_ms`.
    pub fn with_idle_timeout_ms(mut self, ms: u64) -> PoolSettings {
        self.idle_timeout_ms = Some(ms);
        self
    }

    /// Sets `health_check_ms`.
    pub fn with_health_check_ms(mut self, ms: u64) -> PoolSettings {
        self.health_check_ms = Some(ms);
        self
    }

    /// Sets `acquire_timeout_ms`.
    pub fn with_acquire_timeout_ms(mut self, ms: u64) -> PoolSettings {
        self.acquire_timeout_ms = Some(ms);
        self
    }

    /// Sets `create_timeout_ms`.
    pub fn with_create_timeout_ms(mut self, ms: u64) -> PoolSettings {
        self.create_timeout_ms = Some(ms);
        self
    }
}
