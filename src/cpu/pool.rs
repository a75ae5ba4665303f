//! A data-parallel loop in which the calling thread is one of the workers.
//!
//! Why not a plain rayon `par_iter`: called from a thread outside rayon's pool (the usual
//! case: the user's own thread), every parallel call is a cold hand-off. The caller blocks on
//! a latch while a sleeping worker is woken, then is woken itself when the work is done. On
//! a 2-core machine that cost 40–110 µs per call, more than the whole batch norm of a 1 MB
//! tensor (benches/NOTES.md). Here the caller takes tasks itself from the start, and helpers
//! (jobs on rayon's pool, so rayon still owns the threads and their count) keep polling for
//! the next loop for `SPIN` after their last task: back-to-back calls see no wake-up at
//! all, and a helper that starts late simply finds no task left.
//!
//! Results never depend on which thread ran a task: callers store each task's result by
//! task index and combine them in order.
//!
//! On wasm32 there are no threads (nor rayon): [`for_each`] runs the tasks in order on the
//! calling thread.

#[cfg(not(target_arch = "wasm32"))]
use std::hint::spin_loop;
#[cfg(not(target_arch = "wasm32"))]
use std::panic::{catch_unwind, AssertUnwindSafe};
#[cfg(not(target_arch = "wasm32"))]
use std::ptr;
#[cfg(not(target_arch = "wasm32"))]
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
#[cfg(not(target_arch = "wasm32"))]
use std::time::{Duration, Instant};

#[cfg(not(target_arch = "wasm32"))]
use rayon::prelude::*;

/// The number of threads [`for_each`] may run tasks on: rayon's.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// The number of threads [`for_each`] may run tasks on: the calling one.
#[cfg(target_arch = "wasm32")]
pub(crate) fn threads() -> usize {
    1
}

/// How long a helper keeps polling for the next loop after its last task before it gives
/// its rayon thread back (OpenMP runtimes spin for a similar while by default).
#[cfg(not(target_arch = "wasm32"))]
const SPIN: Duration = Duration::from_micros(500);

/// One published loop: tasks `0..n` of `f`.
#[cfg(not(target_arch = "wasm32"))]
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    /// Next task index to hand out (may run past `n`).
    next: AtomicUsize,
    /// Tasks finished (or panicked).
    done: AtomicUsize,
    /// A task panicked; the caller panics in turn once every task is accounted for.
    panicked: AtomicBool,
}

#[cfg(not(target_arch = "wasm32"))]
impl Job<'_> {
    /// Takes and runs tasks until none is left. A panicking task is caught and recorded
    /// (a panic escaping a rayon job would abort the process), and counts as finished.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.f)(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, SeqCst);
        }
    }
}

/// The one loop slot. All orderings are SeqCst: the protocol is a Dekker-style handshake
/// (a helper announces itself in `active`, then reads `job`; the caller clears `job`, then
/// waits for `active` to drain), which needs a single total order.
#[cfg(not(target_arch = "wasm32"))]
struct Shared {
    /// The published job, or null. Its lifetime is erased: see `for_each`.
    job: AtomicPtr<Job<'static>>,
    /// Bumped after each publication; helpers poll it (read-only, cheap on the cache).
    epoch: AtomicU64,
    /// Helpers between announcing themselves and leaving the current job.
    active: AtomicUsize,
    /// Helpers alive (running or polling).
    live: AtomicUsize,
    /// Held by the caller using the slot; a second concurrent caller falls back to rayon.
    busy: AtomicBool,
}

#[cfg(not(target_arch = "wasm32"))]
static SHARED: Shared = Shared {
    job: AtomicPtr::new(ptr::null_mut()),
    epoch: AtomicU64::new(0),
    active: AtomicUsize::new(0),
    live: AtomicUsize::new(0),
    busy: AtomicBool::new(false),
};

/// Runs `f(0) … f(n − 1)`, in parallel where threads are free, and returns when all have.
///
/// Public so that benchmarks can time other work (the memcpy ceiling) with the same
/// threading as the CPU path. On wasm32: in order, on the calling thread.
#[cfg(target_arch = "wasm32")]
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    (0..n).for_each(f);
}

