//! The one wasmtime [`Engine`](wasmtime::Engine) every plugin runs on, and
//! the settings Qflow narrows wasmtime to.

use super::http::{HttpClient, HttpConfig};
use super::sql::{Databases, SqlConfig};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::memory::MemoryBudget;
pub use super::memory::MemoryStats;

use wasmtime::{Config, Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How the engine is set up. The defaults suit a host running up to about a
/// thousand steps at once.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Use wasmtime's pooling allocator: memories and tables are reserved
    /// once and recycled with copy-on-write images, so instantiating costs
    /// microseconds. `QFLOW_POOLING=0` turns it off; where the address space
    /// is too small for the pool, the engine falls back to on-demand
    /// allocation by itself.
    pub pooling: bool,
    /// How many plugin instances may be alive at once (each running step
    /// holds one); a step beyond that waits for one to end. With pooling,
    /// every slot reserves address space (not memory) up front.
    pub max_instances: u32,
    /// How often the epoch advances. A running guest yields to the scheduler
    /// once per tick, so CPU-bound steps cannot starve the others; 10 ms keeps
    /// that overhead negligible.
    pub epoch_tick: Duration,
    /// The linear memory all instances together may hold, in MiB. An
    /// instance that would grow past it waits (idle pooled instances are
    /// dropped first) until others give memory back, instead of pushing
    /// the host into the OOM killer. Default: half of the machine's memory
    /// (or of the cgroup's limit, if lower); the CLI's
    /// `--max-total-memory-mb` (`QFLOW_MAX_TOTAL_MEMORY_MB`) sets it.
    pub max_total_memory_mb: u64,
    /// How the pooling allocator resets a slot when an instance ends.
    pub reset: ResetPath,
    /// Steps' outbound HTTP: its connection pools and limits.
    pub http: HttpConfig,
    /// Steps' databases.
    pub sql: SqlConfig,
}

/// How an ended instance's slot is made clean for the next one. A fresh
/// instance per call is the default, so this is paid once per step: with
/// `madvise` alone, every reset and every first write after it (a
/// copy-on-write fault) costs TLB-shootdown interrupts to the other cores
/// while they run steps. Keeping the first pages of each memory resident
/// and resetting them in place, finding the dirty ones with the kernel's
/// `PAGEMAP_SCAN` (Linux 6.7+), avoids most of them; where the kernel lacks
/// it, wasmtime falls back to resetting the resident part with `memset` and
/// the rest with `madvise`. Isolation is the same either way: a fresh
/// instance sees nothing of the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResetPath {
    /// Use `PAGEMAP_SCAN` where the kernel has it (`QFLOW_PAGEMAP=0` turns
    /// it off).
    pub pagemap_scan: bool,
    /// Bytes at the start of each linear memory kept resident and reset in
    /// place, where `PAGEMAP_SCAN` is in use: 1 MiB, where a small step's
    /// stack, data and heap live. (Measured: 64 KiB and 16 MiB are no
    /// faster for a trivial step, and every idle slot may keep this much
    /// resident.)
    pub memory_keep_resident: usize,
    /// Bytes of each table kept resident, likewise: 64 KiB.
    pub table_keep_resident: usize,
}

impl Default for ResetPath {
    fn default() -> ResetPath {
        ResetPath {
            pagemap_scan: std::env::var("QFLOW_PAGEMAP").map_or(true, |v| v != "0" && v != "off"),
            memory_keep_resident: 1 << 20,
            table_keep_resident: 64 << 10,
        }
    }
}

impl ResetPath {
    /// Whether `PAGEMAP_SCAN` is used: asked for, and the kernel has it.
    pub fn pagemap_scan_active(&self) -> bool {
        self.pagemap_scan && PoolingAllocationConfig::is_pagemap_scan_available()
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            pooling: std::env::var("QFLOW_POOLING").map_or(true, |v| v != "0" && v != "off"),
            max_instances: 1000,
            epoch_tick: Duration::from_millis(10),
            max_total_memory_mb: (machine_memory_mb() / 2).max(64),
            reset: ResetPath::default(),
            http: HttpConfig::default(),
            sql: SqlConfig::default(),
        }
    }
}

/// The memory this process may use, in MiB: the machine's, or its
/// cgroup's limit where that is lower; 4 GiB if neither can be read.
fn machine_memory_mb() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib >> 10)
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(|bytes| bytes >> 20);
    match (meminfo, cgroup) {
        (Some(machine), Some(limit)) => machine.min(limit),
        (Some(mb), None) | (None, Some(mb)) => mb,
        (None, None) => 4096,
    }
}

/// How often a step waiting for a slot looks again for idle instances to
/// drop, besides when a slot comes free.
const RECHECK: Duration = Duration::from_millis(50);

