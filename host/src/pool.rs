//! A generic async pool of resources: plugin instances now, connections
//! later.
//!
//! Built on tokio primitives rather than deadpool: deadpool has neither a
//! minimum size kept warm in the background nor idle reaping, and Qflow's
//! instance pools need both (a spare instance must be instantiated and
//! initialised before a step asks, and dropped when nobody has asked for a
//! while). What it needs beyond a mutex is small: a FIFO queue of waiters,
//! a timeout on each wait, and one maintenance task per pool.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::lock;
pub use crate::model::PoolStats;

/// Makes (and checks) the resources of a pool.
pub trait Manager: Send + Sync + 'static {
    /// What the pool holds.
    type Resource: Send + 'static;
    /// Why making one failed.
    type Error: fmt::Display + Send + 'static;

    /// Makes a new resource.
    fn create(&self) -> impl Future<Output = Result<Self::Resource, Self::Error>> + Send;

    /// Makes a spare to keep `min` ready: nobody waits for it, so a manager
    /// whose resources are scarce may decline rather than queue for one.
    fn create_spare(&self) -> impl Future<Output = Result<Self::Resource, Self::Error>> + Send {
        self.create()
    }

    /// Whether an idle resource is still good; an unhealthy one is dropped.
    fn healthy(&self, _resource: &mut Self::Resource) -> impl Future<Output = bool> + Send {
        async { true }
    }

    /// Whether an idle resource, unused since `idle_since` (tokio's clock),
    /// may serve the caller taking it: a bad one is dropped and the next
    /// one taken (deadpool's `recycle`). Called on every reuse: keep the
    /// common case cheap.
    fn recycle(
        &self,
        _resource: &mut Self::Resource,
        _idle_since: Instant,
    ) -> impl Future<Output = bool> + Send {
        async { true }
    }
}

/// A pool's limits and timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Resources kept ready (idle) at all times, made in the background.
    pub min: usize,
    /// Resources alive at most, idle and in use together.
    pub max: usize,
    /// An idle resource above `min` is dropped after this long unused (ms).
    pub idle_timeout_ms: u64,
    /// How often idle resources are checked (ms).
    pub health_check_ms: u64,
    /// How long making one resource may take (ms).
    pub create_timeout_ms: u64,
    /// How long `acquire` may wait when `max` are in use (ms).
    pub acquire_timeout_ms: u64,
    /// Keep `min` ready only while making a resource takes at least this
    /// long on average (µs); `None`: always. Handing a ready resource over
    /// from the maintenance task costs a wake-up of another thread, which
    /// is more than making a cheap resource on the spot.
    pub min_only_if_slower_than_us: Option<u64>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min: 1,
            max: 1000,
            idle_timeout_ms: 60_000,
            health_check_ms: 30_000,
            create_timeout_ms: 10_000,
            acquire_timeout_ms: 30_000,
            min_only_if_slower_than_us: None,
        }
    }
}

impl PoolConfig {
    /// These limits and timings, with those `settings` give in their place.
    pub fn with_settings(self, settings: &crate::model::PoolSettings) -> PoolConfig {
        PoolConfig {
            min: settings.min.unwrap_or(self.min),
            max: settings.max.unwrap_or(self.max),
            idle_timeout_ms: settings.idle_timeout_ms.unwrap_or(self.idle_timeout_ms),
            health_check_ms: settings.health_check_ms.unwrap_or(self.health_check_ms),
            create_timeout_ms: settings.create_timeout_ms.unwrap_or(self.create_timeout_ms),
            acquire_timeout_ms: settings.acquire_timeout_ms.unwrap_or(self.acquire_timeout_ms),
            ..self
        }
    }
}

/// Why `acquire` failed; `E` is the manager's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError<E> {
    /// All `max` resources stayed in use for the whole acquisition timeout.
    #[error(
        "no instance came free within {timeout_ms} ms: all {max} are in use (raise the pool's max or acquire_timeout_ms)"
    )]
    Timeout {
        /// The acquisition timeout, in ms.
        timeout_ms: u64,
        /// The pool's `max`.
        max: usize,
    },
    /// Making a resource failed.
    #[error("{0}")]
    Create(E),
    /// Making a resource took longer than `create_timeout_ms`.
    #[error("making one took longer than {0} ms")]
    CreateTimeout(u64),
    /// The pool is being drained.
    #[error("the pool is being drained")]
    Draining,
}

struct Idle<R> {
    resource: R,
    since: Instant,
}

/// What a waiter is handed: a resource, or the error of the creation made
/// for it.
type Handed<R, E> = Result<R, PoolError<E>>;

