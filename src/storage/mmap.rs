//! Memory maps: anonymous (huge-page aligned), shared and copy-on-write file maps, read-only
//! file maps, and [`MappedMatrix`], a row-major f32 matrix in one of them.
//!
//! The f32 views of mapped bytes go through `bytemuck` (maps start on page boundaries, so the
//! views are aligned, which bytemuck checks); the values are little-endian on disk and the
//! crate only builds for little-endian hosts (see [`super::matrix_file`]).

use super::sys::{advise_huge_pages, advise_random};
use super::{TableError, io_error};
use memmap2::{Mmap, MmapMut, MmapOptions};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Transparent huge page size on x86-64 and most aarch64 kernels: anonymous maps of at least
/// this size are aligned to it so that every full 2 MiB of the matrix can be one huge page.
pub const HUGE_PAGE: usize = 2 << 20;
/// Largest row count: row ids are u32.
pub const MAX_ROWS: usize = 1 << 32;

/// Maps `len` bytes of `file` from `offset`, shared and read-write, advised for random access.
pub(crate) fn map_shared(file: &File, offset: u64, len: usize) -> io::Result<MmapMut> {
    // SAFETY: a file map is sound while the file keeps its length and no one else writes it.
    // Every caller maps a file this module created exclusively or whose length it has just
    // checked against the header (so the whole range exists), with its space reserved; other
    // processes modifying an open table file is outside the contract stated in the module docs.
    let map = unsafe { MmapOptions::new().offset(offset).len(len).map_mut(file) }?;
    advise_random(&map)?;
    Ok(map)
}

/// Maps `len` bytes of `file` from `offset` copy-on-write: reads come from the file, writes go
/// to private memory and never reach it (a checkpoint resumed without being written through).
pub(crate) fn map_private(file: &File, offset: u64, len: usize) -> io::Result<MmapMut> {
    // SAFETY: as for `map_shared`; a private map additionally never writes the file, so the only
    // requirement is that the file keeps its length, which the caller has checked.
    unsafe { MmapOptions::new().offset(offset).len(len).map_copy(file) }
}

/// Maps a whole file read-only (the arrays of a binary dataset, see `crate::data::binary`).
///
/// The same contract as the table maps: the file must keep its length and contents while
/// mapped. The dataset is written once, under a temporary name, and never modified after its
/// rename; other processes truncating or rewriting a dataset file in use is outside the
/// contract (as for every memory-mapped database file).
pub fn map_read_only(path: &Path) -> io::Result<Mmap> {
    let file = File::open(path)?;
    // SAFETY: a read-only private view of a file that, by the contract above, no one modifies
    // while it is mapped; the map owns its own reference to the file.
    unsafe { Mmap::map(&file) }
}

/// Bytes of a rows x cols f32 matrix, after checking the shape.
pub fn matrix_bytes(rows: usize, cols: usize) -> Result<usize, TableError> {
    let bad = |reason| TableError::BadShape { rows, cols, reason };
    if rows == 0 || cols == 0 {
        return Err(bad("rows and columns must be positive"));
    }
    if rows > MAX_ROWS {
        return Err(bad("more rows than u32 ids can address"));
    }
    rows.checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .filter(|&n| n <= isize::MAX as usize - HUGE_PAGE)
        .ok_or_else(|| bad("size overflows the address space"))
}

/// A rows x cols f32 matrix in a memory map (anonymous or file-backed), row-major.
#[derive(Debug)]
pub struct MappedMatrix {
    map: MmapMut,
    /// Where the matrix starts in `map` (non-zero only to align an anonymous map to 2 MiB).
    offset: usize,
    rows: usize,
    cols: usize,
    /// The file a shared map writes through to; `None` for anonymous and copy-on-write maps.
    path: Option<PathBuf>,
}

impl MappedMatrix {
    /// A zeroed anonymous matrix, 2 MiB-aligned and advised for transparent huge pages when it
    /// spans at least one.
    pub fn anon(rows: usize, cols: usize) -> Result<MappedMatrix, TableError> {
        let bytes = matrix_bytes(rows, cols)?;
        let huge = bytes >= HUGE_PAGE;
        // Over-map by one huge page and start at the first 2 MiB boundary: the kernel only
        // backs 2 MiB-aligned extents with huge pages. The unused slack is never touched, so
        // it costs address space, not memory.
        let map_len = if huge { bytes + HUGE_PAGE } else { bytes };
        let map = MmapOptions::new()
            .len(map_len)
            .map_anon()
            .map_err(|source| TableError::AnonMap { rows, cols, source })?;
        let offset = if huge {
            map.as_ptr().align_offset(HUGE_PAGE)
        } else {
            0
        };
        if huge {
            advise_huge_pages(&map, offset, bytes);
        }
        Ok(MappedMatrix {
            map,
            offset,
            rows,
            cols,
            path: None,
        })
    }

    /// Maps rows x cols values of `file` (at `path`) from `offset`, shared: writes reach the
    /// file. The caller has checked that the file holds the whole range.
    pub(crate) fn shared(
        file: &File,
        path: PathBuf,
        offset: u64,
        rows: usize,
        cols: usize,
    ) -> Result<MappedMatrix, TableError> {
        let map = map_shared(file, offset, rows * cols * 4).map_err(io_error(&path, "map"))?;
        Ok(MappedMatrix {
            map,
            offset: 0,
            rows,
            cols,
            path: Some(path),
        })
    }

    /// Maps rows x cols values of `file` from `offset` copy-on-write (see [`map_private`]).
    pub(crate) fn private(
        file: &File,
        path: &Path,
        offset: u64,
        rows: usize,
        cols: usize,
    ) -> Result<MappedMatrix, TableError> {
        let map = map_private(file, offset, rows * cols * 4).map_err(io_error(path, "map"))?;
        Ok(MappedMatrix {
            map,
            offset: 0,
            rows,
            cols,
            path: None,
        })
    }

    /// An anonymous matrix holding rows x cols values of `file` from `offset`, read with one
    /// pass of large reads.
    pub(crate) fn anon_from_file(
        file: &File,
        path: &Path,
        offset: u64,
        rows: usize,
        cols: usize,
    ) -> Result<MappedMatrix, TableError> {
        let mut m = MappedMatrix::anon(rows, cols)?;
        file.read_exact_at(bytemuck::cast_slice_mut(m.as_mut_slice()), offset)
            .map_err(io_error(path, "read"))?;
        Ok(m)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The rows x cols values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        bytemuck::cast_slice(&self.map[self.offset..self.offset + self.rows * self.cols * 4])
    }

    /// The rows x cols values, row-major, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        let end = self.offset + self.rows * self.cols * 4;
        bytemuck::cast_slice_mut(&mut self.map[self.offset..end])
    }

    /// The file a shared map writes through to; `None` for anonymous and copy-on-write maps.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes dirty pages of a shared file map back to its file and waits (msync); nothing to
    /// do for other maps.
    pub fn flush(&self) -> Result<(), TableError> {
        match &self.path {
            Some(path) => self.map.flush().map_err(io_error(path, "flush")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_anonymous_maps_are_huge_page_aligned() {
        let m = MappedMatrix::anon(3 << 18, 4).unwrap();
        assert_eq!(m.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
        assert!(m.as_slice().iter().all(|&v| v == 0.0));
        assert_eq!(m.as_slice().len(), 3 << 20);
        let small = MappedMatrix::anon(3, 5).unwrap();
        assert_eq!(small.as_slice().len(), 15);
    }
}
