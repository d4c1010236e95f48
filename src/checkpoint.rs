//! Checkpoints: everything needed to resume training bit for bit, or to serve the model, in a
//! versioned folder behind an atomically replaced `LATEST` pointer.
//!
//! ```text
//! DIR/LATEST                     name of the newest complete version ("ckpt-000000000120-000")
//! DIR/ckpt-000000000120-000/     one version
//!     meta.json                  format, model description (architecture, optimizer), training
//!                                state (step, epoch, position, RNG state, schedule), dataset
//!     dense.safetensors          the dense tensors (MLP weights and biases, cross layers, FM's
//!                                bias: PyTorch state_dict names) and their optimizer state
//!                                ("optim." prefix)
//!     table_000.emb ...          embedding tables (the file format of storage::matrix_file),
//!                                numbered by the table's own index
//!     table_000.state ...        their optimizer state
//!     dataset/                   the dataset's dictionaries or hashing settings, when trained on one
//! ```
//!
//! A save writes a hidden temporary folder, fsyncs every file and the folder, renames it into
//! place, and only then replaces `LATEST` (written to a temporary name, fsynced, renamed, folder
//! fsynced); older versions are pruned last. A process killed at any point therefore leaves
//! `LATEST` naming a complete version. `DLRM_CRASH_AT=<phase>` aborts at a named phase of a save
//! (`<phase>@<rank>`: on that rank of a distributed job only), so that tests can check this
//! deterministically; `DLRM_PAUSE_AT=<phase>` waits there until the save is cancelled, so that
//! tests can interrupt it deterministically.
//!
//! The ranks of a distributed run ([`save_sharded`]) write one such version together: each its
//! own tables, rank 0 the rest, and rank 0 renames it into place only after every rank has
//! synced its files. The version is the one a single process writes (meta.json adds the plan),
//! so it loads, exports and resumes on any number of ranks ([`load_sharded`]) or in one process.
//!
//! Every model is written and read through its [`crate::model::Parameters`] visitor: the
//! meta's `model` and `model_config` say what to build ([`ModelConfig`]), the visitor says
//! which tensor goes where.
//!
//! One run at a time saves into a folder: [`claim`] takes an exclusive `flock` on `DIR/.lock`
//! (held until the run ends) and refuses a folder holding another run's checkpoints. Every
//! version records its run's id (`train_state.run_id`, carried over when a run resumes), and
//! pruning keeps the newest versions of the saving run's lineage only, in step order.

use crate::cancel::{Cancel, note_removed};
use crate::data::binary::{BinaryDataset, encoding_fingerprint_of};
use crate::distributed::{Collectives, LocalRank, Placement, ShardPlan};
use crate::model::architecture::Architecture;
use crate::model::dlrm::{DenseReduction, Dlrm, ShardedDlrm};
use crate::model::embedding::{EmbeddingTable, OptimizerState};
use crate::model::parameters::{Parameters, tensors};
use crate::model::{
    Model, ModelConfig, OptimizerKind, Precision, TableSource, TensorKind, TensorMut,
};
use crate::names::{Field, FieldError};
use crate::rng::derive_key;
use crate::schedule::LrSchedule;
use crate::storage::{RowSpan, StorageKind, map_read_only, state_file_name, table_file_name};
use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the checkpoint layout this build writes and reads.
pub const FORMAT: u32 = 1;
/// The pointer file naming the newest complete version.
pub const LATEST: &str = "LATEST";
const META: &str = "meta.json";
const DENSE: &str = "dense.safetensors";
/// Folder of the dataset's encoding files inside a version.
pub const DATASET_DIR: &str = "dataset";
const VERSION_PREFIX: &str = "ckpt-";
const TEMP_PREFIX: &str = ".tmp-";
/// The lock file a run holds while it may save into the folder (it holds the run's pid).
const LOCK: &str = ".lock";

/// Where training stands: enough to continue exactly where a run stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: u64,
    /// The epoch in progress, and the batches of it completed.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// The batch-order generator's state when this epoch's order was drawn.
    pub epoch_shuffle_state: u64,
    pub lr: LrSchedule,
    pub batch_size: usize,
    pub seed: u64,
    /// The run's identity: random for a new run, carried over when a run resumes (empty in
    /// checkpoints written before runs had one). Pruning keeps to one run's versions.
    #[serde(default)]
    pub run_id: String,
}

/// A fresh random run id (16 hex digits).
pub fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:016x}",
        derive_key(nanos, &[u64::from(std::process::id())])
    )
}

