//! One module per subcommand.

pub mod compare;
pub mod distributed;
pub mod export;
pub mod models;
pub mod preprocess;
pub mod progress;
pub mod records;
pub mod reference;
pub mod runconfig;
pub mod score;
pub mod synth;
mod tfevents;
pub mod train;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use dlrm::model::architecture::ArchitectureError;
use dlrm::names::{Choice, Field, FieldError, parse_choice};
use dlrm::train::Diverged;
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Whether to draw progress bars: on a terminal, unless --quiet (or RUST_LOG) silences the
/// info lines they stand beside.
pub fn show_progress() -> bool {
    std::io::stderr().is_terminal() && log::log_enabled!(log::Level::Info)
}

/// The flag that sets each setting the library's errors cite.
pub fn flag(field: Field) -> &'static str {
    match field {
        Field::EmbeddingDim => "--arch-sparse-feature-size",
        Field::TableSizes => "--arch-embedding-size",
        Field::Bottom => "--arch-mlp-bot",
        Field::Top => "--arch-mlp-top",
        Field::Interaction => "--arch-interaction-op",
        Field::MaxIndRange => "--max-ind-range",
        Field::LearningRate => "--learning-rate",
        Field::WarmupSteps => "--lr-num-warmup-steps",
        Field::DecayStartStep => "--lr-decay-start-step",
        Field::BatchSize => "--mini-batch-size",
        Field::TestBatchSize => "--test-mini-batch-size",
        Field::Epochs => "--nepochs",
        Field::NumBatches => "--num-batches",
        Field::Split => "--split",
        Field::MinFrequency => "--min-frequency",
        Field::WeightDecay => "--weight-decay",
        Field::SkipBadLines => "--skip-bad-lines",
        Field::Model => "--model",
        Field::EvalSplit => "--eval-split",
        Field::TrainRatings => "--train",
        Field::TestRatings => "--test",
        Field::SelfInteraction => "--arch-interaction-itself",
        Field::AllowNonFinite => "--allow-non-finite",
        Field::IgnoreUnknown => "--ignore-unknown",
        Field::SaveModel => "--save-model",
        Field::LoadModel => "--load-model",
        Field::Overwrite => "--overwrite",
        Field::EncodeLike => "--encode-like",
        Field::RawRows => "--criteo",
        Field::Named(flag) => flag,
    }
}

/// One error of a chain as the CLI words it: the settings the library cites named by their
/// flags.
pub fn render_cause(cause: &(dyn std::error::Error + 'static)) -> String {
    if let Some(e) = cause.downcast_ref::<FieldError>() {
        e.render(&flag)
    } else if let Some(e) = cause.downcast_ref::<ArchitectureError>() {
        e.render(&flag)
    } else if let Some(e) = cause.downcast_ref::<Diverged>() {
        e.render(&flag)
    } else {
        cause.to_string()
    }
}

/// An error and its causes, joined by ": " (as anyhow's `{:#}` writes them), as the CLI words
/// them ([`render_cause`]).
pub fn render_error(e: &anyhow::Error) -> String {
    e.chain().map(render_cause).collect::<Vec<_>>().join(": ")
}

/// The parser of a library enumeration's values by their names, offered with their help.
pub fn choice<T: Choice>() -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(T::ALL.iter().map(|&v| {
        let value = PossibleValue::new(v.name()).aliases(v.aliases().iter().copied());
        match v.help() {
            "" => value,
            help => value.help(help),
        }
    }))
    .try_map(|name| parse_choice::<T>(&name))
}

/// `--threads` and `--oversubscribe`, as every command with a thread pool takes them.
#[derive(Args, Clone, Debug)]
pub struct ThreadArgs {
    /// Worker threads, 1 to 4 x the logical cores (default: the number of physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Allow --threads above 4 x the logical cores.
    #[arg(long)]
    oversubscribe: bool,
}

/// Threads per logical core allowed without --oversubscribe: more only adds switching.
const MAX_THREADS_PER_CORE: usize = 4;

impl ThreadArgs {
    /// The pool of `--threads` workers ([`ThreadArgs::count`]) and its size.
    pub fn pool(&self) -> Result<(rayon::ThreadPool, usize)> {
        let threads = self.count()?;
        Ok((dlrm::spec::thread_pool(threads)?, threads))
    }

    /// The number of `--threads` (checked: at least 1, at most 4 x the logical cores unless
    /// --oversubscribe; default the physical cores).
    pub fn count(&self) -> Result<usize> {
        Ok(match self.threads {
            Some(0) => anyhow::bail!("--threads 0: at least one thread is needed"),
            Some(n) => {
                let cores = num_cpus::get();
                let limit = cores.saturating_mul(MAX_THREADS_PER_CORE);
                anyhow::ensure!(
                    n <= limit || self.oversubscribe,
                    "--threads {n} is more than {MAX_THREADS_PER_CORE} x the {cores} logical cores ({limit}); add --oversubscribe to run that many"
                );
                n
            }
            None => num_cpus::get_physical().max(1),
        })
    }
}

/// Refuses 0 for the flags given that count what must exist (a batch, an epoch, a sample, a
/// checkpoint kept): `(flag, value)` pairs, `None` for a flag not given.
pub fn ensure_at_least_one(flags: &[(&str, Option<u64>)]) -> Result<()> {
    match flags.iter().find(|(_, v)| *v == Some(0)) {
        Some((flag, _)) => anyhow::bail!("{flag} 0: must be at least 1"),
        None => Ok(()),
    }
}

/// Refuses a `--zipf-alpha` that is not a positive number (the exponent of the id distribution).
pub fn ensure_zipf_alpha(alpha: f64) -> Result<()> {
    anyhow::ensure!(
        alpha > 0.0 && alpha.is_finite(),
        "--zipf-alpha must be a positive number"
    );
    Ok(())
}

/// Samples of `num_batches` batches of `batch_size` (the default size of synthetic data),
/// refused when the product overflows.
pub fn samples_of(num_batches: usize, batch_size: usize) -> Result<u64> {
    (num_batches as u64)
        .checked_mul(batch_size as u64)
        .with_context(|| {
            format!("--num-batches {num_batches} x --mini-batch-size {batch_size} samples is more than 2^64")
        })
}

/// Checks that a command may write `out` (its `--out`): never when it is one of `inputs` (the
/// same file under any path, which writing would destroy before it is read), and only with
/// `--force` when anything else exists there.
pub fn check_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let Ok(target) = std::fs::metadata(out) else {
        return Ok(());
    };
    for input in inputs {
        if let Ok(m) = std::fs::metadata(input)
            && (m.dev(), m.ino()) == (target.dev(), target.ino())
        {
            bail!(
                "--out {} is the input {}: writing it would destroy the input; choose another output",
                out.display(),
                input.display()
            );
        }
    }
    ensure!(
        force,
        "--out {} already exists: choose another path, or give --force to replace it",
        out.display()
    );
    Ok(())
}
