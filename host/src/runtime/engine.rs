//! The one wasmtime [`Engine`](wasmtime::Engine) every plugin runs on, and
//! the settings Qflow narrows wasmtime to.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

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
    /// (or of the cgroup's limit, if lower); `QFLOW_MAX_TOTAL_MEMORY_MB`
    /// sets it.
    pub max_total_memory_mb: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let total_memory =
            std::env::var("QFLOW_MAX_TOTAL_MEMORY_MB").ok().and_then(|v| v.parse().ok());
        EngineConfig {
            pooling: std::env::var("QFLOW_POOLING").map_or(true, |v| v != "0" && v != "off"),
            max_instances: 1000,
            epoch_tick: Duration::from_millis(10),
            max_total_memory_mb: total_memory.unwrap_or_else(|| machine_memory_mb() / 2),
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

/// Linear memory, counted in 64 KiB wasm pages, that all instances share.
pub(crate) struct MemoryBudget {
    pages: Arc<Semaphore>,
    total_pages: usize,
    /// The most pages held at once, and how often an instance had to wait.
    peak: AtomicUsize,
    waits: AtomicU64,
    /// Instances that hold part of the budget, and how many of them are
    /// waiting for more: when all of them wait, none will ever give any
    /// back, so the last to ask is refused instead.
    holders: AtomicUsize,
    waiting_holders: AtomicUsize,
}

/// A holder counted as waiting while this lives.
struct Waiting<'a> {
    budget: &'a MemoryBudget,
    holder: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.holder {
            self.budget.waiting_holders.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The host-wide memory budget's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// The budget, in bytes.
    pub limit_bytes: u64,
    /// Held by live instances now.
    pub in_use_bytes: u64,
    /// The most held at once.
    pub peak_bytes: u64,
    /// How many times a growing instance waited for others to give memory back.
    pub waits: u64,
}

const PAGE: u64 = 64 << 10;

impl MemoryBudget {
    fn new(mb: u64) -> MemoryBudget {
        let total_pages = usize::try_from(mb.saturating_mul(16)).unwrap_or(Semaphore::MAX_PERMITS);
        let total_pages = total_pages.clamp(1, Semaphore::MAX_PERMITS);
        MemoryBudget {
            pages: Arc::new(Semaphore::new(total_pages)),
            total_pages,
            peak: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
            holders: AtomicUsize::new(0),
            waiting_holders: AtomicUsize::new(0),
        }
    }

    /// Pages needed to hold `bytes`.
    pub(crate) fn pages(bytes: usize) -> usize {
        (bytes as u64).div_ceil(PAGE) as usize
    }

    fn note_peak(&self) {
        let in_use = self.total_pages - self.pages.available_permits();
        self.peak.fetch_max(in_use, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        let in_use = self.total_pages - self.pages.available_permits();
        MemoryStats {
            limit_bytes: self.total_pages as u64 * PAGE,
            in_use_bytes: in_use as u64 * PAGE,
            peak_bytes: self.peak.load(Ordering::Relaxed) as u64 * PAGE,
            waits: self.waits.load(Ordering::Relaxed),
        }
    }
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
            memory: Arc::new(MemoryBudget::new(config.max_total_memory_mb)),
            reclaim: Arc::default(),
        })
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
            if !self.evict_idle() {
                break;
            }
        }
        match self.instances.clone().acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => unreachable!("the instance semaphore is never closed"),
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

    /// `pages` more of the host-wide memory budget for an instance that
    /// holds `held` pages already: at once if they are free, else after idle
    /// pooled instances are dropped, else when other instances give memory
    /// back. `None` when waiting could never end: the instance would hold
    /// more than the whole budget, or every instance holding memory is
    /// waiting for more.
    pub(crate) async fn reserve_memory(
        &self,
        held: usize,
        pages: usize,
    ) -> Option<OwnedSemaphorePermit> {
        let budget = &self.memory;
        if held.saturating_add(pages) > budget.total_pages {
            return None;
        }
        let pages32 = u32::try_from(pages).ok()?;
        let holder = held > 0;
        let counted = |permit: OwnedSemaphorePermit| {
            budget.note_peak();
            if !holder {
                // It holds memory from now until it gives it all back.
                budget.holders.fetch_add(1, Ordering::SeqCst);
            }
            permit
        };
        loop {
            if let Ok(permit) = budget.pages.clone().try_acquire_many_owned(pages32) {
                return Some(counted(permit));
            }
            if !self.evict_idle() {
                break;
            }
        }
        let waiting = budget.waiting_holders.fetch_add(usize::from(holder), Ordering::SeqCst)
            + usize::from(holder);
        let _waiting = Waiting { budget, holder };
        let holders = budget.holders.load(Ordering::SeqCst);
        if holders > 0 && waiting >= holders {
            // Everyone who could give memory back is waiting too.
            return None;
        }
        budget.waits.fetch_add(1, Ordering::Relaxed);
        let permit = budget.pages.clone().acquire_many_owned(pages32).await.ok()?;
        Some(counted(permit))
    }

    /// An instance that held part of the memory budget has given it back.
    pub(crate) fn memory_released(&self) {
        self.memory.holders.fetch_sub(1, Ordering::SeqCst);
    }

    /// The host-wide memory budget in bytes.
    pub(crate) fn memory_limit(&self) -> u64 {
        self.memory.total_pages as u64 * PAGE
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
    config.memory_init_cow(true);
    if let Some(settings) = pooling {
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
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
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
