//! The SIMD vector types of the instruction-set levels ([`crate::isa`]) behind one trait, the
//! run-time dispatch to a body compiled for a level, and the prefetch hints.
//!
//! Every kernel body is written once, generic over `V: SimdVec`, `#[inline(always)]` down to
//! the intrinsics. [`dispatch!`] instantiates it for the level the caller's [`Isa`] names,
//! inside a `#[target_feature]` function ([`in_avx512`], [`in_avx2`]), so that LLVM compiles
//! the inlined body with that level's instructions although the crate is built for the
//! baseline x86-64 target (the design of matrixmultiply's `kernel.rs` and gemm-common's
//! `gemm.rs`). A kernel dispatches once per call or per parallel task, never per element:
//! rayon runs a task through its own (not inlined) functions, so the wrapper must sit inside
//! the task, around serial work.
//!
//! | level    | type          | lanes | multiply-add        | partial loads/stores |
//! |----------|---------------|-------|---------------------|----------------------|
//! | AVX-512  | [`F32x16`]    | 16    | VFMADD (fused)      | masked (k registers) |
//! | AVX2     | [`F32x8`]     | 8     | VFMADD (fused)      | VMASKMOVPS           |
//! | portable | `wide::f32x4` | 4     | MULPS then ADDPS    | through a buffer     |
//!
//! Soundness: the methods of [`F32x16`] and [`F32x8`] are safe functions around intrinsics
//! that need the level's features. Both types are private to this crate and named only by
//! [`dispatch!`], which asserts that the CPU supports the level before it runs a body: no
//! value of either type exists on a CPU without those features.

use core::ops::{Add, AddAssign, BitAnd, BitXor, BitXorAssign, Div, Mul, Neg, Sub};

/// Lanes of the widest vector (AVX-512): a `[f32; MAX_LANES]` holds a vector of any level.
pub const MAX_LANES: usize = 16;

