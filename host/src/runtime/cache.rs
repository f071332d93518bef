//! A byte-bounded LRU with single-flight loading: the machinery behind the
//! compiled-component store and the loader-asset cache.
//!
//! Eviction is least-recently-used, with TinyLFU-style admission: a new
//! value that would push out entries requested more often than itself is
//! served but not kept. A one-off sweep (`qflow plugins list` loading every
//! plugin, a rare flow) then cannot flush the hot set, and under a skewed
//! load the hit rate comes close to that of keeping the most popular
//! entries (see the `zipf` benchmark). Request counts are halved now and
//! then, so that what was hot yesterday can cool off.
//!
//! A load runs in its own task, so it finishes and fills the cache even when
//! the request that started it gives up (a timeout, a cancelled run); every
//! concurrent request for the same key awaits that one load.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::model::CacheStats;

/// Why a cached load failed.
#[derive(Debug, Clone)]
pub(crate) enum LoadError<E> {
    /// The loader failed.
    Failed(E),
    /// The load took longer than the cache's load timeout (it goes on in the
    /// background and fills the cache when it ends).
    TimedOut(Duration),
    /// The loader panicked: a bug in the host.
    Panicked(String),
}

impl<E: fmt::Display> fmt::Display for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Failed(e) => e.fmt(f),
            LoadError::TimedOut(limit) => {
                write!(f, "loading took longer than the load timeout of {} ms", limit.as_millis())
            }
            LoadError::Panicked(message) => write!(f, "loading failed in the host: {message}"),
        }
    }
}

type InFlight<V, E> = Shared<BoxFuture<'static, Result<V, LoadError<E>>>>;

struct Inner<K, V, E> {
    lru: lru::LruCache<K, (V, u64)>,
    bytes: u64,
    in_flight: HashMap<K, InFlight<V, E>>,
    /// Recent requests per key, for admission.
    frequency: HashMap<K, u32>,
    /// Requests counted since the counts were last halved.
    counted: u64,
    hits: u64,
    misses: u64,
    joins: u64,
    evictions: u64,
}

/// Counts are halved after this many requests per entry held (at least 64
/// entries' worth), so the window follows the workload.
const AGING_FACTOR: u64 = 10;

impl<K: Hash + Eq, V, E> Inner<K, V, E> {
    fn count_request(&mut self, key: &K)
    where
        K: Clone,
    {
        *self.frequency.entry(key.clone()).or_default() += 1;
        self.counted += 1;
        if self.counted > AGING_FACTOR * (self.lru.len() as u64).max(64) {
            self.frequency.retain(|_, n| {
                *n /= 2;
                *n > 0
            });
            self.counted = 0;
        }
    }

    fn frequency(&self, key: &K) -> u32 {
        self.frequency.get(key).copied().unwrap_or(0)
    }
}

/// Told what was evicted (each key with its size), outside the cache's lock.
pub(crate) type EvictionHook<K> = Box<dyn Fn(Vec<(K, u64)>) + Send + Sync>;

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Memory.
    Hit,
    /// This request started the load.
    Loaded,
    /// This request joined a load another one had started.
    Joined,
}

/// Values by key, at most `limit` bytes of them, least recently used out first.
pub(crate) struct Cache<K, V, E> {
    inner: Mutex<Inner<K, V, E>>,
    limit: u64,
    /// How long a request waits for a load (`None`: as long as it takes).
    timeout: Option<Duration>,
    on_evict: Option<EvictionHook<K>>,
}