/// A version's meta.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    /// "dlrm", ...
    pub model: String,
    /// The model's own description (for DLRM: architecture and optimizer).
    pub model_config: serde_json::Value,
    pub train_state: TrainState,
    /// Whether the version carries a `dataset/` folder.
    pub dataset: bool,
    /// The training dataset's encoding fingerprint
    /// ([`crate::data::binary::compute_encoding_fingerprint`]); absent in checkpoints written
    /// before it was stored, whose `dataset/` folder gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_fingerprint: Option<String>,
    /// The precision the run trained in (a resume continues in it unless told otherwise).
    /// The parameters are stored as f32 whatever it is; absent (fp32) in checkpoints of f32
    /// runs and in those written before it was stored.
    #[serde(default, skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
    /// The ranks and sharding plan of a distributed run (absent for one process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharding: Option<Sharding>,
}

/// Refuses a dataset whose ids were encoded otherwise than the checkpoint's training data
/// (other dictionaries or hashing, table sizes, dense count): the model would look up rows
/// that mean other values. A checkpoint not trained on a dataset has no encoding to compare.
pub fn check_encoding(version: &Path, meta: &Meta, data: &BinaryDataset) -> Result<()> {
    let trained = match &meta.encoding_fingerprint {
        Some(f) => f.clone(),
        None if meta.dataset => encoding_fingerprint_of(&version.join(DATASET_DIR))?,
        None => return Ok(()),
    };
    let given = data.encoding_fingerprint()?;
    if trained != given {
        let (dataset, version) = (data.dir().to_path_buf(), version.to_path_buf());
        return Err(FieldError::new(move |name| {
            format!(
                "the dataset {} is encoded differently from the data the checkpoint {} was trained on (encoding fingerprint {given}, the checkpoint's {trained}): preprocess its raw rows with {} <the training dataset>, or score them with {}",
                dataset.display(),
                version.display(),
                name(Field::EncodeLike),
                name(Field::RawRows)
            )
        })
        .into());
    }
    Ok(())
}

/// DLRM's model_config.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DlrmConfig {
    pub arch: Architecture,
    pub optimizer: OptimizerKind,
}

/// Any model's model_config: its configuration under its kind's key (`arch` for DLRM, as
/// [`DlrmConfig`] writes it, `dcn`, `fm`) and the optimizer.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SavedModel {
    #[serde(flatten)]
    config: ModelConfig,
    optimizer: OptimizerKind,
}

/// Aborts the process (rank `rank` of its job; a single process is rank 0) if `DLRM_CRASH_AT`
/// names this phase, as `<phase>` (any rank) or `<phase>@<rank>` (the crash tests' hook).
pub fn crash_point(phase: &str, rank: usize) {
    let Ok(at) = std::env::var("DLRM_CRASH_AT") else {
        return;
    };
    if at == phase || at == format!("{phase}@{rank}") {
        log::error!("DLRM_CRASH_AT={at}: rank {rank} aborting");
        std::process::abort();
    }
}

