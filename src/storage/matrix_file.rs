//! The table file format and [`MatrixFile`]: one f32 matrix (an embedding table or its
//! optimizer state) in anonymous memory, in a file mapped shared, or in a file mapped
//! copy-on-write, created, opened, loaded, written and flushed the same way whatever it holds.
//!
//! # File format (version 1)
//!
//! All integers little-endian. The header ([`HEADER_LEN`] bytes, a `#[repr(C)]` plain-old-data
//! struct read and written whole) fills the first 4096 bytes; the rest of it is zero.
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

use super::mmap::{MappedMatrix, map_private, map_shared, matrix_bytes};
use super::sys::{available_space, dir_or_cwd, reserve};
use super::{StorageKind, TableError, io_error};
use memmap2::MmapMut;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::mem::{offset_of, size_of};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[cfg(not(target_endian = "little"))]
compile_error!("table files hold little-endian integers and f32, mapped as they are on disk");

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

/// Which matrix of a model a file holds: its kind and its table's index. Names the file in a
/// storage directory and is checked when the file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixId {
    /// Weights or optimizer state.
    pub kind: MatrixKind,
    /// The table's index in the model.
    pub index: usize,
}

impl MatrixId {
    /// The weights of table `index`.
    pub fn weights(index: usize) -> MatrixId {
        MatrixId {
            kind: MatrixKind::Weights,
            index,
        }
    }

    /// The optimizer state of table `index`.
    pub fn state(index: usize) -> MatrixId {
        MatrixId {
            kind: MatrixKind::OptimizerState,
            index,
        }
    }

    /// The file name of this matrix in a storage directory ([`table_file_name`] or
    /// [`state_file_name`]).
    pub fn file_name(&self) -> String {
        match self.kind {
            MatrixKind::Weights => table_file_name(self.index),
            MatrixKind::OptimizerState => state_file_name(self.index),
        }
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

/// Bytes of the header after its fields.
const RESERVED_LEN: usize = HEADER_LEN - 72;

/// The header of a table file, exactly as on disk (see the module docs for the layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    magic: [u8; 8],
    version: u32,
    element: u32,
    rows: u64,
    cols: u64,
    data_offset: u64,
    kind: u32,
    flags: u32,
    seed: u64,
    table: u64,
    /// 0 when the table has no materialisation bitmap (eager tables, optimizer state).
    bitmap_offset: u64,
    reserved: [u8; RESERVED_LEN],
}

// The layout of the module docs, with no padding: the fields end where `reserved` starts, and
// `reserved` ends the struct.
const _: () = assert!(
    offset_of!(Header, reserved) == 72
        && offset_of!(Header, kind) == 40
        && offset_of!(Header, bitmap_offset) == 64
        && size_of::<Header>() == HEADER_LEN
);

// SAFETY: Header is `repr(C)` and made only of integers and byte arrays, for which all-zero
// bytes are a valid value.
unsafe impl bytemuck::Zeroable for Header {}
// SAFETY: Header is `repr(C)`, `Copy` and `'static`, has no padding (asserted above: the
// fields' sizes add up to its size), and every bit pattern is a valid value of every field
// (integers and byte arrays), so any 4096 bytes are a Header and a Header is 4096 plain bytes.
unsafe impl bytemuck::Pod for Header {}

impl Header {
    /// The header of a new file: data at [`HEADER_LEN`], the bitmap (if `lazy`) after it.
    fn new(id: MatrixId, rows: usize, cols: usize, seed: u64, lazy: bool) -> Self {
        let data_end = HEADER_LEN as u64 + rows as u64 * cols as u64 * 4;
        Header {
            magic: MAGIC,
            version: FORMAT_VERSION,
            element: ELEMENT_F32,
            rows: rows as u64,
            cols: cols as u64,
            data_offset: HEADER_LEN as u64,
            kind: id.kind as u32,
            flags: if lazy { FLAG_LAZY } else { 0 },
            seed,
            table: id.index as u64,
            bitmap_offset: if lazy {
                data_end.next_multiple_of(FILE_PAGE)
            } else {
                0
            },
            reserved: [0; RESERVED_LEN],
        }
    }

