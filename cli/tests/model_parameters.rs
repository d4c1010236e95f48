//! Every model (DLRM, DCN, DCN-v2, FM, MF) through its named-parameter visitor: a checkpoint
//! resumes bit for bit (N steps, save, load, M steps == N + M steps in one run: parameters,
//! optimizer state and losses), and an export imports back to the same parameters and
//! predictions, with SGD and Adagrad alike.

use dlrm::cancel::Cancel;
use dlrm::checkpoint::{self, LoadOptions, TrainState};
use dlrm::data::Batch;
use dlrm::data::movielens::{MovieLensSource, Ratings};
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::interop::{ImportOptions, export_safetensors, import_model};
use dlrm::kernels::cross::CrossKind;
use dlrm::model::PhaseTimer;
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dcn::DcnConfig;
use dlrm::model::fm::FmConfig;
use dlrm::model::parameters::{TensorKind, tensors};
use dlrm::model::{Model, ModelConfig, ModelKind, OptimizerKind, TableSource, Task};
use dlrm::rng::SplitMix64;
use dlrm::storage::StorageKind;
use dlrm::train::{DataSource, LrSchedule};
use std::path::{Path, PathBuf};

const TABLES: [usize; 3] = [40, 30, 20];
const DENSE: usize = 5;
const D: usize = 4;
const BATCH: usize = 16;
const SEED: u64 = 11;

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "dlrm-model-parameters-{name}-{}",
            std::process::id()
        ));
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

/// One small configuration of each model kind.
fn configs() -> Vec<ModelConfig> {
    let arch =
        Architecture::from_flags(D, "40-30-20", "5-8-4", "8-1", InteractionOp::Dot, false).unwrap();
    let dcn = |kind| DcnConfig {
        kind,
        embedding_dim: D,
        table_sizes: TABLES.to_vec(),
        num_dense: DENSE,
        cross_layers: 2,
        deep: vec![8, 4],
    };
    let fm = |model, task, table_sizes: &[usize], num_dense| FmConfig {
        model,
        task,
        factors: D,
        table_sizes: table_sizes.to_vec(),
        num_dense,
        weight_decay: 0.001,
        initial_bias: 0.25,
    };
    vec![
        ModelConfig::Dlrm(arch),
        ModelConfig::Dcn(dcn(CrossKind::RankOne)),
        ModelConfig::Dcn(dcn(CrossKind::FullRank)),
        ModelConfig::Fm(fm(ModelKind::Fm, Task::Classification, &TABLES, DENSE)),
        ModelConfig::Fm(fm(ModelKind::Mf, Task::Regression, &TABLES[..2], 0)),
    ]
}

/// Teacher data shaped for `config`'s tables and dense features (ratings for MF).
fn data(config: &ModelConfig) -> Box<dyn DataSource> {
    let (table_sizes, num_dense) = match config {
        ModelConfig::Dlrm(a) => (a.table_sizes.clone(), a.num_dense()),
        ModelConfig::Dcn(c) => (c.table_sizes.clone(), c.num_dense),
        ModelConfig::Fm(c) if c.model == ModelKind::Mf => return ratings(c),
        ModelConfig::Fm(c) => (c.table_sizes.clone(), c.num_dense),
    };
    Box::new(SyntheticSource::new(
        SyntheticData::new(SyntheticConfig {
            num_dense,
            table_sizes,
            generation: Generation::Teacher,
            zipf_alpha: 1.05,
            num_indices_per_lookup: 2,
            fixed_bag_size: false,
            seed: 5,
        }),
        (BATCH * 12) as u64,
        64,
    ))
}

/// Random ratings of every user and item of an MF configuration.
fn ratings(c: &FmConfig) -> Box<dyn DataSource> {
    let (users, items) = (c.table_sizes[0] as u64, c.table_sizes[1] as u64);
    let mut rng = SplitMix64::new(3);
    let mut draw = |n: u64| {
        let mut r = Ratings::default();
        for i in 0..n {
            // The first ratings name the last user and item, so the tables have their sizes.
            r.users
                .push(if i == 0 { users - 1 } else { rng.below(users) } as u32);
            r.items
                .push(if i == 0 { items - 1 } else { rng.below(items) } as u32);
            r.ratings.push(1.0 + rng.below(5) as f32);
        }
        r
    };
    let (train, test) = (draw((BATCH * 12) as u64), draw(64));
    Box::new(MovieLensSource::new(&train, &test, 1))
}

