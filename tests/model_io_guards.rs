//! Model input and output guards: lazily initialised tables read as their real values
//! everywhere, non-finite parameters and malformed checkpoints are clear errors, import reads
//! the architecture instead of guessing it and can attach a dataset's encoding, export is
//! byte-reproducible, and models that cannot be saved are refused before training.

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

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dlrm-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// `name` inside the folder, as a string argument.
    fn p(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

#[test]
fn models_that_cannot_be_saved_are_refused_before_training() {
    let dir = Scratch::new("models");
    let ck = dir.p("ck");
    train_small(&ck, &[]);
    for model in ["dcn", "dcn-v2", "fm", "mf"] {
        let out = dir.p(&format!("{model}-out"));
        let mut args = vec!["train", "--model", model];
        args.extend(SMALL_RUN);
        let save = [args.clone(), vec!["--save-model", &out]].concat();
        fails(&save, &["--save-model", model]);
        assert!(!Path::new(&out).exists());
        let load = [args, vec!["--load-model", &ck]].concat();
        fails(&load, &["--load-model", model]);
    }
}
