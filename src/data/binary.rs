//! The binary dataset: what `dlrm preprocess` writes and `dlrm train --dataset` reads. A
//! folder of flat little-endian arrays and a JSON header, memory-mapped, so that a batch is a
//! copy of contiguous slices (no parsing, no per-sample work) and a dataset larger than RAM is
//! paged by the OS.
//!
//! # Layout (version 1)
//!
//! ```text
//! DIR/header.json        the DatasetHeader: counts, table sizes, preprocessing settings
//! DIR/train/ val/ test/  one folder per split, each holding
//!     dense.f32            rows x num_dense f32, row-major, already transformed
//!     labels.f32           rows f32, 0.0 or 1.0 (absent for unlabelled data)
//!     ids_00.u32 ...       per table: rows u32, each sample's row in that table
//! DIR/dict_00.u32 ...    dictionary encodings only: per table, raw 32-bit values in id order
//!                        (frequency dictionaries: value i has id FIRST_VALUE_ID + i; the
//!                        reference's hash_first_seen: hashed value i has id i)
//! ```
//!
//! Opening a dataset checks that every file the header implies is there with the size it
//! implies. The header's `encoding_fingerprint` identifies the id encoding (see
//! [`compute_encoding_fingerprint`]); checkpoints carry their training data's, so that data
//! encoded otherwise is refused.
//!
//! Labels are stored as f32 (not bytes) and ids per table (not per sample), so that a batch of
//! contiguous rows is a slice of each array: the training and evaluation loops read it in
//! place ([`BatchView`], no copy), and filling a [`Batch`] is one `memcpy` per array (one-hot
//! bags: no offsets).

use super::{Batch, BatchView, DataSource, IdColumns, RankPart, Split};
use crate::names::{Choice, choice_names};
use crate::storage::map_read_only;
use anyhow::{Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

#[cfg(not(target_endian = "little"))]
compile_error!("dataset arrays hold little-endian values and are mapped as they are on disk");

/// Name of the header file.
pub const HEADER_FILE: &str = "header.json";
/// The header's `format` field.
pub const FORMAT_NAME: &str = "dlrm-binary-dataset";
/// The layout version this module reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Dense features of a split.
pub const DENSE_FILE: &str = "dense.f32";
/// Labels of a split.
pub const LABELS_FILE: &str = "labels.f32";

/// Table `t`'s ids in a split folder.
pub fn ids_file(table: usize) -> String {
    format!("ids_{table:02}.u32")
}

/// Table `t`'s dictionary in the dataset folder.
pub fn dictionary_file(table: usize) -> String {
    format!("dict_{table:02}.u32")
}

/// A part of the dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetSplit {
    /// Training: the rows the model learns from.
    Train,
    /// Validation: for choosing settings.
    Val,
    /// Test: for the final figure.
    Test,
}

impl DatasetSplit {
    pub const ALL: [DatasetSplit; 3] = [DatasetSplit::Train, DatasetSplit::Val, DatasetSplit::Test];

    /// The split's folder name.
    pub fn name(self) -> &'static str {
        match self {
            DatasetSplit::Train => "train",
            DatasetSplit::Val => "val",
            DatasetSplit::Test => "test",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl Choice for DatasetSplit {
    const ALL: &'static [DatasetSplit] = &DatasetSplit::ALL;
    fn name(self) -> &'static str {
        DatasetSplit::name(self)
    }
    fn help(self) -> &'static str {
        match self {
            DatasetSplit::Train => "Training: the rows the model learns from",
            DatasetSplit::Val => "Validation: for choosing settings",
            DatasetSplit::Test => "Test: for the final figure",
        }
    }
}

choice_names!(DatasetSplit);

/// Rows per split (u64: the Terabyte logs have 4.4 billion).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRows {
    pub train: u64,
    pub val: u64,
    pub test: u64,
}

impl SplitRows {
    pub fn get(&self, split: DatasetSplit) -> u64 {
        [self.train, self.val, self.test][split.index()]
    }

    pub fn set(&mut self, split: DatasetSplit, rows: u64) {
        *[&mut self.train, &mut self.val, &mut self.test][split.index()] = rows;
    }

    pub fn total(&self) -> u64 {
        self.train + self.val + self.test
    }
}

