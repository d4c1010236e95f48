//! Synthetic data, generated on the fly: `random` (uniform ids, as the reference's random
//! generator), `zipf` (ids drawn Zipf(α) per table, ranks scattered over the table: the skew of
//! real click logs) and `teacher` (ids as for zipf, labels drawn from a fixed, randomly
//! initialised teacher model, so a trained model has something real to learn, and the teacher's
//! own AUC is the ceiling).
//!
//! Sample `i` of a split is a pure function of (seed, split, i): any batch can be produced in
//! any order, by any number of threads, with the same bits.

use super::batch::bag_range;
use super::{Batch, RankPart};
use crate::names::{Choice, choice_names};
use crate::rng::{RankScatter, SplitMix64, Zipf, counter_hash, derive_key, unit_f32};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How ids and labels are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Generation {
    /// Uniform ids, labels Bernoulli(0.5): nothing to learn (a speed workload).
    Random,
    /// Zipf(α) ids, labels Bernoulli(0.5).
    Zipf,
    /// Zipf(α) ids, labels from a random teacher model.
    Teacher,
}

impl Choice for Generation {
    const ALL: &'static [Generation] = &[Generation::Random, Generation::Zipf, Generation::Teacher];
    fn name(self) -> &'static str {
        match self {
            Generation::Random => "random",
            Generation::Zipf => "zipf",
            Generation::Teacher => "teacher",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Generation::Random => {
                "Uniform ids, labels Bernoulli(0.5): nothing to learn (a speed workload)"
            }
            Generation::Zipf => "Zipf(α) ids, labels Bernoulli(0.5)",
            Generation::Teacher => "Zipf(α) ids, labels from a random teacher model",
        }
    }
}

choice_names!(Generation);

/// Which part of the synthetic data set.
pub use super::Split;

impl Split {
    fn key(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Test => 2,
        }
    }
}

/// Settings of the generator.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    pub num_dense: usize,
    pub table_sizes: Vec<usize>,
    pub generation: Generation,
    pub zipf_alpha: f64,
    /// Ids per bag: exactly this many when `fixed_bag_size`, else uniform in 1..=this.
    pub num_indices_per_lookup: usize,
    pub fixed_bag_size: bool,
    pub seed: u64,
}

/// Latent width of the teacher's feature vectors.
const TEACHER_DIM: usize = 4;
/// Samples per parallel generation task.
const SAMPLES_PER_TASK: usize = 256;

/// The teacher: a DLRM-shaped function of the same features, with the structure click data
/// has: mostly first-order effects (a bias per id, a linear function of the dense features)
/// plus low-rank pairwise interactions. Each feature gets a latent vector (a projection of the
/// dense features, and a hashed vector per table and id, pooled by mean over the bag); the
/// logit adds the scaled sum of all pairwise dot products of those vectors (the interaction DLRM
/// itself computes). Labels are Bernoulli(sigmoid(logit)).
#[derive(Clone, Debug)]
struct Teacher {
    key: u64,
    /// TEACHER_DIM x num_dense projection of the centred dense features.
    projection: Vec<f32>,
    /// Linear weights of the centred dense features.
    dense_weights: Vec<f32>,
    pair_scale: f32,
    bias_scale: f32,
    offset: f32,
}

impl Teacher {
    fn new(seed: u64, num_dense: usize, num_tables: usize) -> Teacher {
        let key = derive_key(seed, &[0x7eac_4e12]);
        let mut rng = SplitMix64::new(key);
        // Centred uniform dense features have variance 1/12: scale so each latent entry of the
        // dense vector has unit variance, like the hashed ones.
        let w = (12.0 / num_dense as f32).sqrt();
        let projection = (0..TEACHER_DIM * num_dense)
            .map(|_| rng.normal() * w)
            .collect();
        // The dense linear term has standard deviation 0.5.
        let dense_weights = (0..num_dense).map(|_| rng.normal() * 0.5 * w).collect();
        let f = (num_tables + 1) as f32;
        let pairs = f * (f - 1.0) / 2.0;
        Teacher {
            key,
            projection,
            dense_weights,
            // Pair terms (each of variance TEACHER_DIM) and id biases each contribute a
            // standard deviation of 1 to the logit.
            pair_scale: 1.0 / (pairs * TEACHER_DIM as f32).sqrt(),
            bias_scale: 1.0 / (num_tables.max(1) as f32).sqrt(),
            offset: -1.0,
        }
    }

