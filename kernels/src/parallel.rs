//! When kernels go parallel.
//!
//! Kernels split work over the current rayon pool when it has more than one thread and the
//! work is large enough to pay for a fork-join. The thresholds are constants (a crossover timed
//! at run time would change which path runs from run to run). Because every kernel gives the
//! same bits on its serial and parallel paths, tests can force the parallel path on tiny inputs
//! with [`set_force_parallel`] to check exactly that.

use std::sync::atomic::{AtomicBool, Ordering};

static FORCE_PARALLEL: AtomicBool = AtomicBool::new(false);

/// Forces every kernel onto its parallel path, whatever the size of the work (for tests of
/// thread-count invariance). Affects the whole process.
pub fn set_force_parallel(force: bool) {
    FORCE_PARALLEL.store(force, Ordering::Relaxed);
}

/// Whether the parallel path is currently forced.
pub fn force_parallel() -> bool {
    FORCE_PARALLEL.load(Ordering::Relaxed)
}

/// Whether a kernel with `work` units (its own measure: FLOPs, bytes, rows) should split it
/// over the current pool, given the smallest work that pays for a fork-join.
#[inline]
pub fn should_split(work: usize, min_work: usize) -> bool {
    force_parallel() || (rayon::current_num_threads() > 1 && work >= min_work)
}
