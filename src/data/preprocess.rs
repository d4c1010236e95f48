//! Raw Criteo TSV files into the binary dataset ([`super::binary`]), in parallel and in
//! memory that grows with the number of distinct categorical values, never with the number of
//! rows (row counts are u64). The counts take 16 to 32 bytes per distinct value (tables of
//! 8-byte slots, a quarter to half full) and the dictionaries as much again, so Kaggle's 33.8M
//! distinct values need under 2.5 GiB; the rows in flight are a few chunks per thread.
//!
//! The passes over the input:
//! 1. **lines**: each file is cut into chunks of about [`CHUNK_BYTES`] at line ends and every
//!    chunk's lines are counted (a SIMD newline count, in parallel). Split boundaries are line
//!    numbers, so they are known before any line is parsed, and every chunk knows the number of
//!    its first line (for errors) and its first row (for splits).
//! 2. **dictionaries** (dictionary encodings only): the training lines are parsed and each
//!    table's values counted (value -> count); or, for the reference's hash_first_seen
//!    encoding, every line is parsed and each table's distinct hashed values numbered in order
//!    of first appearance (each chunk lists its own in order, and the lists are merged in
//!    chunk order, so the numbering is that of a sequential pass).
//! 3. **encode**: every line is parsed, its integers transformed, its categories encoded, and
//!    the row appended to its split's arrays; training rows go to shuffle buckets when the
//!    training split is shuffled.
//! 4. **shuffle** (optional): each bucket is read, permuted and appended to the training
//!    arrays. A random bucket per row and a uniform permutation of every bucket make a uniform
//!    permutation of the whole split (Rao 1961, Sandelius 1962), with one bucket per thread in
//!    memory.
//!
//! Chunks are parsed in parallel, in rounds; the sequential part of a round (counting,
//! writing) runs next to the parsing of the next round (`rayon::join`). Which rows land where,
//! and every byte written, depend on the input and the settings only, not on the thread count.
//!
//! The output is written to a temporary folder next to the target and renamed only on
//! success: an error (a bad line, a full disk) leaves nothing under the target name.

use super::binary::{
    Columns, DatasetHeader, DatasetSplit, Encoding, FORMAT_NAME, FORMAT_VERSION, SourceFile,
    SplitRows, SplitRule, SplitWriter, compute_encoding_fingerprint, dictionary_file,
    write_u32_file,
};
use super::criteo::{NUM_CATEGORICAL, NUM_DENSE, ParseError, RawRow, dense_feature, parse_line};
use crate::cancel::{Cancel, note_removed, partial_path, remove_stale_partials};
use crate::names::{Field, ensure_field};
use crate::rng::{SplitMix64, counter_hash, derive_key};
use anyhow::{Context, Result};
use dlrm_kernels::simd::prefetch_read;
use rayon::prelude::*;
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;

/// Target size of a chunk: large enough that per-chunk overheads vanish, small enough that a
/// round of chunks per thread stays a few tens of MiB in flight.
pub const CHUNK_BYTES: u64 = 4 << 20;
/// Values counted ahead of the one whose slot is being prefetched.
const PREFETCH_DISTANCE: usize = 16;
/// Chunks per thread in one round of parallel parsing.
const ROUND_CHUNKS_PER_THREAD: usize = 4;
/// Expected size of a shuffle bucket (the shuffle holds about three times this per thread).
const BUCKET_BYTES: u64 = 32 << 20;
/// Bad lines quoted in the summary with --skip-bad-lines.
const MAX_BAD_EXAMPLES: usize = 5;

/// Dictionary encoding: the row of an empty field.
pub const EMPTY_ID: u32 = 0;
/// Dictionary encoding: the row shared by values below the minimum frequency and values never
/// seen in the training split.
pub const RARE_ID: u32 = 1;
/// Dictionary encoding: the row of the most frequent value; the others follow by decreasing
/// count (ties by value), so hot rows sit together in the table.
pub const FIRST_VALUE_ID: u32 = 2;
/// hash_first_seen encoding: the row of a hashed value missing from the dictionary (only rows
/// encoded after the dictionary was made, with `--encode-like`, can have one).
pub const UNSEEN_ID: u32 = 0;

/// The input files and which of their lines go to which split.
#[derive(Clone, Debug, PartialEq)]
pub enum Sources {
    /// The lines of `files`, in order, cut by the weights (train, validation, test): Kaggle
    /// style for one file, whose rows are in time order.
    Weights {
        files: Vec<PathBuf>,
        weights: [f64; 3],
    },
    /// Training day files, and evaluation day files whose lines are split in half (test, then
    /// validation): the Terabyte layout.
    Days {
        train: Vec<PathBuf>,
        eval: Vec<PathBuf>,
    },
    /// The lines of `files`, in order, split as the reference splits Kaggle's train.txt
    /// ([`SplitRule::ReferenceKaggle`]).
    ReferenceKaggle { files: Vec<PathBuf> },
}

/// Where the categorical encoding comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum EncodingChoice {
    /// Built from these settings (dictionaries from the training split).
    New(Encoding),
    /// The encoding of an existing dataset, so that new rows get the ids the training rows
    /// got.
    Like(PathBuf),
}

/// Watches the passes of preprocessing (the CLI draws a progress bar); every method has an
/// empty default. Called from the pool's threads.
pub trait PassObserver: Send + Sync {
    /// A pass named `what` over `bytes` bytes of input starts.
    fn started(&self, what: &'static str, bytes: u64) {
        let _ = (what, bytes);
    }
    /// `bytes` more bytes of the pass are done.
    fn advanced(&self, bytes: u64) {
        let _ = bytes;
    }
    /// Rows per second of the pass so far.
    fn rate(&self, rows_per_sec: f64) {
        let _ = rows_per_sec;
    }
    /// The pass is over.
    fn finished(&self) {}
}

/// The observer of a preprocessing run, if any.
#[derive(Clone)]
pub struct Progress(Option<Arc<dyn PassObserver>>);

impl Progress {
    /// Nobody watches.
    pub fn none() -> Progress {
        Progress(None)
    }

    pub fn new(observer: Arc<dyn PassObserver>) -> Progress {
        Progress(Some(observer))
    }

    fn start(&self, what: &'static str, bytes: u64) -> &Progress {
        if let Some(o) = &self.0 {
            o.started(what, bytes);
        }
        self
    }

    fn inc(&self, bytes: u64) {
        if let Some(o) = &self.0 {
            o.advanced(bytes);
        }
    }

    fn set_rate(&self, rows_per_sec: f64) {
        if let Some(o) = &self.0 {
            o.rate(rows_per_sec);
        }
    }

