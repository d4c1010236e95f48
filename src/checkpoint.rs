//! Checkpoints: everything needed to resume training bit for bit, or to serve the model, in a
//! versioned folder behind an atomically replaced `LATEST` pointer.
//!
//! ```text
//! DIR/LATEST                     name of the newest complete version ("ckpt-000000000120-000")
//! DIR/ckpt-000000000120-000/     one version
//!     meta.json                  format, model description (architecture, optimizer), training
//!                                state (step, epoch, position, RNG state, schedule), dataset
//!     dense.safetensors          MLP weights and biases (PyTorch state_dict names) and their
//!                                optimizer state ("optim." prefix)
//!     table_000.emb ...          embedding tables (the table file format of embedding_tables)
//!     table_000.state ...        their optimizer state
//!     dataset/                   the dataset's dictionaries or hashing settings, when trained on one
//! ```
//!
//! A save writes a hidden temporary folder, fsyncs every file and the folder, renames it into
//! place, and only then replaces `LATEST` (written to a temporary name, fsynced, renamed, folder
//! fsynced); older versions are pruned last. A process killed at any point therefore leaves
//! `LATEST` naming a complete version. `DLRM_CRASH_AT=<phase>` aborts at a named phase of a save,
//! so that tests can check this deterministically; `DLRM_PAUSE_AT=<phase>` waits there until the
//! save is cancelled, so that tests can interrupt it deterministically.
//!
//! One run at a time saves into a folder: [`claim`] takes an exclusive `flock` on `DIR/.lock`
//! (held until the run ends) and refuses a folder holding another run's checkpoints. Every
//! version records its run's id (`train_state.run_id`, carried over when a run resumes), and
//! pruning keeps the newest versions of the saving run's lineage only, in step order.

use crate::cancel::{Cancel, note_removed};
use crate::data::binary::{BinaryDataset, encoding_fingerprint_of};
use crate::model::architecture::Architecture;
use crate::model::dlrm::Dlrm;
use crate::model::embedding_tables::{
    EmbeddingTable, OptimizerState, StorageKind, state_file_name, table_file_name,
};
use crate::model::mlp::{Mlp, layer_names};
use crate::model::{Model, OptimizerKind};
use crate::rng::{SplitMix64, derive_key};
use crate::schedule::LrSchedule;
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
    ensure!(
        trained == given,
        "the dataset {} is encoded differently from the data the checkpoint {} was trained on (encoding fingerprint {given}, the checkpoint's {trained}): preprocess its raw rows with --encode-like <the training dataset>, or score them with --criteo",
        data.dir().display(),
        version.display()
    );
    Ok(())
}

/// DLRM's model_config.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DlrmConfig {
    pub arch: Architecture,
    pub optimizer: OptimizerKind,
}