fn build(config: &ModelConfig, optimizer: OptimizerKind) -> Box<dyn Model> {
    let mut m = config
        .build(optimizer, SEED, TableSource::Init(&StorageKind::Anon))
        .unwrap();
    m.reserve(BATCH);
    m
}

/// Steps `first .. first + n` of one epoch of the data; returns each step's loss.
fn steps(m: &mut dyn Model, data: &dyn DataSource, first: usize, n: usize) -> Vec<u64> {
    let mut batch = Batch::default();
    (first..first + n)
        .map(|s| {
            data.fill_train((s * BATCH) as u64, BATCH, &mut batch)
                .unwrap();
            m.train_step(&batch.view(), 0.05, &mut PhaseTimer::default())
                .unwrap()
                .to_bits()
        })
        .collect()
}

/// Every tensor's name, shape, kind and the bits of its values and optimizer state.
type Snapshot = Vec<(String, Vec<usize>, bool, Vec<u32>, Vec<u32>)>;

fn snapshot(m: &dyn Model) -> Snapshot {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    tensors(m)
        .into_iter()
        .map(|(name, shape, t)| {
            let table = matches!(t.kind, TensorKind::Table { .. });
            (name, shape, table, bits(&t.values()), bits(t.state))
        })
        .collect()
}

fn predictions(m: &mut dyn Model, data: &dyn DataSource) -> Vec<u32> {
    let mut batch = Batch::default();
    data.fill_test(0, 64, &mut batch).unwrap();
    m.reserve_inference(64);
    let mut out = Vec::new();
    m.predict(&batch.view(), &mut out).unwrap();
    out.iter().map(|x| x.to_bits()).collect()
}

fn state_at(step: u64) -> TrainState {
    TrainState {
        step,
        epoch: 0,
        batch_in_epoch: step,
        epoch_shuffle_state: 0,
        lr: LrSchedule::constant(0.05),
        batch_size: BATCH,
        seed: SEED,
        run_id: "model-parameters".into(),
    }
}

fn save(m: &dyn Model, dir: &Path, step: u64) -> PathBuf {
    checkpoint::save(dir, m, &state_at(step), None, 2, &Cancel::never()).unwrap()
}

const OPTIMIZERS: [OptimizerKind; 3] = [
    OptimizerKind::Sgd,
    OptimizerKind::Adagrad,
    OptimizerKind::RowwiseAdagrad,
];

#[test]
fn every_model_resumes_bit_identically_from_a_checkpoint() {
    let (n, m) = (5, 4);
    for config in configs() {
        let data = data(&config);
        for optimizer in OPTIMIZERS {
            let what = format!("{} {optimizer:?}", config.kind().name());
            let mut straight = build(&config, optimizer);
            let straight_losses = steps(straight.as_mut(), data.as_ref(), 0, n + m);

            let dir = Scratch::new(&format!("resume-{}-{optimizer:?}", config.kind().name()));
            let mut first = build(&config, optimizer);
            let losses = steps(first.as_mut(), data.as_ref(), 0, n);
            let version = save(first.as_ref(), &dir.0, n as u64);
            let saved = snapshot(first.as_ref());
            drop(first);
            for storage in [
                StorageKind::Anon,
                StorageKind::File {
                    dir: dir.0.join("tables"),
                    lazy_init: false,
                },
            ] {
                if let StorageKind::File { dir, .. } = &storage {
                    std::fs::create_dir_all(dir).unwrap();
                }
                let (mut resumed, meta) =
                    checkpoint::load_model(&version, &storage, LoadOptions::default()).unwrap();
                assert_eq!(meta.model, config.kind().name(), "{what}");
                assert_eq!(resumed.config(), config, "{what}");
                assert_eq!(resumed.optimizer(), optimizer, "{what}");
                assert!(snapshot(resumed.as_ref()) == saved, "{what}: load differs");
                resumed.reserve(BATCH);
                let mut all = losses.clone();
                all.extend(steps(resumed.as_mut(), data.as_ref(), n, m));
                assert_eq!(all, straight_losses, "{what}: losses differ");
                assert!(
                    snapshot(resumed.as_ref()) == snapshot(straight.as_ref()),
                    "{what} ({storage:?}): resumed parameters or optimizer state differ"
                );
            }
        }
    }
}

