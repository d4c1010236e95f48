//! The learning-rate schedule of a run.

use crate::names::{Field, FieldError, ensure_field};
use serde::{Deserialize, Serialize};

/// The reference's learning-rate policy (dlrm_s_pytorch.py LRPolicyScheduler): linear warm-up,
/// then constant, then a quadratic decay to a floor, then frozen at its last value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub base: f32,
    pub warmup_steps: u64,
    pub decay_start_step: u64,
    pub decay_steps: u64,
}

impl LrSchedule {
    /// A constant learning rate (no warm-up, no decay).
    pub fn constant(base: f32) -> LrSchedule {
        LrSchedule {
            base,
            warmup_steps: 0,
            decay_start_step: 0,
            decay_steps: 0,
        }
    }

    /// Learning rate for step `step` (0-based: the first update is step 0).
    pub fn at(&self, step: u64) -> f32 {
        // The reference's scheduler counts from 1 when the first update runs.
        let s = step + 1;
        let decay_end = self.decay_start_step + self.decay_steps;
        if s < self.warmup_steps {
            self.base * (1.0 - (self.warmup_steps - s) as f32 / self.warmup_steps as f32)
        } else if self.decay_steps > 0 && self.decay_start_step <= s && s < decay_end {
            let left = (decay_end - s) as f32 / self.decay_steps as f32;
            (self.base * left * left).max(1e-7)
        } else if self.decay_steps > 0 && s >= decay_end {
            (self.base * (1.0 / self.decay_steps as f32).powi(2)).max(1e-7)
        } else {
            self.base
        }
    }

    /// Refuses a base rate that is not a positive number, and a decay that starts before the
    /// warm-up ends.
    pub fn validate(&self) -> Result<(), FieldError> {
        let LrSchedule {
            base,
            warmup_steps,
            decay_start_step,
            decay_steps,
        } = *self;
        ensure_field(is_valid_learning_rate(base), move |n| {
            format!(
                "{} {base}: must be a positive number",
                n(Field::LearningRate)
            )
        })?;
        ensure_field(
            decay_steps == 0 || decay_start_step >= warmup_steps,
            move |n| {
                format!(
                    "{} {decay_start_step} is before the end of the warm-up ({} {warmup_steps}): the warm-up must finish before the decay starts",
                    n(Field::DecayStartStep),
                    n(Field::WarmupSteps)
                )
            },
        )
    }
}

/// Whether `lr` is a positive number: 0 trains nothing, a negative rate ascends the loss, NaN
/// and infinity destroy the parameters at the first step.
pub fn is_valid_learning_rate(lr: f32) -> bool {
    lr.is_finite() && lr > 0.0
}

/// Refuses a learning rate (of the setting `name`) that is not a positive number.
pub fn ensure_learning_rate(name: &str, lr: f32) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_valid_learning_rate(lr),
        "{name} {lr}: must be a positive number"
    );
    Ok(())
}