struct State<R, E> {
    idle: VecDeque<Idle<R>>,
    /// First come, first served.
    waiters: VecDeque<oneshot::Sender<Handed<R, E>>>,
    /// Resources alive: idle, in use and being made.
    live: usize,
    in_use: usize,
    /// Spares the maintenance task is making now.
    making: usize,
}

/// How many acquisition times are kept for the percentiles.
const SAMPLES: usize = 4096;

struct Inner<M: Manager> {
    manager: M,
    config: PoolConfig,
    state: Mutex<State<M::Resource, M::Error>>,
    /// Wakes the maintenance task: something was taken or dropped. Shared,
    /// so the task can wait on it without keeping the pool alive.
    refill: Arc<Notify>,
    /// Wakes `drain`: a resource was dropped.
    dropped: Notify,
    draining: AtomicBool,
    /// Whether the maintenance task keeps `min` ready: cleared when a
    /// background creation fails (a plugin whose `init` rejects its config
    /// would otherwise be retried forever), set again by a creation that
    /// succeeds.
    filling: AtomicBool,
    /// When a resource was last asked for: `min` is kept ready only while
    /// the pool is in use, so an abandoned pool shrinks to nothing.
    last_acquire: Mutex<Instant>,
    acquisitions: AtomicU64,
    creations: AtomicU64,
    /// How long a creation takes, a moving average in ns.
    create_ns: AtomicU64,
    failures: AtomicU64,
    /// Recent acquisition times, in ns.
    samples: Mutex<VecDeque<u64>>,
}

/// A pool of resources made by `M`. Cheap to clone.
pub struct Pool<M: Manager> {
    inner: Arc<Inner<M>>,
}

impl<M: Manager> Clone for Pool<M> {
    fn clone(&self) -> Self {
        Pool { inner: self.inner.clone() }
    }
}

impl<M: Manager> Pool<M> {
    /// A pool that keeps `config.min` resources ready, made by a
    /// maintenance task that lives as long as the pool. Must be called
    /// inside a tokio runtime.
    pub fn new(manager: M, config: PoolConfig) -> Pool<M> {
        let config = PoolConfig { max: config.max.max(1), ..config };
        let inner = Arc::new(Inner {
            manager,
            config,
            state: Mutex::new(State {
                idle: VecDeque::new(),
                waiters: VecDeque::new(),
                live: 0,
                in_use: 0,
                making: 0,
            }),
            refill: Arc::new(Notify::new()),
            dropped: Notify::new(),
            draining: AtomicBool::new(false),
            filling: AtomicBool::new(true),
            last_acquire: Mutex::new(Instant::now()),
            acquisitions: AtomicU64::new(0),
            creations: AtomicU64::new(0),
            create_ns: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
        });
        tokio::spawn(maintain(Arc::downgrade(&inner)));
        Pool { inner }
    }

