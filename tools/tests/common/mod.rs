//! What the `dlrm-scaling` tests share: running the binary, a scratch folder, and the arguments
//! of quick points. Each test binary uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `dlrm-scaling args` to completion.
pub fn scaling(args: &[&str]) -> Output {
    scaling_command(args).output().expect("run dlrm-scaling")
}

/// Runs `dlrm-scaling args` with `PATH` set to `path` (to hide or provide programs).
pub fn scaling_with_path(args: &[&str], path: &Path) -> Output {
    scaling_command(args)
        .env("PATH", path)
        .output()
        .expect("run dlrm-scaling")
}

fn scaling_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dlrm-scaling"));
    c.args(args);
    c
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh, empty directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("dlrm-scaling-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Quick points: the tiny preset, 1 + 2 x 2 steps a point.
pub const QUICK: [&str; 8] = [
    "--preset",
    "tiny",
    "--warmup-steps",
    "1",
    "--repeats",
    "2",
    "--steps",
    "2",
];