    fn lazy(&self) -> bool {
        self.bitmap_offset != 0
    }

    /// The kind of a checked header.
    fn matrix_kind(&self) -> MatrixKind {
        MatrixKind::from_code(self.kind).expect("checked by Header::check")
    }

    /// Data bytes; `check` has verified that this and every offset below fit in u64.
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

    /// Reads the header of `file` (at least [`HEADER_LEN`] bytes long) and checks it.
    fn read(file: &File, path: &Path) -> Result<Header, TableError> {
        let mut header: Header = bytemuck::Zeroable::zeroed();
        file.read_exact_at(bytemuck::bytes_of_mut(&mut header), 0)
            .map_err(io_error(path, "read the header"))?;
        header.check(path)?;
        Ok(header)
    }

    /// Checks a header on its own (not yet against the file length or the model).
    fn check(&self, path: &Path) -> Result<(), TableError> {
        let path = path.to_path_buf();
        if self.magic != MAGIC {
            return Err(TableError::BadMagic {
                path,
                found: self.magic,
            });
        }
        if self.version != FORMAT_VERSION {
            return Err(TableError::UnsupportedVersion {
                path,
                found: self.version,
            });
        }
        if self.element != ELEMENT_F32 {
            return Err(TableError::UnknownElementType {
                path,
                found: self.element,
            });
        }
        let bad = |reason: String| TableError::BadHeader {
            path: path.clone(),
            reason,
        };
        let kind = MatrixKind::from_code(self.kind)
            .ok_or_else(|| bad(format!("unknown matrix kind code {}", self.kind)))?;
        if self.flags & !FLAG_LAZY != 0 {
            return Err(bad(format!("unknown flags {:#x}", self.flags)));
        }
        if self.rows == 0 || self.cols == 0 {
            return Err(bad(format!("empty shape {} x {}", self.rows, self.cols)));
        }
        if self.data_offset < HEADER_LEN as u64 || !self.data_offset.is_multiple_of(FILE_PAGE) {
            return Err(bad(format!(
                "data offset {} is not a page boundary after the header",
                self.data_offset
            )));
        }
        let data_end = self
            .rows
            .checked_mul(self.cols)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(self.data_offset))
            .filter(|&end| end <= isize::MAX as u64)
            .ok_or_else(|| bad(format!("shape {} x {} overflows", self.rows, self.cols)))?;
        let lazy = self.flags & FLAG_LAZY != 0;
        if lazy != (self.bitmap_offset != 0) {
            return Err(bad("lazy flag and bitmap offset disagree".into()));
        }
        if lazy
            && (self.bitmap_offset < data_end
                || self.bitmap_offset > isize::MAX as u64 - self.bitmap_len())
        {
            return Err(bad(format!(
                "bitmap offset {} overlaps the data (which ends at {data_end})",
                self.bitmap_offset
            )));
        }
        if lazy && kind != MatrixKind::Weights {
            return Err(bad("optimizer state cannot be lazily initialised".into()));
        }
        Ok(())
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
        file.write_all_at(bytemuck::bytes_of(header), 0)
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

/// Opens an existing table file (for writing too if `writable`) and checks its header against
/// itself, the file length and what the model expects (`id`, `rows` x `cols`).
fn open_file(
    path: &Path,
    id: MatrixId,
    rows: usize,
    cols: usize,
    writable: bool,
) -> Result<(File, Header), TableError> {
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
    let header = Header::read(&file, path)?;
    let path = path.to_path_buf();
    if len < header.file_len() {
        return Err(TableError::Truncated {
            path,
            len,
            expected: header.file_len(),
        });
    }
    if header.matrix_kind() != id.kind {
        return Err(TableError::WrongKind {
            path,
            expected: id.kind,
            found: header.matrix_kind(),
        });
    }
    if header.rows != rows as u64 || header.cols != cols as u64 {
        return Err(TableError::ShapeMismatch {
            path,
            expected_rows: rows,
            expected_cols: cols,
            found_rows: header.rows,
            found_cols: header.cols,
        });
    }
    if header.table != id.index as u64 {
        return Err(TableError::IndexMismatch {
            path,
            expected: id.index,
            found: header.table,
        });
    }
    Ok((file, header))
}

/// Maps the row bitmap of a checked lazy table file, shared or copy-on-write.
fn map_bitmap(
    file: &File,
    path: &Path,
    header: &Header,
    private: bool,
) -> Result<MmapMut, TableError> {
    let (offset, len) = (header.bitmap_offset, header.bitmap_len() as usize);
    if private {
        map_private(file, offset, len)
    } else {
        map_shared(file, offset, len)
    }
    .map_err(io_error(path, "map the row bitmap"))
}

/// Where a matrix's rows lie in the matrix a table file holds: rows `first ..` of a matrix of
/// `total` rows (a rank's range of a row-split table; the whole matrix from row 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowSpan {
    pub first: usize,
    pub total: usize,
}

impl RowSpan {
    /// The whole matrix of `rows` rows.
    pub fn whole(rows: usize) -> RowSpan {
        RowSpan {
            first: 0,
            total: rows,
        }
    }

