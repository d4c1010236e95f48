//! Guards of the training loop and of every command's run flags: non-finite parameters stop
//! training (named, nothing saved), nonsense flags are refused before work starts, buffers are
//! sized by the data, a finished run resumes to "nothing to do", a diverged comparison run is a
//! marked row, and one-class metrics read "undefined".

use dlrm::checkpoint;
use dlrm::data::Batch;
use dlrm::kernels::cross::CrossKind;
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dcn::{Dcn, DcnConfig};
use dlrm::model::dlrm::Dlrm;
use dlrm::model::fm::{Fm, FmConfig};
use dlrm::model::{Model, ModelKind, OptimizerKind, ParameterScope, Task, mf};
use dlrm::storage::StorageKind;

mod support;
use dlrm::train::{
    CheckpointPolicy, DataSource, Diverged, LrSchedule, Quiet, TrainOptions, evaluate, train,
};
use std::path::Path;
use std::process::Output;
use support::{Scratch, dlrm, stderr};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a clean failure: exit code 1, `needle` in stderr, no panic.
fn assert_refused(o: &Output, needle: &str, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: exit code; stderr: {err}");
    assert!(
        err.contains(needle),
        "{what}: stderr lacks {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
}

fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}: {}", stderr(o));
}

/// A tiny DLRM on synthetic data: small tables and MLPs, a few steps.
const TINY: [&str; 16] = [
    "--arch-embedding-size",
    "50-40-30",
    "--arch-sparse-feature-size",
    "4",
    "--arch-mlp-bot",
    "13-8-4",
    "--arch-mlp-top",
    "8-1",
    "--data-size",
    "512",
    "--test-data-size",
    "256",
    "--mini-batch-size",
    "64",
    "--threads",
    "2",
];

/// `dlrm train` with [`TINY`]'s flags, those that `extra` gives replaced by `extra`'s.
fn train_tiny(extra: &[&str]) -> Output {
    let mut args = vec!["train"];
    for pair in TINY.chunks(2) {
        if !extra.iter().any(|e| e.split('=').next() == Some(pair[0])) {
            args.extend_from_slice(pair);
        }
    }
    args.extend_from_slice(extra);
    dlrm(&args)
}

