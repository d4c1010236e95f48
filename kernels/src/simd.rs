//! The SIMD lane type, chosen when this crate is compiled, and the few memory operations that
//! `wide` does not offer (unaligned, partial and masked loads/stores, prefetch).
//!
//! `wide` picks its implementation at compile time from the target features, so `F32s` is a
//! real 512-bit register only when AVX-512 is enabled for the whole build (target-cpu=native);
//! otherwise it is `f32x8` (AVX2, or two SSE halves on the default x86_64 target).

#[cfg(target_feature = "avx512f")]
pub type F32s = wide::f32x16;
#[cfg(not(target_feature = "avx512f"))]
pub type F32s = wide::f32x8;

/// Number of f32 lanes in [`F32s`].
pub const LANES: usize = core::mem::size_of::<F32s>() / core::mem::size_of::<f32>();

/// Loads `LANES` floats from `p`, which need not be aligned.
///
/// # Safety
/// `p .. p + LANES` must be readable.
#[inline(always)]
pub unsafe fn load(p: *const f32) -> F32s {
    // SAFETY: the caller guarantees LANES readable floats; read_unaligned has no alignment
    // requirement (F32s itself is 32/64-byte aligned, so a plain dereference would be UB).
    unsafe { core::ptr::read_unaligned(p.cast::<F32s>()) }
}

/// Stores `LANES` floats to `p`, which need not be aligned.
///
/// # Safety
/// `p .. p + LANES` must be writable.
#[inline(always)]
pub unsafe fn store(p: *mut f32, v: F32s) {
    // SAFETY: the caller guarantees LANES writable floats; write_unaligned needs no alignment.
    unsafe { core::ptr::write_unaligned(p.cast::<F32s>(), v) }
}

/// Loads the first `n < LANES` floats from `p` and zeroes the other lanes; never touches
/// memory past `p + n` (a masked load where the ISA has one).
///
/// # Safety
/// `p .. p + n` must be readable.
#[inline(always)]
pub unsafe fn load_partial(p: *const f32, n: usize) -> F32s {
    debug_assert!(n <= LANES);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        use core::arch::x86_64::_mm512_maskz_loadu_ps;
        let mask = ((1u32 << n) - 1) as u16;
        // SAFETY: masked-off lanes are not accessed (no fault), the others are readable.
        F32s::from(unsafe { _mm512_maskz_loadu_ps(mask, p) })
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        not(target_feature = "avx512f")
    ))]
    {
        use core::arch::x86_64::{_mm256_maskload_ps, _mm256_set_epi32};
        let n = n as i32;
        let m = |i: i32| if i < n { -1 } else { 0 };
        let mask = _mm256_set_epi32(m(7), m(6), m(5), m(4), m(3), m(2), m(1), m(0));
        // SAFETY: lanes whose mask is 0 are not accessed, the others are readable.
        F32s::from(unsafe { _mm256_maskload_ps(p, mask) })
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        let mut buf = [0.0f32; LANES];
        // SAFETY: the caller guarantees n readable floats; buf holds LANES >= n.
        unsafe { core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n) };
        F32s::new(buf)
    }
}

