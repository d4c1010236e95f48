//! A mini-batch: dense features, per-table bags of row ids (PyTorch EmbeddingBag convention, or
//! one id per sample with no offsets), labels. Buffers are reused from batch to batch (filled
//! in place), so producing a batch allocates nothing once they have reached their size.
//!
//! The models read a batch through a [`BatchView`]: borrowed slices, either of a [`Batch`]'s
//! buffers or straight of the arrays a dataset maps (contiguous rows of one-hot id columns),
//! so that a mapped dataset's batch is read where it lies, with no copy.

use dlrm_kernels::embedding::Bags;
use std::ops::Range;

/// One mini-batch of `size()` samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// Dense features per sample.
    pub num_dense: usize,
    /// size x num_dense, row-major, already transformed (log(1 + x) for Criteo).
    pub dense: Vec<f32>,
    /// One label per sample, 0.0 or 1.0 (or a rating, for matrix factorization).
    pub labels: Vec<f32>,
    /// Per table: the row ids of all bags, concatenated.
    pub indices: Vec<Vec<u32>>,
    /// Per table: where each sample's bag starts in `indices` (`size()` entries, first 0; the
    /// last bag runs to the end), or empty (or missing) when the table is one-hot: one id per
    /// sample, sample i's being `indices[t][i]` (Criteo's categorical features; no offsets to
    /// build or read).
    pub offsets: Vec<Vec<u32>>,
}

impl Batch {
    /// An empty batch shaped for `num_dense` features and `num_tables` tables.
    pub fn new(num_dense: usize, num_tables: usize) -> Batch {
        Batch {
            num_dense,
            dense: Vec::new(),
            labels: Vec::new(),
            indices: vec![Vec::new(); num_tables],
            offsets: vec![Vec::new(); num_tables],
        }
    }

    pub fn size(&self) -> usize {
        self.labels.len()
    }

    pub fn num_tables(&self) -> usize {
        self.indices.len()
    }

    /// Empties every buffer, keeping its capacity.
    pub fn clear(&mut self) {
        self.dense.clear();
        self.labels.clear();
        self.indices.iter_mut().for_each(Vec::clear);
        self.offsets.iter_mut().for_each(Vec::clear);
    }

    /// Whether table `t` is one-hot (one id per sample, no offsets).
    pub fn is_one_hot(&self, t: usize) -> bool {
        self.view().is_one_hot(t)
    }

    /// Table `t`'s bags, as the embedding kernels take them (one-hot when the table is). Not
    /// checked: the models validate a batch (`validate_batch`) before running the kernels.
    pub fn bags(&self, t: usize) -> Bags<'_> {
        self.view().bags(t)
    }

    /// Sample `i`'s bag in table `t`.
    pub fn bag(&self, t: usize, i: usize) -> &[u32] {
        self.view().bag(t, i)
    }

    /// This batch, borrowed.
    pub fn view(&self) -> BatchView<'_> {
        BatchView {
            num_dense: self.num_dense,
            dense: &self.dense,
            labels: &self.labels,
            tables: Tables::Batch(self),
        }
    }

    /// Makes this batch a copy of samples `first .. first + size` of `src` (offsets rebased to
    /// this batch's ids; buffers reused).
    pub fn copy_samples(&mut self, src: &Batch, first: usize, size: usize) {
        assert!(
            first + size <= src.size(),
            "samples {first}..{} of {}",
            first + size,
            src.size()
        );
        let nd = src.num_dense;
        self.num_dense = nd;
        self.dense.clear();
        self.dense
            .extend_from_slice(&src.dense[first * nd..(first + size) * nd]);
        self.labels.clear();
        self.labels
            .extend_from_slice(&src.labels[first..first + size]);
        let nt = src.num_tables();
        self.indices.resize(nt, Vec::new());
        self.offsets.resize(nt, Vec::new());
        for t in 0..nt {
            let offs = &src.offsets[t];
            let ids = match size {
                0 => 0..0,
                _ => {
                    bag_range(&src.indices[t], offs, first).start
                        ..bag_range(&src.indices[t], offs, first + size - 1).end
                }
            };
            self.indices[t].clear();
            self.indices[t].extend_from_slice(&src.indices[t][ids.clone()]);
            self.offsets[t].clear();
            if !offs.is_empty() {
                let start = ids.start as u32;
                self.offsets[t].extend(offs[first..first + size].iter().map(|&o| o - start));
            }
        }
    }

    /// Sample `i`'s dense features.
    pub fn dense_row(&self, i: usize) -> &[f32] {
        self.view().dense_row(i)
    }
}