    fn finish(&self) {
        if let Some(o) = &self.0 {
            o.finished();
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(watched)"
        } else {
            "Progress(none)"
        })
    }
}

/// What `dlrm preprocess` does.
#[derive(Clone, Debug)]
pub struct PreprocessOptions {
    pub sources: Sources,
    /// The dataset folder to create (must not exist).
    pub out: PathBuf,
    pub encoding: EncodingChoice,
    /// Whether lines start with the label column.
    pub labelled: bool,
    /// Leave out (and count) bad lines instead of failing.
    pub skip_bad_lines: bool,
    /// Shuffle the training split with this seed.
    pub shuffle_seed: Option<u64>,
    /// Size of the chunks parsed in parallel ([`CHUNK_BYTES`]; the output does not depend on
    /// it).
    pub chunk_bytes: u64,
    /// Who watches the passes (a progress bar in the CLI; [`Progress::none`] for nobody).
    pub progress: Progress,
    /// Checked between rounds of chunks (`Cancel::never()` for work that is not cancelled).
    pub cancel: Cancel,
}

/// Seconds per pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PassSeconds {
    pub lines: f64,
    pub dictionaries: f64,
    pub encode: f64,
    pub shuffle: f64,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PreprocessSummary {
    pub out: PathBuf,
    /// Raw bytes read.
    pub bytes: u64,
    pub lines: u64,
    pub rows: SplitRows,
    pub bad_lines: u64,
    /// The first bad lines (file, line, field, reason).
    pub bad_examples: Vec<String>,
    /// Partial outputs that killed runs had left beside the output, removed first.
    pub removed_partials: Vec<PathBuf>,
    pub table_sizes: Vec<u64>,
    pub seconds: f64,
    pub pass_seconds: PassSeconds,
    pub threads: usize,
}

impl PreprocessSummary {
    /// Raw input throughput, in MB (10^6 bytes) per second of the whole run.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }

    pub fn rows_per_sec(&self) -> f64 {
        self.lines as f64 / self.seconds.max(1e-9)
    }
}

/// A bad line: where, and what is wrong.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{path}:{line}: {error}")]
pub struct LineError {
    pub path: String,
    /// 1-based.
    pub line: u64,
    pub error: ParseError,
}

/// A map from u32 keys to non-zero u32 values (counts, or dictionary positions + 1):
/// open addressing with linear probing, each key next to its value in one array, at most half
/// full. A lookup in a table larger than the caches costs one cache miss (a SwissTable costs
/// two: its control bytes, then its slot); encoding looks up 26 values per row.
#[derive(Clone, Debug)]
struct IdTable {
    /// (key, value) per slot; value 0 marks an empty slot.
    slots: Vec<(u32, u32)>,
    /// log2 of the slot count.
    bits: u32,
    len: usize,
}

/// Slots of an empty table.
const MIN_TABLE_BITS: u32 = 4;

impl Default for IdTable {
    fn default() -> IdTable {
        IdTable::with_capacity(0)
    }
}

impl IdTable {
    /// A table that holds `n` keys without growing.
    fn with_capacity(n: usize) -> IdTable {
        let bits = (2 * n)
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .max(MIN_TABLE_BITS);
        IdTable {
            slots: vec![(0, 0); 1 << bits],
            bits,
            len: 0,
        }
    }

    /// First slot of `key`: Fibonacci hashing (Knuth, TAOCP vol. 3, 6.4), whose top bits
    /// depend on every bit of the key.
    #[inline]
    fn home(&self, key: u32) -> usize {
        ((key as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - self.bits)) as usize
    }

