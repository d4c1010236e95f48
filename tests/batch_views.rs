//! Batches read in place: a mapped dataset's batches are borrowed views of its arrays (no
//! copy), with one-hot tables (no offsets); training and evaluation on the views give, bit for
//! bit, what they give on copied batches; a view names the same samples as a filled batch.

use dlrm::cancel::Cancel;
use dlrm::data::Batch;
use dlrm::data::binary::{BinaryDataset, DatasetSplit, Encoding};
use dlrm::data::preprocess::{EncodingChoice, PreprocessOptions, Progress, Sources, preprocess};
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::{Architecture, InteractionOp, join};
use dlrm::model::dlrm::Dlrm;
use dlrm::storage::StorageKind;
use dlrm::train::{DataSource, LrSchedule, Quiet, TrainOptions, TrainReport, train};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A folder of its own under the system's temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dlrm-views-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `rows` Criteo TSV lines (label, 13 integers, 26 hashed categories; some fields
/// empty) and preprocesses them into a binary dataset at `dir/ds` (ids hashed into 97 rows).
fn dataset(dir: &Path, rows: usize) -> PathBuf {
    let tsv = dir.join("rows.tsv");
    let mut text = String::new();
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..rows {
        write!(text, "{}", next() % 2).unwrap();
        for _ in 0..13 {
            match next() % 7 {
                0 => text.push('\t'),
                r => write!(text, "\t{}", r * (next() % 50)).unwrap(),
            }
        }
        for _ in 0..26 {
            match next() % 11 {
                0 => text.push('\t'),
                _ => write!(text, "\t{:08x}", next() % 300).unwrap(),
            }
        }
        text.push('\n');
    }
    std::fs::write(&tsv, text).unwrap();
    let out = dir.join("ds");
    preprocess(&PreprocessOptions {
        sources: Sources::ReferenceKaggle { files: vec![tsv] },
        out: out.clone(),
        encoding: EncodingChoice::New(Encoding::HashFirstSeen { max_ind_range: 97 }),
        labelled: true,
        skip_bad_lines: false,
        shuffle_seed: None,
        chunk_bytes: 1 << 20,
        progress: Progress::none(),
        cancel: Cancel::never(),
    })
    .unwrap();
    out
}

/// The dataset as a source that only knows how to fill batches: its views are the default
/// trait methods' copies.
struct Copied<'a>(&'a BinaryDataset);

impl DataSource for Copied<'_> {
    fn train_len(&self) -> u64 {
        self.0.train_len()
    }
    fn test_len(&self) -> u64 {
        self.0.test_len()
    }
    fn fill_train(&self, first: u64, size: usize, batch: &mut Batch) -> anyhow::Result<()> {
        self.0.fill_train(first, size, batch)
    }
    fn fill_test(&self, first: u64, size: usize, batch: &mut Batch) -> anyhow::Result<()> {
        self.0.fill_test(first, size, batch)
    }
    fn shuffle(&self) -> bool {
        self.0.shuffle()
    }
}

#[test]
fn dataset_batches_are_borrowed_one_hot_views_of_the_same_samples() {
    let dir = Scratch::new("borrowed");
    let ds = BinaryDataset::open(&dataset(&dir.0, 1500)).unwrap();
    let nt = ds.header().num_tables();
    for split in DatasetSplit::ALL {
        let rows = ds.rows(split);
        assert!(rows > 40, "{rows} rows in the {} split", split.name());
        for (first, size) in [(0, 1), (0, 17), (rows - 23, 23), (rows / 3, 40), (5, 0)] {
            let mut unused = Batch::default();
            let view = ds.view(split, first, size, &mut unused).unwrap();
            let mut filled = Batch::default();
            ds.fill(split, first, size, &mut filled).unwrap();
            let copy = filled.view();
            assert_eq!(view.size(), size);
            assert_eq!(view.num_dense, copy.num_dense);
            assert_eq!(view.dense, copy.dense);
            assert_eq!(view.labels, copy.labels);
            assert_eq!(view.num_tables(), nt);
            for t in 0..nt {
                // One-hot on both paths: no offsets were built.
                assert!(view.is_one_hot(t) && filled.is_one_hot(t), "table {t}");
                assert!(filled.offsets[t].is_empty());
                assert!(view.bags(t).is_one_hot() && filled.bags(t).is_one_hot());
                assert_eq!(view.ids(t), copy.ids(t), "table {t}");
                assert_eq!(view.bags(t).len(), size);
                for i in 0..size {
                    assert_eq!(view.bag(t, i), &copy.ids(t)[i..i + 1]);
                }
            }
            // Nothing was copied: the batch lent for a fallback was never touched.
            assert_eq!(unused, Batch::default());
        }
        // A range past the split is refused, on both paths, naming the split.
        let mut b = Batch::default();
        let err = ds.view(split, rows - 3, 4, &mut b).err().unwrap();
        assert!(err.to_string().contains(split.name()), "{err}");
        assert!(ds.fill(split, rows - 3, 4, &mut b).is_err());
    }
    // Through the DataSource trait, the training split is borrowed too.
    let mut unused = Batch::default();
    let view = ds.train_view(8, 16, &mut unused).unwrap();
    assert_eq!(view.size(), 16);
    assert_eq!(unused, Batch::default());
}

