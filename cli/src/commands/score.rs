//! `dlrm eval` and `dlrm predict`: a saved model on held-out or new data, forward pass only.

use super::ThreadArgs;
use super::choice;
use anyhow::{Context, Result};
use clap::Args;
use dlrm::cancel::{Cancel, PartialFile, note_removed};
use dlrm::checkpoint::{self, DATASET_DIR};
use dlrm::data::Batch;
use dlrm::data::binary::{BinaryDataset, DatasetSplit};
use dlrm::data::preprocess::Encoder;
use dlrm::metrics::EvalMetrics;
use dlrm::model::Model;
use dlrm::names::Field;
use dlrm::predict::{ScoreOptions, ScoreSummary, score_file};
use dlrm::storage::StorageKind;
use dlrm::train::{evaluate, reserve_checked};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Checkpoint folder (its LATEST version) or one version folder.
    #[arg(long)]
    load_model: PathBuf,
    /// Rows scored per forward pass.
    #[arg(long, default_value_t = 4096)]
    mini_batch_size: usize,
    #[command(flatten)]
    threads: ThreadArgs,
    /// Leave out lines that cannot be parsed (counted and reported; predict writes NaN for
    /// them) instead of stopping at the first.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Load the model even if some of its parameters are NaN or infinite (by default such a
    /// checkpoint is refused, naming the tensor and the first index).
    #[arg(long)]
    allow_non_finite: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A binary dataset (dlrm preprocess); its --eval-split is scored.
    #[arg(long, conflicts_with = "criteo", required_unless_present = "criteo")]
    dataset: Option<PathBuf>,
    /// Raw labelled Criteo rows, encoded as the model's training data was.
    #[arg(long)]
    criteo: Option<PathBuf>,
    /// The split of --dataset to score.
    #[arg(long, value_parser = choice::<DatasetSplit>(), default_value_t = DatasetSplit::Test)]
    eval_split: DatasetSplit,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Raw Criteo rows to score.
    #[arg(long)]
    criteo: PathBuf,
    /// The rows have no label column (Kaggle's test.txt).
    #[arg(long)]
    no_label: bool,
    /// Where to write one probability per input line.
    #[arg(long, short)]
    out: PathBuf,
    /// Replace --out if it exists (never the input itself).
    #[arg(long)]
    force: bool,
}

/// The model of a checkpoint, its tables mapped copy-on-write (nothing read up front, nothing
/// written back); its buffers are sized by the scoring, to the rows there are.
fn load(a: &ModelArgs) -> Result<(Box<dyn Model>, PathBuf)> {
    let version = checkpoint::resolve(&a.load_model)?;
    let opts = checkpoint::LoadOptions {
        allow_non_finite: a.allow_non_finite,
    };
    Ok((load_version(&version, opts)?, version))
}

/// The model of a checkpoint version, as [`load`] maps it.
pub fn load_version(version: &Path, opts: checkpoint::LoadOptions) -> Result<Box<dyn Model>> {
    let storage = StorageKind::File {
        dir: version.to_path_buf(),
        lazy_init: false,
    };
    Ok(checkpoint::load_model(version, &storage, opts)?.0)
}