/// How raw categorical values became table rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Encoding {
    /// Row = value mod `max_ind_range`; an empty field is 0 (the reference's hashing).
    Hash { max_ind_range: u64 },
    /// Values seen at least `min_frequency` times in the training split have their own row
    /// (`dict_XX.u32`); an empty field is row `EMPTY_ID`, any other value `RARE_ID`. This
    /// project's own encoding.
    Dictionary { min_frequency: u64 },
    /// The reference's `--max-ind-range` (dlrm_s_pytorch.py, data_utils.py): an empty field is
    /// value 0, each value is hashed to value mod `max_ind_range`, and the distinct hashed
    /// values of all rows (every split, in file order) are numbered in order of first
    /// appearance (`dict_XX.u32` lists them in id order). A table has as many rows as distinct
    /// hashed values. A hashed value the dictionary lacks (rows encoded later with
    /// `--encode-like`) gets row 0.
    #[serde(rename = "hash_first_seen")]
    HashFirstSeen { max_ind_range: u64 },
}

impl Encoding {
    /// Values in table file `dict_XX.u32` for a table of `table_size` rows (None: the encoding
    /// has no dictionaries).
    pub fn dictionary_len(&self, table_size: u64) -> Option<u64> {
        match self {
            Encoding::Hash { .. } => None,
            Encoding::Dictionary { .. } => {
                Some(table_size.saturating_sub(super::preprocess::FIRST_VALUE_ID as u64))
            }
            Encoding::HashFirstSeen { .. } => Some(table_size),
        }
    }
}

/// How raw rows were assigned to splits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitRule {
    /// The lines of all sources, in order, cut by these weights (train, val, test).
    Weights([f64; 3]),
    /// The first `train_sources` sources are training days; the lines of the others, in
    /// order, are split in half as the reference splits Terabyte's last day
    /// (dlrm_data_pytorch.py CriteoDataset): the first ceil(n / 2) are test, the rest
    /// validation.
    Days { train_sources: usize },
    /// The reference's Kaggle split (data_utils.py getCriteoAdData, dlrm_data_pytorch.py
    /// CriteoDataset): the lines of all sources, in order, are cut into 7 days by
    /// divmod(lines, 7), the first `lines % 7` days one line longer; days 1-6 are training,
    /// and the 7th is halved by np.array_split: the first half (rounded up) is test, the
    /// second validation.
    #[serde(rename = "reference_kaggle")]
    ReferenceKaggle,
}

/// A raw input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: String,
    pub bytes: u64,
    pub lines: u64,
}

/// `header.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetHeader {
    pub format: String,
    pub version: u32,
    pub num_dense: usize,
    /// Rows of each embedding table (every id in the dataset is below its table's size).
    pub table_sizes: Vec<u64>,
    /// Whether the splits have labels.
    pub labelled: bool,
    pub rows: SplitRows,
    pub encoding: Encoding,
    /// The dense transform, in words.
    pub dense_transform: String,
    pub split: SplitRule,
    /// Seed of the training split's shuffle (None: rows in file order).
    pub shuffle_seed: Option<u64>,
    pub sources: Vec<SourceFile>,
    /// Lines left out by --skip-bad-lines.
    pub bad_lines: u64,
    /// [`compute_encoding_fingerprint`] of this dataset (absent in datasets written before
    /// it existed: then computed from the files when needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_fingerprint: Option<String>,
}

impl DatasetHeader {
    pub fn num_tables(&self) -> usize {
        self.table_sizes.len()
    }

