//! tilt's own thread pool, and how a matmul's or attention's work items are spread over it.
//!
//! The pool never waits for a worker that has not started: a worker joins a job only while it is
//! open, and the calling thread, which works too, closes it once every item is taken and then
//! waits only for the workers inside. On a machine shared with another busy process, a
//! descheduled worker so costs a step nothing (its share is stolen) instead of holding up each
//! of the step's ~150 pool calls until the OS runs it again, as a barrier pool does. Idle
//! workers spin briefly, then sleep until the next job.
//!
//! Items: each thread owns a contiguous share and takes it from the front, a quarter of what is
//! left at a time, with a CAS on its own cache line; a thread that runs out steals from the back
//! of another's share. One shared atomic cursor for every chunk would bounce its cache line
//! between the cores on each pool call; a plain static split would leave the step to a thread
//! the OS delays.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

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
    assert!(n.max(units) < u32::MAX as usize, "too many work items");
    let pool = Pool::global();
    pool.run(|threads| {
        let (before, items) = (Shares::new(units, threads), Shares::new(n, threads));
        let done = Arrivals(AtomicUsize::new(0));
        move |tid| {
            if units > 0 {
                let ran = before.drain(tid, |r| r.for_each(&prologue));
                done.0.fetch_add(ran, Ordering::AcqRel);
                pool.wait_until(|| done.0.load(Ordering::Acquire) >= units);
            }
            items.drain(tid, &f);
        }
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

/// How long an idle worker spins for the next job before it sleeps (and a waiting thread
/// before it yields its core): the gaps between a step's pool calls are microseconds; between
/// steps (sampling, the engine's bookkeeping) longer.
const SPIN: Duration = Duration::from_micros(200);

/// A wait on another thread past this means it was descheduled in the middle of its work (a
/// piece of a job takes microseconds).
const LATE: Duration = Duration::from_micros(50);

/// The job's state in one word: its generation (high 32 bits), whether it is closed, and how
/// many workers are inside it (low bits).
const CLOSED: u64 = 1 << 31;
const INSIDE: u64 = CLOSED - 1;

/// The job being run: `f(tid)` erased to a pointer, valid while the job's caller waits in
/// `Pool::run`.
#[derive(Clone, Copy)]
struct Job {
    call: unsafe fn(*const (), usize),
    data: *const (),
}

unsafe fn call<F: Fn(usize) + Sync>(data: *const (), tid: usize) {
    // SAFETY: `data` is the `&F` of the `run` that published this job and is still waiting.
    unsafe { (*(data as *const F))(tid) }
}

struct Board {
    /// Generation, closed flag and workers inside (see `CLOSED`).
    state: AtomicU64,
    job: UnsafeCell<Job>,
    /// Workers asleep, to wake with the next job.
    asleep: AtomicUsize,
    panicked: AtomicBool,
    /// Nanoseconds threads waited on others past `LATE` in the current job.
    late: AtomicU64,
}

// SAFETY: `job` is written only by the caller holding `Pool::calls` while no worker is inside
// a job (the previous one closed and emptied), and read by workers only once inside one.
unsafe impl Sync for Board {}

pub(crate) struct Pool {
    board: &'static Board,
    workers: Vec<Thread>,
    /// One job at a time (the engine's thread calls; tests may call from several threads).
    calls: Mutex<Calls>,
}

/// The caller's side of the jobs, with the pacing that keeps the pool from waiting on a machine
/// too busy to run its workers. Over each window of jobs run together it adds up the time
/// threads spent waiting on another past `LATE` (the other was descheduled in the middle of a
/// piece of work); when that is a large share of the window's time, the next jobs run on the
/// caller alone, the workers asleep, for a while that doubles each time trying again fails and
/// resets when it succeeds. A stretch alone is kept only if its jobs ran faster than the
/// window's that sent it there: waits can also come from pieces of uneven size (attention over
/// a long context), and then two threads with waits still beat one, so the caller stays with
/// the workers for a number of windows that doubles with each such miss. A process sharing the
/// cores now and then (the server's own HTTP threads) costs a few percent and keeps the
/// workers; a busy neighbour costs tens of percent.
struct Calls {
    generation: u32,
    count: u64,
    alone_until: u64,
    alone_for: u64,
    /// Jobs run together in this window, their time, and the late waits in them.
    window: u32,
    window_time: Duration,
    window_late: Duration,
    /// Seconds per job of the window that sent the caller alone, and the stretch alone since.
    together_per_job: f64,
    alone_jobs: u32,
    alone_time: Duration,
    /// Windows left before the caller may go alone again, and how many the next miss costs.
    hold: u32,
    hold_for: u32,
}

/// Jobs run together per decision (a few decode steps).
const WINDOW: u32 = 512;
/// Share of a window's time lost to late waits past which the caller goes alone.
const LOST: f64 = 0.1;
/// Jobs run alone after the first bad window, and at most.
const ALONE_FIRST: u64 = WINDOW as u64;
const ALONE_MOST: u64 = 65_536;
/// Windows together after a first stretch alone that was slower, and at most.
const HOLD_FIRST: u32 = 1;
const HOLD_MOST: u32 = 256;

impl Calls {
    fn new() -> Self {
        Self {
            generation: 0,
            count: 0,
            alone_until: 0,
            alone_for: ALONE_FIRST,
            window: 0,
            window_time: Duration::ZERO,
            window_late: Duration::ZERO,
            together_per_job: 0.0,
            alone_jobs: 0,
            alone_time: Duration::ZERO,
            hold: 0,
            hold_for: HOLD_FIRST,
        }
    }

    /// Whether this job runs on the caller alone.
    fn alone(&mut self) -> bool {
        self.count += 1;
        self.count < self.alone_until
    }

    /// A job run together took `took`, `late` of it waiting on descheduled threads.
    fn record(&mut self, took: Duration, late: Duration) {
        self.window += 1;
        self.window_time += took;
        self.window_late += late;
        if self.window < WINDOW {
            return;
        }
        let lost = self.window_late.as_secs_f64() / self.window_time.as_secs_f64().max(1e-9);
        if self.hold > 0 {
            self.hold -= 1;
        } else if lost > LOST {
            self.together_per_job = self.window_time.as_secs_f64() / f64::from(WINDOW);
            self.alone_until = self.count + 1 + self.alone_for;
            self.alone_for = (self.alone_for * 2).min(ALONE_MOST);
        } else {
            self.alone_for = ALONE_FIRST;
        }
        (self.window, self.window_time, self.window_late) = (0, Duration::ZERO, Duration::ZERO);
    }

    /// A job run alone took `took`; after the stretch's last, it is judged against the window
    /// that started it.
    fn record_alone(&mut self, took: Duration) {
        self.alone_jobs += 1;
        self.alone_time += took;
        if self.count + 1 < self.alone_until {
            return;
        }
        let per_job = self.alone_time.as_secs_f64() / f64::from(self.alone_jobs);
        if per_job < self.together_per_job {
            self.hold_for = HOLD_FIRST;
        } else {
            self.alone_for = ALONE_FIRST;
            self.hold = self.hold_for;
            self.hold_for = (self.hold_for * 2).min(HOLD_MOST);
        }
        (self.alone_jobs, self.alone_time) = (0, Duration::ZERO);
    }
}

thread_local! {
    /// Set on the pool's workers and while a thread runs a job: a nested call runs inline.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

impl Pool {
    /// The process's pool: `RAYON_NUM_THREADS` (or `CANDLE_NUM_THREADS`, or every core)
    /// threads, the caller included.
    pub(crate) fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(candle_core::utils::get_num_threads().max(1) - 1))
    }

    fn new(workers: usize) -> Self {
        let board: &'static Board = Box::leak(Box::new(Board {
            state: AtomicU64::new(CLOSED),
            job: UnsafeCell::new(Job {
                call: call::<fn(usize)>,
                data: std::ptr::null(),
            }),
            asleep: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            late: AtomicU64::new(0),
        }));
        let workers = (0..workers)
            .map(|tid| {
                std::thread::Builder::new()
                    .name(format!("tilt-pool-{tid}"))
                    .spawn(move || work(board, tid))
                    .expect("spawning a pool thread")
                    .thread()
                    .clone()
            })
            .collect();
        Self {
            board,
            workers,
            calls: Mutex::new(Calls::new()),
        }
    }

    /// `f = job(threads)`, then `f(tid)` on the calling thread (tid `threads - 1`) and on every
    /// worker that joins before the caller's own `f` returns; returns once no worker is still
    /// inside `f`. `f` must let any subset of the threads finish the work (as `Shares::drain`
    /// does). `threads` is 1 when the caller runs the job alone.
    pub(crate) fn run<F: Fn(usize) + Sync>(&self, job: impl FnOnce(usize) -> F) {
        if self.workers.is_empty() || IN_POOL.get() {
            return job(1)(0);
        }
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls.alone() {
            IN_POOL.set(true);
            let started = Instant::now();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(1)(0)));
            IN_POOL.set(false);
            calls.record_alone(started.elapsed());
            return outcome.unwrap_or_else(|payload| std::panic::resume_unwind(payload));
        }
        let me = self.workers.len();
        let f = job(me + 1);
        calls.generation = calls.generation.wrapping_add(1).max(1);
        let board = self.board;
        // SAFETY: the previous job is closed with no worker inside, and none can enter until
        // the state below names this generation.
        unsafe {
            *board.job.get() = Job {
                call: call::<F>,
                data: &f as *const F as *const (),
            }
        };
        // SeqCst, as is the load of `asleep` after it, against a worker's announcing its sleep
        // and checking the state (in `work`): one of the two sees the other.
        (board.state).store((calls.generation as u64) << 32, Ordering::SeqCst);
        if board.asleep.load(Ordering::SeqCst) > 0 {
            self.workers.iter().for_each(Thread::unpark);
        }
        IN_POOL.set(true);
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(me)));
        IN_POOL.set(false);
        // Close: latecomers stay out; wait for those inside (each is finishing a piece it took).
        board.state.fetch_or(CLOSED, Ordering::AcqRel);
        self.wait_until(|| board.state.load(Ordering::Acquire) & INSIDE == 0);
        let late = Duration::from_nanos(board.late.swap(0, Ordering::Relaxed));
        calls.record(started.elapsed(), late);
        if let Err(payload) = outcome {
            std::panic::resume_unwind(payload);
        }
        if board.panicked.swap(false, Ordering::AcqRel) {
            panic!("a pool thread panicked in a job");
        }
    }

    /// Spin until `ready`, then yield the core to whichever thread we wait on; a wait past
    /// `LATE` counts against the job (see `Calls`).
    fn wait_until(&self, ready: impl Fn() -> bool) {
        let mut spin = Spin::default();
        while !ready() {
            if spin.turn() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let waited = spin.total();
        if waited > LATE {
            let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
            self.board.late.fetch_add(nanos, Ordering::Relaxed);
        }
    }
}

