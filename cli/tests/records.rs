//! Experiment records and long runs: `--log-dir` (config.json, metrics.csv, TensorBoard
//! events, read back here), `--config` / `--print-config`, the architecture in
//! `--report-json`, and `--stop-after-steps` resuming bit for bit.

mod support;

use std::path::Path;
use support::{SHORT_TRAIN, Scratch, assert_error, assert_ok, dlrm, latest};

fn run(extra: &[&str]) -> std::process::Output {
    // A short synthetic run: 20 steps of 128 samples.
    dlrm(&[&SHORT_TRAIN[..], &["--seed=5"], extra].concat())
}

/// CRC-32C (Castagnoli), bit by bit: an implementation independent of the writer's table.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, each CRC checked.
fn tf_records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut records = Vec::new();
    let mut at = 0;
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(u32_at(at + 8), masked(crc32c(len_bytes)), "length CRC");
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(u32_at(at + 12 + len), masked(crc32c(data)), "data CRC");
        records.push(data);
        at += 16 + len;
    }
    records
}

/// A protocol buffer's fields: (field number, varint value or the 4/8/length-delimited bytes).
fn fields(mut msg: &[u8]) -> Vec<(u64, u64, &[u8])> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !msg.is_empty() {
        let key = varint(&mut msg);
        let (field, wire) = (key >> 3, key & 7);
        let n = match wire {
            0 => {
                out.push((field, varint(&mut msg), &[][..]));
                continue;
            }
            1 => 8,
            2 => varint(&mut msg) as usize,
            5 => 4,
            w => panic!("wire type {w}"),
        };
        out.push((field, 0, &msg[..n]));
        msg = &msg[n..];
    }
    out
}

/// The scalars of an event file: (tag, step, value); checks the file-version record first.
fn scalars(path: &Path) -> Vec<(String, u64, f32)> {
    let bytes = std::fs::read(path).unwrap();
    let records = tf_records(&bytes);
    let first = fields(records[0]);
    assert!(first.iter().any(|f| f.0 == 3 && f.2 == b"brain.Event:2"));
    let mut out = Vec::new();
    for event in &records[1..] {
        let event = fields(event);
        let step = event.iter().find(|f| f.0 == 2).map_or(0, |f| f.1);
        let summary = event.iter().find(|f| f.0 == 5).expect("a summary").2;
        for value in fields(summary) {
            let value = fields(value.2);
            let tag = String::from_utf8(value[0].2.to_vec()).unwrap();
            let v = f32::from_le_bytes(value[1].2.try_into().unwrap());
            out.push((tag, step, v));
        }
    }
    out
}