    pub fn read(dir: &Path) -> Result<DatasetHeader> {
        let path = dir.join(HEADER_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is {} a dataset folder written by dlrm preprocess?)",
                path.display(),
                dir.display()
            )
        })?;
        let header: DatasetHeader = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a dataset header", path.display()))?;
        anyhow::ensure!(
            header.format == FORMAT_NAME && header.version == FORMAT_VERSION,
            "{}: format {:?} version {}, this build reads {FORMAT_NAME:?} version {FORMAT_VERSION}",
            path.display(),
            header.format,
            header.version
        );
        anyhow::ensure!(
            header
                .table_sizes
                .iter()
                .all(|&n| (1..=1 << 32).contains(&n)),
            "{}: every table size must be between 1 and 2^32",
            path.display()
        );
        Ok(header)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(HEADER_FILE);
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The encoding fingerprint of the dataset in `dir` (this header's): the stored one, or
    /// computed from the files for a dataset written before it was stored.
    pub fn encoding_fingerprint(&self, dir: &Path) -> Result<String> {
        match &self.encoding_fingerprint {
            Some(f) => Ok(f.clone()),
            None => compute_encoding_fingerprint(self, dir),
        }
    }

    /// Table `table`'s dictionary, checked against the table's size (empty for an encoding
    /// without dictionaries).
    pub fn read_dictionary(&self, dir: &Path, table: usize) -> Result<Vec<u32>> {
        let Some(len) = self.encoding.dictionary_len(self.table_sizes[table]) else {
            return Ok(Vec::new());
        };
        let path = dir.join(dictionary_file(table));
        check_file_len(&path, 4 * len)?;
        read_u32_file(&path)
    }
}

/// The encoding fingerprint of the dataset (or checkpoint `dataset/` folder) in `dir`.
pub fn encoding_fingerprint_of(dir: &Path) -> Result<String> {
    DatasetHeader::read(dir)?.encoding_fingerprint(dir)
}

/// FNV-1a, 64 bits (Fowler, Noll, Vo): a stable, documented hash of a byte stream.
struct Fnv1a64(u64);

impl Fnv1a64 {
    fn new() -> Fnv1a64 {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.write(&x.to_le_bytes());
    }
}

/// `fnv1a64:` and 16 hexadecimal digits: the FNV-1a 64 hash of everything that decides which
/// id a raw row gets, as a canonical byte stream: the ASCII tag `dlrm-encoding-1`; the
/// encoding kind (u64: 0 hash, 1 dictionary, 2 hash_first_seen) and its parameter
/// (max_ind_range or min_frequency); num_dense; the table count and each table's size; then
/// each table's dictionary (its `dict_XX.u32` bytes, little-endian u32), if the encoding has
/// them. Integers are u64 little-endian. Two datasets with the same fingerprint give every raw
/// row the same ids.
pub fn compute_encoding_fingerprint(header: &DatasetHeader, dir: &Path) -> Result<String> {
    let mut h = Fnv1a64::new();
    h.write(b"dlrm-encoding-1");
    let (kind, parameter) = match header.encoding {
        Encoding::Hash { max_ind_range } => (0, max_ind_range),
        Encoding::Dictionary { min_frequency } => (1, min_frequency),
        Encoding::HashFirstSeen { max_ind_range } => (2, max_ind_range),
    };
    h.write_u64(kind);
    h.write_u64(parameter);
    h.write_u64(header.num_dense as u64);
    h.write_u64(header.num_tables() as u64);
    for &n in &header.table_sizes {
        h.write_u64(n);
    }
    for t in 0..header.num_tables() {
        h.write(bytemuck::cast_slice(&header.read_dictionary(dir, t)?));
    }
    Ok(format!("fnv1a64:{:016x}", h.0))
}

/// Checks that the file at `path` exists and holds `want` bytes, as the header implies.
fn check_file_len(path: &Path, want: u64) -> Result<()> {
    let len = std::fs::metadata(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (the dataset header implies a file of {want} bytes)",
                path.display()
            )
        })?
        .len();
    anyhow::ensure!(
        len == want,
        "{}: {len} bytes, the dataset header implies {want}",
        path.display()
    );
    Ok(())
}

/// Rows of one split, column by column, as preprocessing produces them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Columns {
    pub num_dense: usize,
    /// rows x num_dense.
    pub dense: Vec<f32>,
    /// One per row (empty for unlabelled data).
    pub labels: Vec<f32>,
    /// Per table, one id per row.
    pub ids: Vec<Vec<u32>>,
}

impl Columns {
    pub fn new(num_dense: usize, num_tables: usize) -> Columns {
        Columns {
            num_dense,
            ids: vec![Vec::new(); num_tables],
            ..Columns::default()
        }
    }

    pub fn rows(&self) -> usize {
        self.dense.len() / self.num_dense.max(1)
    }

    pub fn clear(&mut self) {
        self.dense.clear();
        self.labels.clear();
        self.ids.iter_mut().for_each(Vec::clear);
    }
}

/// Write buffer per array file.
const WRITE_BUFFER: usize = 1 << 18;

