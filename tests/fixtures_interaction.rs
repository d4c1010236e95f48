//! The interaction, loss and MLP kernels against PyTorch: fixtures interaction_dot,
//! interaction_dot_self, interaction_cat, bce_with_logits, mlp and mlp_sigmoid. Every size is
//! read from the tensors.

mod common;

use common::fixtures::{self, Fixture};
use dlrm::kernels::activation;
use dlrm::kernels::gemm::{
    MatMut, MatRef, Precision, bias_grad, linear_backward_input, linear_backward_weight,
    linear_forward,
};
use dlrm::kernels::interaction;
use dlrm::kernels::parallel::Par;

/// The inputs `x`, `emb_0`, `emb_1`, ... (each batch x d) in the model's layout: per sample
/// the F = 1 + tables vectors contiguous, samples `stride` apart.
struct Features {
    names: Vec<String>,
    batch: usize,
    d: usize,
    stride: usize,
    data: Vec<f32>,
}

impl Features {
    fn load(fx: &Fixture) -> Features {
        let (batch, d) = (fx.shape("x")[0], fx.shape("x")[1]);
        let tables = (0..).take_while(|t| fx.has(&format!("emb_{t}"))).count();
        let names: Vec<String> = std::iter::once("x".to_string())
            .chain((0..tables).map(|t| format!("emb_{t}")))
            .collect();
        let stride = names.len() * d;
        let mut data = vec![0.0; batch * stride];
        for (i, name) in names.iter().enumerate() {
            assert_eq!(fx.shape(name), [batch, d], "{name}");
            for (b, v) in fx.f32(name).chunks(d).enumerate() {
                data[b * stride + i * d..][..d].copy_from_slice(v);
            }
        }
        Features {
            names,
            batch,
            d,
            stride,
            data,
        }
    }

    fn f(&self) -> usize {
        self.names.len()
    }

    /// Compares a gradient in this layout with `grad_x`, `grad_emb_0`, ...
    fn check_grads(&self, fx: &Fixture, grad: &[f32]) {
        for (i, name) in self.names.iter().enumerate() {
            let g: Vec<f32> = (0..self.batch)
                .flat_map(|b| {
                    grad[b * self.stride + i * self.d..][..self.d]
                        .iter()
                        .copied()
                })
                .collect();
            fx.assert_close(&format!("grad_{name}"), &g);
        }
    }
}

fn check_dot(case: &str) {
    let fx = fixtures::load(case);
    let self_interaction = fx.config_bool("interaction_itself");
    let ft = Features::load(&fx);
    let (batch, f, d) = (ft.batch, ft.f(), ft.d);

    let pairs: Vec<(i64, i64)> = fx
        .i64("pairs_i")
        .iter()
        .copied()
        .zip(fx.i64("pairs_j").iter().copied())
        .collect();
    let ours: Vec<(i64, i64)> = interaction::pairs(f, self_interaction)
        .map(|(i, j)| (i as i64, j as i64))
        .collect();
    assert_eq!(ours, pairs, "{case}: pair order");

    let width = d + interaction::num_pairs(f, self_interaction);
    assert_eq!(fx.shape("output"), [batch, width]);
    let mut out = vec![f32::NAN; batch * width];
    let features = MatRef::with_row_stride(&ft.data, batch, f * d, ft.stride);
    let out_view = MatMut::new(&mut out, batch, width);
    interaction::dot_interaction_forward(features, f, self_interaction, out_view, Par::Rayon);
    fx.assert_close("output", &out);

    let mut grad = vec![f32::NAN; batch * ft.stride];
    interaction::dot_interaction_backward(
        features,
        f,
        self_interaction,
        MatRef::new(fx.f32("grad_output"), batch, width),
        MatMut::with_row_stride(&mut grad, batch, f * d, ft.stride),
        Par::Rayon,
    );
    ft.check_grads(&fx, &grad);
}

#[test]
fn interaction_dot() {
    check_dot("interaction_dot");
}

#[test]
fn interaction_dot_self() {
    check_dot("interaction_dot_self");
}

#[test]
fn interaction_cat() {
    let fx = fixtures::load("interaction_cat");
    let ft = Features::load(&fx);
    let (batch, f, d) = (ft.batch, ft.f(), ft.d);
    assert_eq!(fx.shape("output"), [batch, f * d]);
    let mut out = vec![f32::NAN; batch * f * d];
    interaction::cat_interaction_forward(
        MatRef::with_row_stride(&ft.data, batch, f * d, ft.stride),
        MatMut::new(&mut out, batch, f * d),
        Par::Rayon,
    );
    fx.assert_close("output", &out);
    let mut grad = vec![f32::NAN; batch * ft.stride];
    interaction::cat_interaction_backward(
        MatRef::new(fx.f32("grad_output"), batch, f * d),
        MatMut::with_row_stride(&mut grad, batch, f * d, ft.stride),
        Par::Rayon,
    );
    ft.check_grads(&fx, &grad);
}

