//! `dlrm preprocess`: raw Criteo files into a binary dataset (and the settings that
//! `dlrm train --criteo` shares).

use super::ThreadArgs;
use anyhow::{Context, Result};
use clap::Args;
use dlrm::cancel::Cancel;
use dlrm::data::binary::Encoding;
use dlrm::data::preprocess::{
    CHUNK_BYTES, EncodingChoice, PreprocessOptions, PreprocessSummary, Sources, preprocess,
};
use std::path::{Path, PathBuf};

/// How raw rows become a dataset: the settings `dlrm preprocess` and `dlrm train --criteo`
/// share.
#[derive(Args, Clone, Debug, Default)]
pub struct EncodingArgs {
    /// Values seen at least this many times in the training split get their own embedding
    /// row; rarer and unseen values share one, empty fields have their own [default: 1]
    #[arg(long)]
    pub min_frequency: Option<u64>,
    /// Weights of training, validation and test: the input lines, in order, are cut in these
    /// proportions (Criteo rows are in time order) [default: the reference's Kaggle split: the
    /// lines cut into 7 days as dlrm_s_pytorch.py cuts train.txt (divmod, the first days one
    /// line longer), days 1-6 training, the 7th halved: first half (rounded up) test, second
    /// half validation]
    #[arg(long)]
    pub split: Option<String>,
    /// Shuffle the training split with this seed (else rows stay in file order).
    #[arg(long)]
    pub shuffle_seed: Option<u64>,
    /// Leave out lines that do not parse (they are counted and the first ones reported)
    /// instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
}

impl EncodingArgs {
    /// Whether any of these flags was given.
    pub fn any(&self) -> bool {
        self.min_frequency.is_some()
            || self.split.is_some()
            || self.shuffle_seed.is_some()
            || self.skip_bad_lines
    }

    /// The lines of `files` cut by --split, or as the reference cuts Kaggle's train.txt.
    pub fn sources(&self, files: Vec<PathBuf>) -> Result<Sources> {
        Ok(match &self.split {
            Some(text) => Sources::Weights {
                files,
                weights: Self::weights(text)?,
            },
            None => Sources::ReferenceKaggle { files },
        })
    }

    /// The split weights (train, validation, test) of --split.
    fn weights(text: &str) -> Result<[f64; 3]> {
        let parts: Vec<&str> = text.split(',').collect();
        let bad = || {
            anyhow::anyhow!(
                "--split: '{text}' is not three non-negative weights separated by commas, e.g. 0.8,0.1,0.1"
            )
        };
        anyhow::ensure!(parts.len() == 3, bad());
        let mut w = [0.0f64; 3];
        for (x, p) in w.iter_mut().zip(parts) {
            *x = p.trim().parse().map_err(|_| bad())?;
            anyhow::ensure!(x.is_finite() && *x >= 0.0, bad());
        }
        anyhow::ensure!(w.iter().sum::<f64>() > 0.0, bad());
        Ok(w)
    }

    /// The reference's hashing modulo `max_ind_range` when given, else frequency dictionaries.
    pub fn encoding(&self, max_ind_range: Option<u64>) -> Result<Encoding> {
        Ok(match max_ind_range {
            Some(n) => {
                anyhow::ensure!(
                    self.min_frequency.is_none(),
                    "--min-frequency builds dictionaries, --max-ind-range hashes: choose one"
                );
                Encoding::HashFirstSeen { max_ind_range: n }
            }
            None => Encoding::Dictionary {
                min_frequency: self.min_frequency.unwrap_or(1),
            },
        })
    }
}

#[derive(Args, Debug)]
pub struct PreprocessArgs {
    /// Raw Criteo files (tab-separated); their lines, in order, are cut into training,
    /// validation and test by --split.
    #[arg(
        required_unless_present = "train_files",
        conflicts_with = "train_files"
    )]
    inputs: Vec<PathBuf>,
    /// Training day files, for the Terabyte layout (with --eval-files, instead of INPUTS).
    #[arg(long, num_args = 1.., requires = "eval_files")]
    train_files: Vec<PathBuf>,
    /// Evaluation day files: their lines, in order, are split in half as the reference splits
    /// Terabyte's last day: the first half (rounded up) test, the second validation.
    #[arg(long, num_args = 1.., requires = "train_files")]
    eval_files: Vec<PathBuf>,
    /// The dataset folder to create (it appears only when complete).
    #[arg(long, short)]
    out: PathBuf,
    /// Replace --out if it exists (once the new dataset is complete; never an input).
    #[arg(long)]
    force: bool,
    /// Encode as the reference's --max-ind-range does, instead of building frequency
    /// dictionaries: each categorical value (an empty one is 0) is hashed modulo this number,
    /// and the distinct hashed values of all rows are numbered in order of first appearance,
    /// so each table has min(distinct values, this) rows. 4294967296 (2^32) hashes nothing:
    /// the reference's encoding without --max-ind-range.
    #[arg(long)]
    max_ind_range: Option<u64>,
    #[command(flatten)]
    encoding: EncodingArgs,
    /// Encode the categories as the dataset in this folder did (its dictionaries or hashing):
    /// for new rows to predict or evaluate.
    #[arg(long, conflicts_with_all = ["max_ind_range", "min_frequency"])]
    encode_like: Option<PathBuf>,
    /// The files have no label column (Kaggle's test.txt).
    #[arg(long)]
    no_label: bool,
    #[command(flatten)]
    threads: ThreadArgs,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