/// `rows` raw Criteo lines: label, 13 integers, 26 hex categories (of a few values each).
fn write_criteo(path: &Path, rows: usize, label: impl Fn(usize) -> u8) {
    let mut text = String::new();
    for r in 0..rows {
        text.push_str(&label(r).to_string());
        for f in 0..13 {
            text.push_str(&format!("\t{}", (r * 7 + f) % 23));
        }
        for f in 0..26 {
            text.push_str(&format!("\t{:08x}", (r * 31 + f * 17) % 5 + 0x1000));
        }
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// A dataset of `rows` Criteo rows (split 8,1,1) and a small DLRM checkpoint trained on it.
fn dataset_and_checkpoint(s: &Scratch, rows: usize, label: impl Fn(usize) -> u8) {
    write_criteo(&s.path("rows.tsv"), rows, label);
    let o = dlrm(&[
        "preprocess",
        &s.arg("rows.tsv"),
        "--out",
        &s.arg("ds"),
        "--split",
        "8,1,1",
        "--threads",
        "2",
    ]);
    assert_ok(&o, "preprocess");
    let o = dlrm(&[
        "train",
        "--dataset",
        &s.arg("ds"),
        "--arch-sparse-feature-size",
        "4",
        "--arch-mlp-bot",
        "13-8-4",
        "--arch-mlp-top",
        "8-1",
        "--mini-batch-size",
        "16",
        "--threads",
        "2",
        "--save-model",
        &s.arg("ck"),
        "--report-json",
        &s.arg("report.json"),
    ]);
    assert_ok(&o, "train on the dataset");
}

// ---- item 2: non-finite parameters ----

fn tiny_arch() -> Architecture {
    Architecture::from_flags(4, "50-40-30", "13-8-4", "8-1", InteractionOp::Dot, false).unwrap()
}

/// Every model kind names the tensor and index of its first non-finite parameter, dense and
/// tables alike, and a finite model has none.
#[test]
fn every_model_names_its_first_non_finite_parameter() {
    let anon = StorageKind::Anon;
    let sgd = OptimizerKind::Sgd;
    let mut d = Dlrm::new(tiny_arch(), sgd, &anon, 1).unwrap();
    assert_eq!(d.first_non_finite(ParameterScope::All), None);
    d.embeddings.tables[2].weights_mut()[5] = f32::INFINITY;
    assert_eq!(d.first_non_finite(ParameterScope::Dense), None);
    let bad = d.first_non_finite(ParameterScope::All).unwrap();
    assert_eq!((bad.name.as_str(), bad.index), ("emb_l.2.weight", 5));
    d.top.layers[0].bias[3] = f32::NAN;
    let bad = d.first_non_finite(ParameterScope::Dense).unwrap();
    assert_eq!((bad.name.as_str(), bad.index), ("top_l.0.bias", 3));
    assert_eq!(bad.to_string(), "top_l.0.bias[3] is NaN");

    let cfg = DcnConfig {
        kind: CrossKind::FullRank,
        embedding_dim: 4,
        table_sizes: vec![50, 40],
        num_dense: 13,
        cross_layers: 2,
        deep: vec![8, 4],
    };
    let mut c = Dcn::new(cfg, sgd, &anon, 1).unwrap();
    assert_eq!(c.first_non_finite(ParameterScope::All), None);
    c.deep.layers[1].weight[7] = f32::NEG_INFINITY;
    let bad = c.first_non_finite(ParameterScope::Dense).unwrap();
    assert_eq!((bad.name.as_str(), bad.index), ("deep_l.2.weight", 7));
    c.cross_w[1] = f32::NAN;
    let bad = c.first_non_finite(ParameterScope::Dense).unwrap();
    assert_eq!((bad.name.as_str(), bad.index), ("cross_l.weight", 1));

    let fm_cfg = FmConfig {
        model: ModelKind::Fm,
        task: Task::Classification,
        factors: 4,
        table_sizes: vec![50, 40],
        num_dense: 13,
        weight_decay: 0.0,
        initial_bias: 0.0,
    };
    let mut f = Fm::new(fm_cfg, sgd, &anon, 1).unwrap();
    assert_eq!(f.first_non_finite(ParameterScope::All), None);
    f.factors.tables[1].weights_mut()[9] = f32::NAN;
    let bad = f.first_non_finite(ParameterScope::All).unwrap();
    assert_eq!((bad.name.as_str(), bad.index), ("emb_l.1.weight", 9));
    f.bias = f32::NAN;
    assert_eq!(
        f.first_non_finite(ParameterScope::Dense).unwrap().name,
        "bias"
    );

    let mf_cfg = mf::MfConfig {
        users: 10,
        items: 20,
        factors: 3,
        global_mean: 3.0,
        weight_decay: 0.0,
    };
    let mut m = mf::new(mf_cfg, sgd, &anon, 1).unwrap();
    assert_eq!(m.first_non_finite(ParameterScope::All), None);
    m.linear.tables[1].weights_mut()[4] = f32::INFINITY;
    let bad = m.first_non_finite(ParameterScope::All).unwrap();
    assert_eq!((bad.name.as_str(), bad.index), ("lin_l.1.weight", 4));
}

/// Synthetic-looking data with one NaN dense value: sample `nan_at` of the training split.
struct NanDense {
    len: u64,
    nan_at: u64,
}

impl NanDense {
    fn fill(&self, first: u64, size: usize, batch: &mut Batch, poison: bool) {
        *batch = Batch::new(13, 3);
        for s in first..first + size as u64 {
            for f in 0..13 {
                let x = if poison && s == self.nan_at && f == 2 {
                    f32::NAN
                } else {
                    ((s * 13 + f) % 7) as f32 / 7.0
                };
                batch.dense.push(x);
            }
            for (t, rows) in [50u64, 40, 30].into_iter().enumerate() {
                batch.offsets[t].push(batch.indices[t].len() as u32);
                batch.indices[t].push(((s * 7 + t as u64) % rows) as u32);
            }
            batch.labels.push((s % 3 == 0) as u8 as f32);
        }
    }
}

impl DataSource for NanDense {
    fn train_len(&self) -> u64 {
        self.len
    }
    fn test_len(&self) -> u64 {
        64
    }
    fn fill_train(&self, first: u64, size: usize, batch: &mut Batch) -> anyhow::Result<()> {
        self.fill(first, size, batch, true);
        Ok(())
    }
    fn fill_test(&self, first: u64, size: usize, batch: &mut Batch) -> anyhow::Result<()> {
        self.fill(first, size, batch, false);
        Ok(())
    }
}

/// One NaN dense value makes `bot_l.0.weight` NaN while the loss may stay finite: training
/// stops with the layer and the step named, and no checkpoint holding it is ever written.
#[test]
fn a_nan_input_stops_training_before_a_checkpoint_holds_it() {
    let s = Scratch::new("nan-input");
    let mut model = Dlrm::new(tiny_arch(), OptimizerKind::Sgd, &StorageKind::Anon, 1).unwrap();
    let data = NanDense {
        len: 64 * 40,
        nan_at: 64 * 10 + 5,
    };
    let opts = TrainOptions {
        print_freq: 4,
        checkpoint: Some(CheckpointPolicy {
            dir: s.path("ck"),
            every: 3,
            keep: 100,
            dataset_files: None,
        }),
        ..TrainOptions::new(64, LrSchedule::constant(0.1))
    };
    let err = train(&mut model, &data, &opts, 2, &mut Quiet).unwrap_err();
    let diverged = err
        .downcast_ref::<Diverged>()
        .unwrap_or_else(|| panic!("not a divergence: {err:#}"));
    // The NaN enters at step 11; the next scan (a save at 12, or the interval) catches it.
    assert!(
        (11..=12).contains(&diverged.step),
        "{diverged}: stopped at step {}",
        diverged.step
    );
    assert!(
        err.to_string().contains("bot_l.0.weight") || err.to_string().contains("loss"),
        "{err}"
    );
    // Every version saved (steps 3, 6, 9) is finite; none is at or after the divergence.
    let mut versions = 0;
    for e in std::fs::read_dir(s.path("ck")).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir()
            && p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("ckpt-")
        {
            let (m, meta) = checkpoint::load_dlrm(&p, &StorageKind::Anon).unwrap();
            assert_eq!(
                m.first_non_finite(ParameterScope::All),
                None,
                "{}",
                p.display()
            );
            assert!(meta.train_state.step < diverged.step);
            versions += 1;
        }
    }
    assert_eq!(versions, 3);
}

/// A table row that no training batch looks up never reaches the loss: the scan at the end
/// still finds it, before the model is reported as trained.
#[test]
fn a_non_finite_table_row_is_caught_at_the_end() {
    let mut model = Dlrm::new(tiny_arch(), OptimizerKind::Sgd, &StorageKind::Anon, 1).unwrap();
    // Training samples 0..16 look up rows 7s mod 50 of table 0: never row 1 (values 4..8).
    model.embeddings.tables[0].weights_mut()[5] = f32::NAN;
    let data = NanDense {
        len: 16,
        nan_at: u64::MAX,
    };
    let opts = TrainOptions::new(16, LrSchedule::constant(0.1));
    let err = train(&mut model, &data, &opts, 2, &mut Quiet).unwrap_err();
    let diverged = err.downcast_ref::<Diverged>().expect("a divergence");
    assert_eq!(diverged.step, 1);
    assert_eq!(diverged.what, "parameter emb_l.0.weight[5] is NaN");
}

/// Non-finite predictions in an evaluation during training are the divergence they come
/// from (so `dlrm compare` can mark the run), naming the parameter.
#[test]
fn a_periodic_evaluation_reports_diverged_parameters() {
    let cfg = FmConfig {
        model: ModelKind::Fm,
        task: Task::Classification,
        factors: 4,
        table_sizes: vec![50, 40, 30],
        num_dense: 13,
        weight_decay: 0.0,
        initial_bias: 0.0,
    };
    let mut model = Fm::new(cfg, OptimizerKind::Sgd, &StorageKind::Anon, 1).unwrap();
    // Row 1 of table 0: held-out sample 43 looks it up, training samples 0..32 do not.
    model.factors.tables[0].weights_mut()[5] = f32::NAN;
    let data = NanDense {
        len: 32,
        nan_at: u64::MAX,
    };
    let opts = TrainOptions {
        test_freq: 1,
        ..TrainOptions::new(16, LrSchedule::constant(0.1))
    };
    let err = train(&mut model, &data, &opts, 2, &mut Quiet).unwrap_err();
    let diverged = err
        .downcast_ref::<Diverged>()
        .unwrap_or_else(|| panic!("not a divergence: {err:#}"));
    assert_eq!(diverged.step, 1);
    assert_eq!(diverged.what, "parameter emb_l.0.weight[5] is NaN");
}

/// From the command line, for every model kind: a learning rate that blows the parameters up
/// stops the run with exit 1 naming the parameter or the loss and the step.
#[test]
fn diverging_runs_of_every_model_exit_1_naming_what_diverged() {
    for model in ["dlrm", "dcn", "dcn-v2", "fm"] {
        let mut args = vec![
            "--model",
            model,
            "--learning-rate",
            "1e30",
            "--print-freq",
            "2",
        ];
        if model.starts_with("dcn") {
            args.extend(["--arch-mlp-deep", "8-4", "--cross-layers", "2"]);
        }
        let o = train_tiny(&args);
        assert_refused(&o, "at step", model);
        let err = stderr(&o);
        assert!(
            err.contains("parameter ") || err.contains("the loss diverged"),
            "{model}: {err}"
        );
    }

    let s = Scratch::new("mf-diverge");
    std::fs::write(s.path("u.base"), "1\t1\t5\n2\t3\t1\n3\t2\t4\n1\t2\t2\n").unwrap();
    std::fs::write(s.path("u.test"), "1\t3\t4\n2\t2\t2\n").unwrap();
    let o = dlrm(&[
        "train",
        "--model",
        "mf",
        "--train",
        &s.arg("u.base"),
        "--test",
        &s.arg("u.test"),
        "--learning-rate",
        "1e30",
        "--mini-batch-size",
        "2",
        "--nepochs",
        "20",
        "--threads",
        "2",
    ]);
    assert_refused(&o, "at step", "mf");
}

/// Evaluating a model whose parameters are not finite is an error naming the parameter, not
/// an AUC of 0.5.
#[test]
fn evaluating_a_non_finite_model_names_the_parameter() {
    let mut model = Dlrm::new(tiny_arch(), OptimizerKind::Sgd, &StorageKind::Anon, 1).unwrap();
    model.top.layers[1].bias[0] = f32::NAN;
    model.reserve_inference(64);
    let data = NanDense {
        len: 64,
        nan_at: u64::MAX,
    };
    let err = evaluate(&mut model, &data, 64, &mut Batch::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("held-out sample 0 is NaN"), "{msg}");
    assert!(msg.contains("top_l.2.bias[0] is NaN"), "{msg}");
}

// ---- item 8: buffers sized by the data ----

#[test]
fn eval_and_predict_batches_are_clamped_to_the_rows() {
    let s = Scratch::new("clamp");
    dataset_and_checkpoint(&s, 140, |r| (r % 3 == 0) as u8);
    for size in ["1000000000000", "18446744073709551615"] {
        let o = dlrm(&[
            "eval",
            "--load-model",
            &s.arg("ck"),
            "--dataset",
            &s.arg("ds"),
            "--mini-batch-size",
            size,
            "--threads",
            "2",
        ]);
        assert_ok(&o, &format!("eval --mini-batch-size {size}"));
        assert!(stdout(&o).contains("14 rows"), "{}", stdout(&o));
        let o = dlrm(&[
            "predict",
            "--load-model",
            &s.arg("ck"),
            "--criteo",
            &s.arg("rows.tsv"),
            "--out",
            &s.arg(&format!("p{}", size.len())),
            "--mini-batch-size",
            size,
            "--threads",
            "2",
        ]);
        assert_ok(&o, &format!("predict --mini-batch-size {size}"));
    }
}

/// A batch whose buffers need more memory than there is is refused with the bytes it needs.
#[test]
fn batches_larger_than_memory_are_refused_with_the_bytes() {
    let o = train_tiny(&[
        "--data-size",
        "100000000000000",
        "--mini-batch-size",
        "100000000000000",
    ]);
    assert_refused(&o, "--mini-batch-size 100000000000000 need", "train");
    assert!(
        stderr(&o).contains("bytes of memory are available"),
        "{}",
        stderr(&o)
    );
    // Anonymous tables larger than memory are refused before any is allocated.
    let o = train_tiny(&["--arch-embedding-size", "100000000000-10"]);
    assert_refused(
        &o,
        "the embedding tables (rows x bytes per row) need",
        "tables",
    );

    // Sizes whose sample count overflows are refused, not wrapped or panicking.
    let max = "18446744073709551615";
    let o = train_tiny(&["--data-size", "512", "--mini-batch-size", max]);
    assert_ok(&o, "a batch larger than the data is clamped to it");
    let o = dlrm(&["train", "--mini-batch-size", max, "--threads", "2"]);
    assert_refused(&o, "is more than 2^64", "train, samples overflow");
    for flag in ["--mini-batch-size", "--num-batches"] {
        let o = dlrm(&["compare", flag, max, "--threads", "2"]);
        assert_refused(&o, "is more than 2^64", &format!("compare {flag}"));
    }
}

// ---- item 13: flags refused before work starts ----

#[test]
fn thread_counts_are_checked_by_every_command() {
    let s = Scratch::new("threads");
    let out = s.arg("x");
    let commands: [&[&str]; 6] = [
        &["train"],
        &["eval", "--load-model", &out, "--dataset", &out],
        &[
            "predict",
            "--load-model",
            &out,
            "--criteo",
            &out,
            "--out",
            &out,
        ],
        &["compare"],
        &["synth", "--rows", "10", "--out", &out],
        &["preprocess", &out, "--out", &out],
    ];
    for cmd in commands {
        for (threads, needle) in [("0", "--threads 0"), ("1000", "--oversubscribe")] {
            let mut args = cmd.to_vec();
            args.extend(["--threads", threads]);
            assert_refused(
                &dlrm(&args),
                needle,
                &format!("{cmd:?} --threads {threads}"),
            );
        }
    }
    assert!(!s.path("x").exists(), "nothing is created");
    // --oversubscribe allows more.
    let cores = std::thread::available_parallelism().unwrap().get();
    let many = (4 * cores + 1).to_string();
    assert_ok(
        &train_tiny(&["--threads", &many, "--oversubscribe"]),
        "--oversubscribe",
    );
}

#[test]
fn nonsense_numbers_are_refused_before_work_starts() {
    let cases: [(&[&str], &str); 12] = [
        (&["--learning-rate=-0.1"], "--learning-rate -0.1"),
        (&["--learning-rate", "nan"], "--learning-rate NaN"),
        (&["--learning-rate", "0"], "--learning-rate 0"),
        (&["--learning-rate", "inf"], "--learning-rate inf"),
        (&["--nepochs", "0"], "--nepochs 0"),
        (&["--keep-checkpoints", "0"], "--keep-checkpoints 0"),
        (&["--mini-batch-size", "0"], "--mini-batch-size 0"),
        (&["--test-mini-batch-size", "0"], "--test-mini-batch-size 0"),
        (&["--data-size", "0"], "--data-size 0"),
        (&["--test-data-size", "0"], "--test-data-size 0"),
        (
            &["--num-indices-per-lookup", "0"],
            "--num-indices-per-lookup",
        ),
        (&["--zipf-alpha=-1"], "--zipf-alpha"),
    ];
    for (args, needle) in cases {
        let o = train_tiny(args);
        assert_refused(&o, needle, &format!("train {args:?}"));
        assert!(
            !stderr(&o).contains("model ready"),
            "{args:?}: work started"
        );
    }
    let cases: [(&[&str], &str); 7] = [
        (&["--lr-sgd", "nan"], "--lr-sgd NaN"),
        (&["--lr-adagrad=-1"], "--lr-adagrad -1"),
        (&["--num-batches", "0"], "--num-batches 0"),
        (&["--mini-batch-size", "0"], "--mini-batch-size 0"),
        (&["--test-data-size", "0"], "--test-data-size 0"),
        (
            &["--num-indices-per-lookup", "0"],
            "--num-indices-per-lookup 0",
        ),
        (&["--zipf-alpha", "nan"], "--zipf-alpha"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["compare"];
        all.extend_from_slice(args);
        assert_refused(&dlrm(&all), needle, &format!("compare {args:?}"));
    }
}

#[test]
fn eval_of_no_rows_is_an_error() {
    let s = Scratch::new("no-rows");
    dataset_and_checkpoint(&s, 100, |r| (r % 2) as u8);
    std::fs::write(s.path("empty.tsv"), "").unwrap();
    let o = dlrm(&[
        "eval",
        "--load-model",
        &s.arg("ck"),
        "--criteo",
        &s.arg("empty.tsv"),
        "--threads",
        "2",
    ]);
    assert_refused(
        &o,
        "empty.tsv: no rows to evaluate",
        "eval of an empty file",
    );

    // A dataset whose test split is empty.
    let o = dlrm(&[
        "preprocess",
        &s.arg("rows.tsv"),
        "--out",
        &s.arg("no-test"),
        "--split",
        "9,1,0",
        "--threads",
        "2",
    ]);
    assert_ok(&o, "preprocess without a test split");
    let o = dlrm(&[
        "eval",
        "--load-model",
        &s.arg("ck"),
        "--dataset",
        &s.arg("no-test"),
        "--threads",
        "2",
    ]);
    assert_refused(&o, "the test split is empty", "eval of an empty split");
}

#[test]
fn a_huge_movielens_id_is_refused_by_file_line_and_id() {
    let s = Scratch::new("movielens");
    std::fs::write(s.path("u.base"), "1\t1\t5\n2\t4000000000\t1\n").unwrap();
    std::fs::write(s.path("u.test"), "1\t1\t4\n").unwrap();
    let o = dlrm(&[
        "train",
        "--model",
        "mf",
        "--train",
        &s.arg("u.base"),
        "--test",
        &s.arg("u.test"),
        "--threads",
        "2",
    ]);
    assert_refused(&o, "u.base:2: item id 4000000000", "movielens id");
}

#[test]
fn a_missing_tables_dir_is_created() {
    let s = Scratch::new("tables-dir");
    let dir = s.path("new/tables");
    let o = train_tiny(&[
        "--embedding-storage",
        "file",
        "--tables-dir",
        dir.to_str().unwrap(),
    ]);
    assert_ok(&o, "train into a new --tables-dir");
    assert!(dir.is_dir());
}

/// Held-out labels of one class: AUC and NE are "undefined", null in the report.
#[test]
fn one_class_auc_is_undefined_not_nan() {
    let s = Scratch::new("one-class");
    dataset_and_checkpoint(&s, 100, |_| 0);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("report.json")).unwrap()).unwrap();
    assert!(report["test_auc"].is_null(), "{report}");
    let o = dlrm(&[
        "eval",
        "--load-model",
        &s.arg("ck"),
        "--dataset",
        &s.arg("ds"),
        "--threads",
        "2",
    ]);
    assert_ok(&o, "eval");
    assert!(
        stdout(&o).contains("AUC undefined (one class)"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("NaN"), "{}", stdout(&o));
}

// ---- item 15: resuming a finished run ----

#[test]
fn resuming_a_finished_run_has_nothing_to_do() {
    let s = Scratch::new("resume");
    let ck = s.arg("ck");
    assert_ok(&train_tiny(&["--save-model", &ck]), "first run");
    let o = train_tiny(&["--load-model", &ck]);
    assert_ok(&o, "resume of a finished run");
    assert!(
        stderr(&o).contains("nothing to do: the checkpoint is at step 8 of 8"),
        "{}",
        stderr(&o)
    );
    assert!(!stdout(&o).contains("NaN"), "{}", stdout(&o));
}

// ---- item 16: a diverged comparison run is a marked row ----

fn compare(s: &Scratch, lr_adagrad: &str) -> Output {
    dlrm(&[
        "compare",
        "--models",
        "dlrm,dcn",
        "--lr-sgd",
        "1e30",
        "--lr-adagrad",
        lr_adagrad,
        "--num-batches",
        "8",
        "--test-freq",
        "4",
        "--arch-embedding-size",
        "50-40",
        "--arch-sparse-feature-size",
        "4",
        "--arch-mlp-bot",
        "13-8-4",
        "--arch-mlp-top",
        "8-1",
        "--arch-mlp-deep",
        "8-4",
        "--cross-layers",
        "2",
        "--test-data-size",
        "256",
        "--threads",
        "2",
        "--out-dir",
        &s.arg("out"),
    ])
}

#[test]
fn compare_marks_diverged_runs_and_keeps_the_finished_ones() {
    let s = Scratch::new("compare");
    let o = compare(&s, "0.02");
    assert_ok(&o, "compare with diverging SGD runs");
    let csv = std::fs::read_to_string(s.path("out/compare.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("model,optimizer,learning_rate,step,samples,loss,accuracy,auc,ne,status")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    for model in ["dlrm", "dcn"] {
        let sgd: Vec<_> = rows
            .iter()
            .filter(|r| r[0] == model && r[1] == "sgd")
            .collect();
        assert_eq!(sgd.len(), 1, "{csv}");
        assert_eq!(sgd[0][9], "diverged", "{csv}");
        let ada: Vec<_> = rows
            .iter()
            .filter(|r| r[0] == model && r[1] == "adagrad")
            .collect();
        assert_eq!(ada.len(), 2, "{csv}");
        assert!(ada.iter().all(|r| r[9] == "ok"), "{csv}");
    }
    assert!(stdout(&o).contains("diverged at step"), "{}", stdout(&o));
    let svg = std::fs::read_to_string(s.path("out/compare.svg")).unwrap();
    assert!(svg.contains("dcn adagrad") && !svg.contains("dcn sgd"));

    // Every run diverged: exit 1, the rows are still written, no plot.
    let s = Scratch::new("compare-all");
    let o = compare(&s, "1e30");
    assert_refused(&o, "every run diverged", "compare, all diverged");
    let csv = std::fs::read_to_string(s.path("out/compare.csv")).unwrap();
    assert_eq!(
        csv.lines().filter(|l| l.ends_with(",diverged")).count(),
        4,
        "{csv}"
    );
    assert!(!s.path("out/compare.svg").exists());
}
