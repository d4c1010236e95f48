//! A DLRM architecture: widths from the reference's dash strings ("13-512-256-64-16") or from
//! a checkpoint, and the checks that turn an impossible architecture into an error naming the
//! field and the reason.

use crate::names::{Field, FieldNames};
use serde::{Deserialize, Serialize};
use std::fmt;

/// An architecture that cannot be built, with the field to blame.
#[derive(Debug, PartialEq, Eq)]
pub enum ArchitectureError {
    Empty {
        field: Field,
        value: String,
    },
    NotANumber {
        field: Field,
        value: String,
        position: usize,
        token: String,
    },
    Zero {
        field: Field,
        value: String,
        position: usize,
    },
    TooShort {
        field: Field,
        value: String,
        got: usize,
        need: &'static str,
    },
    BottomWidth {
        bottom_out: usize,
        dim: usize,
    },
    TopOutput {
        value: String,
        last: usize,
    },
    ZeroDim,
    TopInput {
        found: usize,
        expected: usize,
        interaction: InteractionOp,
    },
    UnknownInteraction(String),
}

impl ArchitectureError {
    /// The message with every field named by `names`.
    pub fn render(&self, names: FieldNames<'_>) -> String {
        use ArchitectureError as E;
        match self {
            E::Empty { field, value } => format!(
                "{}: '{value}' is empty; expected numbers separated by '-', e.g. 13-512-256",
                names(*field)
            ),
            E::NotANumber {
                field,
                value,
                position,
                token,
            } => format!(
                "{}: '{value}': item {position} ('{token}') is not a whole number",
                names(*field)
            ),
            E::Zero {
                field,
                value,
                position,
            } => format!(
                "{}: '{value}': item {position} is 0; every width and table size must be at least 1",
                names(*field)
            ),
            E::TooShort {
                field,
                value,
                got,
                need,
            } => format!("{}: '{value}' has {got} item(s); {need}", names(*field)),
            E::BottomWidth { bottom_out, dim } => format!(
                "{}: the bottom MLP ends in {bottom_out} outputs but {} is {dim}; they must be equal, because the interaction takes dot products of the bottom output with the {dim}-wide embeddings",
                names(Field::Bottom),
                names(Field::EmbeddingDim)
            ),
            E::TopOutput { value, last } => format!(
                "{}: the top MLP must end in 1 output (the click logit), '{value}' ends in {last}",
                names(Field::Top)
            ),
            E::ZeroDim => format!("{}: must be at least 1", names(Field::EmbeddingDim)),
            E::TopInput {
                found,
                expected,
                interaction,
            } => format!(
                "{}: the top MLP takes {found} inputs, but the {interaction:?} interaction gives {expected}",
                names(Field::Top)
            ),
            E::UnknownInteraction(given) => format!(
                "{}: '{given}' is not an interaction; use dot or cat",
                names(Field::Interaction)
            ),
        }
    }
}

impl fmt::Display for ArchitectureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&Field::name))
    }
}

impl std::error::Error for ArchitectureError {}

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
    type Err = ArchitectureError;
    fn from_str(s: &str) -> Result<Self, ArchitectureError> {
        match s {
            "dot" => Ok(InteractionOp::Dot),
            "cat" => Ok(InteractionOp::Cat),
            other => Err(ArchitectureError::UnknownInteraction(other.to_string())),
        }
    }
}

/// Parses "13-512-256" into widths, naming `field` in any error.
pub fn parse_dims(field: Field, value: &str) -> Result<Vec<usize>, ArchitectureError> {
    let value_s = value.to_string();
    if value.trim().is_empty() {
        return Err(ArchitectureError::Empty {
            field,
            value: value_s,
        });
    }
    let dims = value
        .split('-')
        .enumerate()
        .map(|(i, tok)| {
            tok.trim()
                .parse()
                .map_err(|_| ArchitectureError::NotANumber {
                    field,
                    value: value_s.clone(),
                    position: i + 1,
                    token: tok.to_string(),
                })
        })
        .collect::<Result<Vec<usize>, _>>()?;
    check_dims(field, &dims)?;
    Ok(dims)
}

