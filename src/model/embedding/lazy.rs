//! Lazy materialisation: a row of a lazily initialised table gets its initial value the first
//! time it is touched, and a bit in the table file's row bitmap records that it has.

use super::init::RowInit;
use rayon::prelude::*;

/// Materialisation state of a table: how many rows still wait for their initial value. The
/// bits themselves live in the table's file ([`crate::storage::MatrixFile::bitmap`]); an eager
/// table has no bitmap and nothing pending.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct LazyRows {
    /// Rows not yet materialised.
    pub(super) pending: usize,
}

/// Whether row `row` holds its initial value (or a trained one) by `bits`.
fn is_done(bits: &[u8], row: usize) -> bool {
    bits[row / 8] & (1u8 << (row % 8)) != 0
}

impl LazyRows {
    /// The state of a table file just created: its reserved, unwritten bitmap reads as zeros,
    /// so every row is pending (and no page of it needs to be read to know that).
    pub(super) fn all_pending(rows: usize) -> LazyRows {
        LazyRows { pending: rows }
    }

    /// The state of an existing bitmap of `rows` rows; counts the rows still pending (one
    /// pass over rows / 8 bytes, at open).
    pub(super) fn count(bits: &[u8], rows: usize) -> LazyRows {
        // Bits past the last row are never set by this module; mask them anyway so a stray
        // bit cannot make the count wrong.
        let tail_mask = match rows % 8 {
            0 => 0xFF,
            r => (1u8 << r) - 1,
        };
        let (last, body) = bits.split_last().expect("rows > 0");
        let set = body
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w).count_ones() as usize
            })
            .sum::<usize>()
            + (last & tail_mask).count_ones() as usize;
        LazyRows {
            pending: rows - set,
        }
    }

    /// Initialises every row among `ids` whose bit in `bits` is clear, in `data` (rows x
    /// `dim`, row-major), and sets its bit. An id out of range panics (ids are checked before).
    pub(super) fn materialize(
        &mut self,
        init: &RowInit,
        data: &mut [f32],
        bits: &mut [u8],
        dim: usize,
        ids: &[u32],
    ) {
        let rows = data.len() / dim;
        for &id in ids {
            let row = id as usize;
            assert!(
                row < rows,
                "materialize: row id {id} out of range for a table of {rows} rows"
            );
            let (byte, bit) = (row / 8, 1u8 << (row % 8));
            if bits[byte] & bit == 0 {
                init.fill(row, &mut data[row * dim..(row + 1) * dim]);
                bits[byte] |= bit;
                self.pending -= 1;
            }
        }
    }

    /// Initialises every pending row of `data` (rows x `dim`, row-major; row r is the table's
    /// row `first_row + r`) in parallel and marks every row materialised in `bits`.
    pub(super) fn materialize_all(
        &mut self,
        init: &RowInit,
        data: &mut [f32],
        bits: &mut [u8],
        dim: usize,
        first_row: usize,
    ) {
        if self.pending == 0 {
            return;
        }
        let done = &*bits;
        data.par_chunks_mut(dim)
            .enumerate()
            .filter(|(r, _)| !is_done(done, *r))
            .for_each(|(r, row)| init.fill(first_row + r, row));
        let rows = data.len() / dim;
        bits[..rows / 8].fill(0xFF);
        if !rows.is_multiple_of(8) {
            bits[rows / 8] |= (1u8 << (rows % 8)) - 1;
        }
        self.pending = 0;
    }
}