    /// The slot holding `key`, or the empty slot where it would go.
    #[inline]
    fn find(&self, key: u32) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let (k, v) = self.slots[i];
            if v == 0 || k == key {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Starts loading the first slot of `key` into the cache: lookups and counts are random
    /// accesses into tables larger than the caches, so they are issued ahead of use.
    #[inline]
    fn prefetch(&self, key: u32) {
        prefetch_read(self.slots.as_ptr().wrapping_add(self.home(key)));
    }

    #[inline]
    fn get(&self, key: u32) -> Option<u32> {
        let v = self.slots[self.find(key)].1;
        (v != 0).then_some(v)
    }

    /// Sets `key` to `value` (non-zero).
    fn insert(&mut self, key: u32, value: u32) {
        debug_assert!(value != 0, "0 marks empty slots");
        self.reserve_one();
        let i = self.find(key);
        self.len += (self.slots[i].1 == 0) as usize;
        self.slots[i] = (key, value);
    }

    /// Counts one more `key` (saturating).
    #[inline]
    fn count(&mut self, key: u32) {
        self.reserve_one();
        let i = self.find(key);
        let slot = &mut self.slots[i];
        self.len += (slot.1 == 0) as usize;
        *slot = (key, slot.1.saturating_add(1));
    }

    fn reserve_one(&mut self) {
        if 2 * (self.len + 1) > self.slots.len() {
            let old = std::mem::replace(self, IdTable::with_capacity(self.len + 1));
            for (k, v) in old.iter() {
                let i = self.find(k);
                self.slots[i] = (k, v);
            }
            self.len = old.len;
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.slots.iter().copied().filter(|&(_, v)| v != 0)
    }
}

/// One table's dictionary.
#[derive(Default)]
struct Dictionary {
    /// Kept values in order (the encoding decides the id of position i).
    values: Vec<u32>,
    /// Value -> its position + 1 (IdTable values are non-zero).
    lookup: IdTable,
}

impl Dictionary {
    fn from_values(values: Vec<u32>) -> Dictionary {
        let mut lookup = IdTable::with_capacity(values.len());
        for (i, &v) in values.iter().enumerate() {
            lookup.insert(v, i as u32 + 1);
        }
        Dictionary { values, lookup }
    }

    /// The position of `value`, if kept.
    #[inline]
    fn position(&self, value: u32) -> Option<u32> {
        self.lookup.get(value).map(|p| p - 1)
    }

    /// Appends `value` unless it is already kept.
    fn push_new(&mut self, value: u32) {
        if self.lookup.get(value).is_none() {
            self.values.push(value);
            self.lookup.insert(value, self.values.len() as u32);
        }
    }

    /// Values counted at least `min_frequency` times, by decreasing count, then value.
    fn from_counts(counts: IdTable, min_frequency: u64) -> Dictionary {
        let mut kept: Vec<(u32, u32)> = counts
            .iter()
            .filter(|&(_, c)| c as u64 >= min_frequency)
            .collect();
        kept.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Dictionary::from_values(kept.into_iter().map(|(v, _)| v).collect())
    }
}

enum Tables {
    Hash(u64),
    Dictionary(Vec<Dictionary>),
    /// max_ind_range, and the hashed values of each table in order of first appearance.
    HashFirstSeen(u64, Vec<Dictionary>),
}

/// The reference's hash of a categorical value: an empty field is "0", then value mod
/// `max_ind_range`.
#[inline]
fn hash_value(value: Option<u32>, max_ind_range: u64) -> u32 {
    (value.unwrap_or(0) as u64 % max_ind_range) as u32
}

fn check_max_ind_range(max_ind_range: u64) -> Result<()> {
    ensure_field((1..=1 << 32).contains(&max_ind_range), move |n| {
        format!(
            "{} must be between 1 and 2^32 (ids are 32-bit), not {max_ind_range}",
            n(Field::MaxIndRange)
        )
    })?;
    Ok(())
}

/// Maps raw categorical values to table rows: hashing, or one dictionary per table. Saved in
/// the dataset folder, so that rows preprocessed later (`--encode-like`) get the same ids.
pub struct Encoder {
    encoding: Encoding,
    tables: Tables,
}

impl Encoder {
    /// Plain hashing: value mod `max_ind_range` (and 0 for an empty field) is the row, every
    /// table has `max_ind_range` rows ([`Encoding::Hash`]; the reference numbers the hashed
    /// values instead: [`Encoding::HashFirstSeen`]).
    pub fn hash(max_ind_range: u64) -> Result<Encoder> {
        check_max_ind_range(max_ind_range)?;
        Ok(Encoder {
            encoding: Encoding::Hash { max_ind_range },
            tables: Tables::Hash(max_ind_range),
        })
    }

    fn from_counts(counts: Vec<IdTable>, min_frequency: u64) -> Encoder {
        let dicts = counts
            .into_par_iter()
            .map(|c| Dictionary::from_counts(c, min_frequency))
            .collect();
        Encoder {
            encoding: Encoding::Dictionary { min_frequency },
            tables: Tables::Dictionary(dicts),
        }
    }

    /// The encoding of the dataset in `dir` (its header, and its dictionaries).
    pub fn load(dir: &Path) -> Result<Encoder> {
        let header = DatasetHeader::read(dir)?;
        anyhow::ensure!(
            header.num_dense == NUM_DENSE && header.num_tables() == NUM_CATEGORICAL,
            "{}: {} dense features and {} tables, Criteo rows have {NUM_DENSE} and {NUM_CATEGORICAL}",
            dir.display(),
            header.num_dense,
            header.num_tables()
        );
        let dicts = || -> Result<Vec<Dictionary>> {
            (0..header.num_tables())
                .map(|t| Ok(Dictionary::from_values(header.read_dictionary(dir, t)?)))
                .collect()
        };
        let tables = match header.encoding {
            Encoding::Hash { max_ind_range } => return Encoder::hash(max_ind_range),
            Encoding::Dictionary { .. } => Tables::Dictionary(dicts()?),
            Encoding::HashFirstSeen { max_ind_range } => {
                check_max_ind_range(max_ind_range)?;
                Tables::HashFirstSeen(max_ind_range, dicts()?)
            }
        };
        Ok(Encoder {
            encoding: header.encoding,
            tables,
        })
    }

    /// Writes the dictionaries (if any) into the dataset folder `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if let Tables::Dictionary(dicts) | Tables::HashFirstSeen(_, dicts) = &self.tables {
            for (t, d) in dicts.iter().enumerate() {
                let path = dir.join(dictionary_file(t));
                write_u32_file(&path, &d.values)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Ok(())
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Rows of each table.
    pub fn table_sizes(&self) -> Vec<u64> {
        match &self.tables {
            Tables::Hash(n) => vec![*n; NUM_CATEGORICAL],
            Tables::Dictionary(d) => d
                .iter()
                .map(|d| d.values.len() as u64 + FIRST_VALUE_ID as u64)
                .collect(),
            Tables::HashFirstSeen(_, d) => d.iter().map(|d| d.values.len() as u64).collect(),
        }
    }

    /// The row of `value` in table `table`.
    #[inline]
    pub fn id(&self, table: usize, value: Option<u32>) -> u32 {
        match (&self.tables, value) {
            (Tables::Hash(_), None) => 0,
            (Tables::Hash(n), Some(v)) => (v as u64 % n) as u32,
            (Tables::Dictionary(_), None) => EMPTY_ID,
            (Tables::Dictionary(d), Some(v)) => {
                d[table].position(v).map_or(RARE_ID, |p| FIRST_VALUE_ID + p)
            }
            (Tables::HashFirstSeen(n, d), v) => {
                d[table].position(hash_value(v, *n)).unwrap_or(UNSEEN_ID)
            }
        }
    }

    /// Starts loading the dictionary slots of a row's values (see [`IdTable::prefetch`]).
    #[inline]
    fn prefetch(&self, row: &RawRow) {
        match &self.tables {
            Tables::Hash(_) => {}
            Tables::Dictionary(d) => {
                for (dict, v) in d.iter().zip(&row.categorical) {
                    if let Some(v) = v {
                        dict.lookup.prefetch(*v);
                    }
                }
            }
            Tables::HashFirstSeen(n, d) => {
                for (dict, &v) in d.iter().zip(&row.categorical) {
                    dict.lookup.prefetch(hash_value(v, *n));
                }
            }
        }
    }

    /// Appends the encoded row to `out`.
    pub fn push_row(&self, row: &RawRow, labelled: bool, out: &mut Columns) {
        if labelled {
            out.labels.push(row.label as u8 as f32);
        }
        out.dense
            .extend(row.dense.iter().map(|&x| dense_feature(x)));
        for (t, (ids, &v)) in out.ids.iter_mut().zip(&row.categorical).enumerate() {
            ids.push(self.id(t, v));
        }
    }

    /// Appends the encoded row as a shuffle record: the label (if any), the dense values and
    /// the ids, each 4 bytes little-endian.
    fn push_record(&self, row: &RawRow, labelled: bool, out: &mut Vec<u8>) {
        if labelled {
            out.extend_from_slice(&(row.label as u8 as f32).to_le_bytes());
        }
        for &x in &row.dense {
            out.extend_from_slice(&dense_feature(x).to_le_bytes());
        }
        for (t, &v) in row.categorical.iter().enumerate() {
            out.extend_from_slice(&self.id(t, v).to_le_bytes());
        }
    }
}

/// Bytes of a shuffle record.
fn record_bytes(labelled: bool) -> usize {
    4 * (labelled as usize + NUM_DENSE + NUM_CATEGORICAL)
}

/// Appends the records `order` of `records` to `out`, in that order.
fn records_to_columns(records: &[u8], order: &[usize], labelled: bool, out: &mut Columns) {
    let size = record_bytes(labelled);
    let word = |r: &[u8], k: usize| [r[4 * k], r[4 * k + 1], r[4 * k + 2], r[4 * k + 3]];
    let skip = labelled as usize;
    for &i in order {
        let r = &records[i * size..(i + 1) * size];
        if labelled {
            out.labels.push(f32::from_le_bytes(word(r, 0)));
        }
        out.dense
            .extend((skip..skip + NUM_DENSE).map(|k| f32::from_le_bytes(word(r, k))));
        for (t, ids) in out.ids.iter_mut().enumerate() {
            ids.push(u32::from_le_bytes(word(r, skip + NUM_DENSE + t)));
        }
    }
}

/// An open input file.
struct Input {
    path: PathBuf,
    file: File,
    bytes: u64,
    lines: u64,
}

/// Lines `first_line ..` of a file, between two line ends.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    file: usize,
    start: u64,
    end: u64,
    /// Lines of the file before this chunk.
    first_line: u64,
    /// Lines of all inputs before this chunk (the row number of its first line).
    first_row: u64,
    lines: u64,
}

fn read_range(input: &Input, start: u64, end: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; (end - start) as usize];
    input
        .file
        .read_exact_at(&mut buf, start)
        .with_context(|| format!("reading {}", input.path.display()))?;
    Ok(buf)
}

/// The lines of a buffer: split at `\n`, without a last empty piece after a final `\n`.
struct Lines<'a>(&'a [u8]);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let (line, rest) = match memchr::memchr(b'\n', self.0) {
            Some(i) => (&self.0[..i], &self.0[i + 1..]),
            None => (self.0, &[][..]),
        };
        self.0 = rest;
        Some(line)
    }
}

