//! Presets: named starting configurations of a run (the reference's Criteo Kaggle and
//! Terabyte setups, the DLRM paper's profiling setup, a tiny one for tests).

use crate::model::architecture::{Architecture, InteractionOp};
use crate::names::{Choice, choice_names};
use serde::{Deserialize, Serialize};

/// The Criteo Kaggle Display Advertising Challenge table sizes (as the reference's Kaggle
/// run uses them).
pub const KAGGLE_TABLE_SIZES: [usize; 26] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
];

/// The Criteo Terabyte table sizes before `--max-ind-range` capping.
pub const TERABYTE_TABLE_SIZES: [usize; 26] = [
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10, 2208,
    11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
];

/// The batch of the reference's Criteo Kaggle recipe (its bench/dlrm_s_criteo_kaggle.sh:
/// `--mini-batch-size=128 --learning-rate=0.1`, SGD): what a run on Criteo data uses unless a
/// preset is named.
pub const REFERENCE_KAGGLE_BATCH: usize = 128;

/// A named starting configuration; every flag given on the command line overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// A few small tables: for tests and the quick default run (well under a minute).
    Tiny,
    /// The reference's Criteo Kaggle configuration (2.0 GiB of tables).
    Kaggle,
    /// The reference's Criteo Terabyte configuration, tables capped by --max-ind-range.
    Terabyte,
    /// The DLRM paper's CPU profiling setup: 8 tables of 1M rows, d = 64, 100 ids per bag.
    PaperSmall,
}

/// What a preset sets.
#[derive(Clone, Debug, PartialEq)]
pub struct PresetValues {
    pub embedding_dim: usize,
    pub table_sizes: Vec<usize>,
    /// Bottom MLP widths, dense features first.
    pub bottom: &'static [usize],
    /// Top MLP widths without the input (which follows from the interaction).
    pub top: &'static [usize],
    pub mini_batch_size: usize,
    pub num_indices_per_lookup: usize,
    pub max_ind_range: Option<usize>,
    pub num_batches: usize,
    pub learning_rate: f32,
    pub test_freq: usize,
}

impl Choice for Preset {
    const ALL: &'static [Preset] = &[
        Preset::Tiny,
        Preset::Kaggle,
        Preset::Terabyte,
        Preset::PaperSmall,
    ];
    fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Kaggle => "kaggle",
            Preset::Terabyte => "terabyte",
            Preset::PaperSmall => "paper-small",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Preset::Tiny => {
                "A few small tables: for tests and the quick default run (well under a minute)"
            }
            Preset::Kaggle => "The reference's Criteo Kaggle configuration (2.0 GiB of tables)",
            Preset::Terabyte => {
                "The reference's Criteo Terabyte configuration, tables capped by --max-ind-range"
            }
            Preset::PaperSmall => {
                "The DLRM paper's CPU profiling setup: 8 tables of 1M rows, d = 64, 100 ids per bag"
            }
        }
    }
}

choice_names!(Preset);

impl PresetValues {
    /// The values in one line, as `--help` shows them: `d 16, 8 tables of 10 to 5000 rows,
    /// bottom 13-64-16, top 64-1, batch 128, lr 0.1, 2000 batches`.
    pub fn summary(&self) -> String {
        let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join("-");
        let (min, max) = (
            self.table_sizes.iter().min().copied().unwrap_or(0),
            self.table_sizes.iter().max().copied().unwrap_or(0),
        );
        let mut s = format!(
            "d {}, {} tables of {min} to {max} rows",
            self.embedding_dim,
            self.table_sizes.len()
        );
        if let Some(cap) = self.max_ind_range {
            s += &format!(" (capped at {cap})");
        }
        if self.num_indices_per_lookup > 1 {
            s += &format!(", {} ids per bag", self.num_indices_per_lookup);
        }
        s += &format!(
            ", bottom {}, top {}, batch {}, lr {}, {} batches",
            join(self.bottom),
            join(self.top),
            self.mini_batch_size,
            self.learning_rate,
            self.num_batches
        );
        if self.test_freq > 0 {
            s += &format!(", evaluated every {}", self.test_freq);
        }
        s
    }

    /// The preset's architecture (dot interaction without self-interaction; tables not yet
    /// capped by `max_ind_range`).
    pub fn architecture(&self) -> Architecture {
        Architecture::new(
            self.embedding_dim,
            self.table_sizes.clone(),
            self.bottom.to_vec(),
            self.top.to_vec(),
            InteractionOp::Dot,
            false,
        )
        .expect("every preset is a valid architecture (tested)")
    }
}

impl Preset {
    pub fn values(self) -> PresetValues {
        match self {
            Preset::Tiny => PresetValues {
                embedding_dim: 16,
                table_sizes: vec![100, 400, 1000, 2000, 5000, 50, 10, 3000],
                bottom: &[13, 64, 16],
                top: &[64, 1],
                mini_batch_size: 128,
                num_indices_per_lookup: 1,
                max_ind_range: None,
                num_batches: 2000,
                learning_rate: 0.1,
                test_freq: 500,
            },
            Preset::Kaggle => PresetValues {
                embedding_dim: 16,
                table_sizes: KAGGLE_TABLE_SIZES.to_vec(),
                bottom: &[13, 512, 256, 64, 16],
                top: &[512, 256, 1],
                mini_batch_size: 2048,
                num_indices_per_lookup: 1,
                max_ind_range: None,
                num_batches: 200,
                learning_rate: 0.1,
                test_freq: 0,
            },
            Preset::Terabyte => PresetValues {
                embedding_dim: 64,
                table_sizes: TERABYTE_TABLE_SIZES.to_vec(),
                bottom: &[13, 512, 256, 64],
                top: &[512, 512, 256, 1],
                mini_batch_size: 2048,
                num_indices_per_lookup: 1,
                max_ind_range: Some(10_000_000),
                num_batches: 100,
                learning_rate: 0.1,
                test_freq: 0,
            },
            Preset::PaperSmall => PresetValues {
                embedding_dim: 64,
                table_sizes: vec![1_000_000; 8],
                bottom: &[512, 512, 64],
                top: &[1024, 1024, 1024, 1],
                mini_batch_size: 2048,
                num_indices_per_lookup: 100,
                max_ind_range: None,
                num_batches: 50,
                learning_rate: 0.1,
                test_freq: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_consistent() {
        for &p in Preset::ALL {
            let v = p.values();
            let arch = v.architecture();
            assert_eq!(arch.bottom, v.bottom);
            assert_eq!(&arch.top[1..], v.top);
        }
    }
}
