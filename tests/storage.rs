//! The storage layer on its own: a `MatrixFile` of any shape survives create -> write_to_dir ->
//! open / load in every storage, its header holds the documented fields at the documented
//! offsets, and a damaged or mismatched file is refused with an error naming it.

use dlrm::storage::{
    ELEMENT_F32, FORMAT_VERSION, HEADER_LEN, MAGIC, MatrixFile, MatrixId, MatrixKind, StorageKind,
    TableError,
};
use proptest::prelude::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Distinct, exactly representable values, so a lost or moved element shows.
fn pattern(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| ((i as u64 * 7 + seed) % 65_521) as f32 - 30_000.5)
        .collect()
}

/// The length a table file of this shape must have (see the format in `storage::matrix_file`).
fn expected_file_len(rows: usize, cols: usize, lazy: bool) -> u64 {
    let data_end = (HEADER_LEN + rows * cols * 4) as u64;
    if lazy {
        data_end.next_multiple_of(4096) + rows.div_ceil(8) as u64
    } else {
        data_end
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn header_bytes(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[..HEADER_LEN].to_vec()
}

fn assert_names(err: &TableError, path: &Path) {
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "{msg:?} does not name {path:?}"
    );
}

/// A new matrix in `storage`, filled with `pattern`, with every third row marked in its
/// bitmap when it has one.
fn filled(
    id: MatrixId,
    rows: usize,
    cols: usize,
    seed: u64,
    storage: &StorageKind,
) -> (MatrixFile, Vec<f32>) {
    let values = pattern(rows, cols, seed);
    let mut m = MatrixFile::create(id, rows, cols, seed, storage).unwrap();
    let (data, bits) = m.values_and_bitmap_mut();
    data.copy_from_slice(&values);
    if let Some(bits) = bits {
        for r in (0..rows).step_by(3) {
            bits[r / 8] |= 1 << (r % 8);
        }
    }
    (m, values)
}

fn round_trip(id: MatrixId, rows: usize, cols: usize, seed: u64, storage: &StorageKind) {
    let out = tempfile::tempdir().unwrap();
    let (m, values) = filled(id, rows, cols, seed, storage);
    let lazy = matches!(
        storage,
        StorageKind::File {
            lazy_init: true,
            ..
        }
    ) && id.kind == MatrixKind::Weights;
    assert_eq!(m.bitmap().is_some(), lazy);
    assert_eq!(
        m.path().is_some(),
        matches!(storage, StorageKind::File { .. })
    );
    m.flush().unwrap();
    let bits = m.bitmap().map(<[u8]>::to_vec);

    let path = m.write_to_dir(out.path()).unwrap();
    assert_eq!(path, out.path().join(id.file_name()));
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        expected_file_len(rows, cols, lazy)
    );
    let h = header_bytes(&path);
    assert_eq!(h[0..8], MAGIC);
    assert_eq!(u32_at(&h, 8), FORMAT_VERSION);
    assert_eq!(u32_at(&h, 12), ELEMENT_F32);
    assert_eq!(u64_at(&h, 16), rows as u64);
    assert_eq!(u64_at(&h, 24), cols as u64);
    assert_eq!(u64_at(&h, 32), HEADER_LEN as u64);
    assert_eq!(u32_at(&h, 40), id.kind as u32);
    assert_eq!(u32_at(&h, 44), u32::from(lazy));
    assert_eq!(u64_at(&h, 48), seed);
    assert_eq!(u64_at(&h, 56), id.index as u64);
    let bitmap_offset = u64_at(&h, 64);
    if lazy {
        assert_eq!(bitmap_offset % 4096, 0);
        assert!(bitmap_offset >= (HEADER_LEN + rows * cols * 4) as u64);
    } else {
        assert_eq!(bitmap_offset, 0);
    }
    assert!(h[72..].iter().all(|&b| b == 0), "reserved bytes not zero");

    // Writing the same matrix again refuses to overwrite the file, and names it.
    let err = m.write_to_dir(out.path()).unwrap_err();
    assert_names(&err, &path);
    drop(m);

    let opened = MatrixFile::open(&path, id, rows, cols).unwrap();
    assert_eq!(opened.as_slice(), &values[..]);
    assert_eq!((opened.id(), opened.seed()), (id, seed));
    assert_eq!(opened.bitmap().map(<[u8]>::to_vec), bits);
    assert_eq!(opened.path(), Some(path.as_path()));
    drop(opened);

    let cow_dir = tempfile::tempdir().unwrap();
    let cow = StorageKind::File {
        dir: cow_dir.path().to_path_buf(),
        lazy_init: false,
    };
    for into in [StorageKind::Anon, cow] {
        let mut loaded = MatrixFile::load(&path, id, rows, cols, &into).unwrap();
        assert_eq!(loaded.as_slice(), &values[..], "{into:?}");
        assert_eq!((loaded.id(), loaded.seed()), (id, seed));
        assert_eq!(loaded.bitmap().map(<[u8]>::to_vec), bits);
        // A loaded matrix never writes back: neither to the file it came from nor elsewhere.
        assert_eq!(loaded.path(), None);
        loaded.as_mut_slice().fill(1.5);
        if let (_, Some(bits)) = loaded.values_and_bitmap_mut() {
            bits.fill(0xFF);
        }
        loaded.flush().unwrap();
        drop(loaded);
        let again = MatrixFile::open(&path, id, rows, cols).unwrap();
        assert_eq!(again.as_slice(), &values[..], "{into:?} wrote through");
        assert_eq!(again.bitmap().map(<[u8]>::to_vec), bits);
    }
    assert_eq!(std::fs::read_dir(cow_dir.path()).unwrap().count(), 0);
}