/// Instances the host's own calls (`describe`, loaders) may have alive at
/// once, beyond the steps' `max_instances`.
const HOST_CALL_SLOTS: u32 = 16;

/// What holds instances besides running calls: the pools of warm ones.
/// The engine asks it to let go when a slot or memory is short, so that an
/// idle spare never starves a step.
pub(crate) trait Reclaim: Send + Sync {
    /// Drops the least recently used idle instance of any pool; whether
    /// there was one.
    fn evict_idle(&self) -> bool;
    /// Who holds instances now, for an error that must say why none is free.
    fn holders(&self) -> String;
}

/// The wasmtime engine, the thread that advances its epoch, the permits
/// that bound how many instances are alive, and the memory they share.
#[derive(Clone)]
pub(crate) struct Engine {
    inner: wasmtime::Engine,
    pooling: bool,
    instances: Arc<Semaphore>,
    max_instances: u32,
    /// Slots of the host's own calls (`describe`, loaders), beside the
    /// steps' `max_instances`: busy steps can never keep a plugin from
    /// being described, nor an asset from loading.
    host_calls: Arc<Semaphore>,
    memory: Arc<MemoryBudget>,
    reclaim: Arc<OnceLock<Weak<dyn Reclaim>>>,
    http: Arc<HttpClient>,
    databases: Arc<Databases>,
}

impl Engine {
    pub(crate) fn new(config: &EngineConfig) -> wasmtime::Result<Engine> {
        let (inner, pooling) = if config.pooling {
            match wasmtime::Engine::new(&wasmtime_config(Some(config))) {
                Ok(engine) => (engine, true),
                Err(e) => {
                    tracing::warn!(
                        "the pooling allocator is unavailable ({e}); instances are allocated on demand"
                    );
                    (wasmtime::Engine::new(&wasmtime_config(None))?, false)
                }
            }
        } else {
            (wasmtime::Engine::new(&wasmtime_config(None))?, false)
        };
        spawn_epoch_ticker(&inner, config.epoch_tick)?;
        let max_instances = config.max_instances.max(1);
        let instances = Arc::new(Semaphore::new(max_instances as usize));
        Ok(Engine {
            inner,
            pooling,
            instances,
            max_instances,
            host_calls: Arc::new(Semaphore::new(HOST_CALL_SLOTS as usize)),
            memory: MemoryBudget::new(config.max_total_memory_mb),
            reclaim: Arc::default(),
            http: Arc::new(HttpClient::new(config.http)),
            databases: Arc::new(Databases::new(config.sql)),
        })
    }

    /// The host's outbound HTTP client (its connection pools).
    pub(crate) fn http(&self) -> &Arc<HttpClient> {
        &self.http
    }

    /// The host's databases (their connection pools).
    pub(crate) fn databases(&self) -> &Arc<Databases> {
        &self.databases
    }

    /// Who to ask for idle instances when slots or memory run short (the
    /// host's pools; set once).
    pub(crate) fn set_reclaimer(&self, reclaim: Weak<dyn Reclaim>) {
        let _ = self.reclaim.set(reclaim);
    }

    /// Drops one idle pooled instance, if there is one.
    pub(crate) fn evict_idle(&self) -> bool {
        self.reclaim.get().and_then(Weak::upgrade).is_some_and(|r| r.evict_idle())
    }

    /// A permit to keep one instance alive. When all `max_instances` are
    /// taken, idle pooled instances are dropped first, least recently used
    /// first; only when every slot holds a busy instance does it wait. The
    /// store holds the permit and gives it back when dropped, so the
    /// pooling allocator never runs out of slots and a step waits instead
    /// of failing.
    pub(crate) async fn instance_permit(&self) -> OwnedSemaphorePermit {
        loop {
            if let Some(permit) = self.try_instance_permit() {
                return permit;
            }
            if self.evict_idle() {
                continue;
            }
            // Woken by a slot coming free, and now and then to drop an
            // instance that went idle meanwhile.
            let waited = tokio::time::timeout(RECHECK, self.instances.clone().acquire_owned());
            match waited.await {
                Ok(Ok(permit)) => return permit,
                // The semaphore is never closed.
                Ok(Err(_)) => unreachable!("the instance semaphore is never closed"),
                Err(_) => continue,
            }
        }
    }