/// An f32 vector of one instruction-set level: the operations the kernels use.
pub(crate) trait SimdVec:
    Copy
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + BitAnd<Output = Self>
    + BitXor<Output = Self>
    + BitXorAssign
{
    /// f32 lanes per vector.
    const LANES: usize;
    /// Rows of the wide GEMM microkernel's register tile (of 2 vectors per row).
    const GEMM_MR: usize;
    /// Rows of the narrow (one vector wide) GEMM microkernel.
    const GEMM_NARROW_MR: usize;

    /// Runs `f` inside a function compiled with this level's target features ([`in_avx512`],
    /// [`in_avx2`]), where `f` and the `#[inline(always)]` code it calls are inlined. Kernel
    /// code that a parallel task runs calls its vector loops through this.
    fn vectorize<R>(f: impl FnOnce() -> R) -> R;

    /// Every lane `x`.
    fn splat(x: f32) -> Self;

    /// Loads `LANES` floats from `p`, which need not be aligned.
    ///
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load(p: *const f32) -> Self;

    /// Stores `LANES` floats to `p`, which need not be aligned.
    ///
    /// # Safety
    /// `p .. p + LANES` must be writable.
    unsafe fn store(p: *mut f32, v: Self);

    /// Loads the first `n <= LANES` floats from `p` and zeroes the other lanes; never touches
    /// memory past `p + n`.
    ///
    /// # Safety
    /// `p .. p + n` must be readable.
    unsafe fn load_partial(p: *const f32, n: usize) -> Self;

    /// Stores the first `n <= LANES` lanes of `v` to `p`; never touches memory past `p + n`.
    ///
    /// # Safety
    /// `p .. p + n` must be writable.
    unsafe fn store_partial(p: *mut f32, n: usize, v: Self);

    /// `self * b + c`: one rounding where the level has FMA, two on the portable level.
    fn mul_add(self, b: Self, c: Self) -> Self;

    /// `self * b - c`.
    #[inline(always)]
    fn mul_sub(self, b: Self, c: Self) -> Self {
        self.mul_add(b, -c)
    }

    /// `c - self * b`.
    #[inline(always)]
    fn mul_neg_add(self, b: Self, c: Self) -> Self {
        (-self).mul_add(b, c)
    }

    /// Lane-wise maximum; the second operand where either is NaN (as MAXPS).
    fn max(self, o: Self) -> Self;
    fn sqrt(self) -> Self;

    /// |self|: the sign bit cleared.
    #[inline(always)]
    fn abs(self) -> Self {
        self ^ (self & Self::splat(-0.0))
    }

    /// All-ones lanes where `self > o` (ordered: false for NaN), zero lanes elsewhere.
    fn simd_gt(self, o: Self) -> Self;
    /// All-ones lanes where `self >= o` (ordered), zero lanes elsewhere.
    fn simd_ge(self, o: Self) -> Self;
    /// With `self` a comparison's mask: `t` where the mask is set, `f` elsewhere.
    fn select(self, t: Self, f: Self) -> Self;

    /// Sum of the lanes, in a fixed order (the same bits for the same vector).
    fn reduce_add(self) -> f32;

    /// The lanes, in the first `LANES` elements.
    #[inline(always)]
    fn to_lanes(self) -> [f32; MAX_LANES] {
        let mut out = [0.0; MAX_LANES];
        // SAFETY: out holds MAX_LANES >= LANES writable floats.
        unsafe { Self::store(out.as_mut_ptr(), self) };
        out
    }

    /// A vector from the first `min(s.len(), LANES)` floats of `s`, zero-filled.
    #[inline(always)]
    fn from_slice(s: &[f32]) -> Self {
        let n = s.len().min(Self::LANES);
        // SAFETY: n <= s.len() floats are readable.
        unsafe {
            if n == Self::LANES {
                Self::load(s.as_ptr())
            } else {
                Self::load_partial(s.as_ptr(), n)
            }
        }
    }

    /// Stores the first `min(s.len(), LANES)` lanes into `s`.
    #[inline(always)]
    fn store_to(self, s: &mut [f32]) {
        let n = s.len().min(Self::LANES);
        // SAFETY: n <= s.len() floats are writable.
        unsafe {
            if n == Self::LANES {
                Self::store(s.as_mut_ptr(), self)
            } else {
                Self::store_partial(s.as_mut_ptr(), n, self)
            }
        }
    }

    /// e^x per lane, by `wide`'s f32x4 polynomial four lanes at a time: the same bits on
    /// every level (only the activations use it, on one value per sample).
    #[inline(always)]
    fn exp(self) -> Self {
        map_by_4(self, wide::f32x4::exp)
    }

    /// ln(1 + x) per lane, as [`SimdVec::exp`] by `wide`'s f32x4.
    #[inline(always)]
    fn ln_1p(self) -> Self {
        map_by_4(self, wide::f32x4::ln_1p)
    }

    /// Transposes a LANES x LANES block held in `block` (LANES vectors), in place: afterwards
    /// lane i of `block[j]` is what lane j of `block[i]` was. Lane by lane unless the level
    /// has an in-register network.
    #[inline(always)]
    fn transpose(block: &mut [Self]) {
        assert_eq!(block.len(), Self::LANES);
        let rows: [[f32; MAX_LANES]; MAX_LANES] =
            core::array::from_fn(|i| block.get(i).map_or([0.0; MAX_LANES], |v| v.to_lanes()));
        for (j, out) in block.iter_mut().enumerate() {
            let col: [f32; MAX_LANES] = core::array::from_fn(|i| rows[i][j]);
            *out = Self::from_slice(&col);
        }
    }

    /// Lane q of the result is the sum of the lanes of `v[q]` (LANES vectors), each in a fixed
    /// order.
    #[inline(always)]
    fn transpose_sum(v: &[Self]) -> Self {
        assert_eq!(v.len(), Self::LANES);
        let sums: [f32; MAX_LANES] =
            core::array::from_fn(|q| v.get(q).map_or(0.0, |x| x.reduce_add()));
        Self::from_slice(&sums)
    }
}