/// Waits at `phase` while `DLRM_PAUSE_AT` names it, until the save is cancelled (the
/// interruption tests' hook; a minute at most), then reports a requested cancellation.
fn pause_point(phase: &str, cancel: &Cancel) -> Result<()> {
    if std::env::var("DLRM_PAUSE_AT").is_ok_and(|p| p == phase) {
        log::warn!("DLRM_PAUSE_AT={phase}: paused");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while cancel.requested().is_none() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    cancel.check()?;
    Ok(())
}

/// An exclusive lock on a checkpoint folder, held while a run may save into it; released when
/// dropped or when the process ends, however it ends.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

/// Locks checkpoint folder `dir` (created if needed) for this process, failing at once if
/// another process holds it.
pub fn lock(dir: &Path) -> Result<FolderLock> {
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let path = dir.join(LOCK);
    // Not truncated on open: the holder's pid stays readable for the error of a run that
    // finds the folder locked.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    use rustix::fs::{FlockOperation, flock};
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let pid = match holder.trim() {
                "" => "unknown",
                pid => pid,
            };
            bail!(
                "{}: another run (pid {}) is saving checkpoints into this folder (it holds {}); wait for it to end or save elsewhere",
                dir.display(),
                pid,
                path.display()
            );
        }
        Err(e) => {
            return Err(std::io::Error::from(e))
                .with_context(|| format!("{}: cannot lock", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(FolderLock { _file: file })
}

/// Locks `dir` for a run that will save into it, and checks that the folder is this run's:
/// empty, or the folder of `resumed_from` (the version the run resumes from). A folder holding
/// another run's checkpoints is an error, unless `overwrite`, which removes that run's versions
/// and `LATEST` now (other files in the folder stay).
pub fn claim(dir: &Path, resumed_from: Option<&Path>, overwrite: bool) -> Result<FolderLock> {
    let lock = lock(dir)?;
    let same_folder = |version: &Path| -> bool {
        let parent = version.parent().unwrap_or(Path::new("."));
        match (parent.canonicalize(), dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    };
    if resumed_from.is_some_and(same_folder) {
        return Ok(lock);
    }
    let old = versions(dir)?;
    let latest = dir.join(LATEST);
    if old.is_empty() && !latest.exists() {
        return Ok(lock);
    }
    if !overwrite {
        let (dir, old) = (dir.to_path_buf(), old.join(", "));
        return Err(FieldError::new(move |name| {
            format!(
                "{} {}: holds the checkpoints of another run ({old}); continue that run with {} {}, replace its checkpoints with {}, or save elsewhere",
                name(Field::SaveModel),
                dir.display(),
                name(Field::LoadModel),
                dir.display(),
                name(Field::Overwrite)
            )
        })
        .into());
    }
    for name in &old {
        let path = dir.join(name);
        fs::remove_dir_all(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
    }
    if latest.exists() {
        fs::remove_file(&latest).with_context(|| format!("{}: cannot remove", latest.display()))?;
    }
    sync_dir(dir)?;
    Ok(lock)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync the folder", dir.display()))
}

fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Makes `files` durable, in parallel: writing all the files first and syncing them together
/// lets the kernel write them back at once instead of one file per round trip.
fn sync_files(files: &[PathBuf]) -> Result<()> {
    use rayon::prelude::*;
    files.par_iter().try_for_each(|p| {
        File::open(p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: cannot sync", p.display()))
    })
}

/// The version folders of `dir`, oldest first (names sort by step, then sequence).
fn versions(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(VERSION_PREFIX))
        .collect();
    v.sort();
    Ok(v)
}

/// The run id a version's meta.json records (None if it cannot be read).
fn run_id_of(version: &Path) -> Option<String> {
    let text = fs::read_to_string(version.join(META)).ok()?;
    let meta: Meta = serde_json::from_str(&text).ok()?;
    Some(meta.train_state.run_id)
}

/// Saves a checkpoint of `model` at `state` into `dir` (created if needed) as a new version,
/// copies the files of `dataset_files` (if any) into its dataset folder, points `LATEST` at it
/// and keeps the newest `keep` versions of the run `state.run_id`. Returns the version's path.
/// A failed or cancelled save removes its temporary folder; once the version is renamed into
/// place the save completes whatever `cancel` says.
pub fn save(
    dir: &Path,
    model: &dyn Model,
    state: &TrainState,
    dataset_files: Option<&Path>,
    keep: usize,
    cancel: &Cancel,
) -> Result<PathBuf> {
    let share = Share {
        comm: &LocalRank::single(),
        tensors: model,
        described: model,
        writes_table: &|_| Some(TablePart::Whole),
        sharding: None,
    };
    save_share(dir, &share, state, dataset_files, keep, cancel)
}

/// How the ranks of a job trained the checkpoint (meta.json's `sharding`; informational: a
/// resume on any number of ranks plans its own placement and loads the same table files).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sharding {
    pub ranks: usize,
    /// The [`ShardPlan`] the ranks trained under.
    pub plan: serde_json::Value,
}

/// Saves rank `comm.rank()`'s share of a checkpoint of the [`ShardedDlrm`] the ranks of `comm`
/// train, as [`save`] saves one process's model; every rank calls it at the same step. The
/// version is one a single process writes (same files and names), so it loads, resumes and
/// exports as one, on any number of ranks:
///
/// - each rank writes the table files of the tables it owns, rank 0 also those of the
///   replicated tables, `dense.safetensors`, the dataset files and `meta.json` (with the plan);
/// - a table split row-wise is one file too (one for its state): each range's owner writes
///   the same header and its rows at their offset, all at once (the file is created and
///   sized by whoever comes first, never truncated), so the file is the one a single process
///   writes once every owner has synced;
/// - each rank fsyncs what it wrote, and the ranks agree (a gather of every rank's outcome,
///   which no rank passes before all have arrived) that every part is durable;
/// - only then does rank 0 rename the folder into place and replace `LATEST`.
///
/// A rank that fails or dies before the agreement leaves `LATEST` on the previous version
/// (the others return an error naming it, or the job ends by the collective timeout).
///
/// The folder must be one every rank reaches (a shared file system across machines).
/// `DLRM_CRASH_AT=<phase>` aborts every rank at that phase; `DLRM_CRASH_AT=<phase>@<rank>`
/// only rank `<rank>`.
pub fn save_sharded(
    dir: &Path,
    comm: &dyn Collectives,
    model: &ShardedDlrm,
    state: &TrainState,
    dataset_files: Option<&Path>,
    keep: usize,
    cancel: &Cancel,
) -> Result<PathBuf> {
    let (plan, rank) = (model.plan(), comm.rank());
    let writes_table = |t: usize| match &plan.placement[t] {
        Placement::Owner(owner) => (*owner == rank).then_some(TablePart::Whole),
        Placement::Replicated => (rank == 0).then_some(TablePart::Whole),
        // Every range's owner writes its rows into the one file (a rank with an empty range
        // holds no shard of the table and writes nothing).
        Placement::Rows(bounds) => Some(TablePart::Rows(RowSpan {
            first: bounds[rank],
            total: bounds[bounds.len() - 1],
        })),
    };
    let share = Share {
        comm,
        tensors: model,
        described: model.local(),
        writes_table: &writes_table,
        sharding: Some(Sharding {
            ranks: comm.size(),
            plan: serde_json::to_value(plan)?,
        }),
    };
    save_share(dir, &share, state, dataset_files, keep, cancel)
}

/// What a process writes of a table it holds.
#[derive(Clone, Copy, Debug)]
enum TablePart {
    /// The whole table's files.
    Whole,
    /// Its row-wise shard, at its rows' offset in the whole table's files, which the owners of
    /// the other ranges write at the same time ([`crate::storage::MatrixFile::write_rows_to_dir`]).
    Rows(RowSpan),
}

/// One process's share of a save by the `comm.size()` processes of a job (one process: all).
struct Share<'a> {
    comm: &'a dyn Collectives,
    /// This process's tensors.
    tensors: &'a dyn Parameters,
    /// The model meta.json describes (its name, configuration, optimizer, precision).
    described: &'a dyn Model,
    /// What this process writes of table t (by its index in the whole model), if anything.
    writes_table: &'a dyn Fn(usize) -> Option<TablePart>,
    sharding: Option<Sharding>,
}

/// The save protocol of [`save`] and [`save_sharded`]: rank 0 names the version and creates
/// its temporary folder, every rank writes and syncs its part, and once all agree that every
/// part is durable, rank 0 publishes it (rename, `LATEST`, pruning).
fn save_share(
    dir: &Path,
    share: &Share,
    state: &TrainState,
    dataset_files: Option<&Path>,
    keep: usize,
    cancel: &Cancel,
) -> Result<PathBuf> {
    let (comm, lead) = (share.comm, share.comm.rank() == 0);
    let prepared = match lead {
        true => prepare_version(dir, state, cancel).map(|seq| seq as f64),
        false => Ok(0.0),
    };
    let seq = agree(comm, "prepare the checkpoint folder", prepared)?[0] as usize;
    let name = version_name(state.step, seq);
    let tmp = dir.join(temp_name(&name));
    let written = write_share(&tmp, share, state, dataset_files, cancel).map(|()| 0.0);
    // Every rank takes the same path from here: all return at a failed agreement.
    let published = match agree(comm, "write its part of the checkpoint", written) {
        Ok(_) if lead => publish(dir, &tmp, &name, state, keep),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    let published = published.map_err(|e| {
        if lead && tmp.exists() {
            // Never renamed into place, and no rank writes into it after the agreement.
            let _ = fs::remove_dir_all(&tmp);
            return note_removed(e, &tmp);
        }
        e
    });
    agree(comm, "publish the checkpoint", published.map(|()| 0.0))?;
    Ok(dir.join(name))
}

/// Every rank's outcome of a phase of a save, gathered (no rank returns before all have
/// arrived): the values, if every rank succeeded; else this rank's own error, or one naming
/// the ranks that failed to `what`.
fn agree(comm: &dyn Collectives, what: &str, outcome: Result<f64>) -> Result<Vec<f64>> {
    // NaN marks a failure (the values exchanged are counts, never NaN).
    let all = comm.all_gather_f64(*outcome.as_ref().unwrap_or(&f64::NAN));
    outcome?;
    let failed: Vec<String> = (all.iter().enumerate())
        .filter(|(_, v)| v.is_nan())
        .map(|(q, _)| q.to_string())
        .collect();
    ensure!(
        failed.is_empty(),
        "rank {} could not {what} (its error is in its output)",
        failed.join(", ")
    );
    Ok(all)
}

fn version_name(step: u64, seq: usize) -> String {
    format!("{VERSION_PREFIX}{step:012}-{seq:03}")
}

/// The temporary folder of version `name`: named by the version alone, so that every rank of
/// a job names it alike (the folder lock keeps other runs from saving beside it).
fn temp_name(name: &str) -> String {
    format!("{TEMP_PREFIX}{name}")
}

/// Creates `dir` if needed and the empty temporary folder of the next version at `state`;
/// returns its sequence number among the versions of the same step.
fn prepare_version(dir: &Path, state: &TrainState, cancel: &Cancel) -> Result<usize> {
    cancel.check()?;
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let base = format!("{VERSION_PREFIX}{:012}-", state.step);
    let seq = versions(dir)?
        .iter()
        .filter(|n| n.starts_with(&base))
        .count();
    let tmp = dir.join(temp_name(&version_name(state.step, seq)));
    if tmp.exists() {
        // Left by a save that was killed: never published, so nobody's.
        fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| {
        format!(
            "{}: cannot create a temporary folder {}",
            dir.display(),
            tmp.display()
        )
    })?;
    Ok(seq)
}

/// Renames the complete, synced folder `tmp` into place as version `name` of `dir`, points
/// `LATEST` at it and prunes: the newest `keep` versions of the run stay.
fn publish(dir: &Path, tmp: &Path, name: &str, state: &TrainState, keep: usize) -> Result<()> {
    // Every rank synced its files; the folder's entries are made durable once, here.
    sync_dir(tmp)?;
    let version = dir.join(name);
    fs::rename(tmp, &version)
        .with_context(|| format!("{}: cannot rename to {}", tmp.display(), version.display()))?;
    sync_dir(dir)?;
    crash_point("renamed", 0);

    let latest_tmp = dir.join(format!("{TEMP_PREFIX}{LATEST}"));
    let replace_latest = || -> Result<()> {
        write_durable(&latest_tmp, format!("{name}\n").as_bytes())?;
        crash_point("latest-written", 0);
        fs::rename(&latest_tmp, dir.join(LATEST))
            .with_context(|| format!("{}: cannot replace {LATEST}", dir.display()))
    };
    replace_latest().inspect_err(|_| {
        let _ = fs::remove_file(&latest_tmp);
    })?;
    sync_dir(dir)?;
    crash_point("latest-replaced", 0);

    // Prune: this run's versions beyond the newest `keep` (never the one just written; other
    // runs' versions are not this run's to remove), and temporary folders left by interrupted
    // saves.
    let ours: Vec<String> = versions(dir)?
        .into_iter()
        .filter(|n| run_id_of(&dir.join(n)).as_deref() == Some(state.run_id.as_str()))
        .collect();
    let excess = ours.len().saturating_sub(keep.max(1));
    for old in ours.iter().take(excess).filter(|n| **n != name) {
        fs::remove_dir_all(dir.join(old))
            .with_context(|| format!("{}: cannot prune", dir.join(old).display()))?;
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let n = entry.file_name();
        if n.to_string_lossy().starts_with(TEMP_PREFIX) && entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        }
    }
    crash_point("pruned", 0);
    Ok(())
}

/// Writes and syncs this process's share of a version of the model at `state` into the
/// folder `tmp`: its tables; on rank 0 also the dense tensors, the dataset files and meta.json.
fn write_share(
    tmp: &Path,
    share: &Share,
    state: &TrainState,
    dataset_files: Option<&Path>,
    cancel: &Cancel,
) -> Result<()> {
    let (rank, lead) = (share.comm.rank(), share.comm.rank() == 0);
    let mut written = save_tables(share.tensors, tmp, share.writes_table)?;
    crash_point("tables", rank);
    if lead {
        written.push(save_dense(share.tensors, tmp)?);
    }
    crash_point("parameters", rank);
    pause_point("parameters", cancel)?;
    if lead {
        if let Some(src) = dataset_files {
            copy_dataset_files(src, &tmp.join(DATASET_DIR))?;
        }
        let model = share.described;
        let meta = Meta {
            format: FORMAT,
            model: model.name().to_string(),
            model_config: serde_json::to_value(SavedModel {
                config: model.config(),
                optimizer: model.optimizer(),
            })?,
            train_state: state.clone(),
            dataset: dataset_files.is_some(),
            encoding_fingerprint: dataset_files.map(encoding_fingerprint_of).transpose()?,
            precision: model.precision(),
            sharding: share.sharding.clone(),
        };
        write_durable(
            &tmp.join(META),
            serde_json::to_string_pretty(&meta)?.as_bytes(),
        )?;
    }
    sync_files(&written)?;
    crash_point("synced", rank);
    pause_point("synced", cancel)
}

/// Copies the dataset's top-level files (its header and dictionaries; the large arrays live in
/// its split folders and stay behind) from `src` into the new folder `dst`, synced.
fn copy_dataset_files(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir(dst).with_context(|| format!("{}: cannot create", dst.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("{}: cannot list", src.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let to = dst.join(entry.file_name());
            fs::copy(entry.path(), &to)
                .with_context(|| format!("{}: cannot copy", entry.path().display()))?;
            File::open(&to)?.sync_all()?;
        }
    }
    sync_dir(dst)
}

/// The version `LATEST` in `dir` names (or `dir` itself if it is a version folder).
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if dir.join(META).is_file() {
        return Ok(dir.to_path_buf());
    }
    let pointer = dir.join(LATEST);
    let name = fs::read_to_string(&pointer).with_context(|| {
        format!(
            "{}: no checkpoint here (cannot read {LATEST})",
            dir.display()
        )
    })?;
    let name = name.trim();
    ensure!(
        name.starts_with(VERSION_PREFIX) && !name.contains('/'),
        "{}: names '{name}', which is not a checkpoint version",
        pointer.display()
    );
    let version = dir.join(name);
    ensure!(
        version.join(META).is_file(),
        "{}: names {}, which has no {META}",
        pointer.display(),
        version.display()
    );
    Ok(version)
}

/// Reads and checks a version's meta.json.
pub fn read_meta(version: &Path) -> Result<Meta> {
    let path = version.join(META);
    let text =
        fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let meta: Meta =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))?;
    ensure!(
        meta.format == FORMAT,
        "{}: checkpoint format {}, this build reads format {FORMAT}",
        path.display(),
        meta.format
    );
    Ok(meta)
}

/// Writes (name, shape, values) tensors as a safetensors file, fsynced.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, s, v)| {
            let bytes = bytemuck::cast_slice(v);
            Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let data = safetensors::serialize(views, None)?;
    write_durable(path, &data)
}