/// Streams the rows of one split into its folder.
pub struct SplitWriter {
    rows: u64,
    dense: BufWriter<File>,
    labels: Option<BufWriter<File>>,
    ids: Vec<BufWriter<File>>,
}

impl SplitWriter {
    /// Creates the split's folder and its (empty) array files.
    pub fn create(dir: &Path, num_tables: usize, labelled: bool) -> io::Result<SplitWriter> {
        std::fs::create_dir(dir)?;
        let open = |name: &str| -> io::Result<BufWriter<File>> {
            Ok(BufWriter::with_capacity(
                WRITE_BUFFER,
                File::create_new(dir.join(name))?,
            ))
        };
        Ok(SplitWriter {
            rows: 0,
            dense: open(DENSE_FILE)?,
            labels: labelled.then(|| open(LABELS_FILE)).transpose()?,
            ids: (0..num_tables)
                .map(|t| open(&ids_file(t)))
                .collect::<io::Result<_>>()?,
        })
    }

    pub fn append(&mut self, c: &Columns) -> io::Result<()> {
        assert_eq!(
            c.ids.len(),
            self.ids.len(),
            "columns for another table count"
        );
        self.dense.write_all(bytemuck::cast_slice(&c.dense))?;
        if let Some(labels) = &mut self.labels {
            assert_eq!(
                c.labels.len(),
                c.rows(),
                "a labelled split needs a label per row"
            );
            labels.write_all(bytemuck::cast_slice(&c.labels))?;
        }
        for (w, ids) in self.ids.iter_mut().zip(&c.ids) {
            w.write_all(bytemuck::cast_slice(ids))?;
        }
        self.rows += c.rows() as u64;
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Flushes every file; returns the rows written.
    pub fn finish(self) -> io::Result<u64> {
        let mut all = std::iter::once(self.dense)
            .chain(self.labels)
            .chain(self.ids);
        all.try_for_each(|mut w| w.flush())?;
        Ok(self.rows)
    }
}

/// Writes a u32 array file (a dictionary).
pub fn write_u32_file(path: &Path, values: &[u32]) -> io::Result<()> {
    std::fs::write(path, bytemuck::cast_slice::<u32, u8>(values))
}

/// Reads a u32 array file.
pub fn read_u32_file(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        bytes.len().is_multiple_of(4),
        "{}: {} bytes is not a whole number of u32",
        path.display(),
        bytes.len()
    );
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Mapped bytes as f32 (the maps are page-aligned, and their lengths checked at open).
fn as_f32(bytes: &[u8]) -> &[f32] {
    if bytes.is_empty() {
        &[]
    } else {
        bytemuck::cast_slice(bytes)
    }
}

fn as_u32(bytes: &[u8]) -> &[u32] {
    if bytes.is_empty() {
        &[]
    } else {
        bytemuck::cast_slice(bytes)
    }
}

/// The mapped arrays of one split.
struct SplitMaps {
    rows: u64,
    dense: Mmap,
    labels: Option<Mmap>,
    ids: Vec<Mmap>,
}

impl SplitMaps {
    fn open(dir: &Path, header: &DatasetHeader, split: DatasetSplit) -> Result<SplitMaps> {
        let rows = header.rows.get(split);
        let folder = dir.join(split.name());
        let map = |name: &str, width: usize| -> Result<Mmap> {
            let path = folder.join(name);
            let want = rows
                .checked_mul(4 * width as u64)
                .context("array size overflows")?;
            check_file_len(&path, want)?;
            let map =
                map_read_only(&path).with_context(|| format!("mapping {}", path.display()))?;
            // The file may have changed since it was checked.
            anyhow::ensure!(
                map.len() as u64 == want,
                "{}: {} bytes, the header's {rows} rows need {want}",
                path.display(),
                map.len()
            );
            Ok(map)
        };
        Ok(SplitMaps {
            rows,
            dense: map(DENSE_FILE, header.num_dense)?,
            labels: header.labelled.then(|| map(LABELS_FILE, 1)).transpose()?,
            ids: (0..header.num_tables())
                .map(|t| map(&ids_file(t), 1))
                .collect::<Result<_>>()?,
        })
    }
}

/// Rows of a split, borrowed from its maps: their dense rows and labels (None for unlabelled
/// data), and the split's arrays, for the ids.
struct MappedRows<'a> {
    dense: &'a [f32],
    labels: Option<&'a [f32]>,
    split: &'a SplitMaps,
}