/// Applies a 4-lane function to each quarter (or half, or whole) of `v`.
#[inline(always)]
fn map_by_4<V: SimdVec>(v: V, f: impl Fn(wide::f32x4) -> wide::f32x4) -> V {
    let mut lanes = v.to_lanes();
    for quad in lanes[..V::LANES].chunks_exact_mut(4) {
        let x = wide::f32x4::new([quad[0], quad[1], quad[2], quad[3]]);
        quad.copy_from_slice(&f(x).to_array());
    }
    V::from_slice(&lanes)
}

/// Runs `$body` with the type name `$V` bound to the vector type of the level `$isa` names,
/// inside a function compiled with that level's target features (see the module doc).
/// Panics if the CPU does not support `$isa`: this assertion is what makes the safe methods of
/// [`F32x16`] and [`F32x8`] sound.
macro_rules! dispatch {
    ($isa:expr, $V:ident => $body:expr) => {{
        let isa: $crate::isa::Isa = $isa;
        isa.assert_supported();
        match isa.simd_level() {
            #[cfg(target_arch = "x86_64")]
            $crate::isa::SimdLevel::Avx512 => {
                type $V = $crate::simd::F32x16;
                <$V as $crate::simd::SimdVec>::vectorize(
                    #[inline(always)]
                    || $body,
                )
            }
            #[cfg(target_arch = "x86_64")]
            $crate::isa::SimdLevel::Avx2 => {
                type $V = $crate::simd::F32x8;
                <$V as $crate::simd::SimdVec>::vectorize(
                    #[inline(always)]
                    || $body,
                )
            }
            #[cfg(not(target_arch = "x86_64"))]
            $crate::isa::SimdLevel::Avx512 | $crate::isa::SimdLevel::Avx2 => {
                unreachable!("asserted unsupported")
            }
            $crate::isa::SimdLevel::Portable => {
                type $V = wide::f32x4;
                $body
            }
        }
    }};
}
pub(crate) use dispatch;