    /// What makes its resources.
    pub fn manager(&self) -> &M {
        &self.inner.manager
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// A resource: an idle one, else a new one if fewer than `max` are
    /// alive, else the next one released (waiters are served in arrival
    /// order), for at most `acquire_timeout_ms`.
    ///
    /// An idle resource is checked by the manager's `recycle` first; one
    /// found bad is dropped and the acquisition starts over (each try
    /// takes one idle resource away, so this ends).
    pub async fn acquire(&self) -> Result<Pooled<M>, PoolError<M::Error>> {
        let started = Instant::now();
        let inner = &self.inner;
        if inner.draining.load(Ordering::Acquire) {
            return Err(PoolError::Draining);
        }
        *lock(&inner.last_acquire) = started;
        let pooled = loop {
            let (mut pooled, idle_since) = self.take().await?;
            match idle_since {
                // Given up while it is checked, it is dropped (`Pooled`).
                Some(since) if !inner.manager.recycle(pooled.get(), since).await => {
                    drop(pooled);
                }
                _ => break pooled,
            }
        };
        inner.acquisitions.fetch_add(1, Ordering::Relaxed);
        inner.sample(started.elapsed());
        // In demand, and working: keep `min` ready again, even if it was
        // evicted.
        inner.filling.store(true, Ordering::Relaxed);
        Ok(pooled)
    }

    /// One resource, with when it went idle if it was idle.
    async fn take(&self) -> Result<(Pooled<M>, Option<Instant>), PoolError<M::Error>> {
        let inner = &self.inner;
        enum Next<R, E> {
            Ready(R, Instant),
            Create,
            Wait(oneshot::Receiver<Handed<R, E>>),
        }
        let (next, refill) = {
            let mut state = lock(&inner.state);
            let next = if let Some(idle) = state.idle.pop_back() {
                state.in_use += 1;
                Next::Ready(idle.resource, idle.since)
            } else if state.making > state.waiters.len() {
                // A spare is on its way: take it rather than make a second
                // one beside it (on two cores, the two would race).
                let (tx, rx) = oneshot::channel();
                state.waiters.push_back(tx);
                Next::Wait(rx)
            } else if state.live < inner.config.max {
                state.live += 1;
                state.in_use += 1;
                Next::Create
            } else {
                let (tx, rx) = oneshot::channel();
                state.waiters.push_back(tx);
                Next::Wait(rx)
            };
            // The maintenance task is woken only if there is work for it:
            // waking another thread on every acquisition costs more than
            // the acquisition itself.
            let refill = state.idle.len() < inner.min()
                || (matches!(next, Next::Wait(_)) && state.making == 0);
            (next, refill)
        };
        if refill {
            inner.refill.notify_one();
        }
        let fresh = matches!(next, Next::Create);
        let idle_since = match next {
            Next::Ready(_, since) => Some(since),
            _ => None,
        };
        let resource = match next {
            Next::Ready(resource, _) => resource,
            Next::Create => {
                // Given up while it is being made (the caller's future
                // dropped): its place is given back.
                let mut pending = Pending { inner, making: true, rx: None };
                let made = inner.create().await;
                pending.making = false;
                match made {
                    Ok(resource) => resource,
                    Err(e) => {
                        let mut state = lock(&inner.state);
                        state.live -= 1;
                        state.in_use -= 1;
                        return Err(e);
                    }
                }
            }
            Next::Wait(rx) => {
                let limit = Duration::from_millis(inner.config.acquire_timeout_ms);
                // Given up while waiting, a resource handed over meanwhile
                // goes back to the pool.
                let mut pending = Pending { inner, making: false, rx: Some(rx) };
                let Some(rx) = pending.rx.as_mut() else { unreachable!("just set") };
                let waited = tokio::time::timeout(limit, rx).await;
                if waited.is_ok() {
                    pending.rx = None;
                }
                match waited {
                    // A releaser counted it in use for us.
                    Ok(Ok(Ok(resource))) => resource,
                    // The creation made for us failed (and was counted).
                    Ok(Ok(Err(e))) => return Err(e),
                    // The pool dropped our sender: it is draining.
                    Ok(Err(_)) => return Err(PoolError::Draining),
                    Err(_) => {
                        inner.failures.fetch_add(1, Ordering::Relaxed);
                        let timeout_ms = inner.config.acquire_timeout_ms;
                        return Err(PoolError::Timeout { timeout_ms, max: inner.config.max });
                    }
                }
            }
        };
        Ok((Pooled { resource: Some(resource), pool: self.inner.clone(), fresh }, idle_since))
    }

    /// Stops handing out resources, drops the idle ones, and waits until
    /// every resource in use has come back (and is dropped too).
    pub async fn drain(&self) {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::Release);
        loop {
            let dropped = inner.dropped.notified();
            {
                let mut state = lock(&inner.state);
                let idle = state.idle.len();
                state.idle.clear();
                state.live -= idle;
                // Waiters see their senders dropped: `Draining`.
                state.waiters.clear();
                if state.live == 0 {
                    return;
                }
            }
            dropped.await;
        }
    }

    /// When its least recently used idle resource was given back, if it
    /// has one.
    pub fn oldest_idle(&self) -> Option<Instant> {
        lock(&self.inner.state).idle.front().map(|idle| idle.since)
    }

    /// Drops the least recently used idle resource, even below `min`, for
    /// someone who needs what it holds more; the pool stops keeping `min`
    /// ready until it is asked for a resource again. Whether there was one.
    pub fn evict_idle(&self) -> bool {
        let inner = &self.inner;
        let evicted = {
            let mut state = lock(&inner.state);
            let evicted = state.idle.pop_front();
            if evicted.is_some() {
                state.live -= 1;
                inner.filling.store(false, Ordering::Relaxed);
            }
            evicted
        };
        let Some(evicted) = evicted else { return false };
        drop(evicted);
        inner.dropped.notify_waiters();
        true
    }

    /// Whether the pool holds nothing and nobody has asked it for anything
    /// for longer than its idle timeout: it can be forgotten.
    pub fn is_abandoned(&self) -> bool {
        let inner = &self.inner;
        let unused = lock(&inner.last_acquire).elapsed()
            >= Duration::from_millis(inner.config.idle_timeout_ms);
        unused && lock(&inner.state).live == 0
    }

