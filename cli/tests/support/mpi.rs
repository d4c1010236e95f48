//! Starting `dlrm` under `mpirun` for the MPI tests (skipped, saying so, without `mpirun`).

use std::process::Command;

/// Whether `mpirun` is on PATH.
pub fn mpirun_found() -> bool {
    let found = Command::new("mpirun").arg("--version").output().is_ok();
    if !found {
        eprintln!("mpirun is not on PATH: skipping the MPI tests");
    }
    found
}

/// `dlrm train --distributed` on `ranks` MPI ranks, forwarding the environment variables
/// `forward` to every rank (`mpirun -x`); None: `dlrm train` in one plain process.
pub fn dlrm_train(ranks: Option<usize>, forward: &[&str]) -> Command {
    let dlrm = env!("CARGO_BIN_EXE_dlrm");
    match ranks {
        Some(n) => {
            let mut c = Command::new("mpirun");
            c.args(["--oversubscribe", "--allow-run-as-root"])
                .args(["-np", &n.to_string()]);
            for name in forward {
                c.args(["-x", name]);
            }
            c.args([dlrm, "train", "--distributed"]);
            c
        }
        None => {
            let mut c = Command::new(dlrm);
            c.arg("train");
            c
        }
    }
}