    fn is_whole(&self, rows: usize) -> bool {
        self.first == 0 && rows == self.total
    }

    /// Checks that `rows` rows from `first` lie inside the matrix.
    fn check(&self, rows: usize, cols: usize) -> Result<(), TableError> {
        if self
            .first
            .checked_add(rows)
            .is_some_and(|end| end <= self.total)
        {
            return Ok(());
        }
        Err(TableError::BadShape {
            rows,
            cols,
            reason: "the rows lie past the end of the matrix",
        })
    }
}

/// The bits of rows `first .. first + rows` of a checked lazy table file's row bitmap, read
/// into anonymous memory and rebased (bit i: row `first + i`).
fn read_bitmap_rows(
    file: &File,
    path: &Path,
    header: &Header,
    first: usize,
    rows: usize,
) -> Result<MmapMut, TableError> {
    let mut whole = vec![0u8; (first + rows).div_ceil(8) - first / 8];
    file.read_exact_at(&mut whole, header.bitmap_offset + (first / 8) as u64)
        .map_err(io_error(path, "read the row bitmap"))?;
    let mut bits = MmapMut::map_anon(rows.div_ceil(8)).map_err(io_error(path, "map"))?;
    for i in 0..rows {
        let r = first % 8 + i;
        if whole[r / 8] & (1 << (r % 8)) != 0 {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    Ok(bits)
}

/// One rows x cols f32 matrix of a model (an embedding table's weights or its optimizer
/// state), row-major, in anonymous memory or a table file, with the row bitmap of a lazily
/// initialised table. The storage layer only keeps the bits; what a row's initial value is,
/// and when to write it, is the model's business.
#[derive(Debug)]
pub struct MatrixFile {
    data: MappedMatrix,
    /// The materialisation bitmap of a lazily initialised matrix, mapped like the data.
    bitmap: Option<MmapMut>,
    id: MatrixId,
    seed: u64,
}

impl MatrixFile {
    /// Creates matrix `id` (rows x cols, zeroed) in `storage`, recording `seed` in its header.
    /// A file matrix is a new file `dir/`[`MatrixId::file_name`] with its whole length reserved:
    /// it is an error if it already exists, and a failed creation (no space, I/O error) removes
    /// it again. Weights in `StorageKind::File { lazy_init: true }` get a row bitmap (every row
    /// pending); optimizer state never does (zeros need no initialisation).
    pub fn create(
        id: MatrixId,
        rows: usize,
        cols: usize,
        seed: u64,
        storage: &StorageKind,
    ) -> Result<MatrixFile, TableError> {
        matrix_bytes(rows, cols)?;
        let (data, bitmap) = match storage {
            StorageKind::Anon => (MappedMatrix::anon(rows, cols)?, None),
            StorageKind::File { dir, lazy_init } => {
                let lazy = *lazy_init && id.kind == MatrixKind::Weights;
                let header = Header::new(id, rows, cols, seed, lazy);
                let (file, path) = create_file(dir, &id.file_name(), &header)?;
                remove_on_error(&path.clone(), || {
                    // A reserved, unwritten extent reads as zeros: every row is pending.
                    let bitmap = if lazy {
                        Some(map_bitmap(&file, &path, &header, false)?)
                    } else {
                        None
                    };
                    let data = MappedMatrix::shared(&file, path, header.data_offset, rows, cols)?;
                    Ok((data, bitmap))
                })?
            }
        };
        Ok(MatrixFile {
            data,
            bitmap,
            id,
            seed,
        })
    }

    /// Opens the existing table file `path`, checked to hold matrix `id` of `rows` x `cols`,
    /// mapped shared: writes reach the file. The values (and seed, and row bitmap) are the
    /// file's.
    pub fn open(
        path: &Path,
        id: MatrixId,
        rows: usize,
        cols: usize,
    ) -> Result<MatrixFile, TableError> {
        let (file, header) = open_file(path, id, rows, cols, true)?;
        let bitmap = if header.lazy() {
            Some(map_bitmap(&file, path, &header, false)?)
        } else {
            None
        };
        Ok(MatrixFile {
            data: MappedMatrix::shared(&file, path.to_path_buf(), header.data_offset, rows, cols)?,
            bitmap,
            id,
            seed: header.seed,
        })
    }

    /// Loads matrix `id` (`rows` x `cols`) from a table file (as
    /// [`write_to_dir`](Self::write_to_dir) writes it) into `storage`: anonymous storage reads
    /// it into memory; file storage maps it copy-on-write, so loading reads nothing up front
    /// and writes never reach the file. The row bitmap of a lazy file comes along
    /// copy-on-write in either case.
    pub fn load(
        path: &Path,
        id: MatrixId,
        rows: usize,
        cols: usize,
        storage: &StorageKind,
    ) -> Result<MatrixFile, TableError> {
        Self::load_rows(path, id, RowSpan::whole(rows), rows, cols, storage)
    }

    /// Loads rows `span.first .. span.first + rows` of matrix `id` (a `span.total` x `cols`
    /// table file) into `storage`, as [`load`](Self::load) loads the whole matrix: a rank's
    /// row range of a row-split table, read (anonymous storage: one positioned read of its
    /// rows) or mapped copy-on-write (file storage) from its offset, the rest of the file
    /// untouched. The row bitmap of a lazy file comes along for the rows loaded (bit i: row
    /// `span.first + i`), mapped copy-on-write for the whole matrix, else copied.
    pub fn load_rows(
        path: &Path,
        id: MatrixId,
        span: RowSpan,
        rows: usize,
        cols: usize,
        storage: &StorageKind,
    ) -> Result<MatrixFile, TableError> {
        span.check(rows, cols)?;
        let (file, header) = open_file(path, id, span.total, cols, false)?;
        let offset = header.data_offset + (span.first * cols * 4) as u64;
        let data = match storage {
            StorageKind::Anon => MappedMatrix::anon_from_file(&file, path, offset, rows, cols)?,
            StorageKind::File { .. } => MappedMatrix::private(&file, path, offset, rows, cols)?,
        };
        let bitmap = match (header.lazy(), span.is_whole(rows)) {
            (false, _) => None,
            (true, true) => Some(map_bitmap(&file, path, &header, true)?),
            (true, false) => Some(read_bitmap_rows(&file, path, &header, span.first, rows)?),
        };
        Ok(MatrixFile {
            data,
            bitmap,
            id,
            seed: header.seed,
        })
    }

    /// Writes this matrix as a complete table file `dir/`[`MatrixId::file_name`] (header, data,
    /// and the row bitmap if it has one) with large sequential writes, straight from the map
    /// (no intermediate copy), whatever its own storage. Not fsynced: the caller makes it
    /// durable (a checkpoint syncs all its files at once). Fails if the file exists, and
    /// removes what it wrote if a write fails.
    pub fn write_to_dir(&self, dir: &Path) -> Result<PathBuf, TableError> {
        let header = Header::new(
            self.id,
            self.rows(),
            self.cols(),
            self.seed,
            self.bitmap.is_some(),
        );
        let path = dir.join(self.id.file_name());
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path, "create"))?;
        remove_on_error(&path.clone(), || {
            file.write_all(bytemuck::bytes_of(&header))
                .and_then(|()| file.write_all(bytemuck::cast_slice(self.as_slice())))
                .map_err(io_error(&path, "write"))?;
            if let Some(bits) = &self.bitmap {
                file.write_all_at(bits, header.bitmap_offset)
                    .map_err(io_error(&path, "write the row bitmap"))?;
            }
            file.set_len(header.file_len())
                .map_err(io_error(&path, "set the length"))?;
            Ok(path)
        })
    }

    /// Writes this matrix as rows `span.first ..` of the `span.total`-row matrix file
    /// `dir/`[`MatrixId::file_name`] (not fsynced): a rank's row range of a row-split table,
    /// written into the one file a single process writes for the whole table (the same
    /// header, the rows at their byte offset, the same length). An eager matrix (no row
    /// bitmap: a row range is always materialised).
    ///
    /// The owners of a table's ranges (processes, on one machine or several over a shared
    /// file system) write the file at the same time, in any order, without waiting for each
    /// other: each opens it creating it if absent and never truncating, extends it to the
    /// whole matrix's length (the same length for every writer, so no `ftruncate` cuts rows
    /// another has written; the unwritten gap reads as zeros until its owner writes it),
    /// writes the header (the same bytes from every writer, so an interleaving changes
    /// nothing), then its rows, which overlap no other writer's. Once every owner has
    /// written and synced, the file holds every row. A failed write leaves the file to the
    /// caller (other writers may be using it): a checkpoint removes its whole folder.
    pub fn write_rows_to_dir(&self, dir: &Path, span: RowSpan) -> Result<PathBuf, TableError> {
        debug_assert!(self.bitmap.is_none(), "a row range is eager");
        let (rows, cols) = (self.rows(), self.cols());
        span.check(rows, cols)?;
        let header = Header::new(self.id, span.total, cols, self.seed, false);
        let path = dir.join(self.id.file_name());
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error(&path, "open"))?;
        let at = header.data_offset + (span.first * cols * 4) as u64;
        file.set_len(header.file_len())
            .map_err(io_error(&path, "set the length"))?;
        file.write_all_at(bytemuck::bytes_of(&header), 0)
            .map_err(io_error(&path, "write the header"))?;
        file.write_all_at(bytemuck::cast_slice(self.as_slice()), at)
            .map_err(io_error(&path, "write the rows"))?;
        Ok(path)
    }

