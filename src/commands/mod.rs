//! One module per subcommand.

pub mod compare;
pub mod export;
pub mod models;
pub mod preprocess;
pub mod serve;
pub mod synth;
pub mod train;

use anyhow::{Result, bail, ensure};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Checks that a command may write `out` (its `--out`): never when it is one of `inputs` (the
/// same file under any path, which writing would destroy before it is read), and only with
/// `--force` when anything else exists there.
pub fn check_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let Ok(target) = std::fs::metadata(out) else {
        return Ok(());
    };
    for input in inputs {
        if let Ok(m) = std::fs::metadata(input)
            && (m.dev(), m.ino()) == (target.dev(), target.ino())
        {
            bail!(
                "--out {} is the input {}: writing it would destroy the input; choose another output",
                out.display(),
                input.display()
            );
        }
    }
    ensure!(
        force,
        "--out {} already exists: choose another path, or give --force to replace it",
        out.display()
    );
    Ok(())
}