/// Newlines of one fixed range of a file.
struct RangeScan {
    newlines: u64,
    first_newline: Option<u64>,
    last_byte: Option<u8>,
}

/// Cuts `input` into chunks that start after a line end, and counts their lines. The file
/// is scanned in fixed ranges of `chunk_bytes`, in parallel; chunk k starts after the first
/// line end of range k (or of the next range that has one), so chunks are about `chunk_bytes`
/// long and the newlines before each boundary follow from the ranges' counts.
fn plan_file(
    index: usize,
    input: &mut Input,
    first_row: u64,
    chunk_bytes: u64,
    bar: &Progress,
) -> Result<Vec<Chunk>> {
    let len = input.bytes;
    let reader: &Input = input;
    let ranges = len.div_ceil(chunk_bytes) as usize;
    let scans = (0..ranges)
        .into_par_iter()
        .map(|k| {
            let start = k as u64 * chunk_bytes;
            let end = (start + chunk_bytes).min(len);
            let buf = read_range(reader, start, end)?;
            bar.inc(end - start);
            Ok(RangeScan {
                newlines: memchr::memchr_iter(b'\n', &buf).count() as u64,
                first_newline: memchr::memchr(b'\n', &buf).map(|i| start + i as u64),
                last_byte: buf.last().copied(),
            })
        })
        .collect::<Vec<Result<RangeScan>>>()
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let total_newlines: u64 = scans.iter().map(|s| s.newlines).sum();
    // boundary[k] = (byte offset, newlines before it), computed from the end.
    let mut boundaries = vec![(len, total_newlines); ranges + 1];
    let mut before: Vec<u64> = Vec::with_capacity(ranges);
    let mut acc = 0;
    for s in &scans {
        before.push(acc);
        acc += s.newlines;
    }
    for k in (1..ranges).rev() {
        boundaries[k] = match scans[k].first_newline {
            Some(f) => (f + 1, before[k] + 1),
            None => boundaries[k + 1],
        };
    }
    boundaries[0] = (0, 0);
    let unterminated = scans
        .last()
        .and_then(|s| s.last_byte)
        .is_some_and(|b| b != b'\n');
    let mut chunks = Vec::with_capacity(ranges);
    for w in boundaries.windows(2) {
        let ((start, lines_before), (end, lines_after)) = (w[0], w[1]);
        if start == end {
            continue;
        }
        let lines = lines_after - lines_before + (end == len && unterminated) as u64;
        chunks.push(Chunk {
            file: index,
            start,
            end,
            first_line: lines_before,
            first_row: first_row + lines_before,
            lines,
        });
    }
    input.lines = chunks.iter().map(|c| c.lines).sum();
    Ok(chunks)
}

/// Bad lines met with --skip-bad-lines.
#[derive(Default)]
struct BadLines {
    count: u64,
    examples: Vec<String>,
}

impl BadLines {
    fn add(&mut self, e: String) {
        self.count += 1;
        if self.examples.len() < MAX_BAD_EXAMPLES {
            self.examples.push(e);
        }
    }

    fn merge(&mut self, other: BadLines) {
        self.count += other.count;
        let room = MAX_BAD_EXAMPLES - self.examples.len();
        self.examples.extend(other.examples.into_iter().take(room));
    }
}

/// What every pass needs.
struct Pass<'a> {
    inputs: &'a [Input],
    labelled: bool,
    skip_bad_lines: bool,
    /// First rows of the second and of the third run of rows (the first is training).
    boundaries: [u64; 2],
    /// The split of each run.
    run_splits: [usize; 3],
    /// Checked between rounds of chunks.
    cancel: &'a Cancel,
}