    /// Unit-variance latent entries of (table, id), and its bias.
    fn id_vector(&self, table: usize, id: u32) -> ([f32; TEACHER_DIM], f32) {
        let k = derive_key(self.key, &[table as u64 + 1, id as u64]);
        let sqrt3 = 3.0f32.sqrt();
        let v = std::array::from_fn(|j| (2.0 * unit_f32(counter_hash(k, j as u64)) - 1.0) * sqrt3);
        let b = (2.0 * unit_f32(counter_hash(k, TEACHER_DIM as u64)) - 1.0) * sqrt3;
        (v, b)
    }

    /// The teacher's logit for one sample (dense row, and its bags per table). The sum of all
    /// pairwise dot products is computed as (|sum z|^2 - sum |z|^2) / 2, in O(F) without
    /// storing the vectors.
    fn logit<I: Iterator<Item = u32>>(
        &self,
        dense: &[f32],
        bags: impl Iterator<Item = (usize, I)>,
    ) -> f32 {
        let mut sum = [0.0f32; TEACHER_DIM];
        let mut sq = 0.0f32;
        let mut add = |z: &[f32; TEACHER_DIM]| {
            sum.iter_mut().zip(z).for_each(|(s, x)| *s += x);
            sq += z.iter().map(|x| x * x).sum::<f32>();
        };
        let mut z0 = [0.0f32; TEACHER_DIM];
        for (j, z) in z0.iter_mut().enumerate() {
            let row = &self.projection[j * dense.len()..(j + 1) * dense.len()];
            *z = row.iter().zip(dense).map(|(w, x)| w * (x - 0.5)).sum();
        }
        add(&z0);
        let linear: f32 = self
            .dense_weights
            .iter()
            .zip(dense)
            .map(|(w, x)| w * (x - 0.5))
            .sum();
        let mut bias = 0.0;
        for (t, ids) in bags {
            let mut v = [0.0f32; TEACHER_DIM];
            let mut n = 0;
            for id in ids {
                let (e, b) = self.id_vector(t, id);
                v.iter_mut().zip(e).for_each(|(a, x)| *a += x);
                bias += b;
                n += 1;
            }
            if n > 1 {
                v.iter_mut().for_each(|a| *a /= n as f32);
            }
            add(&v);
        }
        let pairs = 0.5 * (sum.iter().map(|s| s * s).sum::<f32>() - sq);
        self.pair_scale * pairs + self.bias_scale * bias + linear + self.offset
    }
}

