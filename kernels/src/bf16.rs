//! BF16 ("brain floating point", bfloat16) values, their conversions to and from f32, and the
//! run-time choice of instruction set for the BF16 kernels.
//!
//! Format: 1 sign bit, 8 exponent bits (bias 127, as in f32) and 7 stored mantissa bits, i.e.
//! exactly the upper 16 bits of an IEEE-754 binary32. It has f32's range and about 2-3
//! significant decimal digits; bf16 -> f32 is exact (append 16 zero bits).
//!
//! f32 -> bf16 follows VCVTNEPS2BF16 / VCVTNE2PS2BF16 (Intel SDM, "convert_fp32_to_bfloat16"),
//! so the scalar and AVX512-BF16 paths agree bit for bit:
//! - normal numbers round to nearest, ties to even (overflow rounds to infinity);
//! - zero and f32 subnormals become zero of the same sign (the instruction treats denormal
//!   inputs as zero, regardless of MXCSR);
//! - infinities stay infinities; a NaN stays NaN: its upper 16 bits, with the quiet bit
//!   (mantissa MSB, bit 6) set.
//!
//! The AVX512-BF16 paths are compiled for every x86_64 build (`#[target_feature]`) and taken
//! only when the CPU has the extension and the [`Isa`] asks for it ([`crate::isa`]).

pub use crate::isa::{ISA_ENV, Isa};

/// One bfloat16 value, stored as its bit pattern.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct Bf16(u16);

impl Bf16 {
    /// The value with this bit pattern.
    pub const fn from_bits(bits: u16) -> Bf16 {
        Bf16(bits)
    }

    /// The bit pattern.
    pub const fn to_bits(self) -> u16 {
        self.0
    }

    /// Rounds `x` to bf16 as VCVTNEPS2BF16 does (see the module doc): nearest-even, f32
    /// subnormals to signed zero, NaN to quiet NaN.
    pub fn from_f32(x: f32) -> Bf16 {
        let bits = x.to_bits();
        let magnitude = bits & 0x7FFF_FFFF;
        if magnitude > 0x7F80_0000 {
            // NaN: keep sign and payload's upper bits, force the quiet bit.
            return Bf16((bits >> 16) as u16 | 0x0040);
        }
        if magnitude < 0x0080_0000 {
            // Zero or subnormal: signed zero.
            return Bf16((bits >> 16) as u16 & 0x8000);
        }
        // Adding 0x7FFF plus the kept LSB carries into bit 16 exactly when the dropped half is
        // above one half, or exactly one half with an odd kept part (ties to even). No overflow
        // of u32: the largest magnitude here is infinity, 0x7F80_0000.
        let kept_lsb = (bits >> 16) & 1;
        Bf16(((bits + 0x7FFF + kept_lsb) >> 16) as u16)
    }

    /// The exact f32 value.
    pub fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

/// `dst[i] = bf16(src[i])`, rounded as [`Bf16::from_f32`]; bit-identical on every ISA.
pub fn f32_to_bf16_slice(src: &[f32], dst: &mut [Bf16], isa: Isa) {
    convert_slice(src, dst, isa);
}

/// `dst[i] = f32(src[i])`, exact; bit-identical on every ISA.
pub fn bf16_to_f32_slice(src: &[Bf16], dst: &mut [f32], isa: Isa) {
    convert_slice(src, dst, isa);
}

/// One direction of conversion: its scalar rule and its AVX512-BF16 kernel.
trait SliceConversion: Copy {
    type To;
    const NAME: &'static str;
    fn scalar(self) -> Self::To;
    /// # Safety
    /// The CPU must support AVX512-BF16, F, BW and VL; `src.len() == dst.len()`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512bf16(src: &[Self], dst: &mut [Self::To]);
}

impl SliceConversion for f32 {
    type To = Bf16;
    const NAME: &'static str = "f32_to_bf16_slice";
    fn scalar(self) -> Bf16 {
        Bf16::from_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512bf16(src: &[f32], dst: &mut [Bf16]) {
        // SAFETY: the caller's contract is the kernel's.
        unsafe { avx512::f32_to_bf16(src, dst) }
    }
}

impl SliceConversion for Bf16 {
    type To = f32;
    const NAME: &'static str = "bf16_to_f32_slice";
    fn scalar(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512bf16(src: &[Bf16], dst: &mut [f32]) {
        // SAFETY: the caller's contract is the kernel's.
        unsafe { avx512::bf16_to_f32(src, dst) }
    }
}

/// `dst[i] = src[i].scalar()` on the path `isa` names.
fn convert_slice<S: SliceConversion>(src: &[S], dst: &mut [S::To], isa: Isa) {
    assert_eq!(
        src.len(),
        dst.len(),
        "{}: {} values into {}",
        S::NAME,
        src.len(),
        dst.len()
    );
    isa.assert_supported();
    match isa {
        // The levels below AVX512-BF16 have no conversion instruction.
        Isa::Portable | Isa::Avx2 | Isa::Avx512 => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s.scalar();
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 | Isa::Amx => {
            // SAFETY: the CPU has AVX512-BF16/F/BW/VL (asserted above); equal lengths.
            unsafe { S::avx512bf16(src, dst) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512Bf16 | Isa::Amx => unreachable!("asserted unsupported"),
    }
}

/// The AVX512-BF16 conversions, 16 or 32 values per instruction, masked tails.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Bf16;
    use core::arch::x86_64::*;

    /// Lane mask of the first `n <= 16` lanes.
    fn first_lanes(n: usize) -> u16 {
        debug_assert!(n <= 16);
        ((1u32 << n) - 1) as u16
    }

    /// # Safety
    /// The CPU must support AVX512-BF16, F, BW and VL; `src.len() == dst.len()`.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    pub unsafe fn f32_to_bf16(src: &[f32], dst: &mut [Bf16]) {
        let len = src.len();
        let mut i = 0;
        while i + 32 <= len {
            // SAFETY: 32 values at i are in bounds of both slices (same length); Bf16 is a
            // transparent u16, so 32 of them are one unaligned 512-bit store. The transmute
            // reinterprets a 512-bit vector as another (no invalid bit patterns).
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr().add(i));
                let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
                // VCVTNE2PS2BF16: the second source fills the low 16 bf16 lanes.
                let both = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add(i).cast(),
                    core::mem::transmute::<__m512bh, __m512i>(both),
                );
            }
            i += 32;
        }
        while i < len {
            let n = (len - i).min(16);
            let mask = first_lanes(n);
            // SAFETY: the masked load and store touch only the n in-bound lanes at i.
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
                let h = _mm512_cvtneps_pbh(x);
                _mm256_mask_storeu_epi16(
                    dst.as_mut_ptr().add(i).cast(),
                    mask,
                    core::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
            i += n;
        }
    }

    /// # Safety
    /// The CPU must support AVX512F, BW and VL; `src.len() == dst.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn bf16_to_f32(src: &[Bf16], dst: &mut [f32]) {
        let len = src.len();
        for i in (0..len).step_by(16) {
            let mask = first_lanes((len - i).min(16));
            // SAFETY: the masked load and store touch only the in-bound lanes at i.
            unsafe {
                let h = _mm256_maskz_loadu_epi16(mask, src.as_ptr().add(i).cast());
                // bf16 -> f32 is the bit pattern shifted into the upper half.
                let bits = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask, _mm512_castsi512_ps(bits));
            }
        }
    }
}