/// Per-table id columns of a whole split, one id per sample (one-hot), as a dataset stores
/// them: what a [`BatchView`] of contiguous rows borrows its ids from.
pub trait IdColumns: Sync {
    /// Table `t`'s ids, one per sample of the split.
    fn column(&self, t: usize) -> &[u32];
}

/// Where a view's ids are.
#[derive(Clone, Copy)]
enum Tables<'a> {
    /// A batch's own ids and offsets.
    Batch(&'a Batch),
    /// The rows from `first` on (as many as the view has samples) of `num_tables` one-hot id
    /// columns.
    Columns {
        columns: &'a dyn IdColumns,
        num_tables: usize,
        first: usize,
    },
}

/// A mini-batch, borrowed: what the models read. Made by [`Batch::view`] (the batch's buffers)
/// or [`BatchView::from_columns`] (contiguous rows of a dataset's arrays, no copy).
#[derive(Clone, Copy)]
pub struct BatchView<'a> {
    /// Dense features per sample.
    pub num_dense: usize,
    /// size x num_dense, row-major, already transformed (log(1 + x) for Criteo).
    pub dense: &'a [f32],
    /// One label per sample.
    pub labels: &'a [f32],
    tables: Tables<'a>,
}

impl<'a> BatchView<'a> {
    /// Rows `first .. first + labels.len()` of a split: its dense rows and labels (already
    /// sliced to those rows), and the same rows of `num_tables` one-hot id columns. Panics if
    /// the dense rows or a column do not hold those rows.
    pub fn from_columns(
        num_dense: usize,
        dense: &'a [f32],
        labels: &'a [f32],
        columns: &'a dyn IdColumns,
        num_tables: usize,
        first: usize,
    ) -> BatchView<'a> {
        let size = labels.len();
        assert_eq!(
            dense.len(),
            size * num_dense,
            "{} dense values for {size} samples of {num_dense}",
            dense.len()
        );
        for t in 0..num_tables {
            let rows = columns.column(t).len();
            assert!(
                first + size <= rows,
                "samples {first}..{} of table {t}'s {rows} ids",
                first + size
            );
        }
        BatchView {
            num_dense,
            dense,
            labels,
            tables: Tables::Columns {
                columns,
                num_tables,
                first,
            },
        }
    }

    pub fn size(&self) -> usize {
        self.labels.len()
    }

    pub fn num_tables(&self) -> usize {
        match self.tables {
            Tables::Batch(b) => b.indices.len(),
            Tables::Columns { num_tables, .. } => num_tables,
        }
    }

    /// Table `t`'s ids, all bags concatenated.
    pub fn ids(&self, t: usize) -> &'a [u32] {
        match self.tables {
            Tables::Batch(b) => &b.indices[t],
            Tables::Columns { columns, first, .. } => {
                &columns.column(t)[first..first + self.size()]
            }
        }
    }

    /// Table `t`'s offsets (see [`Batch::offsets`]): empty when the table is one-hot.
    pub fn offsets(&self, t: usize) -> &'a [u32] {
        match self.tables {
            Tables::Batch(b) => b.offsets.get(t).map_or(&[], Vec::as_slice),
            Tables::Columns { .. } => &[],
        }
    }

    /// Whether table `t` is one-hot (one id per sample, no offsets).
    pub fn is_one_hot(&self, t: usize) -> bool {
        self.offsets(t).is_empty()
    }

    /// Table `t`'s bags, as the embedding kernels take them (one-hot when the table is). Not
    /// checked: the models validate a batch (`validate_batch`) before running the kernels.
    pub fn bags(&self, t: usize) -> Bags<'a> {
        if self.is_one_hot(t) {
            Bags::one_hot(self.ids(t))
        } else {
            Bags::with_offsets(self.ids(t), self.offsets(t))
        }
    }

    /// Sample `i`'s bag in table `t`.
    pub fn bag(&self, t: usize, i: usize) -> &'a [u32] {
        let ids = self.ids(t);
        &ids[bag_range(ids, self.offsets(t), i)]
    }

    /// Sample `i`'s dense features.
    pub fn dense_row(&self, i: usize) -> &'a [f32] {
        &self.dense[i * self.num_dense..(i + 1) * self.num_dense]
    }
}

/// The positions (in `indices`) of sample `i`'s bag in a table of the given ids and offsets,
/// empty offsets meaning one id per sample.
pub(crate) fn bag_range(indices: &[u32], offsets: &[u32], i: usize) -> Range<usize> {
    if offsets.is_empty() {
        return i..i + 1;
    }
    let start = offsets[i] as usize;
    let end = offsets.get(i + 1).map_or(indices.len(), |&e| e as usize);
    start..end
}
