//! The host-wide memory budget: the linear memory all instances together
//! may hold, counted in 64 KiB wasm pages. An instance that would grow past
//! it waits until others give memory back, instead of pushing the host into
//! the OOM killer; it is refused only when waiting could never end.
//!
//! The accounting is one small mutex-guarded state, not a semaphore: a
//! semaphore hands freed pages to the first waiter a few at a time, so a
//! large request at the head of the queue would soak up what a small,
//! running instance needs to finish — and then everyone waits.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

/// A wasm page.
pub(crate) const PAGE: u64 = 64 << 10;

/// How often a waiting instance looks again for idle instances to drop and
/// for a deadlock, besides when memory is given back.
const RECHECK: Duration = Duration::from_millis(50);

/// The budget's figures.
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

#[derive(Default)]
struct State {
    free: usize,
    /// Instances holding part of the budget, and how many of them are
    /// waiting for more.
    holders: usize,
    waiting_holders: usize,
    peak: usize,
    waits: u64,
}

/// The budget itself, shared by every instance of an engine.
pub(crate) struct MemoryBudget {
    total: usize,
    state: Mutex<State>,
    freed: Notify,
}

/// Why an instance may not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// It alone would hold more than the whole budget.
    TooLarge,
    /// Every instance that holds memory is waiting for more: none will
    /// give any back.
    Deadlock,
    /// A spare being made: it never waits, nor pushes others out.
    Spare,
}

/// What one instance holds of the budget; given back when dropped.
pub(crate) struct Reservation {
    budget: Arc<MemoryBudget>,
    pages: usize,
}

impl MemoryBudget {
    pub(crate) fn new(mb: u64) -> Arc<MemoryBudget> {
        let total = usize::try_from(mb.saturating_mul(16)).unwrap_or(usize::MAX).max(1);
        Arc::new(MemoryBudget {
            total,
            state: Mutex::new(State { free: total, ..State::default() }),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the data if it ever did.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pages needed to hold `bytes`.
    pub(crate) fn pages(bytes: usize) -> usize {
        (bytes as u64).div_ceil(PAGE) as usize
    }

    pub(crate) fn limit_bytes(&self) -> u64 {
        self.total as u64 * PAGE
    }

    /// An empty reservation for a new instance.
    pub(crate) fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation { budget: self.clone(), pages: 0 }
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        let state = self.lock();
        MemoryStats {
            limit_bytes: self.limit_bytes(),
            in_use_bytes: (self.total - state.free) as u64 * PAGE,
            peak_bytes: state.peak as u64 * PAGE,
            waits: state.waits,
        }
    }
}

/// A holder counted as waiting; uncounted however the wait ends (a step
/// cut at its deadline drops the future mid-wait).
struct Waiting<'a> {
    budget: &'a MemoryBudget,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.budget.lock().waiting_holders -= 1;
    }
}

impl Reservation {
    /// Takes `pages` more, if they are free now.
    fn take(&mut self, state: &mut State, pages: usize) -> bool {
        if state.free < pages {
            return false;
        }
        state.free -= pages;
        if self.pages == 0 && pages > 0 {
            state.holders += 1;
        }
        self.pages += pages;
        state.peak = state.peak.max(self.budget.total - state.free);
        true
    }

    /// `pages` more: at once if they are free; else (unless this is a
    /// spare) after `evict_idle` drops idle pooled instances; else when
    /// other instances give memory back. Refused when waiting could never
    /// end.
    pub(crate) async fn grow(
        &mut self,
        pages: usize,
        spare: bool,
        evict_idle: impl Fn() -> bool,
    ) -> Result<(), Refused> {
        let budget = self.budget.clone();
        if self.pages.saturating_add(pages) > budget.total {
            return Err(Refused::TooLarge);
        }
        let mut counted = false;
        loop {
            if self.take(&mut budget.lock(), pages) {
                return Ok(());
            }
            if spare {
                return Err(Refused::Spare);
            }
            if evict_idle() {
                continue;
            }
            let freed = budget.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let waiting = {
                let mut state = budget.lock();
                if self.take(&mut state, pages) {
                    return Ok(());
                }
                let holder = self.pages > 0;
                if state.holders > 0 && state.waiting_holders + usize::from(holder) >= state.holders
                {
                    return Err(Refused::Deadlock);
                }
                if !counted {
                    state.waits += 1;
                    counted = true;
                }
                if holder {
                    state.waiting_holders += 1;
                }
                holder.then_some(Waiting { budget: &budget })
            };
            // Woken when memory comes back, and now and then to drop
            // instances that went idle meanwhile and to look for a deadlock.
            let _ = tokio::time::timeout(RECHECK, freed).await;
            drop(waiting);
        }
    }

    /// Pages held.
    #[cfg(test)]
    pub(crate) fn pages(&self) -> usize {
        self.pages
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.pages == 0 {
            return;
        }
        {
            // Pages and the count of holders change together.
            let mut state = self.budget.lock();
            state.free += self.pages;
            state.holders -= 1;
        }
        self.budget.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_memory_when_a_holder_gives_it_back() {
        let budget = MemoryBudget::new(1); // 16 pages
        let mut a = budget.reservation();
        let mut b = budget.reservation();
        a.grow(10, false, || false).await.unwrap();
        b.grow(2, false, || false).await.unwrap();
        // b wants 8 more: only 4 are free, and a is running (not waiting).
        let waiting =
            tokio::spawn(async move { b.grow(8, false, || false).await.map(|()| b.pages()) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished());
        assert_eq!(budget.stats().waits, 1);
        drop(a);
        assert_eq!(waiting.await.unwrap(), Ok(10));
        assert_eq!(budget.stats().peak_bytes, 12 * PAGE);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_can_never_be_met_are_refused_at_once() {
        let budget = MemoryBudget::new(1);
        let mut a = budget.reservation();
        assert_eq!(a.grow(17, false, || false).await, Err(Refused::TooLarge));
        a.grow(12, false, || false).await.unwrap();
        // What it holds and what it asks for add up to more than there is.
        assert_eq!(a.grow(5, false, || false).await, Err(Refused::TooLarge));
        let mut spare = budget.reservation();
        assert_eq!(spare.grow(8, true, || false).await, Err(Refused::Spare));
        assert_eq!(budget.stats().waits, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_holder_waits_the_one_that_sees_it_is_refused() {
        let budget = MemoryBudget::new(1);
        let (mut a, mut b) = (budget.reservation(), budget.reservation());
        a.grow(8, false, || false).await.unwrap();
        b.grow(8, false, || false).await.unwrap();
        let first = tokio::spawn(async move { (a.grow(4, false, || false).await, a) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // b waiting too would leave nobody to give: b is refused, a waits on.
        assert_eq!(b.grow(4, false, || false).await, Err(Refused::Deadlock));
        assert!(!first.is_finished());
        drop(b);
        let (granted, a) = first.await.unwrap();
        assert_eq!((granted, a.pages()), (Ok(()), 12));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_instances_are_dropped_before_anyone_waits() {
        let budget = MemoryBudget::new(1);
        let mut held = budget.reservation();
        held.grow(12, false, || false).await.unwrap();
        let idle = std::sync::Mutex::new(Some(held));
        let mut step = budget.reservation();
        let evict = || idle.lock().unwrap().take().is_some();
        step.grow(8, false, evict).await.unwrap();
        assert_eq!(budget.stats().waits, 0);
    }
}
