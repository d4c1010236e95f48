//! The model's view of its embedding tables: [`EmbeddingTable`] (weights, lazily initialised
//! rows, the id check) and [`OptimizerState`], each over one [`MatrixFile`] of
//! [`crate::storage`], which owns the maps, the files and their format.
//!
//! Every table is a `rows x dim` f32 matrix in a memory map, never in a `Vec`, so that tables
//! larger than RAM work (the OS pages a file map) and small ones avoid the TLB misses of random
//! lookups (an anonymous map with transparent huge pages). Two storages sit behind one API
//! ([`StorageKind`]):
//!
//! - **anon** (the default): an anonymous private map, aligned to 2 MiB and advised with
//!   `MADV_HUGEPAGE` (THP is in `madvise` mode on the target machines; `MAP_HUGETLB` would need
//!   a reserved hugetlbfs pool). A random lookup into a GiB table touches a new 4 KiB page almost
//!   every time, so with 4 KiB pages the page walk, not DRAM, sets the speed. Initialised eagerly,
//!   in parallel.
//! - **file**: one file per table in a directory, mapped shared and read-write. Its space is
//!   reserved up front after a free-space check, so a full disk is an `Err` at creation, never
//!   a `SIGBUS` when a page is first written mid-training. Initialised eagerly, or lazily: a
//!   row is written from its key the first time it is touched
//!   ([`EmbeddingTable::materialize`]), so creating a 32 GiB table costs an `fallocate`, not a
//!   32 GiB write.
//!
//! Initial values follow the PyTorch reference ([`init_row`]): a row's values are a pure
//! function of (seed, table, row), so eager and lazy tables, anonymous and file-backed, hold
//! the same numbers for any thread count and any materialisation order.
//!
//! Optimizer state (Adagrad: rows x dim; row-wise Adagrad: rows x 1) lives in a sibling
//! [`OptimizerState`] matrix of the same storage kind, zero-initialised (a fresh anonymous map
//! and an unwritten fallocated extent both read as zeros).

mod init;
mod lazy;
mod state;
mod table;

pub use init::{init_bound, init_row};
pub use state::OptimizerState;
pub use table::{EmbeddingTable, TableLayout};

use crate::storage::{MatrixFile, MatrixId, StorageKind, TableError};
use std::path::{Path, PathBuf};

/// Creates tables `first_index + t` of `rows[t]` x `dim` (see [`EmbeddingTable::create`]) and
/// their optimizer state of `width` columns, in `storage`. For file storage it first checks
/// that none of the files exists and that the file system has room for all of them, so a
/// model that cannot fit fails before any file is made; and if a creation fails anyway, the
/// files already made are removed: a failed creation leaves nothing behind.
pub fn create_tables(
    first_index: usize,
    rows: &[usize],
    dim: usize,
    width: usize,
    seed: u64,
    storage: &StorageKind,
) -> Result<(Vec<EmbeddingTable>, Vec<OptimizerState>), TableError> {
    let mut planned = Vec::with_capacity(2 * rows.len());
    for (t, &r) in rows.iter().enumerate() {
        planned.push((MatrixId::weights(first_index + t), r, dim));
        if width > 0 {
            planned.push((MatrixId::state(first_index + t), r, width));
        }
    }
    MatrixFile::check_room(storage, &planned)?;
    let mut tables = Vec::with_capacity(rows.len());
    let mut states = Vec::with_capacity(rows.len());
    let created = rows.iter().enumerate().try_for_each(|(t, &r)| {
        let table = EmbeddingTable::create(first_index + t, r, dim, seed, storage)?;
        let state = OptimizerState::create_for(&table, width);
        tables.push(table);
        states.push(state?);
        Ok(())
    });
    if let Err(e) = created {
        let files: Vec<PathBuf> = tables
            .iter()
            .filter_map(|t| t.file_path())
            .chain(states.iter().filter_map(|s| s.file_path()))
            .map(Path::to_path_buf)
            .collect();
        drop((tables, states));
        for f in files {
            // The creation error is the one worth reporting; a failed cleanup adds nothing.
            let _ = std::fs::remove_file(f);
        }
        return Err(e);
    }
    Ok((tables, states))
}
