//! Embedding table storage: memory maps, anonymous (huge pages) or file-backed.
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
//!   reserved up front with `posix_fallocate` after a `statvfs` free-space check, so a full disk
//!   is an `Err` at creation, never a `SIGBUS` when a page is first written mid-training.
//!   Initialised eagerly, or lazily: a row is written from its key the first time it is touched
//!   ([`EmbeddingTable::materialize`]), so creating a 32 GiB table costs an `fallocate`, not a
//!   32 GiB write.
//!
//! Initial values follow the PyTorch reference (`uniform(-sqrt(1/rows), +sqrt(1/rows))`) and
//! come from the counter-based generator of [`crate::rng`]: a row's values are a pure function
//! of (seed, table, row) ([`init_row`]), so eager and lazy tables, anonymous and file-backed,
//! hold the same numbers for any thread count and any materialisation order.
//!
//! Optimizer state (Adagrad: rows x dim; row-wise Adagrad: rows x 1) lives in a sibling
//! [`OptimizerState`] matrix of the same storage kind, zero-initialised (a fresh anonymous map
//! and an unwritten fallocated extent both read as zeros).
//!
//! # File format (version 1)
//!
//! All integers little-endian. The header fills the first 4096 bytes; the rest of it is zero.
//!
//! | offset | size | field                                                                 |
//! |-------:|-----:|-----------------------------------------------------------------------|
//! |      0 |    8 | magic `b"DLRMTBL\0"`                                                  |
//! |      8 |    4 | format version (1)                                                    |
//! |     12 |    4 | element type (1 = f32)                                                |
//! |     16 |    8 | rows                                                                  |
//! |     24 |    8 | cols                                                                  |
//! |     32 |    8 | data offset (a multiple of 4096; 4096 when written by this version)   |
//! |     40 |    4 | kind (1 = embedding weights, 2 = optimizer state)                     |
//! |     44 |    4 | flags (bit 0: lazily initialised, a row bitmap follows the data)      |
//! |     48 |    8 | seed of the initial values                                            |
//! |     56 |    8 | table index (the key of the initial values, checked on open)          |
//! |     64 |    8 | bitmap offset (0 without bitmap)                                      |
//! |     72 |      | reserved (zero)                                                       |
//!
//! Data: rows x cols f32, row-major, at the data offset. A lazily initialised table keeps its
//! materialisation bitmap (bit `r % 8` of byte `r / 8` set once row `r` holds its initial value)
//! in the same file, after the data at the next 4096-byte boundary, mapped like the data: a
//! reopened table (resumed training, a copied checkpoint) still knows which rows are real and
//! which must still be initialised, and the bitmap costs one bit per row of memory, paged like
//! the rest.
//!
//! # Safety contract of the file maps
//!
//! A file map is only sound while nothing else truncates or rewrites the file: this module
//! creates its files exclusively (`create_new`), checks their length against the header before
//! mapping, and reserves their space, so within this process a mapped table never faults. Other
//! processes must not modify a table file while it is open (the same contract as every
//! memory-mapped database file).

use crate::rng;
use memmap2::{Mmap, MmapMut, MmapOptions};
use rayon::prelude::*;
use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

#[cfg(not(target_endian = "little"))]
compile_error!("table files hold little-endian f32 and are mapped as they are on disk");

/// First 8 bytes of every table file.
pub const MAGIC: [u8; 8] = *b"DLRMTBL\0";
/// The file format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Element type code of f32.
pub const ELEMENT_F32: u32 = 1;
/// Length of the header, and the data offset this version writes: one 4 KiB page, so the data
/// starts page-aligned.
pub const HEADER_LEN: usize = 4096;
/// Header flag: the table is lazily initialised and a row bitmap follows its data.
const FLAG_LAZY: u32 = 1;
/// Page granularity of the file layout (data and bitmap offsets are multiples of it).
const FILE_PAGE: u64 = 4096;
/// Transparent huge page size on x86-64 and most aarch64 kernels: anonymous maps of at least
/// this size are aligned to it so that every full 2 MiB of the table can be one huge page.
const HUGE_PAGE: usize = 2 << 20;
/// Bytes of rows one task initialises eagerly: large enough to amortise a rayon task, and one
/// huge page, so threads do not fault the same huge page at once.
const INIT_TASK_BYTES: usize = HUGE_PAGE;
/// Largest row count: row ids are u32.
const MAX_ROWS: usize = 1 << 32;

/// Where a table (and its optimizer state) lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StorageKind {
    /// An anonymous map with transparent huge pages, initialised eagerly. Fast; bounded by RAM.
    #[default]
    Anon,
    /// One file per table in `dir` ([`table_file_name`]), mapped shared. `lazy_init`: rows are
    /// initialised on first touch ([`EmbeddingTable::materialize`]) instead of at creation.
    File {
        /// Existing directory that holds the table files.
        dir: PathBuf,
        /// Initialise rows on first touch rather than all at creation.
        lazy_init: bool,
    },
}

/// What a table file holds (header field `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatrixKind {
    /// The embedding rows of a table.
    Weights = 1,
    /// The optimizer state of a table (Adagrad accumulators).
    OptimizerState = 2,
}

impl MatrixKind {
    fn from_code(code: u32) -> Option<MatrixKind> {
        match code {
            1 => Some(MatrixKind::Weights),
            2 => Some(MatrixKind::OptimizerState),
            _ => None,
        }
    }
}

impl fmt::Display for MatrixKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MatrixKind::Weights => "embedding weights",
            MatrixKind::OptimizerState => "optimizer state",
        })
    }
}

