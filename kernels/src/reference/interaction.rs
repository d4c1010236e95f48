//! Scalar twins of the interaction kernels.

/// Twin of [`crate::interaction::dot_interaction_forward`]: the pairs enumerated by two loops
/// in the reference order, each dot product summed in f64.
#[allow(clippy::too_many_arguments)]
pub fn dot_interaction_forward(
    features: &[f32],
    batch: usize,
    f: usize,
    d: usize,
    feature_stride: usize,
    self_interaction: bool,
    out: &mut [f32],
    out_stride: usize,
) {
    for b in 0..batch {
        let x = &features[b * feature_stride..];
        let row = &mut out[b * out_stride..];
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
#[allow(clippy::too_many_arguments)]
pub fn dot_interaction_backward(
    features: &[f32],
    batch: usize,
    f: usize,
    d: usize,
    feature_stride: usize,
    self_interaction: bool,
    grad_out: &[f32],
    grad_out_stride: usize,
    grad_features: &mut [f32],
    grad_feature_stride: usize,
) {
    for b in 0..batch {
        let x = &features[b * feature_stride..];
        let g = &grad_out[b * grad_out_stride..];
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
        let dst = &mut grad_features[b * grad_feature_stride..];
        for (o, v) in dst.iter_mut().zip(&grad) {
            *o = *v as f32;
        }
    }
}

/// Twin of [`crate::interaction::cat_interaction_forward`].
pub fn cat_interaction_forward(
    features: &[f32],
    batch: usize,
    f: usize,
    d: usize,
    feature_stride: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    for b in 0..batch {
        for k in 0..f * d {
            out[b * out_stride + k] = features[b * feature_stride + k];
        }
    }
}

/// Twin of [`crate::interaction::cat_interaction_backward`].
pub fn cat_interaction_backward(
    grad_out: &[f32],
    grad_out_stride: usize,
    batch: usize,
    f: usize,
    d: usize,
    grad_features: &mut [f32],
    grad_feature_stride: usize,
) {
    for b in 0..batch {
        for k in 0..f * d {
            grad_features[b * grad_feature_stride + k] = grad_out[b * grad_out_stride + k];
        }
    }
}