/// Stores the first `n < LANES` lanes of `v` to `p`; never touches memory past `p + n`.
///
/// # Safety
/// `p .. p + n` must be writable.
#[inline(always)]
pub unsafe fn store_partial(p: *mut f32, n: usize, v: F32s) {
    debug_assert!(n <= LANES);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        use core::arch::x86_64::{__m512, _mm512_mask_storeu_ps};
        let mask = ((1u32 << n) - 1) as u16;
        // SAFETY: masked-off lanes are not written, the others are writable.
        unsafe { _mm512_mask_storeu_ps(p, mask, __m512::from(v)) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    {
        let buf = v.to_array();
        // SAFETY: the caller guarantees n writable floats.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), p, n) };
    }
}

/// Loads `LANES` floats from the front of a slice (bounds-checked).
#[inline(always)]
pub fn load_slice(s: &[f32]) -> F32s {
    assert!(s.len() >= LANES);
    // SAFETY: the assert above guarantees LANES readable floats.
    unsafe { load(s.as_ptr()) }
}

/// Stores `v` to the front of a slice (bounds-checked).
#[inline(always)]
pub fn store_slice(s: &mut [f32], v: F32s) {
    assert!(s.len() >= LANES);
    // SAFETY: the assert above guarantees LANES writable floats.
    unsafe { store(s.as_mut_ptr(), v) }
}

/// Loads up to `LANES` floats from a slice shorter than or equal to a vector, zero-filled.
#[inline(always)]
pub fn load_slice_partial(s: &[f32]) -> F32s {
    let n = s.len().min(LANES);
    // SAFETY: n <= s.len() floats are readable.
    unsafe { load_partial(s.as_ptr(), n) }
}

/// Stores the first `s.len() <= LANES` lanes of `v` into `s`.
#[inline(always)]
pub fn store_slice_partial(s: &mut [f32], v: F32s) {
    let n = s.len().min(LANES);
    // SAFETY: n <= s.len() floats are writable.
    unsafe { store_partial(s.as_mut_ptr(), n, v) }
}

/// Loads the first `min(s.len(), LANES)` floats of `s`, zero-filled past them: a plain load
/// when the slice holds a whole vector, a masked one for a tail (as from `chunks(LANES)`).
#[inline(always)]
pub fn load_upto(s: &[f32]) -> F32s {
    if s.len() >= LANES {
        load_slice(s)
    } else {
        load_slice_partial(s)
    }
}

/// Stores the first `min(s.len(), LANES)` lanes of `v` into `s` (the store of [`load_upto`]).
#[inline(always)]
pub fn store_upto(s: &mut [f32], v: F32s) {
    if s.len() >= LANES {
        store_slice(s, v)
    } else {
        store_slice_partial(s, v)
    }
}

/// Hints the CPU to fetch the cache line holding `p` into all cache levels. A prefetch never
/// faults, so any address (even one past the end of an allocation) is allowed.
#[inline(always)]
pub fn prefetch_read<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: prefetch is a hint; it performs no access that can fault, whatever `p` is.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Hints the CPU to fetch the cache line holding `p` for writing (PREFETCHW where available).
#[inline(always)]
pub fn prefetch_write<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_ET0, _mm_prefetch};
        // SAFETY: prefetch is a hint; it performs no access that can fault, whatever `p` is.
        unsafe { _mm_prefetch::<_MM_HINT_ET0>(p.cast::<i8>()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Horizontal sum of a vector's lanes in a fixed order (pairwise halves), so it is the same
/// for every call.
#[inline(always)]
pub fn reduce_sum(v: F32s) -> f32 {
    v.reduce_add()
}

/// Calls the prefetch `hint` on every cache line of the `len` floats from `p`. Any address is
/// allowed (a prefetch never faults), so rows can be requested before their id is checked
/// against anything.
#[inline(always)]
pub fn prefetch_lines(p: *const f32, len: usize, hint: impl Fn(*const f32)) {
    if len == 0 {
        return;
    }
    let end = p.wrapping_add(len) as usize;
    let mut line = p.wrapping_byte_sub(p as usize % 64);
    while (line as usize) < end {
        hint(line);
        line = line.wrapping_byte_add(64);
    }
}

/// Transposes a LANES x LANES block held in vectors, in place: afterwards lane i of `block[j]`
/// is what lane j of `block[i]` was. In-register shuffles on AVX-512 and AVX2 (the classic
/// unpack / shuffle / lane-permute network); lane by lane elsewhere.
#[inline(always)]
pub fn transpose(block: &mut [F32s; LANES]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        use core::arch::x86_64::*;
        // SAFETY: AVX-512F is enabled for the whole build (the cfg above), and these
        // intrinsics only shuffle register values.
        unsafe {
            let r: [__m512; 16] = core::array::from_fn(|i| __m512::from(block[i]));
            // Stage 1: interleave pairs of rows (32-bit elements).
            let t: [__m512; 16] = core::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i & 1 == 0 {
                    _mm512_unpacklo_ps(a, b)
                } else {
                    _mm512_unpackhi_ps(a, b)
                }
            });
            // Stage 2: combine 64-bit pairs of stage-1 rows 4k.. 4k+3.
            let u: [__m512; 16] = core::array::from_fn(|i| {
                let base = i & !3;
                let (a, b) = match i & 3 {
                    0 | 1 => (t[base], t[base + 2]),
                    _ => (t[base + 1], t[base + 3]),
                };
                if i & 1 == 0 {
                    _mm512_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm512_shuffle_ps::<0xEE>(a, b)
                }
            });
            // Stage 3: gather 128-bit blocks of row groups (0-3 with 4-7, 8-11 with 12-15).
            let v: [__m512; 16] = core::array::from_fn(|i| {
                let half = i & 8;
                let j = i & 3;
                let (a, b) = (u[half + j], u[half + 4 + j]);
                if i & 4 == 0 {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xDD>(a, b)
                }
            });
            // Stage 4: gather 128-bit blocks of the two halves.
            for (i, out) in block.iter_mut().enumerate() {
                let j = i & 7;
                let (a, b) = (v[j], v[8 + j]);
                *out = F32s::from(if i < 8 {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xDD>(a, b)
                });
            }
        }
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        not(target_feature = "avx512f")
    ))]
    {
        use core::arch::x86_64::*;
        // SAFETY: AVX2 is enabled for the whole build (the cfg above), and these intrinsics
        // only shuffle register values.
        unsafe {
            let r: [__m256; 8] = core::array::from_fn(|i| __m256::from(block[i]));
            let t: [__m256; 8] = core::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i & 1 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let u: [__m256; 8] = core::array::from_fn(|i| {
                let base = i & !3;
                let (a, b) = match i & 3 {
                    0 | 1 => (t[base], t[base + 2]),
                    _ => (t[base + 1], t[base + 3]),
                };
                if i & 1 == 0 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xEE>(a, b)
                }
            });
            for (i, out) in block.iter_mut().enumerate() {
                let j = i & 3;
                *out = F32s::from(if i < 4 {
                    _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j])
                } else {
                    _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j])
                });
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        let rows: [[f32; LANES]; LANES] = core::array::from_fn(|i| block[i].to_array());
        for (j, out) in block.iter_mut().enumerate() {
            *out = F32s::new(core::array::from_fn(|i| rows[i][j]));
        }
    }
}

