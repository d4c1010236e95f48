//! Machine limits measured by the benchmarks, for stating kernel figures as a fraction of them:
//! the peak FMA rate, streaming bandwidth (STREAM's copy and triad; J. D. McCalpin, "Memory
//! Bandwidth and Machine Balance in Current High Performance Computers", IEEE TCCA Newsletter,
//! 1995) and the rate of random 64-byte-line reads, the access pattern of embedding lookups.
//!
//! The loops use the same loads, stores and prefetches as the kernels (plain, not
//! non-temporal, stores; prefetch [`PREFETCH_DISTANCE`] ids ahead), so each limit is what the
//! kernels could reach with their own instructions.

use crate::embedding::PREFETCH_DISTANCE;
use crate::parallel::{Par, should_split};
use crate::simd::{F32s, LANES, load, load_partial, prefetch_read, store, store_partial};
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

/// Loads the `w <= LANES` floats at `p` (zero-filled past them).
///
/// # Safety
/// `p .. p + w` must be readable.
#[inline(always)]
unsafe fn load_n(p: *const f32, w: usize) -> F32s {
    // SAFETY: the caller guarantees w readable floats, a full vector when w == LANES.
    unsafe {
        if w == LANES {
            load(p)
        } else {
            load_partial(p, w)
        }
    }
}

/// Stores the first `w <= LANES` lanes of `v` at `p`.
///
/// # Safety
/// `p .. p + w` must be writable.
#[inline(always)]
unsafe fn store_n(p: *mut f32, w: usize, v: F32s) {
    // SAFETY: the caller guarantees w writable floats, a full vector when w == LANES.
    unsafe {
        if w == LANES {
            store(p, v)
        } else {
            store_partial(p, w, v)
        }
    }
}

/// Calls `f(k, w)` for the vectors covering 0..len: from k, w = min(LANES, len - k) elements.
#[inline(always)]
fn for_each_vector(len: usize, mut f: impl FnMut(usize, usize)) {
    let mut k = 0;
    while k < len {
        let w = LANES.min(len - k);
        f(k, w);
        k += w;
    }
}

/// `dst = src`, STREAM's copy: a vector load and a vector store per LANES elements. Threads
/// split the arrays. Moves 2 x 4 bytes per element as STREAM counts them (the read that a
/// plain store's write-allocate adds is not counted).
pub fn stream_copy(src: &[f32], dst: &mut [f32], par: Par) {
    assert_eq!(
        src.len(),
        dst.len(),
        "stream_copy: {} source and {} destination floats",
        src.len(),
        dst.len()
    );
    let copy = |s: &[f32], d: &mut [f32]| {
        for_each_vector(s.len(), |k, w| {
            // SAFETY: k + w <= len floats are readable in s and writable in d.
            unsafe { store_n(d.as_mut_ptr().add(k), w, load_n(s.as_ptr().add(k), w)) }
        });
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
/// 3 x 4 bytes per element as STREAM counts them.
pub fn stream_triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32, par: Par) {
    assert!(
        b.len() == a.len() && c.len() == a.len(),
        "stream_triad: arrays of {}, {} and {} floats",
        a.len(),
        b.len(),
        c.len()
    );
    let sv = F32s::splat(s);
    let triad = |a: &mut [f32], b: &[f32], c: &[f32]| {
        for_each_vector(a.len(), |k, w| {
            // SAFETY: k + w <= len floats are readable in b and c and writable in a.
            unsafe {
                let v = load_n(c.as_ptr().add(k), w).mul_add(sv, load_n(b.as_ptr().add(k), w));
                store_n(a.as_mut_ptr().add(k), w, v);
            }
        });
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
/// thread count. Threads split `lines`. Panics if a line is past the end of `buf`.
pub fn gather_lines(buf: &[f32], lines: &[u32], par: Par) -> u32 {
    let count = buf.len() / LINE_FLOATS;
    if let Some(&m) = lines.iter().max() {
        assert!(
            (m as usize) < count,
            "gather_lines: line {m} past the {count} whole lines of the buffer"
        );
    }
    let xor = |ls: &[u32]| {
        let mut acc = F32s::splat(0.0);
        for (i, &l) in ls.iter().enumerate() {
            if let Some(&ahead) = ls.get(i + PREFETCH_DISTANCE) {
                prefetch_read(buf.as_ptr().wrapping_add(ahead as usize * LINE_FLOATS));
            }
            let line = &buf[l as usize * LINE_FLOATS..][..LINE_FLOATS];
            for k in (0..LINE_FLOATS).step_by(LANES) {
                // SAFETY: k + LANES <= LINE_FLOATS floats of the line are readable (LANES
                // divides LINE_FLOATS).
                acc ^= unsafe { load(line.as_ptr().add(k)) };
            }
        }
        acc.to_array().iter().fold(0, |x, v| x ^ v.to_bits())
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
