//! Scalar twins of the embedding kernels: straight loops over bags and positions, sums in f64.

use crate::embedding::{Bags, Pooling};

/// The factor of position `p` in bag `b`: 1, its per-sample weight, or 1 / bag size.
fn scale(bags: &Bags, pooling: Pooling, p: usize, b: usize) -> f64 {
    match pooling {
        Pooling::Mean => 1.0 / bags.bag(b).len() as f64,
        Pooling::Sum => bags.weights().map_or(1.0, |w| w[p] as f64),
    }
}

/// `out[b * out_stride + k]` = sum over p in bag b of `w_p * table[indices[p], k]`, divided by
/// the bag size for mean pooling (zeros for an empty bag).
pub fn embedding_bag_forward(
    table: &[f32],
    dim: usize,
    bags: Bags,
    pooling: Pooling,
    out: &mut [f32],
    out_stride: usize,
) {
    for b in 0..bags.len() {
        let pos = bags.bag(b);
        for k in 0..dim {
            let mut s = 0.0f64;
            for p in pos.clone() {
                let w = bags.weights().map_or(1.0, |w| w[p] as f64);
                s += w * table[bags.indices()[p] as usize * dim + k] as f64;
            }
            if pooling == Pooling::Mean && !pos.is_empty() {
                s /= pos.len() as f64;
            }
            out[b * out_stride + k] = s as f32;
        }
    }
}

/// `out[i * out_stride + k] = table[indices[i] * dim + k]`.
pub fn gather_rows(table: &[f32], dim: usize, indices: &[u32], out: &mut [f32], out_stride: usize) {
    for (i, &id) in indices.iter().enumerate() {
        for k in 0..dim {
            out[i * out_stride + k] = table[id as usize * dim + k];
        }
    }
}

/// `grad_weights[p]` = sum over k of `grad_out[bag(p), k] * table[indices[p], k]`.
pub fn embedding_bag_weight_grad(
    table: &[f32],
    dim: usize,
    bags: Bags,
    grad_out: &[f32],
    grad_stride: usize,
    grad_weights: &mut [f32],
) {
    for b in 0..bags.len() {
        for p in bags.bag(b) {
            let id = bags.indices()[p] as usize;
            let s: f64 = (0..dim)
                .map(|k| grad_out[b * grad_stride + k] as f64 * table[id * dim + k] as f64)
                .sum();
            grad_weights[p] = s as f32;
        }
    }
}

/// The gradient of every looked-up row, in f64, as (row, gradient) in ascending row order:
/// a dense rows x dim accumulation, then the rows that were touched.
pub(super) fn coalesce_f64(
    rows: usize,
    dim: usize,
    bags: Bags,
    pooling: Pooling,
    grad_out: &[f32],
    grad_stride: usize,
) -> Vec<(u32, Vec<f64>)> {
    let mut dense = vec![0.0f64; rows * dim];
    let mut touched = vec![false; rows];
    for b in 0..bags.len() {
        for p in bags.bag(b) {
            let id = bags.indices()[p] as usize;
            touched[id] = true;
            let w = scale(&bags, pooling, p, b);
            for k in 0..dim {
                dense[id * dim + k] += w * grad_out[b * grad_stride + k] as f64;
            }
        }
    }
    (0..rows)
        .filter(|&r| touched[r])
        .map(|r| (r as u32, dense[r * dim..(r + 1) * dim].to_vec()))
        .collect()
}

/// The coalesced gradient as (distinct rows ascending, their gradients rows x dim).
pub fn embedding_bag_backward_coalesce(
    rows: usize,
    dim: usize,
    bags: Bags,
    pooling: Pooling,
    grad_out: &[f32],
    grad_stride: usize,
) -> (Vec<u32>, Vec<f32>) {
    let rg = coalesce_f64(rows, dim, bags, pooling, grad_out, grad_stride);
    let ids = rg.iter().map(|(r, _)| *r).collect();
    let grads = rg
        .iter()
        .flat_map(|(_, g)| g.iter().map(|&x| x as f32))
        .collect();
    (ids, grads)
}
