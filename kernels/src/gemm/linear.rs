//! The three products of a fully connected layer with the PyTorch weight layout
//! W (out x in), y = x W^T + b, all on the one GEMM through strided views:
//!
//! | product  | GEMM                          | M     | N   | K     |
//! |----------|-------------------------------|-------|-----|-------|
//! | forward  | Y = relu(X . W^T + b)         | batch | out | in    |
//! | dX       | dX = ((dY ⊙ [Y>0]) . W) ⊙ [X>0] | batch | in | out   |
//! | dW       | dW (+)= (dY ⊙ [Y>0])^T . X    | out   | in  | batch |
//! | db       | db (+)= column sums of dY ⊙ [Y>0] |   |     |       |
//!
//! The three products take a [`Precision`]: with [`Precision::Bf16`] their operands are
//! rounded to bf16 and multiplied with f32 accumulation; db is always summed in f32.

use super::{GemmOps, MatMut, MatRef, PackedB, Precision, gemm, gemm_prepacked};
use crate::isa::Isa;
use crate::parallel::{Par, should_split};
use crate::simd::{MAX_LANES, SimdVec, dispatch};
use rayon::prelude::*;

/// Y = X . W^T + bias, then ReLU if `relu`. `x` is batch x in, `w` is out x in.
pub fn linear_forward(
    x: MatRef,
    w: MatRef,
    bias: Option<&[f32]>,
    relu: bool,
    y: MatMut,
    precision: Precision,
    par: Par,
) {
    linear_forward_prepacked(x, w, None, bias, relu, y, precision, par)
}

/// [`linear_forward`] reading W^T from `packed_wt` when given ([`PackedB::pack`] of `w.t()`,
/// shared by the row chunks of a batch; the same bits as without).
#[allow(clippy::too_many_arguments)]
pub fn linear_forward_prepacked(
    x: MatRef,
    w: MatRef,
    packed_wt: Option<&PackedB>,
    bias: Option<&[f32]>,
    relu: bool,
    y: MatMut,
    precision: Precision,
    par: Par,
) {
    let ops = GemmOps {
        bias,
        relu,
        precision,
        ..GemmOps::default()
    };
    prepacked_or_gemm(x, w.t(), packed_wt, y, &ops, par);
}

fn prepacked_or_gemm(
    a: MatRef,
    b: MatRef,
    packed_b: Option<&PackedB>,
    c: MatMut,
    ops: &GemmOps,
    par: Par,
) {
    match packed_b {
        Some(packed) => gemm_prepacked(a, b, packed, c, ops, par),
        None => gemm(a, b, c, ops, par),
    }
}

/// dX = (dY ⊙ [Y > 0]) . W, where `relu_out` is the layer's output Y if a ReLU followed it.
pub fn linear_backward_input(
    dy: MatRef,
    relu_out: Option<MatRef>,
    w: MatRef,
    dx: MatMut,
    precision: Precision,
    par: Par,
) {
    linear_backward_input_prepacked(dy, relu_out, w, None, None, dx, precision, par)
}

/// [`linear_backward_input`] reading W from `packed_w` when given ([`PackedB::pack`] of `w`;
/// the same bits as without). With `input_relu` (the layer's input X, the output of a ReLU),
/// dX is stored as dX ⊙ [X > 0]: the gradient w.r.t. the pre-activation of the layer below,
/// whose products then take it with no `relu_out` mask (the same values).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input_prepacked(
    dy: MatRef,
    relu_out: Option<MatRef>,
    w: MatRef,
    packed_w: Option<&PackedB>,
    input_relu: Option<MatRef>,
    dx: MatMut,
    precision: Precision,
    par: Par,
) {
    let ops = GemmOps {
        a_relu_mask: relu_out,
        c_relu_mask: input_relu,
        precision,
        ..GemmOps::default()
    };
    prepacked_or_gemm(dy, w, packed_w, dx, &ops, par);
}

