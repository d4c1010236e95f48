//! `dlrm train` as a drop-in for the reference's `python dlrm_s_pytorch.py`: its command lines
//! (bench/dlrm_s_criteo_kaggle.sh, its Terabyte twin, the README's examples) run with only the
//! program name changed; every flag of its argparse is accepted or refused saying why; its
//! log lines are printed. And defaults that learn: Criteo data, MF on MovieLens, `compare`.
//! Tests that need the licensed data skip with a message when DLRM_CRITEO_SAMPLE or
//! DLRM_MOVIELENS is unset.

mod support;

use std::path::PathBuf;
use support::{Scratch, assert_error, assert_ok, dlrm, stderr};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The file a data variable names, or None (with a message) when it is unset.
fn data_env(var: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var).map(PathBuf::from);
    if path.is_none() {
        eprintln!("skipped: {var} is unset (it names the licensed data this test reads)");
    }
    path
}

/// A reference command line split into arguments (none of ours contains a space), with
/// `dlrm train` in place of `python dlrm_s_pytorch.py`.
fn reference(line: &str) -> std::process::Output {
    let mut args = vec!["train"];
    args.extend(line.split_whitespace());
    dlrm(&args)
}

/// `Finished training it J/N of epoch E, X ms/it, loss L` with a measured time.
fn assert_training_line(out: &str, j: u64, n: u64, epoch: u64) {
    let head = format!("Finished training it {j}/{n} of epoch {epoch}, ");
    let line = out
        .lines()
        .find(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("no line {head:?} in {out}"));
    let rest = &line[head.len()..];
    let (ms, loss) = rest.split_once(" ms/it, loss ").expect(line);
    assert!(ms.parse::<f64>().unwrap() > 0.0, "{line}");
    assert_eq!(loss.split('.').nth(1).map(str::len), Some(6), "{line}");
}

/// bench/dlrm_s_criteo_kaggle.sh's line on the shared Kaggle rows: the reference's day split,
/// its log lines, and the processed dataset kept and reused by the next run.
#[test]
fn the_reference_kaggle_command_runs() {
    let Some(raw) = data_env("DLRM_CRITEO_SAMPLE") else {
        return;
    };
    let dir = Scratch::new("dropin-kaggle");
    let processed = dir.arg("kaggleAdDisplayChallenge_processed.npz");
    let line = format!(
        "--arch-sparse-feature-size=16 --arch-mlp-bot=13-512-256-64-16 --arch-mlp-top=512-256-1 --data-generation=dataset --data-set=kaggle --raw-data-file={} --processed-data-file={processed} --loss-function=bce --round-targets=True --learning-rate=0.1 --mini-batch-size=128 --print-freq=1024 --print-time --test-mini-batch-size=16384 --test-num-workers=16",
        raw.display()
    );
    let o = reference(&line);
    assert_ok(&o);
    let out = stdout(&o);
    // 8,000 lines cut into 7 days as the reference cuts them: 6,858 training rows.
    assert!(
        stderr(&o).contains("train 6858 / validation 571 / test 571 rows"),
        "{}",
        stderr(&o)
    );
    assert!(
        out.starts_with("time/loss/accuracy (if enabled):\n"),
        "{out}"
    );
    assert_training_line(&out, 54, 54, 0);
    assert!(
        out.contains("Testing at - 54/54 of epoch 0,\n accuracy "),
        "{out}"
    );
    assert!(std::path::Path::new(&processed).is_dir());
    let again = reference(&line);
    assert_ok(&again);
    assert!(
        stderr(&again).contains("training on this dataset"),
        "{}",
        stderr(&again)
    );
}

/// bench/dlrm_s_criteo_terabyte.sh's line on day files cut from the shared rows: all days but
/// the last train, the last is halved into test and validation; ids hashed by
/// --max-ind-range.
#[test]
fn the_reference_terabyte_command_runs() {
    let Some(raw) = data_env("DLRM_CRITEO_SAMPLE") else {
        return;
    };
    let dir = Scratch::new("dropin-terabyte");
    let text = std::fs::read_to_string(raw).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (day, rows) in lines.chunks(2000).enumerate() {
        std::fs::write(dir.path(&format!("day_{day}")), rows.join("\n") + "\n").unwrap();
    }
    let line = format!(
        "--arch-sparse-feature-size=64 --arch-mlp-bot=13-512-256-64 --arch-mlp-top=512-512-256-1 --max-ind-range=10000000 --data-generation=dataset --data-set=terabyte --raw-data-file={} --processed-data-file={} --loss-function=bce --round-targets=True --learning-rate=0.1 --mini-batch-size=2048 --print-freq=1024 --print-time --test-mini-batch-size=16384 --test-num-workers=16",
        dir.arg("day"),
        dir.arg("terabyte_processed.npz")
    );
    let o = reference(&line);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("train 6000 / validation 1000 / test 1000 rows"),
        "{}",
        stderr(&o)
    );
    let out = stdout(&o);
    assert_training_line(&out, 3, 3, 0);
    assert!(out.contains("Testing at - 3/3 of epoch 0,"), "{out}");
}

