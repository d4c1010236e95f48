//! [`OptimizerState`]: the per-row optimizer state of one table in a [`MatrixFile`] of the
//! table's storage.

use super::table::EmbeddingTable;
use crate::storage::{MatrixFile, MatrixId, RowSpan, StorageKind, TableError};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// f32 values per 4 KiB page.
const PAGE_F32S: usize = 4096 / 4;

/// Optimizer state of one table (Adagrad: rows x dim; row-wise Adagrad: rows x 1), in the same
/// storage as its table (an anonymous map, or
/// `dir/`[`state_file_name`](crate::storage::state_file_name)`(index)`), zeroed.
/// A stateless optimizer (SGD, width 0) has no map and no file.
#[derive(Debug)]
pub struct OptimizerState {
    rows: usize,
    matrix: Option<MatrixFile>,
}

impl OptimizerState {
    /// Zeroed `table.rows() x width` state for `table`, in its storage (the file lives next to
    /// the table file).
    pub fn create_for(table: &EmbeddingTable, width: usize) -> Result<OptimizerState, TableError> {
        let rows = table.rows();
        if width == 0 {
            return Ok(OptimizerState { rows, matrix: None });
        }
        let storage = match table.file_path() {
            None => StorageKind::Anon,
            Some(table_path) => StorageKind::File {
                dir: table_path.parent().unwrap_or(Path::new("")).to_path_buf(),
                lazy_init: false,
            },
        };
        let id = MatrixId::state(table.index());
        let mut matrix = MatrixFile::create(id, rows, width, table.seed(), &storage)?;
        if storage == StorageKind::Anon {
            // Fault every page in now, in parallel: otherwise the first steps of training
            // pay a page fault (zeroing 2 MiB) for almost every row they update.
            matrix
                .as_mut_slice()
                .par_chunks_mut(PAGE_F32S)
                .for_each(|page| page[0] = 0.0);
        }
        Ok(OptimizerState {
            rows,
            matrix: Some(matrix),
        })
    }

    /// Opens the existing state file `path` of table `index`, checking its shape.
    pub fn open(
        path: &Path,
        index: usize,
        expected_rows: usize,
        expected_width: usize,
    ) -> Result<OptimizerState, TableError> {
        let id = MatrixId::state(index);
        Ok(OptimizerState {
            rows: expected_rows,
            matrix: Some(MatrixFile::open(path, id, expected_rows, expected_width)?),
        })
    }

    /// Number of rows (the table's).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (dim for Adagrad, 1 for row-wise Adagrad, 0 for SGD).
    pub fn width(&self) -> usize {
        self.matrix.as_ref().map_or(0, MatrixFile::cols)
    }

    /// The rows x width state, row-major.
    pub fn as_slice(&self) -> &[f32] {
        self.matrix.as_ref().map_or(&[], MatrixFile::as_slice)
    }

    /// The rows x width state, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self.matrix
            .as_mut()
            .map_or(&mut [], MatrixFile::as_mut_slice)
    }

    /// The state file, `None` for an anonymous map or no state.
    pub fn file_path(&self) -> Option<&Path> {
        self.matrix.as_ref().and_then(MatrixFile::path)
    }

    /// Writes this state of table `table` as a complete state file (not yet fsynced)
    /// `dir/`[`state_file_name`](crate::storage::state_file_name)`(index)` (nothing for a
    /// stateless optimizer: returns None). The state records its table's index and seed, as
    /// the header of a state file does.
    pub fn write_to_dir(
        &self,
        dir: &Path,
        table: &EmbeddingTable,
    ) -> Result<Option<PathBuf>, TableError> {
        self.matrix_of(table)
            .map(|m| m.write_to_dir(dir))
            .transpose()
    }

    /// Writes this state of `table` (a row-wise shard: rows `span.first ..` of a table of
    /// `span.total` rows) at its offset in the whole table's state file, beside the other
    /// ranges' owners (see [`MatrixFile::write_rows_to_dir`]); not yet fsynced. Nothing for a
    /// stateless optimizer (returns None).
    pub fn write_rows_to_dir(
        &self,
        dir: &Path,
        table: &EmbeddingTable,
        span: RowSpan,
    ) -> Result<Option<PathBuf>, TableError> {
        (self.matrix_of(table))
            .map(|m| m.write_rows_to_dir(dir, span))
            .transpose()
    }

    /// The state matrix (None for a stateless optimizer), which records `table`'s index and
    /// seed in its file's header.
    fn matrix_of(&self, table: &EmbeddingTable) -> Option<&MatrixFile> {
        let m = self.matrix.as_ref()?;
        debug_assert_eq!(
            (m.id().index, m.seed()),
            (table.index(), table.seed()),
            "the state of another table"
        );
        Some(m)
    }

    /// Loads the state of table `index` (`rows` x `width`; width 0 loads nothing) from a state
    /// file into `storage`, like [`EmbeddingTable::load`].
    pub fn load(
        path: &Path,
        index: usize,
        rows: usize,
        width: usize,
        storage: &StorageKind,
    ) -> Result<OptimizerState, TableError> {
        Self::load_rows(path, index, RowSpan::whole(rows), rows, width, storage)
    }

    /// Loads rows `span.first .. span.first + rows` of the state of table `index` (a
    /// `span.total` x `width` state file) into `storage`, like [`EmbeddingTable::load_rows`].
    pub fn load_rows(
        path: &Path,
        index: usize,
        span: RowSpan,
        rows: usize,
        width: usize,
        storage: &StorageKind,
    ) -> Result<OptimizerState, TableError> {
        if width == 0 {
            return Ok(OptimizerState { rows, matrix: None });
        }
        let id = MatrixId::state(index);
        let matrix = MatrixFile::load_rows(path, id, span, rows, width, storage)?;
        Ok(OptimizerState {
            rows,
            matrix: Some(matrix),
        })
    }

    /// Writes a file-backed state back to disk and waits.
    pub fn flush(&self) -> Result<(), TableError> {
        self.matrix.as_ref().map_or(Ok(()), MatrixFile::flush)
    }
}
