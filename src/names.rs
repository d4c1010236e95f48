//! How the library names the settings of a run and the values of its enumerations, so that
//! its errors cite settings by field (`learning_rate`, `bottom`) and a front end (the CLI)
//! renders them with its own names (`--learning-rate`, `--arch-mlp-bot`). This module depends
//! on nothing else in the crate: every layer may use it.

use std::fmt;

/// A setting of a run, as library errors cite it (the field of the run's spec that holds it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// Width d of the embeddings and of the bottom MLP's output.
    EmbeddingDim,
    /// Rows of each embedding table.
    TableSizes,
    /// Bottom MLP widths.
    Bottom,
    /// Top MLP widths (without the derived input).
    Top,
    /// The feature interaction (dot or cat).
    Interaction,
    /// The cap on the rows of every table.
    MaxIndRange,
    LearningRate,
    WarmupSteps,
    DecayStartStep,
    BatchSize,
    TestBatchSize,
    Epochs,
    NumBatches,
    /// The train/validation/test weights of preprocessing.
    Split,
    MinFrequency,
    WeightDecay,
    /// Leave out bad lines of the input instead of failing.
    SkipBadLines,
    /// The kind of model.
    Model,
    /// The held-out split of a dataset evaluated during and after training.
    EvalSplit,
    /// The training and test rating files of matrix factorization.
    TrainRatings,
    TestRatings,
    /// Whether the interaction includes each vector with itself.
    SelfInteraction,
    /// Load tensors that hold NaN or infinity instead of refusing them.
    AllowNonFinite,
    /// Skip tensors of a file that are not parameters of the model.
    IgnoreUnknown,
    /// The checkpoint folder a run saves into, the one it resumes from, and whether it may
    /// replace another run's checkpoints.
    SaveModel,
    LoadModel,
    Overwrite,
    /// Preprocess with the encoding of an existing dataset.
    EncodeLike,
    /// Raw Criteo rows scored or trained on directly, preprocessed on the fly.
    RawRows,
    /// A setting only a front end has (a tool's flag), named as the front end names it.
    Named(&'static str),
}

impl Field {
    /// The field's name (`learning_rate`).
    pub fn name(self) -> &'static str {
        match self {
            Field::EmbeddingDim => "embedding_dim",
            Field::TableSizes => "table_sizes",
            Field::Bottom => "bottom",
            Field::Top => "top",
            Field::Interaction => "interaction",
            Field::MaxIndRange => "max_ind_range",
            Field::LearningRate => "learning_rate",
            Field::WarmupSteps => "warmup_steps",
            Field::DecayStartStep => "decay_start_step",
            Field::BatchSize => "batch_size",
            Field::TestBatchSize => "test_batch_size",
            Field::Epochs => "epochs",
            Field::NumBatches => "num_batches",
            Field::Split => "split",
            Field::MinFrequency => "min_frequency",
            Field::WeightDecay => "weight_decay",
            Field::SkipBadLines => "skip_bad_lines",
            Field::Model => "model",
            Field::EvalSplit => "eval_split",
            Field::TrainRatings => "train_ratings",
            Field::TestRatings => "test_ratings",
            Field::SelfInteraction => "self_interaction",
            Field::AllowNonFinite => "allow_non_finite",
            Field::IgnoreUnknown => "ignore_unknown",
            Field::SaveModel => "save_model",
            Field::LoadModel => "load_model",
            Field::Overwrite => "overwrite",
            Field::EncodeLike => "encode_like",
            Field::RawRows => "raw_rows",
            Field::Named(name) => name,
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What renders a [`Field`]: [`Field::name`] for the library's own messages, the flag for the
/// CLI's.
pub type FieldNames<'a> = &'a dyn Fn(Field) -> &'static str;

/// An error whose message cites settings: `Display` names them by field, [`render`] with the
/// names a front end gives.
///
/// [`render`]: FieldError::render
pub struct FieldError {
    message: Box<dyn Fn(FieldNames<'_>) -> String + Send + Sync>,
}

impl FieldError {
    /// An error whose message `message` writes, citing each setting through the names given.
    pub fn new(message: impl Fn(FieldNames<'_>) -> String + Send + Sync + 'static) -> FieldError {
        FieldError {
            message: Box::new(message),
        }
    }

    /// The message with every cited setting named by `names`.
    pub fn render(&self, names: FieldNames<'_>) -> String {
        (self.message)(names)
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&Field::name))
    }
}

impl fmt::Debug for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FieldError({self})")
    }
}

impl std::error::Error for FieldError {}

/// Returns a [`FieldError`] built from `message` unless `cond` holds.
pub fn ensure_field(
    cond: bool,
    message: impl Fn(FieldNames<'_>) -> String + Send + Sync + 'static,
) -> Result<(), FieldError> {
    if cond {
        Ok(())
    } else {
        Err(FieldError::new(message))
    }
}

/// An enumeration whose values have names (as files, reports and the CLI spell them), listed
/// in `ALL`; front ends offer the names with their help.
pub trait Choice: Copy + Sized + Send + Sync + 'static {
    /// Every value, in the order they are offered.
    const ALL: &'static [Self];
    /// The value's name (`rowwise-adagrad`).
    fn name(self) -> &'static str;
    /// One line about the value (empty when the name says it all).
    fn help(self) -> &'static str {
        ""
    }
    /// Other names accepted for the value (another tool's spelling, e.g. the reference's
    /// `rwsadagrad`); never offered, never written.
    fn aliases(self) -> &'static [&'static str] {
        &[]
    }
}

/// A name that is none of a [`Choice`]'s values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{given}' is not one of {expected}")]
pub struct UnknownName {
    pub given: String,
    pub expected: String,
}

/// The value of `T` named `name`.
pub fn parse_choice<T: Choice>(name: &str) -> Result<T, UnknownName> {
    T::ALL
        .iter()
        .copied()
        .find(|v| v.name() == name || v.aliases().contains(&name))
        .ok_or_else(|| UnknownName {
            given: name.to_string(),
            expected: T::ALL
                .iter()
                .map(|v| v.name())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// `Display` and `FromStr` of a [`Choice`] by its names.
macro_rules! choice_names {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($crate::names::Choice::name(*self))
            }
        }
        impl std::str::FromStr for $t {
            type Err = $crate::names::UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $crate::names::parse_choice(s)
            }
        }
    };
}
pub(crate) use choice_names;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_error_renders_with_the_names_given() {
        let e = FieldError::new(|n| format!("{} must be at least 1", n(Field::BatchSize)));
        assert_eq!(e.to_string(), "batch_size must be at least 1");
        let flag = |f: Field| match f {
            Field::BatchSize => "--mini-batch-size",
            _ => "?",
        };
        assert_eq!(e.render(&flag), "--mini-batch-size must be at least 1");
    }
}
