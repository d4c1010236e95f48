//! Model input and output guards: lazily initialised tables read as their real values
//! everywhere, non-finite parameters and malformed checkpoints are clear errors, import reads
//! the architecture instead of guessing it and can attach a dataset's encoding, export is
//! byte-reproducible, and models that cannot be saved are refused before training.

use dlrm::checkpoint;
use dlrm::model::embedding::EmbeddingTable;
use dlrm::storage::StorageKind;
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;
use support::{Scratch, dlrm, stderr};

/// Runs `dlrm args` and asserts success.
fn ok(args: &[&str]) -> Output {
    let o = dlrm(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

/// Runs `dlrm args` and asserts a clean failure (exit 1, no panic) whose message contains
/// every one of `needles`.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let o = dlrm(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?} should exit 1: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr should name {n}: {err}");
    }
    err
}

const SMALL_RUN: [&str; 8] = [
    "--num-batches",
    "4",
    "--mini-batch-size",
    "64",
    "--test-data-size",
    "256",
    "--threads",
    "2",
];

/// Trains a short synthetic tiny-preset run into the checkpoint folder `ck`.
fn train_small(ck: &str, extra: &[&str]) {
    let mut args = vec!["train"];
    args.extend(SMALL_RUN);
    args.extend(["--save-model", ck]);
    args.extend(extra);
    ok(&args);
}

/// Tensors as (name, shape, values).
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The tensors of a safetensors file, sorted by name, and its metadata.
fn read_tensors(path: &str) -> (Tensors, Option<HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n.to_string(), t.shape().to_vec(), v)
        })
        .collect();
    (tensors, meta.metadata().clone())
}

/// Writes tensors (and metadata) as a safetensors file.
fn write_tensors(path: &str, tensors: &Tensors, meta: Option<HashMap<String, String>>) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

/// The version folder `LATEST` of `ck` names.
fn version(ck: &str) -> PathBuf {
    checkpoint::resolve(Path::new(ck)).unwrap()
}

/// The metrics line of `dlrm eval` without its throughput.
fn metrics(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.contains("AUC")).unwrap_or_default();
    line.split(" (").next().unwrap().to_string()
}

/// Writes `rows` synthetic Criteo rows with `table_rows` ids per feature as `{name}.tsv`
/// and preprocesses them into the dataset folder `name`.
fn make_dataset(dir: &Scratch, name: &str, rows: &str, table_rows: &str) {
    let tsv = dir.arg(&format!("{name}.tsv"));
    let sizes = vec![table_rows; 26].join("-");
    ok(&[
        "synth",
        "--rows",
        rows,
        "--arch-embedding-size",
        &sizes,
        "--out",
        &tsv,
    ]);
    ok(&["preprocess", &tsv, "--out", &dir.arg(name)]);
}

/// Trains a few steps on the dataset `ds` into the checkpoint folder `ck`.
fn train_on_dataset(dir: &Scratch, ds: &str, ck: &str, extra: &[&str]) {
    let (ds, ck) = (dir.arg(ds), dir.arg(ck));
    let mut args = vec![
        "train",
        "--dataset",
        &ds,
        "--arch-mlp-bot",
        "13-16",
        "--arch-mlp-top",
        "8-1",
        "--num-batches",
        "3",
        "--mini-batch-size",
        "32",
        "--threads",
        "2",
        "--save-model",
        &ck,
    ];
    args.extend(extra);
    ok(&args);
}

/// `dlrm predict` of checkpoint `ck` on the raw rows `rows`: the output file's text.
fn predict(dir: &Scratch, ck: &str, rows: &str) -> String {
    let out = dir.arg(&format!("{ck}.probs"));
    ok(&[
        "predict",
        "--load-model",
        &dir.arg(ck),
        "--criteo",
        &dir.arg(rows),
        "--out",
        &out,
        "--threads",
        "2",
    ]);
    std::fs::read_to_string(out).unwrap()
}