/// A binary dataset, mapped. As a [`DataSource`] it trains on the training split and
/// evaluates on the chosen held-out split (test unless [`BinaryDataset::with_eval_split`] says
/// otherwise); batch order is shuffled every epoch, as real data needs.
pub struct BinaryDataset {
    dir: PathBuf,
    header: DatasetHeader,
    splits: Vec<SplitMaps>,
    eval_split: DatasetSplit,
}

impl BinaryDataset {
    /// Reads the header, checks that every dictionary the header implies is there with the
    /// size it implies, and maps every array, checking each length against the header.
    pub fn open(dir: &Path) -> Result<BinaryDataset> {
        let header = DatasetHeader::read(dir)?;
        for (t, &size) in header.table_sizes.iter().enumerate() {
            if let Some(len) = header.encoding.dictionary_len(size) {
                check_file_len(&dir.join(dictionary_file(t)), 4 * len)?;
            }
        }
        let splits = DatasetSplit::ALL
            .iter()
            .map(|&s| SplitMaps::open(dir, &header, s))
            .collect::<Result<_>>()?;
        Ok(BinaryDataset {
            dir: dir.to_path_buf(),
            header,
            splits,
            eval_split: DatasetSplit::Test,
        })
    }

    /// The held-out split that [`DataSource::fill_test`] reads.
    pub fn with_eval_split(mut self, split: DatasetSplit) -> BinaryDataset {
        self.eval_split = split;
        self
    }

    pub fn eval_split(&self) -> DatasetSplit {
        self.eval_split
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn header(&self) -> &DatasetHeader {
        &self.header
    }

    /// The fingerprint of the dataset's id encoding (see [`compute_encoding_fingerprint`]).
    pub fn encoding_fingerprint(&self) -> Result<String> {
        self.header.encoding_fingerprint(&self.dir)
    }

    pub fn rows(&self, split: DatasetSplit) -> u64 {
        self.splits[split.index()].rows
    }

    /// The maps of `split`, checking that it holds rows `first .. first + size`.
    fn split_rows(&self, split: DatasetSplit, first: u64, size: usize) -> Result<&SplitMaps> {
        let s = &self.splits[split.index()];
        anyhow::ensure!(
            first
                .checked_add(size as u64)
                .is_some_and(|end| end <= s.rows),
            "rows {first}..{} are past the end of the {} split ({} rows)",
            first.saturating_add(size as u64),
            split.name(),
            s.rows
        );
        Ok(s)
    }

    /// Rows `first .. first + size` of `split`, borrowed from the maps. Checks that the rows
    /// are in the split and that their dense values are finite.
    fn mapped_rows(&self, split: DatasetSplit, first: u64, size: usize) -> Result<MappedRows<'_>> {
        let s = self.split_rows(split, first, size)?;
        let (a, b) = (first as usize, first as usize + size);
        let nd = self.header.num_dense;
        let dense = &as_f32(&s.dense)[a * nd..b * nd];
        // Preprocessing writes finite values only; a file changed since would otherwise make
        // the model's parameters NaN without a word. The scan is cheap next to a step.
        if let Some(i) = dense.iter().position(|x| !x.is_finite()) {
            anyhow::bail!(
                "{}: row {} feature {} (both counted from 0) is {}: dense inputs must be finite",
                self.dir.join(split.name()).join(DENSE_FILE).display(),
                first + (i / nd) as u64,
                i % nd,
                dense[i]
            );
        }
        let labels = s.labels.as_ref().map(|l| &as_f32(l)[a..b]);
        Ok(MappedRows {
            dense,
            labels,
            split: s,
        })
    }

