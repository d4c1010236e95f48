//! The click loss of the classification head, as the reference's `--loss-function` chooses
//! it: binary cross-entropy (`bce`), the squared error of the probability (`mse`), or BCE with
//! one weight per label value (`wbce`, `--loss-weights`); each optionally with the
//! probability clamped to `[threshold, 1 - threshold]` (`--loss-threshold`), as the
//! reference's `DLRM_Net` clamps `sigmoid(z)` before its `torch.nn.BCELoss`/`MSELoss`.

use crate::names::{Choice, Field, FieldError, choice_names};
use dlrm_kernels::activation::bce_with_logits;
use serde::{Deserialize, Serialize};

/// The reference's `--loss-function` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossFunction {
    Bce,
    Mse,
    Wbce,
}

impl Choice for LossFunction {
    const ALL: &'static [LossFunction] =
        &[LossFunction::Bce, LossFunction::Mse, LossFunction::Wbce];
    fn name(self) -> &'static str {
        match self {
            LossFunction::Bce => "bce",
            LossFunction::Mse => "mse",
            LossFunction::Wbce => "wbce",
        }
    }
    fn help(self) -> &'static str {
        match self {
            LossFunction::Bce => "Binary cross-entropy of sigmoid(z) and the label",
            LossFunction::Mse => "Squared error of sigmoid(z) and the label",
            LossFunction::Wbce => "BCE times the weight of the label's value (--loss-weights)",
        }
    }
}

choice_names!(LossFunction);

/// The loss of a click model's output `z` against a label `y` in {0, 1}.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClickLoss {
    pub function: LossFunction,
    /// Weights of label 0 and label 1 (`wbce` only; the reference's `--loss-weights=w0-w1`).
    pub weights: [f32; 2],
    /// In (0, 1): the probability is clamped to `[threshold, 1 - threshold]` (no gradient
    /// flows through a clamped value); other values leave it as it is.
    pub threshold: f32,
}

impl Default for ClickLoss {
    /// Plain BCE, the loss every click model trains with unless told otherwise.
    fn default() -> ClickLoss {
        ClickLoss {
            function: LossFunction::Bce,
            weights: [1.0, 1.0],
            threshold: 0.0,
        }
    }
}

/// `torch.nn.BCELoss` clamps each log to at least -100, so that a probability of 0 or 1
/// costs 100, not infinity.
const MIN_LOG: f64 = -100.0;

impl ClickLoss {
    /// Refuses weights that are not finite and non-negative, and a `wbce` without them.
    pub fn check(&self) -> Result<(), FieldError> {
        let [w0, w1] = self.weights;
        if !(w0.is_finite() && w1.is_finite() && w0 >= 0.0 && w1 >= 0.0) {
            return Err(FieldError::new(move |n| {
                format!(
                    "{}: weights {w0}-{w1} must be finite and non-negative",
                    n(Field::Named("--loss-weights"))
                )
            }));
        }
        if !self.threshold.is_finite() {
            return Err(FieldError::new(|n| {
                format!("{} must be a number", n(Field::Named("--loss-threshold")))
            }));
        }
        Ok(())
    }

    /// Whether the threshold clamps (it does for values strictly between 0 and 1, as in the
    /// reference).
    fn clamps(&self) -> bool {
        0.0 < self.threshold && self.threshold < 1.0
    }

    /// The sum over the batch of the loss of logits `z` against `labels`, with the gradient
    /// of the batch's mean loss with respect to each logit in `grad` (scaled by `grad_scale`,
    /// 1 / batch) and sigmoid(z) in `probs`. Plain BCE runs the fused SIMD kernel; the other
    /// losses (O(batch) scalar work beside the MLPs' O(batch x width^2)) run
    /// [`ClickLoss::scalar`].
    pub fn apply(
        &self,
        z: &[f32],
        labels: &[f32],
        probs: &mut [f32],
        grad: &mut [f32],
        grad_scale: f32,
    ) -> f64 {
        if self.function == LossFunction::Bce && !self.clamps() {
            return bce_with_logits(z, labels, probs, grad, grad_scale);
        }
        let mut sum = 0.0f64;
        for (((&z, &y), p_out), g) in z.iter().zip(labels).zip(probs).zip(grad) {
            let (loss, dz) = self.scalar(z, y);
            sum += loss;
            *p_out = sigmoid(f64::from(z)) as f32;
            *g = dz * grad_scale;
        }
        sum
    }

