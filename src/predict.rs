//! Scoring raw Criteo rows with a trained model: lines are parsed in parallel, encoded with the
//! dictionaries (or hashing settings) the model was trained with, and scored batch by batch on
//! the forward pass only.

use crate::cancel::Cancel;
use crate::data::Batch;
use crate::data::criteo::{
    Field as RowField, NUM_CATEGORICAL, NUM_DENSE, ParseError, RawRow, dense_feature, num_fields,
    parse_hex, parse_line,
};
use crate::data::preprocess::{Encoder, LineError};
use crate::model::{BatchError, Model};
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

/// A round of lines: their bytes one after another (each without its `\n`; the parser drops a
/// `\r` itself) and where each ends, in buffers reused from round to round.
#[derive(Default)]
struct Lines {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Lines {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn line(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// Reads up to `LINES_PER_ROUND` lines of `reader` into `lines`; none at the end of the file.
fn read_round(reader: &mut impl BufRead, input: &Path, lines: &mut Lines) -> Result<()> {
    lines.bytes.clear();
    lines.ends.clear();
    for _ in 0..LINES_PER_ROUND {
        let n = reader
            .read_until(b'\n', &mut lines.bytes)
            .with_context(|| format!("{}: cannot read", input.display()))?;
        if n == 0 {
            break;
        }
        if lines.bytes.last() == Some(&b'\n') {
            lines.bytes.pop();
        }
        lines.ends.push(lines.bytes.len());
    }
    Ok(())
}

/// What parsing a round of lines gives: a row per good line, in order (the buffer reused from
/// round to round), and the positions in the round of the bad lines skipped, ascending.
#[derive(Default)]
struct ParsedRound {
    rows: Vec<RawRow>,
    bad: Vec<usize>,
}

impl ParsedRound {
    /// The position in the round of the `row`-th good line.
    fn line_of(&self, row: usize) -> usize {
        let mut at = row;
        for &b in &self.bad {
            if b > at {
                break;
            }
            at += 1;
        }
        at
    }
}

/// Parses a round of lines, the first being line `first_line` of `input`, in parallel into
/// `parsed`; a bad line is an error unless `skip_bad_lines`, when it is skipped (counted in
/// `summary`, the first few kept as examples).
fn parse_round(
    lines: &Lines,
    first_line: u64,
    input: &Path,
    (labelled, skip_bad_lines): (bool, bool),
    summary: &mut ScoreSummary,
    parsed: &mut ParsedRound,
) -> Result<()> {
    parsed.rows.resize(lines.len(), RawRow::default());
    // An indexed parallel iterator collects in order: the errors come by line.
    let errors: Vec<(usize, ParseError)> = parsed
        .rows
        .par_iter_mut()
        .enumerate()
        .filter_map(|(i, row)| {
            parse_line(lines.line(i), labelled, row)
                .err()
                .map(|e| (i, e))
        })
        .collect();
    parsed.bad.clear();
    for (i, error) in errors {
        let e = LineError {
            path: input.display().to_string(),
            line: first_line + i as u64,
            error,
        };
        if !skip_bad_lines {
            bail!("{e}");
        }
        summary.skipped += 1;
        if summary.bad_examples.len() < BAD_EXAMPLES {
            summary.bad_examples.push(e.to_string());
        }
        parsed.bad.push(i);
    }
    if !parsed.bad.is_empty() {
        let (mut i, mut next_bad) = (0, parsed.bad.iter().peekable());
        parsed.rows.retain(|_| {
            let bad = next_bad.next_if_eq(&&i).is_some();
            i += 1;
            !bad
        });
    }
    Ok(())
}

/// Writes a score per line of the round: the row's, or NaN for a skipped line.
fn write_scores(
    out: &mut dyn Write,
    lines: usize,
    parsed: &ParsedRound,
    scores: &[f32],
) -> Result<()> {
    use std::fmt::Write as _;
    let mut text = String::new();
    let (mut s, mut next_bad) = (scores.iter(), parsed.bad.iter().peekable());
    for i in 0..lines {
        if next_bad.next_if_eq(&&i).is_some() {
            text.push_str("NaN\n");
        } else {
            let _ = writeln!(text, "{}", s.next().expect("a score per parsed row"));
        }
    }
    out.write_all(text.as_bytes())
        .context("writing the predictions")
}

/// Encodes `rows` with `encoder` into `batch` and writes the model's probabilities into `out`:
/// one forward pass, as many rows as the model's buffers were reserved for.
pub fn score_rows(
    model: &mut dyn Model,
    encoder: &Encoder,
    rows: &[RawRow],
    labelled: bool,
    batch: &mut Batch,
    out: &mut Vec<f32>,
) -> Result<(), BatchError> {
    encode_rows(encoder, rows, labelled, batch);
    model.predict(&batch.view(), out)
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
    /// The scores of the round's parsed rows (its first line `first_line`), in batches; the
    /// labels go to `labels` when given.
    fn score(
        &mut self,
        parsed: &ParsedRound,
        first_line: u64,
        labelled: bool,
        mut labels: Option<&mut Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let input = self.input;
        let mut scores = Vec::with_capacity(parsed.rows.len());
        for chunk in parsed.rows.chunks(self.batch_size) {
            let (model, encoder) = (&mut *self.model, self.encoder);
            score_rows(
                model,
                encoder,
                chunk,
                labelled,
                &mut self.batch,
                &mut self.probs,
            )
            .with_context(|| format!("{}: lines from {first_line}", input.display()))?;
            ensure_finite_predictions(&*self.model, &self.probs, |i| {
                let line = first_line + parsed.line_of(scores.len() + i) as u64;
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
    let mut lines = Lines::default();
    let mut parsed = ParsedRound::default();
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
        let flags = (opts.labelled, opts.skip_bad_lines);
        parse_round(&lines, first_line, input, flags, &mut summary, &mut parsed)?;
        summary.lines += lines.len() as u64;
        let labels = opts.keep.then_some(&mut summary.labels);
        let scores = scorer.score(&parsed, first_line, opts.labelled, labels)?;
        if let Some(out) = opts.out.as_deref_mut() {
            write_scores(out, lines.len(), &parsed, &scores)?;
        }
        if opts.keep {
            summary.probs.extend_from_slice(&scores);
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Why the rows of a request (the scoring server's) cannot be scored: the row (1-based) and the
/// field are named.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request has no rows")]
    NoRows,
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("row {row}: {what}")]
    Row { row: usize, what: String },
}

/// Appends the rows of a body of Criteo lines to `rows`: tab-separated, each with or without
/// its label column (told by its field count: 39 fields have none), as `predict` reads them.
/// A last `\n` ends the last line.
pub fn parse_tsv_rows(body: &[u8], rows: &mut Vec<RawRow>) -> Result<(), RequestError> {
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if body.is_empty() {
        return Err(RequestError::NoRows);
    }
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let fields = memchr::memchr_iter(b'\t', line).count() + 1;
        let mut row = RawRow::default();
        parse_line(line, fields != num_fields(false), &mut row).map_err(|e| RequestError::Row {
            row: i + 1,
            what: e.to_string(),
        })?;
        rows.push(row);
    }
    Ok(())
}

/// Appends the rows of a JSON body to `rows`: `{"rows": [{"dense": [13 values], "sparse": [26
/// values]}, ...]}`. A dense value is the raw integer count of a Criteo line (an integral
/// number; `null` for an empty field); a sparse value is the raw category, as the hexadecimal
/// string of a Criteo line or as the number it writes (`null` or `""` for an empty field). A
/// row may carry a `"label"` (0 or 1), which scoring ignores.
pub fn parse_json_rows(body: &[u8], rows: &mut Vec<RawRow>) -> Result<(), RequestError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        rows: Vec<serde_json::Value>,
    }
    // serde_json refuses nesting deeper than 128 levels: no input can exhaust the stack.
    let body: Body = serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))?;
    if body.rows.is_empty() {
        return Err(RequestError::NoRows);
    }
    for (i, value) in body.rows.iter().enumerate() {
        let row = json_row(value).map_err(|what| RequestError::Row { row: i + 1, what })?;
        rows.push(row);
    }
    Ok(())
}

/// Longest excerpt of a bad JSON value quoted in an error.
const JSON_QUOTE_LEN: usize = 40;

/// A JSON value as an error quotes it: its text, cut to `JSON_QUOTE_LEN` characters.
fn quote(value: &serde_json::Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(JSON_QUOTE_LEN) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// One row of a JSON body (see [`parse_json_rows`]); the error names the field.
fn json_row(value: &serde_json::Value) -> Result<RawRow, String> {
    let object = value.as_object().ok_or_else(|| {
        format!(
            "{} is not an object with \"dense\" and \"sparse\"",
            quote(value)
        )
    })?;
    if let Some(key) = object
        .keys()
        .find(|k| !["dense", "sparse", "label"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown key {key:?} (a row has \"dense\", \"sparse\" and optionally \"label\")"
        ));
    }
    let mut row = RawRow::default();
    if let Some(label) = object.get("label") {
        row.label = match label.as_u64() {
            Some(0) => false,
            Some(1) => true,
            _ => return Err(format!("label: {} is not 0 or 1", quote(label))),
        };
    }
    let values = |key: &str, count: usize| -> Result<&Vec<serde_json::Value>, String> {
        match object.get(key) {
            Some(serde_json::Value::Array(a)) if a.len() == count => Ok(a),
            Some(serde_json::Value::Array(a)) => Err(format!(
                "\"{key}\" has {} values, expected {count}",
                a.len()
            )),
            Some(v) => Err(format!("\"{key}\": {} is not an array", quote(v))),
            None => Err(format!("no \"{key}\" ({count} values)")),
        }
    };
    let bad = |key: &str, i: usize, field: RowField, v: &serde_json::Value, why: &str| {
        format!("{key}[{i}] ({field}): {} {why}", quote(v))
    };
    for (i, (v, x)) in values("dense", NUM_DENSE)?
        .iter()
        .zip(&mut row.dense)
        .enumerate()
    {
        *x = json_count(v).ok_or_else(|| {
            bad(
                "dense",
                i,
                RowField::Integer(i),
                v,
                "is not an integer count (within 64 bits) or null",
            )
        })?;
    }
    for (i, (v, x)) in values("sparse", NUM_CATEGORICAL)?
        .iter()
        .zip(&mut row.categorical)
        .enumerate()
    {
        *x = json_category(v).ok_or_else(|| {
            bad(
                "sparse",
                i,
                RowField::Categorical(i),
                v,
                "is not a category (1 to 8 hexadecimal digits, a number below 2^32, or null)",
            )
        })?;
    }
    Ok(row)
}

/// A dense JSON value: `Some(None)` for an empty field, `None` for a value that is no count.
fn json_count(v: &serde_json::Value) -> Option<Option<i64>> {
    use serde_json::Value;
    match v {
        Value::Null => Some(None),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(x), _) => Some(Some(x)),
            // An integral float within i64: below 2^63 in magnitude (-2^63 itself is an i64,
            // which `as_i64` took).
            (None, Some(x)) if x.fract() == 0.0 && x.abs() < -(i64::MIN as f64) => {
                Some(Some(x as i64))
            }
            _ => None,
        },
        _ => None,
    }
}

/// A sparse JSON value: `Some(None)` for an empty field, `None` for a value that is no
/// category.
fn json_category(v: &serde_json::Value) -> Option<Option<u32>> {
    use serde_json::Value;
    match v {
        Value::Null => Some(None),
        Value::String(s) if s.is_empty() => Some(None),
        Value::String(s) => parse_hex(s.as_bytes()).map(Some),
        Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()).map(Some),
        _ => None,
    }
}