    /// The pool's figures now.
    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        let (total, available, in_use, waiters) = {
            let state = lock(&inner.state);
            let waiting = state.waiters.iter().filter(|w| !w.is_closed()).count();
            (state.live, state.idle.len(), state.in_use, waiting)
        };
        let mut samples: Vec<u64> = lock(&inner.samples).iter().copied().collect();
        samples.sort_unstable();
        let percentile = |p: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let rank = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] as f64 / 1e3
        };
        let mean = if samples.is_empty() {
            0.0
        } else {
            samples.iter().map(|&s| s as f64).sum::<f64>() / samples.len() as f64 / 1e3
        };
        PoolStats {
            total,
            available,
            in_use,
            waiters,
            acquisitions: inner.acquisitions.load(Ordering::Relaxed),
            creations: inner.creations.load(Ordering::Relaxed),
            failures: inner.failures.load(Ordering::Relaxed),
            acquire_mean_us: mean,
            acquire_p50_us: percentile(0.50),
            acquire_p99_us: percentile(0.99),
            create_mean_us: inner.create_ns.load(Ordering::Relaxed) as f64 / 1e3,
        }
    }
}

impl<M: Manager> Inner<M> {
    async fn create(&self) -> Result<M::Resource, PoolError<M::Error>> {
        self.made(self.manager.create()).await
    }

    /// How many idle resources to keep ready now: `min`, unless making
    /// them failed lately, or they are cheap enough to make on the spot.
    fn min(&self) -> usize {
        let cheap = self.config.min_only_if_slower_than_us.is_some_and(|us| {
            let made = self.creations.load(Ordering::Relaxed) > 0;
            made && self.create_ns.load(Ordering::Relaxed) < us.saturating_mul(1000)
        });
        if self.filling.load(Ordering::Relaxed) && !cheap { self.config.min } else { 0 }
    }

    async fn create_spare(&self) -> Result<M::Resource, PoolError<M::Error>> {
        self.made(self.manager.create_spare()).await
    }

