//! BF16 mixed-precision training (`Precision::Bf16`): split-BF16 tables update exactly as f32
//! tables do given the same gradients; a bf16 run reaches the test AUC of the f32 run with the
//! same seed within 0.002 (teacher data, and the shared Criteo rows named by
//! DLRM_CRITEO_SAMPLE); its checkpoints hold f32 values, load as f32 models, and a resume in
//! bf16 is bit-identical to training straight through.

use dlrm::cancel::Cancel;
use dlrm::checkpoint;
use dlrm::config::Preset;
use dlrm::data::binary::{BinaryDataset, Encoding};
use dlrm::data::preprocess::preprocess;
use dlrm::data::preprocess::{CHUNK_BYTES, EncodingChoice, PreprocessOptions, Progress, Sources};
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::model::architecture::{Architecture, InteractionOp, join};
use dlrm::model::dlrm::Dlrm;
use dlrm::model::embedding::TableLayout;
use dlrm::model::sparse::SparseTables;
use dlrm::model::{Model, OptimizerKind, Precision, TableSource};
use dlrm::storage::StorageKind;
use dlrm::train::{
    CheckpointPolicy, DataSource, LrSchedule, Quiet, TrainOptions, TrainReport, train,
};
use dlrm_kernels::embedding::Bags;
use dlrm_kernels::parallel::Par;
use std::path::PathBuf;

/// The largest test AUC gap allowed between a bf16 run and the f32 run with the same seed.
const AUC_GAP: f64 = 0.002;

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Every f32 value of every table and state, as bits.
fn table_bits(t: &SparseTables) -> Vec<u32> {
    let mut v = Vec::new();
    for (table, state) in t.tables.iter().zip(&t.states) {
        v.extend(table.values().iter().map(|x| x.to_bits()));
        v.extend(state.as_slice().iter().map(|x| x.to_bits()));
    }
    v
}

#[test]
fn split_tables_update_bit_for_bit_as_fp32_tables() {
    let (rows, dim, batch) = ([50usize, 7, 1000], 16, 64);
    for optimizer in [
        OptimizerKind::Sgd,
        OptimizerKind::Adagrad,
        OptimizerKind::RowwiseAdagrad,
    ] {
        let create = || {
            let source = TableSource::Init(&StorageKind::Anon);
            SparseTables::create(0, &rows, dim, optimizer, source, 5).unwrap()
        };
        let mut fp32 = create();
        let mut split = create();
        split.set_layout(TableLayout::SplitBf16).unwrap();
        assert_eq!(split.layout(), TableLayout::SplitBf16);
        assert_eq!(table_bits(&split), table_bits(&fp32), "the split is exact");
        for step in 0..6u64 {
            // Bags of 3 ids (repeats included), gradients of either sign and scale.
            let ids: Vec<Vec<u32>> = rows
                .iter()
                .enumerate()
                .map(|(t, &r)| {
                    noise(3 * batch, step * 31 + t as u64)
                        .iter()
                        .map(|x| ((x + 1.0) * 0.5 * r as f32) as u32 % r as u32)
                        .collect()
                })
                .collect();
            let offsets: Vec<u32> = (0..batch as u32).map(|b| 3 * b).collect();
            let grads: Vec<Vec<f32>> = (0..rows.len())
                .map(|t| noise(batch * dim, 1000 + step * 7 + t as u64))
                .collect();
            let bags = |t: usize| Bags::with_offsets(&ids[t], &offsets);
            let grad = |t: usize| (&grads[t][..], dim);
            let wd = if step % 2 == 0 { 0.0 } else { 1e-3 };
            fp32.update(bags, grad, 0.05, wd, Par::Rayon);
            in_pool(3, || split.update(bags, grad, 0.05, wd, Par::AlwaysSplit));
            assert_eq!(
                table_bits(&split),
                table_bits(&fp32),
                "{optimizer:?}, step {step}"
            );
        }
        split.set_layout(TableLayout::Fp32).unwrap();
        assert_eq!(table_bits(&split), table_bits(&fp32), "joined back");
    }
}

