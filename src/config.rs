//! Model architecture from the reference's dash strings ("13-512-256-64-16"), presets, and the
//! checks that turn an impossible architecture into an error naming the flag and the reason.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// An architecture that cannot be built, with the flag to blame.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{flag}: '{value}' is empty; expected numbers separated by '-', e.g. 13-512-256")]
    Empty { flag: &'static str, value: String },
    #[error("{flag}: '{value}': item {position} ('{token}') is not a whole number")]
    NotANumber {
        flag: &'static str,
        value: String,
        position: usize,
        token: String,
    },
    #[error(
        "{flag}: '{value}': item {position} is 0; every width and table size must be at least 1"
    )]
    Zero {
        flag: &'static str,
        value: String,
        position: usize,
    },
    #[error("{flag}: '{value}' has {got} item(s); {need}")]
    TooShort {
        flag: &'static str,
        value: String,
        got: usize,
        need: &'static str,
    },
    #[error(
        "--arch-mlp-bot: the bottom MLP ends in {bottom_out} outputs but --arch-sparse-feature-size is {dim}; they must be equal, because the interaction takes dot products of the bottom output with the {dim}-wide embeddings"
    )]
    BottomWidth { bottom_out: usize, dim: usize },
    #[error(
        "--arch-mlp-top: the top MLP must end in 1 output (the click logit), '{value}' ends in {last}"
    )]
    TopOutput { value: String, last: usize },
    #[error("--arch-sparse-feature-size: must be at least 1")]
    ZeroDim,
    #[error(
        "--arch-mlp-top: the top MLP takes {found} inputs, but the {interaction:?} interaction gives {expected}"
    )]
    TopInput {
        found: usize,
        expected: usize,
        interaction: InteractionOp,
    },
    #[error("--arch-interaction-op: '{0}' is not an interaction; use dot or cat")]
    UnknownInteraction(String),
}

/// How the bottom output and the pooled embeddings are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InteractionOp {
    /// All pairwise dot products (a factorization-machine interaction) next to the bottom output.
    Dot,
    /// Concatenation of all vectors.
    Cat,
}

impl std::str::FromStr for InteractionOp {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "dot" => Ok(InteractionOp::Dot),
            "cat" => Ok(InteractionOp::Cat),
            other => Err(ConfigError::UnknownInteraction(other.to_string())),
        }
    }
}

/// Parses "13-512-256" into widths, naming `flag` in any error.
pub fn parse_dims(flag: &'static str, value: &str) -> Result<Vec<usize>, ConfigError> {
    let value_s = value.to_string();
    if value.trim().is_empty() {
        return Err(ConfigError::Empty {
            flag,
            value: value_s,
        });
    }
    value
        .split('-')
        .enumerate()
        .map(|(i, tok)| {
            let n: usize = tok.trim().parse().map_err(|_| ConfigError::NotANumber {
                flag,
                value: value_s.clone(),
                position: i + 1,
                token: tok.to_string(),
            })?;
            if n == 0 {
                return Err(ConfigError::Zero {
                    flag,
                    value: value_s.clone(),
                    position: i + 1,
                });
            }
            Ok(n)
        })
        .collect()
}

/// A DLRM architecture with every width resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Architecture {
    /// Width d of every embedding and of the bottom MLP's output.
    pub embedding_dim: usize,
    /// Rows of each embedding table.
    pub table_sizes: Vec<usize>,
    /// Bottom MLP widths, input (number of dense features) first.
    pub bottom: Vec<usize>,
    /// Top MLP widths, the derived interaction width first, 1 last.
    pub top: Vec<usize>,
    pub interaction: InteractionOp,
    pub self_interaction: bool,
}