/// Why a table could not be created or opened. Every variant about a file names it.
#[derive(thiserror::Error, Debug)]
pub enum TableError {
    /// A shape no table can have (checked before anything is mapped or created).
    #[error("invalid table shape {rows} x {cols}: {reason}")]
    BadShape {
        rows: usize,
        cols: usize,
        reason: &'static str,
    },
    /// The OS refused an anonymous map (address space or overcommit limits).
    #[error("cannot map an anonymous {rows} x {cols} f32 matrix: {source}")]
    AnonMap {
        rows: usize,
        cols: usize,
        #[source]
        source: io::Error,
    },
    /// A system call on a file or directory failed.
    #[error("{}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// The file system has too little free space for the file.
    #[error(
        "{}: needs {needed} bytes, but its file system has only {available} bytes free",
        .path.display()
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    /// The file is shorter than a header (empty, or cut short).
    #[error("{}: {len} bytes, too short for the {HEADER_LEN}-byte table header", .path.display())]
    TooShort { path: PathBuf, len: u64 },
    /// The file does not start with [`MAGIC`]: not a table file.
    #[error("{}: not a dlrm table file (magic {found:02x?})", .path.display())]
    BadMagic { path: PathBuf, found: [u8; 8] },
    /// A format version this build cannot read.
    #[error(
        "{}: format version {found}, this build reads version {FORMAT_VERSION}",
        .path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    /// An element type other than f32.
    #[error("{}: element type code {found}, only f32 (code {ELEMENT_F32}) is supported", .path.display())]
    UnknownElementType { path: PathBuf, found: u32 },
    /// A header whose fields contradict each other or this format.
    #[error("{}: corrupt header: {reason}", .path.display())]
    BadHeader { path: PathBuf, reason: String },
    /// The file is shorter than its header says (truncated copy or crashed write).
    #[error("{}: truncated: {len} bytes, but its header describes {expected}", .path.display())]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    /// The file holds the other kind of matrix (weights for state or state for weights).
    #[error("{}: holds {found}, expected {expected}", .path.display())]
    WrongKind {
        path: PathBuf,
        expected: MatrixKind,
        found: MatrixKind,
    },
    /// The file's shape differs from the model configuration.
    #[error(
        "{}: {found_rows} x {found_cols}, but the model expects {expected_rows} x {expected_cols}",
        .path.display()
    )]
    ShapeMismatch {
        path: PathBuf,
        expected_rows: usize,
        expected_cols: usize,
        found_rows: u64,
        found_cols: u64,
    },
    /// The file belongs to another table of the model.
    #[error("{}: holds table {found}, expected table {expected}", .path.display())]
    IndexMismatch {
        path: PathBuf,
        expected: usize,
        found: u64,
    },
}

fn io_error<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> TableError + 'a {
    move |source| TableError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// `table_007.emb`: the file of table `index`'s weights in a file-storage directory.
pub fn table_file_name(index: usize) -> String {
    format!("table_{index:03}.emb")
}

/// `table_007.state`: the file of table `index`'s optimizer state.
pub fn state_file_name(index: usize) -> String {
    format!("table_{index:03}.state")
}

/// `dir`, or `.` for the empty path (the parent of a bare file name).
fn dir_or_cwd(dir: &Path) -> &Path {
    if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }
}

/// Bytes available to this (unprivileged) process on the file system that holds `dir`
/// (`statvfs`: free blocks for non-root users times the fragment size).
pub fn available_space(dir: &Path) -> Result<u64, TableError> {
    let dir = dir_or_cwd(dir);
    statvfs_available(dir).map_err(io_error(dir, "check free space"))
}

fn statvfs_available(dir: &Path) -> io::Result<u64> {
    let c_path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a NUL-terminated string that outlives the call; st points to writable
    // memory the size of a statvfs record, which the call fills on success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised every field of st.
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (u32 or u64).
    #[allow(clippy::unnecessary_cast)]
    let bytes = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    Ok(bytes)
}

