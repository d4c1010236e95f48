//! `dlrm export` and `dlrm import`: a checkpoint's parameters to and from one safetensors file
//! under the PyTorch reference's state_dict names (see dlrm::interop).

use super::choice;
use anyhow::{Context, Result};
use clap::Args;
use dlrm::cancel::Cancel;
use dlrm::checkpoint::{self, LoadOptions, TrainState};
use dlrm::data::binary::BinaryDataset;
use dlrm::interop::{ImportOptions, export_safetensors, import_model};
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::{InteractionOp, join};
use dlrm::storage::StorageKind;
use dlrm::train::LrSchedule;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint folder (its LATEST version) or one version folder.
    #[arg(long)]
    load_model: PathBuf,
    /// The safetensors file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Replace --out if it exists (never a file of the checkpoint itself).
    #[arg(long)]
    force: bool,
    /// Export the model even if some of its parameters are NaN or infinite.
    #[arg(long)]
    allow_non_finite: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The safetensors file to read (a dlrm_s_pytorch.py state_dict, or a `dlrm export` of
    /// any model).
    #[arg(long = "in")]
    input: PathBuf,
    /// Checkpoint folder to write (a new version; `dlrm train --load-model` continues from it).
    #[arg(long)]
    save_model: PathBuf,
    /// Optimizer whose (fresh) state the checkpoint carries.
    #[arg(long, value_parser = choice::<OptimizerKind>(), default_value_t = OptimizerKind::Sgd)]
    optimizer: OptimizerKind,
    /// Replace the checkpoints of another run in --save-model (its versions and LATEST).
    #[arg(long)]
    overwrite: bool,
    /// The model's feature interaction (dot or cat), when the file's metadata does not say
    /// and its widths fit more than one.
    #[arg(long)]
    arch_interaction_op: Option<InteractionOp>,
    /// Whether the dot interaction includes each vector with itself (true or false).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    arch_interaction_itself: Option<bool>,
    /// Skip tensors that are not parameters of the model instead of refusing the file.
    #[arg(long)]
    ignore_unknown: bool,
    /// Import the parameters even if some are NaN or infinite.
    #[arg(long)]
    allow_non_finite: bool,
    /// A binary dataset (dlrm preprocess) whose encoding the checkpoint carries, as one saved by
    /// `dlrm train --dataset` does, so that `dlrm predict` can score raw rows with it.
    #[arg(long)]
    dataset: Option<PathBuf>,
}

pub fn run_export(a: ExportArgs, cancel: &Cancel) -> Result<()> {
    let version = checkpoint::resolve(&a.load_model)?;
    let checkpoint_files: Vec<PathBuf> = std::fs::read_dir(&version)
        .with_context(|| format!("{}: cannot list", version.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .collect();
    let inputs: Vec<&Path> = checkpoint_files.iter().map(PathBuf::as_path).collect();
    super::check_output(&a.out, &inputs, a.force)?;
    let (mut model, _) = checkpoint::load_model(
        &version,
        &StorageKind::File {
            dir: version.clone(),
            lazy_init: false,
        },
        LoadOptions {
            allow_non_finite: a.allow_non_finite,
        },
    )?;
    export_safetensors(model.as_mut(), &a.out, cancel)?;
    // The summary goes to stdout, as train's, synth's and predict's do.
    println!("exported {} to {}", version.display(), a.out.display());
    Ok(())
}

pub fn run_import(a: ImportArgs) -> Result<()> {
    let dataset = match &a.dataset {
        Some(dir) => Some(
            BinaryDataset::open(dir)
                .with_context(|| format!("--dataset: opening {}", dir.display()))?,
        ),
        None => None,
    };
    let opts = ImportOptions {
        interaction: a.arch_interaction_op,
        self_interaction: a.arch_interaction_itself,
        ignore_unknown: a.ignore_unknown,
        load: LoadOptions {
            allow_non_finite: a.allow_non_finite,
        },
    };
    let model = import_model(&a.input, a.optimizer, &StorageKind::Anon, 1, opts)?;
    if let Some(ds) = &dataset {
        let config = model.config();
        let (tables, num_dense) = config.inputs();
        let h = ds.header();
        let sizes: Vec<usize> = h.table_sizes.iter().map(|&n| n as usize).collect();
        anyhow::ensure!(
            tables == sizes,
            "--dataset {}: its table sizes {} differ from those of {} ({})",
            ds.dir().display(),
            join(&sizes),
            a.input.display(),
            join(tables)
        );
        anyhow::ensure!(
            num_dense == h.num_dense,
            "--dataset {}: it has {} dense features, the model of {} takes {}",
            ds.dir().display(),
            h.num_dense,
            a.input.display(),
            num_dense
        );
    }
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
        model.as_ref(),
        &state,
        dataset.as_ref().map(|ds| ds.dir()),
        usize::MAX,
        &Cancel::never(),
    )
    .with_context(|| format!("writing the checkpoint to {}", a.save_model.display()))?;
    println!("imported {} into {}", a.input.display(), version.display());
    Ok(())
}
