//! Random GEMM problems shared by the f32 and the bf16 GEMM property tests.

use super::fill;
use dlrm_kernels::gemm::{GemmOps, MatRef};
use proptest::prelude::*;

/// A matrix of logical shape rows x cols, stored transposed or not, with padded leading
/// dimension.
pub struct Operand {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub trans: bool,
    pub ld: usize,
}

impl Operand {
    pub fn new(rows: usize, cols: usize, trans: bool, pad: usize, seed: u64) -> Self {
        let (sr, sc) = if trans { (cols, rows) } else { (rows, cols) };
        let ld = sc + pad;
        Operand {
            data: fill(sr * ld, seed),
            rows,
            cols,
            trans,
            ld,
        }
    }

    pub fn view(&self) -> MatRef<'_> {
        if self.trans {
            MatRef::with_row_stride(&self.data, self.cols, self.rows, self.ld).t()
        } else {
            MatRef::with_row_stride(&self.data, self.rows, self.cols, self.ld)
        }
    }
}

/// C (m x n, row stride n + pads.2) = alpha op(A) op(B) + beta C with the optional epilogue.
#[derive(Debug, Clone)]
pub struct Case {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub pads: (usize, usize, usize),
    pub alpha: f32,
    pub beta: f32,
    pub bias: bool,
    pub relu: bool,
    pub mask: bool,
    pub seed: u64,
}

/// Cases with m, n and k drawn from `dim`, every transpose, padding and epilogue.
pub fn case(dim: impl Strategy<Value = usize> + Clone) -> impl Strategy<Value = Case> {
    (
        (dim.clone(), dim.clone(), dim),
        (any::<bool>(), any::<bool>()),
        (0usize..3, 0usize..3, 0usize..3),
        prop::sample::select(vec![1.0f32, -0.5, 2.0]),
        prop::sample::select(vec![0.0f32, 1.0, 0.25]),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |((m, n, k), (ta, tb), pads, alpha, beta, (bias, relu, mask), seed)| Case {
                m,
                n,
                k,
                ta,
                tb,
                pads,
                alpha,
                beta,
                bias,
                relu,
                mask,
                seed,
            },
        )
}

/// The operands of a [`Case`] and the initial C.
pub struct Inputs {
    pub a: Operand,
    pub b: Operand,
    pub mask: Option<Operand>,
    pub bias: Option<Vec<f32>>,
    pub c0: Vec<f32>,
    pub ldc: usize,
}

pub fn inputs(cs: &Case) -> Inputs {
    let a = Operand::new(cs.m, cs.k, cs.ta, cs.pads.0, cs.seed);
    let b = Operand::new(cs.k, cs.n, cs.tb, cs.pads.1, cs.seed ^ 1);
    let mask = cs
        .mask
        .then(|| Operand::new(cs.m, cs.k, cs.ta, cs.pads.0, cs.seed ^ 2));
    let bias = cs.bias.then(|| fill(cs.n, cs.seed ^ 3));
    let ldc = cs.n + cs.pads.2;
    // NaN in C must not leak out when beta = 0 (C is then write-only).
    let c0 = if cs.beta == 0.0 {
        vec![f32::NAN; cs.m * ldc]
    } else {
        fill(cs.m * ldc, cs.seed ^ 4)
    };
    Inputs {
        a,
        b,
        mask,
        bias,
        c0,
        ldc,
    }
}

/// The case's epilogue (f32 precision) over its inputs.
pub fn ops<'a>(cs: &Case, inp: &'a Inputs) -> GemmOps<'a> {
    GemmOps {
        alpha: cs.alpha,
        beta: cs.beta,
        bias: inp.bias.as_deref(),
        relu: cs.relu,
        a_relu_mask: inp.mask.as_ref().map(|m| m.view()),
        ..GemmOps::default()
    }
}