#[test]
fn tables_in_files_are_not_split() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageKind::File {
        dir: dir.path().to_path_buf(),
        lazy_init: false,
    };
    let source = TableSource::Init(&storage);
    let mut tables = SparseTables::create(0, &[10], 4, OptimizerKind::Sgd, source, 1).unwrap();
    let err = tables.set_layout(TableLayout::SplitBf16).unwrap_err();
    assert!(err.to_string().contains("anonymous memory"), "{err}");
    assert_eq!(tables.layout(), TableLayout::Fp32);
}

/// Teacher data (labels from a hidden model) over tables of `table_sizes` rows.
fn teacher(num_dense: usize, table_sizes: &[usize], seed: u64) -> SyntheticData {
    SyntheticData::new(SyntheticConfig {
        num_dense,
        table_sizes: table_sizes.to_vec(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 2,
        fixed_bag_size: true,
        seed,
    })
}

/// The tiny preset on teacher data (as the end-to-end tests train it).
fn tiny(seed: u64) -> (Dlrm, SyntheticSource) {
    let arch = Preset::Tiny.values().architecture();
    let data = teacher(arch.num_dense(), &arch.table_sizes, seed);
    let source = SyntheticSource::new(data, 60_000, 8_000);
    let model = Dlrm::new(arch, OptimizerKind::Sgd, &StorageKind::Anon, seed).unwrap();
    (model, source)
}

fn options(batch_size: usize, lr: f32, nepochs: usize) -> TrainOptions {
    TrainOptions {
        nepochs,
        seed: 7,
        ..TrainOptions::new(batch_size, LrSchedule::constant(lr))
    }
}

/// Trains `model` on `data` in `precision` with 2 threads.
fn train_in(
    mut model: Dlrm,
    precision: Precision,
    data: &dyn DataSource,
    opts: &TrainOptions,
) -> TrainReport {
    in_pool(2, || {
        model.set_precision(precision).unwrap();
        train(&mut model, data, opts, 2, &mut Quiet).unwrap()
    })
}

/// Test AUC of the f32 and the bf16 run, each checked to have reported its precision.
fn auc_pair(run: impl Fn(Precision) -> TrainReport) -> (f64, f64) {
    let [fp32, bf16] = [Precision::Fp32, Precision::Bf16].map(|p| {
        let r = run(p);
        assert_eq!(r.precision, p);
        r.test_auc
    });
    (fp32, bf16)
}

#[test]
fn bf16_reaches_the_fp32_auc_on_teacher_data() {
    let (fp32, bf16) = auc_pair(|p| {
        let (model, data) = tiny(3);
        train_in(model, p, &data, &options(128, 0.5, 2))
    });
    eprintln!("teacher data: test AUC fp32 {fp32:.5}, bf16 {bf16:.5}");
    assert!(fp32 > 0.7, "the f32 run learns (AUC {fp32})");
    assert!((bf16 - fp32).abs() <= AUC_GAP, "fp32 {fp32}, bf16 {bf16}");
}

/// The shared Criteo rows (8,000 real Kaggle rows, never committed): the path is taken from
/// DLRM_CRITEO_SAMPLE, and the test says so and passes when it is unset.
#[test]
fn bf16_reaches_the_fp32_auc_on_the_criteo_rows() {
    let Some(path) = std::env::var_os("DLRM_CRITEO_SAMPLE") else {
        eprintln!("skipped: DLRM_CRITEO_SAMPLE does not name the Criteo sample rows");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let opts = PreprocessOptions {
        sources: Sources::Weights {
            files: vec![PathBuf::from(path)],
            weights: [0.8, 0.1, 0.1],
        },
        out: dir.path().join("ds"),
        encoding: EncodingChoice::New(Encoding::Dictionary { min_frequency: 1 }),
        labelled: true,
        skip_bad_lines: false,
        shuffle_seed: None,
        chunk_bytes: CHUNK_BYTES,
        progress: Progress::none(),
        cancel: Cancel::never(),
    };
    in_pool(2, || preprocess(&opts)).unwrap();
    let data = BinaryDataset::open(&opts.out).unwrap();
    let sizes: Vec<usize> = data
        .header()
        .table_sizes
        .iter()
        .map(|&n| n as usize)
        .collect();
    let arch = || {
        let (bottom, top) = ("13-512-256-64-16", "512-256-1");
        Architecture::from_flags(16, &join(&sizes), bottom, top, InteractionOp::Dot, false).unwrap()
    };
    // The Criteo tests' pinned run: SGD at 0.1, batches of 128, 3 epochs, seed 1.
    let (fp32, bf16) = auc_pair(|p| {
        let model = Dlrm::new(arch(), OptimizerKind::Sgd, &StorageKind::Anon, 1).unwrap();
        let opts = TrainOptions {
            seed: 1,
            test_batch_size: 1024,
            ..options(128, 0.1, 3)
        };
        train_in(model, p, &data, &opts)
    });
    eprintln!("Criteo rows: test AUC fp32 {fp32:.5}, bf16 {bf16:.5}");
    assert!((bf16 - fp32).abs() <= AUC_GAP, "fp32 {fp32}, bf16 {bf16}");
}

/// Every parameter and optimizer state of a model, as f32 bits.
fn model_bits(m: &Dlrm) -> Vec<u32> {
    let mut v = Vec::new();
    for l in m.bottom.layers.iter().chain(&m.top.layers) {
        v.extend(l.weight.iter().chain(&l.bias).map(|x| x.to_bits()));
    }
    for (sw, sb) in m.dense_state() {
        v.extend(sw.iter().chain(sb).map(|x| x.to_bits()));
    }
    v.extend(table_bits(&m.embeddings));
    v
}

#[test]
fn a_bf16_checkpoint_is_f32_and_resumes_bit_for_bit() {
    let arch = Preset::Tiny.values().architecture();
    let data = SyntheticSource::new(teacher(arch.num_dense(), &arch.table_sizes, 4), 640, 512);
    let bf16_model = || {
        let m = Dlrm::new(arch.clone(), OptimizerKind::Adagrad, &StorageKind::Anon, 9);
        let mut m = m.unwrap();
        m.set_precision(Precision::Bf16).unwrap();
        m
    };
    let opts = |nepochs, ckpt: Option<PathBuf>, resume| TrainOptions {
        checkpoint: ckpt.map(|dir| CheckpointPolicy {
            dir,
            every: 7,
            keep: 2,
            dataset_files: None,
        }),
        resume,
        ..options(64, 0.05, nepochs)
    };
    in_pool(2, || {
        // Straight through: 3 epochs of 10 steps.
        let mut straight = bf16_model();
        train(&mut straight, &data, &opts(3, None, None), 2, &mut Quiet).unwrap();

        // 2 epochs with checkpoints, then a resume in bf16 to 3.
        let dir = tempfile::tempdir().unwrap();
        let mut first = bf16_model();
        let ckpt = Some(dir.path().to_path_buf());
        train(&mut first, &data, &opts(2, ckpt, None), 2, &mut Quiet).unwrap();
        let version = checkpoint::resolve(dir.path()).unwrap();
        let (mut resumed, meta) = checkpoint::load_dlrm(&version, &StorageKind::Anon).unwrap();
        assert_eq!(meta.precision, Precision::Bf16);
        // The checkpoint holds the f32 values: it loads as an f32 model equal to the run's.
        assert_eq!(resumed.precision(), Precision::Fp32);
        assert_eq!(resumed.embeddings.layout(), TableLayout::Fp32);
        assert!(
            model_bits(&resumed) == model_bits(&first),
            "the checkpoint's values"
        );
        resumed.set_precision(meta.precision).unwrap();
        let state = Some(meta.train_state);
        train(&mut resumed, &data, &opts(3, None, state), 2, &mut Quiet).unwrap();
        assert!(
            model_bits(&resumed) == model_bits(&straight),
            "resumed bf16 model differs"
        );
    });
}