impl Pass<'_> {
    fn split_of(&self, row: u64) -> usize {
        self.run_splits[(row >= self.boundaries[0]) as usize + (row >= self.boundaries[1]) as usize]
    }

    /// Parses the lines of `chunk` (read into `buf`) whose rows are below `end_row`, calling
    /// `f(row, parsed)` for each good one. A bad line is an error, or is counted in `bad`.
    fn parse_chunk(
        &self,
        chunk: &Chunk,
        buf: &[u8],
        end_row: u64,
        bad: &mut BadLines,
        mut f: impl FnMut(u64, &RawRow),
    ) -> Result<(), LineError> {
        let mut row = RawRow::default();
        let n = chunk.lines.min(end_row.saturating_sub(chunk.first_row));
        for (k, line) in Lines(buf).take(n as usize).enumerate() {
            let k = k as u64;
            match parse_line(line, self.labelled, &mut row) {
                Ok(()) => f(chunk.first_row + k, &row),
                Err(error) => {
                    let e = LineError {
                        path: self.inputs[chunk.file].path.display().to_string(),
                        line: chunk.first_line + k + 1,
                        error,
                    };
                    if !self.skip_bad_lines {
                        return Err(e);
                    }
                    bad.add(e.to_string());
                }
            }
        }
        Ok(())
    }

    /// Runs `produce` on every chunk (in parallel, in rounds of a few chunks per thread) and
    /// `consume` on each round's results in chunk order, next to producing the next round.
    /// The first error in chunk order wins.
    fn in_rounds<T: Send>(
        &self,
        chunks: &[Chunk],
        produce: impl Fn(&Chunk, &[u8]) -> Result<T> + Sync,
        mut consume: impl FnMut(&[Chunk], Vec<T>) -> Result<()> + Send,
    ) -> Result<()> {
        let per_round = ROUND_CHUNKS_PER_THREAD * rayon::current_num_threads();
        let produce_round = |round: &[Chunk]| -> Result<Vec<T>> {
            round
                .par_iter()
                .map(|c| produce(c, &read_range(&self.inputs[c.file], c.start, c.end)?))
                .collect::<Vec<Result<T>>>()
                .into_iter()
                .collect()
        };
        let mut pending: Option<(&[Chunk], Vec<T>)> = None;
        for round in chunks.chunks(per_round) {
            self.cancel.check()?;
            let (consumed, produced) = rayon::join(
                || pending.take().map_or(Ok(()), |(c, r)| consume(c, r)),
                || produce_round(round),
            );
            consumed?;
            pending = Some((round, produced?));
        }
        pending.map_or(Ok(()), |(c, r)| consume(c, r))
    }
}

/// Updates a bar after a round: its bytes, and the rows per second so far.
fn advance(bar: &Progress, round: &[Chunk], rows: &mut u64, since: Instant) {
    bar.inc(round.iter().map(|c| c.end - c.start).sum());
    *rows += round.iter().map(|c| c.lines).sum::<u64>();
    bar.set_rate(*rows as f64 / since.elapsed().as_secs_f64().max(1e-9));
}

/// Pass 2: each table's values in the training lines, counted.
fn count_values(
    cx: &Pass,
    chunks: &[Chunk],
    min_frequency: u64,
    bar: &Progress,
) -> Result<Encoder> {
    let end_row = cx.boundaries[0];
    let train_chunks: Vec<Chunk> = chunks
        .iter()
        .copied()
        .filter(|c| c.first_row < end_row)
        .collect();
    let mut counts: Vec<IdTable> = vec![IdTable::default(); NUM_CATEGORICAL];
    let started = Instant::now();
    let mut rows = 0;
    cx.in_rounds(
        &train_chunks,
        |chunk, buf| {
            let mut values: Vec<Vec<u32>> = vec![Vec::new(); NUM_CATEGORICAL];
            cx.parse_chunk(chunk, buf, end_row, &mut BadLines::default(), |_, row| {
                for (v, c) in values.iter_mut().zip(&row.categorical) {
                    v.extend(c);
                }
            })?;
            Ok(values)
        },
        |round, values| {
            counts.par_iter_mut().enumerate().for_each(|(t, map)| {
                for c in &values {
                    let v = &c[t];
                    for (i, &key) in v.iter().enumerate() {
                        if let Some(&ahead) = v.get(i + PREFETCH_DISTANCE) {
                            map.prefetch(ahead);
                        }
                        map.count(key);
                    }
                }
            });
            advance(bar, round, &mut rows, started);
            Ok(())
        },
    )?;
    Ok(Encoder::from_counts(counts, min_frequency))
}

/// Pass 2 of the reference's encoding: each table's distinct hashed values over every line,
/// in order of first appearance.
fn first_seen_values(
    cx: &Pass,
    chunks: &[Chunk],
    max_ind_range: u64,
    bar: &Progress,
) -> Result<Encoder> {
    let mut dicts: Vec<Dictionary> = (0..NUM_CATEGORICAL)
        .map(|_| Dictionary::default())
        .collect();
    let started = Instant::now();
    let mut rows = 0;
    cx.in_rounds(
        chunks,
        |chunk, buf| {
            // The chunk's own distinct values, in order of first appearance.
            let mut seen: Vec<Dictionary> = (0..NUM_CATEGORICAL)
                .map(|_| Dictionary::default())
                .collect();
            cx.parse_chunk(chunk, buf, u64::MAX, &mut BadLines::default(), |_, row| {
                for (d, &v) in seen.iter_mut().zip(&row.categorical) {
                    d.push_new(hash_value(v, max_ind_range));
                }
            })?;
            Ok(seen)
        },
        |round, seen| {
            dicts.par_iter_mut().enumerate().for_each(|(t, d)| {
                for chunk in &seen {
                    chunk[t].values.iter().for_each(|&v| d.push_new(v));
                }
            });
            advance(bar, round, &mut rows, started);
            Ok(())
        },
    )?;
    Ok(Encoder {
        encoding: Encoding::HashFirstSeen { max_ind_range },
        tables: Tables::HashFirstSeen(max_ind_range, dicts),
    })
}

/// The training split's shuffle buckets: files of records, one per bucket.
struct Buckets {
    key: u64,
    paths: Vec<PathBuf>,
    files: Vec<BufWriter<File>>,
}

impl Buckets {
    fn create(dir: &Path, count: usize, seed: u64) -> Result<Buckets> {
        std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        let paths: Vec<PathBuf> = (0..count)
            .map(|b| dir.join(format!("bucket_{b:05}.rec")))
            .collect();
        let files = paths
            .iter()
            .map(|p| {
                File::create_new(p)
                    .map(|f| BufWriter::with_capacity(1 << 16, f))
                    .with_context(|| format!("creating {}", p.display()))
            })
            .collect::<Result<_>>()?;
        Ok(Buckets {
            key: derive_key(seed, &[0x5407_f1e5]),
            paths,
            files,
        })
    }

    /// The bucket of training row `row` (a pure function of the seed and the row).
    fn of(key: u64, count: usize, row: u64) -> usize {
        ((counter_hash(key, row) as u128 * count as u128) >> 64) as usize
    }