/// Allocates blocks for the first `len` bytes of `file`, so writing them later through a map
/// cannot fail for lack of space (which a map reports as SIGBUS).
fn reserve(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size exceeds off_t"))?;
    loop {
        // SAFETY: the descriptor belongs to `file`, open for writing for the whole call;
        // posix_fallocate takes plain integers and touches no memory of this process.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        match rc {
            0 => return Ok(()),
            libc::EINTR => continue,
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// Maps `len` bytes of `file` from `offset`, shared and read-write.
fn map_file(file: &File, offset: u64, len: usize) -> io::Result<MmapMut> {
    // SAFETY: a file map is sound while the file keeps its length and no one else writes it.
    // Every caller maps a file this module created exclusively or whose length it has just
    // checked against the header (so the whole range exists), with its space reserved; other
    // processes modifying an open table file is outside the contract stated in the module docs.
    let map = unsafe { MmapOptions::new().offset(offset).len(len).map_mut(file) }?;
    // Rows are read and written at random: without this advice every page fault reads ahead
    // (and, in a fallocated extent, zero-fills) up to megabytes around the one page it needs.
    #[cfg(target_os = "linux")]
    map.advise(memmap2::Advice::Random)?;
    Ok(map)
}

/// Maps `len` bytes of `file` from `offset` copy-on-write: reads come from the file, writes go
/// to private memory and never reach it (a checkpoint resumed without being written through).
fn map_file_private(file: &File, offset: u64, len: usize) -> io::Result<MmapMut> {
    // SAFETY: as for `map_file`; a private map additionally never writes the file, so the only
    // requirement is that the file keeps its length, which the caller has checked.
    unsafe { MmapOptions::new().offset(offset).len(len).map_copy(file) }
}

/// The bytes of f32 values (little-endian on the hosts this crate supports, like the file).
fn bytes_of(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// The bytes of f32 values, writable (every byte pattern is some f32).
fn bytes_of_mut(values: &mut [f32]) -> &mut [u8] {
    bytemuck::cast_slice_mut(values)
}

/// Writes a complete table file `dir/name` (header, data, bitmap) with large sequential writes,
/// straight from `data` (no intermediate copy). Not fsynced: the caller makes it durable (a
/// checkpoint syncs all its files at once). Fails if the file exists.
fn write_matrix_file(
    dir: &Path,
    name: &str,
    header: &Header,
    data: &[f32],
    bitmap: Option<&[u8]>,
) -> Result<PathBuf, TableError> {
    let path = dir.join(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_error(&path, "create"))?;
    remove_on_error(&path.clone(), || {
        use std::io::Write;
        file.write_all(&header.encode())
            .and_then(|()| file.write_all(bytes_of(data)))
            .map_err(io_error(&path, "write"))?;
        if let Some(bits) = bitmap {
            file.write_all_at(bits, header.bitmap_offset)
                .map_err(io_error(&path, "write the row bitmap"))?;
        }
        file.set_len(header.file_len())
            .map_err(io_error(&path, "set the length"))?;
        Ok(path)
    })
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

/// Views mapped bytes as f32 (the host is little-endian, like the file). Maps start on page
/// boundaries, so the view is aligned (bytemuck checks).
fn f32s(bytes: &[u8]) -> &[f32] {
    bytemuck::cast_slice(bytes)
}

/// Views mapped bytes as mutable f32.
fn f32s_mut(bytes: &mut [u8]) -> &mut [f32] {
    bytemuck::cast_slice_mut(bytes)
}

/// Bytes of a rows x cols f32 matrix, after checking the shape.
fn matrix_bytes(rows: usize, cols: usize) -> Result<usize, TableError> {
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

/// The fields of a table file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    kind: MatrixKind,
    rows: u64,
    cols: u64,
    data_offset: u64,
    seed: u64,
    table: u64,
    /// 0 when the table has no materialisation bitmap (eager tables, optimizer state).
    bitmap_offset: u64,
}

impl Header {
    /// The header of a new file: data at [`HEADER_LEN`], the bitmap (if `lazy`) after it.
    fn new(
        kind: MatrixKind,
        rows: usize,
        cols: usize,
        seed: u64,
        table: usize,
        lazy: bool,
    ) -> Self {
        let data_end = HEADER_LEN as u64 + rows as u64 * cols as u64 * 4;
        Header {
            kind,
            rows: rows as u64,
            cols: cols as u64,
            data_offset: HEADER_LEN as u64,
            seed,
            table: table as u64,
            bitmap_offset: if lazy {
                data_end.next_multiple_of(FILE_PAGE)
            } else {
                0
            },
        }
    }

    fn lazy(&self) -> bool {
        self.bitmap_offset != 0
    }

    /// Data bytes; decode has checked that this and every offset below fit in u64.
    fn data_len(&self) -> u64 {
        self.rows * self.cols * 4
    }

    fn bitmap_len(&self) -> u64 {
        if self.lazy() {
            self.rows.div_ceil(8)
        } else {
            0
        }
    }

    /// The length the file must have.
    fn file_len(&self) -> u64 {
        if self.lazy() {
            self.bitmap_offset + self.bitmap_len()
        } else {
            self.data_offset + self.data_len()
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let flags = if self.lazy() { FLAG_LAZY } else { 0 };
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&ELEMENT_F32.to_le_bytes());
        b[16..24].copy_from_slice(&self.rows.to_le_bytes());
        b[24..32].copy_from_slice(&self.cols.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_offset.to_le_bytes());
        b[40..44].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[44..48].copy_from_slice(&flags.to_le_bytes());
        b[48..56].copy_from_slice(&self.seed.to_le_bytes());
        b[56..64].copy_from_slice(&self.table.to_le_bytes());
        b[64..72].copy_from_slice(&self.bitmap_offset.to_le_bytes());
        b
    }

    /// Parses and checks a header on its own (not yet against the file length or the model).
    fn decode(b: &[u8; HEADER_LEN], path: &Path) -> Result<Header, TableError> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let path = path.to_path_buf();
        let magic: [u8; 8] = b[0..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(TableError::BadMagic { path, found: magic });
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(TableError::UnsupportedVersion {
                path,
                found: version,
            });
        }
        let element = u32_at(12);
        if element != ELEMENT_F32 {
            return Err(TableError::UnknownElementType {
                path,
                found: element,
            });
        }
        let bad = |reason: String| TableError::BadHeader {
            path: path.clone(),
            reason,
        };
        let kind_code = u32_at(40);
        let kind = MatrixKind::from_code(kind_code)
            .ok_or_else(|| bad(format!("unknown matrix kind code {kind_code}")))?;
        let flags = u32_at(44);
        if flags & !FLAG_LAZY != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let header = Header {
            kind,
            rows: u64_at(16),
            cols: u64_at(24),
            data_offset: u64_at(32),
            seed: u64_at(48),
            table: u64_at(56),
            bitmap_offset: u64_at(64),
        };
        if header.rows == 0 || header.cols == 0 {
            return Err(bad(format!(
                "empty shape {} x {}",
                header.rows, header.cols
            )));
        }
        if header.data_offset < HEADER_LEN as u64 || !header.data_offset.is_multiple_of(FILE_PAGE) {
            return Err(bad(format!(
                "data offset {} is not a page boundary after the header",
                header.data_offset
            )));
        }
        let data_end = header
            .rows
            .checked_mul(header.cols)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(header.data_offset))
            .filter(|&end| end <= isize::MAX as u64)
            .ok_or_else(|| bad(format!("shape {} x {} overflows", header.rows, header.cols)))?;
        let lazy = flags & FLAG_LAZY != 0;
        if lazy != (header.bitmap_offset != 0) {
            return Err(bad("lazy flag and bitmap offset disagree".into()));
        }
        if lazy
            && (header.bitmap_offset < data_end
                || header.bitmap_offset > isize::MAX as u64 - header.bitmap_len())
        {
            return Err(bad(format!(
                "bitmap offset {} overlaps the data (which ends at {data_end})",
                header.bitmap_offset
            )));
        }
        if lazy && kind != MatrixKind::Weights {
            return Err(bad("optimizer state cannot be lazily initialised".into()));
        }
        Ok(header)
    }
}

/// Runs `build` for a file just created at `path` and removes the file if it fails, so a
/// failed creation leaves nothing behind.
fn remove_on_error<T>(
    path: &Path,
    build: impl FnOnce() -> Result<T, TableError>,
) -> Result<T, TableError> {
    let result = build();
    if result.is_err() {
        // The creation error is the one worth reporting; a failed cleanup adds nothing to it.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Creates `dir/name` with `header`, its whole length reserved and the header durable.
fn create_file(dir: &Path, name: &str, header: &Header) -> Result<(File, PathBuf), TableError> {
    let path = dir.join(name);
    let needed = header.file_len();
    let available = available_space(dir)?;
    if needed > available {
        return Err(TableError::NoSpace {
            path,
            needed,
            available,
        });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_error(&path, "create"))?;
    remove_on_error(&path, || {
        reserve(&file, needed).map_err(io_error(&path, "reserve space"))?;
        file.write_all_at(&header.encode(), 0)
            .map_err(io_error(&path, "write the header"))?;
        file.sync_all().map_err(io_error(&path, "sync"))?;
        // Make the new directory entry durable too.
        let dir = dir_or_cwd(dir);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir, "sync"))?;
        Ok(())
    })?;
    Ok((file, path))
}

/// What `open` expects of a file, from the model configuration.
struct Expect {
    kind: MatrixKind,
    rows: usize,
    cols: usize,
    index: usize,
}

/// Opens an existing table file (for writing too if `writable`) and checks its header against
/// itself, the file length and `expect`.
fn open_file(path: &Path, expect: &Expect, writable: bool) -> Result<(File, Header), TableError> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(io_error(path, "open"))?;
    let len = file
        .metadata()
        .map_err(io_error(path, "read the metadata"))?
        .len();
    if len < HEADER_LEN as u64 {
        return Err(TableError::TooShort {
            path: path.to_path_buf(),
            len,
        });
    }
    let mut bytes = [0u8; HEADER_LEN];
    file.read_exact_at(&mut bytes, 0)
        .map_err(io_error(path, "read the header"))?;
    let header = Header::decode(&bytes, path)?;
    let path = path.to_path_buf();
    if len < header.file_len() {
        return Err(TableError::Truncated {
            path,
            len,
            expected: header.file_len(),
        });
    }
    if header.kind != expect.kind {
        return Err(TableError::WrongKind {
            path,
            expected: expect.kind,
            found: header.kind,
        });
    }
    if header.rows != expect.rows as u64 || header.cols != expect.cols as u64 {
        return Err(TableError::ShapeMismatch {
            path,
            expected_rows: expect.rows,
            expected_cols: expect.cols,
            found_rows: header.rows,
            found_cols: header.cols,
        });
    }
    if header.table != expect.index as u64 {
        return Err(TableError::IndexMismatch {
            path,
            expected: expect.index,
            found: header.table,
        });
    }
    Ok((file, header))
}

/// A rows x cols f32 matrix in a memory map (anonymous or file-backed), row-major.
#[derive(Debug)]
struct MappedMatrix {
    map: MmapMut,
    /// Where the matrix starts in `map` (non-zero only to align an anonymous map to 2 MiB).
    offset: usize,
    rows: usize,
    cols: usize,
    path: Option<PathBuf>,
}

impl MappedMatrix {
    /// A zeroed anonymous matrix, 2 MiB-aligned and advised for transparent huge pages when it
    /// spans at least one.
    fn anon(rows: usize, cols: usize) -> Result<MappedMatrix, TableError> {
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
        #[cfg(target_os = "linux")]
        if huge {
            // Advice only: without THP support in the kernel the table works with small pages.
            let _ = map.advise_range(memmap2::Advice::HugePage, offset, bytes);
        }
        Ok(MappedMatrix {
            map,
            offset,
            rows,
            cols,
            path: None,
        })
    }

    /// Maps the data of a table file whose header (and length) have been checked.
    fn file(file: &File, path: PathBuf, header: &Header) -> Result<MappedMatrix, TableError> {
        let map = map_file(file, header.data_offset, header.data_len() as usize)
            .map_err(io_error(&path, "map"))?;
        Ok(MappedMatrix {
            map,
            offset: 0,
            rows: header.rows as usize,
            cols: header.cols as usize,
            path: Some(path),
        })
    }

    /// Maps the data of a checked table file copy-on-write (see [`map_file_private`]).
    fn file_private(
        file: &File,
        path: PathBuf,
        header: &Header,
    ) -> Result<MappedMatrix, TableError> {
        let map = map_file_private(file, header.data_offset, header.data_len() as usize)
            .map_err(io_error(&path, "map"))?;
        Ok(MappedMatrix {
            map,
            offset: 0,
            rows: header.rows as usize,
            cols: header.cols as usize,
            path: None,
        })
    }

    /// An anonymous matrix holding the data of a checked table file, read with one pass of
    /// large reads.
    fn anon_from_file(
        file: &File,
        path: &Path,
        header: &Header,
    ) -> Result<MappedMatrix, TableError> {
        let mut m = MappedMatrix::anon(header.rows as usize, header.cols as usize)?;
        file.read_exact_at(bytes_of_mut(m.as_mut_slice()), header.data_offset)
            .map_err(io_error(path, "read"))?;
        Ok(m)
    }

    /// Number of rows.
    fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    fn cols(&self) -> usize {
        self.cols
    }

    /// The rows x cols values, row-major.
    fn as_slice(&self) -> &[f32] {
        f32s(&self.map[self.offset..self.offset + self.rows * self.cols * 4])
    }

    /// The rows x cols values, row-major, writable.
    fn as_mut_slice(&mut self) -> &mut [f32] {
        let end = self.offset + self.rows * self.cols * 4;
        f32s_mut(&mut self.map[self.offset..end])
    }

    /// The backing file, `None` for an anonymous map.
    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes dirty pages of a file map back to its file and waits (msync); nothing to do for an
    /// anonymous map.
    fn flush(&self) -> Result<(), TableError> {
        match &self.path {
            Some(path) => self.map.flush().map_err(io_error(path, "flush")),
            None => Ok(()),
        }
    }
}

/// The bound of the initial values of a table with `rows` rows: sqrt(1 / rows), as in the
/// PyTorch reference (`np.random.uniform(-sqrt(1/n), sqrt(1/n))`).
pub fn init_bound(rows: usize) -> f32 {
    (1.0 / rows as f64).sqrt() as f32
}

/// The initial values of one table: uniform in [-bound, bound] from a key per row.
#[derive(Clone, Copy, Debug)]
struct RowInit {
    table_key: u64,
    lo: f32,
    scale: f32,
}

impl RowInit {
    fn new(seed: u64, table: usize, rows: usize) -> RowInit {
        let bound = init_bound(rows);
        RowInit {
            table_key: rng::derive_key(seed, &[table as u64]),
            lo: -bound,
            scale: 2.0 * bound,
        }
    }

    /// Writes row `row`'s initial values. The row key is the `row`-th hash of the table key;
    /// element pair `c` comes from the `c`-th hash of the row key, whose top 24 bits and next
    /// 24 bits are two uniforms (halving the hashing of eager initialisation of GiB tables).
    #[inline]
    fn fill(&self, row: usize, out: &mut [f32]) {
        let key = rng::counter_hash(self.table_key, row as u64);
        let pairs_len = out.len() / 2;
        let mut pairs = out.chunks_exact_mut(2);
        for (c, pair) in (&mut pairs).enumerate() {
            let h = rng::counter_hash(key, c as u64);
            pair[0] = self.lo + self.scale * rng::unit_f32(h);
            pair[1] = self.lo + self.scale * rng::unit_f32(h << 24);
        }
        if let [last] = pairs.into_remainder() {
            let h = rng::counter_hash(key, pairs_len as u64);
            *last = self.lo + self.scale * rng::unit_f32(h);
        }
    }

    /// Initialises every row of `data` (rows x cols) in parallel on the current rayon pool.
    /// Each row is a pure function of its key, so the result is the same for any thread count.
    fn fill_all(&self, data: &mut [f32], cols: usize) {
        let rows_per_task = (INIT_TASK_BYTES / (cols * 4)).max(1);
        data.par_chunks_mut(rows_per_task * cols)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (i, row) in chunk.chunks_exact_mut(cols).enumerate() {
                    self.fill(task * rows_per_task + i, row);
                }
            });
    }
}