#[test]
fn lazy_tables_read_as_initialised_in_export_eval_and_predict() {
    let dir = Scratch::new("lazy");
    make_dataset(&dir, "ds", "3000", "300");
    for (ck, lazy) in [("lazy", true), ("eager", false)] {
        let tables = dir.arg(&format!("{ck}-tables"));
        std::fs::create_dir(&tables).unwrap();
        let mut extra = vec!["--embedding-storage", "file", "--tables-dir", &tables];
        if lazy {
            extra.push("--lazy-init");
        }
        train_on_dataset(&dir, "ds", ck, &extra);
    }

    // The lazy checkpoint really has rows that were never touched (else this proves nothing).
    let v = version(&dir.arg("lazy"));
    let meta = checkpoint::read_meta(&v).unwrap();
    let cfg = checkpoint::read_dlrm_config(&v, &meta).unwrap();
    let table = EmbeddingTable::load(
        &v.join("table_000.emb"),
        0,
        cfg.arch.table_sizes[0],
        cfg.arch.embedding_dim,
        &StorageKind::File {
            dir: v.clone(),
            lazy_init: false,
        },
    )
    .unwrap();
    assert!(table.pending_rows() > 0);

    // Export: identical bytes, untouched rows included.
    for ck in ["lazy", "eager"] {
        ok(&[
            "export",
            "--load-model",
            &dir.arg(ck),
            "--out",
            &dir.arg(&format!("{ck}.safetensors")),
        ]);
    }
    let (lazy, _) = read_tensors(&dir.arg("lazy.safetensors"));
    let (eager, _) = read_tensors(&dir.arg("eager.safetensors"));
    for ((n, _, a), (_, _, b)) in lazy.iter().zip(&eager) {
        let zero_rows = |v: &[f32]| v.chunks(16).filter(|r| r.iter().all(|&x| x == 0.0)).count();
        assert_eq!(zero_rows(a), zero_rows(b), "{n}: rows exported as zeros");
        assert!(a == b, "{n} differs between the lazy and the eager export");
    }
    assert_eq!(
        std::fs::read(dir.arg("lazy.safetensors")).unwrap(),
        std::fs::read(dir.arg("eager.safetensors")).unwrap()
    );

    // Eval and predict of the lazy checkpoint equal those of the eager one.
    let eval = |ck: &str| {
        metrics(&ok(&[
            "eval",
            "--load-model",
            &dir.arg(ck),
            "--dataset",
            &dir.arg("ds"),
            "--threads",
            "2",
        ]))
    };
    assert_eq!(eval("lazy"), eval("eager"));
    let probs = predict(&dir, "lazy", "ds.tsv");
    assert_eq!(probs.lines().count(), 3000);
    assert_eq!(probs, predict(&dir, "eager", "ds.tsv"));
}