#[test]
fn every_model_exports_and_imports_back_to_the_same_predictions() {
    for config in configs() {
        let data = data(&config);
        for optimizer in [OptimizerKind::Sgd, OptimizerKind::Adagrad] {
            let what = format!("{} {optimizer:?}", config.kind().name());
            let dir = Scratch::new(&format!("export-{}-{optimizer:?}", config.kind().name()));
            let mut model = build(&config, optimizer);
            steps(model.as_mut(), data.as_ref(), 0, 3);
            let path = dir.0.join("model.safetensors");
            export_safetensors(model.as_mut(), &path, &Cancel::never()).unwrap();
            let mut imported = import_model(
                &path,
                optimizer,
                &StorageKind::Anon,
                SEED,
                ImportOptions::default(),
            )
            .unwrap();
            assert_eq!(imported.config(), config, "{what}");
            let values = |s: Snapshot| -> Vec<_> {
                s.into_iter()
                    .map(|(name, shape, table, v, _)| (name, shape, table, v))
                    .collect()
            };
            assert!(
                values(snapshot(imported.as_ref())) == values(snapshot(model.as_ref())),
                "{what}: imported parameters differ"
            );
            assert_eq!(
                predictions(imported.as_mut(), data.as_ref()),
                predictions(model.as_mut(), data.as_ref()),
                "{what}: imported predictions differ"
            );
        }
    }
}

/// The visitor's dense tensors are those the configuration describes before any model is
/// built (what a load checks files against), and every name is unique.
#[test]
fn every_model_visits_the_dense_tensors_its_configuration_describes() {
    for config in configs() {
        let model = build(&config, OptimizerKind::Adagrad);
        let all = tensors(model.as_ref());
        let dense: Vec<(String, Vec<usize>)> = all
            .iter()
            .filter(|(_, _, t)| matches!(t.kind, TensorKind::Dense))
            .map(|(n, s, t)| {
                assert_eq!(t.values().len(), s.iter().product::<usize>(), "{n}");
                assert_eq!(t.state.len(), t.values().len(), "{n}: Adagrad state");
                (n.clone(), s.clone())
            })
            .collect();
        assert_eq!(dense, config.dense_shapes(), "{}", config.kind().name());
        let mut names: Vec<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            all.len(),
            "{}: duplicate names",
            config.kind().name()
        );
    }
}

/// A checkpoint's dense file that disagrees with its meta is refused naming the file, the
/// tensor and both shapes, for any model.
#[test]
fn a_dense_tensor_of_the_wrong_shape_is_refused_on_load() {
    let config = configs().remove(1);
    let dir = Scratch::new("shape");
    let model = build(&config, OptimizerKind::Sgd);
    let version = save(model.as_ref(), &dir.0, 0);
    let meta_path = version.join("meta.json");
    let text = std::fs::read_to_string(&meta_path).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["model_config"]["dcn"]["cross_layers"] = serde_json::json!(3);
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let err = checkpoint::load_model(&version, &StorageKind::Anon, LoadOptions::default())
        .err()
        .expect("a load of a mismatched checkpoint")
        .to_string();
    for needle in ["dense.safetensors", "cross_l.weight", "[3, 17]", "[2, 17]"] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
}