/// dW = (dY ⊙ [Y > 0])^T . X, added to dW's contents if `accumulate`.
pub fn linear_backward_weight(
    dy: MatRef,
    relu_out: Option<MatRef>,
    x: MatRef,
    dw: MatMut,
    accumulate: bool,
    precision: Precision,
    par: Par,
) {
    let ops = GemmOps {
        beta: if accumulate { 1.0 } else { 0.0 },
        a_relu_mask: relu_out.map(|y| y.t()),
        precision,
        ..GemmOps::default()
    };
    gemm(dy.t(), x, dw, &ops, par);
}

/// Columns per parallel task of [`bias_grad`] (a multiple of every level's LANES).
const BIAS_GRAD_COLS_PER_TASK: usize = 4 * MAX_LANES;

/// db = column sums of dY ⊙ [Y > 0] (added to db if `accumulate`), on [`Isa::selected`].
/// Threads split the columns, and each column is summed over the rows in row order, so the
/// bits never depend on the thread count.
pub fn bias_grad(dy: MatRef, relu_out: Option<MatRef>, db: &mut [f32], accumulate: bool, par: Par) {
    bias_grad_with_isa(Isa::selected(), dy, relu_out, db, accumulate, par)
}

/// [`bias_grad`] on `isa` (panics if the CPU lacks it).
pub fn bias_grad_with_isa(
    isa: Isa,
    dy: MatRef,
    relu_out: Option<MatRef>,
    db: &mut [f32],
    accumulate: bool,
    par: Par,
) {
    dispatch!(isa, V => bias_grad_lanes::<V>(dy, relu_out, db, accumulate, par))
}

fn bias_grad_lanes<V: SimdVec>(
    dy: MatRef,
    relu_out: Option<MatRef>,
    db: &mut [f32],
    accumulate: bool,
    par: Par,
) {
    let (m, n) = (dy.rows(), dy.cols());
    assert_eq!(
        db.len(),
        n,
        "bias_grad: db has {} values for {n} columns",
        db.len()
    );
    if let Some(y) = &relu_out {
        assert_eq!(
            (y.rows(), y.cols()),
            (m, n),
            "bias_grad: mask shape differs from dY"
        );
    }
    let columns = |j0: usize, out: &mut [f32]| {
        V::vectorize(
            #[inline(always)]
            || {
                for (v, out_v) in out.chunks_mut(V::LANES).enumerate() {
                    let j = j0 + v * V::LANES;
                    let w = out_v.len();
                    let mut acc = if accumulate {
                        V::from_slice(out_v)
                    } else {
                        V::splat(0.0)
                    };
                    for i in 0..m {
                        let g = row_vec::<V>(&dy, i, j, w);
                        acc += match &relu_out {
                            // An all-ones lane mask where Y > 0: AND keeps g there, zero elsewhere.
                            Some(y) => row_vec::<V>(y, i, j, w).simd_gt(V::splat(0.0)) & g,
                            None => g,
                        };
                    }
                    acc.store_to(out_v);
                }
            },
        )
    };
    if should_split(par, m * n, 1 << 16) {
        db.par_chunks_mut(BIAS_GRAD_COLS_PER_TASK)
            .enumerate()
            .for_each(|(t, out)| columns(t * BIAS_GRAD_COLS_PER_TASK, out));
    } else {
        columns(0, db);
    }
}

/// Up to LANES elements of row i from column j (zero-filled), for any column stride.
#[inline(always)]
fn row_vec<V: SimdVec>(x: &MatRef, i: usize, j: usize, w: usize) -> V {
    if x.col_stride() == 1 {
        let s = x.row_slice(i, j, w);
        // SAFETY: s holds w <= LANES readable floats.
        unsafe { V::load_partial(s.as_ptr(), w) }
    } else {
        let mut buf = [0.0f32; MAX_LANES];
        for (q, b) in buf.iter_mut().enumerate().take(w) {
            *b = x.get(i, j + q);
        }
        V::from_slice(&buf[..w])
    }
}