/// Runs `f` compiled for AVX-512 (F, BW, VL, DQ) with AVX2 and FMA: `f` is inlined here, so
/// the generic kernel body it calls is compiled with these features.
///
/// # Safety
/// The CPU must support those features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
pub(crate) unsafe fn in_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` compiled for AVX2 and FMA (see [`in_avx512`]).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn in_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The portable level: `wide`'s 4-lane vector, SSE2 on the baseline x86-64 target.
impl SimdVec for wide::f32x4 {
    const LANES: usize = 4;
    // 6 x 8 accumulators are 12 of the 16 xmm registers.
    const GEMM_MR: usize = 6;
    const GEMM_NARROW_MR: usize = 12;

    #[inline(always)]
    fn vectorize<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[inline(always)]
    fn splat(x: f32) -> Self {
        wide::f32x4::splat(x)
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 4 readable floats; read_unaligned needs no alignment
        // (f32x4 itself is 16-byte aligned, so a plain dereference could be UB).
        unsafe { core::ptr::read_unaligned(p.cast::<wide::f32x4>()) }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        // SAFETY: the caller guarantees 4 writable floats; write_unaligned needs no alignment.
        unsafe { core::ptr::write_unaligned(p.cast::<wide::f32x4>(), v) }
    }

    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> Self {
        debug_assert!(n <= 4);
        let mut buf = [0.0f32; 4];
        // SAFETY: the caller guarantees n <= 4 readable floats; buf holds 4.
        unsafe { core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n) };
        wide::f32x4::new(buf)
    }

    #[inline(always)]
    unsafe fn store_partial(p: *mut f32, n: usize, v: Self) {
        debug_assert!(n <= 4);
        let buf = v.to_array();
        // SAFETY: the caller guarantees n <= 4 writable floats.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), p, n) };
    }

    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        wide::f32x4::mul_add(self, b, c)
    }

    #[inline(always)]
    fn max(self, o: Self) -> Self {
        wide::f32x4::max(self, o)
    }

    #[inline(always)]
    fn sqrt(self) -> Self {
        wide::f32x4::sqrt(self)
    }

    #[inline(always)]
    fn simd_gt(self, o: Self) -> Self {
        wide::f32x4::simd_gt(self, o)
    }

    #[inline(always)]
    fn simd_ge(self, o: Self) -> Self {
        wide::f32x4::simd_ge(self, o)
    }

    #[inline(always)]
    fn select(self, t: Self, f: Self) -> Self {
        wide::f32x4::select(self, t, f)
    }

    #[inline(always)]
    fn reduce_add(self) -> f32 {
        wide::f32x4::reduce_add(self)
    }
}

/// Implements the arithmetic operators of a vector newtype with one intrinsic each.
#[cfg(target_arch = "x86_64")]
macro_rules! vector_ops {
    ($t:ident, $add:ident, $sub:ident, $mul:ident, $div:ident, $and:ident, $xor:ident) => {
        vector_ops!(@op $t, Add, add, $add);
        vector_ops!(@op $t, Sub, sub, $sub);
        vector_ops!(@op $t, Mul, mul, $mul);
        vector_ops!(@op $t, Div, div, $div);
        vector_ops!(@op $t, BitAnd, bitand, $and);
        vector_ops!(@op $t, BitXor, bitxor, $xor);
        impl AddAssign for $t {
            #[inline(always)]
            fn add_assign(&mut self, o: $t) {
                *self = *self + o;
            }
        }
        impl BitXorAssign for $t {
            #[inline(always)]
            fn bitxor_assign(&mut self, o: $t) {
                *self = *self ^ o;
            }
        }
        impl Neg for $t {
            type Output = $t;
            /// Flips the sign bit (so -0.0 and NaN payloads behave as in scalar code).
            #[inline(always)]
            fn neg(self) -> $t {
                self ^ <$t as SimdVec>::splat(-0.0)
            }
        }
    };
    (@op $t:ident, $tr:ident, $m:ident, $intr:ident) => {
        impl $tr for $t {
            type Output = $t;
            #[inline(always)]
            fn $m(self, o: $t) -> $t {
                // SAFETY: a value of this type exists only on a CPU with its level (type doc).
                $t(unsafe { $intr(self.0, o.0) })
            }
        }
    };
}

/// The AVX-512 level's vector: 16 lanes in a zmm register. See the module doc on soundness.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct F32x16(core::arch::x86_64::__m512);

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use core::arch::x86_64::*;

    vector_ops!(
        F32x16,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps,
        _mm512_div_ps,
        _mm512_and_ps,
        _mm512_xor_ps
    );

    /// Lane mask of the first `n <= 16` lanes.
    #[inline(always)]
    fn first_lanes(n: usize) -> __mmask16 {
        debug_assert!(n <= 16);
        ((1u32 << n) - 1) as __mmask16
    }

    // SAFETY (every block in this impl): a value of F32x16 exists only on a CPU with
    // AVX-512 F/BW/VL/DQ (module doc), and the intrinsics below need no more; the memory
    // accesses are as each method's contract states.
    impl SimdVec for F32x16 {
        const LANES: usize = 16;
        // 12 x 32 accumulators are 24 of the 32 zmm registers.
        const GEMM_MR: usize = 12;
        const GEMM_NARROW_MR: usize = 24;

        #[inline(always)]
        fn vectorize<R>(f: impl FnOnce() -> R) -> R {
            // SAFETY: see the impl: this CPU has the features in_avx512 enables.
            unsafe { in_avx512(f) }
        }

        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: see the impl.
            F32x16(unsafe { _mm512_set1_ps(x) })
        }

        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees 16 readable floats; no alignment needed.
            F32x16(unsafe { _mm512_loadu_ps(p) })
        }

        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self) {
            // SAFETY: the caller guarantees 16 writable floats; no alignment needed.
            unsafe { _mm512_storeu_ps(p, v.0) }
        }

        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> Self {
            // SAFETY: masked-off lanes are not accessed (no fault), the n others are readable.
            F32x16(unsafe { _mm512_maskz_loadu_ps(first_lanes(n), p) })
        }

        #[inline(always)]
        unsafe fn store_partial(p: *mut f32, n: usize, v: Self) {
            // SAFETY: masked-off lanes are not written, the n others are writable.
            unsafe { _mm512_mask_storeu_ps(p, first_lanes(n), v.0) }
        }

        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            // SAFETY: see the impl.
            F32x16(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
        }

        #[inline(always)]
        fn max(self, o: Self) -> Self {
            // SAFETY: see the impl.
            F32x16(unsafe { _mm512_max_ps(self.0, o.0) })
        }

        #[inline(always)]
        fn sqrt(self) -> Self {
            // SAFETY: see the impl.
            F32x16(unsafe { _mm512_sqrt_ps(self.0) })
        }

        #[inline(always)]
        fn simd_gt(self, o: Self) -> Self {
            // SAFETY: see the impl.
            F32x16(unsafe {
                let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, o.0);
                _mm512_castsi512_ps(_mm512_movm_epi32(k))
            })
        }

        #[inline(always)]
        fn simd_ge(self, o: Self) -> Self {
            // SAFETY: see the impl.
            F32x16(unsafe {
                let k = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(self.0, o.0);
                _mm512_castsi512_ps(_mm512_movm_epi32(k))
            })
        }

        #[inline(always)]
        fn select(self, t: Self, f: Self) -> Self {
            // SAFETY: see the impl.
            F32x16(unsafe {
                let k = _mm512_movepi32_mask(_mm512_castps_si512(self.0));
                _mm512_mask_blend_ps(k, f.0, t.0)
            })
        }

        #[inline(always)]
        fn reduce_add(self) -> f32 {
            // SAFETY: see the impl.
            unsafe {
                let half = _mm256_add_ps(
                    _mm512_castps512_ps256(self.0),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0))),
                );
                F32x8(half).reduce_add()
            }
        }

        #[inline(always)]
        fn transpose(block: &mut [Self]) {
            let r: [__m512; 16] = core::array::from_fn(|i| block[i].0);
            // SAFETY: see the impl (register shuffles only).
            unsafe {
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
                    *out = F32x16(if i < 8 {
                        _mm512_shuffle_f32x4::<0x88>(a, b)
                    } else {
                        _mm512_shuffle_f32x4::<0xDD>(a, b)
                    });
                }
            }
        }

        #[inline(always)]
        fn transpose_sum(v: &[Self]) -> Self {
            // After the four rounds, lane 4k + l holds the sum of w[4l + k]: feed the inputs
            // in that (transposed) order so that lane q sums v[q].
            let w: [__m512; 16] = core::array::from_fn(|s| v[4 * (s % 4) + s / 4].0);
            // SAFETY: see the impl (register shuffles and adds only).
            unsafe {
                // Round 1, 512 -> 256: w1[m] = [halves of w[2m] added | of w[2m + 1] added].
                let w1: [__m512; 8] = core::array::from_fn(|m| {
                    let (a, b) = (w[2 * m], w[2 * m + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x44>(a, b),
                        _mm512_shuffle_f32x4::<0xEE>(a, b),
                    )
                });
                // Round 2, 256 -> 128: 128-bit block k of w2[m] holds 4 partials of w[4m + k].
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
                F32x16(_mm512_add_ps(
                    _mm512_shuffle_ps::<0x88>(a, b),
                    _mm512_shuffle_ps::<0xDD>(a, b),
                ))
            }
        }
    }
}

/// The AVX2 level's vector: 8 lanes in a ymm register. See the module doc on soundness.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct F32x8(core::arch::x86_64::__m256);

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use core::arch::x86_64::*;

    vector_ops!(
        F32x8,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps,
        _mm256_div_ps,
        _mm256_and_ps,
        _mm256_xor_ps
    );

    /// All-ones 32-bit lanes for the first `n <= 8` lanes, zero for the others (the mask
    /// operand of VMASKMOVPS).
    #[inline(always)]
    fn first_lanes(n: usize) -> __m256i {
        debug_assert!(n <= 8);
        // SAFETY: a value of F32x8 exists only on a CPU with AVX2 (module doc).
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }

    // SAFETY (every block in this impl): a value of F32x8 exists only on a CPU with AVX2
    // and FMA (module doc), and the intrinsics below need no more; the memory accesses are as
    // each method's contract states.
    impl SimdVec for F32x8 {
        const LANES: usize = 8;
        // 6 x 16 accumulators are 12 of the 16 ymm registers (BLIS's Haswell tile).
        const GEMM_MR: usize = 6;
        const GEMM_NARROW_MR: usize = 12;

        #[inline(always)]
        fn vectorize<R>(f: impl FnOnce() -> R) -> R {
            // SAFETY: see the impl: this CPU has the features in_avx2 enables.
            unsafe { in_avx2(f) }
        }

        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: see the impl.
            F32x8(unsafe { _mm256_set1_ps(x) })
        }

        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees 8 readable floats; no alignment needed.
            F32x8(unsafe { _mm256_loadu_ps(p) })
        }

        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self) {
            // SAFETY: the caller guarantees 8 writable floats; no alignment needed.
            unsafe { _mm256_storeu_ps(p, v.0) }
        }

        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> Self {
            // SAFETY: lanes whose mask is 0 are not accessed, the n others are readable.
            F32x8(unsafe { _mm256_maskload_ps(p, first_lanes(n)) })
        }

        #[inline(always)]
        unsafe fn store_partial(p: *mut f32, n: usize, v: Self) {
            // SAFETY: lanes whose mask is 0 are not written, the n others are writable.
            unsafe { _mm256_maskstore_ps(p, first_lanes(n), v.0) }
        }

        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            // SAFETY: see the impl.
            F32x8(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }

        #[inline(always)]
        fn max(self, o: Self) -> Self {
            // SAFETY: see the impl.
            F32x8(unsafe { _mm256_max_ps(self.0, o.0) })
        }

        #[inline(always)]
        fn sqrt(self) -> Self {
            // SAFETY: see the impl.
            F32x8(unsafe { _mm256_sqrt_ps(self.0) })
        }

        #[inline(always)]
        fn simd_gt(self, o: Self) -> Self {
            // SAFETY: see the impl.
            F32x8(unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, o.0) })
        }

        #[inline(always)]
        fn simd_ge(self, o: Self) -> Self {
            // SAFETY: see the impl.
            F32x8(unsafe { _mm256_cmp_ps::<_CMP_GE_OQ>(self.0, o.0) })
        }

        #[inline(always)]
        fn select(self, t: Self, f: Self) -> Self {
            // SAFETY: see the impl.
            F32x8(unsafe { _mm256_blendv_ps(f.0, t.0, self.0) })
        }

        #[inline(always)]
        fn reduce_add(self) -> f32 {
            // SAFETY: see the impl. Halves, then pairs, then the last two: a fixed order.
            unsafe {
                let x = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
                let x = _mm_add_ss(x, _mm_shuffle_ps::<0x55>(x, x));
                _mm_cvtss_f32(x)
            }
        }

        #[inline(always)]
        fn transpose(block: &mut [Self]) {
            let r: [__m256; 8] = core::array::from_fn(|i| block[i].0);
            // SAFETY: see the impl (register shuffles only).
            unsafe {
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
                    *out = F32x8(if i < 4 {
                        _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j])
                    } else {
                        _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j])
                    });
                }
            }
        }

        #[inline(always)]
        fn transpose_sum(v: &[Self]) -> Self {
            // After the three rounds, lane 4k + l holds the sum of w[2l + k].
            let w: [__m256; 8] = core::array::from_fn(|s| v[4 * (s % 2) + s / 2].0);
            // SAFETY: see the impl (register shuffles and adds only).
            unsafe {
                // Round 1, 256 -> 128: w1[m] = [halves of w[2m] added | of w[2m + 1] added].
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
                F32x8(_mm256_add_ps(
                    _mm256_shuffle_ps::<0x88>(a, b),
                    _mm256_shuffle_ps::<0xDD>(a, b),
                ))
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::Isa;

    fn lanes_of<V: SimdVec>(v: V) -> Vec<f32> {
        v.to_lanes()[..V::LANES].to_vec()
    }

    fn transpose_swaps_rows_and_columns<V: SimdVec>() {
        let n = V::LANES;
        let mut block: Vec<V> = (0..n)
            .map(|i| V::from_slice(&(0..n).map(|j| (i * n + j) as f32).collect::<Vec<_>>()))
            .collect();
        V::transpose(&mut block);
        for (j, v) in block.iter().enumerate() {
            for (i, x) in lanes_of(*v).iter().enumerate() {
                assert_eq!(*x, (i * n + j) as f32, "lane {i} of vector {j}");
            }
        }
    }

    fn transpose_sum_sums_each_vector_into_its_lane<V: SimdVec>() {
        let n = V::LANES;
        let lane = |q: usize, l: usize| (q * 100 + l) as f32 * 0.5;
        let v: Vec<V> = (0..n)
            .map(|q| V::from_slice(&(0..n).map(|l| lane(q, l)).collect::<Vec<_>>()))
            .collect();
        for (q, g) in lanes_of(V::transpose_sum(&v)).iter().enumerate() {
            let want: f32 = (0..n).map(|l| lane(q, l)).sum();
            assert_eq!(*g, want, "lane {q}");
        }
    }

    /// Partial loads zero the lanes past `n` and partial stores leave the memory past `n`
    /// alone; comparisons give masks that select and AND as the scalar rule says.
    fn partial_access_and_masks<V: SimdVec>() {
        let n = V::LANES;
        let src: Vec<f32> = (0..n).map(|i| i as f32 - 2.5).collect();
        for k in 0..=n {
            let v = V::from_slice(&src[..k]);
            let got = lanes_of(v);
            for (i, x) in got.iter().enumerate() {
                assert_eq!(
                    *x,
                    if i < k { src[i] } else { 0.0 },
                    "load of {k}, lane {i}"
                );
            }
            let mut dst = vec![f32::NAN; n];
            V::splat(7.0).store_to(&mut dst[..k]);
            for (i, x) in dst.iter().enumerate() {
                assert!(if i < k { *x == 7.0 } else { x.is_nan() }, "store of {k}");
            }
        }
        let x = V::from_slice(&src);
        let zero = V::splat(0.0);
        let kept = lanes_of(x.simd_gt(zero) & x);
        let picked = lanes_of(x.simd_ge(zero).select(V::splat(1.0), V::splat(-1.0)));
        for i in 0..n {
            assert_eq!(kept[i], src[i].max(0.0), "keep lane {i}");
            assert_eq!(picked[i], if src[i] >= 0.0 { 1.0 } else { -1.0 });
        }
        assert_eq!(x.reduce_add(), src.iter().sum::<f32>());
        assert_eq!(lanes_of((-x).abs()), lanes_of(x.abs()));
    }

    #[test]
    fn every_level_agrees_with_the_lane_by_lane_rules() {
        for isa in Isa::all_supported() {
            dispatch!(isa, V => {
                transpose_swaps_rows_and_columns::<V>();
                transpose_sum_sums_each_vector_into_its_lane::<V>();
                partial_access_and_masks::<V>();
            });
        }
    }
}
