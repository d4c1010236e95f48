//! Scalar twins of the BF16 conversions and GEMM.

use crate::bf16::Bf16;
use crate::gemm::{Bf16Mat, MatMut};

/// f32 -> bf16 as VCVTNEPS2BF16 defines it (Intel SDM), written as the case analysis rather
/// than [`Bf16::from_f32`]'s rounding-bias trick: NaN -> its upper half with the quiet bit set;
/// zero and subnormals -> signed zero; otherwise the upper half, plus one if the dropped half
/// is above 0x8000, or equal to it with an odd upper half (ties to even).
pub fn f32_to_bf16(x: f32) -> Bf16 {
    let bits = x.to_bits();
    let (upper, dropped) = (bits >> 16, bits & 0xFFFF);
    if x.is_nan() {
        return Bf16::from_bits(upper as u16 | 0x0040);
    }
    if x == 0.0 || x.is_subnormal() {
        return Bf16::from_bits(if x.is_sign_negative() { 0x8000 } else { 0 });
    }
    let round_up = dropped > 0x8000 || (dropped == 0x8000 && upper & 1 == 1);
    Bf16::from_bits((upper + u32::from(round_up)) as u16)
}

/// bf16 -> f32: the bits in the upper half.
pub fn bf16_to_f32(x: Bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

/// C = A . B^T + beta * C (A: M x K, B: N x K), the exact products of the bf16 values summed
/// in f64.
pub fn gemm_bf16(a: Bf16Mat, b: Bf16Mat, beta: f32, c: &mut MatMut) {
    let (m, k, n) = (a.rows(), a.cols(), b.rows());
    assert_eq!(b.cols(), k);
    assert_eq!((c.rows(), c.cols()), (m, n));
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += f64::from(bf16_to_f32(a.get(i, p))) * f64::from(bf16_to_f32(b.get(j, p)));
            }
            if beta != 0.0 {
                s += f64::from(beta) * f64::from(c.get(i, j));
            }
            c.row_mut(i)[j] = s as f32;
        }
    }
}
