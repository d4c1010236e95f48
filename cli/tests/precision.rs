//! `dlrm train --precision`: bf16 trains DLRM and says so in the report; a resume continues in
//! the checkpoint's precision; bf16 with another model or with tables in files is refused
//! before any work, naming the flags, and leaves nothing behind.

use std::path::Path;
use std::process::{Command, Output};

fn dlrm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(args)
        .output()
        .expect("run dlrm")
}

fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("report is JSON")
}

/// Exit status 1 or 2 (not a crash) and stderr holding every one of `words`.
fn assert_refused(out: &Output, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "status {:?}: {stderr}",
        out.status
    );
    for w in words {
        assert!(stderr.contains(w), "{w:?} not in: {stderr}");
    }
}

#[test]
fn bf16_trains_reports_and_resumes_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (dir.path().join("r1.json"), dir.path().join("r2.json"));
    let ckpt = dir.path().join("ckpt");
    let out = dlrm(&[
        "train",
        "--num-batches",
        "4",
        "--precision",
        "bf16",
        "--save-model",
        ckpt.to_str().unwrap(),
        "--report-json",
        r1.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&r1);
    assert_eq!(r["precision"], "bf16");
    assert!(!r["isa"].as_str().unwrap().is_empty());
    assert!(String::from_utf8_lossy(&out.stdout).contains("precision bf16"));
    // Resumed without --precision: the checkpoint's.
    let out = dlrm(&[
        "train",
        "--num-batches",
        "8",
        "--load-model",
        ckpt.to_str().unwrap(),
        "--report-json",
        r2.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report(&r2)["precision"], "bf16");
}

#[test]
fn bf16_is_refused_for_other_models_and_file_tables() {
    let out = dlrm(&["train", "--precision", "bf16", "--model", "dcn"]);
    assert_refused(&out, &["--precision bf16", "--model dcn"]);
    let dir = tempfile::tempdir().unwrap();
    let tables = dir.path().join("tables");
    let out = dlrm(&[
        "train",
        "--precision",
        "bf16",
        "--embedding-storage",
        "file",
        "--tables-dir",
        tables.to_str().unwrap(),
    ]);
    assert_refused(&out, &["--precision bf16", "--embedding-storage file"]);
    assert!(!tables.exists(), "nothing is created");
    let out = dlrm(&["train", "--precision", "fp16"]);
    assert_refused(&out, &["fp16", "fp32", "bf16"]);
}
