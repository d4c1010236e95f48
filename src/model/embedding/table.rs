//! [`EmbeddingTable`]: one table's rows x dim weights in a [`MatrixFile`], initialised from
//! (seed, index, row) eagerly or, for lazy file tables, on first touch.

use super::init::RowInit;
use super::lazy::LazyRows;
use crate::storage::{MatrixFile, MatrixId, RowSpan, StorageKind, TableError};
use dlrm_kernels::bf16::Isa;
use dlrm_kernels::embedding::bf16::{join_f32_slice, split_f32_slice};
use rayon::prelude::*;
use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How a table stores its f32 weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableLayout {
    /// rows x dim f32 values.
    Fp32,
    /// Split BF16 ([`dlrm_kernels::embedding::bf16`]): the rows x dim upper halves (bf16,
    /// what the forward reads), then the rows x dim lower halves, in the same bytes an f32
    /// table takes. Anonymous memory only.
    SplitBf16,
}

/// One embedding table: rows x dim f32 weights in a memory map (as f32 values, or split into
/// bf16 upper and 16-bit lower halves), initialised from (seed, index, row) eagerly or, for
/// lazy file tables, on first touch.
#[derive(Debug)]
pub struct EmbeddingTable {
    weights: MatrixFile,
    /// Rows still pending; nothing for eager tables (those without a row bitmap).
    lazy: LazyRows,
    layout: TableLayout,
}

/// Rows per task when a table changes layout (about 1 MiB of f32 rows).
const RELAYOUT_TASK_BYTES: usize = 1 << 20;

impl EmbeddingTable {
    /// A table over `weights`, counting the rows its row bitmap (if any) leaves pending.
    fn over(weights: MatrixFile) -> EmbeddingTable {
        let lazy = weights.bitmap().map_or_else(LazyRows::default, |bits| {
            LazyRows::count(bits, weights.rows())
        });
        EmbeddingTable {
            weights,
            lazy,
            layout: TableLayout::Fp32,
        }
    }

    /// Creates table `index` (rows x dim) in `storage`, initialised from `seed` (eagerly, or
    /// lazily for `StorageKind::File { lazy_init: true }`). A file table is a new file
    /// `dir/`[`table_file_name`](crate::storage::table_file_name)`(index)`: it is an error if
    /// it already exists, and a failed creation (no space, I/O error) removes it again.
    pub fn create(
        index: usize,
        rows: usize,
        dim: usize,
        seed: u64,
        storage: &StorageKind,
    ) -> Result<EmbeddingTable, TableError> {
        let mut weights = MatrixFile::create(MatrixId::weights(index), rows, dim, seed, storage)?;
        let lazy = match weights.bitmap() {
            Some(_) => LazyRows::all_pending(rows),
            None => {
                RowInit::new(seed, index, rows).fill_all(weights.as_mut_slice(), dim);
                LazyRows::default()
            }
        };
        Ok(EmbeddingTable {
            weights,
            lazy,
            layout: TableLayout::Fp32,
        })
    }

    /// Rows `rows` of table `index` (a `total_rows` x `dim` table) in anonymous memory, each
    /// holding the initial value of its row of the whole table: a rank's row-wise shard, whose
    /// row i is the table's row `rows.start + i`.
    pub fn create_rows(
        index: usize,
        total_rows: usize,
        rows: Range<usize>,
        dim: usize,
        seed: u64,
    ) -> Result<EmbeddingTable, TableError> {
        let id = MatrixId::weights(index);
        let mut weights = MatrixFile::create(id, rows.len(), dim, seed, &StorageKind::Anon)?;
        RowInit::new(seed, index, total_rows).fill_from(weights.as_mut_slice(), dim, rows.start);
        Ok(EmbeddingTable::over(weights))
    }

    /// Creates table `index` holding `values` (rows x dim, row-major; e.g. imported weights)
    /// in `storage`, initialised eagerly whatever the storage's `lazy_init`.
    pub fn create_from(
        index: usize,
        dim: usize,
        seed: u64,
        values: &[f32],
        storage: &StorageKind,
    ) -> Result<EmbeddingTable, TableError> {
        let rows = values.len().checked_div(dim).unwrap_or(0);
        if rows * dim != values.len() {
            return Err(TableError::BadShape {
                rows,
                cols: dim,
                reason: "the values are not a whole number of rows",
            });
        }
        let storage = match storage {
            StorageKind::File { dir, .. } => StorageKind::File {
                dir: dir.clone(),
                lazy_init: false,
            },
            StorageKind::Anon => StorageKind::Anon,
        };
        let mut weights = MatrixFile::create(MatrixId::weights(index), rows, dim, seed, &storage)?;
        weights.as_mut_slice().copy_from_slice(values);
        Ok(EmbeddingTable::over(weights))
    }