/// The README's examples: the tiny run, saving, loading for --inference-only.
#[test]
fn the_reference_readme_examples_run() {
    let o = reference("--mini-batch-size=2 --data-size=6");
    assert_ok(&o);
    assert!(stdout(&o).contains("steps 3 x batch 2"), "{}", stdout(&o));

    let o = reference("--mini-batch-size=2 --data-size=6 --print-time --print-freq=1");
    assert_ok(&o);
    let out = stdout(&o);
    for j in 1..=3 {
        assert_training_line(&out, j, 3, 0);
    }

    let dir = Scratch::new("dropin-readme");
    let model = dir.arg("model.pt");
    let o = reference(&format!(
        "--mini-batch-size=2 --data-size=6 --save-model={model}"
    ));
    assert_ok(&o);
    let o = reference(&format!(
        "--mini-batch-size=2 --data-size=6 --load-model={model} --inference-only"
    ));
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.starts_with(" accuracy "), "{out}");
    assert!(out.contains(", best "), "{out}");
    assert!(!out.contains("training summary"), "{out}");
    let o = reference("--mini-batch-size=2 --data-size=6 --inference-only");
    assert_ok(&o);
}

/// Every flag of the reference's argparse, with a value its command lines use: accepted, or
/// refused (exit 1) with why; never "unexpected argument".
#[test]
fn every_reference_flag_is_accepted_or_refused_with_why() {
    // (flag=value, None when accepted, or a word of the refusal)
    let cases: &[(&str, Option<&str>)] = &[
        ("--arch-sparse-feature-size=16", None),
        ("--arch-embedding-size=10-20-30-40-50-60-70-80", None),
        ("--arch-mlp-bot=13-32-16", None),
        ("--arch-mlp-top=32-1", None),
        ("--arch-interaction-op=cat", None),
        ("--arch-interaction-itself", None),
        ("--weighted-pooling=learned", Some("weighted pooling")),
        ("--md-flag", Some("mixed-dimension")),
        ("--md-threshold=100", Some("--md-flag")),
        ("--md-temperature=0.3", None),
        ("--md-round-dims", Some("--md-flag")),
        ("--qr-flag", Some("quotient-remainder")),
        ("--qr-threshold=100", Some("--qr-flag")),
        ("--qr-operation=add", Some("--qr-flag")),
        ("--qr-collisions=4", None),
        ("--activation-function=relu", None),
        ("--activation-function=sigmoid", Some("ReLU")),
        ("--loss-function=mse", None),
        ("--loss-function=wbce", None),
        ("--loss-weights=1.0-1.0", Some("wbce")),
        ("--loss-threshold=1e-7", None),
        ("--round-targets=True", None),
        ("--round-targets=False", Some("fractional")),
        ("--data-size=512", None),
        ("--num-batches=2", None),
        ("--data-generation=random", None),
        ("--data-generation=synthetic", None),
        ("--data-generation=dataset", Some("--raw-data-file")),
        ("--rand-data-dist=gaussian", Some("gaussian")),
        ("--rand-data-min=0", None),
        ("--rand-data-max=2", Some("uniform")),
        ("--rand-data-mu=-1", None),
        ("--rand-data-sigma=2", Some("gaussian")),
        ("--data-trace-file=./input/dist_emb_j.log", Some("trace")),
        ("--data-trace-enable-padding=False", None),
        ("--data-set=kaggle", Some("--data-generation=dataset")),
        (
            "--raw-data-file=train.txt",
            Some("--data-generation=dataset"),
        ),
        (
            "--processed-data-file=kaggle.npz",
            Some("--data-generation=dataset"),
        ),
        ("--data-randomize=total", Some("--data-generation=dataset")),
        ("--max-ind-range=-1", None),
        ("--max-ind-range=100", None),
        ("--data-sub-sample-rate=0.875", Some("down-sampling")),
        ("--data-sub-sample-rate=0.0", None),
        ("--num-indices-per-lookup=4", None),
        ("--num-indices-per-lookup-fixed=True", None),
        ("--num-indices-per-lookup-fixed=False", None),
        ("--num-workers=4", None),
        ("--memory-map", None),
        ("--mini-batch-size=64", None),
        ("--nepochs=2", None),
        ("--learning-rate=0.05", None),
        ("--print-precision=5", None),
        ("--print-precision=3", Some("--debug-mode")),
        ("--numpy-rand-seed=727", None),
        ("--sync-dense-params=True", None),
        ("--optimizer=sgd", None),
        ("--optimizer=adagrad", None),
        ("--optimizer=rwsadagrad", None),
        ("--dataset-multiprocessing", None),
        ("--inference-only", None),
        ("--quantize-mlp-with-bit=32", None),
        ("--quantize-mlp-with-bit=8", Some("fp32")),
        ("--quantize-emb-with-bit=4", Some("fp32")),
        ("--save-onnx", Some("safetensors")),
        ("--use-gpu", Some("CPU only")),
        ("--local_rank=-1", None),
        ("--local_rank=0", Some("distributed")),
        ("--dist-backend=ccl", Some("distributed")),
        ("--print-freq=4", None),
        ("--test-freq=-1", None),
        ("--test-freq=2", None),
        ("--test-mini-batch-size=-1", None),
        ("--test-mini-batch-size=256", None),
        ("--test-num-workers=16", None),
        ("--print-time", None),
        ("--print-wall-time", None),
        ("--debug-mode", Some("tensor")),
        ("--enable-profiling", None),
        ("--plot-compute-graph", Some("graph")),
        ("--mlperf-logging", None),
        ("--mlperf-acc-threshold=0.789", None),
        ("--mlperf-auc-threshold=0.0", None),
        ("--mlperf-auc-threshold=80.25", Some("fractions")),
        ("--mlperf-bin-loader", None),
        ("--mlperf-bin-shuffle", Some("shuffled")),
        ("--mlperf-grad-accum-iter=2", Some("accumulation")),
        ("--lr-num-warmup-steps=2", None),
        ("--lr-decay-start-step=2", None),
        ("--lr-num-decay-steps=2", None),
    ];
    // A value no parser takes is a usage error (exit 2), with why.
    let o = dlrm(&["train", "--data-generation=internal"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not public"), "{}", stderr(&o));
    let dir = Scratch::new("dropin-flags");
    for (flag, refusal) in cases {
        let mut args = vec!["train", "--threads", "1"];
        // Small synthetic data, unless the flag sizes the data or names real data.
        if !flag.starts_with("--data-size") && !flag.starts_with("--data-generation=dataset") {
            args.extend(["--data-size", "256", "--test-data-size", "64"]);
        }
        let ck = dir.arg(&flag.replace(['-', '=', '.', '/'], "_"));
        if *flag == "--inference-only" {
            args.extend(["--load-model", &ck]);
            let mut save = args.clone();
            save.truncate(args.len() - 2);
            save.extend(["--save-model", &ck]);
            assert_ok(&dlrm(&save));
        }
        args.push(flag);
        let o = dlrm(&args);
        match refusal {
            None => assert!(o.status.success(), "{flag}: {}", stderr(&o)),
            Some(word) => {
                assert_error(&o, &[word]);
            }
        }
    }
}

/// --loss-function mse and wbce (with --loss-weights) and --loss-threshold train; the weights
/// change the loss reported.
#[test]
fn every_reference_loss_trains() {
    let loss_of = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "train",
            "--threads",
            "1",
            "--num-batches",
            "300",
            "--print-freq",
            "100",
        ];
        args.extend(extra);
        let o = dlrm(&args);
        assert_ok(&o);
        let out = stdout(&o);
        let line = out
            .lines()
            .find(|l| l.starts_with("train loss "))
            .expect(&out);
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let bce = loss_of(&[]);
    let mse = loss_of(&["--loss-function=mse"]);
    assert!(mse < 0.25 && mse < bce, "mse {mse}, bce {bce}");
    let wbce = loss_of(&["--loss-function=wbce", "--loss-weights=1.0-1.0"]);
    // The same loss through the scalar path instead of the fused kernel: equal up to rounding.
    assert!(
        (wbce - bce).abs() < 1e-3 * bce,
        "wbce with unit weights {wbce}, bce {bce}"
    );
    let heavier = loss_of(&["--loss-function=wbce", "--loss-weights=2.0-2.0"]);
    assert!(heavier > 1.5 * bce, "{heavier} vs {bce}");
    let clamped = loss_of(&["--loss-threshold=0.1"]);
    assert!(clamped.is_finite());
    let o = dlrm(&["train", "--loss-function=wbce", "--loss-weights=1-x"]);
    assert_error(&o, &["--loss-weights", "1-x"]);
}

/// --mlperf-logging: `:::MLLOG` JSON lines (run_start, the hyperparameters, eval_accuracy,
/// run_stop) and the reference's recall/precision/f1/ap/auc line.
#[test]
fn mlperf_logging_prints_mllog_lines_and_the_metrics_line() {
    let o = dlrm(&[
        "train",
        "--threads",
        "1",
        "--num-batches",
        "40",
        "--mlperf-logging",
        "--test-freq=20",
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    let keys: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix(":::MLLOG "))
        .map(|json| {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            assert!(v["time_ms"].as_u64().unwrap() > 0);
            v["key"].as_str().unwrap().to_string()
        })
        .collect();
    for key in [
        "cache_clear",
        "init_start",
        "init_stop",
        "run_start",
        "global_batch_size",
        "opt_base_learning_rate",
        "epoch_start",
        "eval_start",
        "eval_accuracy",
        "eval_stop",
        "epoch_stop",
        "run_stop",
    ] {
        assert!(keys.iter().any(|k| k == key), "no {key} in {keys:?}");
    }
    let metrics = out.lines().find(|l| l.starts_with("recall ")).expect(&out);
    for part in [
        ", precision ",
        ", f1 ",
        ", ap ",
        ", auc ",
        ", best auc ",
        ", accuracy ",
        " %, best accuracy ",
    ] {
        assert!(metrics.contains(part), "{metrics}");
    }
    assert!(out.contains("Testing at - 20/40 of epoch 0,"), "{out}");
}

/// Criteo data without --preset trains with the reference's Kaggle recipe (batch 128, SGD at
/// 0.1) and learns: test AUC above 0.62 on the shared rows (about 0.65 measured).
#[test]
fn criteo_data_trains_with_the_reference_recipe_by_default() {
    let Some(raw) = data_env("DLRM_CRITEO_SAMPLE") else {
        return;
    };
    let dir = Scratch::new("dropin-recipe");
    let report = dir.arg("report.json");
    let o = dlrm(&[
        "train",
        "--criteo",
        raw.to_str().unwrap(),
        "--report-json",
        &report,
    ]);
    assert_ok(&o);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["batch_size"], 128);
    assert_eq!(json["optimizer"], "sgd");
    assert!((json["learning_rate"].as_f64().unwrap() - 0.1).abs() < 1e-6);
    let auc = json["test_auc"].as_f64().unwrap();
    eprintln!("default run on the Criteo sample: test AUC {auc:.4}");
    assert!(auc > 0.62, "AUC {auc}");
}

/// `--model mf` with nothing else reaches RMSE < 0.95 on MovieLens' u1 split.
#[test]
fn mf_defaults_reach_rmse_below_0_95_on_movielens_u1() {
    let Some(ml) = data_env("DLRM_MOVIELENS") else {
        return;
    };
    let dir = Scratch::new("dropin-mf");
    let report = dir.arg("report.json");
    let (train, test) = (ml.join("u1.base"), ml.join("u1.test"));
    let o = dlrm(&[
        "train",
        "--model",
        "mf",
        "--train",
        train.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
        "--report-json",
        &report,
    ]);
    assert_ok(&o);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let rmse = json["test_rmse"].as_f64().unwrap();
    eprintln!("MF defaults on MovieLens u1: test RMSE {rmse:.4}");
    assert!(rmse < 0.95, "RMSE {rmse}");
}

/// `--help` lists every preset with its values.
#[test]
fn help_shows_each_presets_values() {
    let o = dlrm(&["train", "--help"]);
    assert_ok(&o);
    let help = stdout(&o);
    for needle in [
        "tiny:",
        "bottom 13-64-16, top 64-1, batch 128",
        "kaggle:",
        "bottom 13-512-256-64-16, top 512-256-1, batch 2048",
        "terabyte:",
        "(capped at 10000000)",
        "paper-small:",
        "100 ids per bag",
        "batch 128, SGD, lr 0.1",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}");
    }
}