fn dlrm_cli(args: &[&str]) -> std::process::Output {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(args)
        .output()
        .expect("run dlrm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    o
}

fn cli_ok(args: &[&str]) {
    let o = dlrm_cli(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `dlrm train --save-model` then `--load-model` continues every model kind exactly where it
/// stopped (the checkpoint of one run equals that of two), and `dlrm export`, `import` and
/// `export` again give the same bytes.
#[test]
fn every_model_saves_resumes_and_exports_from_the_command_line() {
    let dir = Scratch::new("cli");
    let arg = |name: &str| dir.0.join(name).to_str().unwrap().to_string();
    let ratings = |n: usize, k: usize| -> String {
        (0..n)
            .map(|i| {
                let (u, it) = ((i * 7 + k) % 30 + 1, (i * 3 + k) % 20 + 1);
                format!("{u}\t{it}\t{}\t88125{i:04}\n", (u + it) % 5 + 1)
            })
            .collect()
    };
    std::fs::write(dir.0.join("r.base"), ratings(300, 0)).unwrap();
    std::fs::write(dir.0.join("r.test"), ratings(50, 1)).unwrap();
    let (train, test) = (arg("r.base"), arg("r.test"));
    for model in ["dcn", "dcn-v2", "fm", "mf"] {
        let mut base = vec!["train", "--model", model, "--threads", "2"];
        if model == "mf" {
            base.extend([
                "--train",
                &train,
                "--test",
                &test,
                "--mini-batch-size",
                "64",
            ]);
        } else {
            base.extend([
                "--num-batches",
                "4",
                "--mini-batch-size",
                "64",
                "--test-data-size",
                "256",
                "--cross-layers",
                "2",
                "--arch-mlp-deep",
                "16-8",
            ]);
        }
        base.extend(["--optimizer", "adagrad"]);
        let (straight, half) = (
            arg(&format!("{model}-straight")),
            arg(&format!("{model}-half")),
        );
        cli_ok(
            &[
                base.clone(),
                vec!["--nepochs", "2", "--save-model", &straight],
            ]
            .concat(),
        );
        cli_ok(&[base.clone(), vec!["--nepochs", "1", "--save-model", &half]].concat());
        cli_ok(
            &[
                base,
                vec![
                    "--nepochs",
                    "2",
                    "--load-model",
                    &half,
                    "--save-model",
                    &half,
                ],
            ]
            .concat(),
        );

        let (a, b) = (arg(&format!("{model}-a.st")), arg(&format!("{model}-b.st")));
        cli_ok(&["export", "--load-model", &straight, "--out", &a]);
        cli_ok(&["export", "--load-model", &half, "--out", &b]);
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{model}: the resumed run's parameters differ from the straight run's"
        );
        let imported = arg(&format!("{model}-imported"));
        cli_ok(&["import", "--in", &a, "--save-model", &imported]);
        let c = arg(&format!("{model}-c.st"));
        cli_ok(&["export", "--load-model", &imported, "--out", &c]);
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&c).unwrap(),
            "{model}: export, import, export changed the parameters"
        );
    }
}

/// A model other than DLRM trained on a Criteo dataset serves: `dlrm eval` scores the dataset
/// and `dlrm predict` the raw rows, through the checkpoint's encoding.
#[test]
fn every_model_trained_on_a_dataset_evaluates_and_predicts_from_its_checkpoint() {
    let dir = Scratch::new("serve");
    let arg = |name: &str| dir.0.join(name).to_str().unwrap().to_string();
    let (tsv, ds) = (arg("rows.tsv"), arg("ds"));
    let sizes = vec!["20"; 26].join("-");
    cli_ok(&[
        "synth",
        "--rows",
        "300",
        "--arch-embedding-size",
        &sizes,
        "--out",
        &tsv,
    ]);
    cli_ok(&["preprocess", &tsv, "--out", &ds]);
    for model in ["dcn", "dcn-v2", "fm"] {
        let ck = arg(&format!("{model}-ck"));
        cli_ok(&[
            "train",
            "--model",
            model,
            "--dataset",
            &ds,
            "--arch-mlp-bot",
            "13-16",
            "--arch-mlp-top",
            "8-1",
            "--cross-layers",
            "1",
            "--arch-mlp-deep",
            "8",
            "--num-batches",
            "3",
            "--mini-batch-size",
            "32",
            "--threads",
            "2",
            "--save-model",
            &ck,
        ]);
        let o = dlrm_cli(&[
            "eval",
            "--load-model",
            &ck,
            "--dataset",
            &ds,
            "--threads",
            "2",
        ]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && out.contains("AUC"), "{model}: {out}");
        let probs = arg(&format!("{model}.probs"));
        cli_ok(&[
            "predict",
            "--load-model",
            &ck,
            "--criteo",
            &tsv,
            "--out",
            &probs,
            "--threads",
            "2",
        ]);
        let lines = std::fs::read_to_string(&probs).unwrap();
        assert_eq!(lines.lines().count(), 300, "{model}");
        assert!(
            lines
                .lines()
                .all(|l| l.parse::<f32>().is_ok_and(|p| (0.0..=1.0).contains(&p))),
            "{model}: {lines}"
        );
    }
}