#[test]
fn import_with_a_dataset_predicts_raw_rows_as_the_original() {
    let dir = Scratch::new("import-ds");
    make_dataset(&dir, "ds", "2000", "300");
    train_on_dataset(&dir, "ds", "ck", &[]);
    let exported = dir.arg("ck.safetensors");
    ok(&["export", "--load-model", &dir.arg("ck"), "--out", &exported]);
    ok(&[
        "import",
        "--in",
        &exported,
        "--save-model",
        &dir.arg("imported"),
        "--dataset",
        &dir.arg("ds"),
    ]);
    let probs = predict(&dir, "ck", "ds.tsv");
    assert_eq!(probs.lines().count(), 2000);
    assert_eq!(predict(&dir, "imported", "ds.tsv"), probs);
    // The encoding files are those a checkpoint saved by `train --dataset` carries.
    let files = |ck: &str| {
        let d = version(&dir.arg(ck)).join(checkpoint::DATASET_DIR);
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(files("imported"), files("ck"));

    // Without --dataset, the imported model has no encoding for raw rows.
    ok(&[
        "import",
        "--in",
        &exported,
        "--save-model",
        &dir.arg("bare"),
    ]);
    fails(
        &[
            "predict",
            "--load-model",
            &dir.arg("bare"),
            "--criteo",
            &dir.arg("ds.tsv"),
            "--out",
            &dir.arg("bare.probs"),
        ],
        &["not trained on a Criteo dataset"],
    );
    // A dataset whose tables differ from the file's is refused, naming both.
    make_dataset(&dir, "other", "1000", "200");
    fails(
        &[
            "import",
            "--in",
            &exported,
            "--save-model",
            &dir.arg("mismatch"),
            "--dataset",
            &dir.arg("other"),
        ],
        &["--dataset", "table sizes"],
    );
    assert!(
        !dir.0.join("mismatch").exists(),
        "a refused import wrote a checkpoint"
    );
}

#[test]
fn non_finite_parameters_are_refused_on_load_and_import() {
    let dir = Scratch::new("nan");
    let ck = dir.arg("ck");
    train_small(&ck, &[]);
    ok(&[
        "export",
        "--load-model",
        &ck,
        "--out",
        &dir.arg("good.safetensors"),
    ]);

    // A NaN in a table file: row 5, column 3 of table 2 (d = 16).
    let v = version(&ck);
    let table = v.join("table_002.emb");
    let mut bytes = std::fs::read(&table).unwrap();
    let at = 4096 + (5 * 16 + 3) * 4;
    let original: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&table, &bytes).unwrap();
    let needles = [
        "table_002.emb",
        "emb_l.2.weight",
        "[5, 3]",
        "--allow-non-finite",
    ];
    let out = dir.arg("x.safetensors");
    fails(&["export", "--load-model", &ck, "--out", &out], &needles);
    assert!(!Path::new(&out).exists());
    fails(
        &[
            "eval",
            "--load-model",
            &ck,
            "--criteo",
            &dir.arg("none.tsv"),
        ],
        &needles,
    );
    fails(
        &[
            "predict",
            "--load-model",
            &ck,
            "--criteo",
            &dir.arg("none.tsv"),
            "--out",
            &dir.arg("p.txt"),
        ],
        &needles,
    );
    let mut resume = vec!["train"];
    resume.extend(SMALL_RUN);
    resume.extend(["--load-model", &ck]);
    fails(&resume, &needles);
    ok(&[
        "export",
        "--load-model",
        &ck,
        "--out",
        &out,
        "--allow-non-finite",
    ]);

    // An infinite dense weight in a checkpoint: bot_l.2.weight [1, 4].
    bytes[at..at + 4].copy_from_slice(&original);
    std::fs::write(&table, &bytes).unwrap();
    let dense = v.join("dense.safetensors");
    let (mut tensors, meta) = read_tensors(dense.to_str().unwrap());
    let (_, shape, values) = tensors
        .iter_mut()
        .find(|(n, _, _)| n == "bot_l.2.weight")
        .unwrap();
    values[shape[1] + 4] = f32::INFINITY;
    write_tensors(dense.to_str().unwrap(), &tensors, meta);
    fails(
        &["export", "--load-model", &ck, "--out", &out, "--force"],
        &["dense.safetensors", "bot_l.2.weight", "[1, 4]", "inf"],
    );

    // Import: a NaN in a PyTorch file.
    let (mut tensors, meta) = read_tensors(&dir.arg("good.safetensors"));
    let (_, _, values) = tensors
        .iter_mut()
        .find(|(n, _, _)| n == "top_l.0.bias")
        .unwrap();
    values[7] = f32::NAN;
    write_tensors(&dir.arg("nan.safetensors"), &tensors, meta);
    let import = |extra: &[&str]| {
        let mut args = vec![
            "import".to_string(),
            "--in".into(),
            dir.arg("nan.safetensors"),
            "--save-model".into(),
            dir.arg("imported"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let args = import(&[]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            "nan.safetensors",
            "top_l.0.bias",
            "[7]",
            "--allow-non-finite",
        ],
    );
    assert!(!dir.0.join("imported").exists());
    let args = import(&["--allow-non-finite"]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Rewrites `ck`'s meta.json through `edit`.
fn edit_meta(ck: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = version(ck).join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut meta["model_config"]["arch"]);
    std::fs::write(&path, serde_json::to_string_pretty(&meta).unwrap()).unwrap();
}

#[test]
fn a_checkpoint_architecture_is_checked_on_load() {
    let dir = Scratch::new("meta");
    let ck = dir.arg("ck");
    train_small(&ck, &[]);
    let original = std::fs::read(version(&ck).join("meta.json")).unwrap();
    type ArchEdit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(ArchEdit, Vec<&str>)> = vec![
        (
            Box::new(|a| a["bottom"] = serde_json::json!([16])),
            vec!["meta.json", "--arch-mlp-bot"],
        ),
        (
            Box::new(|a| a["table_sizes"] = serde_json::json!([])),
            vec!["meta.json", "--arch-embedding-size", "empty"],
        ),
        (
            Box::new(|a| a["table_sizes"][1] = serde_json::json!(0)),
            vec!["meta.json", "--arch-embedding-size", "item 2 is 0"],
        ),
        (
            Box::new(|a| a["top"] = serde_json::json!([])),
            vec!["meta.json", "--arch-mlp-top"],
        ),
        (
            Box::new(|a| a["top"][0] = serde_json::json!(99)),
            vec!["meta.json", "--arch-mlp-top", "99"],
        ),
        // Valid architectures that do not match the files.
        (
            Box::new(|a| a["table_sizes"][0] = serde_json::json!(101)),
            vec!["table_000.emb", "101 x 16"],
        ),
        (
            Box::new(|a| a["bottom"] = serde_json::json!([13, 32, 16])),
            vec!["dense.safetensors", "bot_l.0.weight", "[32, 13]"],
        ),
        // A width no memory holds: an error before any layer is allocated.
        (
            Box::new(|a| a["bottom"] = serde_json::json!([13, 4_000_000_000_000u64, 16])),
            vec!["dense.safetensors", "bot_l.0.weight", "[4000000000000, 13]"],
        ),
    ];
    for (edit, needles) in cases {
        std::fs::write(version(&ck).join("meta.json"), &original).unwrap();
        edit_meta(&ck, edit);
        let out = dir.arg("out.safetensors");
        fails(&["export", "--load-model", &ck, "--out", &out], &needles);
        assert!(!Path::new(&out).exists());
        fails(
            &[
                "eval",
                "--load-model",
                &ck,
                "--criteo",
                &dir.arg("none.tsv"),
            ],
            &needles,
        );
        let mut resume = vec!["train"];
        resume.extend(SMALL_RUN);
        resume.extend(["--load-model", &ck]);
        fails(&resume, &needles);
    }
}

#[test]
fn import_reads_the_interaction_from_the_file_and_refuses_to_guess() {
    let dir = Scratch::new("import");
    // 3 tables, d = 2: cat gives 4 x 2 = 8 inputs, dot 2 + 6 = 8 too.
    let ck = dir.arg("cat");
    train_small(
        &ck,
        &[
            "--arch-embedding-size",
            "10-20-30",
            "--arch-sparse-feature-size",
            "2",
            "--arch-mlp-bot",
            "13-2",
            "--arch-mlp-top",
            "4-1",
            "--arch-interaction-op",
            "cat",
        ],
    );
    let exported = dir.arg("cat.safetensors");
    ok(&["export", "--load-model", &ck, "--out", &exported]);
    let (tensors, meta) = read_tensors(&exported);
    assert_eq!(meta.as_ref().unwrap()["arch_interaction_op"], "cat");

    // Its own export comes back as cat.
    ok(&[
        "import",
        "--in",
        &exported,
        "--save-model",
        &dir.arg("back"),
    ]);
    let v = version(&dir.arg("back"));
    let cfg = checkpoint::read_dlrm_config(&v, &checkpoint::read_meta(&v).unwrap()).unwrap();
    assert_eq!(
        cfg.arch.interaction,
        dlrm::model::architecture::InteractionOp::Cat
    );

    // Without metadata the file is ambiguous: refused, unless the flags say which.
    let bare = dir.arg("bare.safetensors");
    write_tensors(&bare, &tensors, None);
    fails(
        &["import", "--in", &bare, "--save-model", &dir.arg("guess")],
        &["bare.safetensors", "--arch-interaction-op"],
    );
    assert!(!dir.0.join("guess").exists());
    ok(&[
        "import",
        "--in",
        &bare,
        "--save-model",
        &dir.arg("stated"),
        "--arch-interaction-op",
        "cat",
    ]);
    ok(&[
        "export",
        "--load-model",
        &dir.arg("stated"),
        "--out",
        &dir.arg("stated.safetensors"),
    ]);
    assert_eq!(
        std::fs::read(&exported).unwrap(),
        std::fs::read(dir.arg("stated.safetensors")).unwrap()
    );
    // A flag that contradicts the metadata is refused.
    fails(
        &[
            "import",
            "--in",
            &exported,
            "--save-model",
            &dir.arg("contradiction"),
            "--arch-interaction-op",
            "dot",
        ],
        &["--arch-interaction-op", "cat"],
    );
    // A width no stated interaction gives.
    fails(
        &[
            "import",
            "--in",
            &bare,
            "--save-model",
            &dir.arg("selfdot"),
            "--arch-interaction-op",
            "dot",
            "--arch-interaction-itself",
        ],
        &["bare.safetensors", "8 inputs"],
    );

    // Unknown tensors are refused unless --ignore-unknown.
    let mut extra = tensors.clone();
    extra.push(("v_W_l.0".into(), vec![2], vec![0.5, 0.25]));
    let unknown = dir.arg("unknown.safetensors");
    write_tensors(&unknown, &extra, meta);
    fails(
        &["import", "--in", &unknown, "--save-model", &dir.arg("u")],
        &["unknown.safetensors", "v_W_l.0", "--ignore-unknown"],
    );
    assert!(!dir.0.join("u").exists());
    ok(&[
        "import",
        "--in",
        &unknown,
        "--save-model",
        &dir.arg("u"),
        "--ignore-unknown",
    ]);
}

#[test]
fn export_is_byte_reproducible_and_honours_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("export");
    let ck = dir.arg("ck");
    train_small(&ck, &[]);
    let export = |out: &str, umask: &str| {
        let o = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "umask {umask}; exec \"$0\" export --load-model \"$1\" --out \"$2\" --force"
                ),
                env!("CARGO_BIN_EXE_dlrm"),
                &ck,
                out,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::metadata(out).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(export(&dir.arg("a.safetensors"), "022"), 0o644);
    assert_eq!(export(&dir.arg("b.safetensors"), "002"), 0o664);
    for _ in 0..3 {
        export(&dir.arg("c.safetensors"), "022");
        assert_eq!(
            std::fs::read(dir.arg("a.safetensors")).unwrap(),
            std::fs::read(dir.arg("c.safetensors")).unwrap(),
            "two exports of one checkpoint differ"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".partial"))
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
}

#[test]
fn a_checkpoint_of_another_model_kind_is_refused_before_training() {
    let dir = Scratch::new("models");
    let ck = dir.arg("ck");
    train_small(&ck, &[]);
    for model in ["dcn", "dcn-v2", "fm"] {
        let mut args = vec!["train", "--model", model];
        args.extend(SMALL_RUN);
        let load = [args, vec!["--load-model", &ck]].concat();
        fails(
            &load,
            &["--load-model", "holds a dlrm model", "--model dlrm"],
        );
    }
}
