//! One module per subcommand.

pub mod compare;
pub mod export;
pub mod models;
pub mod preprocess;
pub mod progress;
pub mod serve;
pub mod synth;
pub mod train;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

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
    /// The pool of `--threads` workers (checked: at least 1, at most 4 x the logical cores
    /// unless --oversubscribe) and its size.
    pub fn pool(&self) -> Result<(rayon::ThreadPool, usize)> {
        let threads = match self.threads {
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
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .with_context(|| format!("building a pool of {threads} threads"))?;
        Ok((pool, threads))
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
