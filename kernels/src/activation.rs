//! Activations and losses: sigmoid, binary cross-entropy with logits, squared error, and their
//! gradients. (ReLU
//! and its gradient are fused into the GEMM epilogue and operand read, see
//! [`crate::gemm::GemmOps`].)
//!
//! Everything is computed from e = exp(-|z|), which lies in (0, 1] for every finite z, so
//! nothing overflows: sigmoid(z) = 1 / (1 + e) for z >= 0 and e / (1 + e) for z < 0, and
//! ln(1 + exp(-|z|)) = ln_1p(e) keeps its accuracy when e is tiny. These kernels run on one
//! value per sample, a few dozen operations each, far below the cost of the MLPs on the same
//! batch, so they are serial (a fork-join would cost more than the work).

use crate::isa::Isa;
use crate::simd::{MAX_LANES, SimdVec, dispatch};

/// Runs `f` over the inputs LANES elements at a time and stores what it returns into the
/// outputs. The tail is a zero-filled masked load and a masked store; `f` is also told how
/// many lanes hold real elements.
#[inline(always)]
fn map_vectors<V: SimdVec, const I: usize, const O: usize>(
    kernel: &str,
    inputs: [&[f32]; I],
    mut outputs: [&mut [f32]; O],
    mut f: impl FnMut([V; I], usize) -> [V; O],
) {
    let n = inputs.first().map_or(0, |x| x.len());
    for (q, x) in inputs.iter().enumerate() {
        assert_eq!(
            x.len(),
            n,
            "{kernel}: input {q} has {} values, not {n}",
            x.len()
        );
    }
    for (q, y) in outputs.iter().enumerate() {
        assert_eq!(
            y.len(),
            n,
            "{kernel}: output {q} has {} values, not {n}",
            y.len()
        );
    }
    let mut k = 0;
    while k < n {
        let w = V::LANES.min(n - k);
        let x: [V; I] = core::array::from_fn(|q| V::from_slice(&inputs[q][k..k + w]));
        let y = f(x, w);
        for (out, v) in outputs.iter_mut().zip(y) {
            v.store_to(&mut out[k..k + w]);
        }
        k += w;
    }
}

/// exp(-|z|), in (0, 1] for every finite z.
#[inline(always)]
fn exp_neg_abs<V: SimdVec>(z: V) -> V {
    (-z.abs()).exp()
}

/// The numerators of sigmoid(z) and 1 - sigmoid(z) over the common denominator 1 + e, with
/// e = exp(-|z|): (1, e) for z >= 0, (e, 1) for z < 0. Both are accurate (no 1 - p
/// cancellation) and neither overflows.
#[inline(always)]
fn sigmoid_parts<V: SimdVec>(z: V, e: V) -> (V, V) {
    let one = V::splat(1.0);
    let nonneg = z.simd_ge(V::splat(0.0));
    (nonneg.select(one, e), nonneg.select(e, one))
}

/// sigmoid(z) from e = exp(-|z|), without overflow at either end.
#[inline(always)]
fn sigmoid_from<V: SimdVec>(z: V, e: V) -> V {
    sigmoid_parts(z, e).0 / (V::splat(1.0) + e)
}

/// Numerically stable BCE with logits, fused with the gradient of the MEAN loss:
/// `loss_i = max(z, 0) - z * y + ln(1 + exp(-|z|))`; `probs[i] = sigmoid(z_i)`;
/// `grad_logits[i] = (sigmoid(z_i) - y_i) * grad_scale` (the caller passes 1/N for a batch
/// mean). Returns the SUM of loss_i, accumulated in f64. Stable at z = ±100 (no inf/NaN).
///
/// The gradient is evaluated as `((1 - y) p - y (1 - p))` with p and 1 - p each taken from
/// e = exp(-|z|), so that a confident correct prediction (p near y) keeps its small gradient
/// to full relative precision instead of losing it to the cancellation in p - y.
/// Runs on [`Isa::selected`].
pub fn bce_with_logits(
    logits: &[f32],
    labels: &[f32],
    probs: &mut [f32],
    grad_logits: &mut [f32],
    grad_scale: f32,
) -> f64 {
    let isa = Isa::selected();
    bce_with_logits_with_isa(isa, logits, labels, probs, grad_logits, grad_scale)
}

/// [`bce_with_logits`] on `isa` (panics if the CPU lacks it).
pub fn bce_with_logits_with_isa(
    isa: Isa,
    logits: &[f32],
    labels: &[f32],
    probs: &mut [f32],
    grad_logits: &mut [f32],
    grad_scale: f32,
) -> f64 {
    dispatch!(isa, V => bce_lanes::<V>(logits, labels, probs, grad_logits, grad_scale))
}