/// Lane q of the result is the sum of the lanes of `v[q]`: LANES horizontal sums for the cost
/// of one transpose, each round of shuffles halving the number of vectors while adding the
/// halves it separates. The order of the additions is fixed.
#[inline(always)]
pub fn transpose_sum(v: [F32s; LANES]) -> F32s {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        use core::arch::x86_64::{__m512, _mm512_add_ps, _mm512_shuffle_f32x4, _mm512_shuffle_ps};
        // After the four rounds, lane 4k + l holds the sum of w[4l + k]: feed the inputs in
        // that (transposed) order so that lane q sums v[q].
        let w: [__m512; 16] = core::array::from_fn(|s| __m512::from(v[4 * (s % 4) + s / 4]));
        // SAFETY: these intrinsics only need AVX-512F, which this build enables (cfg above);
        // they operate on registers and touch no memory.
        unsafe {
            // Round 1, 512 -> 256: w1[m] = [halves of w[2m] added | halves of w[2m + 1] added].
            let w1: [__m512; 8] = core::array::from_fn(|m| {
                let (a, b) = (w[2 * m], w[2 * m + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x44>(a, b),
                    _mm512_shuffle_f32x4::<0xEE>(a, b),
                )
            });
            // Round 2, 256 -> 128: 128-bit block k of w2[m] holds 4 partial sums of w[4m + k].
            let w2: [__m512; 4] = core::array::from_fn(|m| {
                let (a, b) = (w1[2 * m], w1[2 * m + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x88>(a, b),
                    _mm512_shuffle_f32x4::<0xDD>(a, b),
                )
            });
            // Round 3, 4 -> 2 per block: block k of w3[m] holds 2 partials of w[8m + k],
            // then 2 of w[8m + 4 + k].
            let w3: [__m512; 2] = core::array::from_fn(|m| {
                let (a, b) = (w2[2 * m], w2[2 * m + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_ps::<0x44>(a, b),
                    _mm512_shuffle_ps::<0xEE>(a, b),
                )
            });
            // Round 4, 2 -> 1: lane l of block k sums w[4l + k].
            let (a, b) = (w3[0], w3[1]);
            F32s::from(_mm512_add_ps(
                _mm512_shuffle_ps::<0x88>(a, b),
                _mm512_shuffle_ps::<0xDD>(a, b),
            ))
        }
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx",
        not(target_feature = "avx512f")
    ))]
    {
        use core::arch::x86_64::{
            __m256, _mm256_add_ps, _mm256_permute2f128_ps, _mm256_shuffle_ps,
        };
        // After the three rounds, lane 4k + l holds the sum of w[2l + k].
        let w: [__m256; 8] = core::array::from_fn(|s| __m256::from(v[4 * (s % 2) + s / 2]));
        // SAFETY: these intrinsics only need AVX, which this build enables (cfg above); they
        // operate on registers and touch no memory.
        unsafe {
            // Round 1, 256 -> 128: w1[m] = [halves of w[2m] added | halves of w[2m + 1] added].
            let w1: [__m256; 4] = core::array::from_fn(|m| {
                let (a, b) = (w[2 * m], w[2 * m + 1]);
                _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(a, b),
                    _mm256_permute2f128_ps::<0x31>(a, b),
                )
            });
            // Round 2, 4 -> 2 per block: block k of w2[m] holds 2 partials of w[4m + k],
            // then 2 of w[4m + 2 + k].
            let w2: [__m256; 2] = core::array::from_fn(|m| {
                let (a, b) = (w1[2 * m], w1[2 * m + 1]);
                _mm256_add_ps(
                    _mm256_shuffle_ps::<0x44>(a, b),
                    _mm256_shuffle_ps::<0xEE>(a, b),
                )
            });
            // Round 3, 2 -> 1: lane l of block k sums w[2l + k].
            let (a, b) = (w2[0], w2[1]);
            F32s::from(_mm256_add_ps(
                _mm256_shuffle_ps::<0x88>(a, b),
                _mm256_shuffle_ps::<0xDD>(a, b),
            ))
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    {
        F32s::new(core::array::from_fn(|q| v[q].reduce_add()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_rows_and_columns() {
        let mut block: [F32s; LANES] =
            core::array::from_fn(|i| F32s::new(core::array::from_fn(|j| (i * LANES + j) as f32)));
        transpose(&mut block);
        for (j, v) in block.iter().enumerate() {
            for (i, x) in v.to_array().iter().enumerate() {
                assert_eq!(*x, (i * LANES + j) as f32, "lane {i} of vector {j}");
            }
        }
    }

    #[test]
    fn transpose_sum_sums_each_vector_into_its_lane() {
        let v: [F32s; LANES] = core::array::from_fn(|q| {
            F32s::new(core::array::from_fn(|l| (q * 100 + l) as f32 * 0.5))
        });
        let got = transpose_sum(v).to_array();
        for (q, g) in got.iter().enumerate() {
            let want: f32 = (0..LANES).map(|l| (q * 100 + l) as f32 * 0.5).sum();
            assert_eq!(*g, want, "lane {q}");
        }
    }
}