#[test]
fn log_dir_holds_the_config_the_metrics_and_tensorboard_events() {
    let dir = Scratch::new("records-logdir");
    let logs = dir.arg("logs");
    assert_ok(&run(&[
        "--print-freq",
        "5",
        "--test-freq",
        "10",
        "--log-dir",
        &logs,
    ]));

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("logs/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["dlrm_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(config["threads"], 2);
    assert!(config.get("cpu_model").is_some());
    let settings = &config["settings"];
    assert_eq!(settings["mini_batch_size"], 128);
    assert_eq!(settings["seed"], 5);
    assert_eq!(settings["test_freq"], 10);
    assert!(settings["learning_rate"].is_number(), "{settings}");
    assert!(settings["arch_mlp_bot"].is_array(), "{settings}");

    let mut csv = csv::Reader::from_path(dir.path("logs/metrics.csv")).unwrap();
    let header = csv.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    let kinds: Vec<(&str, &str)> = rows.iter().map(|r| (&r[0], &r[col("step")])).collect();
    let expected = [
        ("train", "5"),
        ("train", "10"),
        ("eval", "10"),
        ("train", "15"),
        ("train", "20"),
        ("eval", "20"),
    ];
    assert_eq!(kinds, expected);
    for r in &rows {
        let filled = match &r[0] {
            "train" => ["lr", "train_loss", "samples_per_sec"].as_slice(),
            _ => ["test_loss", "accuracy", "auc", "ne"].as_slice(),
        };
        for c in filled {
            let v: f64 = r[col(c)].parse().unwrap_or_else(|_| panic!("{c}: {r:?}"));
            assert!(v.is_finite() && v >= 0.0, "{c}: {r:?}");
        }
    }

    let events: Vec<_> = std::fs::read_dir(dir.path("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().contains("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let scalars = scalars(&events[0]);
    // Every number of metrics.csv is a scalar of the same step, as f32.
    for r in &rows {
        let step: u64 = r[col("step")].parse().unwrap();
        for (c, cell) in header.iter().zip(r.iter()).skip(3) {
            if cell.is_empty() {
                continue;
            }
            let tag = format!("{}/{c}", &r[0]);
            let v = cell.parse::<f64>().unwrap() as f32;
            assert!(
                scalars.contains(&(tag.clone(), step, v)),
                "{tag} {step} {v} not in {scalars:?}"
            );
        }
    }
}

fn print_config(extra: &[&str]) -> toml::Table {
    let mut args = vec!["--print-config"];
    args.extend(extra);
    let out = run(&args);
    assert_ok(&out);
    String::from_utf8(out.stdout).unwrap().parse().unwrap()
}

#[test]
fn a_config_file_sets_flags_and_the_command_line_wins() {
    let dir = Scratch::new("records-config");
    let file = dir.path("run.toml");
    std::fs::write(
        &file,
        "learning-rate = 0.05\nnum_batches = 7\ntest_freq = 3\narch_mlp_top = [16, 1]\nmini_batch_size = 999\n",
    )
    .unwrap();
    let resolved = print_config(&["--config", file.to_str().unwrap()]);
    assert_eq!(resolved["learning_rate"].as_float(), Some(0.05));
    assert_eq!(resolved["num_batches"].as_integer(), Some(7));
    assert_eq!(resolved["test_freq"].as_integer(), Some(3));
    // SHORT_TRAIN's --mini-batch-size 128 is on the command line: it wins over the file's 999.
    assert_eq!(resolved["mini_batch_size"].as_integer(), Some(128));
    let top = resolved["arch_mlp_top"].as_array().unwrap();
    assert_eq!(
        top.iter()
            .map(|v| v.as_integer().unwrap())
            .collect::<Vec<_>>(),
        [16, 1]
    );
    assert_eq!(resolved["seed"].as_integer(), Some(5));

    // The printed configuration is a config file that resolves to itself.
    let printed = dir.path("printed.toml");
    std::fs::write(&printed, toml::to_string(&resolved).unwrap()).unwrap();
    assert_eq!(
        print_config(&["--config", printed.to_str().unwrap()]),
        resolved
    );

    // And it trains: the report says what the file asked for.
    let report = dir.arg("report.json");
    assert_ok(&run(&[
        "--config",
        file.to_str().unwrap(),
        "--report-json",
        &report,
    ]));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["steps"], 7);
    assert_eq!(json["batch_size"], 128);
    let arch = &json["architecture"]["arch"];
    assert_eq!(arch["top"].as_array().unwrap().last().unwrap(), 1);
    assert!(arch["table_sizes"].is_array(), "{json}");
}

#[test]
fn a_config_file_with_an_unknown_key_or_a_bad_value_is_refused_naming_it() {
    let dir = Scratch::new("records-badconfig");
    let file = dir.path("run.toml");
    let path = file.to_str().unwrap();
    for (text, needles) in [
        (
            "mini_batch_sise = 3\n",
            vec!["unknown key 'mini_batch_sise'", path],
        ),
        ("config = 'x.toml'\n", vec!["unknown key 'config'", path]),
        (
            "drop_last_batch = 3\n",
            vec!["drop_last_batch", "true or false", path],
        ),
        ("nepochs = {a = 1}\n", vec!["key 'nepochs'", path]),
        ("nepochs = \n", vec!["not a TOML file", path]),
    ] {
        std::fs::write(&file, text).unwrap();
        assert_error(&run(&["--config", path]), &needles);
    }
    assert_error(
        &run(&["--config", &dir.arg("missing.toml")]),
        &["--config", "missing.toml", "cannot read"],
    );
}

/// The parameters of a checkpoint folder's latest version, as exported safetensors bytes.
fn exported(dir: &Scratch, ck: &str, name: &str) -> Vec<u8> {
    let out = dir.arg(name);
    assert_ok(&dlrm(&["export", "--load-model", ck, "-o", &out]));
    std::fs::read(out).unwrap()
}

#[test]
fn a_run_stopped_early_resumes_bit_for_bit() {
    let dir = Scratch::new("records-stop");
    let (straight, stopped) = (dir.arg("straight"), dir.arg("stopped"));
    let schedule = [
        "--nepochs",
        "2",
        "--optimizer",
        "adagrad",
        "--lr-num-warmup-steps",
        "4",
        "--print-freq",
        "3",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        schedule
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let go = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args);
        assert_ok(&out);
        out
    };
    go(with(&["--save-model", &straight]));
    // 13 of 40 steps: inside the first epoch, off the print interval.
    let report = dir.arg("stopped.json");
    go(with(&[
        "--save-model",
        &stopped,
        "--stop-after-steps",
        "13",
        "--report-json",
        &report,
    ]));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["steps"], 13);
    assert!(latest(Path::new(&stopped)).exists());
    go(with(&["--load-model", &stopped, "--save-model", &stopped]));
    assert!(
        exported(&dir, &straight, "a.safetensors") == exported(&dir, &stopped, "b.safetensors"),
        "the resumed run's parameters differ from the straight run's"
    );
    assert_error(
        &run(&["--stop-after-steps", "0", "--save-model", &dir.arg("zero")]),
        &["--stop-after-steps 0"],
    );
}