/// Aborts the process if `DLRM_CRASH_AT` names this phase (the crash tests' hook).
pub fn crash_point(phase: &str) {
    if std::env::var("DLRM_CRASH_AT").is_ok_and(|p| p == phase) {
        log::error!("DLRM_CRASH_AT={phase}: aborting");
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
    ensure!(
        overwrite,
        "--save-model {}: holds the checkpoints of another run ({}); continue that run with --load-model {}, replace its checkpoints with --overwrite, or save elsewhere",
        dir.display(),
        old.join(", "),
        dir.display()
    );
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

/// Makes every file of `dir` durable, in parallel: writing all the files first and syncing
/// them together lets the kernel write them back at once instead of one file per round trip.
fn sync_files(dir: &Path) -> Result<()> {
    use rayon::prelude::*;
    let files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
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
    cancel.check()?;
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let existing = versions(dir)?;
    let base = format!("{VERSION_PREFIX}{:012}", state.step);
    let seq = existing.iter().filter(|n| n.starts_with(&base)).count();
    let name = format!("{base}-{seq:03}");
    // Removed on drop: a failed or interrupted save leaves nothing behind.
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{name}-"))
        .tempdir_in(dir)
        .with_context(|| format!("{}: cannot create a temporary folder", dir.display()))?;
    let tmp_path = tmp.path().to_path_buf();
    write_version(&tmp_path, model, state, dataset_files, cancel)
        .map_err(|e| note_removed(e, &tmp_path))?;

    let version = dir.join(&name);
    fs::rename(&tmp_path, &version).with_context(|| {
        format!(
            "{}: cannot rename to {}",
            tmp_path.display(),
            version.display()
        )
    })?;
    // The folder now lives on as the version: nothing left for the guard to remove.
    let _ = tmp.keep();
    sync_dir(dir)?;
    crash_point("renamed");

    let latest_tmp = dir.join(format!("{TEMP_PREFIX}{LATEST}"));
    let replace_latest = || -> Result<()> {
        write_durable(&latest_tmp, format!("{name}\n").as_bytes())?;
        crash_point("latest-written");
        fs::rename(&latest_tmp, dir.join(LATEST))
            .with_context(|| format!("{}: cannot replace {LATEST}", dir.display()))
    };
    replace_latest().inspect_err(|_| {
        let _ = fs::remove_file(&latest_tmp);
    })?;
    sync_dir(dir)?;
    crash_point("latest-replaced");

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
    crash_point("pruned");
    Ok(version)
}

/// Writes a complete, synced version of `model` at `state` into the empty folder `tmp`.
fn write_version(
    tmp: &Path,
    model: &dyn Model,
    state: &TrainState,
    dataset_files: Option<&Path>,
    cancel: &Cancel,
) -> Result<()> {
    let model_config = model.save_parameters(tmp)?;
    crash_point("parameters");
    pause_point("parameters", cancel)?;
    if let Some(src) = dataset_files {
        let dst = tmp.join(DATASET_DIR);
        fs::create_dir(&dst).with_context(|| format!("{}: cannot create", dst.display()))?;
        for entry in fs::read_dir(src).with_context(|| format!("{}: cannot list", src.display()))? {
            let entry = entry?;
            // The dataset's top-level files are its header and dictionaries; the large arrays
            // live in its split folders and stay behind.
            if entry.file_type()?.is_file() {
                let to = dst.join(entry.file_name());
                fs::copy(entry.path(), &to)
                    .with_context(|| format!("{}: cannot copy", entry.path().display()))?;
                File::open(&to)?.sync_all()?;
            }
        }
        sync_dir(&dst)?;
    }
    let meta = Meta {
        format: FORMAT,
        model: model.name().to_string(),
        model_config,
        train_state: state.clone(),
        dataset: dataset_files.is_some(),
        encoding_fingerprint: dataset_files.map(encoding_fingerprint_of).transpose()?,
    };
    write_durable(
        &tmp.join(META),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    sync_files(tmp)?;
    sync_dir(tmp)?;
    crash_point("synced");
    pause_point("synced", cancel)
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

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes (name, shape, values) tensors as a safetensors file, fsynced.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), f32_bytes(v)))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
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
    bail!(
        "{}: tensor {name} holds {} at index {index:?}; pass --allow-non-finite to load it anyway",
        file.display(),
        values[flat]
    )
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
    for (o, b) in out.iter_mut().zip(t.data().chunks_exact(4)) {
        *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
    }
    check_finite(file, name, shape, out, opts)
}

/// The dense tensors of a DLRM: every layer's weight and bias under the reference's names,
/// and (Adagrad) their accumulators under "optim.<name>".
fn dlrm_dense_tensors(model: &Dlrm) -> Vec<(String, Vec<usize>, &[f32])> {
    let mut out = Vec::new();
    let mlps = [("bot_l", &model.bottom), ("top_l", &model.top)];
    let mut states = model.dense_state().iter();
    for (prefix, mlp) in mlps {
        for (layer, (wn, bn)) in mlp.layers.iter().zip(layer_names(prefix, mlp.layers.len())) {
            let (sw, sb) = states.next().expect("a state per layer");
            if !sw.is_empty() {
                out.push((
                    format!("optim.{wn}"),
                    vec![layer.outputs, layer.inputs],
                    &sw[..],
                ));
                out.push((format!("optim.{bn}"), vec![layer.outputs], &sb[..]));
            }
            out.push((wn, vec![layer.outputs, layer.inputs], &layer.weight[..]));
            out.push((bn, vec![layer.outputs], &layer.bias[..]));
        }
    }
    out
}