    /// Opens the existing table file `path` as table `index`, checking it against the model
    /// configuration (`expected_rows` x `expected_dim`). Nothing is initialised: the values are
    /// the file's; a lazily initialised table resumes with its bitmap and seed.
    pub fn open(
        path: &Path,
        index: usize,
        expected_rows: usize,
        expected_dim: usize,
    ) -> Result<EmbeddingTable, TableError> {
        let id = MatrixId::weights(index);
        let weights = MatrixFile::open(path, id, expected_rows, expected_dim)?;
        Ok(EmbeddingTable::over(weights))
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.weights.rows()
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.weights.cols()
    }

    /// This table's index in the model (part of its initialisation key).
    pub fn index(&self) -> usize {
        self.weights.id().index
    }

    /// The seed of the initial values.
    pub fn seed(&self) -> u64 {
        self.weights.seed()
    }

    /// How the weights are stored.
    pub fn layout(&self) -> TableLayout {
        self.layout
    }

    /// Panics on a split table: its f32 values exist only as halves.
    fn assert_fp32(&self, what: &str) {
        assert_eq!(
            self.layout,
            TableLayout::Fp32,
            "table {}: {what} of a split-BF16 table (use values() or split_halves())",
            self.index()
        );
    }

    /// The rows x dim weights, row-major, of an f32 table (panics on a split one: see
    /// [`values`](Self::values)). In a lazy table, rows not yet materialised read as zeros:
    /// call [`materialize`](Self::materialize) with the ids about to be used first.
    pub fn weights(&self) -> &[f32] {
        self.assert_fp32("weights()");
        self.weights.as_slice()
    }

