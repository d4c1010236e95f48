//! `dlrm train --model ...` and `dlrm compare`: every model runs from the command line and
//! names itself in the report, MF reports RMSE from rating files, flags that do not apply are
//! errors naming them, and the comparison writes its CSV table and SVG plot.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dlrm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(args)
        .output()
        .expect("run dlrm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh folder for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dlrm-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_click_model_trains_from_the_command_line() {
    let dir = scratch("models");
    for model in ["dcn", "dcn-v2", "fm"] {
        let path = dir.join(format!("{model}.json"));
        let o = dlrm(&[
            "train",
            "--model",
            model,
            "--num-batches",
            "20",
            "--cross-layers",
            "2",
            "--arch-mlp-deep",
            "32-16",
            "--test-data-size",
            "1024",
            "--threads",
            "2",
            "--report-json",
            path.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        let json = report(&path);
        assert_eq!(json["model"], model);
        assert_eq!(json["steps"], 20);
        assert!(json["test_auc"].as_f64().is_some(), "{model}: {json}");
        assert!(
            json.get("test_rmse").is_none(),
            "{model}: classification has no RMSE"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn mf_reports_rmse_from_rating_files() {
    let dir = scratch("mf");
    // Users 1-30 and items 1-20 with ratings of a simple pattern.
    let ratings = |n: usize, k: usize| -> String {
        (0..n)
            .map(|i| {
                let (u, it) = ((i * 7 + k) % 30 + 1, (i * 3 + k) % 20 + 1);
                format!("{u}\t{it}\t{}\t88125{i:04}\n", (u + it) % 5 + 1)
            })
            .collect()
    };
    let (train, test) = (dir.join("r.base"), dir.join("r.test"));
    std::fs::write(&train, ratings(600, 0)).unwrap();
    std::fs::write(&test, ratings(100, 1)).unwrap();
    let path = dir.join("mf.json");
    let o = dlrm(&[
        "train",
        "--model",
        "mf",
        "--train",
        train.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
        "--optimizer",
        "adagrad",
        "--learning-rate",
        "0.05",
        "--weight-decay",
        "0.001",
        "--nepochs",
        "3",
        "--threads",
        "2",
        "--report-json",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json = report(&path);
    assert_eq!(json["model"], "mf");
    let rmse = json["test_rmse"].as_f64().expect("test_rmse");
    assert!(rmse.is_finite() && rmse > 0.0);
    assert!(json["train_rmse"].as_f64().is_some());
    assert!(json["test_auc"].is_null(), "no AUC of ratings");
    assert!(String::from_utf8_lossy(&o.stdout).contains("RMSE"));

    // A malformed line is an error naming the file and line.
    std::fs::write(&test, "1\t2\t3\t4\n1\tx\t3\t4\n").unwrap();
    let o = dlrm(&[
        "train",
        "--model",
        "mf",
        "--train",
        train.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("r.test:2"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn flags_that_do_not_apply_are_clear_errors() {
    let cases: [(&[&str], &str); 5] = [
        (&["--model", "mf"], "--train"),
        (
            &["--model", "dlrm", "--weight-decay", "0.1"],
            "--weight-decay",
        ),
        (&["--model", "fm", "--weight-decay=-1"], "--weight-decay"),
        (
            &["--model", "dcn", "--train", "a", "--test", "b"],
            "--model mf",
        ),
        (
            &["--model", "dcn", "--arch-mlp-deep", "64-x"],
            "--arch-mlp-deep",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["train", "--num-batches", "2"];
        all.extend_from_slice(args);
        let o = dlrm(&all);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            stderr(&o).contains(needle),
            "{args:?}: error should mention {needle}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn compare_writes_the_table_and_the_plot() {
    let dir = scratch("compare");
    let o = dlrm(&[
        "compare",
        "--models",
        "dlrm,dcn,fm",
        "--num-batches",
        "40",
        "--test-freq",
        "20",
        "--arch-mlp-bot",
        "13-32-16",
        "--arch-mlp-top",
        "32-1",
        "--arch-mlp-deep",
        "32-16",
        "--cross-layers",
        "2",
        "--test-data-size",
        "1024",
        "--threads",
        "2",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(dir.join("compare.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("model,optimizer,learning_rate,step,samples,loss,accuracy,auc,ne,status")
    );
    // 3 models x 2 optimizers x evaluations at steps 20 and 40.
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 12, "{csv}");
    for model in ["dlrm", "dcn", "fm"] {
        for opt in ["sgd", "adagrad"] {
            let steps: Vec<&str> = rows
                .iter()
                .filter(|r| r[0] == model && r[1] == opt)
                .map(|r| r[3])
                .collect();
            assert_eq!(steps, ["20", "40"], "{model} {opt}");
        }
    }
    let auc: f64 = rows[0][7].parse().unwrap();
    assert!((0.0..=1.0).contains(&auc));
    let svg = std::fs::read_to_string(dir.join("compare.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("validation AUC") && svg.contains("dcn sgd"));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| dlrm | adagrad |"), "{table}");
    std::fs::remove_dir_all(&dir).ok();
}
