//! Storage: files, memory maps and system calls. The only module of the crate allowed to use
//! `unsafe`.
//!
//! Mapping a file is `unsafe` in Rust (another process may truncate or rewrite it while it is
//! mapped), and so are the system calls with no safe wrapper (`set_mempolicy`). Keeping every
//! one of them here, each in a small block with a `// SAFETY:` note, lets the rest of the crate
//! be `#![deny(unsafe_code)]` and puts the whole soundness argument of the maps in one place:
//!
//! - [`sys`]: free space (`statvfs`), space reservation (`fallocate`), paging advice
//!   (`madvise`) and NUMA placement (`set_mempolicy`);
//! - [`mmap`]: anonymous, shared, copy-on-write and read-only maps, and [`MappedMatrix`], an
//!   f32 matrix in one of them;
//! - [`matrix_file`]: the table file format (a 4096-byte header, f32 rows, an optional row
//!   bitmap) and [`MatrixFile`], one f32 matrix in anonymous memory or in such a file, used for
//!   both the embedding tables and their optimizer state.
//!
//! # Safety contract of the file maps
//!
//! A file map is only sound while nothing else truncates or rewrites the file: this module
//! creates its files exclusively (`create_new`), checks their length against the header before
//! mapping, and reserves their space, so within this process a mapped matrix never faults.
//! Other processes must not modify a table or dataset file while it is open (the same contract
//! as every memory-mapped database file).

pub mod matrix_file;
pub mod mmap;
pub mod sys;

pub use matrix_file::{
    ELEMENT_F32, FORMAT_VERSION, HEADER_LEN, MAGIC, MatrixFile, MatrixId, MatrixKind, RowSpan,
    state_file_name, table_file_name,
};
pub use mmap::{MappedMatrix, map_read_only};
pub use sys::{available_space, interleave_memory};

use std::io;
use std::path::{Path, PathBuf};

/// Where a table (and its optimizer state) lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StorageKind {
    /// An anonymous map with transparent huge pages, initialised eagerly. Fast; bounded by RAM.
    #[default]
    Anon,
    /// One file per table in `dir` ([`table_file_name`]), mapped shared. `lazy_init`: rows are
    /// initialised on first touch (`EmbeddingTable::materialize`) instead of at creation.
    File {
        /// Existing directory that holds the table files.
        dir: PathBuf,
        /// Initialise rows on first touch rather than all at creation.
        lazy_init: bool,
    },
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

/// Maps an `io::Error` of `action` on `path` to [`TableError::Io`].
fn io_error<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> TableError + 'a {
    move |source| TableError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}