/// Writes the initial values of row `row` of table `table` (a `rows`-row table) into `out`
/// (its `dim` values): uniform in [-sqrt(1/rows), sqrt(1/rows)], a pure function of
/// (seed, table, rows, row). Eager and lazy initialisation both go through this.
pub fn init_row(seed: u64, table: usize, rows: usize, row: usize, out: &mut [f32]) {
    RowInit::new(seed, table, rows).fill(row, out);
}

/// Materialisation state of a lazily initialised table: one bit per row, in the table file.
#[derive(Debug)]
struct LazyRows {
    /// Bit `r % 8` of byte `r / 8` is set once row `r` holds its initial value.
    done: MmapMut,
    /// Rows not yet materialised.
    pending: usize,
}

impl LazyRows {
    fn map_bits(file: &File, path: &Path, header: &Header) -> Result<MmapMut, TableError> {
        map_file(file, header.bitmap_offset, header.bitmap_len() as usize)
            .map_err(io_error(path, "map the row bitmap"))
    }

    /// Whether row `row` holds its initial value (or a trained one).
    fn is_done(&self, row: usize) -> bool {
        self.done[row / 8] & (1u8 << (row % 8)) != 0
    }

    /// Initialises every pending row of `data` (rows x `dim`, row-major) in parallel and
    /// marks every row materialised.
    fn fill_pending(&mut self, init: &RowInit, data: &mut [f32], dim: usize) {
        if self.pending == 0 {
            return;
        }
        let this = &*self;
        data.par_chunks_mut(dim)
            .enumerate()
            .filter(|(r, _)| !this.is_done(*r))
            .for_each(|(r, row)| init.fill(r, row));
        let rows = data.len() / dim;
        self.done[..rows / 8].fill(0xFF);
        if !rows.is_multiple_of(8) {
            self.done[rows / 8] |= (1u8 << (rows % 8)) - 1;
        }
        self.pending = 0;
    }