impl Architecture {
    /// Builds the architecture from the reference's flags. `top` excludes the input width,
    /// which follows from the interaction (as dlrm_s_pytorch.py derives it).
    pub fn from_flags(
        embedding_dim: usize,
        table_sizes: &str,
        bottom: &str,
        top: &str,
        interaction: InteractionOp,
        self_interaction: bool,
    ) -> Result<Architecture, ConfigError> {
        let tables = parse_dims("--arch-embedding-size", table_sizes)?;
        let bottom_v = parse_dims("--arch-mlp-bot", bottom)?;
        let top_v = parse_dims("--arch-mlp-top", top)?;
        Architecture::new(
            embedding_dim,
            tables,
            bottom_v,
            top_v,
            top,
            interaction,
            self_interaction,
        )
    }

    fn new(
        embedding_dim: usize,
        table_sizes: Vec<usize>,
        bottom: Vec<usize>,
        top_tail: Vec<usize>,
        top_str: &str,
        interaction: InteractionOp,
        self_interaction: bool,
    ) -> Result<Architecture, ConfigError> {
        if embedding_dim == 0 {
            return Err(ConfigError::ZeroDim);
        }
        if bottom.len() < 2 {
            return Err(ConfigError::TooShort {
                flag: "--arch-mlp-bot",
                value: join(&bottom),
                got: bottom.len(),
                need: "need the input width and at least one layer, e.g. 13-16",
            });
        }
        let bottom_out = *bottom.last().expect("non-empty");
        if bottom_out != embedding_dim {
            return Err(ConfigError::BottomWidth {
                bottom_out,
                dim: embedding_dim,
            });
        }
        let last = *top_tail.last().expect("parse_dims never returns empty");
        if last != 1 {
            return Err(ConfigError::TopOutput {
                value: top_str.to_string(),
                last,
            });
        }
        let mut arch = Architecture {
            embedding_dim,
            table_sizes,
            bottom,
            top: Vec::new(),
            interaction,
            self_interaction,
        };
        arch.top = std::iter::once(arch.interaction_width())
            .chain(top_tail)
            .collect();
        Ok(arch)
    }

    /// Checks an architecture read from a file (a checkpoint's meta.json) with the checks of
    /// the flags, and that its top MLP takes the width its interaction gives.
    pub fn validated(self) -> Result<Architecture, ConfigError> {
        let top_tail = self.top.get(1..).unwrap_or_default();
        let rebuilt = Architecture::from_flags(
            self.embedding_dim,
            &join(&self.table_sizes),
            &join(&self.bottom),
            &join(top_tail),
            self.interaction,
            self.self_interaction,
        )?;
        if rebuilt.top[0] != self.top[0] {
            return Err(ConfigError::TopInput {
                found: self.top[0],
                expected: rebuilt.top[0],
                interaction: self.interaction,
            });
        }
        Ok(rebuilt)
    }

    /// Number of dense input features.
    pub fn num_dense(&self) -> usize {
        self.bottom[0]
    }

    /// Number of embedding tables.
    pub fn num_tables(&self) -> usize {
        self.table_sizes.len()
    }

    /// F: the bottom output plus one pooled vector per table.
    pub fn num_features(&self) -> usize {
        self.num_tables() + 1
    }

    /// Width of the top MLP's input: d + F(F-1)/2 (or F(F+1)/2 with self-interaction) for dot,
    /// F * d for cat.
    pub fn interaction_width(&self) -> usize {
        interaction_width(
            self.interaction,
            self.self_interaction,
            self.num_features(),
            self.embedding_dim,
        )
    }

    /// The dash string of the top MLP without its derived input (as the flag takes it).
    pub fn top_flag(&self) -> String {
        join(&self.top[1..])
    }

    /// Floating-point operations of one training step per sample in the MLPs and the
    /// interaction (forward 2·in·out per layer, backward twice that; the first bottom layer
    /// needs no input gradient).
    pub fn flops_per_sample(&self) -> f64 {
        let layer =
            |w: &[usize]| -> f64 { w.windows(2).map(|p| 2.0 * p[0] as f64 * p[1] as f64).sum() };
        let first_bottom = 2.0 * self.bottom[0] as f64 * self.bottom[1] as f64;
        let mlp = 3.0 * (layer(&self.bottom) + layer(&self.top)) - first_bottom;
        let f = self.num_features() as f64;
        let inter = match self.interaction {
            InteractionOp::Dot => 3.0 * f * f * self.embedding_dim as f64,
            InteractionOp::Cat => 0.0,
        };
        mlp + inter
    }
}