/// How a load treats the values it reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Accept NaN and infinite parameters (`--allow-non-finite`); by default the first one is
    /// an error naming the tensor and its index.
    pub allow_non_finite: bool,
}

/// Refuses `values` (tensor `name` of `shape` in `file`) if any is NaN or infinite, unless
/// `opts` allows it: the error names the tensor and the index of the first such value.
pub fn check_finite(
    file: &Path,
    name: &str,
    shape: &[usize],
    values: &[f32],
    opts: LoadOptions,
) -> Result<()> {
    if opts.allow_non_finite {
        return Ok(());
    }
    let Some(flat) = crate::model::first_non_finite_index(values) else {
        return Ok(());
    };
    // Row-major index of the flat position, e.g. [row, column] of a matrix.
    let mut index = vec![0; shape.len()];
    let mut rest = flat;
    for (i, &n) in index.iter_mut().zip(shape).rev() {
        *i = rest % n.max(1);
        rest /= n.max(1);
    }
    let (file, tensor, value) = (file.display().to_string(), name.to_string(), values[flat]);
    Err(FieldError::new(move |name| {
        format!(
            "{file}: tensor {tensor} holds {value} at index {index:?}; pass {} to load it anyway",
            name(Field::AllowNonFinite)
        )
    })
    .into())
}

