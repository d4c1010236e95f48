//! Scalar twins of the interaction kernels.

use crate::mat::{MatMut, MatRef};

/// Twin of [`crate::interaction::dot_interaction_forward`]: the pairs enumerated by two loops
/// in the reference order, each dot product summed in f64.
pub fn dot_interaction_forward(
    features: MatRef,
    f: usize,
    self_interaction: bool,
    mut out: MatMut,
) {
    let d = features.cols() / f;
    for b in 0..features.rows() {
        let x: Vec<f32> = features.row_iter(b).collect();
        let row = out.row_mut(b);
        row[..d].copy_from_slice(&x[..d]);
        let mut p = d;
        for i in 0..f {
            let j_end = if self_interaction { i + 1 } else { i };
            for j in 0..j_end {
                let dot: f64 = (0..d)
                    .map(|k| x[i * d + k] as f64 * x[j * d + k] as f64)
                    .sum();
                row[p] = dot as f32;
                p += 1;
            }
        }
    }
}

/// Twin of [`crate::interaction::dot_interaction_backward`]: every pair scatters its gradient
/// to both of its vectors (twice to the one vector of a self pair), in f64.
pub fn dot_interaction_backward(
    features: MatRef,
    f: usize,
    self_interaction: bool,
    grad_out: MatRef,
    mut grad_features: MatMut,
) {
    let d = features.cols() / f;
    for b in 0..features.rows() {
        let x: Vec<f32> = features.row_iter(b).collect();
        let g: Vec<f32> = grad_out.row_iter(b).collect();
        let mut grad = vec![0.0f64; f * d];
        for k in 0..d {
            grad[k] = g[k] as f64;
        }
        let mut p = d;
        for i in 0..f {
            let j_end = if self_interaction { i + 1 } else { i };
            for j in 0..j_end {
                let gp = g[p] as f64;
                p += 1;
                for k in 0..d {
                    grad[i * d + k] += gp * x[j * d + k] as f64;
                    grad[j * d + k] += gp * x[i * d + k] as f64;
                }
            }
        }
        for (o, v) in grad_features.row_mut(b).iter_mut().zip(&grad) {
            *o = *v as f32;
        }
    }
}

/// Twin of [`crate::interaction::cat_interaction_forward`].
pub fn cat_interaction_forward(features: MatRef, out: MatMut) {
    copy_rows(features, out);
}

/// Twin of [`crate::interaction::cat_interaction_backward`].
pub fn cat_interaction_backward(grad_out: MatRef, grad_features: MatMut) {
    copy_rows(grad_out, grad_features);
}

/// dst row b = src row b, element by element.
fn copy_rows(src: MatRef, mut dst: MatMut) {
    for b in 0..src.rows() {
        for (o, v) in dst.row_mut(b).iter_mut().zip(src.row_iter(b)) {
            *o = v;
        }
    }
}
