//! Scoring raw Criteo rows with a trained model: lines are parsed in parallel, encoded with the
//! dictionaries (or hashing settings) the model was trained with, and scored batch by batch on
//! the forward pass only.

use crate::cancel::Cancel;
use crate::data::Batch;
use crate::data::criteo::{NUM_CATEGORICAL, NUM_DENSE, RawRow, dense_feature, parse_line};
use crate::data::preprocess::{Encoder, LineError};
use crate::model::Model;
use crate::names::Field;
use crate::train::{ensure_finite_predictions, reserve_checked};
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Instant;

/// Lines parsed per parallel round (and scored in batches of the model's size).
const LINES_PER_ROUND: usize = 1 << 16;

/// Skipped lines kept in the summary as examples.
const BAD_EXAMPLES: usize = 3;

/// What scoring a file did.
#[derive(Clone, Debug, Default)]
pub struct ScoreSummary {
    /// Lines read, and lines that could not be parsed (skipped).
    pub lines: u64,
    pub skipped: u64,
    /// The first lines skipped (file, line, field, reason), for the caller to report.
    pub bad_examples: Vec<String>,
    pub seconds: f64,
    /// The probabilities and labels of the scored rows, when asked to keep them (evaluation).
    pub probs: Vec<f32>,
    pub labels: Vec<f32>,
}

impl ScoreSummary {
    pub fn rows_per_sec(&self) -> f64 {
        (self.lines - self.skipped) as f64 / self.seconds.max(1e-9)
    }
}

/// How to score a file.
pub struct ScoreOptions<'a> {
    pub labelled: bool,
    pub skip_bad_lines: bool,
    pub batch_size: usize,
    /// Keep probabilities and labels in the summary.
    pub keep: bool,
    /// Write one line per input line: the probability, or `NaN` for a skipped line.
    pub out: Option<&'a mut dyn Write>,
    /// Checked between rounds of lines.
    pub cancel: Cancel,
}

/// Encodes parsed rows into `batch` (one id per table per row: Criteo features are one-hot).
pub fn encode_rows(encoder: &Encoder, rows: &[RawRow], labelled: bool, batch: &mut Batch) {
    batch.clear();
    batch.num_dense = NUM_DENSE;
    batch.indices.resize(NUM_CATEGORICAL, Vec::new());
    batch.offsets.resize(NUM_CATEGORICAL, Vec::new());
    for row in rows {
        batch
            .labels
            .push(if labelled && row.label { 1.0 } else { 0.0 });
        batch
            .dense
            .extend(row.dense.iter().map(|&x| dense_feature(x)));
    }
    // One-hot tables: no offsets (see Batch::offsets).
    for (t, ids) in batch.indices.iter_mut().enumerate() {
        ids.extend(rows.iter().map(|r| encoder.id(t, r.categorical[t])));
    }
}

/// Reads up to `LINES_PER_ROUND` lines of `reader` into `lines` (without their `\n`; the
/// parser drops a `\r` itself); none at the end of the file.
fn read_round(reader: &mut impl BufRead, input: &Path, lines: &mut Vec<Vec<u8>>) -> Result<()> {
    lines.clear();
    for _ in 0..LINES_PER_ROUND {
        let mut line = Vec::new();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("{}: cannot read", input.display()))?;
        if n == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        lines.push(line);
    }
    Ok(())
}

/// Parses a round of lines, the first being line `first_line` of `input`, in parallel: a row
/// per line, `None` for a bad line skipped (counted in `summary`, the first few kept as
/// examples); a bad line is an error unless `opts.skip_bad_lines`.
fn parse_round(
    lines: &[Vec<u8>],
    first_line: u64,
    input: &Path,
    labelled: bool,
    skip_bad_lines: bool,
    summary: &mut ScoreSummary,
) -> Result<Vec<Option<RawRow>>> {
    let results: Vec<Result<RawRow, LineError>> = lines
        .par_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut row = RawRow::default();
            parse_line(l, labelled, &mut row)
                .map(|()| row)
                .map_err(|error| LineError {
                    path: input.display().to_string(),
                    line: first_line + i as u64,
                    error,
                })
        })
        .collect();
    results
        .into_iter()
        .map(|r| match r {
            Ok(row) => Ok(Some(row)),
            Err(e) if skip_bad_lines => {
                summary.skipped += 1;
                if summary.bad_examples.len() < BAD_EXAMPLES {
                    summary.bad_examples.push(e.to_string());
                }
                Ok(None)
            }
            Err(e) => bail!("{e}"),
        })
        .collect()
}