#[test]
fn bce_with_logits() {
    let fx = fixtures::load("bce_with_logits");
    let (z, y) = (fx.f32("logits"), fx.f32("labels"));
    let n = z.len();
    let (mut p, mut g) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    let sum = activation::bce_with_logits(z, y, &mut p, &mut g, 1.0 / n as f32);
    fx.assert_close("sigmoid", &p);
    fx.assert_close("grad_logits", &g);
    fx.assert_close("loss_mean", &[(sum / n as f64) as f32]);
    // The kernel returns the sum of the losses: one call per sample gives each one.
    let per_sample: Vec<f32> = (0..n)
        .map(|i| {
            let (mut p, mut g) = ([0.0], [0.0]);
            activation::bce_with_logits(&z[i..=i], &y[i..=i], &mut p, &mut g, 1.0) as f32
        })
        .collect();
    fx.assert_close("loss_per_sample", &per_sample);
}

/// A fully connected stack: ReLU after every layer but the last; the last is linear or
/// followed by a sigmoid (config `final_activation`). Forward with the ReLU fused into the
/// GEMM epilogue, backward with the ReLU mask fused into the read of dY.
fn check_mlp(case: &str) {
    let fx = fixtures::load(case);
    let layers = (0..).take_while(|l| fx.has(&format!("w{l}"))).count();
    let sigmoid = match fx.config_str("final_activation") {
        "sigmoid" => true,
        "none" => false,
        other => panic!("{case}: final activation {other}"),
    };
    let batch = fx.shape("x")[0];
    let weight = |l: usize| {
        let name = format!("w{l}");
        let s = fx.shape(&name);
        MatRef::new(fx.f32(&name), s[0], s[1])
    };
    let bias = |l: usize| fx.f32(&format!("b{l}"));

    // acts[l] is the input of layer l; the last entry is the output of the last layer.
    let mut acts = vec![fx.f32("x").to_vec()];
    for l in 0..layers {
        let w = weight(l);
        let input = MatRef::new(&acts[l], batch, w.cols());
        let hidden = l + 1 < layers;
        if hidden {
            let mut z = vec![f32::NAN; batch * w.rows()];
            linear_forward(
                input,
                w,
                Some(bias(l)),
                false,
                MatMut::new(&mut z, batch, w.rows()),
                Precision::F32,
                Par::Rayon,
            );
            fx.assert_close(&format!("preact_{l}"), &z);
        }
        let mut y = vec![f32::NAN; batch * w.rows()];
        linear_forward(
            input,
            w,
            Some(bias(l)),
            hidden,
            MatMut::new(&mut y, batch, w.rows()),
            Precision::F32,
            Par::Rayon,
        );
        acts.push(y);
    }
    let last = acts.last().expect("one layer at least");
    let out_width = weight(layers - 1).rows();
    let mut dy = fx.f32("grad_output").to_vec();
    if sigmoid {
        fx.assert_close("last_linear", last);
        let mut probs = vec![f32::NAN; last.len()];
        activation::sigmoid(last, &mut probs);
        fx.assert_close("output", &probs);
        let grad_probs = dy.clone();
        activation::sigmoid_backward(&probs, &grad_probs, &mut dy);
    } else {
        fx.assert_close("output", last);
    }
    assert_eq!(dy.len(), batch * out_width);

    for l in (0..layers).rev() {
        let w = weight(l);
        let dy_view = MatRef::new(&dy, batch, w.rows());
        // A hidden layer's output is the ReLU mask of its gradient.
        let mask = (l + 1 < layers).then(|| MatRef::new(&acts[l + 1], batch, w.rows()));
        let input = MatRef::new(&acts[l], batch, w.cols());
        let mut dw = vec![f32::NAN; w.rows() * w.cols()];
        linear_backward_weight(
            dy_view,
            mask,
            input,
            MatMut::new(&mut dw, w.rows(), w.cols()),
            false,
            Precision::F32,
            Par::Rayon,
        );
        fx.assert_close(&format!("grad_w{l}"), &dw);
        let mut db = vec![f32::NAN; w.rows()];
        bias_grad(dy_view, mask, &mut db, false, Par::Rayon);
        fx.assert_close(&format!("grad_b{l}"), &db);
        let mut dx = vec![f32::NAN; batch * w.cols()];
        linear_backward_input(
            dy_view,
            mask,
            w,
            MatMut::new(&mut dx, batch, w.cols()),
            Precision::F32,
            Par::Rayon,
        );
        dy = dx;
    }
    fx.assert_close("grad_x", &dy);
}

#[test]
fn mlp() {
    check_mlp("mlp");
}

#[test]
fn mlp_sigmoid() {
    check_mlp("mlp_sigmoid");
}