    /// The bitmap of a table file just created: its reserved, unwritten extent reads as zeros,
    /// so every row is pending (and no page of it needs to be read to know that).
    fn fresh(file: &File, path: &Path, header: &Header) -> Result<LazyRows, TableError> {
        Ok(LazyRows {
            done: Self::map_bits(file, path, header)?,
            pending: header.rows as usize,
        })
    }

    /// The bitmap of an existing table file; counts the rows still pending (one pass over
    /// rows / 8 bytes, at open).
    fn reopen(
        file: &File,
        path: &Path,
        header: &Header,
        private: bool,
    ) -> Result<LazyRows, TableError> {
        let len = header.bitmap_len() as usize;
        let done = if private {
            map_file_private(file, header.bitmap_offset, len)
        } else {
            map_file(file, header.bitmap_offset, len)
        }
        .map_err(io_error(path, "map the row bitmap"))?;
        let rows = header.rows as usize;
        // Bits past the last row are never set by this module; mask them anyway so a stray
        // bit cannot make the count wrong.
        let tail_mask = match rows % 8 {
            0 => 0xFF,
            r => (1u8 << r) - 1,
        };
        let (last, body) = done.split_last().expect("rows > 0");
        let set = body
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w).count_ones() as usize
            })
            .sum::<usize>()
            + (last & tail_mask).count_ones() as usize;
        Ok(LazyRows {
            done,
            pending: rows - set,
        })
    }
}

/// One embedding table: rows x dim f32 weights in a memory map, initialised from
/// (seed, index, row) eagerly or, for lazy file tables, on first touch.
#[derive(Debug)]
pub struct EmbeddingTable {
    weights: MappedMatrix,
    index: usize,
    seed: u64,
    /// `Some` for lazily initialised file tables.
    lazy: Option<LazyRows>,
}

impl EmbeddingTable {
    /// Creates table `index` (rows x dim) in `storage`, initialised from `seed` (eagerly, or
    /// lazily for `StorageKind::File { lazy_init: true }`). A file table is a new file
    /// `dir/`[`table_file_name`]`(index)`: it is an error if it already exists, and a failed
    /// creation (no space, I/O error) removes it again.
    pub fn create(
        index: usize,
        rows: usize,
        dim: usize,
        seed: u64,
        storage: &StorageKind,
    ) -> Result<EmbeddingTable, TableError> {
        Self::create_filled(index, rows, dim, seed, storage, None)
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
        Self::create_filled(index, rows, dim, seed, &storage, Some(values))
    }

    /// `create`, with the rows copied from `values` instead of drawn from their keys.
    fn create_filled(
        index: usize,
        rows: usize,
        dim: usize,
        seed: u64,
        storage: &StorageKind,
        values: Option<&[f32]>,
    ) -> Result<EmbeddingTable, TableError> {
        matrix_bytes(rows, dim)?;
        let init = RowInit::new(seed, index, rows);
        let fill = |data: &mut [f32]| match values {
            Some(v) => data.copy_from_slice(v),
            None => init.fill_all(data, dim),
        };
        match storage {
            StorageKind::Anon => {
                let mut weights = MappedMatrix::anon(rows, dim)?;
                fill(weights.as_mut_slice());
                Ok(EmbeddingTable {
                    weights,
                    index,
                    seed,
                    lazy: None,
                })
            }
            StorageKind::File { dir, lazy_init } => {
                let header = Header::new(MatrixKind::Weights, rows, dim, seed, index, *lazy_init);
                let (file, path) = create_file(dir, &table_file_name(index), &header)?;
                remove_on_error(&path.clone(), || {
                    let lazy = if *lazy_init {
                        Some(LazyRows::fresh(&file, &path, &header)?)
                    } else {
                        None
                    };
                    let mut weights = MappedMatrix::file(&file, path, &header)?;
                    if lazy.is_none() {
                        fill(weights.as_mut_slice());
                    }
                    Ok(EmbeddingTable {
                        weights,
                        index,
                        seed,
                        lazy,
                    })
                })
            }
        }
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
        let expect = Expect {
            kind: MatrixKind::Weights,
            rows: expected_rows,
            cols: expected_dim,
            index,
        };
        let (file, header) = open_file(path, &expect, true)?;
        let lazy = if header.lazy() {
            Some(LazyRows::reopen(&file, path, &header, false)?)
        } else {
            None
        };
        Ok(EmbeddingTable {
            weights: MappedMatrix::file(&file, path.to_path_buf(), &header)?,
            index,
            seed: header.seed,
            lazy,
        })
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
        self.index
    }

