//! A preprocessed dataset folder read back column by column, as the golden scripts of the
//! reference's preprocessing summarise it (rows, positives, FNV-1a hashes of the ids).

use std::path::Path;

/// Tables of a Criteo dataset.
pub const CRITEO_TABLES: usize = 26;

/// FNV-1a 64 of `values` as little-endian u32, as the golden scripts hash ids and dictionaries.
pub fn fnv1a64(values: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in values.iter().flat_map(|v| v.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The little-endian 4-byte values of the file at `path`, each as `from_le` makes it.
fn read_le<T>(path: &Path, from_le: fn([u8; 4]) -> T) -> Vec<T> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| from_le(b.try_into().unwrap()))
        .collect()
}

/// The rows and the positive labels of `split` (its labels.f32).
pub fn label_counts(ds: &Path, split: &str) -> (usize, usize) {
    let labels = read_le(&ds.join(split).join("labels.f32"), f32::from_le_bytes);
    (labels.len(), labels.iter().filter(|&&l| l == 1.0).count())
}

/// The id columns of `split` (ids_00.u32 .. ids_25.u32), one per table.
pub fn id_columns(ds: &Path, split: &str) -> Vec<Vec<u32>> {
    (0..CRITEO_TABLES)
        .map(|t| {
            read_le(
                &ds.join(split).join(format!("ids_{t:02}.u32")),
                u32::from_le_bytes,
            )
        })
        .collect()
}
