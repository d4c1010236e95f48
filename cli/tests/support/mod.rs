//! What the CLI-level tests share: a scratch folder, running the `dlrm` binary, and the checks
//! of a clean error. Each test binary uses part of it.
#![allow(dead_code)]

pub mod dataset;
pub mod mpi;
pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `dlrm train` arguments of a short synthetic run: 20 steps of 128 samples on 2 threads, then
/// an evaluation on 1024 rows.
pub const SHORT_TRAIN: [&str; 9] = [
    "train",
    "--data-size",
    "2560",
    "--test-data-size",
    "1024",
    "--mini-batch-size",
    "128",
    "--threads",
    "2",
];

/// A folder of its own under the system's temporary folder, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh, empty folder named after `tag` and this process.
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dlrm-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// `name` inside the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// `name` inside the folder, as a command-line argument.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `dlrm args` to completion.
pub fn dlrm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(args)
        .output()
        .expect("run dlrm")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// Asserts a clean error: exit status 1, no panic, and stderr containing every `needle`;
/// returns stderr.
pub fn assert_error(o: &Output, needles: &[&str]) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}: {e}");
    }
    e
}

/// The version folder a checkpoint folder's LATEST names.
pub fn latest(ck: &Path) -> PathBuf {
    let name = std::fs::read_to_string(ck.join("LATEST")).unwrap();
    ck.join(name.trim())
}