    /// The seed of the initial values.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The rows x dim weights, row-major. In a lazy table, rows not yet materialised read as
    /// zeros: call [`materialize`](Self::materialize) with the ids about to be used first.
    pub fn weights(&self) -> &[f32] {
        self.weights.as_slice()
    }

    /// The weights as little-endian bytes (for writing them out, e.g. to safetensors).
    pub fn weight_bytes(&self) -> &[u8] {
        bytes_of(self.weights())
    }

    /// The weights, writable (same caveat as [`weights`](Self::weights) for lazy tables: a
    /// write to a row not yet materialised is overwritten when it is).
    pub fn weights_mut(&mut self) -> &mut [f32] {
        self.weights.as_mut_slice()
    }

    /// Gives every row among `ids` not yet materialised its initial value (lazy tables; a no-op
    /// for eager ones, and O(1) once every row is materialised). Ids must be valid rows
    /// ([`check_ids`](Self::check_ids)); an id out of range panics.
    pub fn materialize(&mut self, ids: &[u32]) {
        let Some(lazy) = self.lazy.as_mut() else {
            return;
        };
        if lazy.pending == 0 {
            return;
        }
        let (rows, dim) = (self.weights.rows(), self.weights.cols());
        let init = RowInit::new(self.seed, self.index, rows);
        let data = self.weights.as_mut_slice();
        for &id in ids {
            let row = id as usize;
            assert!(
                row < rows,
                "materialize: row id {id} out of range for a table of {rows} rows"
            );
            let (byte, bit) = (row / 8, 1u8 << (row % 8));
            if lazy.done[byte] & bit == 0 {
                init.fill(row, &mut data[row * dim..(row + 1) * dim]);
                lazy.done[byte] |= bit;
                lazy.pending -= 1;
            }
        }
    }

    /// Gives every row not yet materialised its initial value, in parallel: after this the
    /// weights are the table's real values, as every reader of the whole table (an export)
    /// needs. A no-op for eager tables. On a copy-on-write (loaded) table nothing reaches
    /// the file.
    pub fn materialize_all(&mut self) {
        let Some(lazy) = self.lazy.as_mut() else {
            return;
        };
        let (rows, dim) = (self.weights.rows(), self.weights.cols());
        let init = RowInit::new(self.seed, self.index, rows);
        lazy.fill_pending(&init, self.weights.as_mut_slice(), dim);
    }

    /// Rows still waiting for their initial value (0 for eager tables).
    pub fn pending_rows(&self) -> usize {
        self.lazy.as_ref().map_or(0, |l| l.pending)
    }

    /// Checks that every id is a row of this table: `Err((position, id))` for the first one
    /// that is not. One branch-free max scan (vectorised) over the ids when all are valid, the
    /// usual case.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), (usize, u32)> {
        check_ids(ids, self.rows())
    }

    /// The table file, `None` for an anonymous table.
    pub fn file_path(&self) -> Option<&Path> {
        self.weights.path()
    }

    /// Writes this table as a complete table file (not yet fsynced) `dir/`[`table_file_name`]`(index)`
    /// (header, weights, and the row bitmap of a lazy table), with sequential writes: how a
    /// checkpoint stores it, whatever the table's own storage.
    pub fn write_to_dir(&self, dir: &Path) -> Result<PathBuf, TableError> {
        let header = Header::new(
            MatrixKind::Weights,
            self.rows(),
            self.dim(),
            self.seed,
            self.index,
            self.lazy.is_some(),
        );
        let bits = self.lazy.as_ref().map(|l| &l.done[..]);
        write_matrix_file(
            dir,
            &table_file_name(self.index),
            &header,
            self.weights(),
            bits,
        )
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
        let expect = Expect {
            kind: MatrixKind::Weights,
            rows,
            cols: dim,
            index,
        };
        let (file, header) = open_file(path, &expect, false)?;
        let seed = header.seed;
        match storage {
            StorageKind::Anon => {
                let mut weights = MappedMatrix::anon_from_file(&file, path, &header)?;
                if header.lazy() {
                    let mut lazy = LazyRows::reopen(&file, path, &header, true)?;
                    lazy.fill_pending(
                        &RowInit::new(seed, index, rows),
                        weights.as_mut_slice(),
                        dim,
                    );
                }
                Ok(EmbeddingTable {
                    weights,
                    index,
                    seed,
                    lazy: None,
                })
            }
            StorageKind::File { .. } => {
                let lazy = if header.lazy() {
                    Some(LazyRows::reopen(&file, path, &header, true)?)
                } else {
                    None
                };
                Ok(EmbeddingTable {
                    weights: MappedMatrix::file_private(&file, path.to_path_buf(), &header)?,
                    index,
                    seed,
                    lazy,
                })
            }
        }
    }

    /// Writes a file table's weights and then its bitmap back to disk and waits, so a durable
    /// bit never claims a row whose data is not; nothing to do for an anonymous table.
    pub fn flush(&self) -> Result<(), TableError> {
        self.weights.flush()?;
        match (&self.lazy, self.weights.path()) {
            (Some(lazy), Some(path)) => lazy.done.flush().map_err(io_error(path, "flush")),
            _ => Ok(()),
        }
    }
}

/// `Err((position, id))` for the first id `>= rows`.
fn check_ids(ids: &[u32], rows: usize) -> Result<(), (usize, u32)> {
    let Ok(limit) = u32::try_from(rows) else {
        return Ok(()); // 2^32 rows: every u32 is a row
    };
    if ids.iter().fold(0u32, |m, &id| m.max(id)) < limit {
        return Ok(());
    }
    let pos = ids
        .iter()
        .position(|&id| id >= limit)
        .expect("the max is out of range");
    Err((pos, ids[pos]))
}

/// Optimizer state of one table (Adagrad: rows x dim; row-wise Adagrad: rows x 1), in the same
/// storage as its table (an anonymous map, or `dir/`[`state_file_name`]`(index)`), zeroed.
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
    if let StorageKind::File { dir, lazy_init } = storage {
        let mut needed = 0u64;
        for (t, &r) in rows.iter().enumerate() {
            let index = first_index + t;
            matrix_bytes(r, dim)?;
            let mut files = vec![(
                table_file_name(index),
                Header::new(MatrixKind::Weights, r, dim, seed, index, *lazy_init),
            )];
            if width > 0 {
                matrix_bytes(r, width)?;
                files.push((
                    state_file_name(index),
                    Header::new(MatrixKind::OptimizerState, r, width, seed, index, false),
                ));
            }
            for (name, header) in files {
                let path = dir.join(name);
                if path.exists() {
                    return Err(TableError::Io {
                        path,
                        action: "create",
                        source: io::ErrorKind::AlreadyExists.into(),
                    });
                }
                needed = needed.saturating_add(header.file_len());
            }
        }
        let available = available_space(dir)?;
        if needed > available {
            return Err(TableError::NoSpace {
                path: dir.clone(),
                needed,
                available,
            });
        }
    }
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