/// Tensor `name` of a safetensors file, checked to be F32 of `shape`.
fn checked_tensor<'a>(
    st: &'a SafeTensors,
    file: &Path,
    name: &str,
    shape: &[usize],
) -> Result<TensorView<'a>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{}: no tensor {name}", file.display()))?;
    ensure!(
        t.dtype() == Dtype::F32,
        "{}: tensor {name} is {:?}, expected F32",
        file.display(),
        t.dtype()
    );
    ensure!(
        t.shape() == shape,
        "{}: tensor {name} has shape {:?}, the model expects {shape:?}",
        file.display(),
        t.shape()
    );
    Ok(t)
}

/// Reads tensor `name` of a safetensors file into `out`, checking its dtype, its shape and
/// (unless `opts` allows otherwise) that every value is finite.
pub fn read_tensor(
    st: &SafeTensors,
    file: &Path,
    name: &str,
    shape: &[usize],
    out: &mut [f32],
    opts: LoadOptions,
) -> Result<()> {
    let t = checked_tensor(st, file, name, shape)?;
    copy_f32s(t.data(), out);
    check_finite(file, name, shape, out, opts)
}

/// Copies little-endian f32 bytes (a safetensors tensor, aligned or not) into `out`: the one
/// bytes-to-floats conversion of checkpoints and imports (the host is little-endian, as the
/// table files assume).
fn copy_f32s(bytes: &[u8], out: &mut [f32]) {
    bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
}

