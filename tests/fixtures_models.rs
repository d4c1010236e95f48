//! The DCN, DCN-v2 and factorization-machine kernels against PyTorch (dcn_cross, dcn_v2_cross,
//! fm_second_order): forward outputs, every intermediate layer, and the gradients of the inputs
//! and parameters, the FM's latent and first-order gradients going through the same coalescing
//! the fused sparse update uses. Every size is read from the fixture's tensors.

mod common;

use common::fixtures::{self, Fixture};
use dlrm::kernels::cross::{
    CrossGrads, CrossKind, CrossNet, CrossWorkspace, cross_backward, cross_forward,
};
use dlrm::kernels::embedding::{
    Bags, Pooling, SparseGradWorkspace, embedding_bag_backward_coalesce,
};
use dlrm::kernels::fm::{FmField, fm_backward, fm_forward};
use dlrm::kernels::mat::{MatMut, MatRef};
use dlrm::kernels::parallel::Par;

/// (output, saved) of the first `layers` layers of the fixture's network on its x0.
fn forward(net: &CrossNet, x0: &[f32], batch: usize) -> (Vec<f32>, Vec<f32>) {
    let d = net.dim;
    let mut saved = vec![0.0; net.kind.saved_len(d, net.layers, batch)];
    let mut out = vec![f32::NAN; batch * d];
    cross_forward(
        net,
        MatRef::new(x0, batch, d),
        &mut saved,
        MatMut::new(&mut out, batch, d),
        Par::Rayon,
    );
    (out, saved)
}

fn check_cross(case: &str, kind: CrossKind) {
    let fx: Fixture = fixtures::load(case);
    let (batch, d) = match fx.shape("x0") {
        &[b, d] => (b, d),
        s => panic!("{case}: x0 has shape {s:?}"),
    };
    let layers = fx.shape("b")[0];
    let (x0, w, b) = (fx.f32("x0"), fx.f32("w"), fx.f32("b"));
    let per_layer = kind.weight_len(d, 1);
    let net = |l: usize| CrossNet {
        kind,
        dim: d,
        layers: l,
        w: &w[..l * per_layer],
        b: &b[..l * d],
    };
    // x_1 .. x_L: the outputs of the first l layers.
    let x_layers: Vec<f32> = (1..=layers)
        .flat_map(|l| forward(&net(l), x0, batch).0)
        .collect();
    fx.assert_close("x_layers", &x_layers);
    let full = net(layers);
    let (out, saved) = forward(&full, x0, batch);
    fx.assert_close("output", &out);

    let mut gx = vec![0.0; batch * d];
    let (mut dw, mut db) = (vec![0.0; w.len()], vec![0.0; b.len()]);
    cross_backward(
        &full,
        MatRef::new(x0, batch, d),
        &saved,
        MatRef::new(fx.f32("grad_output"), batch, d),
        CrossGrads {
            x0: MatMut::new(&mut gx, batch, d),
            accumulate_x0: false,
            w: &mut dw,
            b: &mut db,
        },
        &mut CrossWorkspace::default(),
        Par::Rayon,
    );
    fx.assert_close("grad_x0", &gx);
    fx.assert_close("grad_w", &dw);
    fx.assert_close("grad_b", &db);
}

#[test]
fn dcn_cross_matches_pytorch() {
    check_cross("dcn_cross", CrossKind::RankOne);
}

#[test]
fn dcn_v2_cross_matches_pytorch() {
    check_cross("dcn_v2_cross", CrossKind::FullRank);
}

/// The fixture's x as one FM field: every sample's bag holds the features chosen by `keep`
/// (all of them, or only the nonzero ones), their values as per-sample weights.
fn fm_bags(x: &[f32], batch: usize, n: usize, keep: impl Fn(f32) -> bool) -> [Vec<u32>; 2] {
    let (mut offsets, mut indices) = (Vec::new(), Vec::new());
    for s in 0..batch {
        offsets.push(indices.len() as u32);
        indices.extend((0..n as u32).filter(|&i| keep(x[s * n + i as usize])));
    }
    [offsets, indices]
}

#[test]
fn fm_second_order_matches_pytorch() {
    let fx = fixtures::load("fm_second_order");
    let (batch, n) = match fx.shape("x") {
        &[b, n] => (b, n),
        s => panic!("x has shape {s:?}"),
    };
    let k = fx.shape("V")[1];
    let (x, v, w, g) = (fx.f32("x"), fx.f32("V"), fx.f32("w"), fx.f32("grad_output"));
    let w0 = fx.scalar("w0");
    // All features (zeros included, which must give exactly zero parameter gradients), then
    // only the nonzero ones (what a sparse data set holds).
    for dense in [true, false] {
        let [offsets, indices] = fm_bags(x, batch, n, |xi| dense || xi != 0.0);
        let values: Vec<f32> = offsets
            .iter()
            .enumerate()
            .flat_map(|(s, _)| {
                let start = offsets[s] as usize;
                let end = offsets.get(s + 1).map_or(indices.len(), |&e| e as usize);
                indices[start..end]
                    .iter()
                    .map(move |&i| x[s * n + i as usize])
            })
            .collect();
        let field = FmField {
            factors: v,
            linear: w,
            bags: Bags::with_offsets(&indices, &offsets).with_weights(Some(&values)),
        };
        let (mut sums, mut out) = (vec![0.0; batch * k], vec![0.0; batch]);
        fm_forward(1, k, |_| field, w0, &mut sums, &mut out, Par::Rayon);
        fx.assert_close("output", &out);

        let nnz = indices.len();
        let (mut rows, mut gx) = (vec![0.0; nnz * k], vec![0.0; nnz]);
        fm_backward(
            field,
            MatRef::new(&sums, field.bags.len(), k),
            g,
            &mut rows,
            Some(&mut gx),
            Par::Rayon,
        );
        if dense {
            fx.assert_close("grad_x", &gx);
        }
        // The latent gradient as the sparse update sees it: one bag per position, coalesced.
        let unit: Vec<u32> = (0..nnz as u32).collect();
        let one_each = Bags::with_offsets(&indices, &unit);
        let dense_of = |dim: usize, bags: Bags, grad: &[f32]| {
            let mut ws = SparseGradWorkspace::default();
            let c = embedding_bag_backward_coalesce(
                n,
                bags,
                Pooling::Sum,
                MatRef::new(grad, bags.len(), dim),
                &mut ws,
                Par::Rayon,
            );
            let mut table = vec![0.0; n * dim];
            for (&r, gr) in c.rows.iter().zip(c.grads.chunks(dim)) {
                table[r as usize * dim..][..dim].copy_from_slice(gr);
            }
            table
        };
        fx.assert_close("grad_V", &dense_of(k, one_each, &rows));
        // The first-order gradient: the output gradient pooled with the feature values.
        fx.assert_close("grad_w", &dense_of(1, field.bags, g));
    }
}
