//! Machine limits measured by the benchmarks, for stating kernel figures as a fraction of them:
//! the peak FMA rate, streaming bandwidth (STREAM's copy and triad; J. D. McCalpin, "Memory
//! Bandwidth and Machine Balance in Current High Performance Computers", IEEE TCCA Newsletter,
//! 1995) and the rate of random 64-byte-line reads, the access pattern of embedding lookups.
//!
//! The loops use the same loads, stores and prefetches as the kernels (plain, not
//! non-temporal, stores; prefetch [`PREFETCH_DISTANCE`] ids ahead), so each limit is what the
//! kernels could reach with their own instructions.

use crate::embedding::PREFETCH_DISTANCE;
use crate::isa::Isa;
use crate::parallel::{Par, should_split};
use crate::simd::{SimdVec, dispatch, prefetch_read};
use rayon::prelude::*;

/// Independent FMA chains: at least FMA latency (4 cycles) x FMA ports (2), with slack.
pub const FMA_PEAK_CHAINS: usize = 16;

/// Floats in one 64-byte cache line, the unit [`gather_lines`] reads.
pub const LINE_FLOATS: usize = 16;

/// Elements per parallel task of the streaming loops (256 KiB of each array): large enough to
/// amortise a task, small enough to balance. Elementwise loops give the same bits for any split.
const STREAM_CHUNK: usize = 1 << 16;

/// Lines per parallel task of [`gather_lines`].
const GATHER_CHUNK: usize = 1 << 14;

/// Smallest loop (in floats touched) that is split across threads.
const MIN_PARALLEL_FLOATS: usize = 1 << 16;

/// Floating-point operations done by one [`fma_peak`] call of `iters` steps.
pub fn fma_peak_flops(iters: usize) -> usize {
    fma_peak_flops_with_isa(Isa::selected(), iters)
}

/// Floating-point operations done by one [`fma_peak_with_isa`] call of `iters` steps.
pub fn fma_peak_flops_with_isa(isa: Isa, iters: usize) -> usize {
    iters * FMA_PEAK_CHAINS * isa.simd_level().lanes() * 2
}

/// Runs `iters` steps of [`FMA_PEAK_CHAINS`] independent vector FMA chains held in registers
/// (no memory traffic): the machine's peak FMA rate per thread, on [`Isa::selected`]. `x` and
/// `y` should be opaque to the optimiser (pass them through `black_box`); the result depends
/// on every chain.
pub fn fma_peak(iters: usize, x: f32, y: f32) -> f32 {
    fma_peak_with_isa(Isa::selected(), iters, x, y)
}

/// [`fma_peak`] on `isa` (panics if the CPU lacks it).
pub fn fma_peak_with_isa(isa: Isa, iters: usize, x: f32, y: f32) -> f32 {
    dispatch!(isa, V => fma_chains::<V>(iters, x, y))
}

#[inline(always)]
fn fma_chains<V: SimdVec>(iters: usize, x: f32, y: f32) -> f32 {
    let (xv, yv) = (V::splat(x), V::splat(y));
    let mut acc: [V; FMA_PEAK_CHAINS] = core::array::from_fn(|i| V::splat(i as f32 * 1e-3));
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(xv, yv);
        }
    }
    acc.iter().fold(V::splat(0.0), |s, a| s + *a).reduce_add()
}

/// Calls `f(k, w)` for the vectors covering 0..len: from k, w = min(LANES, len - k) elements.
#[inline(always)]
fn for_each_vector<V: SimdVec>(len: usize, mut f: impl FnMut(usize, usize)) {
    let mut k = 0;
    while k < len {
        let w = V::LANES.min(len - k);
        f(k, w);
        k += w;
    }
}

/// `dst = src`, STREAM's copy: a vector load and a vector store per LANES elements. Threads
/// split the arrays. Moves 2 x 4 bytes per element as STREAM counts them (the read that a
/// plain store's write-allocate adds is not counted). Runs on [`Isa::selected`].
pub fn stream_copy(src: &[f32], dst: &mut [f32], par: Par) {
    dispatch!(Isa::selected(), V => stream_copy_lanes::<V>(src, dst, par))
}

