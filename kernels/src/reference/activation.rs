//! Scalar twins of the activation kernels.

/// Twin of [`crate::activation::bce_with_logits`], in f64 (where the textbook formulas are
/// accurate over the whole range the tests use).
pub fn bce_with_logits(
    logits: &[f32],
    labels: &[f32],
    probs: &mut [f32],
    grad_logits: &mut [f32],
    grad_scale: f32,
) -> f64 {
    let mut sum = 0.0f64;
    for i in 0..logits.len() {
        let (z, y) = (logits[i] as f64, labels[i] as f64);
        // p and 1 - p, each without cancellation.
        let (p, q) = (1.0 / (1.0 + (-z).exp()), 1.0 / (1.0 + z.exp()));
        sum += z.max(0.0) - z * y + (-z.abs()).exp().ln_1p();
        probs[i] = p as f32;
        grad_logits[i] = (((1.0 - y) * p - y * q) * grad_scale as f64) as f32;
    }
    sum
}

/// Twin of [`crate::activation::sigmoid`].
pub fn sigmoid(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (1.0 / (1.0 + (-(v as f64)).exp())) as f32;
    }
}

/// Twin of [`crate::activation::sigmoid_backward`].
pub fn sigmoid_backward(probs: &[f32], grad_probs: &[f32], grad_logits: &mut [f32]) {
    for i in 0..probs.len() {
        let p = probs[i] as f64;
        grad_logits[i] = (grad_probs[i] as f64 * p * (1.0 - p)) as f32;
    }
}

/// Twin of [`crate::activation::squared_error`], in f64.
pub fn squared_error(pred: &[f32], target: &[f32], grad: &mut [f32], grad_scale: f32) -> f64 {
    let mut sum = 0.0f64;
    for i in 0..pred.len() {
        let e = pred[i] as f64 - target[i] as f64;
        sum += e * e;
        grad[i] = (e * grad_scale as f64) as f32;
    }
    sum
}
