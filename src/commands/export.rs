//! `dlrm export` and `dlrm import`: a checkpoint's parameters to and from one safetensors file
//! under the PyTorch reference's state_dict names (see dlrm::interop).

use anyhow::{Context, Result};
use clap::Args;
use dlrm::cancel::Cancel;
use dlrm::checkpoint::{self, TrainState};
use dlrm::interop::{export_safetensors, import_safetensors};
use dlrm::model::OptimizerKind;
use dlrm::model::embedding_tables::StorageKind;
use dlrm::train::LrSchedule;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint folder (its LATEST version) or one version folder.
    #[arg(long)]
    load_model: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists (never a file of the checkpoint itself).
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The safetensors file to read (a dlrm_s_pytorch.py state_dict).
    #[arg(long = "in")]
    input: PathBuf,
    /// Checkpoint folder to write (a new version; `dlrm train --load-model` continues from it).
    #[arg(long)]
    save_model: PathBuf,
    /// Optimizer whose (fresh) state the checkpoint carries.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    optimizer: OptimizerKind,
    /// Replace the checkpoints of another run in --save-model (its versions and LATEST).
    #[arg(long)]
    overwrite: bool,
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    let version = checkpoint::resolve(&a.load_model)?;
    let checkpoint_files: Vec<PathBuf> = std::fs::read_dir(&version)
        .with_context(|| format!("{}: cannot list", version.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .collect();
    let inputs: Vec<&Path> = checkpoint_files.iter().map(PathBuf::as_path).collect();
    super::check_output(&a.out, &inputs, a.force)?;
    let (model, _) = checkpoint::load_dlrm(
        &version,
        &StorageKind::File {
            dir: version.clone(),
            lazy_init: false,
        },
    )?;
    export_safetensors(&model, &a.out)?;
    eprintln!("exported {} to {}", version.display(), a.out.display());
    Ok(())
}

pub fn run_import(a: ImportArgs) -> Result<()> {
    let model = import_safetensors(&a.input, a.optimizer, &StorageKind::Anon, 1)?;
    let state = TrainState {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        epoch_shuffle_state: dlrm::rng::SplitMix64::new(0).state(),
        lr: LrSchedule::constant(0.0),
        batch_size: 0,
        seed: 1,
        run_id: checkpoint::new_run_id(),
    };
    let _lock = checkpoint::claim(&a.save_model, None, a.overwrite)?;
    let version = checkpoint::save(
        &a.save_model,
        &model,
        &state,
        None,
        usize::MAX,
        &Cancel::never(),
    )
    .with_context(|| format!("writing the checkpoint to {}", a.save_model.display()))?;
    eprintln!("imported {} into {}", a.input.display(), version.display());
    Ok(())
}