/// Writes what `writes_table` selects of the tables of `model` (by index in the whole model)
/// and of their optimizer state into a checkpoint folder's table files; returns the files
/// written.
fn save_tables(
    model: &dyn Parameters,
    dir: &Path,
    writes_table: &dyn Fn(usize) -> Option<TablePart>,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (_, _, t) in &tensors(model) {
        if let TensorKind::Table { table, state } = t.kind {
            match writes_table(table.index()) {
                None => {}
                Some(TablePart::Whole) => {
                    written.push(table.write_to_dir(dir)?);
                    written.extend(state.write_to_dir(dir, table)?);
                }
                Some(TablePart::Rows(span)) => {
                    written.push(table.write_rows_to_dir(dir, span)?);
                    written.extend(state.write_rows_to_dir(dir, table, span)?);
                }
            }
        }
    }
    Ok(written)
}

/// Writes the dense tensors of `model` and their optimizer state ("optim." prefix) into a
/// checkpoint folder's safetensors file; returns its path.
fn save_dense(model: &dyn Parameters, dir: &Path) -> Result<PathBuf> {
    let all = tensors(model);
    let mut dense: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    let values: Vec<_> = all.iter().map(|(_, _, t)| t.values()).collect();
    for ((name, shape, t), values) in all.iter().zip(&values) {
        if let TensorKind::Dense = t.kind {
            if !t.state.is_empty() {
                dense.push((format!("optim.{name}"), shape.clone(), t.state));
            }
            dense.push((name.clone(), shape.clone(), values));
        }
    }
    let path = dir.join(DENSE);
    write_safetensors(&path, &dense)?;
    Ok(path)
}

