//! A mini-batch: dense features, per-table bags of row ids (PyTorch EmbeddingBag convention),
//! labels. Buffers are reused from batch to batch (filled in place), so producing a batch
//! allocates nothing once they have reached their size.

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
    /// last bag runs to the end).
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

    /// Sample `i`'s bag in table `t`.
    pub fn bag(&self, t: usize, i: usize) -> &[u32] {
        let offs = &self.offsets[t];
        let start = offs[i] as usize;
        let end = offs
            .get(i + 1)
            .map_or(self.indices[t].len(), |&e| e as usize);
        &self.indices[t][start..end]
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
            let start = offs.get(first).map_or(0, |&o| o as usize);
            let end = offs
                .get(first + size)
                .map_or(src.indices[t].len(), |&o| o as usize);
            self.indices[t].clear();
            self.indices[t].extend_from_slice(&src.indices[t][start..end]);
            self.offsets[t].clear();
            self.offsets[t].extend(offs[first..first + size].iter().map(|&o| o - start as u32));
        }
    }

    /// Sample `i`'s dense features.
    pub fn dense_row(&self, i: usize) -> &[f32] {
        &self.dense[i * self.num_dense..(i + 1) * self.num_dense]
    }
}
