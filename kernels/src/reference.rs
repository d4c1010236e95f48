//! Naive scalar twins of every kernel: the oracle of the property tests. Written for
//! obviousness, not speed; sums are accumulated in f64.

use crate::gemm::{GemmOps, MatMut, MatRef};

mod activation;
mod bf16;
mod cross;
mod embedding;
mod embedding_bf16;
mod fm;
mod interaction;
mod optim;
mod roofline;

pub use activation::*;
pub use bf16::*;
pub use cross::*;
pub use embedding::*;
pub use embedding_bf16::*;
pub use fm::*;
pub use interaction::*;
pub use optim::*;
pub use roofline::*;

/// C = relu(alpha * (A ⊙ [mask > 0]) . B + beta * C + bias) ⊙ [c_mask > 0], triple loop.
pub fn gemm(a: MatRef, b: MatRef, c: &mut MatMut, ops: &GemmOps) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    assert_eq!(b.rows(), k);
    assert_eq!((c.rows(), c.cols()), (m, n));
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let keep = ops.a_relu_mask.is_none_or(|mk| mk.get(i, p) > 0.0);
                if keep {
                    s += a.get(i, p) as f64 * b.get(p, j) as f64;
                }
            }
            let mut r = ops.alpha as f64 * s;
            if ops.beta != 0.0 {
                r += ops.beta as f64 * c.get(i, j) as f64;
            }
            if let Some(bias) = ops.bias {
                r += bias[j] as f64;
            }
            if ops.relu {
                r = r.max(0.0);
            }
            if !ops.c_relu_mask.is_none_or(|mk| mk.get(i, j) > 0.0) {
                r = 0.0;
            }
            c.row_mut(i)[j] = r as f32;
        }
    }
}

/// db (+)= column sums of dY ⊙ [Y > 0].
pub fn bias_grad(dy: MatRef, relu_out: Option<MatRef>, db: &mut [f32], accumulate: bool) {
    for (j, out) in db.iter_mut().enumerate() {
        let mut s = if accumulate { *out as f64 } else { 0.0 };
        for i in 0..dy.rows() {
            if relu_out.is_none_or(|y| y.get(i, j) > 0.0) {
                s += dy.get(i, j) as f64;
            }
        }
        *out = s as f32;
    }
}