    /// A creation under the create timeout, counted.
    async fn made(
        &self,
        creating: impl Future<Output = Result<M::Resource, M::Error>>,
    ) -> Result<M::Resource, PoolError<M::Error>> {
        let limit = Duration::from_millis(self.config.create_timeout_ms);
        let started = Instant::now();
        let result = match tokio::time::timeout(limit, creating).await {
            Ok(Ok(resource)) => Ok(resource),
            Ok(Err(e)) => Err(PoolError::Create(e)),
            Err(_) => Err(PoolError::CreateTimeout(self.config.create_timeout_ms)),
        };
        match &result {
            Ok(_) => {
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let average = match self.creations.fetch_add(1, Ordering::Relaxed) {
                    0 => took,
                    _ => {
                        let old = self.create_ns.load(Ordering::Relaxed);
                        old - old / 8 + took / 8
                    }
                };
                self.create_ns.store(average, Ordering::Relaxed);
                self.filling.store(true, Ordering::Relaxed);
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    fn sample(&self, took: Duration) {
        let mut samples = lock(&self.samples);
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(took.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// A creation by the maintenance task ended (`for_waiter`: it was made
    /// because a step waited). The resource goes to the first waiter, else
    /// to the idle list; an error goes to the waiter it was made for.
    /// Whether to back off before trying again.
    fn created(
        &self,
        state: &mut MutexGuard<'_, State<M::Resource, M::Error>>,
        made: Result<M::Resource, PoolError<M::Error>>,
        for_waiter: bool,
    ) -> bool {
        let e = match made {
            Ok(resource) => {
                state.in_use += 1;
                self.hand_over(state, resource);
                return false;
            }
            Err(e) => e,
        };
        state.live -= 1;
        // A spare that could not be made without waiting (no free slot, no
        // free memory) while a step waits for it: the next turn makes the
        // step's own at once, waiting as a step would.
        if !for_waiter && state.waiters.iter().any(|w| !w.is_closed()) {
            return false;
        }
        self.filling.store(false, Ordering::Relaxed);
        let shown = crate::model::printable(&e.to_string()).into_owned();
        tracing::debug!("a pool could not make a resource in the background: {shown}");
        // Made for a waiter: it gets the error, as if it had made it.
        let mut e = Some(e);
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(Err(e.take().unwrap_or(PoolError::Draining))) {
                Ok(()) => break,
                Err(Err(back)) => e = Some(back),
                Err(Ok(_)) => unreachable!("an error was sent"),
            }
        }
        !for_waiter
    }

    /// A resource comes back: to the first waiter, else to the idle list.
    fn give_back(&self, resource: M::Resource) {
        let mut state = lock(&self.state);
        self.hand_over(&mut state, resource);
    }

    fn hand_over(
        &self,
        state: &mut MutexGuard<'_, State<M::Resource, M::Error>>,
        resource: M::Resource,
    ) {
        if !self.draining.load(Ordering::Acquire) {
            // Still counted in use, now by the waiter.
            let Some(resource) = to_waiter(state, resource) else { return };
            state.in_use -= 1;
            state.idle.push_back(Idle { resource, since: Instant::now() });
            return;
        }
        // Draining: dropped here (under the lock: draining is rare).
        state.in_use -= 1;
        state.live -= 1;
        drop(resource);
        self.dropped.notify_waiters();
    }

    /// A resource in use is gone (discarded, or its holder dropped it).
    fn forget(&self) {
        let refill = {
            let mut state = lock(&self.state);
            state.in_use -= 1;
            state.live -= 1;
            state.idle.len() < self.min() || !state.waiters.is_empty()
        };
        self.dropped.notify_waiters();
        // A waiter may now be served by a new one; `min` may need one more.
        if refill {
            self.refill.notify_one();
        }
    }
}

/// Gives `resource` to the first waiter still waiting; back if there is none.
fn to_waiter<R, E>(state: &mut State<R, E>, mut resource: R) -> Option<R> {
    while let Some(waiter) = state.waiters.pop_front() {
        match waiter.send(Ok(resource)) {
            Ok(()) => return None,
            // That waiter gave up: try the next.
            Err(Ok(back)) => resource = back,
            Err(Err(_)) => unreachable!("a resource was sent"),
        }
    }
    Some(resource)
}

/// The pool's background work: keep `min` idle (and serve waiters when a
/// resource was discarded), reap idle resources above `min`, check health.
async fn maintain<M: Manager>(pool: Weak<Inner<M>>) {
    let mut last_check = Instant::now();
    loop {
        let Some(inner) = pool.upgrade() else { return };
        if inner.draining.load(Ordering::Acquire) {
            return;
        }
        let config = inner.config;
        let idle_timeout = Duration::from_millis(config.idle_timeout_ms);
        let in_use = lock(&inner.last_acquire).elapsed() < idle_timeout;
        let min = if in_use { inner.min() } else { 0 };
        // Make what is missing, one at a time: for a waiter, whatever it
        // takes; a spare only if the manager can make one without waiting.
        let make = {
            let mut state = lock(&inner.state);
            let waiting = state.waiters.iter().any(|w| !w.is_closed());
            if (waiting || state.idle.len() < min) && state.live < config.max {
                state.live += 1;
                state.making += 1;
                Some(waiting)
            } else {
                None
            }
        };
        if let Some(waiting) = make {
            let made = if waiting { inner.create().await } else { inner.create_spare().await };
            let back_off = {
                let mut state = lock(&inner.state);
                state.making -= 1;
                inner.created(&mut state, made, waiting)
            };
            // Do not spin on a failing manager.
            if back_off {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        }
        // Reap idle resources above `min`.
        let reaped: Vec<Idle<M::Resource>> = {
            let mut state = lock(&inner.state);
            let mut reaped = Vec::new();
            while state.idle.len() > min
                && state.idle.front().is_some_and(|i| i.since.elapsed() >= idle_timeout)
            {
                reaped.extend(state.idle.pop_front());
            }
            state.live -= reaped.len();
            reaped
        };
        if !reaped.is_empty() {
            drop(reaped);
            inner.dropped.notify_waiters();
        }
        if last_check.elapsed() >= Duration::from_millis(config.health_check_ms) {
            check_health(&inner).await;
            last_check = Instant::now();
        }
        let refill = inner.refill.clone();
        let next_check = Duration::from_millis(config.health_check_ms.min(config.idle_timeout_ms));
        drop(inner);
        // Wake on demand, or when something may have aged or need a check.
        let wake = refill.notified();
        let _ = tokio::time::timeout(next_check.max(Duration::from_millis(10)), wake).await;
    }
}

/// Takes each idle resource out, checks it, and puts back the healthy ones.
async fn check_health<M: Manager>(inner: &Inner<M>) {
    let idle: Vec<Idle<M::Resource>> = lock(&inner.state).idle.drain(..).collect();
    let mut healthy = Vec::new();
    let mut unhealthy = 0;
    for mut entry in idle {
        if inner.manager.healthy(&mut entry.resource).await {
            healthy.push(entry);
        } else {
            unhealthy += 1;
        }
    }
    let mut state = lock(&inner.state);
    state.live -= unhealthy;
    // Callers that queued while every resource was out being checked are
    // served first; the rest go back behind those taken meanwhile (newer),
    // idle since when they were.
    let mut kept = Vec::with_capacity(healthy.len());
    for Idle { resource, since } in healthy {
        state.in_use += 1;
        if let Some(resource) = to_waiter(&mut state, resource) {
            state.in_use -= 1;
            kept.push(Idle { resource, since });
        }
    }
    for entry in kept.into_iter().rev() {
        state.idle.push_front(entry);
    }
}

/// Pools by key (an origin, a database), made on first use. A pool that
/// went unused for its idle timeout and holds nothing is dropped when the
/// next key is added, so keys used once do not grow the host without end.
pub(crate) struct PoolSet<K, M: Manager> {
    pools: Mutex<std::collections::HashMap<K, Arc<Pool<M>>>>,
}

impl<K: std::hash::Hash + Eq + Clone, M: Manager> PoolSet<K, M> {
    pub(crate) fn new() -> PoolSet<K, M> {
        PoolSet { pools: Mutex::default() }
    }

    /// The pool for `key`, made by `make` if there is none.
    pub(crate) fn get<E>(
        &self,
        key: &K,
        make: impl FnOnce() -> Result<Pool<M>, E>,
    ) -> Result<Arc<Pool<M>>, E> {
        let mut pools = lock(&self.pools);
        if let Some(pool) = pools.get(key) {
            return Ok(pool.clone());
        }
        pools.retain(|_, pool| !pool.is_abandoned());
        let pool = Arc::new(make()?);
        pools.insert(key.clone(), pool.clone());
        Ok(pool)
    }

    /// Each pool's figures, by its key's `name`, in name order.
    pub(crate) fn stats(&self, name: impl Fn(&K) -> String) -> Vec<(String, PoolStats)> {
        let pools = lock(&self.pools);
        let mut stats: Vec<_> = pools.iter().map(|(k, p)| (name(k), p.stats())).collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }
}

/// An acquisition under way, undone if its future is dropped: a resource
/// being made gives its place back, one handed to a waiter that left goes
/// back to the pool.
struct Pending<'a, M: Manager> {
    inner: &'a Inner<M>,
    making: bool,
    rx: Option<oneshot::Receiver<Handed<M::Resource, M::Error>>>,
}

impl<M: Manager> Drop for Pending<'_, M> {
    fn drop(&mut self) {
        if self.making {
            self.inner.forget();
        }
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(resource)) = rx.try_recv() {
                self.inner.give_back(resource);
            }
        }
    }
}

/// A resource out of the pool. Dropping it discards it (it may be broken:
/// a trapped instance, a timed-out call); [`Pooled::release`] gives it back.
pub struct Pooled<M: Manager> {
    resource: Option<M::Resource>,
    pool: Arc<Inner<M>>,
    fresh: bool,
}

impl<M: Manager> Pooled<M> {
    /// The resource.
    pub fn get(&mut self) -> &mut M::Resource {
        match self.resource.as_mut() {
            Some(resource) => resource,
            // `resource` is only taken by `release` and `drop`, which consume self.
            None => unreachable!("a pooled resource is present until released or dropped"),
        }
    }