/// The time a thread has waited, read off the clock from its first turn and then every 64th:
/// a clock read costs as much as dozens of spins, and most waits end within a few.
#[derive(Default)]
struct Spin {
    start: Option<Instant>,
    turns: u32,
    waited: Duration,
}

impl Spin {
    /// One more turn of waiting; the time waited as last read.
    fn turn(&mut self) -> Duration {
        let start = *self.start.get_or_insert_with(Instant::now);
        self.turns = self.turns.wrapping_add(1);
        if self.turns.is_multiple_of(64) {
            self.waited = start.elapsed();
        }
        self.waited
    }

    /// The whole wait, read now (zero if it never turned).
    fn total(&self) -> Duration {
        self.start.map_or(Duration::ZERO, |s| s.elapsed())
    }
}

/// A worker: wait for a job (spin, then sleep), join it if it is still open, run it, leave.
fn work(board: &'static Board, tid: usize) {
    IN_POOL.set(true);
    let mut last = 0u64;
    loop {
        let mut state = board.state.load(Ordering::Acquire);
        let mut spin = Spin::default();
        while state >> 32 == last || state & CLOSED != 0 {
            if spin.turn() < SPIN {
                std::hint::spin_loop();
            } else {
                board.asleep.fetch_add(1, Ordering::SeqCst);
                // Checked again after announcing the sleep: a job published in between has
                // either seen `asleep` (and unparks us) or is visible here.
                let now = board.state.load(Ordering::SeqCst);
                if now >> 32 == last || now & CLOSED != 0 {
                    std::thread::park_timeout(Duration::from_millis(100));
                }
                board.asleep.fetch_sub(1, Ordering::SeqCst);
            }
            state = board.state.load(Ordering::Acquire);
        }
        last = state >> 32;
        // Enter only the generation seen, while it is open.
        let entered = loop {
            if state >> 32 != last || state & CLOSED != 0 {
                break false;
            }
            match board.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break true,
                Err(now) => state = now,
            }
        };
        if entered {
            // SAFETY: inside an open job, whose caller waits for us before its `f` goes.
            let job = unsafe { *board.job.get() };
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                (job.call)(job.data, tid)
            }));
            if ran.is_err() {
                board.panicked.store(true, Ordering::Release);
            }
            board.state.fetch_sub(1, Ordering::Release);
        }
    }
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
// `pool::for_each_mut`), and the pool waits for every thread inside a job (or past its prologue) before the buffer
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

    /// Items of one job over `threads` shares, each marked once, with `during` run in each piece.
    fn marked(pool: &Pool, during: impl Fn(usize, usize) + Sync) -> Vec<usize> {
        let seen: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        let inside = AtomicUsize::new(0);
        pool.run(|threads| {
            let shares = Shares::new(seen.len(), threads);
            let (seen, inside, during) = (&seen, &inside, &during);
            move |tid| {
                inside.fetch_add(1, Ordering::SeqCst);
                shares.drain(tid, |r| {
                    during(tid, threads);
                    r.for_each(|i| {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    })
                });
                inside.fetch_sub(1, Ordering::SeqCst);
            }
        });
        // `run` returned: nothing may still be running the job.
        assert_eq!(inside.load(Ordering::SeqCst), 0);
        seen.iter().map(|s| s.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn a_job_is_done_once_whoever_joins_and_run_waits_for_those_inside() {
        let pool = Pool::new(3);
        for round in 0..3000 {
            let seen = marked(&pool, |tid, threads| {
                // Workers that dawdle in some rounds: the others take their shares.
                if round % 5 == 0 && tid + 1 < threads {
                    std::thread::sleep(Duration::from_micros(20));
                }
            });
            assert!(seen.iter().all(|&s| s == 1), "round {round}: {seen:?}");
        }
    }

    #[test]
    fn after_a_window_of_late_workers_the_caller_runs_jobs_alone_for_a_while() {
        let pool = Pool::new(1);
        let threads = || {
            let seen = AtomicUsize::new(0);
            pool.run(|threads| {
                seen.store(threads, Ordering::Relaxed);
                |_| {}
            });
            seen.into_inner()
        };
        // A window of quick jobs together keeps the worker.
        assert!((0..WINDOW).all(|_| threads() == 2));
        assert_eq!(threads(), 2);
        // Then jobs in which the worker joins and stalls inside its piece, as a descheduled
        // thread would, until the window closes.
        let stalls = AtomicUsize::new(0);
        while threads() == 2 {
            let entered = AtomicBool::new(false);
            marked(&pool, |tid, threads| {
                if tid + 1 < threads {
                    entered.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(300));
                } else {
                    while threads > 1 && !entered.load(Ordering::SeqCst) {
                        std::hint::spin_loop();
                    }
                }
            });
            stalls.fetch_add(1, Ordering::Relaxed);
        }
        assert!(stalls.into_inner() < WINDOW as usize);
        // Alone for the first stretch (give or take the jobs the loop above ran), then together.
        let alone = (0..2 * ALONE_FIRST).take_while(|_| threads() == 1).count() as u64;
        assert!((ALONE_FIRST - 4..ALONE_FIRST).contains(&alone), "{alone}");
    }

    /// Lengths of the runs of `alone` jobs and of together ones, in order.
    fn stretches(alone: &[bool]) -> (Vec<u64>, Vec<u64>) {
        let (mut apart, mut together) = (Vec::new(), Vec::new());
        for run in alone.chunk_by(|a, b| a == b) {
            let list = if run[0] { &mut apart } else { &mut together };
            list.push(run.len() as u64);
        }
        (apart, together)
    }

    #[test]
    fn a_stretch_alone_is_kept_only_while_it_runs_faster_than_together() {
        let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
        // Jobs take 1 ms together, half of it waiting on late threads, and `alone` ms alone.
        let run = |calls: &mut Calls, jobs: u64, alone: f64| -> Vec<bool> {
            let job = |_| match calls.alone() {
                true => {
                    calls.record_alone(ms(alone));
                    true
                }
                false => {
                    calls.record(ms(1.0), ms(0.5));
                    false
                }
            };
            (0..jobs).map(job).collect()
        };
        let w = u64::from(WINDOW);
        // Alone is faster (a busy neighbour): stretches alone double, a window together between.
        let (apart, together) = stretches(&run(&mut Calls::new(), 20 * w, 0.5));
        assert_eq!(apart[..4], [w, 2 * w, 4 * w, 8 * w]);
        assert!(together.iter().all(|&n| n == w), "{together:?}");
        // Alone is slower (the waits came from uneven pieces): one stretch alone at a time, and
        // 1, 2, 4 windows together before the next try.
        let (apart, together) = stretches(&run(&mut Calls::new(), 20 * w, 2.0));
        assert!(apart.iter().all(|&n| n == w), "{apart:?}");
        assert_eq!(together[..4], [w, 2 * w, 3 * w, 5 * w]);
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