/// An endless, deterministic synthetic data set.
#[derive(Clone, Debug)]
pub struct SyntheticData {
    cfg: SyntheticConfig,
    zipf: Vec<Zipf>,
    scatter: Vec<RankScatter>,
    teacher: Option<Teacher>,
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl SyntheticData {
    pub fn new(cfg: SyntheticConfig) -> SyntheticData {
        assert!(cfg.num_indices_per_lookup >= 1, "bags need at least one id");
        let zipf = cfg
            .table_sizes
            .iter()
            .map(|&n| Zipf::new(n as u64, cfg.zipf_alpha))
            .collect();
        let scatter = cfg
            .table_sizes
            .iter()
            .enumerate()
            .map(|(t, &n)| RankScatter::new(n as u64, derive_key(cfg.seed, &[0x5ca7, t as u64])))
            .collect();
        let teacher = (cfg.generation == Generation::Teacher)
            .then(|| Teacher::new(cfg.seed, cfg.num_dense, cfg.table_sizes.len()));
        SyntheticData {
            cfg,
            zipf,
            scatter,
            teacher,
        }
    }

    pub fn config(&self) -> &SyntheticConfig {
        &self.cfg
    }

    fn sample_rng(&self, split: Split, sample: u64, stream: u64) -> SplitMix64 {
        SplitMix64::new(derive_key(self.cfg.seed, &[split.key(), sample, stream]))
    }

    fn bag_size(&self, split: Split, sample: u64, table: usize) -> usize {
        let n = self.cfg.num_indices_per_lookup;
        if self.cfg.fixed_bag_size || n == 1 {
            n
        } else {
            1 + self
                .sample_rng(split, sample, 1 << 20 | table as u64)
                .below(n as u64) as usize
        }
    }

    fn draw_id(&self, t: usize, rng: &mut SplitMix64) -> u32 {
        let rows = self.cfg.table_sizes[t] as u64;
        let id = match self.cfg.generation {
            Generation::Random => rng.below(rows),
            Generation::Zipf | Generation::Teacher => {
                self.scatter[t].map(self.zipf[t].sample(rng) - 1)
            }
        };
        id as u32
    }

    /// Fills `batch` with samples `first .. first + size` of `split` (buffers reused).
    pub fn fill_batch(&self, split: Split, first: u64, size: usize, batch: &mut Batch) {
        let nd = self.cfg.num_dense;
        let nt = self.cfg.table_sizes.len();
        batch.num_dense = nd;
        batch.dense.resize(size * nd, 0.0);
        batch.labels.resize(size, 0.0);
        if batch.indices.len() != nt {
            batch.indices.resize(nt, Vec::new());
            batch.offsets.resize(nt, Vec::new());
        }
        // Ids, in parallel over tables (each table's ids are its own buffer).
        batch
            .indices
            .par_iter_mut()
            .zip(&mut batch.offsets)
            .enumerate()
            .for_each(|(t, (ids, offs))| self.fill_table(split, first, size, t, ids, offs));
        // Dense features and labels, in parallel over sample chunks.
        let indices = &batch.indices;
        let offsets = &batch.offsets;
        batch
            .dense
            .par_chunks_mut(nd * SAMPLES_PER_TASK)
            .zip(batch.labels.par_chunks_mut(SAMPLES_PER_TASK))
            .enumerate()
            .for_each(|(c, (dense, labels))| {
                for (r, label) in labels.iter_mut().enumerate() {
                    let i = c * SAMPLES_PER_TASK + r;
                    let mut rng = self.sample_rng(split, first + i as u64, 0);
                    let x = &mut dense[r * nd..(r + 1) * nd];
                    x.iter_mut().for_each(|v| *v = rng.unit_f32());
                    let p = self.probability_of(x, indices, offsets, i).unwrap_or(0.5);
                    *label = if rng.bernoulli(p as f64) { 1.0 } else { 0.0 };
                }
            });
    }

    /// Table `t`'s ids (and offsets; none when bags are of one id: one-hot) for samples
    /// `first .. first + size` of `split`.
    fn fill_table(
        &self,
        split: Split,
        first: u64,
        size: usize,
        t: usize,
        ids: &mut Vec<u32>,
        offs: &mut Vec<u32>,
    ) {
        // Bag sizes first (cheap), so every sample knows where its ids go.
        offs.clear();
        if self.cfg.num_indices_per_lookup == 1 {
            ids.resize(size, 0);
        } else {
            let mut at = 0u32;
            for i in 0..size {
                offs.push(at);
                at += self.bag_size(split, first + i as u64, t) as u32;
            }
            ids.resize(at as usize, 0);
        }
        for i in 0..size {
            let bag = bag_range(ids, offs, i);
            let mut rng = self.sample_rng(split, first + i as u64, 2 + t as u64);
            for id in &mut ids[bag] {
                *id = self.draw_id(t, &mut rng);
            }
        }
    }

    /// The `part` of samples `first .. first + size` of `split` one rank reads (see
    /// [`RankPart::assemble`]): the slice's samples (their labels need every table's ids) and
    /// the part's tables' ids for all samples; the same bits as [`SyntheticData::fill_batch`].
    pub fn fill_part(
        &self,
        split: Split,
        first: u64,
        size: usize,
        part: &RankPart,
        batch: &mut Batch,
    ) {
        let mut slice = Batch::default();
        let rows = &part.rows;
        self.fill_batch(split, first + rows.start as u64, rows.len(), &mut slice);
        let nt = self.cfg.table_sizes.len();
        let columns = (&slice.dense[..], &slice.labels[..]);
        part.assemble(size, self.cfg.num_dense, columns, nt, batch, |t, ids, o| {
            self.fill_table(split, first, size, t, ids, o)
        });
    }

    /// The teacher's click probability for sample `i` of a filled batch (None without teacher).
    fn probability_of(
        &self,
        dense: &[f32],
        indices: &[Vec<u32>],
        offsets: &[Vec<u32>],
        i: usize,
    ) -> Option<f32> {
        let teacher = self.teacher.as_ref()?;
        let bags = (0..indices.len()).map(|t| {
            (
                t,
                indices[t][bag_range(&indices[t], &offsets[t], i)]
                    .iter()
                    .copied(),
            )
        });
        Some(sigmoid(teacher.logit(dense, bags)))
    }

    /// The teacher's probabilities for every sample of a filled batch (None without teacher).
    pub fn teacher_probabilities(&self, batch: &Batch, out: &mut Vec<f32>) -> bool {
        if self.teacher.is_none() {
            return false;
        }
        out.clear();
        out.extend((0..batch.size()).map(|i| {
            self.probability_of(batch.dense_row(i), &batch.indices, &batch.offsets, i)
                .expect("teacher present")
        }));
        true
    }
}

/// Largest synthetic data set kept in memory (bytes of ids, offsets, dense features, labels);
/// larger ones are generated batch by batch during training.
pub const IN_MEMORY_LIMIT: u64 = 2 << 30;

/// A finite synthetic data set: `train_len` training and `test_len` held-out samples. Sets that
/// fit [`IN_MEMORY_LIMIT`] are generated once, up front, so that training reads batches from
/// memory (as it reads a mapped dataset) instead of timing the generator.
pub struct SyntheticSource {
    pub data: SyntheticData,
    pub train_len: u64,
    pub test_len: u64,
    train: Option<Batch>,
    test: Option<Batch>,
    ceiling: Option<f64>,
}

impl SyntheticSource {
    /// Generates the data set (in memory when it fits) and, with teacher labels, the teacher's
    /// AUC on the held-out split.
    pub fn new(data: SyntheticData, train_len: u64, test_len: u64) -> SyntheticSource {
        let cfg = data.config();
        let per_sample =
            4 * (cfg.num_dense + 1 + cfg.table_sizes.len() * (1 + cfg.num_indices_per_lookup));
        let fits = (train_len + test_len) * per_sample as u64 <= IN_MEMORY_LIMIT;
        let materialize = |split, len: u64| {
            fits.then(|| {
                let mut b = Batch::default();
                data.fill_batch(split, 0, len as usize, &mut b);
                b
            })
        };
        let train = materialize(Split::Train, train_len);
        let test = materialize(Split::Test, test_len);
        let mut src = SyntheticSource {
            data,
            train_len,
            test_len,
            train,
            test,
            ceiling: None,
        };
        src.ceiling = src.teacher_auc();
        src
    }

