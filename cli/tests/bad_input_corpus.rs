//! The CLI over a corpus of bad input: every case must end with exit code 1 (a library error)
//! or 2 (a usage error clap reports), name what is wrong, and never panic or abort (exit code
//! 101, a signal, or "panicked" in stderr), nor run on as if the input were fine. Hostile
//! files are made by damaging copies of a good checkpoint and dataset, so each case breaks
//! exactly one thing.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{Scratch, latest};

/// Longest a bad input may take to be refused: a case that runs longer is a failure (it was
/// accepted and started working), not a hang of the test.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `dlrm args` to completion or [`CASE_TIMEOUT`], stderr into `stderr_file`: the exit
/// code (None when killed by a signal or the timeout) and the stderr text.
fn dlrm(args: &[String], stderr_file: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(args)
        .env_remove("DLRM_CRASH_AT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(stderr_file).unwrap())
        .spawn()
        .expect("run dlrm");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > CASE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = fs::read_to_string(stderr_file).unwrap_or_default();
    (status.and_then(|s| s.code()), err)
}

fn ok(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(args)
        .output()
        .expect("run dlrm");
    assert!(
        o.status.success(),
        "setup {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// A change to a meta.json.
type MetaEdit = Box<dyn Fn(&mut serde_json::Value)>;

/// A copy of checkpoint `ck` named `name` whose meta.json has `edit` applied.
fn with_meta(s: &Scratch, ck: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let to = s.path(name);
    copy_dir(ck, &to);
    let meta_path = latest(&to).join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&meta_path).unwrap()).unwrap();
    edit(&mut meta);
    fs::write(&meta_path, serde_json::to_string(&meta).unwrap()).unwrap();
    to.to_str().unwrap().to_string()
}

/// A copy of `dir` named `name` with `file` (relative) replaced by `bytes`, or removed.
fn with_file(s: &Scratch, dir: &Path, name: &str, file: &str, bytes: Option<&[u8]>) -> String {
    let to = s.path(name);
    copy_dir(dir, &to);
    let target = if to.join("LATEST").is_file() {
        latest(&to).join(file)
    } else {
        to.join(file)
    };
    match bytes {
        Some(b) => fs::write(&target, b).unwrap(),
        None => fs::remove_file(&target).unwrap(),
    }
    to.to_str().unwrap().to_string()
}

/// Checks one invocation: exit code 1 or 2, no panic, no abort, and `needle` (when given) in
/// stderr. Returns a line describing the failure, if any.
fn check(args: &[String], needle: Option<&str>, stderr_file: &Path) -> Option<String> {
    let (code, err) = dlrm(args, stderr_file);
    let clean = matches!(code, Some(1 | 2)) && !err.contains("panicked");
    let named = needle.is_none_or(|n| err.contains(n));
    (!clean || !named).then(|| {
        format!(
            "{args:?}: exit {code:?}, wanted 1 or 2{}; stderr: {}",
            needle.map_or(String::new(), |n| format!(" naming {n:?}")),
            err.trim()
        )
    })
}

/// `args` as owned strings, the first being the subcommand.
fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A safetensors file: an 8-byte little-endian header length, the JSON header, the data.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn every_bad_input_is_a_clear_error_never_a_panic() {
    let s = Scratch::new("corpus");
    // The good inputs every case damages one thing of: raw rows, a dataset made from them, a
    // checkpoint trained on it, its export, and a checkpoint of synthetic data.
    ok(&[
        "synth",
        "--rows",
        "600",
        "--out",
        &s.arg("raw.tsv"),
        "--threads",
        "2",
    ]);
    ok(&[
        "preprocess",
        &s.arg("raw.tsv"),
        "--out",
        &s.arg("ds"),
        "--threads",
        "2",
    ]);
    let small = [
        "--mini-batch-size",
        "64",
        "--num-batches",
        "4",
        "--arch-mlp-bot",
        "13-16",
        "--arch-mlp-top",
        "8-1",
        "--threads",
        "2",
        "--print-freq=0",
    ];
    let (ds, ck) = (s.arg("ds"), s.arg("ck"));
    let mut args = vec!["train", "--dataset", &ds, "--save-model", &ck];
    args.extend_from_slice(&small);
    ok(&args);
    ok(&[
        "train",
        "--num-batches",
        "5",
        "--threads",
        "2",
        "--save-model",
        &s.arg("synth_ck"),
    ]);
    ok(&[
        "export",
        "--load-model",
        &ck,
        "--out",
        &s.arg("m.safetensors"),
    ]);
    fs::write(s.path("empty.tsv"), "").unwrap();
    fs::write(s.path("exists.txt"), "keep me\n").unwrap();
    let good_line = fs::read_to_string(s.path("raw.tsv"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let fields: Vec<&str> = good_line.split('\t').collect();
    let with_field = |i: usize, v: &str| {
        let mut f = fields.clone();
        f[i] = v;
        f.join("\t")
    };
    let bad_rows = [
        ("short.tsv", fields[..20].join("\t")),
        ("long.tsv", format!("{good_line}\textra")),
        ("nonhex.tsv", with_field(20, "zz12")),
        ("nan.tsv", with_field(3, "nan")),
        ("inf.tsv", with_field(3, "inf")),
        ("huge.tsv", with_field(3, "99999999999999999999")),
        ("label.tsv", with_field(0, "7")),
        ("binary.tsv", "\u{0}\u{1}\u{2}\u{ff}".to_string()),
    ];
    for (name, line) in &bad_rows {
        fs::write(s.path(name), format!("{good_line}\n{line}\n{good_line}\n")).unwrap();
    }
    fs::write(s.path("ratings.base"), "1\t1\t5\t0\n2\t4000000000\t3\t0\n").unwrap();
    fs::write(s.path("ratings.test"), "1\t1\t5\t0\n").unwrap();

    let mut cases: Vec<(Vec<String>, Option<&str>)> = Vec::new();
    let mut case = |args: &[&str], needle: Option<&'static str>| cases.push((argv(args), needle));

    // Flags that make no sense.
    case(&["train", "--threads", "0"], Some("--threads"));
    case(&["train", "--threads", "100000"], Some("--oversubscribe"));
    case(&["train", "--learning-rate=-0.1"], Some("--learning-rate"));
    case(
        &["train", "--learning-rate", "nan"],
        Some("--learning-rate"),
    );
    case(&["train", "--learning-rate", "x"], Some("--learning-rate"));
    case(&["train", "--nepochs", "0"], Some("--nepochs"));
    case(
        &["train", "--mini-batch-size", "18446744073709551615"],
        Some("--mini-batch-size"),
    );
    case(
        &["train", "--mini-batch-size", "18446744073709551616"],
        Some("--mini-batch-size"),
    );
    case(
        &["train", "--mini-batch-size", "1000000000000"],
        Some("bytes"),
    );
    case(
        &["train", "--arch-mlp-bot", "13-512-32"],
        Some("--arch-mlp-bot"),
    );
    case(&["train", "--arch-mlp-bot", ""], Some("--arch-mlp-bot"));
    case(
        &["train", "--arch-embedding-size", "10-0-5"],
        Some("--arch-embedding-size"),
    );
    case(
        &["train", "--arch-embedding-size", "100000000000-10"],
        Some("bytes"),
    );
    case(
        &["train", "--arch-sparse-feature-size", "0"],
        Some("--arch-sparse-feature-size"),
    );
    case(&["train", "--zipf-alpha", "nan"], Some("--zipf-alpha"));
    case(
        &["train", "--num-indices-per-lookup", "0"],
        Some("--num-indices-per-lookup"),
    );
    case(
        &["train", "--embedding-storage", "file"],
        Some("--tables-dir"),
    );
    case(&["train", "--optimizer", "lion"], Some("--optimizer"));
    case(&["train", "--no-such-flag"], Some("--no-such-flag"));
    case(
        &["train", "--model", "fm", "--load-model", &ck],
        Some("--load-model"),
    );
    case(&["compare", "--num-batches", "0"], Some("--num-batches"));
    case(&["compare", "--lr-sgd", "nan"], Some("--lr-sgd"));
    case(
        &["synth", "--rows", "10", "--out", &s.arg("raw.tsv")],
        Some("already exists"),
    );
    case(
        &[
            "synth",
            "--rows",
            "10",
            "--out",
            &s.arg("t.tsv"),
            "--arch-embedding-size",
            "1-2",
        ],
        Some("--arch-embedding-size"),
    );

    // Missing and unusable inputs.
    case(&["train", "--dataset", &s.arg("nowhere")], Some("nowhere"));
    case(
        &["train", "--criteo", &s.arg("nowhere.tsv")],
        Some("nowhere.tsv"),
    );
    case(&["train", "--criteo", &s.arg("empty.tsv")], Some("empty"));
    case(
        &["train", "--load-model", &s.arg("nowhere")],
        Some("nowhere"),
    );
    case(
        &[
            "train",
            "--model",
            "mf",
            "--train",
            &s.arg("nowhere"),
            "--test",
            &s.arg("nowhere"),
        ],
        Some("nowhere"),
    );
    case(
        &[
            "train",
            "--model",
            "mf",
            "--train",
            &s.arg("ratings.base"),
            "--test",
            &s.arg("ratings.test"),
        ],
        Some("4000000000"),
    );
    case(
        &["eval", "--load-model", &s.arg("nowhere"), "--dataset", &ds],
        Some("nowhere"),
    );
    case(
        &["eval", "--load-model", &ck, "--criteo", &s.arg("empty.tsv")],
        Some("no rows"),
    );
    case(
        &[
            "eval",
            "--load-model",
            &ck,
            "--dataset",
            &ds,
            "--mini-batch-size",
            "0",
        ],
        Some("--mini-batch-size"),
    );
    case(
        &["eval", "--load-model", &s.arg("synth_ck"), "--dataset", &ds],
        None,
    );
    case(
        &[
            "predict",
            "--load-model",
            &s.arg("synth_ck"),
            "--criteo",
            &s.arg("raw.tsv"),
            "--out",
            &s.arg("p.txt"),
        ],
        Some("dictionaries"),
    );
    case(
        &[
            "predict",
            "--load-model",
            &ck,
            "--criteo",
            &s.arg("raw.tsv"),
            "--out",
            &s.arg("raw.tsv"),
            "--force",
        ],
        Some("is the input"),
    );
    case(
        &[
            "predict",
            "--load-model",
            &ck,
            "--criteo",
            &s.arg("raw.tsv"),
            "--out",
            &s.arg("exists.txt"),
        ],
        Some("--force"),
    );
    case(
        &["export", "--load-model", &ck, "--out", &s.arg("exists.txt")],
        Some("already exists"),
    );
    case(
        &[
            "export",
            "--load-model",
            &s.arg("nowhere"),
            "--out",
            &s.arg("e.safetensors"),
        ],
        Some("nowhere"),
    );
    case(
        &[
            "import",
            "--in",
            &s.arg("nowhere.safetensors"),
            "--save-model",
            &s.arg("imp"),
        ],
        Some("nowhere.safetensors"),
    );
    case(
        &[
            "import",
            "--in",
            &s.arg("raw.tsv"),
            "--save-model",
            &s.arg("imp"),
        ],
        Some("raw.tsv"),
    );
    case(
        &[
            "import",
            "--in",
            &s.arg("m.safetensors"),
            "--save-model",
            &s.arg("imp"),
            "--dataset",
            &s.arg("nowhere"),
        ],
        Some("nowhere"),
    );
    case(
        &[
            "import",
            "--in",
            &s.arg("m.safetensors"),
            "--save-model",
            &s.arg("synth_ck"),
        ],
        Some("another run"),
    );
    case(
        &[
            "train",
            "--save-model",
            &s.arg("synth_ck"),
            "--num-batches",
            "2",
        ],
        Some("another run"),
    );
    case(
        &[
            "preprocess",
            &s.arg("empty.tsv"),
            "--out",
            &s.arg("d_empty"),
        ],
        Some("empty"),
    );
    case(
        &[
            "preprocess",
            &s.arg("nowhere.tsv"),
            "--out",
            &s.arg("d_none"),
        ],
        Some("nowhere.tsv"),
    );
    case(
        &["preprocess", &s.arg("raw.tsv"), "--out", &ds],
        Some("already exists"),
    );
    case(
        &[
            "preprocess",
            &s.arg("raw.tsv"),
            "--out",
            &s.arg("raw.tsv"),
            "--force",
        ],
        Some("is the input"),
    );
    case(
        &[
            "preprocess",
            &s.arg("raw.tsv"),
            "--out",
            &s.arg("d_split"),
            "--split",
            "1,x,1",
        ],
        Some("--split"),
    );
    case(
        &[
            "preprocess",
            &s.arg("raw.tsv"),
            "--out",
            &s.arg("d_hash"),
            "--max-ind-range",
            "0",
        ],
        Some("--max-ind-range"),
    );

    // Malformed raw rows: the file and line are named wherever rows are read.
    for (name, _) in &bad_rows {
        let file = s.arg(name);
        case(
            &["preprocess", &file, "--out", &s.arg(&format!("d_{name}"))],
            Some(":2"),
        );
        case(
            &[
                "predict",
                "--load-model",
                &ck,
                "--criteo",
                &file,
                "--out",
                &s.arg(&format!("p_{name}")),
            ],
            Some(":2"),
        );
        case(
            &["eval", "--load-model", &ck, "--criteo", &file],
            Some(":2"),
        );
    }

    // Damaged checkpoints: each is loaded by eval, export and train --load-model.
    let ck_path = s.path("ck");
    let version = latest(&ck_path);
    let meta_edits: Vec<(&str, MetaEdit)> = vec![
        (
            "bottom_one",
            Box::new(|m| m["model_config"]["arch"]["bottom"] = serde_json::json!([16])),
        ),
        (
            "no_tables",
            Box::new(|m| m["model_config"]["arch"]["table_sizes"] = serde_json::json!([])),
        ),
        (
            "zero_dim",
            Box::new(|m| m["model_config"]["arch"]["embedding_dim"] = serde_json::json!(0)),
        ),
        (
            "huge_table",
            Box::new(|m| {
                m["model_config"]["arch"]["table_sizes"][0] = serde_json::json!(1u64 << 50)
            }),
        ),
        (
            "wide_top",
            Box::new(|m| {
                m["model_config"]["arch"]["top"][0] = serde_json::json!(4_000_000_000_000u64)
            }),
        ),
        (
            "negative",
            Box::new(|m| m["model_config"]["arch"]["bottom"][0] = serde_json::json!(-3)),
        ),
        (
            "no_arch",
            Box::new(|m| m["model_config"] = serde_json::json!({})),
        ),
        ("format", Box::new(|m| m["format"] = serde_json::json!(99))),
        (
            "model",
            Box::new(|m| m["model"] = serde_json::json!("transformer")),
        ),
        (
            "optimizer",
            Box::new(|m| m["model_config"]["optimizer"] = serde_json::json!("lion")),
        ),
        (
            "no_state",
            Box::new(|m| m["train_state"] = serde_json::Value::Null),
        ),
        (
            "not_object",
            Box::new(|m| *m = serde_json::json!([1, 2, 3])),
        ),
    ];
    let mut damaged: Vec<String> = meta_edits
        .iter()
        .map(|(name, edit)| with_meta(&s, &ck_path, &format!("ck_meta_{name}"), edit))
        .collect();
    let table = fs::read(version.join("table_000.emb")).unwrap();
    let dense = fs::read(version.join("dense.safetensors")).unwrap();
    let mut nan_table = table.clone();
    let n = nan_table.len();
    nan_table[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    let file_edits: Vec<(&str, &str, Option<Vec<u8>>)> = vec![
        (
            "meta_garbage",
            "meta.json",
            Some(b"{\"format\": 1, \"model\": ".to_vec()),
        ),
        ("meta_binary", "meta.json", Some(vec![0xff; 64])),
        (
            "table_truncated",
            "table_000.emb",
            Some(table[..table.len() / 2].to_vec()),
        ),
        (
            "table_header_only",
            "table_000.emb",
            Some(table[..64.min(table.len())].to_vec()),
        ),
        (
            "table_random",
            "table_000.emb",
            Some((0..table.len()).map(|i| (i * 131 % 251) as u8).collect()),
        ),
        ("table_missing", "table_000.emb", None),
        ("table_nan", "table_000.emb", Some(nan_table)),
        (
            "dense_truncated",
            "dense.safetensors",
            Some(dense[..dense.len() / 2].to_vec()),
        ),
        (
            "dense_header_len",
            "dense.safetensors",
            Some(vec![0xff; 16]),
        ),
        ("dense_empty", "dense.safetensors", Some(Vec::new())),
        ("dense_missing", "dense.safetensors", None),
    ];
    for (name, file, bytes) in &file_edits {
        damaged.push(with_file(
            &s,
            &ck_path,
            &format!("ck_{name}"),
            file,
            bytes.as_deref(),
        ));
    }
    for (name, pointer) in [
        ("latest_escape", "../../../../etc\n"),
        ("latest_empty", ""),
        ("latest_missing", "ckpt-999999999999-000\n"),
    ] {
        let to = s.path(&format!("ck_{name}"));
        copy_dir(&ck_path, &to);
        fs::write(to.join("LATEST"), pointer).unwrap();
        damaged.push(to.to_str().unwrap().to_string());
    }
    let mut cases_ck: Vec<(Vec<String>, Option<&str>)> = Vec::new();
    for (i, ck) in damaged.iter().enumerate() {
        let out = s.arg(&format!("export_{i}.safetensors"));
        cases_ck.push((argv(&["eval", "--load-model", ck, "--dataset", &ds]), None));
        cases_ck.push((argv(&["export", "--load-model", ck, "--out", &out]), None));
        let mut resume = vec!["train", "--load-model", ck, "--dataset", &ds];
        resume.extend_from_slice(&small[..4]);
        cases_ck.push((argv(&resume), None));
    }

    // Damaged datasets: each is opened by train and eval.
    let ds_path = s.path("ds");
    let header: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(ds_path.join("header.json")).unwrap()).unwrap();
    let header_edits: Vec<(&str, serde_json::Value)> = vec![
        ("no_tables", {
            let mut h = header.clone();
            h["table_sizes"] = serde_json::json!([]);
            h
        }),
        ("zero_dense", {
            let mut h = header.clone();
            h["num_dense"] = serde_json::json!(0);
            h
        }),
        ("huge_rows", {
            let mut h = header.clone();
            h["rows"]["train"] = serde_json::json!(1u64 << 60);
            h
        }),
        ("small_table", {
            let mut h = header.clone();
            h["table_sizes"][0] = serde_json::json!(1);
            h
        }),
        ("not_object", serde_json::json!("dataset")),
    ];
    let mut broken_ds: Vec<String> = header_edits
        .iter()
        .map(|(name, h)| {
            with_file(
                &s,
                &ds_path,
                &format!("ds_{name}"),
                "header.json",
                Some(h.to_string().as_bytes()),
            )
        })
        .collect();
    for (name, file, bytes) in [
        ("header_missing", "header.json", None),
        (
            "header_garbage",
            "header.json",
            Some(&b"\x00\x01garbage"[..]),
        ),
        ("dict_missing", "dict_05.u32", None),
        ("ids_short", "train/ids_03.u32", Some(&b"\x01\x00"[..])),
        ("dense_missing", "train/dense.f32", None),
        ("labels_empty", "test/labels.f32", Some(&b""[..])),
    ] {
        broken_ds.push(with_file(&s, &ds_path, &format!("ds_{name}"), file, bytes));
    }
    for d in &broken_ds {
        let mut train = vec!["train", "--dataset", d.as_str()];
        train.extend_from_slice(&small[..4]);
        cases_ck.push((argv(&train), None));
        cases_ck.push((argv(&["eval", "--load-model", &ck, "--dataset", d]), None));
    }

    // Hostile safetensors files for import.
    let tensor = r#""bot_l.0.weight":{"dtype":"F32","shape":[16,13],"data_offsets":[0,832]}"#;
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("short_len", vec![1, 2, 3]),
        ("huge_len", u64::MAX.to_le_bytes().to_vec()),
        ("not_json", safetensors_bytes("not json", &[])),
        ("no_data", safetensors_bytes(&format!("{{{tensor}}}"), &[])),
        (
            "f64",
            safetensors_bytes(&format!("{{{}}}", tensor.replace("F32", "F64")), &[0; 832]),
        ),
        (
            "bad_offsets",
            safetensors_bytes(&format!("{{{}}}", tensor.replace("832]", "8]")), &[0; 832]),
        ),
        (
            "huge_shape",
            safetensors_bytes(
                r#"{"bot_l.0.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
                &[],
            ),
        ),
        (
            "only_one",
            safetensors_bytes(&format!("{{{tensor}}}"), &[0; 832]),
        ),
        (
            "unknown",
            safetensors_bytes(
                r#"{"v_W_l.0":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
    ];
    for (name, bytes) in &hostile {
        let file = s.path(&format!("{name}.safetensors"));
        fs::write(&file, bytes).unwrap();
        let out = s.arg(&format!("imp_{name}"));
        cases_ck.push((
            argv(&[
                "import",
                "--in",
                file.to_str().unwrap(),
                "--save-model",
                &out,
            ]),
            None,
        ));
    }

    let failures: Vec<String> = cases
        .iter()
        .chain(&cases_ck)
        .filter_map(|(args, needle)| check(args, *needle, &s.path("stderr.txt")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not clean errors:\n{}",
        failures.len(),
        cases.len() + cases_ck.len(),
        failures.join("\n")
    );
}