    /// Whether the resource was made for this acquisition (not one that
    /// served before, nor one handed over from another task).
    pub fn is_new(&self) -> bool {
        self.fresh
    }

    /// Gives the resource back for the next request.
    pub fn release(mut self) {
        if let Some(resource) = self.resource.take() {
            self.pool.give_back(resource);
        }
    }
}

impl<M: Manager> Drop for Pooled<M> {
    fn drop(&mut self) {
        if let Some(resource) = self.resource.take() {
            drop(resource);
            self.pool.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Makes numbered resources; `fail` makes creation fail.
    #[derive(Default)]
    struct Counter {
        made: AtomicUsize,
        fail: AtomicBool,
        unhealthy: AtomicBool,
        /// How long a creation takes, in ms (on tokio's clock).
        slow_ms: std::sync::atomic::AtomicU64,
        /// Resources idle this long (ms) are refused on reuse; 0: none.
        stale_after_ms: std::sync::atomic::AtomicU64,
        /// How long checking one on reuse takes, in ms.
        recycle_ms: std::sync::atomic::AtomicU64,
        /// How long a health check of one takes, in ms.
        check_ms: std::sync::atomic::AtomicU64,
    }

    impl Manager for Arc<Counter> {
        type Resource = usize;
        type Error = String;

        async fn create(&self) -> Result<usize, String> {
            let slow = self.slow_ms.load(Ordering::SeqCst);
            if slow > 0 {
                tokio::time::sleep(Duration::from_millis(slow)).await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err("cannot".into());
            }
            Ok(self.made.fetch_add(1, Ordering::SeqCst))
        }

        async fn healthy(&self, _: &mut usize) -> bool {
            let takes = self.check_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(takes)).await;
            !self.unhealthy.load(Ordering::SeqCst)
        }

        async fn recycle(&self, _: &mut usize, idle_since: Instant) -> bool {
            let takes = self.recycle_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(takes)).await;
            let stale = self.stale_after_ms.load(Ordering::SeqCst);
            stale == 0 || idle_since.elapsed() < Duration::from_millis(stale)
        }
    }

