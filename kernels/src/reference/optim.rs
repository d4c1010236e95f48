//! Scalar twins of the optim kernels: the update rules written out element by element in f64.

use super::embedding::coalesce_f64;
use crate::embedding::{Bags, Pooling};
use crate::mat::MatRef;
use crate::optim::{SparseOptimizer, SparseStep, TableMut};

/// Twin of [`crate::optim::embedding_bag_backward_update`]: the summed gradient of each
/// looked-up row plus `weight_decay` times the row, then `opt`, each looked-up row once; other
/// rows and their state are left alone.
pub fn embedding_bag_backward_update(
    table: TableMut,
    bags: Bags,
    pooling: Pooling,
    grad_out: MatRef,
    step: SparseStep,
) {
    let SparseStep { opt, weight_decay } = step;
    let dim = table.weights.cols();
    let (table, state) = (table.weights.into_slice(), table.state);
    let (grad_stride, grad_out) = (grad_out.row_stride(), grad_out.as_slice());
    let rows = table.len() / dim;
    for (r, mut g) in coalesce_f64(rows, dim, bags, pooling, grad_out, grad_stride) {
        let r = r as usize;
        let p = &mut table[r * dim..(r + 1) * dim];
        for (gk, pk) in g.iter_mut().zip(p.iter()) {
            *gk += weight_decay as f64 * *pk as f64;
        }
        match opt {
            SparseOptimizer::Sgd { lr } => {
                for (pk, gk) in p.iter_mut().zip(&g) {
                    *pk = (*pk as f64 - lr as f64 * gk) as f32;
                }
            }
            SparseOptimizer::Adagrad { lr, eps } => {
                let s = &mut state[r * dim..(r + 1) * dim];
                for ((pk, sk), gk) in p.iter_mut().zip(s.iter_mut()).zip(&g) {
                    let sn = *sk as f64 + gk * gk;
                    *sk = sn as f32;
                    *pk = (*pk as f64 - lr as f64 * gk / (sn.sqrt() + eps as f64)) as f32;
                }
            }
            SparseOptimizer::RowwiseAdagrad { lr, eps } => {
                let mean_sq = g.iter().map(|x| x * x).sum::<f64>() / dim as f64;
                let acc = state[r] as f64 + mean_sq;
                state[r] = acc as f32;
                for (pk, gk) in p.iter_mut().zip(&g) {
                    *pk = (*pk as f64 - lr as f64 * gk / (acc.sqrt() + eps as f64)) as f32;
                }
            }
        }
    }
}

/// param -= lr * grad.
pub fn sgd_update(param: &mut [f32], grad: &[f32], lr: f32) {
    for (p, g) in param.iter_mut().zip(grad) {
        *p = (*p as f64 - lr as f64 * *g as f64) as f32;
    }
}

/// state += grad^2; param -= lr * grad / (sqrt(state) + eps).
pub fn adagrad_update(param: &mut [f32], grad: &[f32], state: &mut [f32], lr: f32, eps: f32) {
    for ((p, g), s) in param.iter_mut().zip(grad).zip(state.iter_mut()) {
        let g = *g as f64;
        let sn = *s as f64 + g * g;
        *s = sn as f32;
        *p = (*p as f64 - lr as f64 * g / (sn.sqrt() + eps as f64)) as f32;
    }
}