/// Refuses an empty list of widths or a width of 0, naming `field`.
pub fn check_dims(field: Field, dims: &[usize]) -> Result<(), ArchitectureError> {
    if dims.is_empty() {
        return Err(ArchitectureError::Empty {
            field,
            value: String::new(),
        });
    }
    match dims.iter().position(|&n| n == 0) {
        Some(i) => Err(ArchitectureError::Zero {
            field,
            value: join(dims),
            position: i + 1,
        }),
        None => Ok(()),
    }
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
    /// Builds the architecture from the reference's dash strings. `top` excludes the input
    /// width, which follows from the interaction (as dlrm_s_pytorch.py derives it).
    pub fn from_flags(
        embedding_dim: usize,
        table_sizes: &str,
        bottom: &str,
        top: &str,
        interaction: InteractionOp,
        self_interaction: bool,
    ) -> Result<Architecture, ArchitectureError> {
        Architecture::new(
            embedding_dim,
            parse_dims(Field::TableSizes, table_sizes)?,
            parse_dims(Field::Bottom, bottom)?,
            parse_dims(Field::Top, top)?,
            interaction,
            self_interaction,
        )
    }

    /// Builds the architecture from its widths. `top_tail` excludes the top MLP's input width,
    /// which follows from the interaction.
    pub fn new(
        embedding_dim: usize,
        table_sizes: Vec<usize>,
        bottom: Vec<usize>,
        top_tail: Vec<usize>,
        interaction: InteractionOp,
        self_interaction: bool,
    ) -> Result<Architecture, ArchitectureError> {
        check_dims(Field::TableSizes, &table_sizes)?;
        check_dims(Field::Bottom, &bottom)?;
        check_dims(Field::Top, &top_tail)?;
        if embedding_dim == 0 {
            return Err(ArchitectureError::ZeroDim);
        }
        if bottom.len() < 2 {
            return Err(ArchitectureError::TooShort {
                field: Field::Bottom,
                value: join(&bottom),
                got: bottom.len(),
                need: "need the input width and at least one layer, e.g. 13-16",
            });
        }
        let bottom_out = *bottom.last().expect("checked non-empty");
        if bottom_out != embedding_dim {
            return Err(ArchitectureError::BottomWidth {
                bottom_out,
                dim: embedding_dim,
            });
        }
        let last = *top_tail.last().expect("checked non-empty");
        if last != 1 {
            return Err(ArchitectureError::TopOutput {
                value: join(&top_tail),
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
    pub fn validated(self) -> Result<Architecture, ArchitectureError> {
        let Some((&top_in, top_tail)) = self.top.split_first() else {
            return Err(ArchitectureError::Empty {
                field: Field::Top,
                value: String::new(),
            });
        };
        let rebuilt = Architecture::new(
            self.embedding_dim,
            self.table_sizes,
            self.bottom,
            top_tail.to_vec(),
            self.interaction,
            self.self_interaction,
        )?;
        if rebuilt.top[0] != top_in {
            return Err(ArchitectureError::TopInput {
                found: top_in,
                expected: rebuilt.top[0],
                interaction: rebuilt.interaction,
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
    /// interaction, counting a multiply-add as 2: per layer 2·in·out for the forward, the same
    /// for dX and for dW (the first bottom layer needs no dX); per interaction pair 2·d for its
    /// dot product and 2·2·d for the gradients of its two vectors. Bias, ReLU and loss work is
    /// O(widths) per sample and not counted.
    pub fn flops_per_sample(&self) -> f64 {
        let layer =
            |w: &[usize]| -> f64 { w.windows(2).map(|p| 2.0 * p[0] as f64 * p[1] as f64).sum() };
        let first_bottom = 2.0 * self.bottom[0] as f64 * self.bottom[1] as f64;
        let mlp = 3.0 * (layer(&self.bottom) + layer(&self.top)) - first_bottom;
        let inter = match self.interaction {
            InteractionOp::Dot => {
                let pairs = dlrm_kernels::interaction::num_pairs(
                    self.num_features(),
                    self.self_interaction,
                );
                6.0 * pairs as f64 * self.embedding_dim as f64
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaggle_architecture_derives_the_top_input() {
        let a = Architecture::from_flags(
            16,
            &join(&[10; 26]),
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
    fn impossible_architectures_name_the_field() {
        let e = |emb: &str, bot: &str, top: &str, d: usize| {
            Architecture::from_flags(d, emb, bot, top, InteractionOp::Dot, false)
                .unwrap_err()
                .to_string()
        };
        assert!(e("10-20", "13-512-32", "512-1", 16).contains("bottom"));
        assert!(e("10-20", "13-512-32", "512-1", 16).contains("32"));
        assert!(e("10-x-20", "13-16", "1", 16).contains("table_sizes"));
        assert!(e("10-x-20", "13-16", "1", 16).contains("'x'"));
        assert!(e("10-0", "13-16", "1", 16).contains("item 2 is 0"));
        assert!(e("10", "13-16", "8-2", 16).contains("top"));
        assert!(e("10", "16", "1", 16).contains("bottom"));
        assert!(e("", "13-16", "1", 16).contains("empty"));
        assert!(e("10", "13-16", "1", 0).contains("embedding_dim"));
        assert!("dots".parse::<InteractionOp>().is_err());
    }
}
