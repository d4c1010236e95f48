//! The reference's MLPerf quality targets (`--mlperf-acc-threshold`, `--mlperf-auc-threshold`:
//! training ends at the first evaluation that exceeds one, `run_stop` success; a target
//! missed ends "aborted") and its TensorBoard events (`--tensor-board-filename`).

mod support;

use std::process::{Command, Output};
use support::{Scratch, assert_error, assert_ok, dlrm, stderr};

/// A short synthetic run: 32 steps of 64 samples, evaluated and reported every 8 steps.
const RUN: [&str; 15] = [
    "train",
    "--data-size",
    "2048",
    "--test-data-size",
    "512",
    "--mini-batch-size",
    "64",
    "--threads",
    "1",
    "--seed",
    "5",
    "--test-freq",
    "8",
    "--print-freq",
    "8",
];

fn run(extra: &[&str]) -> Output {
    let args: Vec<&str> = RUN.iter().chain(extra).copied().collect();
    let o = dlrm(&args);
    assert_ok(&o);
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The `run_stop` statuses of the `:::MLLOG` lines.
fn run_stops(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix(":::MLLOG "))
        .map(|j| serde_json::from_str::<serde_json::Value>(j).unwrap())
        .filter(|v| v["key"] == "run_stop")
        .map(|v| v["metadata"]["status"].as_str().unwrap().to_string())
        .collect()
}

fn testing_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.starts_with("Testing at - "))
        .collect()
}

#[test]
fn a_reached_threshold_ends_training_at_that_evaluation() {
    for (flag, metric) in [
        ("--mlperf-auc-threshold=0.01", "auc"),
        ("--mlperf-acc-threshold=0.01", "accuracy"),
    ] {
        let o = run(&["--mlperf-logging", flag]);
        let out = stdout(&o);
        // The first evaluation (step 8) exceeds 0.01: nothing trains after it, and it is not
        // evaluated again at the end.
        assert_eq!(
            testing_lines(&out),
            ["Testing at - 8/32 of epoch 0,"],
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "MLPerf testing {metric} threshold 0.01 reached, stop training\n"
            )),
            "{out}"
        );
        assert!(
            out.contains("Finished training it 8/32 of epoch 0"),
            "{out}"
        );
        assert!(!out.contains("Finished training it 16/32"), "{out}");
        assert_eq!(run_stops(&out), ["success"], "{out}");
    }
}

#[test]
fn a_missed_threshold_trains_to_the_end_and_aborts() {
    let out = stdout(&run(&["--mlperf-logging", "--mlperf-auc-threshold=0.9999"]));
    let tests = testing_lines(&out);
    assert_eq!(tests.len(), 4, "{out}");
    assert_eq!(tests[3], "Testing at - 32/32 of epoch 0,");
    assert!(!out.contains("reached, stop training"), "{out}");
    assert_eq!(run_stops(&out), ["aborted"], "{out}");
    // Without a target the run ends "success", as before.
    assert_eq!(run_stops(&stdout(&run(&["--mlperf-logging"]))), ["success"]);
}

#[test]
fn thresholds_apply_with_mlperf_logging_only_and_are_fractions() {
    let o = run(&["--print-time", "--mlperf-acc-threshold=0.01"]);
    assert_eq!(testing_lines(&stdout(&o)).len(), 4, "{}", stdout(&o));
    assert!(
        stderr(&o).contains("apply with --mlperf-logging only"),
        "{}",
        stderr(&o)
    );
    let args: Vec<&str> = RUN
        .iter()
        .copied()
        .chain(["--mlperf-logging", "--mlperf-acc-threshold=78.9"])
        .collect();
    assert_error(&dlrm(&args), &["--mlperf-acc-threshold 78.9", "0.789"]);
}

/// The event file in `dir` (there is one) as bytes.
fn event_file(dir: &std::path::Path) -> Vec<u8> {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    std::fs::read(&files[0]).unwrap()
}

fn holds(bytes: &[u8], tag: &str) -> bool {
    bytes.windows(tag.len()).any(|w| w == tag.as_bytes())
}

/// The reference's SummaryWriter("./" + name): the folder is made under the working
/// directory, with its tags (the event format itself is read back in records.rs).
#[test]
fn tensor_board_filename_writes_the_references_scalars_under_the_working_directory() {
    let dir = Scratch::new("tensorboard");
    for (name, mlperf) in [("run_kaggle_pt", false), ("run_mlperf", true)] {
        let mut args: Vec<&str> = RUN.to_vec();
        args.extend(["--print-time", "--tensor-board-filename", name]);
        if mlperf {
            args.push("--mlperf-logging");
        }
        let o = Command::new(env!("CARGO_BIN_EXE_dlrm"))
            .args(&args)
            .current_dir(&dir.0)
            .output()
            .unwrap();
        assert_ok(&o);
        let bytes = event_file(&dir.path(name));
        assert!(holds(&bytes, "Train/Loss"));
        assert_eq!(holds(&bytes, "Test/Acc"), !mlperf);
        for metric in ["recall", "precision", "f1", "ap", "roc_auc", "accuracy"] {
            let tag = format!("mlperf-metrics-test/{metric}");
            assert_eq!(holds(&bytes, &tag), mlperf, "{tag}");
        }
    }
}