    /// Reads each bucket, permutes it uniformly (Fisher-Yates, seeded per bucket) and appends
    /// it to `out`, in bucket order; one bucket per thread is permuted at a time.
    fn finish(
        mut self,
        labelled: bool,
        out: &mut SplitWriter,
        bar: &Progress,
        cancel: &Cancel,
    ) -> Result<()> {
        for (path, file) in self.paths.iter().zip(&mut self.files) {
            file.flush()
                .with_context(|| format!("writing {}", path.display()))?;
        }
        drop(self.files);
        let key = self.key;
        let permute = |b: usize, path: &PathBuf| -> Result<Columns> {
            let records =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let n = records.len() / record_bytes(labelled);
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng = SplitMix64::new(derive_key(key, &[b as u64]));
            for i in (1..n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut columns = Columns::new(NUM_DENSE, NUM_CATEGORICAL);
            records_to_columns(&records, &order, labelled, &mut columns);
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
            bar.inc(records.len() as u64);
            Ok(columns)
        };
        let per_round = rayon::current_num_threads();
        for (r, paths) in self.paths.chunks(per_round).enumerate() {
            cancel.check()?;
            let permuted = paths
                .par_iter()
                .enumerate()
                .map(|(i, p)| permute(r * per_round + i, p))
                .collect::<Vec<Result<Columns>>>();
            for columns in permuted {
                out.append(&columns?)
                    .context("writing the shuffled training split")?;
            }
        }
        Ok(())
    }
}

/// One chunk, encoded: rows per split, or training records per shuffle bucket.
struct Encoded {
    splits: [Columns; 3],
    buckets: Vec<Vec<u8>>,
    bad: BadLines,
}

/// Pass 3: every line parsed, encoded and appended to its split (training rows to their
/// shuffle bucket, when there are buckets). Returns the bad lines left out.
fn encode_rows(
    cx: &Pass,
    chunks: &[Chunk],
    encoder: &Encoder,
    writers: &mut [SplitWriter],
    mut buckets: Option<&mut Buckets>,
    bar: &Progress,
) -> Result<BadLines> {
    let bucket_key = buckets.as_ref().map(|b| (b.key, b.paths.len()));
    let mut bad = BadLines::default();
    let started = Instant::now();
    let mut rows_done = 0;
    cx.in_rounds(
        chunks,
        |chunk, buf| {
            let mut out = Encoded {
                splits: std::array::from_fn(|_| Columns::new(NUM_DENSE, NUM_CATEGORICAL)),
                buckets: vec![Vec::new(); bucket_key.map_or(0, |(_, n)| n)],
                bad: BadLines::default(),
            };
            let mut emit = |row: u64, raw: &RawRow| {
                let split = cx.split_of(row);
                match bucket_key {
                    Some((key, n)) if split == 0 => {
                        let b = Buckets::of(key, n, row);
                        encoder.push_record(raw, cx.labelled, &mut out.buckets[b]);
                    }
                    _ => encoder.push_row(raw, cx.labelled, &mut out.splits[split]),
                }
            };
            // Each row is encoded after the next one is parsed, so its dictionary slots are
            // fetched while that parse runs.
            let mut previous: Option<(u64, RawRow)> = None;
            let mut bad = BadLines::default();
            cx.parse_chunk(chunk, buf, u64::MAX, &mut bad, |row, raw| {
                encoder.prefetch(raw);
                if let Some((r, p)) = previous.replace((row, *raw)) {
                    emit(r, &p);
                }
            })?;
            if let Some((r, p)) = previous {
                emit(r, &p);
            }
            out.bad = bad;
            Ok(out)
        },
        |round, encoded| {
            for e in encoded {
                for (w, c) in writers.iter_mut().zip(&e.splits) {
                    w.append(c).context("writing the dataset")?;
                }
                if let Some(b) = &mut buckets {
                    for (f, records) in b.files.iter_mut().zip(&e.buckets) {
                        f.write_all(records).context("writing a shuffle bucket")?;
                    }
                }
                bad.merge(e.bad);
            }
            advance(bar, round, &mut rows_done, started);
            Ok(())
        },
    )?;
    Ok(bad)
}

/// The encoding before the passes: ready, or dictionaries still to make.
enum PendingEncoding {
    Ready(Encoder),
    Count { min_frequency: u64 },
    FirstSeen { max_ind_range: u64 },
}

/// A folder removed on drop unless kept: the output while it is being written.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn create(target: &Path) -> Result<TempDir> {
        let path = partial_path(target)?;
        std::fs::create_dir(&path)
            .with_context(|| format!("creating the output folder {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The rows are cut into three runs, training first: where the second and the third start,
/// and which split each run is.
fn segments(sources: &Sources, inputs: &[Input]) -> ([u64; 2], [usize; 3]) {
    const IN_ORDER: [usize; 3] = [0, 1, 2];
    // The reference's evaluation day: np.array_split halves, or ceil(n / 2) test rows, first.
    const TEST_FIRST: [usize; 3] = [0, 2, 1];
    let total: u64 = inputs.iter().map(|i| i.lines).sum();
    match sources {
        Sources::Weights { weights, .. } => {
            let sum: f64 = weights.iter().sum();
            let cut = |w: f64| ((total as f64 * w / sum).round() as u64).min(total);
            ([cut(weights[0]), cut(weights[0] + weights[1])], IN_ORDER)
        }
        Sources::Days { train, .. } => {
            let train_rows: u64 = inputs[..train.len()].iter().map(|i| i.lines).sum();
            let eval_rows = total - train_rows;
            ([train_rows, train_rows + eval_rows.div_ceil(2)], TEST_FIRST)
        }
        Sources::ReferenceKaggle { .. } => {
            // divmod(total, 7) days, the first total % 7 (at most 6) one longer: the last
            // day has total / 7 lines, and np.array_split gives its first half the odd one.
            let last_day = total / 7;
            let train_rows = total - last_day;
            ([train_rows, train_rows + last_day.div_ceil(2)], TEST_FIRST)
        }
    }
}

/// Preprocesses raw Criteo files into a binary dataset at `opts.out`, in the current rayon
/// pool. Stops with [`crate::cancel::Interrupted`] between rounds of chunks once `opts.cancel`
/// is requested. The output is written to `<out>.partial-<pid>`, removed on any error; those
/// that killed runs left are removed first.
pub fn preprocess(opts: &PreprocessOptions) -> Result<PreprocessSummary> {
    // Cancellation is checked only once the partial output exists, and its guard has removed
    // it by the time the error arrives here.
    run_passes(opts, &opts.cancel).map_err(|e| match partial_path(&opts.out) {
        Ok(partial) => note_removed(e, &partial),
        Err(_) => e,
    })
}

/// The input files in order, and the rule that splits their rows.
fn source_paths(sources: &Sources) -> Result<(Vec<&PathBuf>, SplitRule)> {
    Ok(match sources {
        Sources::Weights { files, weights } => {
            let weights_given = *weights;
            ensure_field(
                weights.iter().all(|w| w.is_finite() && *w >= 0.0)
                    && weights.iter().sum::<f64>() > 0.0,
                move |n| {
                    format!(
                        "{}: weights must be non-negative numbers, not all 0 (got {weights_given:?})",
                        n(Field::Split)
                    )
                },
            )?;
            (files.iter().collect(), SplitRule::Weights(*weights))
        }
        Sources::Days { train, eval } => (
            train.iter().chain(eval).collect(),
            SplitRule::Days {
                train_sources: train.len(),
            },
        ),
        Sources::ReferenceKaggle { files } => (files.iter().collect(), SplitRule::ReferenceKaggle),
    })
}

/// Opens every input file and reads its size.
fn open_inputs(paths: &[&PathBuf]) -> Result<Vec<Input>> {
    paths
        .iter()
        .map(|&p| {
            let file = File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let bytes = file
                .metadata()
                .with_context(|| format!("reading the size of {}", p.display()))?
                .len();
            Ok(Input {
                path: p.clone(),
                file,
                bytes,
                lines: 0,
            })
        })
        .collect::<Result<Vec<_>>>()
}

/// The encoding chosen, checked or loaded before any pass.
fn pending_encoding(choice: &EncodingChoice) -> Result<PendingEncoding> {
    Ok(match choice {
        EncodingChoice::Like(dir) => PendingEncoding::Ready(
            Encoder::load(dir)
                .with_context(|| format!("loading the encoding of {}", dir.display()))?,
        ),
        EncodingChoice::New(Encoding::Hash { max_ind_range }) => {
            PendingEncoding::Ready(Encoder::hash(*max_ind_range)?)
        }
        EncodingChoice::New(Encoding::Dictionary { min_frequency }) => {
            ensure_field(*min_frequency >= 1, |n| {
                format!("{} must be at least 1", n(Field::MinFrequency))
            })?;
            PendingEncoding::Count {
                min_frequency: *min_frequency,
            }
        }
        EncodingChoice::New(Encoding::HashFirstSeen { max_ind_range }) => {
            check_max_ind_range(*max_ind_range)?;
            PendingEncoding::FirstSeen {
                max_ind_range: *max_ind_range,
            }
        }
    })
}

/// Pass 2: the encoder, from the dictionaries of the data when the encoding needs them.
fn build_encoder(
    cx: &Pass,
    chunks: &[Chunk],
    pending: PendingEncoding,
    progress: &Progress,
    bytes: u64,
) -> Result<Encoder> {
    Ok(match pending {
        PendingEncoding::Ready(e) => e,
        PendingEncoding::Count { min_frequency } => {
            let train_bytes = chunks
                .iter()
                .filter(|c| c.first_row < cx.boundaries[0])
                .map(|c| c.end - c.start)
                .sum();
            let bar = progress.start("dictionaries", train_bytes);
            let e = count_values(cx, chunks, min_frequency, bar)?;
            bar.finish();
            e
        }
        PendingEncoding::FirstSeen { max_ind_range } => {
            let bar = progress.start("dictionaries", bytes);
            let e = first_seen_values(cx, chunks, max_ind_range, bar)?;
            bar.finish();
            e
        }
    })
}

/// The writers of the splits in `tmp`, and the shuffle buckets of the `train_rows` training
/// rows when a shuffle seed is given.
fn create_writers(
    tmp: &Path,
    opts: &PreprocessOptions,
    train_rows: u64,
) -> Result<(Vec<SplitWriter>, Option<Buckets>)> {
    let writers = DatasetSplit::ALL
        .iter()
        .map(|s| {
            let dir = tmp.join(s.name());
            SplitWriter::create(&dir, NUM_CATEGORICAL, opts.labelled)
                .with_context(|| format!("creating {}", dir.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let buckets = match opts.shuffle_seed {
        Some(seed) => {
            let train_bytes = train_rows * record_bytes(opts.labelled) as u64;
            let count = train_bytes.div_ceil(BUCKET_BYTES).max(1) as usize;
            Some(Buckets::create(&tmp.join("shuffle"), count, seed)?)
        }
        None => None,
    };
    Ok((writers, buckets))
}

/// Writes the encoding and the header (with the encoding's fingerprint) into `tmp`: the
/// dataset of `inputs` split by `rule` into `rows`, `bad_lines` left out.
fn write_header(
    tmp: &Path,
    opts: &PreprocessOptions,
    encoder: &Encoder,
    inputs: &[Input],
    rows: SplitRows,
    rule: SplitRule,
    bad_lines: u64,
) -> Result<()> {
    let mut header = DatasetHeader {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        num_dense: NUM_DENSE,
        table_sizes: encoder.table_sizes(),
        labelled: opts.labelled,
        rows,
        encoding: encoder.encoding(),
        dense_transform: "ln(1 + max(x, 0)) in f32; empty = 0".to_string(),
        split: rule,
        shuffle_seed: opts.shuffle_seed,
        sources: inputs
            .iter()
            .map(|i| SourceFile {
                path: i.path.display().to_string(),
                bytes: i.bytes,
                lines: i.lines,
            })
            .collect(),
        bad_lines,
        encoding_fingerprint: None,
    };
    encoder.save(tmp)?;
    // From the files just written: the same computation as for a dataset without it.
    header.encoding_fingerprint = Some(compute_encoding_fingerprint(&header, tmp)?);
    header.write(tmp)
}

/// Pass 1: the chunks of every input (`bytes` in all) and the number of lines.
fn plan_chunks(
    inputs: &mut [Input],
    opts: &PreprocessOptions,
    bytes: u64,
    cancel: &Cancel,
) -> Result<(Vec<Chunk>, u64)> {
    let bar = opts.progress.start("lines", bytes);
    let mut chunks = Vec::new();
    let mut rows_before = 0;
    for (i, input) in inputs.iter_mut().enumerate() {
        cancel.check()?;
        chunks.extend(plan_file(i, input, rows_before, opts.chunk_bytes, bar)?);
        rows_before += input.lines;
    }
    bar.finish();
    Ok((chunks, rows_before))
}

fn run_passes(opts: &PreprocessOptions, cancel: &Cancel) -> Result<PreprocessSummary> {
    let started = Instant::now();
    let (paths, rule) = source_paths(&opts.sources)?;
    anyhow::ensure!(!paths.is_empty(), "no input files");
    anyhow::ensure!(
        opts.chunk_bytes > 0,
        "the chunk size must be at least 1 byte"
    );
    anyhow::ensure!(
        !opts.out.exists(),
        "{} already exists: remove it or choose another output folder",
        opts.out.display()
    );
    let mut inputs = open_inputs(&paths)?;
    // The encoding is checked (or loaded) before any pass.
    let pending = pending_encoding(&opts.encoding)?;
    let bytes: u64 = inputs.iter().map(|i| i.bytes).sum();
    // Every byte belongs to a line, so no bytes means no rows: nothing to write.
    anyhow::ensure!(
        bytes > 0,
        "no rows to preprocess: {} empty",
        match paths.as_slice() {
            [one] => format!("{} is", one.display()),
            _ => "the input files are".to_string(),
        }
    );
    let removed_partials = remove_stale_partials(&opts.out);
    let tmp = TempDir::create(&opts.out)?;
    let mut secs = PassSeconds::default();

    // Pass 1: chunks and lines.
    let t = Instant::now();
    let (chunks, lines) = plan_chunks(&mut inputs, opts, bytes, cancel)?;
    let (boundaries, run_splits) = segments(&opts.sources, &inputs);
    let cx = Pass {
        inputs: &inputs,
        labelled: opts.labelled,
        skip_bad_lines: opts.skip_bad_lines,
        boundaries,
        run_splits,
        cancel,
    };
    secs.lines = t.elapsed().as_secs_f64();

    // Pass 2: dictionaries.
    let t = Instant::now();
    let encoder = build_encoder(&cx, &chunks, pending, &opts.progress, bytes)?;
    secs.dictionaries = t.elapsed().as_secs_f64();

    // Pass 3: encode.
    let t = Instant::now();
    let (mut writers, mut buckets) = create_writers(&tmp.path, opts, cx.boundaries[0])?;
    let bar = opts.progress.start("encode", bytes);
    let bad = encode_rows(&cx, &chunks, &encoder, &mut writers, buckets.as_mut(), bar)?;
    bar.finish();
    let first_bad = bad.examples.first().cloned().unwrap_or_default();
    ensure_field(bad.count < lines, move |n| {
        format!(
            "no rows to write: all {lines} lines are bad and were left out by {} (the first: {first_bad})",
            n(Field::SkipBadLines)
        )
    })?;
    secs.encode = t.elapsed().as_secs_f64();

    // Pass 4: shuffle.
    let t = Instant::now();
    if let Some(b) = buckets {
        let bucket_bytes = cx.boundaries[0] * record_bytes(opts.labelled) as u64;
        let bar = opts.progress.start("shuffle", bucket_bytes);
        b.finish(opts.labelled, &mut writers[0], bar, cancel)?;
        std::fs::remove_dir(tmp.path.join("shuffle")).context("removing the shuffle folder")?;
        bar.finish();
    }
    secs.shuffle = t.elapsed().as_secs_f64();

    let mut rows = SplitRows::default();
    for (s, w) in DatasetSplit::ALL.iter().zip(writers) {
        rows.set(*s, w.finish().context("writing the dataset")?);
    }
    write_header(&tmp.path, opts, &encoder, &inputs, rows, rule, bad.count)?;
    std::fs::rename(&tmp.path, &opts.out)
        .with_context(|| format!("renaming {} to {}", tmp.path.display(), opts.out.display()))?;
    let mut tmp = tmp;
    tmp.keep = true;
    Ok(PreprocessSummary {
        out: opts.out.clone(),
        bytes,
        lines,
        rows,
        bad_lines: bad.count,
        bad_examples: bad.examples,
        removed_partials,
        table_sizes: encoder.table_sizes(),
        seconds: started.elapsed().as_secs_f64(),
        pass_seconds: secs,
        threads: rayon::current_num_threads(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_splits_like_a_file_reader() {
        let l = |s: &str| Lines(s.as_bytes()).map(|x| x.to_vec()).collect::<Vec<_>>();
        assert_eq!(l(""), Vec::<Vec<u8>>::new());
        assert_eq!(l("a\nb\n"), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(l("a\nb"), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(l("\n\n"), vec![b"".to_vec(), b"".to_vec()]);
    }

    #[test]
    fn dictionaries_keep_frequent_values_by_count() {
        let mut counts = IdTable::default();
        for (v, c) in [(7u32, 3u32), (9, 5), (4, 3), (1, 1)] {
            counts.insert(v, c);
        }
        let d = Dictionary::from_counts(counts, 2);
        assert_eq!(d.values, vec![9, 4, 7]);
        let e = Encoder {
            encoding: Encoding::Dictionary { min_frequency: 2 },
            tables: Tables::Dictionary(vec![d]),
        };
        assert_eq!(e.id(0, Some(9)), FIRST_VALUE_ID);
        assert_eq!(e.id(0, Some(7)), FIRST_VALUE_ID + 2);
        assert_eq!(e.id(0, Some(1)), RARE_ID);
        assert_eq!(e.id(0, Some(12345)), RARE_ID);
        assert_eq!(e.id(0, None), EMPTY_ID);
        let h = Encoder::hash(1000).unwrap();
        assert_eq!(h.id(3, Some(0x68fd_1e64)), (0x68fd_1e64u64 % 1000) as u32);
        assert_eq!(h.id(3, None), 0);
        assert!(Encoder::hash(0).is_err());
        assert!(Encoder::hash((1 << 32) + 1).is_err());
    }

    #[test]
    fn id_table_counts_and_looks_up_like_a_hash_map() {
        let mut t = IdTable::default();
        let mut want = std::collections::HashMap::new();
        let mut rng = SplitMix64::new(3);
        for _ in 0..20_000 {
            // Few distinct keys, with 0 and u32::MAX among them, so that keys repeat and
            // collide.
            let k = match rng.below(10) {
                0 => 0,
                1 => u32::MAX,
                _ => rng.below(3000) as u32 * 65536,
            };
            t.count(k);
            *want.entry(k).or_insert(0u32) += 1;
        }
        assert_eq!(t.len, want.len());
        for (&k, &c) in &want {
            assert_eq!(t.get(k), Some(c), "key {k}");
        }
        assert_eq!(t.get(12345), None);
        let mut seen: Vec<(u32, u32)> = t.iter().collect();
        seen.sort_unstable();
        let mut expected: Vec<(u32, u32)> = want.into_iter().collect();
        expected.sort_unstable();
        assert_eq!(seen, expected);
    }

    #[test]
    fn bucket_choice_covers_every_bucket() {
        let mut seen = [0u32; 7];
        for row in 0..7000 {
            seen[Buckets::of(42, 7, row)] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
