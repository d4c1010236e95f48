//! Scalar twins of the factorization-machine kernels: Rendle's pairwise definition, in f64.

use crate::fm::FmField;

/// The (row id, value) features of sample `b` in a field.
fn features(f: &FmField, b: usize) -> Vec<(usize, f64)> {
    f.bags
        .bag(b)
        .map(|p| {
            let x = f.bags.weights().map_or(1.0, |w| w[p] as f64);
            (f.bags.indices()[p] as usize, x)
        })
        .collect()
}

/// Twin of [`crate::fm::fm_forward`]: `out[b] = bias + sum_p x_p w_p + sum_{p < q} <v_p, v_q>
/// x_p x_q` over all features of sample b (the O(k n^2) pairwise form), and `sums[b]` =
/// sum_p x_p v_p.
pub fn fm_forward(fields: &[FmField], k: usize, bias: f32, sums: &mut [f32], out: &mut [f32]) {
    for (b, o) in out.iter_mut().enumerate() {
        let feats: Vec<(&[f32], f64, f64)> = fields
            .iter()
            .flat_map(|f| {
                features(f, b)
                    .into_iter()
                    .map(move |(id, x)| (&f.factors[id * k..(id + 1) * k], x, f.linear[id] as f64))
            })
            .collect();
        let mut y = bias as f64;
        for (p, &(vp, xp, wp)) in feats.iter().enumerate() {
            y += xp * wp;
            for &(vq, xq, _) in &feats[p + 1..] {
                let dot: f64 = (0..k).map(|f| vp[f] as f64 * vq[f] as f64).sum();
                y += dot * xp * xq;
            }
        }
        *o = y as f32;
        for (f, s) in sums[b * k..(b + 1) * k].iter_mut().enumerate() {
            *s = feats.iter().map(|&(v, x, _)| x * v[f] as f64).sum::<f64>() as f32;
        }
    }
}

/// Twin of [`crate::fm::fm_backward`] for field `t` of `fields`: the latent gradient of every
/// position (sum over the other features q of the sample of g x_p x_q v_q) and the gradient
/// of every feature value (g (w_p + sum_q x_q <v_p, v_q>)), from scratch (no sums).
pub fn fm_backward(
    fields: &[FmField],
    t: usize,
    k: usize,
    grad_out: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let field = &fields[t];
    let nnz = field.bags.indices().len();
    let mut rows = vec![0.0f32; nnz * k];
    let mut gw = vec![0.0f32; nnz];
    for (b, &g) in grad_out.iter().enumerate() {
        let g = g as f64;
        // Every feature of the sample, tagged (field, position).
        let all: Vec<(usize, usize, usize, f64)> = fields
            .iter()
            .enumerate()
            .flat_map(|(u, f)| {
                f.bags.bag(b).map(move |p| {
                    let x = f.bags.weights().map_or(1.0, |w| w[p] as f64);
                    (u, p, f.bags.indices()[p] as usize, x)
                })
            })
            .collect();
        for p in field.bags.bag(b) {
            let id = field.bags.indices()[p] as usize;
            let xp = field.bags.weights().map_or(1.0, |w| w[p] as f64);
            let vp = &field.factors[id * k..(id + 1) * k];
            let mut dv = vec![0.0f64; k];
            let mut dx = field.linear[id] as f64;
            for &(u, q, idq, xq) in &all {
                if u == t && q == p {
                    continue;
                }
                let vq = &fields[u].factors[idq * k..(idq + 1) * k];
                for f in 0..k {
                    dv[f] += xp * xq * vq[f] as f64;
                    dx += xq * vp[f] as f64 * vq[f] as f64;
                }
            }
            for (o, v) in rows[p * k..(p + 1) * k].iter_mut().zip(&dv) {
                *o = (g * v) as f32;
            }
            gw[p] = (g * dx) as f32;
        }
    }
    (rows, gw)
}