/// A stateless optimizer (SGD, width 0) has no map and no file.
#[derive(Debug)]
pub struct OptimizerState {
    rows: usize,
    matrix: Option<MappedMatrix>,
}

impl OptimizerState {
    /// Zeroed `table.rows() x width` state for `table`, in its storage (the file lives next to
    /// the table file).
    pub fn create_for(table: &EmbeddingTable, width: usize) -> Result<OptimizerState, TableError> {
        let rows = table.rows();
        if width == 0 {
            return Ok(OptimizerState { rows, matrix: None });
        }
        matrix_bytes(rows, width)?;
        let matrix = match table.file_path() {
            None => {
                let mut m = MappedMatrix::anon(rows, width)?;
                // Fault every page in now, in parallel: otherwise the first steps of training
                // pay a page fault (zeroing 2 MiB) for almost every row they update.
                m.as_mut_slice()
                    .par_chunks_mut(FILE_PAGE as usize / 4)
                    .for_each(|page| page[0] = 0.0);
                m
            }
            Some(table_path) => {
                let dir = table_path.parent().unwrap_or(Path::new(""));
                let header = Header::new(
                    MatrixKind::OptimizerState,
                    rows,
                    width,
                    table.seed(),
                    table.index(),
                    false,
                );
                let (file, path) = create_file(dir, &state_file_name(table.index()), &header)?;
                remove_on_error(&path.clone(), || MappedMatrix::file(&file, path, &header))?
            }
        };
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
        let expect = Expect {
            kind: MatrixKind::OptimizerState,
            rows: expected_rows,
            cols: expected_width,
            index,
        };
        let (file, header) = open_file(path, &expect, true)?;
        Ok(OptimizerState {
            rows: expected_rows,
            matrix: Some(MappedMatrix::file(&file, path.to_path_buf(), &header)?),
        })
    }

    /// Number of rows (the table's).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (dim for Adagrad, 1 for row-wise Adagrad, 0 for SGD).
    pub fn width(&self) -> usize {
        self.matrix.as_ref().map_or(0, MappedMatrix::cols)
    }

    /// The rows x width state, row-major.
    pub fn as_slice(&self) -> &[f32] {
        self.matrix.as_ref().map_or(&[], MappedMatrix::as_slice)
    }

    /// The rows x width state, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self.matrix
            .as_mut()
            .map_or(&mut [], MappedMatrix::as_mut_slice)
    }

    /// The state file, `None` for an anonymous map or no state.
    pub fn file_path(&self) -> Option<&Path> {
        self.matrix.as_ref().and_then(MappedMatrix::path)
    }

    /// Writes this state as a complete state file (not yet fsynced) `dir/`[`state_file_name`]`(index)`
    /// of table `table` (nothing for a stateless optimizer: returns None).
    pub fn write_to_dir(
        &self,
        dir: &Path,
        table: &EmbeddingTable,
    ) -> Result<Option<PathBuf>, TableError> {
        let Some(m) = &self.matrix else {
            return Ok(None);
        };
        let header = Header::new(
            MatrixKind::OptimizerState,
            m.rows(),
            m.cols(),
            table.seed(),
            table.index(),
            false,
        );
        write_matrix_file(
            dir,
            &state_file_name(table.index()),
            &header,
            m.as_slice(),
            None,
        )
        .map(Some)
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
        if width == 0 {
            return Ok(OptimizerState { rows, matrix: None });
        }
        let expect = Expect {
            kind: MatrixKind::OptimizerState,
            rows,
            cols: width,
            index,
        };
        let (file, header) = open_file(path, &expect, false)?;
        let matrix = match storage {
            StorageKind::Anon => MappedMatrix::anon_from_file(&file, path, &header)?,
            StorageKind::File { .. } => {
                MappedMatrix::file_private(&file, path.to_path_buf(), &header)?
            }
        };
        Ok(OptimizerState {
            rows,
            matrix: Some(matrix),
        })
    }

    /// Writes a file-backed state back to disk and waits.
    pub fn flush(&self) -> Result<(), TableError> {
        self.matrix.as_ref().map_or(Ok(()), MappedMatrix::flush)
    }
}

/// Linux's `MPOL_INTERLEAVE` (linux/mempolicy.h): new pages go round-robin over a node set.
#[cfg(target_os = "linux")]
const MPOL_INTERLEAVE: libc::c_int = 3;

/// Interleaves every page the calling thread allocates from now on round-robin over the NUMA
/// `nodes` (`set_mempolicy(MPOL_INTERLEAVE)`, what `numactl --interleave` does); threads it
/// creates afterwards (a rayon pool built later) inherit the policy. On a multi-socket machine
/// the tables then sit evenly on all sockets whichever thread touches them first, so a scaling
/// study measures the code rather than the page placement. An empty or unknown node set is an
/// `Err` (`EINVAL`), and so is any other OS than Linux.
pub fn interleave_memory(nodes: &[usize]) -> io::Result<()> {
    if nodes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no NUMA node to interleave over",
        ));
    }
    let bits = u64::BITS as usize;
    let mut mask = vec![0u64; nodes.iter().max().expect("non-empty") / bits + 1];
    for &n in nodes {
        mask[n / bits] |= 1 << (n % bits);
    }
    set_interleave_policy(&mask)
}