    fn config(min: usize, max: usize) -> PoolConfig {
        PoolConfig { min, max, acquire_timeout_ms: 200, ..PoolConfig::default() }
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn keeps_min_ready_in_the_background() {
        let counter = Arc::new(Counter::default());
        let pool = Pool::new(counter.clone(), config(3, 10));
        settle().await;
        let stats = pool.stats();
        assert_eq!((stats.total, stats.available, stats.creations), (3, 3, 3));
        let taken = pool.acquire().await.unwrap();
        settle().await;
        // One taken, and the pool made another to stay at three ready.
        assert_eq!((pool.stats().available, pool.stats().in_use), (3, 1));
        drop(taken);
        settle().await;
        assert_eq!(pool.stats().total, 3);
    }

    /// A caller that gives up (its future dropped: a step's deadline) while
    /// its resource is being made, or while it waits, takes no place with it.
    #[tokio::test(start_paused = true)]
    async fn an_acquisition_given_up_halfway_leaves_the_pool_whole() {
        let counter = Arc::new(Counter::default());
        let pool =
            Pool::new(counter.clone(), PoolConfig { create_timeout_ms: 60_000, ..config(0, 1) });
        counter.slow_ms.store(1000, Ordering::SeqCst);
        let gave_up = tokio::time::timeout(Duration::from_millis(10), pool.acquire()).await;
        assert!(gave_up.is_err(), "still being made when given up");
        let stats = pool.stats();
        assert_eq!((stats.total, stats.in_use), (0, 0), "{stats:?}");
        counter.slow_ms.store(0, Ordering::SeqCst);
        let held = pool.acquire().await.expect("the one place is free again");
        // A waiter that leaves: the resource given back goes to the idle list.
        let waiting = tokio::time::timeout(Duration::from_millis(10), pool.acquire()).await;
        assert!(waiting.is_err());
        held.release();
        let stats = pool.stats();
        assert_eq!((stats.total, stats.available, stats.in_use), (1, 1, 0), "{stats:?}");
        pool.acquire().await.expect("served from the idle list").release();
    }

    #[tokio::test(start_paused = true)]
    async fn the_acquisition_timeout_fires_with_a_clear_error() {
        let pool = Pool::new(Arc::new(Counter::default()), config(0, 1));
        let held = pool.acquire().await.unwrap();
        let err = pool.acquire().await.err().unwrap();
        assert_eq!(err, PoolError::Timeout { timeout_ms: 200, max: 1 });
        assert!(err.to_string().contains("all 1 are in use"), "{err}");
        assert_eq!(pool.stats().failures, 1);
        drop(held);
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let pool = Pool::new(
            Arc::new(Counter::default()),
            PoolConfig { acquire_timeout_ms: 5000, ..config(0, 1) },
        );
        let held = pool.acquire().await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..5 {
            let (pool, order) = (pool.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let resource = pool.acquire().await.unwrap();
                lock(&order).push(i);
                resource.release();
            }));
            // Let it queue before the next arrives.
            settle().await;
        }
        assert_eq!(pool.stats().waiters, 5);
        held.release();
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*lock(&order), vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_discarded_resource_is_never_handed_out_again() {
        let pool = Pool::new(Arc::new(Counter::default()), config(0, 4));
        let mut first = pool.acquire().await.unwrap();
        let id = *first.get();
        drop(first); // discarded, as a trapped instance is
        let mut second = pool.acquire().await.unwrap();
        assert_ne!(*second.get(), id);
        second.release();
        let mut third = pool.acquire().await.unwrap();
        assert_ne!(*third.get(), id);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_resources_above_min_are_reaped_and_an_unused_pool_empties() {
        let pool = Pool::new(
            Arc::new(Counter::default()),
            PoolConfig { idle_timeout_ms: 1000, health_check_ms: 600_000, ..config(1, 10) },
        );
        let taken: Vec<_> = futures::future::join_all((0..4).map(|_| pool.acquire())).await;
        for resource in taken {
            resource.unwrap().release();
        }
        assert_eq!(pool.stats().available, 4);
        // Keep using one: the three others age past the idle timeout.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            pool.acquire().await.unwrap().release();
        }
        settle().await;
        let stats = pool.stats();
        assert_eq!((stats.available, stats.total), (1, 1), "{stats:?}");
        assert!(!pool.is_abandoned());
        // Nobody asks any more: after the idle timeout even `min` goes.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        settle().await;
        assert_eq!(pool.stats().total, 0);
        assert!(pool.is_abandoned());
    }

