//! The `dlrm` binary: flags that make no sense are errors that name the flag, and a short run
//! writes the report JSON with every documented field.

use std::path::PathBuf;
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

#[test]
fn impossible_architectures_are_clear_errors() {
    let cases: [(&[&str], &str); 6] = [
        (&["--arch-mlp-bot", "13-512-32"], "--arch-mlp-bot"),
        (&["--arch-mlp-bot", "13-x-16"], "'x'"),
        (
            &["--arch-embedding-size", "10-0-5"],
            "--arch-embedding-size",
        ),
        (&["--arch-mlp-top", "64-2"], "--arch-mlp-top"),
        (
            &["--arch-sparse-feature-size", "0"],
            "--arch-sparse-feature-size",
        ),
        (&["--embedding-storage", "file"], "--tables-dir"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["train"];
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
fn help_describes_the_flags() {
    let o = dlrm(&["train", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--mini-batch-size",
        "--optimizer",
        "--preset",
        "--report-json",
        "--threads",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
}

#[test]
fn a_short_run_writes_the_report() {
    let dir = std::env::temp_dir().join(format!("dlrm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report: PathBuf = dir.join("report.json");
    let o = dlrm(&[
        "train",
        "--num-batches",
        "30",
        "--test-data-size",
        "2048",
        "--test-freq",
        "15",
        "--threads",
        "2",
        "--report-json",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    for key in [
        "model",
        "samples_per_sec",
        "threads",
        "batch_size",
        "steps",
        "train_loss",
        "test_loss",
        "test_accuracy",
        "test_auc",
        "test_ne",
        "teacher_auc",
        "evals",
        "phase_seconds",
        "peak_rss_bytes",
    ] {
        assert!(json.get(key).is_some(), "report lacks {key}");
    }
    assert_eq!(json["model"], "dlrm");
    assert_eq!(json["steps"], 30);
    assert_eq!(json["evals"].as_array().unwrap().len(), 2);
    for phase in [
        "emb_fwd",
        "bot_fwd",
        "interaction_fwd",
        "top_fwd",
        "loss",
        "top_bwd",
        "interaction_bwd",
        "bot_bwd",
        "emb_update",
        "dense_update",
        "other",
    ] {
        assert!(
            json["phase_seconds"][phase].as_f64().is_some(),
            "no phase {phase}"
        );
    }
}
