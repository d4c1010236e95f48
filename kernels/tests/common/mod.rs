//! Helpers shared by the kernel property tests.
#![allow(dead_code)]

use dlrm_kernels::parallel;
use std::sync::Mutex;

/// Serialises the tests of one binary that force the parallel paths, so that one test
/// switching the flag off cannot make another run its serial path unknowingly.
static FORCE_LOCK: Mutex<()> = Mutex::new(());

/// Deterministic pseudo-random values in [-1, 1].
pub fn fill(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The bit patterns of a slice, for exact comparisons (NaN included).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `f` on a pool of 1, 2 and 3 threads with the parallel paths forced, and returns the
/// three results.
pub fn on_1_2_3_threads<R: Send>(f: impl Fn() -> R + Sync) -> [R; 3] {
    let pool = |t| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    };
    let _guard = FORCE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    parallel::set_force_parallel(true);
    let r = [
        pool(1).install(&f),
        pool(2).install(&f),
        pool(3).install(&f),
    ];
    parallel::set_force_parallel(false);
    r
}