    /// Idle resources the manager refuses on reuse are dropped, and the
    /// caller gets a good one; a caller that gives up during the check
    /// leaves the pool whole.
    #[tokio::test(start_paused = true)]
    async fn resources_refused_on_reuse_are_dropped_and_the_caller_served() {
        let counter = Arc::new(Counter::default());
        counter.stale_after_ms.store(500, Ordering::SeqCst);
        let pool = Pool::new(counter.clone(), config(0, 4));
        let (a, b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
        a.release();
        b.release();
        // Fresh from use: reused as they are.
        let mut again = pool.acquire().await.unwrap();
        assert_eq!((*again.get(), pool.stats().creations), (1, 2));
        again.release();
        // Stale: both idle ones are refused and dropped, and a third made.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut served = pool.acquire().await.unwrap();
        assert_eq!(*served.get(), 2, "a new one, not a stale one");
        let stats = pool.stats();
        assert_eq!((stats.total, stats.in_use, stats.available), (1, 1, 0), "{stats:?}");
        served.release();

        counter.recycle_ms.store(1000, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(10), pool.acquire()).await;
        assert!(gave_up.is_err(), "still being checked when given up");
        let stats = pool.stats();
        assert_eq!((stats.total, stats.in_use), (0, 0), "{stats:?}");
    }

    /// A caller that queued while the only resource was out for its health
    /// check gets it when the check ends, not an acquisition timeout.
    #[tokio::test(start_paused = true)]
    async fn a_caller_waiting_out_a_health_check_is_served_after_it() {
        let counter = Arc::new(Counter::default());
        let config = PoolConfig { health_check_ms: 100, acquire_timeout_ms: 5000, ..config(0, 1) };
        let pool = Pool::new(counter.clone(), config);
        pool.acquire().await.unwrap().release();
        counter.check_ms.store(1000, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        settle().await;
        assert_eq!(pool.stats().available, 0, "out for its check");
        let started = Instant::now();
        let mut served = pool.acquire().await.expect("served once the check ends");
        assert_eq!((*served.get(), pool.stats().creations), (0, 1));
        assert!(started.elapsed() < Duration::from_millis(2000), "not at the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn unhealthy_idle_resources_are_dropped_and_replaced() {
        let counter = Arc::new(Counter::default());
        let pool = Pool::new(counter.clone(), PoolConfig { health_check_ms: 100, ..config(2, 10) });
        settle().await;
        counter.unhealthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        settle().await;
        counter.unhealthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        settle().await;
        let stats = pool.stats();
        assert_eq!(stats.available, 2);
        assert!(stats.creations >= 4, "{stats:?}");
    }

    /// On two cores, a step that made its own instance while the pool was
    /// making a spare paid for two: it takes the spare instead.
    #[tokio::test(start_paused = true)]
    async fn a_request_while_a_spare_is_made_takes_that_spare() {
        let counter = Arc::new(Counter::default());
        counter.slow_ms.store(100, Ordering::SeqCst);
        let pool =
            Pool::new(counter.clone(), PoolConfig { acquire_timeout_ms: 5000, ..config(1, 10) });
        settle().await; // the spare is being made
        let taken = pool.acquire().await.unwrap();
        assert_eq!(pool.stats().creations, 1, "the spare, and no second one");
        drop(taken);
    }

    /// The error of a creation made for a waiter reaches that waiter, not
    /// an acquisition timeout later.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_error_of_the_creation_made_for_it() {
        let counter = Arc::new(Counter::default());
        counter.slow_ms.store(100, Ordering::SeqCst);
        counter.fail.store(true, Ordering::SeqCst);
        let pool =
            Pool::new(counter.clone(), PoolConfig { acquire_timeout_ms: 60_000, ..config(1, 10) });
        settle().await;
        let started = Instant::now();
        let err = pool.acquire().await.err().unwrap();
        assert_eq!(err, PoolError::Create("cannot".into()));
        assert!(started.elapsed() < Duration::from_secs(1), "not the 60 s timeout");
    }

    #[tokio::test]
    async fn drain_waits_for_resources_in_use() {
        let pool = Pool::new(Arc::new(Counter::default()), config(2, 4));
        settle().await;
        let held = pool.acquire().await.unwrap();
        let drained = Arc::new(AtomicBool::new(false));
        let draining = {
            let (pool, drained) = (pool.clone(), drained.clone());
            tokio::spawn(async move {
                pool.drain().await;
                drained.store(true, Ordering::SeqCst);
            })
        };
        settle().await;
        assert!(!drained.load(Ordering::SeqCst), "drain returned with a resource in use");
        assert_eq!(pool.acquire().await.err(), Some(PoolError::Draining));
        held.release();
        draining.await.unwrap();
        assert!(drained.load(Ordering::SeqCst));
        assert_eq!(pool.stats().total, 0);
    }

    #[tokio::test]
    async fn creation_failures_are_reported_and_counted() {
        let counter = Arc::new(Counter::default());
        counter.fail.store(true, Ordering::SeqCst);
        let pool = Pool::new(counter, config(0, 2));
        let err = pool.acquire().await.err().unwrap();
        assert_eq!(err, PoolError::Create("cannot".into()));
        assert_eq!(pool.stats().total, 0);
        assert!(pool.stats().failures >= 1);
    }
}
