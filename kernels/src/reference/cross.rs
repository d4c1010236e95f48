//! Scalar twins of the cross-network kernels: the layer formulas and their gradients written
//! out per element, in f64.

use crate::cross::{CrossKind, CrossNet};

/// u_l of sample x_l: (x_l . w_l) broadcast (rank one, without the bias) or W_l x_l + b_l
/// (full rank).
fn layer_u(net: &CrossNet, l: usize, xl: &[f64]) -> Vec<f64> {
    let d = net.dim;
    match net.kind {
        CrossKind::RankOne => {
            let s: f64 = (0..d).map(|k| xl[k] * net.w[l * d + k] as f64).sum();
            vec![s; d]
        }
        CrossKind::FullRank => (0..d)
            .map(|j| {
                let w = &net.w[l * d * d + j * d..][..d];
                net.b[l * d + j] as f64 + (0..d).map(|k| w[k] as f64 * xl[k]).sum::<f64>()
            })
            .collect(),
    }
}

/// x_0 .. x_L of one sample (x0 given as d values).
fn layers_of(net: &CrossNet, x0: &[f64]) -> Vec<Vec<f64>> {
    let d = net.dim;
    let mut xs = vec![x0.to_vec()];
    for l in 0..net.layers {
        let xl = &xs[l];
        let u = layer_u(net, l, xl);
        let rank_one_bias = |k: usize| match net.kind {
            CrossKind::RankOne => net.b[l * d + k] as f64,
            CrossKind::FullRank => 0.0,
        };
        let next = (0..d)
            .map(|k| x0[k] * u[k] + rank_one_bias(k) + xl[k])
            .collect();
        xs.push(next);
    }
    xs
}

fn row(x: &[f32], b: usize, stride: usize, d: usize) -> Vec<f64> {
    x[b * stride..][..d].iter().map(|&v| v as f64).collect()
}

/// Twin of [`crate::cross::cross_forward`]: `out` rows = x_L (no saved values).
pub fn cross_forward(
    net: &CrossNet,
    x0: &[f32],
    x0_stride: usize,
    batch: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let d = net.dim;
    for b in 0..batch {
        let xs = layers_of(net, &row(x0, b, x0_stride, d));
        for (o, v) in out[b * out_stride..][..d].iter_mut().zip(&xs[net.layers]) {
            *o = *v as f32;
        }
    }
}

/// Twin of [`crate::cross::cross_backward`]: returns (dx0 rows of d, dw, db), every path
/// written out in f64, the parameter gradients summed over the batch.
pub fn cross_backward(
    net: &CrossNet,
    x0: &[f32],
    x0_stride: usize,
    batch: usize,
    grad_out: &[f32],
    grad_out_stride: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = net.dim;
    let mut dx0_all = vec![0.0f64; batch * d];
    let mut dw = vec![0.0f64; net.w.len()];
    let mut db = vec![0.0f64; net.b.len()];
    for b in 0..batch {
        let x0b = row(x0, b, x0_stride, d);
        let xs = layers_of(net, &x0b);
        let mut g = row(grad_out, b, grad_out_stride, d);
        let dx0 = &mut dx0_all[b * d..(b + 1) * d];
        for l in (0..net.layers).rev() {
            let xl = &xs[l];
            let u = layer_u(net, l, xl);
            // x_{l+1} = x0 ⊙ u + x_l (+ b_l for rank one): the x0 path.
            for k in 0..d {
                dx0[k] += g[k] * u[k];
            }
            // du_k = g_k x0_k; the x_l path through u, and the parameters.
            let du: Vec<f64> = (0..d).map(|k| g[k] * x0b[k]).collect();
            let mut next = g.clone();
            match net.kind {
                CrossKind::RankOne => {
                    // u = (x_l . w_l) everywhere: d u_k / d x_l = w_l, d u_k / d w_l = x_l.
                    let c: f64 = du.iter().sum();
                    for k in 0..d {
                        next[k] += c * net.w[l * d + k] as f64;
                        dw[l * d + k] += c * xl[k];
                        db[l * d + k] += g[k];
                    }
                }
                CrossKind::FullRank => {
                    for j in 0..d {
                        db[l * d + j] += du[j];
                        for k in 0..d {
                            let w = net.w[l * d * d + j * d + k] as f64;
                            next[k] += du[j] * w;
                            dw[l * d * d + j * d + k] += du[j] * xl[k];
                        }
                    }
                }
            }
            g = next;
        }
        for k in 0..d {
            dx0[k] += g[k];
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f(dx0_all), f(dw), f(db))
}
