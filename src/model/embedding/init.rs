//! Initial values of the embedding rows: the PyTorch reference's
//! `uniform(-sqrt(1/rows), +sqrt(1/rows))`, drawn from the counter-based generator of
//! [`crate::rng`], so a row's values are a pure function of (seed, table, row): eager and lazy
//! tables, anonymous and file-backed, hold the same numbers for any thread count and any
//! materialisation order.

use crate::rng;
use crate::storage::mmap::HUGE_PAGE;
use rayon::prelude::*;

/// Bytes of rows one task initialises eagerly: large enough to amortise a rayon task, and one
/// huge page, so threads do not fault the same huge page at once.
const INIT_TASK_BYTES: usize = HUGE_PAGE;

/// The bound of the initial values of a table with `rows` rows: sqrt(1 / rows), as in the
/// PyTorch reference (`np.random.uniform(-sqrt(1/n), sqrt(1/n))`).
pub fn init_bound(rows: usize) -> f32 {
    (1.0 / rows as f64).sqrt() as f32
}

/// The initial values of one table: uniform in [-bound, bound] from a key per row.
#[derive(Clone, Copy, Debug)]
pub(super) struct RowInit {
    table_key: u64,
    lo: f32,
    scale: f32,
}

impl RowInit {
    pub(super) fn new(seed: u64, table: usize, rows: usize) -> RowInit {
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
    pub(super) fn fill(&self, row: usize, out: &mut [f32]) {
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
    pub(super) fn fill_all(&self, data: &mut [f32], cols: usize) {
        self.fill_from(data, cols, 0);
    }

    /// [`fill_all`](Self::fill_all) for the rows `first_row ..` of the table held in `data`
    /// (a row-wise shard): its row i gets the initial values of row `first_row + i`.
    pub(super) fn fill_from(&self, data: &mut [f32], cols: usize, first_row: usize) {
        let rows_per_task = (INIT_TASK_BYTES / (cols * 4)).max(1);
        data.par_chunks_mut(rows_per_task * cols)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (i, row) in chunk.chunks_exact_mut(cols).enumerate() {
                    self.fill(first_row + task * rows_per_task + i, row);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
