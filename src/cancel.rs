//! Cooperative cancellation of long-running work (training, preprocessing, checkpoint saves),
//! and the partial outputs such work leaves when it is killed.
//!
//! The caller owns the flag (the CLI sets it from SIGINT/SIGTERM handlers) and passes a
//! [`Cancel`] explicitly into the work, which checks it between steps or chunks and returns
//! [`Interrupted`]; the guards that own partial outputs remove them as the error propagates and
//! record what they removed in it, so the caller can say so.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A cancellation request: 0 while the work may go on, else the number of the signal (or any
/// other non-zero reason) that asked it to stop.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicUsize>);

impl Cancel {
    /// A handle on `flag`, which whoever requests the cancellation sets to a non-zero value.
    pub fn new(flag: Arc<AtomicUsize>) -> Cancel {
        Cancel(flag)
    }

    /// A handle that is never cancelled.
    pub fn never() -> Cancel {
        Cancel::default()
    }

    /// The non-zero reason if cancellation was requested.
    pub fn requested(&self) -> Option<usize> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            reason => Some(reason),
        }
    }

    /// `Err(Interrupted)` once cancellation was requested.
    pub fn check(&self) -> Result<(), Interrupted> {
        match self.requested() {
            None => Ok(()),
            Some(reason) => Err(Interrupted {
                reason,
                removed: Vec::new(),
            }),
        }
    }
}

/// Work stopped because cancellation was requested; `removed` lists the partial outputs
/// removed on the way out.
#[derive(Debug)]
pub struct Interrupted {
    /// The cancellation's reason (for the CLI: the signal number).
    pub reason: usize,
    pub removed: Vec<PathBuf>,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "interrupted")?;
        if !self.removed.is_empty() {
            let removed: Vec<String> = self
                .removed
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            write!(f, ": removed {}", removed.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for Interrupted {}

/// Records in `err`, if it is an interruption, that `path` was removed.
pub fn note_removed(mut err: anyhow::Error, path: &Path) -> anyhow::Error {
    if let Some(i) = err.downcast_mut::<Interrupted>() {
        i.removed.push(path.to_path_buf());
    }
    err
}

/// `target` with `.partial-<pid>` appended to its file name: where this process writes `target`
/// before renaming it into place.
pub fn partial_path(target: &Path) -> anyhow::Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{} does not name a file or folder", target.display()))?;
    let mut partial = name.to_os_string();
    partial.push(format!(".partial-{}", std::process::id()));
    Ok(target.with_file_name(partial))
}

/// Removes the `<target>.partial-<pid>` files and folders that processes no longer running
/// left beside `target` (killed before they could clean up); returns what it removed.
pub fn remove_stale_partials(target: &Path) -> Vec<PathBuf> {
    let (Some(name), Some(parent)) = (target.file_name(), target.parent()) else {
        return Vec::new();
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!("{}.partial-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// A file written at `<target>.partial-<pid>` ([`partial_path`]) and renamed onto `target` by
/// [`PartialFile::commit`]; dropped uncommitted (an error or a cancellation on the way), it is
/// removed, so no half-written output ever stands where a finished one would. It is created
/// with the process umask, like any output.
pub struct PartialFile {
    path: PathBuf,
    target: PathBuf,
    file: Option<std::fs::File>,
}

impl PartialFile {
    /// Creates the partial file of `target`, after removing those that killed processes left.
    pub fn create(target: &Path) -> anyhow::Result<PartialFile> {
        use anyhow::Context;
        remove_stale_partials(target);
        let path = partial_path(target)?;
        let file = std::fs::File::create(&path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        Ok(PartialFile {
            path,
            target: target.to_path_buf(),
            file: Some(file),
        })
    }

    /// Where the data goes until the commit.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &std::fs::File {
        self.file.as_ref().expect("the file is open until commit")
    }

    /// Makes the data durable and renames the file onto its target.
    pub fn commit(mut self) -> anyhow::Result<()> {
        use anyhow::Context;
        let file = self.file.take().expect("the file is open until commit");
        file.sync_all()
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        drop(file);
        std::fs::rename(&self.path, &self.target).with_context(|| {
            format!(
                "renaming {} to {}",
                self.path.display(),
                self.target.display()
            )
        })?;
        // Renamed: nothing is left for the drop to remove.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