    /// One sample's loss and its derivative with respect to the logit z. With p = sigmoid(z)
    /// and c = clamp(p): BCE = -(y ln c + (1 - y) ln(1 - c)), whose derivative through
    /// dp/dz = p (1 - p) is p - y where c = p; MSE = (c - y)^2, derivative
    /// 2 (p - y) p (1 - p); `wbce` multiplies BCE by the weight of the label (the reference
    /// indexes its weights by the label truncated to an integer). A clamped c passes no
    /// gradient.
    pub fn scalar(&self, z: f32, y: f32) -> (f64, f32) {
        let p = sigmoid(f64::from(z));
        let y64 = f64::from(y);
        let (c, inside) = if self.clamps() {
            let t = f64::from(self.threshold);
            let c = p.clamp(t, 1.0 - t);
            (c, c == p)
        } else {
            (p, true)
        };
        let pass = if inside { 1.0 } else { 0.0 };
        let bce = || -(y64 * c.ln().max(MIN_LOG) + (1.0 - y64) * (1.0 - c).ln().max(MIN_LOG));
        let (loss, dz) = match self.function {
            LossFunction::Bce => (bce(), (p - y64) * pass),
            LossFunction::Mse => ((c - y64).powi(2), 2.0 * (p - y64) * p * (1.0 - p) * pass),
            LossFunction::Wbce => {
                let w = f64::from(self.weights[usize::from(y >= 1.0)]);
                (w * bce(), w * (p - y64) * pass)
            }
        };
        (loss, dz as f32)
    }
}

/// The logistic function, computed without overflow for large |z|.
fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(function: LossFunction, threshold: f32) -> ClickLoss {
        ClickLoss {
            function,
            weights: [0.25, 3.0],
            threshold,
        }
    }

    /// The analytic derivative of every loss matches a central difference of the loss.
    #[test]
    fn derivatives_match_finite_differences() {
        for f in LossFunction::ALL {
            for t in [0.0, 0.1] {
                for (z, y) in [(-2.3f32, 0.0f32), (0.4, 1.0), (1.7, 0.0), (-0.2, 1.0)] {
                    let l = loss(*f, t);
                    let h = 1e-3f32;
                    let numeric =
                        (l.scalar(z + h, y).0 - l.scalar(z - h, y).0) / (2.0 * f64::from(h));
                    let (_, dz) = l.scalar(z, y);
                    assert!(
                        (f64::from(dz) - numeric).abs() < 1e-3,
                        "{f:?} t {t} z {z} y {y}: {dz} vs {numeric}"
                    );
                }
            }
        }
    }

    /// Plain BCE through the scalar path equals the fused kernel; a clamped probability
    /// passes no gradient; wbce weighs by the label; the loss of p = 1 at label 0 is capped.
    #[test]
    fn scalar_path_agrees_with_the_kernel_and_clamps() {
        let z = [-3.0f32, -0.5, 0.0, 0.7, 2.5, 9.0, -40.0];
        let y = [0.0f32, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        let (mut p, mut g) = (vec![0.0; 7], vec![0.0; 7]);
        let fused = ClickLoss::default().apply(&z, &y, &mut p, &mut g, 1.0 / 7.0);
        let bce = ClickLoss::default();
        let scalar: f64 = z.iter().zip(&y).map(|(&z, &y)| bce.scalar(z, y).0).sum();
        assert!((fused - scalar).abs() < 1e-4, "{fused} vs {scalar}");
        for i in 0..7 {
            let dz = bce.scalar(z[i], y[i]).1 / 7.0;
            assert!((g[i] - dz).abs() < 1e-6, "{i}: {} vs {dz}", g[i]);
        }
        let clamped = loss(LossFunction::Bce, 0.1);
        assert_eq!(clamped.scalar(9.0, 0.0).1, 0.0);
        assert!((clamped.scalar(9.0, 0.0).0 - -(0.1f64.ln())).abs() < 1e-6);
        let w = loss(LossFunction::Wbce, 0.0);
        let (l0, l1) = (w.scalar(0.3, 0.0).0, w.scalar(-0.3, 1.0).0);
        assert!((l1 / l0 - 12.0).abs() < 1e-5, "{l0} {l1}");
        assert!((bce.scalar(200.0, 0.0).0 - 100.0).abs() < 1e-9);
    }

    #[test]
    fn bad_weights_are_refused() {
        let mut l = loss(LossFunction::Wbce, 0.0);
        l.weights = [f32::NAN, 1.0];
        assert!(
            l.check()
                .unwrap_err()
                .to_string()
                .contains("--loss-weights")
        );
    }
}