    /// The weights as little-endian bytes (for writing them out, e.g. to safetensors).
    pub fn weight_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self.weights())
    }

    /// The f32 weights whatever the layout: borrowed from an f32 table, the halves of a split
    /// one joined (exactly) into a new buffer.
    pub fn values(&self) -> Cow<'_, [f32]> {
        match self.layout {
            TableLayout::Fp32 => Cow::Borrowed(self.weights.as_slice()),
            TableLayout::SplitBf16 => {
                let mut out = vec![0.0f32; self.rows() * self.dim()];
                let (hi, lo) = self.split_halves();
                join_rows(hi, lo, &mut out, self.dim());
                Cow::Owned(out)
            }
        }
    }

    /// The weights, writable, of an f32 table (panics on a split one; same caveat as
    /// [`weights`](Self::weights) for lazy tables: a write to a row not yet materialised is
    /// overwritten when it is).
    pub fn weights_mut(&mut self) -> &mut [f32] {
        self.assert_fp32("weights_mut()");
        self.weights.as_mut_slice()
    }

    /// Sets every weight from `values` (rows x dim, row-major), in either layout.
    pub fn assign(&mut self, values: &[f32]) {
        let dim = self.dim();
        match self.layout {
            TableLayout::Fp32 => self.weights_mut().copy_from_slice(values),
            TableLayout::SplitBf16 => {
                let (hi, lo) = self.split_halves_mut();
                split_rows(values, hi, lo, dim);
            }
        }
    }

    /// The upper (bf16) and lower halves of a split table, rows x dim each (panics on an f32
    /// table).
    pub fn split_halves(&self) -> (&[u16], &[u16]) {
        assert_eq!(self.layout, TableLayout::SplitBf16, "not a split table");
        let all: &[u16] = bytemuck::cast_slice(self.weights.as_slice());
        all.split_at(all.len() / 2)
    }

    /// [`split_halves`](Self::split_halves), writable.
    pub fn split_halves_mut(&mut self) -> (&mut [u16], &mut [u16]) {
        assert_eq!(self.layout, TableLayout::SplitBf16, "not a split table");
        let all: &mut [u16] = bytemuck::cast_slice_mut(self.weights.as_mut_slice());
        let half = all.len() / 2;
        all.split_at_mut(half)
    }

    /// A copy of this table in the other layout `layout`, its values unchanged (the split is
    /// exact). Only eager tables in anonymous memory are split (a file table's format is f32);
    /// the copy is a new anonymous map.
    pub fn with_layout(&self, layout: TableLayout) -> Result<EmbeddingTable, TableError> {
        assert!(
            layout != self.layout && self.file_path().is_none() && self.lazy.pending == 0,
            "table {}: only an eager anonymous table changes layout, to another one",
            self.index()
        );
        let (rows, dim) = (self.rows(), self.dim());
        let mut weights = MatrixFile::create(
            self.weights.id(),
            rows,
            dim,
            self.seed(),
            &StorageKind::Anon,
        )?;
        match layout {
            TableLayout::SplitBf16 => {
                let all: &mut [u16] = bytemuck::cast_slice_mut(weights.as_mut_slice());
                let (hi, lo) = all.split_at_mut(rows * dim);
                split_rows(self.weights.as_slice(), hi, lo, dim);
            }
            TableLayout::Fp32 => {
                let (hi, lo) = self.split_halves();
                join_rows(hi, lo, weights.as_mut_slice(), dim);
            }
        }
        Ok(EmbeddingTable {
            weights,
            lazy: LazyRows::default(),
            layout,
        })
    }

    /// The generator of this table's initial values.
    fn row_init(&self) -> RowInit {
        RowInit::new(self.seed(), self.index(), self.rows())
    }

    /// Gives every row among `ids` not yet materialised its initial value (lazy tables; a no-op
    /// for eager ones, and O(1) once every row is materialised). Ids must be valid rows
    /// (checked by the kernels' `Bags::check`); an id out of range panics.
    pub fn materialize(&mut self, ids: &[u32]) {
        if self.lazy.pending == 0 {
            return;
        }
        let (init, dim) = (self.row_init(), self.dim());
        if let (data, Some(bits)) = self.weights.values_and_bitmap_mut() {
            self.lazy.materialize(&init, data, bits, dim, ids);
        }
    }

    /// Gives every row not yet materialised its initial value, in parallel: after this the
    /// weights are the table's real values, as every reader of the whole table (an export)
    /// needs. A no-op for eager tables. On a copy-on-write (loaded) table nothing reaches
    /// the file.
    pub fn materialize_all(&mut self) {
        let (init, dim) = (self.row_init(), self.dim());
        if let (data, Some(bits)) = self.weights.values_and_bitmap_mut() {
            self.lazy.materialize_all(&init, data, bits, dim, 0);
        }
    }

    /// Rows still waiting for their initial value (0 for eager tables).
    pub fn pending_rows(&self) -> usize {
        self.lazy.pending
    }

    /// The table file, `None` for an anonymous table.
    pub fn file_path(&self) -> Option<&Path> {
        self.weights.path()
    }

    /// Writes this table as a complete table file (not yet fsynced)
    /// `dir/`[`table_file_name`](crate::storage::table_file_name)`(index)` (header, weights,
    /// and the row bitmap of a lazy table), with sequential writes: how a checkpoint stores
    /// it, whatever the table's own storage.
    /// A split table is written as its joined f32 values (built in a temporary anonymous
    /// map), so checkpoints are the same for both layouts.
    pub fn write_to_dir(&self, dir: &Path) -> Result<PathBuf, TableError> {
        self.with_f32_weights(|w| w.write_to_dir(dir))
    }

    /// Writes this table (a row-wise shard: rows `span.first ..` of a table of `span.total`
    /// rows) at its offset in the whole table's file in `dir`, beside the other ranges'
    /// owners (see [`MatrixFile::write_rows_to_dir`]); not yet fsynced.
    pub fn write_rows_to_dir(&self, dir: &Path, span: RowSpan) -> Result<PathBuf, TableError> {
        self.with_f32_weights(|w| w.write_rows_to_dir(dir, span))
    }

    /// Runs `write` on the weights as f32 rows: the table's own matrix, or for a split
    /// table its joined values in a temporary anonymous map.
    fn with_f32_weights(
        &self,
        write: impl FnOnce(&MatrixFile) -> Result<PathBuf, TableError>,
    ) -> Result<PathBuf, TableError> {
        match self.layout {
            TableLayout::Fp32 => write(&self.weights),
            TableLayout::SplitBf16 => {
                let (rows, dim, seed) = (self.rows(), self.dim(), self.seed());
                let id = self.weights.id();
                let mut joined = MatrixFile::create(id, rows, dim, seed, &StorageKind::Anon)?;
                let (hi, lo) = self.split_halves();
                join_rows(hi, lo, joined.as_mut_slice(), dim);
                write(&joined)
            }
        }
    }

    /// Loads table `index` from a table file (as [`write_to_dir`](Self::write_to_dir) writes
    /// it), checked against the model (`rows` x `dim`), into `storage`: anonymous storage reads
    /// it into memory (initialising any rows a lazy file never materialised); file storage maps
    /// it copy-on-write, so loading reads nothing up front and training never writes through to
    /// the file.
    pub fn load(
        path: &Path,
        index: usize,
        rows: usize,
        dim: usize,
        storage: &StorageKind,
    ) -> Result<EmbeddingTable, TableError> {
        Self::load_rows(path, index, RowSpan::whole(rows), rows, dim, storage)
    }

    /// Loads rows `span.first .. span.first + rows` of table `index` (a `span.total` x `dim`
    /// table file; a rank's row-wise shard, or the whole table) into `storage`, reading only
    /// those rows, as [`load`](Self::load) loads a whole table. A shard's rows that a lazy
    /// file never materialised get their initial values (those of the whole table's rows)
    /// now: a shard has no bitmap of its own.
    pub fn load_rows(
        path: &Path,
        index: usize,
        span: RowSpan,
        rows: usize,
        dim: usize,
        storage: &StorageKind,
    ) -> Result<EmbeddingTable, TableError> {
        let id = MatrixId::weights(index);
        let weights = MatrixFile::load_rows(path, id, span, rows, dim, storage)?;
        let mut table = EmbeddingTable::over(weights);
        if *storage == StorageKind::Anon || rows != span.total {
            // In memory the table has no file to keep a bitmap in, and a shard's row numbers
            // are not the file's: it becomes eager.
            let init = RowInit::new(table.seed(), index, span.total);
            if let (data, Some(bits)) = table.weights.values_and_bitmap_mut() {
                table
                    .lazy
                    .materialize_all(&init, data, bits, dim, span.first);
            }
            table.weights.drop_bitmap();
        }
        Ok(table)
    }

    /// Writes a file table's weights and then its bitmap back to disk and waits, so a durable
    /// bit never claims a row whose data is not; nothing to do for an anonymous table.
    pub fn flush(&self) -> Result<(), TableError> {
        self.weights.flush()
    }
}