fn storages(dir: &Path) -> [StorageKind; 3] {
    [
        StorageKind::Anon,
        StorageKind::File {
            dir: dir.to_path_buf(),
            lazy_init: false,
        },
        StorageKind::File {
            dir: dir.to_path_buf(),
            lazy_init: true,
        },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn matrices_of_any_shape_round_trip(
        rows in 1usize..300,
        cols in 1usize..40,
        index in 0usize..2000,
        seed: u64,
        state: bool,
        storage in 0usize..3,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let id = if state { MatrixId::state(index) } else { MatrixId::weights(index) };
        round_trip(id, rows, cols, seed, &storages(dir.path())[storage]);
    }
}

#[test]
fn awkward_shapes_round_trip_in_every_storage() {
    // One row, one column, a bitmap ending mid-byte and on a byte, data ending on a page.
    for (rows, cols) in [(1, 1), (1, 1025), (9, 3), (8, 5), (1024, 1), (7, 1024)] {
        for id in [MatrixId::weights(3), MatrixId::state(3)] {
            let dir = tempfile::tempdir().unwrap();
            for storage in storages(dir.path()) {
                round_trip(id, rows, cols, 42, &storage);
                for entry in std::fs::read_dir(dir.path()).unwrap() {
                    std::fs::remove_file(entry.unwrap().path()).unwrap();
                }
            }
        }
    }
}

/// A valid 10 x 4 lazy weights file of table 5, written by `write_to_dir`.
fn valid_file(dir: &Path) -> PathBuf {
    let storage = StorageKind::File {
        dir: dir.join("src"),
        lazy_init: true,
    };
    std::fs::create_dir(dir.join("src")).unwrap();
    let (m, _) = filled(MatrixId::weights(5), 10, 4, 9, &storage);
    m.write_to_dir(dir).unwrap()
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

/// Opening and loading `path` (as table 5's 10 x 4 weights) both fail, naming the file.
fn refused(path: &Path) -> TableError {
    let id = MatrixId::weights(5);
    let err = MatrixFile::load(path, id, 10, 4, &StorageKind::Anon).unwrap_err();
    assert_names(&err, path);
    let err = MatrixFile::open(path, id, 10, 4).unwrap_err();
    assert_names(&err, path);
    err
}

#[test]
fn damaged_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_file(dir.path());
    let good = std::fs::read(&path).unwrap();
    let restore = || std::fs::write(&path, &good).unwrap();

    // A header cut short.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(HEADER_LEN as u64 - 1).unwrap();
    assert!(matches!(refused(&path), TableError::TooShort { .. }));
    // Data cut short.
    restore();
    file.set_len(good.len() as u64 - 1).unwrap();
    assert!(matches!(refused(&path), TableError::Truncated { .. }));
    // Damaged header fields.
    let cases: [(u64, &[u8]); 7] = [
        (0, b"NOTATABL"),
        (8, &2u32.to_le_bytes()),
        (12, &7u32.to_le_bytes()),
        (16, &0u64.to_le_bytes()),
        (40, &9u32.to_le_bytes()),
        (44, &0u32.to_le_bytes()),
        (64, &4096u64.to_le_bytes()),
    ];
    for (offset, bytes) in cases {
        restore();
        poke(&path, offset, bytes);
        let err = refused(&path);
        let expected = match offset {
            0 => matches!(err, TableError::BadMagic { .. }),
            8 => matches!(err, TableError::UnsupportedVersion { found: 2, .. }),
            12 => matches!(err, TableError::UnknownElementType { found: 7, .. }),
            _ => matches!(err, TableError::BadHeader { .. }),
        };
        assert!(expected, "offset {offset}: {err}");
    }
    restore();
    let id = MatrixId::weights(5);
    MatrixFile::open(&path, id, 10, 4).unwrap();
}

#[test]
fn a_file_of_another_matrix_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_file(dir.path());
    let open = |id, rows, cols| {
        let err = MatrixFile::open(&path, id, rows, cols).unwrap_err();
        assert_names(&err, &path);
        err
    };
    assert!(matches!(
        open(MatrixId::state(5), 10, 4),
        TableError::WrongKind { .. }
    ));
    assert!(matches!(
        open(MatrixId::weights(6), 10, 4),
        TableError::IndexMismatch {
            expected: 6,
            found: 5,
            ..
        }
    ));
    assert!(matches!(
        open(MatrixId::weights(5), 11, 4),
        TableError::ShapeMismatch { .. }
    ));
    assert!(matches!(
        open(MatrixId::weights(5), 10, 3),
        TableError::ShapeMismatch { .. }
    ));
}

#[test]
fn check_room_refuses_existing_files_and_too_little_space() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageKind::File {
        dir: dir.path().to_path_buf(),
        lazy_init: false,
    };
    let plan = [(MatrixId::weights(0), 10, 4), (MatrixId::state(0), 10, 1)];
    MatrixFile::check_room(&storage, &plan).unwrap();
    let existing = dir.path().join(MatrixId::state(0).file_name());
    std::fs::write(&existing, b"").unwrap();
    let err = MatrixFile::check_room(&storage, &plan).unwrap_err();
    assert_names(&err, &existing);
    std::fs::remove_file(&existing).unwrap();
    // More than any file system holds: 2^32 rows of 2^20 floats, several times over.
    let huge: Vec<_> = (0..64)
        .map(|t| (MatrixId::weights(t), 1 << 32, 1 << 20))
        .collect();
    let err = MatrixFile::check_room(&storage, &huge).unwrap_err();
    assert!(matches!(err, TableError::NoSpace { .. }), "{err}");
    assert_names(&err, dir.path());
    assert!(MatrixFile::check_room(&StorageKind::Anon, &[(MatrixId::weights(0), 0, 4)]).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
