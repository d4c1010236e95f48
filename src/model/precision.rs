//! The arithmetic a model trains in: f32 throughout, or BF16 mixed precision (BF16 operands
//! of the MLP products with f32 accumulation and f32 master weights; embedding tables stored
//! split, their BF16 upper halves gathered by the forward and the f32 update exact, see
//! [`dlrm_kernels::embedding::bf16`]).

use crate::names::{Choice, choice_names};
use serde::{Deserialize, Serialize};

/// What `--precision` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// f32 weights, activations and products.
    #[default]
    Fp32,
    /// BF16 mixed precision: f32 master weights, bf16 MLP operands and table reads, f32
    /// accumulation and updates.
    Bf16,
}

impl Precision {
    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }
}

impl Choice for Precision {
    const ALL: &'static [Precision] = &[Precision::Fp32, Precision::Bf16];
    fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Precision::Fp32 => "f32 weights, activations and products",
            Precision::Bf16 => {
                "BF16 mixed precision: bf16 MLP operands and embedding reads, f32 accumulation, f32-exact updates (split-SGD tables)"
            }
        }
    }
}

choice_names!(Precision);