impl<K, V, E> Cache<K, V, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A cache of at most `limit` bytes whose loads may take `timeout`
    /// (`None`: loads bounded by their parts' own limits).
    pub(crate) fn new(limit: u64, timeout: Option<Duration>) -> Cache<K, V, E> {
        Cache {
            inner: Mutex::new(Inner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                in_flight: HashMap::new(),
                frequency: HashMap::new(),
                counted: 0,
                hits: 0,
                misses: 0,
                joins: 0,
                evictions: 0,
            }),
            limit,
            timeout,
            on_evict: None,
        }
    }

    /// The same cache, telling `hook` what it evicts.
    pub(crate) fn on_evict(mut self, hook: EvictionHook<K>) -> Cache<K, V, E> {
        self.on_evict = Some(hook);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V, E>> {
        // Nothing panics while holding the lock; recover the data if it ever did.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value for `key`: from memory, or from the load already under way,
    /// or from `load` (which returns the value and its size in bytes).
    pub(crate) async fn get_or_load<F, Fut>(
        self: &Arc<Self>,
        key: &K,
        load: F,
    ) -> Result<V, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, u64), E>> + Send + 'static,
    {
        self.get_or_load_traced(key, load).await.0
    }

    /// [`Cache::get_or_load`], saying where the value came from.
    pub(crate) async fn get_or_load_traced<F, Fut>(
        self: &Arc<Self>,
        key: &K,
        load: F,
    ) -> (Result<V, LoadError<E>>, Outcome)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, u64), E>> + Send + 'static,
    {
        let (pending, outcome) = {
            let mut inner = self.lock();
            inner.count_request(key);
            if let Some((value, _)) = inner.lru.get(key) {
                let value = value.clone();
                inner.hits += 1;
                return (Ok(value), Outcome::Hit);
            }
            match inner.in_flight.get(key).cloned() {
                Some(pending) => {
                    inner.joins += 1;
                    (pending, Outcome::Joined)
                }
                None => {
                    inner.misses += 1;
                    let pending = self.start(key.clone(), load());
                    inner.in_flight.insert(key.clone(), pending.clone());
                    (pending, Outcome::Loaded)
                }
            }
        };
        let result = match self.timeout {
            None => pending.await,
            Some(limit) => match tokio::time::timeout(limit, pending).await {
                Ok(result) => result,
                Err(_) => Err(LoadError::TimedOut(limit)),
            },
        };
        (result, outcome)
    }

    /// Runs a load in its own task; when it ends, its value enters the cache
    /// and the key leaves the in-flight table.
    fn start(
        self: &Arc<Self>,
        key: K,
        load: impl Future<Output = Result<(V, u64), E>> + Send + 'static,
    ) -> InFlight<V, E> {
        let cache = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let result = load.await;
            let Some(cache) = cache.upgrade() else {
                return result.map(|(value, _)| value).map_err(LoadError::Failed);
            };
            let mut inner = cache.lock();
            inner.in_flight.remove(&key);
            match result {
                Ok((value, size)) => {
                    let evicted = cache.insert_locked(&mut inner, key, value.clone(), size);
                    drop(inner);
                    if let Some(hook) = cache.on_evict.as_ref().filter(|_| !evicted.is_empty()) {
                        hook(evicted);
                    }
                    Ok(value)
                }
                Err(e) => Err(LoadError::Failed(e)),
            }
        });
        async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(LoadError::Panicked(e.to_string())),
            }
        }
        .boxed()
        .shared()
    }

    /// Inserts a loaded value; returns what it evicted.
    fn insert_locked(
        &self,
        inner: &mut Inner<K, V, E>,
        key: K,
        value: V,
        size: u64,
    ) -> Vec<(K, u64)> {
        let mut evicted_entries = Vec::new();
        // A value larger than the whole cache is served but not kept.
        if size > self.limit {
            return evicted_entries;
        }
        if let Some((_, old)) = inner.lru.pop(&key) {
            inner.bytes -= old;
        }
        // Admission: the least recently used entries that would have to make
        // room must not be requested more often than the newcomer.
        let candidate = inner.frequency(&key);
        let mut freed = 0;
        let mut busiest_victim = 0;
        for (victim, (_, victim_size)) in inner.lru.iter().rev() {
            if inner.bytes - freed + size <= self.limit {
                break;
            }
            freed += victim_size;
            busiest_victim = busiest_victim.max(inner.frequency(victim));
        }
        if busiest_victim > candidate {
            return evicted_entries;
        }
        inner.lru.put(key, (value, size));
        inner.bytes += size;
        while inner.bytes > self.limit {
            match inner.lru.pop_lru() {
                Some((victim, (_, evicted))) => {
                    inner.bytes -= evicted;
                    inner.evictions += 1;
                    evicted_entries.push((victim, evicted));
                }
                None => break,
            }
        }
        evicted_entries
    }

    /// Whether `key` is in memory, without counting a request or touching its recency.
    #[cfg(test)]
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.lock().lru.contains(key)
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let inner = self.lock();
        let requests = inner.hits + inner.misses + inner.joins;
        CacheStats {
            entries: inner.lru.len(),
            bytes: inner.bytes,
            limit_bytes: self.limit,
            hits: inner.hits,
            misses: inner.misses,
            joins: inner.joins,
            hit_rate: if requests == 0 { 0.0 } else { inner.hits as f64 / requests as f64 },
            evictions: inner.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    type TestCache = Cache<u32, Arc<str>, String>;

    fn cache(limit: u64) -> Arc<TestCache> {
        Arc::new(Cache::new(limit, Some(Duration::from_secs(5))))
    }

    async fn load(cache: &Arc<TestCache>, key: u32, size: u64) -> Arc<str> {
        cache
            .get_or_load(&key, || async move { Ok((Arc::from(format!("v{key}")), size)) })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn keeps_to_its_byte_limit_dropping_the_least_recently_used() {
        let cache = cache(100);
        for key in 0..4 {
            load(&cache, key, 30).await;
        }
        // 4 x 30 > 100: the oldest went.
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes, stats.evictions), (3, 90, 1));
        assert!(!cache.contains(&0));
        // Touch 1, add 4: now 2 is the least recently used.
        load(&cache, 1, 30).await;
        load(&cache, 4, 30).await;
        assert!(cache.contains(&1) && !cache.contains(&2));
        assert!(cache.stats().bytes <= 100);
    }

    #[tokio::test]
    async fn a_rarely_requested_value_does_not_push_out_a_popular_one() {
        let cache = cache(100);
        for _ in 0..5 {
            load(&cache, 1, 60).await;
        }
        // 2 would need 1's room; 1 is requested more often: 2 is served, not kept.
        assert_eq!(&*load(&cache, 2, 60).await, "v2");
        assert!(cache.contains(&1) && !cache.contains(&2));
        // Once 2 is the more popular, it gets in.
        for _ in 0..5 {
            load(&cache, 2, 60).await;
        }
        assert!(cache.contains(&2) && !cache.contains(&1));
        assert_eq!(cache.stats().evictions, 1);
    }

    #[tokio::test]
    async fn counts_hits_and_misses() {
        let cache = cache(1000);
        load(&cache, 1, 10).await;
        load(&cache, 1, 10).await;
        load(&cache, 1, 10).await;
        load(&cache, 2, 10).await;
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (2, 2));
        assert!((stats.hit_rate - 0.5).abs() < 1e-9);
    }

    #[tokio::test]
    async fn an_entry_larger_than_the_cache_is_served_but_not_kept() {
        let cache = cache(10);
        assert_eq!(&*load(&cache, 7, 11).await, "v7");
        assert_eq!(cache.stats().entries, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_requests_share_one_load() {
        let cache = cache(1000);
        let loads = Arc::new(AtomicU32::new(0));
        let requests = (0..50).map(|_| {
            let (cache, loads) = (cache.clone(), loads.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&9, || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok((Arc::from("nine"), 1))
                    })
                    .await
            })
        });
        for request in futures::future::join_all(requests).await {
            assert_eq!(&*request.unwrap().unwrap(), "nine");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = cache(1000);
        let failed = cache.get_or_load(&1, || async { Err("no".to_owned()) }).await;
        assert!(matches!(failed, Err(LoadError::Failed(e)) if e == "no"));
        assert_eq!(&*load(&cache, 1, 1).await, "v1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_load_times_out_but_still_fills_the_cache() {
        let cache: Arc<TestCache> = Arc::new(Cache::new(100, Some(Duration::from_millis(100))));
        let slow = cache
            .get_or_load(&1, || async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok((Arc::from("late"), 1))
            })
            .await;
        assert!(matches!(slow, Err(LoadError::TimedOut(_))));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(cache.contains(&1));
    }
}