/// Runs `args`, expecting exit code 1 and an error naming every needle, never a panic.
fn cli_fails(args: &[&str], needles: &[&str]) {
    let o = dlrm_cli(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr should name {n}: {err}");
    }
}

/// A checkpoint or export of one model is refused, before any training, where the command
/// line asks for something else: another kind, another optimizer, other tables, DLRM-only
/// flags.
#[test]
fn a_model_checkpoint_that_does_not_fit_the_command_line_is_refused() {
    let dir = Scratch::new("refuse");
    let arg = |name: &str| dir.0.join(name).to_str().unwrap().to_string();
    let ck = arg("ck");
    let train = |model: &str, optimizer: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec!["train", "--model", model, "--optimizer", optimizer];
        v.extend([
            "--num-batches",
            "2",
            "--mini-batch-size",
            "32",
            "--test-data-size",
            "64",
            "--cross-layers",
            "1",
            "--arch-mlp-deep",
            "8",
            "--threads",
            "2",
        ]);
        v.extend(extra);
        v.into_iter().map(String::from).collect()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    cli_ok(&strs(&train("dcn", "adagrad", &["--save-model", &ck])));
    let resume = ["--nepochs", "2", "--load-model", &ck];
    cli_fails(
        &strs(&train("fm", "adagrad", &resume)),
        &["--load-model", "holds a dcn model", "--model dcn"],
    );
    cli_fails(
        &strs(&train("dcn", "sgd", &resume)),
        &["--load-model", "--optimizer Sgd", "Adagrad"],
    );
    let other_tables = [&resume[..], &["--arch-embedding-size", "7-8-9"]].concat();
    cli_fails(
        &strs(&train("dcn", "adagrad", &other_tables)),
        &["--load-model", "tables", "7-8-9"],
    );
    // An MF checkpoint of other rating files: the users and items differ.
    let ratings = |users: usize| -> String {
        (0..200)
            .map(|i| format!("{}\t{}\t3\t881250949\n", i % users + 1, i % 17 + 1))
            .collect()
    };
    for (name, users) in [("a.base", 20), ("b.base", 25)] {
        std::fs::write(dir.0.join(name), ratings(users)).unwrap();
    }
    let mf = |base: &str, extra: &[&str]| -> Vec<String> {
        let (base, test) = (arg(base), arg("a.base"));
        let mut v = vec!["train", "--model", "mf", "--train", &base, "--test", &test];
        v.extend(extra);
        v.into_iter().map(String::from).collect()
    };
    let mf_ck = arg("mf-ck");
    cli_ok(&strs(&mf("a.base", &["--save-model", &mf_ck])));
    cli_fails(
        &strs(&mf("b.base", &["--nepochs", "2", "--load-model", &mf_ck])),
        &["--load-model", "factorizes 21 users x 18 items", "26 x 18"],
    );
    let export = arg("dcn.safetensors");
    cli_ok(&["export", "--load-model", &ck, "--out", &export]);
    cli_fails(
        &[
            "import",
            "--in",
            &export,
            "--save-model",
            &arg("imported"),
            "--arch-interaction-op",
            "dot",
        ],
        &["--arch-interaction-op", "dcn.safetensors", "dcn"],
    );
    assert!(!dir.0.join("imported").exists());
}