/// Writes a DLRM's parameters into a checkpoint folder; returns its model_config.
pub fn save_dlrm_parameters(model: &Dlrm, dir: &Path) -> Result<serde_json::Value> {
    for (table, state) in model.tables.iter().zip(&model.table_states) {
        table.write_to_dir(dir)?;
        state.write_to_dir(dir, table)?;
    }
    crash_point("tables");
    write_safetensors(&dir.join(DENSE), &dlrm_dense_tensors(model))?;
    Ok(serde_json::to_value(DlrmConfig {
        arch: model.arch().clone(),
        optimizer: model.optimizer(),
    })?)
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

/// Loads a DLRM checkpoint version into `storage` (anonymous: read into memory; file: mapped
/// copy-on-write, so training never writes through to the checkpoint), refusing non-finite
/// parameters.
pub fn load_dlrm(version: &Path, storage: &StorageKind) -> Result<(Dlrm, Meta)> {
    load_dlrm_with(version, storage, LoadOptions::default())
}

/// [`load_dlrm`] with explicit [`LoadOptions`]. Every table file and dense tensor is checked
/// against the meta's architecture (an error names the file and both shapes).
pub fn load_dlrm_with(
    version: &Path,
    storage: &StorageKind,
    opts: LoadOptions,
) -> Result<(Dlrm, Meta)> {
    let meta = read_meta(version)?;
    let cfg = read_dlrm_config(version, &meta)?;
    let arch = cfg.arch;
    let d = arch.embedding_dim;
    let width = cfg.optimizer.sparse(0.0).state_width(d);
    let mut tables = Vec::with_capacity(arch.num_tables());
    let mut states = Vec::with_capacity(arch.num_tables());
    for (t, &rows) in arch.table_sizes.iter().enumerate() {
        let table_path = version.join(table_file_name(t));
        let table = EmbeddingTable::load(&table_path, t, rows, d, storage)?;
        let name = format!("emb_l.{t}.weight");
        check_finite(&table_path, &name, &[rows, d], table.weights(), opts)?;
        let state_path = version.join(state_file_name(t));
        let state = OptimizerState::load(&state_path, t, rows, width, storage)?;
        let state_name = format!("optim.{name}");
        check_finite(
            &state_path,
            &state_name,
            &[rows, width],
            state.as_slice(),
            opts,
        )?;
        tables.push(table);
        states.push(state);
    }
    let path = version.join(DENSE);
    let bytes = fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let adagrad = cfg.optimizer.dense_adagrad();
    // Every dense tensor must have the meta's shape before layers of the meta's widths are
    // allocated: a corrupt width must be an error, not an allocation failure.
    for (prefix, widths) in [("bot_l", &arch.bottom), ("top_l", &arch.top)] {
        let names = layer_names(prefix, widths.len() - 1);
        for ((wn, bn), io) in names.iter().zip(widths.windows(2)) {
            for (name, shape) in [(wn, vec![io[1], io[0]]), (bn, vec![io[1]])] {
                checked_tensor(&st, &path, name, &shape)?;
                if adagrad {
                    checked_tensor(&st, &path, &format!("optim.{name}"), &shape)?;
                }
            }
        }
    }
    // Parameters are overwritten from the file: the generator only shapes the layers.
    let mut rng = SplitMix64::new(0);
    let bottom = Mlp::new(&arch.bottom, true, &mut rng);
    let top = Mlp::new(&arch.top, false, &mut rng);
    let mut model = Dlrm::assemble(arch, cfg.optimizer, bottom, top, tables, states);
    let nb = model.bottom.layers.len();
    let names: Vec<(String, String)> = layer_names("bot_l", nb)
        .into_iter()
        .chain(layer_names("top_l", model.top.layers.len()))
        .collect();
    for (i, (wn, bn)) in names.iter().enumerate() {
        let layer = if i < nb {
            &mut model.bottom.layers[i]
        } else {
            &mut model.top.layers[i - nb]
        };
        let ws = [layer.outputs, layer.inputs];
        let bs = [layer.outputs];
        read_tensor(&st, &path, wn, &ws, &mut layer.weight, opts)?;
        read_tensor(&st, &path, bn, &bs, &mut layer.bias, opts)?;
        if adagrad {
            let (sw, sb) = &mut model.dense_state_mut()[i];
            read_tensor(&st, &path, &format!("optim.{wn}"), &ws, sw, opts)?;
            read_tensor(&st, &path, &format!("optim.{bn}"), &bs, sb, opts)?;
        }
    }
    Ok((model, meta))
}