/// Runs `f(0) … f(n − 1)`, in parallel where threads are free, and returns when all have.
///
/// Public so that benchmarks can time other work (the memcpy ceiling) with the same
/// threading as the CPU path. On wasm32: in order, on the calling thread.
#[cfg(not(target_arch = "wasm32"))]
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let threads = threads();
    if n <= 1 || threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    let s = &SHARED;
    if s.busy
        .compare_exchange(false, true, SeqCst, SeqCst)
        .is_err()
    {
        // Another thread is running a loop here (or this is a nested call): plain rayon,
        // with the pool's contract (every task runs, then a panic reaches the caller),
        // which rayon's own for_each does not keep (it may skip tasks after a panic).
        let panicked = AtomicBool::new(false);
        (0..n).into_par_iter().for_each(|i| {
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                panicked.store(true, SeqCst);
            }
        });
        assert!(
            !panicked.load(SeqCst),
            "a task of a CPU batch-norm loop panicked"
        );
        return;
    }
    let job = Job {
        f: &f,
        n,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    };
    // Unpublishes and waits for the helpers even if `f` panics on this thread, so that no
    // helper can touch `job` after this frame is gone.
    struct Unpublish;
    impl Drop for Unpublish {
        fn drop(&mut self) {
            let s = &SHARED;
            s.job.store(ptr::null_mut(), SeqCst);
            wait_until(|| s.active.load(SeqCst) == 0);
            s.busy.store(false, SeqCst);
        }
    }
    let _unpublish = Unpublish;
    // SAFETY (lifetime erasure): helpers only dereference the pointer between incrementing
    // `active` and decrementing it, after reading it non-null; `Unpublish` nulls it and
    // then waits for `active` to reach zero before `job` (and `f`) go out of scope.
    s.job
        .store(&job as *const Job<'_> as *mut Job<'static>, SeqCst);
    s.epoch.fetch_add(1, SeqCst);
    let want = (threads - 1).min(n - 1);
    while s.live.load(SeqCst) < want {
        s.live.fetch_add(1, SeqCst);
        rayon::spawn(helper);
    }
    job.work();
    wait_until(|| job.done.load(SeqCst) == n);
    assert!(
        !job.panicked.load(SeqCst),
        "a task of a CPU batch-norm loop panicked"
    );
}

/// Spins, then yields, until `ready()`.
#[cfg(not(target_arch = "wasm32"))]
fn wait_until(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        if spins < 1 << 12 {
            spins += 1;
            spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// A helper: joins each newly published job, and leaves after `SPIN` without one.
#[cfg(not(target_arch = "wasm32"))]
fn helper() {
    let s = &SHARED;
    let mut seen = s.epoch.load(SeqCst).wrapping_sub(1);
    let mut idle_since = Instant::now();
    let mut polls = 0u32;
    loop {
        let epoch = s.epoch.load(SeqCst);
        if epoch != seen {
            seen = epoch;
            s.active.fetch_add(1, SeqCst);
            let p = s.job.load(SeqCst);
            if !p.is_null() {
                // SAFETY: see `for_each`; `active` is held, and `p` was read after it was.
                unsafe { &*p }.work();
            }
            s.active.fetch_sub(1, SeqCst);
            idle_since = Instant::now();
            continue;
        }
        if idle_since.elapsed() > SPIN {
            s.live.fetch_sub(1, SeqCst);
            // A loop published while this helper was leaving still runs: its caller does
            // every task that no helper takes.
            return;
        }
        for _ in 0..64 {
            spin_loop();
        }
        // Now and then let another thread have this core: with more threads than cores a
        // pure spin would hold up the very caller it waits for.
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(16) {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Both paths of `for_each`: the pool's own loop, and plain rayon while another thread
    /// holds the loop slot (the other tests of this binary run beside this one and may).
    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_still_works() {
        let ran = AtomicU32::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            for_each(64, |i| {
                ran.fetch_add(1, SeqCst);
                assert!(i != 17, "task 17 fails");
            })
        }));
        assert!(result.is_err(), "the panic must reach the caller");
        assert_eq!(ran.load(SeqCst), 64, "the other tasks still ran");
        let hits: Vec<AtomicU32> = (0..64).map(|_| AtomicU32::new(0)).collect();
        for_each(64, |i| {
            hits[i].fetch_add(1, SeqCst);
        });
        assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
    }

    /// A loop inside a loop's task finds the slot taken and runs on plain rayon: the same
    /// contract holds there.
    #[test]
    fn a_panicking_task_of_a_nested_loop_still_lets_every_task_run() {
        let ran = AtomicU32::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            for_each(2, |outer| {
                if outer == 0 {
                    for_each(64, |i| {
                        ran.fetch_add(1, SeqCst);
                        assert!(i != 17, "task 17 fails");
                    });
                }
            })
        }));
        assert!(result.is_err(), "the panic must reach the caller");
        assert_eq!(ran.load(SeqCst), 64, "the other tasks still ran");
    }

    #[test]
    fn every_task_runs_once_back_to_back_and_from_many_threads() {
        std::thread::scope(|scope| {
            for t in 0..4 {
                scope.spawn(move || {
                    for round in 0..300 {
                        let n = 1 + (round * 7 + t) % 40;
                        let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                        for_each(n, |i| {
                            hits[i].fetch_add(1, SeqCst);
                        });
                        assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
                    }
                });
            }
        });
    }
}