    /// Writes the data of a shared file map and then its row bitmap back to disk and waits, so
    /// a durable bit never claims a row whose data is not; nothing to do for anonymous and
    /// copy-on-write matrices.
    pub fn flush(&self) -> Result<(), TableError> {
        self.data.flush()?;
        match (&self.bitmap, self.data.path()) {
            (Some(bits), Some(path)) => bits.flush().map_err(io_error(path, "flush")),
            _ => Ok(()),
        }
    }

    /// Which matrix this is.
    pub fn id(&self) -> MatrixId {
        self.id
    }

    /// The seed recorded in the header.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.rows()
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.data.cols()
    }

    /// The rows x cols values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        self.data.as_slice()
    }

    /// The rows x cols values, row-major, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self.data.as_mut_slice()
    }

    /// The file a shared map writes through to; `None` for anonymous and copy-on-write
    /// (loaded) matrices.
    pub fn path(&self) -> Option<&Path> {
        self.data.path()
    }

    /// The row bitmap (bit `r % 8` of byte `r / 8`: row `r` holds its value), `None` for an
    /// eagerly initialised matrix.
    pub fn bitmap(&self) -> Option<&[u8]> {
        self.bitmap.as_deref()
    }

    /// The values and the row bitmap, both writable, to initialise rows and mark them.
    pub fn values_and_bitmap_mut(&mut self) -> (&mut [f32], Option<&mut [u8]>) {
        (self.data.as_mut_slice(), self.bitmap.as_deref_mut())
    }

    /// Drops the row bitmap once every row holds its value in memory that never writes back
    /// (a lazy file loaded into anonymous memory): the matrix is eager from now on, and
    /// [`write_to_dir`](Self::write_to_dir) writes it so.
    pub fn drop_bitmap(&mut self) {
        self.bitmap = None;
    }

    /// Checks, before anything is created, that `storage` can take the matrices `planned`
    /// (id, rows, cols): every shape is valid and, for file storage, none of the files exists
    /// and the file system has room for all of them, so a model that cannot fit fails before
    /// any file is made.
    pub fn check_room(
        storage: &StorageKind,
        planned: &[(MatrixId, usize, usize)],
    ) -> Result<(), TableError> {
        let mut needed = 0u64;
        for &(id, rows, cols) in planned {
            matrix_bytes(rows, cols)?;
            if let StorageKind::File { dir, lazy_init } = storage {
                let lazy = *lazy_init && id.kind == MatrixKind::Weights;
                let path = dir.join(id.file_name());
                if path.exists() {
                    return Err(TableError::Io {
                        path,
                        action: "create",
                        source: io::ErrorKind::AlreadyExists.into(),
                    });
                }
                let len = Header::new(id, rows, cols, 0, lazy).file_len();
                needed = needed.saturating_add(len);
            }
        }
        if let StorageKind::File { dir, .. } = storage {
            let available = available_space(dir)?;
            if needed > available {
                return Err(TableError::NoSpace {
                    path: dir.clone(),
                    needed,
                    available,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], path: &Path) -> Result<Header, TableError> {
        let header: Header = bytemuck::pod_read_unaligned(bytes);
        header.check(path).map(|()| header)
    }

    #[test]
    fn header_round_trips() {
        let path = Path::new("/x/table_003.emb");
        for lazy in [false, true] {
            let h = Header::new(MatrixId::weights(3), 1001, 13, 42, lazy);
            assert_eq!(decode(bytemuck::bytes_of(&h), path).unwrap(), h);
            assert_eq!(h.data_offset, HEADER_LEN as u64);
            assert_eq!(h.lazy(), lazy);
        }
        let lazy = Header::new(MatrixId::weights(3), 1001, 13, 42, true);
        assert_eq!(lazy.bitmap_offset % FILE_PAGE, 0);
        assert!(lazy.bitmap_offset >= HEADER_LEN as u64 + 1001 * 13 * 4);
        assert_eq!(lazy.file_len(), lazy.bitmap_offset + 126);
        let state = Header::new(MatrixId::state(0), 5, 1, 0, false);
        assert_eq!(state.file_len(), HEADER_LEN as u64 + 20);
    }

    #[test]
    fn header_bytes_are_the_documented_layout() {
        let h = Header::new(MatrixId::weights(3), 1001, 13, 42, true);
        let b = bytemuck::bytes_of(&h);
        assert_eq!(b.len(), HEADER_LEN);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(&b[0..8], &MAGIC);
        assert_eq!(u32_at(8), FORMAT_VERSION);
        assert_eq!(u32_at(12), ELEMENT_F32);
        assert_eq!(u64_at(16), 1001);
        assert_eq!(u64_at(24), 13);
        assert_eq!(u64_at(32), HEADER_LEN as u64);
        assert_eq!(u32_at(40), MatrixKind::Weights as u32);
        assert_eq!(u32_at(44), FLAG_LAZY);
        assert_eq!(u64_at(48), 42);
        assert_eq!(u64_at(56), 3);
        assert_eq!(u64_at(64), h.bitmap_offset);
        assert!(b[72..].iter().all(|&x| x == 0));
    }

    #[test]
    fn header_rejects_inconsistent_fields() {
        let path = Path::new("/x/t.emb");
        let good = Header::new(MatrixId::weights(0), 100, 8, 1, true);
        let corrupt = |offset: usize, bytes: &[u8]| {
            let mut b = bytemuck::bytes_of(&good).to_vec();
            b[offset..offset + bytes.len()].copy_from_slice(bytes);
            decode(&b, path).unwrap_err()
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
    fn file_names_are_zero_padded() {
        assert_eq!(table_file_name(7), "table_007.emb");
        assert_eq!(state_file_name(7), "table_007.state");
        assert_eq!(table_file_name(1234), "table_1234.emb");
        assert_eq!(MatrixId::state(7).file_name(), "table_007.state");
    }
}