    /// A slot for one of the host's own calls (`describe`, a loader): never
    /// taken by a step, so a host that is busy with steps still loads.
    pub(crate) async fn host_call_permit(&self) -> OwnedSemaphorePermit {
        match self.host_calls.clone().acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => unreachable!("the host call semaphore is never closed"),
        }
    }

    /// A permit if a slot is free now: for spares, which must never queue
    /// ahead of a step or push an idle instance out.
    pub(crate) fn try_instance_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.instances.clone().try_acquire_owned().ok()
    }

    /// Why no instance can be made now: every slot busy, and by whom.
    pub(crate) fn slots_taken(&self) -> Option<String> {
        if self.instances.available_permits() > 0 {
            return None;
        }
        let holders = self.reclaim.get().and_then(Weak::upgrade).map(|r| r.holders());
        Some(format!(
            "all {} instance slots are taken ({}); raise max_instances or lower max_parallel",
            self.max_instances,
            holders.unwrap_or_else(|| "by running calls".to_owned())
        ))
    }

    /// The host-wide memory budget.
    pub(crate) fn memory(&self) -> &Arc<MemoryBudget> {
        &self.memory
    }

    /// The memory budget's figures.
    pub(crate) fn memory_stats(&self) -> MemoryStats {
        self.memory.stats()
    }

    /// How many instances are alive now.
    pub(crate) fn instances_in_use(&self) -> usize {
        self.max_instances as usize - self.instances.available_permits()
    }

    pub(crate) fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner
    }

    /// Whether the pooling allocator is in use.
    pub(crate) fn pooling(&self) -> bool {
        self.pooling
    }
}

fn wasmtime_config(pooling: Option<&EngineConfig>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    // Deadlines and cooperative yields are counted in epochs: far cheaper
    // than fuel, which charges every instruction.
    config.epoch_interruption(true);
    // Copy-on-write images make a fresh instance's memory a mapping, not a copy.
    // (Measured: turning it off makes a trivial step 5% slower.)
    config.memory_init_cow(true);
    if let Some(settings) = pooling {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config(settings)));
    }
    config
}

/// The pooling allocator: slots for every step instance and host call, and
/// the reset path.
fn pooling_config(settings: &EngineConfig) -> PoolingAllocationConfig {
    {
        let n = settings.max_instances.saturating_add(HOST_CALL_SLOTS);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_stacks(n)
            // A Rust component built for wasm32-wasip2 holds its module and a
            // few adapter shims: several core instances and tables, one memory.
            .total_core_instances(n.saturating_mul(4))
            .total_tables(n.saturating_mul(4))
            .total_memories(n.saturating_mul(2))
            .max_memories_per_component(2)
            .max_tables_per_component(4);
        let reset = settings.reset;
        // `Auto`: used where the kernel has it, a clean fallback where not
        // (`Yes` would refuse to start there). Without the scan, pages kept
        // resident are reset with `memset`, which costs more than it saves
        // (measured: a trivial step 59 µs instead of 36 µs with 1 MiB), so
        // nothing is kept then: wasmtime's own default.
        let keep = |bytes: usize| if reset.pagemap_scan_active() { bytes } else { 0 };
        pool.pagemap_scan(if reset.pagemap_scan { Enabled::Auto } else { Enabled::No })
            .linear_memory_keep_resident(keep(reset.memory_keep_resident))
            .table_keep_resident(keep(reset.table_keep_resident));
        // Measured and left at wasmtime's defaults, which made no difference
        // to a trivial step or a chain: `max_unused_warm_slots` (100; 0 the
        // same), `decommit_batch_size` (1; 16 the same or slightly worse).
        pool
    }
}

/// Advances the engine's epoch every `tick` until the engine is dropped.
fn spawn_epoch_ticker(engine: &wasmtime::Engine, tick: Duration) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new().name("qflow-epoch".into()).spawn(move || {
        loop {
            std::thread::sleep(tick);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard on the reset path: asked for by default, and in force
    /// wherever the kernel has `PAGEMAP_SCAN`, with pages kept resident for
    /// it to work on (without them wasmtime never scans).
    #[test]
    fn the_cheap_reset_path_is_on_by_default_where_the_kernel_has_it() {
        let config = EngineConfig {
            reset: ResetPath { pagemap_scan: true, ..ResetPath::default() },
            ..EngineConfig::default()
        };
        let pool = pooling_config(&config);
        assert_eq!(pool.get_pagemap_scan(), Enabled::Auto);
        assert!(config.reset.memory_keep_resident > 0 && config.reset.table_keep_resident > 0);
        assert_eq!(
            config.reset.pagemap_scan_active(),
            PoolingAllocationConfig::is_pagemap_scan_available()
        );
        let off = EngineConfig {
            reset: ResetPath { pagemap_scan: false, ..ResetPath::default() },
            ..config
        };
        assert_eq!(pooling_config(&off).get_pagemap_scan(), Enabled::No);
        assert!(!off.reset.pagemap_scan_active());
        // Either way an engine starts: `Auto` never refuses a kernel.
        assert!(Engine::new(&config).is_ok_and(|e| e.pooling()));
        assert!(Engine::new(&off).is_ok_and(|e| e.pooling()));
    }
}