pub fn run(a: PreprocessArgs, cancel: &Cancel) -> Result<()> {
    let inputs: Vec<&Path> = a
        .inputs
        .iter()
        .chain(&a.train_files)
        .chain(&a.eval_files)
        .chain(&a.encode_like)
        .map(PathBuf::as_path)
        .collect();
    super::check_output(&a.out, &inputs, a.force)?;
    // An existing output (with --force) is replaced only once the new dataset is complete:
    // the dataset is written beside it first.
    let replaced = a.out.symlink_metadata().is_ok();
    let written = if replaced {
        let mut name = a.out.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".replacing-{}", std::process::id()));
        a.out.with_file_name(name)
    } else {
        a.out.clone()
    };
    let sources = if a.train_files.is_empty() {
        a.encoding.sources(a.inputs.clone())?
    } else {
        anyhow::ensure!(
            a.encoding.split.is_none(),
            "--split cuts INPUTS; with --train-files and --eval-files the evaluation files are split in half"
        );
        Sources::Days {
            train: a.train_files.clone(),
            eval: a.eval_files.clone(),
        }
    };
    let encoding = match &a.encode_like {
        Some(dir) => EncodingChoice::Like(dir.clone()),
        None => EncodingChoice::New(a.encoding.encoding(a.max_ind_range)?),
    };
    let opts = PreprocessOptions {
        sources,
        out: written.clone(),
        encoding,
        labelled: !a.no_label,
        skip_bad_lines: a.encoding.skip_bad_lines,
        shuffle_seed: a.encoding.shuffle_seed,
        chunk_bytes: CHUNK_BYTES,
        progress: super::progress::passes(),
        cancel: cancel.clone(),
    };
    let (pool, _) = a.threads.pool()?;
    let mut summary = pool.install(|| preprocess(&opts))?;
    if replaced {
        let old = &a.out;
        if old.is_dir() {
            std::fs::remove_dir_all(old)
        } else {
            std::fs::remove_file(old)
        }
        .with_context(|| format!("replacing {}: cannot remove it", old.display()))?;
        std::fs::rename(&written, old)
            .with_context(|| format!("renaming {} to {}", written.display(), old.display()))?;
        summary.out = a.out.clone();
    }
    print_summary(&summary);
    if let Some(path) = &a.summary_json {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the summary to {}", path.display()))?;
    }
    Ok(())
}

pub fn print_summary(s: &PreprocessSummary) {
    println!("\n== preprocess summary ==");
    println!("input   {:.1} MB, {} lines", s.bytes as f64 / 1e6, s.lines);
    println!(
        "rows    train {}, validation {}, test {}; bad lines left out: {}",
        s.rows.train, s.rows.val, s.rows.test, s.bad_lines
    );
    for e in &s.bad_examples {
        println!("        {e}");
    }
    for p in &s.removed_partials {
        println!("removed {}, left by a run that was killed", p.display());
    }
    let largest = s.table_sizes.iter().max().copied().unwrap_or(0);
    println!(
        "tables  {}, {} rows in all (largest {largest})",
        s.table_sizes.len(),
        s.table_sizes.iter().sum::<u64>()
    );
    let p = &s.pass_seconds;
    println!(
        "time    {:.2} s (lines {:.2} s, dictionaries {:.2} s, encode {:.2} s, shuffle {:.2} s)",
        s.seconds, p.lines, p.dictionaries, p.encode, p.shuffle
    );
    println!(
        "speed   {:.1} MB/s, {:.0} rows/s on {} threads",
        s.mb_per_sec(),
        s.rows_per_sec(),
        s.threads
    );
    println!("output  {}", s.out.display());
}