/// The encoding the checkpoint's training data had.
pub fn encoder(version: &Path) -> Result<Encoder> {
    let dir = version.join(DATASET_DIR);
    anyhow::ensure!(
        dir.is_dir(),
        "{}: the model was not trained on a Criteo dataset, so the checkpoint has no dictionaries or hashing settings to encode raw rows with",
        version.display()
    );
    Encoder::load(&dir).with_context(|| format!("{}: loading the encoding", dir.display()))
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    anyhow::ensure!(
        a.model.mini_batch_size > 0,
        "--mini-batch-size must be at least 1"
    );
    a.model.threads.pool()?.0.install(|| {
        let (mut model, version) = load(&a.model)?;
        let t = Instant::now();
        let (m, rows): (EvalMetrics, u64) = match (&a.dataset, &a.criteo) {
            (Some(dir), _) => {
                let ds = BinaryDataset::open(dir)
                    .with_context(|| format!("opening the dataset {}", dir.display()))?
                    .with_eval_split(a.eval_split);
                checkpoint::check_encoding(&version, &checkpoint::read_meta(&version)?, &ds)?;
                let rows = ds.rows(a.eval_split);
                anyhow::ensure!(
                    rows > 0,
                    "{}: the {} split is empty: there is nothing to evaluate (choose another --eval-split)",
                    dir.display(),
                    a.eval_split.name()
                );
                // No batch is larger than the split.
                let batch_size = (a.model.mini_batch_size as u64).min(rows) as usize;
                reserve_checked(model.as_mut(), batch_size, false, Field::BatchSize)?;
                let mut batch = Batch::default();
                (evaluate(model.as_mut(), &ds, batch_size, &mut batch)?, rows)
            }
            (None, Some(file)) => {
                let s = score_file(
                    model.as_mut(),
                    &encoder(&version)?,
                    file,
                    ScoreOptions {
                        labelled: true,
                        skip_bad_lines: a.model.skip_bad_lines,
                        batch_size: a.model.mini_batch_size,
                        keep: true,
                        out: None,
                        cancel: Cancel::never(),
                    },
                )?;
                report_skipped(&s, file);
                anyhow::ensure!(
                    s.lines > s.skipped,
                    "{}: no rows to evaluate",
                    file.display()
                );
                (
                    EvalMetrics::compute(&s.probs, &s.labels),
                    s.lines - s.skipped,
                )
            }
            (None, None) => unreachable!("clap requires --dataset or --criteo"),
        };
        let secs = t.elapsed().as_secs_f64();
        println!("model {}", version.display());
        println!(
            "{rows} rows: loss {:.5}  accuracy {:.4}  {}  ({:.0} rows/s)",
            m.loss,
            m.accuracy,
            m.auc_and_ne(),
            rows as f64 / secs.max(1e-9)
        );
        Ok(())
    })
}

pub fn run_predict(a: PredictArgs, cancel: &Cancel) -> Result<()> {
    anyhow::ensure!(
        a.model.mini_batch_size > 0,
        "--mini-batch-size must be at least 1"
    );
    a.model.threads.pool()?.0.install(|| {
        let (mut model, version) = load(&a.model)?;
        let enc = encoder(&version)?;
        super::check_output(&a.out, &[&a.criteo], a.force)?;
        // Written beside the destination and renamed when complete, so a failed or interrupted
        // run never leaves a partial file that looks like a finished one.
        let partial = PartialFile::create(&a.out)?;
        let mut out = std::io::BufWriter::new(partial.file());
        let scored = score_file(
            model.as_mut(),
            &enc,
            &a.criteo,
            ScoreOptions {
                labelled: !a.no_label,
                skip_bad_lines: a.model.skip_bad_lines,
                batch_size: a.model.mini_batch_size,
                keep: false,
                out: Some(&mut out),
                cancel: cancel.clone(),
            },
        );
        let s = match scored {
            Ok(s) => s,
            Err(e) => {
                let removed = partial.path().to_path_buf();
                drop(out);
                drop(partial);
                return Err(note_removed(e, &removed));
            }
        };
        std::io::Write::flush(&mut out)
            .with_context(|| format!("{}: cannot write", partial.path().display()))?;
        drop(out);
        partial.commit()?;
        report_skipped(&s, &a.criteo);
        // The summary goes to stdout, as train's does; the probabilities are in --out.
        println!(
            "scored {} rows of {} into {} in {:.2} s ({:.0} rows/s)",
            s.lines - s.skipped,
            a.criteo.display(),
            a.out.display(),
            s.seconds,
            s.rows_per_sec()
        );
        Ok(())
    })
}

fn report_skipped(s: &ScoreSummary, file: &Path) {
    for e in &s.bad_examples {
        log::warn!("skipped {e}");
    }
    if s.skipped > 0 {
        log::warn!(
            "{}: skipped {} lines that could not be parsed",
            file.display(),
            s.skipped
        );
    }
}
