//! Scalar twins of the roofline loops.

use crate::roofline::{FMA_PEAK_CHAINS, LINE_FLOATS};

/// The sum over the `lanes` copies of each of the FMA_PEAK_CHAINS chains a <- a x + y, chain i
/// starting at i / 1000, after `iters` steps, in f64.
pub fn fma_peak(iters: usize, x: f32, y: f32, lanes: usize) -> f64 {
    (0..FMA_PEAK_CHAINS)
        .map(|i| {
            let mut a = f64::from(i as f32 * 1e-3);
            for _ in 0..iters {
                a = a * f64::from(x) + f64::from(y);
            }
            a * lanes as f64
        })
        .sum()
}

/// dst[i] = src[i].
pub fn stream_copy(src: &[f32], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}

/// a[i] = b[i] + s * c[i], in f64 then rounded once (as an FMA rounds).
pub fn stream_triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
        *a = (f64::from(*b) + f64::from(s) * f64::from(*c)) as f32;
    }
}

/// XOR of the bit patterns of every float of the lines `lines` of `buf`.
pub fn gather_lines(buf: &[f32], lines: &[u32]) -> u32 {
    let mut x = 0;
    for &l in lines {
        for v in &buf[l as usize * LINE_FLOATS..(l as usize + 1) * LINE_FLOATS] {
            x ^= v.to_bits();
        }
    }
    x
}