/// The DLRM description of a version's meta, with its architecture checked as the
/// architecture flags are (a hand-edited or corrupt meta.json is an error, not a panic).
pub fn read_dlrm_config(version: &Path, meta: &Meta) -> Result<DlrmConfig> {
    let path = version.join(META);
    ensure!(
        meta.model == "dlrm",
        "{}: holds a {} model, not dlrm",
        version.display(),
        meta.model
    );
    let cfg: DlrmConfig = serde_json::from_value(meta.model_config.clone())
        .with_context(|| format!("{}: malformed model_config", path.display()))?;
    let arch = cfg
        .arch
        .validated()
        .with_context(|| format!("{}: invalid model_config.arch", path.display()))?;
    Ok(DlrmConfig { arch, ..cfg })
}

/// The model a version's meta describes, and its optimizer (a DLRM's architecture checked as
/// [`read_dlrm_config`] does).
pub fn read_model_config(version: &Path, meta: &Meta) -> Result<(ModelConfig, OptimizerKind)> {
    if meta.model == "dlrm" {
        let cfg = read_dlrm_config(version, meta)?;
        return Ok((ModelConfig::Dlrm(cfg.arch), cfg.optimizer));
    }
    let path = version.join(META);
    let saved: SavedModel = serde_json::from_value(meta.model_config.clone())
        .with_context(|| format!("{}: malformed model_config", path.display()))?;
    let kind = saved.config.kind().name();
    ensure!(
        kind == meta.model,
        "{}: model is {} but model_config describes a {kind} model",
        path.display(),
        meta.model
    );
    Ok((saved.config, saved.optimizer))
}

/// Loads any model's checkpoint version into `storage` (anonymous: read into memory; file:
/// mapped copy-on-write, so training never writes through to the checkpoint), checking every
/// file against the meta's description and (unless `opts` allows otherwise) that every value
/// is finite.
pub fn load_model(
    version: &Path,
    storage: &StorageKind,
    opts: LoadOptions,
) -> Result<(Box<dyn Model>, Meta)> {
    let meta = read_meta(version)?;
    let (config, optimizer) = read_model_config(version, &meta)?;
    let model = load_parameters(version, storage, opts, &config, optimizer, |source| {
        config.build(optimizer, 0, source)
    })?;
    Ok((model, meta))
}

/// The model `build` makes over the tables of `version` (in `storage`), its dense parameters
/// and their optimizer state read from the version's file (checked against `config` before
/// anything is built).
fn load_parameters<M: std::ops::DerefMut<Target: crate::model::Parameters>>(
    version: &Path,
    storage: &StorageKind,
    opts: LoadOptions,
    config: &ModelConfig,
    optimizer: OptimizerKind,
    build: impl FnOnce(TableSource) -> Result<M>,
) -> Result<M> {
    let dense = DenseFile::open(version, config, optimizer)?;
    let mut model = build(TableSource::Files {
        dir: version,
        storage,
    })?;
    dense.read_into(&mut *model, version, opts)?;
    Ok(model)
}