fn stream_copy_lanes<V: SimdVec>(src: &[f32], dst: &mut [f32], par: Par) {
    assert_eq!(
        src.len(),
        dst.len(),
        "stream_copy: {} source and {} destination floats",
        src.len(),
        dst.len()
    );
    let copy = |s: &[f32], d: &mut [f32]| {
        V::vectorize(
            #[inline(always)]
            || {
                for_each_vector::<V>(s.len(), |k, w| {
                    V::from_slice(&s[k..k + w]).store_to(&mut d[k..k + w]);
                })
            },
        );
    };
    if should_split(par, src.len(), MIN_PARALLEL_FLOATS) {
        dst.par_chunks_mut(STREAM_CHUNK)
            .zip(src.par_chunks(STREAM_CHUNK))
            .for_each(|(d, s)| copy(s, d));
    } else {
        copy(src, dst);
    }
}

/// `a = b + s * c`, STREAM's triad, as one FMA per element. Threads split the arrays. Moves
/// 3 x 4 bytes per element as STREAM counts them. Runs on [`Isa::selected`].
pub fn stream_triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32, par: Par) {
    dispatch!(Isa::selected(), V => stream_triad_lanes::<V>(a, b, c, s, par))
}

fn stream_triad_lanes<V: SimdVec>(a: &mut [f32], b: &[f32], c: &[f32], s: f32, par: Par) {
    assert!(
        b.len() == a.len() && c.len() == a.len(),
        "stream_triad: arrays of {}, {} and {} floats",
        a.len(),
        b.len(),
        c.len()
    );
    let sv = V::splat(s);
    let triad = |a: &mut [f32], b: &[f32], c: &[f32]| {
        V::vectorize(
            #[inline(always)]
            || {
                for_each_vector::<V>(a.len(), |k, w| {
                    let v = V::from_slice(&c[k..k + w]).mul_add(sv, V::from_slice(&b[k..k + w]));
                    v.store_to(&mut a[k..k + w]);
                })
            },
        );
    };
    if should_split(par, a.len(), MIN_PARALLEL_FLOATS) {
        a.par_chunks_mut(STREAM_CHUNK)
            .zip(b.par_chunks(STREAM_CHUNK))
            .zip(c.par_chunks(STREAM_CHUNK))
            .for_each(|((a, b), c)| triad(a, b, c));
    } else {
        triad(a, b, c);
    }
}

/// Reads the [`LINE_FLOATS`]-float lines `lines` of `buf` (line l is
/// `buf[l * LINE_FLOATS ..][..LINE_FLOATS]`, one cache line when `buf` starts on a 64-byte
/// boundary), in order, each requested [`PREFETCH_DISTANCE`] lines ahead as the embedding
/// kernels request their rows, and returns the XOR of all their bits: the reads cannot be
/// optimised away, and XOR, being associative and commutative, gives the same result for any
/// thread count. Threads split `lines`. Panics if a line is past the end of `buf`. Runs on
/// [`Isa::selected`].
pub fn gather_lines(buf: &[f32], lines: &[u32], par: Par) -> u32 {
    dispatch!(Isa::selected(), V => gather_lines_lanes::<V>(buf, lines, par))
}

fn gather_lines_lanes<V: SimdVec>(buf: &[f32], lines: &[u32], par: Par) -> u32 {
    let count = buf.len() / LINE_FLOATS;
    if let Some(&m) = lines.iter().max() {
        assert!(
            (m as usize) < count,
            "gather_lines: line {m} past the {count} whole lines of the buffer"
        );
    }
    let xor = |ls: &[u32]| {
        V::vectorize(
            #[inline(always)]
            || {
                let mut acc = V::splat(0.0);
                for (i, &l) in ls.iter().enumerate() {
                    if let Some(&ahead) = ls.get(i + PREFETCH_DISTANCE) {
                        prefetch_read(buf.as_ptr().wrapping_add(ahead as usize * LINE_FLOATS));
                    }
                    let line = &buf[l as usize * LINE_FLOATS..][..LINE_FLOATS];
                    for k in (0..LINE_FLOATS).step_by(V::LANES) {
                        // SAFETY: k + LANES <= LINE_FLOATS floats of the line are readable (LANES
                        // divides LINE_FLOATS).
                        acc ^= unsafe { V::load(line.as_ptr().add(k)) };
                    }
                }
                acc.to_lanes()[..V::LANES]
                    .iter()
                    .fold(0, |x, v| x ^ v.to_bits())
            },
        )
    };
    if should_split(par, lines.len() * LINE_FLOATS, MIN_PARALLEL_FLOATS) {
        lines
            .par_chunks(GATHER_CHUNK)
            .map(xor)
            .reduce(|| 0, |a, b| a ^ b)
    } else {
        xor(lines)
    }
}