    /// The data set generated batch by batch, never held: what each rank of a distributed run
    /// uses, generating only its part of every batch. No teacher AUC (it would generate the
    /// whole held-out split).
    pub fn on_the_fly(data: SyntheticData, train_len: u64, test_len: u64) -> SyntheticSource {
        SyntheticSource {
            data,
            train_len,
            test_len,
            train: None,
            test: None,
            ceiling: None,
        }
    }

    /// Whether the data set is held in memory.
    pub fn in_memory(&self) -> bool {
        self.train.is_some()
    }

    fn fill(&self, split: Split, first: u64, size: usize, batch: &mut Batch) {
        let held = match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        };
        match held {
            Some(all) => batch.copy_samples(all, first as usize, size),
            None => self.data.fill_batch(split, first, size, batch),
        }
    }

    fn teacher_auc(&self) -> Option<f64> {
        self.data.teacher.as_ref()?;
        let mut batch = Batch::default();
        let (mut probs, mut labels, mut p) = (Vec::new(), Vec::new(), Vec::new());
        let chunk = 8192u64;
        let mut first = 0;
        while first < self.test_len {
            let size = chunk.min(self.test_len - first) as usize;
            self.fill(Split::Test, first, size, &mut batch);
            self.data.teacher_probabilities(&batch, &mut p);
            probs.extend_from_slice(&p);
            labels.extend_from_slice(&batch.labels);
            first += size as u64;
        }
        crate::metrics::roc_auc(&probs, &labels)
    }
}

impl super::DataSource for SyntheticSource {
    fn train_len(&self) -> u64 {
        self.train_len
    }
    fn test_len(&self) -> u64 {
        self.test_len
    }
    fn fill_train(&self, first: u64, size: usize, batch: &mut Batch) -> anyhow::Result<()> {
        self.fill(Split::Train, first, size, batch);
        Ok(())
    }
    fn fill_test(&self, first: u64, size: usize, batch: &mut Batch) -> anyhow::Result<()> {
        self.fill(Split::Test, first, size, batch);
        Ok(())
    }
    /// Generated, never read from the held copy: the same bits, and a rank's part only.
    fn fill_part(
        &self,
        split: Split,
        first: u64,
        size: usize,
        part: &RankPart,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        self.data.fill_part(split, first, size, part, batch);
        Ok(())
    }
    fn ceiling_auc(&self) -> Option<f64> {
        self.ceiling
    }
}
