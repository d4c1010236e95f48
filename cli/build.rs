//! Records the git commit the binary is built from (`DLRM_GIT_COMMIT`), for the config.json of
//! `dlrm train --log-dir`; outside a git checkout (a published crate) it stays unset.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(commit) = git(&["rev-parse", "HEAD"]) {
        println!("cargo:rustc-env=DLRM_GIT_COMMIT={commit}");
    }
    // Build again when HEAD moves: a checkout changes HEAD, a commit appends to its log.
    for file in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--git-path", file]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
