//! When kernels go parallel.
//!
//! Every kernel that may split its work takes a [`Par`] argument (the idiom of faer's `Par`
//! and gemm's `Parallelism`): the caller says how it may run, nothing process-wide decides it.
//! Under [`Par::Rayon`] a kernel splits work over the current rayon pool when the pool has more
//! than one thread and the work is large enough to pay for a fork-join. The thresholds are
//! constants (a crossover timed at run time would change which path runs from run to run).
//! Because every kernel gives the same bits on its serial and parallel paths,
//! [`Par::AlwaysSplit`] takes the parallel path on inputs of any size, to check exactly that.

use std::ops::Range;

/// How a kernel may use threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Par {
    /// On the calling thread only.
    Seq,
    /// Split over the current rayon pool when it has several threads and the work pays for it.
    #[default]
    Rayon,
    /// Take the parallel path whatever the size of the work and the pool (tasks still run on
    /// the current pool, however small): for tests of thread-count invariance.
    AlwaysSplit,
}

/// Whether a kernel with `work` units (its own measure: FLOPs, bytes, rows) should split it
/// over the current pool under `par`, given the smallest work that pays for a fork-join.
#[inline]
pub fn should_split(par: Par, work: usize, min_work: usize) -> bool {
    match par {
        Par::Seq => false,
        Par::Rayon => rayon::current_num_threads() > 1 && work >= min_work,
        Par::AlwaysSplit => true,
    }
}

/// Runs `leaf(range, part)` over consecutive sub-ranges of `range`, each at most `grain`
/// items long, halving recursively under `rayon::join`. `split(part, lo, mid)` cuts `part`,
/// which belongs to the items from `lo` on, where item `mid` starts. Every leaf owns its part,
/// so no two tasks write the same memory, and which leaf computes an item never changes what
/// it computes.
pub(crate) fn join_ranges<P: Send>(
    range: Range<usize>,
    grain: usize,
    part: P,
    split: &(impl Fn(P, usize, usize) -> (P, P) + Sync),
    leaf: &(impl Fn(Range<usize>, P) + Sync),
) {
    if range.len() <= grain.max(1) {
        leaf(range, part);
        return;
    }
    let mid = range.start + range.len() / 2;
    let (a, b) = split(part, range.start, mid);
    rayon::join(
        || join_ranges(range.start..mid, grain, a, split, leaf),
        || join_ranges(mid..range.end, grain, b, split, leaf),
    );
}

/// Splits rows `stride` floats apart into the first `rows` rows and the rest (the split of a
/// [`join_ranges`] part that holds one row per item); a slice shorter than `rows` rows is all
/// first part.
pub(crate) fn split_rows(s: &mut [f32], stride: usize, rows: usize) -> (&mut [f32], &mut [f32]) {
    let at = (rows * stride).min(s.len());
    s.split_at_mut(at)
}

/// Items per parallel task: about four tasks per thread for load balance when `parallel`,
/// else everything in one task.
pub(crate) fn task_grain(items: usize, parallel: bool) -> usize {
    if parallel {
        items.div_ceil(4 * rayon::current_num_threads()).max(1)
    } else {
        usize::MAX
    }
}