/// Width of the interaction's output for `features` vectors of width `d` (see
/// [`Architecture::interaction_width`]).
pub fn interaction_width(
    op: InteractionOp,
    self_interaction: bool,
    features: usize,
    d: usize,
) -> usize {
    match op {
        InteractionOp::Dot => d + dlrm_kernels::interaction::num_pairs(features, self_interaction),
        InteractionOp::Cat => features * d,
    }
}

/// "13-512-256" from widths.
pub fn join(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("-")
}

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

/// A named starting configuration; every flag given on the command line overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
    pub bottom: &'static str,
    pub top: &'static str,
    pub mini_batch_size: usize,
    pub num_indices_per_lookup: usize,
    pub max_ind_range: Option<usize>,
    pub num_batches: usize,
    pub learning_rate: f32,
    pub test_freq: usize,
}

impl Preset {
    pub fn values(self) -> PresetValues {
        match self {
            Preset::Tiny => PresetValues {
                embedding_dim: 16,
                table_sizes: vec![100, 400, 1000, 2000, 5000, 50, 10, 3000],
                bottom: "13-64-16",
                top: "64-1",
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
                bottom: "13-512-256-64-16",
                top: "512-256-1",
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
                bottom: "13-512-256-64",
                top: "512-512-256-1",
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
                bottom: "512-512-64",
                top: "1024-1024-1024-1",
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
    fn kaggle_architecture_derives_the_top_input() {
        let a = Architecture::from_flags(
            16,
            &join(&KAGGLE_TABLE_SIZES),
            "13-512-256-64-16",
            "512-256-1",
            InteractionOp::Dot,
            false,
        )
        .unwrap();
        assert_eq!(a.top, vec![367, 512, 256, 1]);
        assert_eq!(a.num_features(), 27);
        let cat = Architecture::from_flags(16, "10-20", "4-16", "8-1", InteractionOp::Cat, false)
            .unwrap();
        assert_eq!(cat.top[0], 48);
        let selfi =
            Architecture::from_flags(4, "10-20", "3-4", "1", InteractionOp::Dot, true).unwrap();
        assert_eq!(selfi.top[0], 4 + 6);
    }

    #[test]
    fn impossible_architectures_name_the_flag() {
        let e = |emb: &str, bot: &str, top: &str, d: usize| {
            Architecture::from_flags(d, emb, bot, top, InteractionOp::Dot, false)
                .unwrap_err()
                .to_string()
        };
        assert!(e("10-20", "13-512-32", "512-1", 16).contains("--arch-mlp-bot"));
        assert!(e("10-20", "13-512-32", "512-1", 16).contains("32"));
        assert!(e("10-x-20", "13-16", "1", 16).contains("--arch-embedding-size"));
        assert!(e("10-x-20", "13-16", "1", 16).contains("'x'"));
        assert!(e("10-0", "13-16", "1", 16).contains("item 2 is 0"));
        assert!(e("10", "13-16", "8-2", 16).contains("--arch-mlp-top"));
        assert!(e("10", "16", "1", 16).contains("--arch-mlp-bot"));
        assert!(e("", "13-16", "1", 16).contains("empty"));
        assert!(e("10", "13-16", "1", 0).contains("--arch-sparse-feature-size"));
        assert!("dots".parse::<InteractionOp>().is_err());
    }

    #[test]
    fn presets_are_consistent() {
        for p in [
            Preset::Tiny,
            Preset::Kaggle,
            Preset::Terabyte,
            Preset::PaperSmall,
        ] {
            let v = p.values();
            Architecture::from_flags(
                v.embedding_dim,
                &join(&v.table_sizes),
                v.bottom,
                v.top,
                InteractionOp::Dot,
                false,
            )
            .unwrap();
        }
    }
}
