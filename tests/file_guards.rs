//! Files, locks, cleanup and signals: one run per checkpoint folder, pruning within a run's
//! lineage, outputs that never replace their inputs or existing files unasked, table creation
//! that checks space first and leaves nothing behind, and SIGINT/SIGTERM that stop the work,
//! remove partial outputs and exit 130/143.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("dlrm-file-guards-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn dlrm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dlrm"))
}

fn run(args: &[&str]) -> Output {
    dlrm().args(args).output().expect("run dlrm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// Asserts a clean error: exit status 1, no panic, and stderr containing every `needle`.
fn assert_error(o: &Output, needles: &[&str]) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}: {e}");
    }
    e
}

/// The names in `dir` that start with `prefix`.
fn entries(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn table_creation_checks_space_and_collisions_before_making_any_file() {
    let dir = Scratch::new("tables");
    let tables = dir.path("tables");
    std::fs::create_dir(&tables).unwrap();
    let train = |extra: &[&str]| {
        let args = [
            "train",
            "--embedding-storage",
            "file",
            "--tables-dir",
            s(&tables),
            "--num-batches",
            "2",
            "--threads",
            "2",
            "--print-freq=0",
        ];
        run(&[&args[..], extra].concat())
    };
    // The last table alone needs 4e9 x 16 x 4 bytes = 256 GB, more than the file system has;
    // the first tables fit. The check covers the whole model before the first file is made.
    let o = train(&["--arch-embedding-size", "100-200-4000000000"]);
    assert_error(&o, &[s(&tables), "needs", "free"]);
    assert_eq!(entries(&tables, ""), Vec::<String>::new());

    // A table file in the way: an error naming it, before any other file is made.
    std::fs::write(tables.join("table_001.emb"), "someone else's").unwrap();
    let o = train(&["--arch-embedding-size", "100-200-300"]);
    assert_error(&o, &["table_001.emb"]);
    assert_eq!(entries(&tables, ""), ["table_001.emb"]);
    std::fs::remove_file(tables.join("table_001.emb")).unwrap();
    // The rerun with the obstacle gone succeeds.
    assert_ok(&train(&["--arch-embedding-size", "100-200-300"]));
}
