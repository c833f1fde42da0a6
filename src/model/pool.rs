//! How a matmul's or attention's work items are spread over candle's barrier pool: each thread
//! owns a contiguous share and takes it from the front, a few items at a time, with a CAS on its
//! own cache line; a thread that runs out steals from the back of another's share. candle's
//! `execute_chunked` instead has every thread take every chunk from one shared atomic cursor,
//! and that cache line bouncing between the cores cost ~10% of a decode step (151 pool calls a
//! step); a plain static split would leave a thread the OS delays holding up the step.

use std::sync::atomic::{AtomicU64, Ordering};

/// A share `start..end` packed in one word, so owner and thief agree with one CAS.
#[repr(align(64))]
struct Share(AtomicU64);

impl Share {
    fn new(start: usize, end: usize) -> Self {
        Self(AtomicU64::new(((start as u64) << 32) | end as u64))
    }

    /// Up to `grain` items from the front (`front`) or the back of what is left.
    fn take(&self, grain: usize, front: bool) -> Option<std::ops::Range<usize>> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (start, end) = ((cur >> 32) as usize, (cur & 0xFFFF_FFFF) as usize);
            if start >= end {
                return None;
            }
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
    if n == 0 {
        return;
    }
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    assert!(n < u32::MAX as usize, "too many work items");
    let shares: Vec<Share> = (0..threads)
        .map(|t| Share::new(t * n / threads, (t + 1) * n / threads))
        .collect();
    // About eight takes per share: few CAS, and little left over for a thief to wait on.
    let grain = n.div_ceil(threads * 8).max(1);
    pool.execute(|tid| {
        while let Some(r) = shares[tid].take(grain, true) {
            f(r);
        }
        for other in (1..threads).map(|k| (tid + k) % threads) {
            while let Some(r) = shares[other].take(grain, false) {
                f(r);
            }
        }
    });
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
}