/// Writes a score per line of the round: the row's, or NaN for a skipped line.
fn write_scores(out: &mut dyn Write, parsed: &[Option<RawRow>], scores: &[f32]) -> Result<()> {
    use std::fmt::Write as _;
    let mut text = String::new();
    let mut s = scores.iter();
    for p in parsed {
        match p {
            Some(_) => {
                let _ = writeln!(text, "{}", s.next().expect("a score per parsed row"));
            }
            None => text.push_str("NaN\n"),
        }
    }
    out.write_all(text.as_bytes())
        .context("writing the predictions")
}

/// What scoring a file holds between rounds.
struct Scorer<'a> {
    model: &'a mut dyn Model,
    encoder: &'a Encoder,
    input: &'a Path,
    batch_size: usize,
    batch: Batch,
    probs: Vec<f32>,
}

impl Scorer<'_> {
    /// The scores of the round's parsed rows (`parsed`, its first line `first_line`), in
    /// batches; the labels go to `labels` when given.
    fn score(
        &mut self,
        parsed: &[Option<RawRow>],
        first_line: u64,
        labelled: bool,
        mut labels: Option<&mut Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let input = self.input;
        let good: Vec<RawRow> = parsed.iter().flatten().cloned().collect();
        let mut scores = Vec::with_capacity(good.len());
        for chunk in good.chunks(self.batch_size) {
            encode_rows(self.encoder, chunk, labelled, &mut self.batch);
            self.model
                .predict(&self.batch.view(), &mut self.probs)
                .with_context(|| format!("{}: lines from {first_line}", input.display()))?;
            ensure_finite_predictions(&*self.model, &self.probs, |i| {
                // The line of the (scores.len() + i)-th parsed row, skipped lines counted.
                let row = scores.len() + i;
                let at = parsed
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.is_some())
                    .nth(row);
                let line = first_line + at.map_or(row, |(j, _)| j) as u64;
                format!("{}:{line}", input.display())
            })?;
            scores.extend_from_slice(&self.probs);
            if let Some(labels) = labels.as_deref_mut() {
                labels.extend_from_slice(&self.batch.labels);
            }
        }
        Ok(scores)
    }
}

/// Scores every line of `input` with `model` (whose tables must match `encoder`'s).
pub fn score_file(
    model: &mut dyn Model,
    encoder: &Encoder,
    input: &Path,
    mut opts: ScoreOptions,
) -> Result<ScoreSummary> {
    let sizes = encoder.table_sizes();
    anyhow::ensure!(
        model.num_tables() == sizes.len() && model.num_dense() == NUM_DENSE,
        "the model has {} tables and {} dense features; Criteo rows have {} and {NUM_DENSE}",
        model.num_tables(),
        model.num_dense(),
        sizes.len()
    );
    let file =
        std::fs::File::open(input).with_context(|| format!("{}: cannot open", input.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let started = Instant::now();
    let mut summary = ScoreSummary::default();
    let mut lines: Vec<Vec<u8>> = Vec::with_capacity(LINES_PER_ROUND);
    // A round of lines is the most one forward pass can take.
    let batch_size = opts.batch_size.min(LINES_PER_ROUND);
    reserve_checked(model, batch_size, false, Field::BatchSize)?;
    let mut scorer = Scorer {
        model,
        encoder,
        input,
        batch_size,
        batch: Batch::default(),
        probs: Vec::new(),
    };
    loop {
        opts.cancel.check()?;
        read_round(&mut reader, input, &mut lines)?;
        if lines.is_empty() {
            break;
        }
        let first_line = summary.lines + 1;
        let (labelled, skip) = (opts.labelled, opts.skip_bad_lines);
        let parsed = parse_round(&lines, first_line, input, labelled, skip, &mut summary)?;
        summary.lines += lines.len() as u64;
        let labels = opts.keep.then_some(&mut summary.labels);
        let scores = scorer.score(&parsed, first_line, opts.labelled, labels)?;
        if let Some(out) = opts.out.as_deref_mut() {
            write_scores(out, &parsed, &scores)?;
        }
        if opts.keep {
            summary.probs.extend_from_slice(&scores);
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
