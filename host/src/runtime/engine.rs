//! The one wasmtime [`Engine`](wasmtime::Engine) every plugin runs on, and
//! the settings Qflow narrows wasmtime to.

use std::sync::Arc;
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            pooling: std::env::var("QFLOW_POOLING").map_or(true, |v| v != "0" && v != "off"),
            max_instances: 1000,
            epoch_tick: Duration::from_millis(10),
        }
    }
}

/// The wasmtime engine, the thread that advances its epoch, and the permits
/// that bound how many instances are alive.
#[derive(Clone)]
pub(crate) struct Engine {
    inner: wasmtime::Engine,
    pooling: bool,
    instances: Arc<Semaphore>,
    max_instances: u32,
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
        Ok(Engine { inner, pooling, instances, max_instances })
    }

    /// A permit to keep one instance alive: waits while `max_instances` are.
    /// The store holds it and gives it back when dropped, so the pooling
    /// allocator never runs out of slots and a step waits instead of failing.
    pub(crate) async fn instance_permit(&self) -> OwnedSemaphorePermit {
        match self.instances.clone().acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => unreachable!("the instance semaphore is never closed"),
        }
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
        let n = settings.max_instances;
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
