//! Machine limits measured by the benchmarks, for stating kernel figures as a fraction of them.

use crate::simd::{F32s, LANES};

/// Independent FMA chains: at least FMA latency (4 cycles) x FMA ports (2), with slack.
pub const FMA_PEAK_CHAINS: usize = 16;

/// Floating-point operations done by one [`fma_peak`] call of `iters` steps.
pub const fn fma_peak_flops(iters: usize) -> usize {
    iters * FMA_PEAK_CHAINS * LANES * 2
}

/// Runs `iters` steps of [`FMA_PEAK_CHAINS`] independent vector FMA chains held in registers
/// (no memory traffic): the machine's peak FMA rate per thread. `x` and `y` should be opaque
/// to the optimiser (pass them through `black_box`); the result depends on every chain.
pub fn fma_peak(iters: usize, x: f32, y: f32) -> f32 {
    let (xv, yv) = (F32s::splat(x), F32s::splat(y));
    let mut acc: [F32s; FMA_PEAK_CHAINS] = core::array::from_fn(|i| F32s::splat(i as f32 * 1e-3));
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(xv, yv);
        }
    }
    acc.iter()
        .fold(F32s::splat(0.0), |s, a| s + *a)
        .reduce_add()
}