/// Loads a DLRM checkpoint version into `storage` (as [`load_model`]), refusing non-finite
/// parameters.
pub fn load_dlrm(version: &Path, storage: &StorageKind) -> Result<(Dlrm, Meta)> {
    load_dlrm_with(version, storage, LoadOptions::default())
}

/// [`load_dlrm`] with explicit [`LoadOptions`].
pub fn load_dlrm_with(
    version: &Path,
    storage: &StorageKind,
    opts: LoadOptions,
) -> Result<(Dlrm, Meta)> {
    let meta = read_meta(version)?;
    let cfg = read_dlrm_config(version, &meta)?;
    let config = ModelConfig::Dlrm(cfg.arch.clone());
    let model = load_parameters(version, storage, opts, &config, cfg.optimizer, |source| {
        Ok(Box::new(Dlrm::build(cfg.arch, cfg.optimizer, 0, source)?))
    })?;
    Ok((*model, meta))
}

/// Loads rank `rank`'s share of a DLRM checkpoint version under `plan` (any number of ranks,
/// whatever the ranks that wrote it): the tables it owns, the replicas, and its ranges of the
/// tables split row-wise (only those rows read) from their table files into `storage`, the dense parameters and their optimizer state, as [`load_dlrm`]
/// loads the whole model.
pub fn load_sharded(
    version: &Path,
    storage: &StorageKind,
    opts: LoadOptions,
    plan: ShardPlan,
    rank: usize,
    reduction: DenseReduction,
) -> Result<(ShardedDlrm, Meta)> {
    let meta = read_meta(version)?;
    let cfg = read_dlrm_config(version, &meta)?;
    let config = ModelConfig::Dlrm(cfg.arch.clone());
    let model = load_parameters(version, storage, opts, &config, cfg.optimizer, |source| {
        let model = ShardedDlrm::new(cfg.arch, cfg.optimizer, 0, source, plan, rank, reduction)?;
        Ok(Box::new(model))
    })?;
    Ok((*model, meta))
}

/// A version's dense.safetensors, mapped (deserialized in place, never read whole).
struct DenseFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl DenseFile {
    /// Maps the file and checks that it holds every dense tensor of `config` (and its
    /// optimizer state for Adagrad) in F32 of the right shape, before the model is built: a
    /// corrupt width in the meta is an error, not an allocation failure.
    fn open(version: &Path, config: &ModelConfig, optimizer: OptimizerKind) -> Result<DenseFile> {
        let path = version.join(DENSE);
        let map =
            map_read_only(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let file = DenseFile { path, map };
        let st = file.tensors()?;
        for (name, shape) in config.dense_shapes() {
            checked_tensor(&st, &file.path, &name, &shape)?;
            if optimizer.dense_adagrad() {
                checked_tensor(&st, &file.path, &format!("optim.{name}"), &shape)?;
            }
        }
        Ok(file)
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map)
            .with_context(|| format!("{}: not a safetensors file", self.path.display()))
    }

    /// Reads every dense tensor of `model` and its state from the file, and checks its
    /// tables (loaded from `version`) for non-finite values, unless `opts` allows them.
    fn read_into(
        &self,
        model: &mut (impl crate::model::Parameters + ?Sized),
        version: &Path,
        opts: LoadOptions,
    ) -> Result<()> {
        let st = self.tensors()?;
        let path = &self.path;
        let mut result = Ok(());
        model.parameters_mut(&mut |(name, shape, tensor)| {
            if result.is_err() {
                return;
            }
            result = match tensor {
                TensorMut::Dense { values, state } => {
                    read_tensor(&st, path, &name, &shape, values, opts).and_then(|()| {
                        if state.is_empty() {
                            return Ok(());
                        }
                        let state_name = format!("optim.{name}");
                        read_tensor(&st, path, &state_name, &shape, state, opts)
                    })
                }
                TensorMut::Table { table, state } => {
                    check_table_finite(version, &name, &shape, table, state, opts)
                }
            };
        });
        result
    }
}

/// Refuses a loaded table or its state holding a NaN or infinite value (unless `opts` allows
/// it), naming its file in `version`, the tensor and the index.
fn check_table_finite(
    version: &Path,
    name: &str,
    shape: &[usize],
    table: &EmbeddingTable,
    state: &OptimizerState,
    opts: LoadOptions,
) -> Result<()> {
    let table_path = version.join(table_file_name(table.index()));
    check_finite(&table_path, name, shape, &table.values(), opts)?;
    let state_path = version.join(state_file_name(table.index()));
    let state_shape = [state.rows(), state.width()];
    let state_name = format!("optim.{name}");
    check_finite(
        &state_path,
        &state_name,
        &state_shape,
        state.as_slice(),
        opts,
    )
}
