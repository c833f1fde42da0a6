//! How a matmul's or attention's work items are spread over candle's barrier pool: each thread
//! owns a contiguous share and takes it from the front, a quarter of what is left at a time,
//! with a CAS on its own cache line; a thread that runs out steals from the back of another's
//! share. One shared atomic cursor for every chunk (candle's `execute_chunked`) would bounce its
//! cache line between the cores on each of a step's ~150 pool calls; a plain static split would
//! leave a thread the OS delays holding up the step.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Threads past a prologue, on a cache line of its own.
#[repr(align(64))]
struct Arrivals(AtomicUsize);

/// A share `start..end` packed in one word, so owner and thief agree with one CAS.
#[repr(align(64))]
struct Share(AtomicU64);

impl Share {
    fn new(start: usize, end: usize) -> Self {
        Self(AtomicU64::new(((start as u64) << 32) | end as u64))
    }

    /// A quarter of what is left (at least one item) from the front (`front`) or the back:
    /// takes shrink as the share does (guided scheduling), so a thread is never left waiting on
    /// a large last take of the other's. A fixed sixteenth of the output layer's 3072 panels
    /// left the calling thread waiting 6–13 µs for the other at the end of each step.
    fn take(&self, front: bool) -> Option<std::ops::Range<usize>> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (start, end) = ((cur >> 32) as usize, (cur & 0xFFFF_FFFF) as usize);
            if start >= end {
                return None;
            }
            let grain = ((end - start) / 4).max(1);
            let (range, next) = if front {
                let to = (start + grain).min(end);
                (start..to, ((to as u64) << 32) | end as u64)
            } else {
                let from = end.saturating_sub(grain).max(start);
                (from..end, ((start as u64) << 32) | from as u64)
            };
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(range),
                Err(now) => cur = now,
            }
        }
    }
}

/// Runs `f` over every item of `0..n` exactly once, on all of the pool's threads.
pub(super) fn split(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if n > 0 {
        split_after(0, |_| {}, n, f);
    }
}

/// `split`, after `prologue` has run over `0..units` (preparation every item needs, such as
/// quantizing a matmul's activations) on all threads, shared out the same way, and every
/// thread has seen it finish: one pool call instead of a serial pass while the others idle.
/// A thread that starts late finds its share of the prologue taken, and waits at most for
/// the few units another thread is still running.
pub(super) fn split_after(
    units: usize,
    prologue: impl Fn(usize) + Sync,
    n: usize,
    f: impl Fn(std::ops::Range<usize>) + Sync,
) {
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    assert!(n.max(units) < u32::MAX as usize, "too many work items");
    let (before, items) = (Shares::new(units, threads), Shares::new(n, threads));
    let done = Arrivals(AtomicUsize::new(0));
    pool.execute(|tid| {
        if units > 0 {
            let ran = before.drain(tid, |r| r.for_each(&prologue));
            done.0.fetch_add(ran, Ordering::AcqRel);
            while done.0.load(Ordering::Acquire) < units {
                std::hint::spin_loop();
            }
        }
        items.drain(tid, &f);
    });
}

/// `f` on every element of `items`, each once, on all of the pool's threads: per-sequence work
/// of some tens of µs between forwards (sampling a token from a vocabulary row), which would
/// otherwise leave the other threads idle. One element runs on the calling thread.
pub(crate) fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    if items.len() <= 1 {
        return items.iter_mut().for_each(f);
    }
    let base = Shared(items.as_mut_ptr());
    split(items.len(), |range| {
        for i in range {
            // SAFETY: `split` hands out every index once, so no element is reached twice, and
            // `T: Send` lets another thread have it for the call.
            f(unsafe { &mut *base.get().add(i) })
        }
    });
}

/// `0..n` cut into one contiguous share per thread.
struct Shares(Vec<Share>);

impl Shares {
    fn new(n: usize, threads: usize) -> Self {
        Self(
            (0..threads)
                .map(|t| Share::new(t * n / threads, (t + 1) * n / threads))
                .collect(),
        )
    }

    /// Thread `tid` runs its own share from the front, then steals from the back of the
    /// others'; returns how many items it ran.
    fn drain(&self, tid: usize, f: impl Fn(std::ops::Range<usize>)) -> usize {
        let threads = self.0.len();
        let mut ran = 0;
        let mut run = |r: std::ops::Range<usize>| {
            ran += r.len();
            f(r)
        };
        while let Some(r) = self.0[tid].take(true) {
            run(r);
        }
        for other in (1..threads).map(|k| (tid + k) % threads) {
            while let Some(r) = self.0[other].take(false) {
                run(r);
            }
        }
        ran
    }
}

/// A buffer shared by pool workers that each write their own disjoint elements.
pub(crate) struct Shared<T>(pub(crate) *mut T);
// SAFETY: users guarantee disjoint writes (see `matmul_into`, `llama::attention`,
// `pool::for_each_mut`), and the pool joins every worker (or passes a barrier) before the buffer
// is read.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}
// Copyable whatever T is: it is only a pointer (a derive would ask for `T: Copy`).
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
impl<T> Shared<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_item_runs_once() {
        for n in [0, 1, 2, 7, 64, 1001] {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            split(n, |r| {
                for i in r {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn for_each_mut_reaches_every_element_once() {
        for n in [0, 1, 2, 5, 64] {
            let mut items: Vec<usize> = (0..n).collect();
            for_each_mut(&mut items, |x| *x = *x * 10 + 1);
            assert_eq!(items, (0..n).map(|x| x * 10 + 1).collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_whole_prologue_runs_once_before_any_item() {
        for units in [1, 2, 7, 40] {
            let done: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
            let items = AtomicUsize::new(0);
            let prologue = |u: usize| {
                done[u].fetch_add(1, Ordering::Relaxed);
            };
            split_after(units, prologue, 100, |r| {
                assert!(done.iter().all(|d| d.load(Ordering::Relaxed) == 1));
                items.fetch_add(r.len(), Ordering::Relaxed);
            });
            assert_eq!(items.load(Ordering::Relaxed), 100, "units = {units}");
        }
    }
}