/// Splits f32 rows of `dim` values into their halves, rows in parallel.
fn split_rows(values: &[f32], hi: &mut [u16], lo: &mut [u16], dim: usize) {
    let chunk = (RELAYOUT_TASK_BYTES / (4 * dim)).max(1) * dim;
    let isa = Isa::selected();
    values
        .par_chunks(chunk)
        .zip(hi.par_chunks_mut(chunk).zip(lo.par_chunks_mut(chunk)))
        .for_each(|(v, (h, l))| split_f32_slice(v, h, l, isa));
}

/// Joins halves into f32 rows of `dim` values, rows in parallel.
fn join_rows(hi: &[u16], lo: &[u16], values: &mut [f32], dim: usize) {
    let chunk = (RELAYOUT_TASK_BYTES / (4 * dim)).max(1) * dim;
    let isa = Isa::selected();
    values
        .par_chunks_mut(chunk)
        .zip(hi.par_chunks(chunk).zip(lo.par_chunks(chunk)))
        .for_each(|(v, (h, l))| join_f32_slice(h, l, v, isa));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mmap::MAX_ROWS;

    #[test]
    fn shapes_are_checked() {
        for (rows, cols) in [
            (0, 4),
            (4, 0),
            (MAX_ROWS + 1, 1),
            (MAX_ROWS, usize::MAX / 8),
        ] {
            let err = EmbeddingTable::create(0, rows, cols, 0, &StorageKind::Anon).unwrap_err();
            assert!(
                matches!(err, TableError::BadShape { .. }),
                "{rows} x {cols}: {err}"
            );
        }
    }
}