fn arch(table_sizes: &[usize]) -> Architecture {
    Architecture::from_flags(
        8,
        &join(table_sizes),
        "13-16-8",
        "16-1",
        InteractionOp::Dot,
        false,
    )
    .unwrap()
}

/// Every parameter and optimizer state of `m`, as bits.
fn bits(m: &Dlrm) -> Vec<u32> {
    let mut v = Vec::new();
    for l in m.bottom.layers.iter().chain(&m.top.layers) {
        v.extend(l.weight.iter().chain(&l.bias).map(|x| x.to_bits()));
    }
    for (t, s) in m.embeddings.tables.iter().zip(&m.embeddings.states) {
        v.extend(t.weights().iter().chain(s.as_slice()).map(|x| x.to_bits()));
    }
    v
}

fn run(arch: &Architecture, data: &dyn DataSource) -> (TrainReport, Vec<u32>) {
    let mut m = Dlrm::new(arch.clone(), OptimizerKind::Adagrad, &StorageKind::Anon, 5).unwrap();
    let opts = TrainOptions {
        nepochs: 2,
        test_batch_size: 100,
        ..TrainOptions::new(64, LrSchedule::constant(0.05))
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let report = pool.install(|| train(&mut m, data, &opts, 2, &mut Quiet).unwrap());
    (report, bits(&m))
}

#[test]
fn training_on_views_equals_training_on_copies() {
    let dir = Scratch::new("train");
    let ds = BinaryDataset::open(&dataset(&dir.0, 1500)).unwrap();
    let sizes: Vec<usize> = ds
        .header()
        .table_sizes
        .iter()
        .map(|&n| n as usize)
        .collect();
    let arch = arch(&sizes);
    let (viewed, viewed_bits) = run(&arch, &ds);
    let (copied, copied_bits) = run(&arch, &Copied(&ds));
    assert_eq!(viewed_bits, copied_bits);
    assert!(viewed.steps > 20, "{} steps", viewed.steps);
    assert_eq!(viewed.steps, copied.steps);
    assert_eq!(viewed.train_loss.to_bits(), copied.train_loss.to_bits());
    assert_eq!(viewed.test_loss.to_bits(), copied.test_loss.to_bits());
    assert_eq!(viewed.test_auc.to_bits(), copied.test_auc.to_bits());
}

/// Synthetic data with one id per lookup fills one-hot tables (no offsets), and gives the
/// same samples as with offsets would: the ids of sample i are bag i either way.
#[test]
fn synthetic_one_id_lookups_are_one_hot() {
    let config = |n: usize| SyntheticConfig {
        num_dense: 4,
        table_sizes: vec![10, 1000, 3],
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: n,
        fixed_bag_size: true,
        seed: 11,
    };
    let one = SyntheticSource::new(SyntheticData::new(config(1)), 300, 100);
    let mut b = Batch::default();
    one.fill_train(17, 50, &mut b).unwrap();
    for t in 0..3 {
        assert!(b.is_one_hot(t) && b.offsets[t].is_empty(), "table {t}");
        assert_eq!(b.indices[t].len(), 50);
        assert!(b.bags(t).is_one_hot());
        for i in 0..50 {
            assert_eq!(b.bag(t, i), &b.indices[t][i..i + 1]);
        }
    }
    // A copy of some of its samples (how in-memory sources serve batches) stays one-hot.
    let mut part = Batch::default();
    part.copy_samples(&b, 5, 20);
    for t in 0..3 {
        assert!(part.is_one_hot(t));
        assert_eq!(part.indices[t], b.indices[t][5..25]);
    }
    assert_eq!(part.labels, b.labels[5..25]);
    // Several ids per lookup keep their offsets.
    let three = SyntheticSource::new(SyntheticData::new(config(3)), 300, 100);
    three.fill_train(17, 50, &mut b).unwrap();
    assert!((0..3).all(|t| !b.is_one_hot(t) && b.offsets[t].len() == 50));
}