#[cfg(target_os = "linux")]
fn set_interleave_policy(mask: &[u64]) -> io::Result<()> {
    // The kernel reads maxnode - 1 bits of the mask (a historical off-by-one of the ABI).
    let maxnode = (mask.len() * u64::BITS as usize + 1) as libc::c_ulong;
    // SAFETY: set_mempolicy reads `maxnode - 1` bits, i.e. exactly the `mask.len()` u64 words
    // that `mask` borrows for the duration of the call, and writes no memory of this process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            MPOL_INTERLEAVE,
            mask.as_ptr(),
            maxnode,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_interleave_policy(_mask: &[u64]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "NUMA interleaving needs Linux (set_mempolicy)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let path = Path::new("/x/table_003.emb");
        for lazy in [false, true] {
            let h = Header::new(MatrixKind::Weights, 1001, 13, 42, 3, lazy);
            assert_eq!(Header::decode(&h.encode(), path).unwrap(), h);
            assert_eq!(h.data_offset, HEADER_LEN as u64);
            assert_eq!(h.lazy(), lazy);
        }
        let lazy = Header::new(MatrixKind::Weights, 1001, 13, 42, 3, true);
        assert_eq!(lazy.bitmap_offset % FILE_PAGE, 0);
        assert!(lazy.bitmap_offset >= HEADER_LEN as u64 + 1001 * 13 * 4);
        assert_eq!(lazy.file_len(), lazy.bitmap_offset + 126);
        let state = Header::new(MatrixKind::OptimizerState, 5, 1, 0, 0, false);
        assert_eq!(state.file_len(), HEADER_LEN as u64 + 20);
    }

    #[test]
    fn header_rejects_inconsistent_fields() {
        let path = Path::new("/x/t.emb");
        let good = Header::new(MatrixKind::Weights, 100, 8, 1, 0, true).encode();
        let corrupt = |offset: usize, bytes: &[u8]| {
            let mut b = good;
            b[offset..offset + bytes.len()].copy_from_slice(bytes);
            Header::decode(&b, path).unwrap_err()
        };
        assert!(matches!(
            corrupt(40, &7u32.to_le_bytes()),
            TableError::BadHeader { .. }
        ));
        assert!(matches!(
            corrupt(44, &2u32.to_le_bytes()),
            TableError::BadHeader { .. }
        ));
        assert!(matches!(
            corrupt(32, &100u64.to_le_bytes()),
            TableError::BadHeader { .. }
        ));
        assert!(matches!(
            corrupt(16, &0u64.to_le_bytes()),
            TableError::BadHeader { .. }
        ));
        assert!(matches!(
            corrupt(24, &u64::MAX.to_le_bytes()),
            TableError::BadHeader { .. }
        ));
        assert!(matches!(
            corrupt(64, &4096u64.to_le_bytes()),
            TableError::BadHeader { .. }
        ));
        assert!(matches!(
            corrupt(64, &0u64.to_le_bytes()),
            TableError::BadHeader { .. }
        ));
        let lazy_state = corrupt(40, &(MatrixKind::OptimizerState as u32).to_le_bytes());
        assert!(matches!(lazy_state, TableError::BadHeader { .. }));
        assert!(matches!(
            corrupt(12, &2u32.to_le_bytes()),
            TableError::UnknownElementType { .. }
        ));
        let msg = corrupt(44, &2u32.to_le_bytes()).to_string();
        assert!(msg.contains("/x/t.emb"), "{msg}");
    }

    #[test]
    fn init_row_is_bounded_deterministic_and_prefix_stable() {
        let rows = 977;
        let bound = init_bound(rows);
        let mut a = vec![0.0f32; 13];
        let mut b = vec![0.0f32; 13];
        init_row(5, 2, rows, 100, &mut a);
        init_row(5, 2, rows, 100, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.abs() <= bound), "{a:?} outside ±{bound}");
        // A narrower row is a prefix of a wider one (pairs and the odd tail share counters).
        let mut c = vec![0.0f32; 12];
        init_row(5, 2, rows, 100, &mut c);
        assert_eq!(&a[..12], &c[..]);
        // Seed, table and row all change the values.
        for (seed, table, row) in [(6, 2, 100), (5, 3, 100), (5, 2, 101)] {
            init_row(seed, table, rows, row, &mut b);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x != y),
                "{seed} {table} {row}"
            );
        }
    }

    #[test]
    fn init_values_are_uniform_over_the_bound() {
        let rows = 10_000;
        let bound = init_bound(rows) as f64;
        let mut row = vec![0.0f32; 64];
        let (mut sum, mut sq, mut n) = (0.0f64, 0.0f64, 0.0f64);
        for r in 0..rows {
            init_row(1, 0, rows, r, &mut row);
            for &v in &row {
                sum += v as f64;
                sq += (v as f64) * (v as f64);
                n += 1.0;
            }
        }
        // Uniform(-b, b): mean 0, variance b^2 / 3.
        let mean = sum / n;
        let var = sq / n - mean * mean;
        assert!(mean.abs() < 0.01 * bound, "mean {mean}");
        assert!(
            (var / (bound * bound / 3.0) - 1.0).abs() < 0.01,
            "variance {var}"
        );
    }

    #[test]
    fn check_ids_finds_the_first_bad_id() {
        assert_eq!(check_ids(&[], 1), Ok(()));
        assert_eq!(check_ids(&[0, 9, 3], 10), Ok(()));
        assert_eq!(check_ids(&[0, 10, 3, 11], 10), Err((1, 10)));
        assert_eq!(check_ids(&[u32::MAX, 0], 10), Err((0, u32::MAX)));
        assert_eq!(check_ids(&[u32::MAX], MAX_ROWS), Ok(()));
        assert_eq!(check_ids(&[u32::MAX], MAX_ROWS - 1), Err((0, u32::MAX)));
    }

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

    #[test]
    fn large_anonymous_maps_are_huge_page_aligned() {
        let m = MappedMatrix::anon(3 << 18, 4).unwrap();
        assert_eq!(m.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
        assert!(m.as_slice().iter().all(|&v| v == 0.0));
        assert_eq!(m.as_slice().len(), 3 << 20);
        let small = MappedMatrix::anon(3, 5).unwrap();
        assert_eq!(small.as_slice().len(), 15);
    }

    #[test]
    fn file_names_are_zero_padded() {
        assert_eq!(table_file_name(7), "table_007.emb");
        assert_eq!(state_file_name(7), "table_007.state");
        assert_eq!(table_file_name(1234), "table_1234.emb");
    }

    #[test]
    fn interleave_memory_accepts_only_existing_nodes() {
        // On a thread of its own: the policy is per thread and must not leak into other tests.
        std::thread::spawn(|| {
            assert!(interleave_memory(&[]).is_err());
            assert!(interleave_memory(&[4095]).is_err());
            #[cfg(target_os = "linux")]
            if Path::new("/sys/devices/system/node/node0").exists() {
                interleave_memory(&[0]).unwrap();
                // Pages allocated under the policy are usable as ever.
                let m = MappedMatrix::anon(1 << 10, 16).unwrap();
                assert!(m.as_slice().iter().all(|&v| v == 0.0));
            }
        })
        .join()
        .unwrap();
    }
}