    /// Fills `batch` with rows `first .. first + size` of `split`: one copy per array, buffers
    /// reused. Unlabelled data gets labels 0.
    pub fn fill(
        &self,
        split: DatasetSplit,
        first: u64,
        size: usize,
        batch: &mut Batch,
    ) -> Result<()> {
        let MappedRows {
            dense,
            labels,
            split: s,
        } = self.mapped_rows(split, first, size)?;
        let (a, b) = (first as usize, first as usize + size);
        let nt = self.header.num_tables();
        batch.num_dense = self.header.num_dense;
        batch.dense.clear();
        batch.dense.extend_from_slice(dense);
        batch.labels.clear();
        match labels {
            Some(labels) => batch.labels.extend_from_slice(labels),
            None => batch.labels.resize(size, 0.0),
        }
        batch.indices.resize(nt, Vec::new());
        batch.offsets.resize(nt, Vec::new());
        // One-hot tables: no offsets (see Batch::offsets).
        for ((ids, offsets), map) in batch.indices.iter_mut().zip(&mut batch.offsets).zip(&s.ids) {
            ids.clear();
            ids.extend_from_slice(&as_u32(map)[a..b]);
            offsets.clear();
        }
        Ok(())
    }

    /// The `part` of rows `first .. first + size` of `split` one rank reads (see
    /// [`RankPart::assemble`]): only the slice's dense rows and labels and the part's id
    /// columns are touched. Unlabelled data gets labels 0.
    pub fn fill_rank_part(
        &self,
        split: DatasetSplit,
        first: u64,
        size: usize,
        part: &RankPart,
        batch: &mut Batch,
    ) -> Result<()> {
        let s = self.split_rows(split, first, size)?;
        let rows = &part.rows;
        let slice = self.mapped_rows(split, first + rows.start as u64, rows.len())?;
        let unlabelled = vec![
            0.0;
            if slice.labels.is_some() {
                0
            } else {
                rows.len()
            }
        ];
        let labels = slice.labels.unwrap_or(&unlabelled);
        let (nd, nt) = (self.header.num_dense, self.header.num_tables());
        let (a, b) = (first as usize, first as usize + size);
        part.assemble(
            size,
            nd,
            (slice.dense, labels),
            nt,
            batch,
            |t, ids, offsets| {
                ids.clear();
                ids.extend_from_slice(&as_u32(&s.ids[t])[a..b]);
                offsets.clear();
            },
        );
        Ok(())
    }

    /// Rows `first .. first + size` of `split`, borrowed from the maps (no copy); unlabelled
    /// data, whose labels 0 are not stored, is filled into `batch` instead.
    pub fn view<'a>(
        &'a self,
        split: DatasetSplit,
        first: u64,
        size: usize,
        batch: &'a mut Batch,
    ) -> Result<BatchView<'a>> {
        let MappedRows {
            dense,
            labels,
            split: s,
        } = self.mapped_rows(split, first, size)?;
        let Some(labels) = labels else {
            self.fill(split, first, size, batch)?;
            return Ok(batch.view());
        };
        Ok(BatchView::from_columns(
            self.header.num_dense,
            dense,
            labels,
            s,
            self.header.num_tables(),
            first as usize,
        ))
    }
}

impl IdColumns for SplitMaps {
    fn column(&self, t: usize) -> &[u32] {
        as_u32(&self.ids[t])
    }
}

impl DataSource for BinaryDataset {
    fn train_len(&self) -> u64 {
        self.rows(DatasetSplit::Train)
    }
    fn test_len(&self) -> u64 {
        self.rows(self.eval_split)
    }
    fn fill_train(&self, first: u64, size: usize, batch: &mut Batch) -> Result<()> {
        self.fill(DatasetSplit::Train, first, size, batch)
    }
    fn fill_test(&self, first: u64, size: usize, batch: &mut Batch) -> Result<()> {
        self.fill(self.eval_split, first, size, batch)
    }
    fn fill_part(
        &self,
        split: Split,
        first: u64,
        size: usize,
        part: &RankPart,
        batch: &mut Batch,
    ) -> Result<()> {
        let split = match split {
            Split::Train => DatasetSplit::Train,
            Split::Test => self.eval_split,
        };
        self.fill_rank_part(split, first, size, part, batch)
    }
    fn train_view<'a>(
        &'a self,
        first: u64,
        size: usize,
        batch: &'a mut Batch,
    ) -> Result<BatchView<'a>> {
        self.view(DatasetSplit::Train, first, size, batch)
    }
    fn test_view<'a>(
        &'a self,
        first: u64,
        size: usize,
        batch: &'a mut Batch,
    ) -> Result<BatchView<'a>> {
        self.view(self.eval_split, first, size, batch)
    }
    fn shuffle(&self) -> bool {
        true
    }
}