#[inline(always)]
fn bce_lanes<V: SimdVec>(
    logits: &[f32],
    labels: &[f32],
    probs: &mut [f32],
    grad_logits: &mut [f32],
    grad_scale: f32,
) -> f64 {
    let scale = V::splat(grad_scale);
    let (zero, one) = (V::splat(0.0), V::splat(1.0));
    // One f64 partial sum per lane, added in lane order at the end.
    let mut sums = [0.0f64; MAX_LANES];
    map_vectors::<V, 2, 2>(
        "bce_with_logits",
        [logits, labels],
        [probs, grad_logits],
        #[inline(always)]
        |[z, y], w| {
            let e = exp_neg_abs(z);
            let (p_num, q_num) = sigmoid_parts(z, e);
            let inv = one / (one + e);
            let loss = (z.max(zero) - z * y) + e.ln_1p();
            for (s, l) in sums.iter_mut().zip(loss.to_lanes()).take(w) {
                *s += f64::from(l);
            }
            let grad = (one - y).mul_sub(p_num, y * q_num) * inv;
            [p_num * inv, grad * scale]
        },
    );
    sums.iter().sum()
}

/// Squared error of a regression, fused with its gradient: `grad[i] = (pred[i] - target[i]) *
/// grad_scale` (the caller passes 2/N for the gradient of the mean over a batch). Returns the
/// SUM of `(pred[i] - target[i])^2`, accumulated in f64. Runs on [`Isa::selected`].
pub fn squared_error(pred: &[f32], target: &[f32], grad: &mut [f32], grad_scale: f32) -> f64 {
    squared_error_with_isa(Isa::selected(), pred, target, grad, grad_scale)
}

/// [`squared_error`] on `isa` (panics if the CPU lacks it).
pub fn squared_error_with_isa(
    isa: Isa,
    pred: &[f32],
    target: &[f32],
    grad: &mut [f32],
    grad_scale: f32,
) -> f64 {
    dispatch!(isa, V => squared_error_lanes::<V>(pred, target, grad, grad_scale))
}

#[inline(always)]
fn squared_error_lanes<V: SimdVec>(
    pred: &[f32],
    target: &[f32],
    grad: &mut [f32],
    grad_scale: f32,
) -> f64 {
    let scale = V::splat(grad_scale);
    let mut sums = [0.0f64; MAX_LANES];
    map_vectors::<V, 2, 1>(
        "squared_error",
        [pred, target],
        [grad],
        #[inline(always)]
        |[p, t], w| {
            let e = p - t;
            for (s, x) in sums.iter_mut().zip(e.to_lanes()).take(w) {
                *s += f64::from(x) * f64::from(x);
            }
            [e * scale]
        },
    );
    sums.iter().sum()
}

/// `out[i] = 1 / (1 + exp(-x[i]))`, without overflow for any finite x, on [`Isa::selected`].
pub fn sigmoid(x: &[f32], out: &mut [f32]) {
    sigmoid_with_isa(Isa::selected(), x, out)
}

/// [`sigmoid`] on `isa` (panics if the CPU lacks it).
pub fn sigmoid_with_isa(isa: Isa, x: &[f32], out: &mut [f32]) {
    dispatch!(isa, V => map_vectors::<V, 1, 1>("sigmoid", [x], [out], #[inline(always)] |[z], _| {
        [sigmoid_from(z, exp_neg_abs(z))]
    }))
}

/// Backward of [`sigmoid`] from its output p: `grad_logits[i] = grad_probs[i] * p (1 - p)`,
/// on [`Isa::selected`].
pub fn sigmoid_backward(probs: &[f32], grad_probs: &[f32], grad_logits: &mut [f32]) {
    sigmoid_backward_with_isa(Isa::selected(), probs, grad_probs, grad_logits)
}

/// [`sigmoid_backward`] on `isa` (panics if the CPU lacks it).
pub fn sigmoid_backward_with_isa(
    isa: Isa,
    probs: &[f32],
    grad_probs: &[f32],
    grad_logits: &mut [f32],
) {
    dispatch!(isa, V => {
        let one = V::splat(1.0);
        map_vectors::<V, 2, 1>(
            "sigmoid_backward",
            [probs, grad_probs],
            [grad_logits],
            #[inline(always)] |[p, g], _| [g * p * (one - p)],
        )
    })
}
