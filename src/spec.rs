//! A training run resolved once: the data, the model with its architecture and options, the
//! optimizer, the schedule and the loop's options, the threads and the storage. A front end
//! (the CLI's flags, a tool, a bench, a test) fills a [`RunSpec`]; everything that follows
//! (the pool, the model, the data source) is built from it here, in one place, so that no
//! front end re-derives the run.

use crate::config::PresetValues;
use crate::data::DataSource;
use crate::data::binary::{BinaryDataset, DatasetSplit};
use crate::data::movielens::MovieLensSource;
use crate::data::synthetic::{SyntheticConfig, SyntheticData, SyntheticSource};
use crate::model::architecture::{Architecture, InteractionOp, join};
use crate::model::dcn::DcnConfig;
use crate::model::fm::FmConfig;
use crate::model::{
    Model, ModelConfig, ModelKind, OptimizerKind, Precision, TableSource, Task, mf,
};
use crate::names::{Field, FieldError, ensure_field};
use crate::storage::StorageKind;
use crate::train::{TrainOptions, available_memory_bytes, ensure_fits_in_memory};
use anyhow::{Context, Result};
use dlrm_kernels::cross::CrossKind;
use std::path::{Path, PathBuf};

/// What the models other than DLRM need beyond the architecture's tables, embedding width and
/// dense feature count.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelOptions {
    /// DCN, DCN-v2: number of cross layers.
    pub cross_layers: usize,
    /// DCN, DCN-v2: widths of the deep network's layers.
    pub deep: Vec<usize>,
    /// FM, MF: L2 regularisation of the embedding rows each step looks up.
    pub weight_decay: f32,
}

impl ModelOptions {
    /// Refuses options that `kind` does not take or that make no sense.
    fn check(&self, kind: ModelKind) -> Result<(), FieldError> {
        let decay = self.weight_decay;
        ensure_field(
            decay == 0.0 || matches!(kind, ModelKind::Fm | ModelKind::Mf),
            move |n| {
                format!(
                    "{} applies to {} fm and mf, not {}",
                    n(Field::WeightDecay),
                    n(Field::Model),
                    kind.name()
                )
            },
        )?;
        ensure_field(decay >= 0.0 && decay.is_finite(), |n| {
            format!("{} must be a non-negative number", n(Field::WeightDecay))
        })
    }

    fn dcn_config(&self, kind: ModelKind, arch: &Architecture) -> DcnConfig {
        DcnConfig {
            kind: if kind == ModelKind::Dcn {
                CrossKind::RankOne
            } else {
                CrossKind::FullRank
            },
            embedding_dim: arch.embedding_dim,
            table_sizes: arch.table_sizes.clone(),
            num_dense: arch.num_dense(),
            cross_layers: self.cross_layers,
            deep: self.deep.clone(),
        }
    }
}

/// Architecture settings given explicitly; the rest come from a preset (or a dataset's header).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArchitectureOverrides {
    pub embedding_dim: Option<usize>,
    pub table_sizes: Option<Vec<usize>>,
    pub bottom: Option<Vec<usize>>,
    pub top: Option<Vec<usize>>,
    pub interaction: Option<InteractionOp>,
    pub self_interaction: bool,
    /// Cap on every table's rows (synthetic data only: a dataset's ids are already in range).
    pub max_ind_range: Option<usize>,
}

/// The architecture of a run: the preset's, with every override applied; with a dataset, its
/// table sizes and dense feature count (an explicit table-size override must agree with them).
/// The one place where a preset becomes an architecture.
pub fn resolve_architecture(
    preset: &PresetValues,
    given: &ArchitectureOverrides,
    dataset: Option<&BinaryDataset>,
) -> Result<Architecture> {
    let tables = match dataset {
        Some(ds) => {
            let from_data = dataset_table_sizes(ds);
            if let Some(t) = &given.table_sizes {
                let (given_s, data_s) = (join(t), join(&from_data));
                ensure_field(*t == from_data, move |n| {
                    format!(
                        "{} {given_s} differs from the dataset's table sizes {data_s}; leave it out to use the dataset's",
                        n(Field::TableSizes)
                    )
                })?;
            }
            from_data
        }
        None => given
            .table_sizes
            .clone()
            .unwrap_or_else(|| preset.table_sizes.clone()),
    };
    let mut arch = Architecture::new(
        given.embedding_dim.unwrap_or(preset.embedding_dim),
        tables,
        given
            .bottom
            .clone()
            .unwrap_or_else(|| preset.bottom.to_vec()),
        given.top.clone().unwrap_or_else(|| preset.top.to_vec()),
        given.interaction.unwrap_or(InteractionOp::Dot),
        given.self_interaction,
    )?;
    match dataset {
        Some(ds) => {
            let (inputs, dense) = (arch.num_dense(), ds.header().num_dense);
            ensure_field(inputs == dense, move |n| {
                format!(
                    "{}: the bottom MLP takes {inputs} inputs, the dataset has {dense} dense features",
                    n(Field::Bottom)
                )
            })?;
        }
        None => {
            if let Some(cap) = given.max_ind_range.or(preset.max_ind_range) {
                ensure_field(cap > 0, |n| {
                    format!("{} must be at least 1", n(Field::MaxIndRange))
                })?;
                arch.table_sizes.iter_mut().for_each(|r| *r = (*r).min(cap));
            }
        }
    }
    Ok(arch)
}

/// The table sizes a dataset's header records.
pub fn dataset_table_sizes(ds: &BinaryDataset) -> Vec<usize> {
    ds.header()
        .table_sizes
        .iter()
        .map(|&n| n as usize)
        .collect()
}

/// Opens the dataset in `dir` for training and evaluating on `eval_split`: refused when it has
/// no labels or the split is empty.
pub fn open_training_dataset(dir: &Path, eval_split: DatasetSplit) -> Result<BinaryDataset> {
    let ds = BinaryDataset::open(dir)
        .with_context(|| format!("opening the dataset {}", dir.display()))?;
    anyhow::ensure!(
        ds.header().labelled,
        "{}: the dataset has no labels: it cannot be trained on",
        dir.display()
    );
    let dir_s = dir.display().to_string();
    ensure_field(ds.rows(eval_split) > 0, move |n| {
        format!(
            "{dir_s}: the {} split is empty: choose another {}",
            eval_split.name(),
            n(Field::EvalSplit)
        )
    })?;
    Ok(ds.with_eval_split(eval_split))
}

/// The rayon pool of `threads` workers every parallel step of a run uses.
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .with_context(|| format!("building a pool of {threads} threads"))
}

/// Where a run's samples come from.
pub enum DataSpec {
    /// Generated samples: `train_len` for training, `test_len` held out.
    Synthetic {
        config: SyntheticConfig,
        train_len: u64,
        test_len: u64,
    },
    /// A binary dataset, opened and checked ([`open_training_dataset`]).
    Dataset(Box<BinaryDataset>),
    /// MovieLens rating files (for matrix factorization).
    Ratings { train: PathBuf, test: PathBuf },
}

/// A training run, resolved.
pub struct RunSpec {
    pub model: ModelKind,
    /// Tables, embedding width and dense features of every model; the whole network of DLRM.
    pub arch: Architecture,
    pub model_options: ModelOptions,
    pub optimizer: OptimizerKind,
    /// The precision the model trains in (a loaded model is converted to it).
    pub precision: Precision,
    pub storage: StorageKind,
    pub threads: usize,
    pub data: DataSpec,
    /// Batches, steps, epochs, schedule, evaluation, checkpoints and the seed.
    pub train: TrainOptions,
}

/// A run ready to train: its data source, its model, and what the loop needs.
pub struct Run {
    pub source: Box<dyn DataSource>,
    pub model: Box<dyn Model>,
    /// One line saying what the model computes (and how much its tables take).
    pub description: String,
    pub train: TrainOptions,
    pub threads: usize,
}

impl RunSpec {
    /// The pool of the run's threads.
    pub fn pool(&self) -> Result<rayon::ThreadPool> {
        thread_pool(self.threads)
    }

    /// Opens the data and builds the model: `loaded` (a resumed checkpoint's) when given, else
    /// a fresh one initialised from the run's seed.
    pub fn build(self, loaded: Option<Box<dyn Model>>) -> Result<Run> {
        let RunSpec {
            model: kind,
            arch,
            model_options: options,
            optimizer,
            precision,
            storage,
            threads,
            data,
            train,
        } = self;
        let seed = train.seed;
        let d = arch.embedding_dim;
        let fresh = |loaded: Option<Box<dyn Model>>| match loaded {
            Some(model) => Ok(model),
            None => build_model(kind, &arch, &options, optimizer, &storage, seed),
        };
        let tables = || -> Result<String> {
            let gib = arch.table_sizes.iter().sum::<usize>() as f64 * d as f64 * 4.0
                / (1u64 << 30) as f64;
            Ok(format!(
                "{} | {gib:.2} GiB of tables",
                describe(kind, &arch, &options)?
            ))
        };
        let (source, model, description): (Box<dyn DataSource>, _, _) = match data {
            DataSpec::Ratings { train, test } => {
                let max_rows = available_memory_bytes() / table_row_bytes(kind, d, optimizer);
                let source = MovieLensSource::load_within(&train, &test, seed, max_rows)?;
                let description = describe_mf(&source, d, &options);
                let model = match loaded {
                    Some(model) => {
                        let config = model.config();
                        let (tables, _) = config.inputs();
                        anyhow::ensure!(
                            tables == [source.users, source.items],
                            "the loaded model factorizes {} users x {} items, the rating files have {} x {}",
                            tables[0],
                            tables.get(1).copied().unwrap_or(0),
                            source.users,
                            source.items
                        );
                        model
                    }
                    None => build_mf(&source, d, &options, optimizer, &storage, seed)?,
                };
                (Box::new(source), model, description)
            }
            DataSpec::Synthetic {
                config,
                train_len,
                test_len,
            } => {
                let description = tables()?;
                let source = SyntheticSource::new(SyntheticData::new(config), train_len, test_len);
                (Box::new(source), fresh(loaded)?, description)
            }
            DataSpec::Dataset(ds) => {
                let description = tables()?;
                (ds, fresh(loaded)?, description)
            }
        };
        let mut model = model;
        model.set_precision(precision)?;
        Ok(Run {
            source,
            model,
            description,
            train,
            threads,
        })
    }
}

/// A model of `kind` (any but MF, see [`build_mf`]) over the tables, embedding width and dense
/// features of `arch`.
pub fn build_model(
    kind: ModelKind,
    arch: &Architecture,
    options: &ModelOptions,
    optimizer: OptimizerKind,
    storage: &StorageKind,
    seed: u64,
) -> Result<Box<dyn Model>> {
    options.check(kind)?;
    let rows = arch.table_sizes.iter().map(|&r| r as u64).sum();
    ensure_tables_fit(kind, rows, arch.embedding_dim, optimizer, storage)?;
    model_config(kind, arch, options)?.build(optimizer, seed, TableSource::Init(storage))
}

/// The configuration of a `kind` model (any but MF, see [`build_mf`]) over the tables,
/// embedding width and dense features of `arch`: what [`ModelConfig::build`] builds and a
/// checkpoint records.
pub fn model_config(
    kind: ModelKind,
    arch: &Architecture,
    options: &ModelOptions,
) -> Result<ModelConfig> {
    Ok(match kind {
        ModelKind::Dlrm => ModelConfig::Dlrm(arch.clone()),
        ModelKind::Dcn | ModelKind::DcnV2 => ModelConfig::Dcn(options.dcn_config(kind, arch)),
        ModelKind::Fm => ModelConfig::Fm(FmConfig {
            model: ModelKind::Fm,
            task: Task::Classification,
            factors: arch.embedding_dim,
            table_sizes: arch.table_sizes.clone(),
            num_dense: arch.num_dense(),
            weight_decay: options.weight_decay,
            initial_bias: 0.0,
        }),
        ModelKind::Mf => return Err(ratings_needed().into()),
    })
}

/// Why MF cannot be built from an architecture.
fn ratings_needed() -> FieldError {
    FieldError::new(|n| {
        format!(
            "{} mf trains on rating files: give {} FILE {} FILE",
            n(Field::Model),
            n(Field::TrainRatings),
            n(Field::TestRatings)
        )
    })
}

/// Matrix factorization of the ratings of `data`, with latent vectors of `factors`.
pub fn build_mf(
    data: &MovieLensSource,
    factors: usize,
    options: &ModelOptions,
    optimizer: OptimizerKind,
    storage: &StorageKind,
    seed: u64,
) -> Result<Box<dyn Model>> {
    options.check(ModelKind::Mf)?;
    let rows = (data.users + data.items) as u64;
    ensure_tables_fit(ModelKind::Mf, rows, factors, optimizer, storage)?;
    let cfg = mf::MfConfig {
        users: data.users,
        items: data.items,
        factors,
        global_mean: data.mean_rating,
        weight_decay: options.weight_decay,
    };
    Ok(Box::new(mf::new(cfg, optimizer, storage, seed)?))
}

/// Bytes of one table row of a `kind` model with embedding width `d`: its weights and its
/// optimizer state (FM and MF: the latent row and the first-order weight).
pub fn table_row_bytes(kind: ModelKind, d: usize, optimizer: OptimizerKind) -> u64 {
    let state = |width| optimizer.sparse(0.0).state_width(width);
    let floats = match kind {
        ModelKind::Fm | ModelKind::Mf => d + state(d) + 1 + state(1),
        ModelKind::Dlrm | ModelKind::Dcn | ModelKind::DcnV2 => d + state(d),
    };
    4 * floats as u64
}

/// Refuses tables of `rows` rows in all that would not fit in the available memory, before
/// any is allocated (anonymous storage only: file tables may exceed memory, and their
/// creation checks the disk).
fn ensure_tables_fit(
    kind: ModelKind,
    rows: u64,
    d: usize,
    optimizer: OptimizerKind,
    storage: &StorageKind,
) -> Result<()> {
    if let StorageKind::Anon = storage {
        ensure_fits_in_memory(
            "the embedding tables (rows x bytes per row)",
            rows,
            table_row_bytes(kind, d, optimizer),
        )?;
    }
    Ok(())
}

/// One line saying what `kind` computes with these options (MF: see [`describe_mf`]).
pub fn describe(kind: ModelKind, arch: &Architecture, options: &ModelOptions) -> Result<String> {
    let (d, tables, nd) = (arch.embedding_dim, arch.num_tables(), arch.num_dense());
    let inputs = format!("{nd} dense + {tables} tables x d = {d}");
    Ok(match kind {
        ModelKind::Dlrm => format!(
            "DLRM: bottom {} | {tables} tables, d = {d} | {:?} interaction -> top {}",
            join(&arch.bottom),
            arch.interaction,
            join(&arch.top)
        ),
        ModelKind::Dcn | ModelKind::DcnV2 => {
            let cfg = options.dcn_config(kind, arch);
            let w0 = cfg.input_width();
            let rank = if kind == ModelKind::Dcn {
                "rank-one"
            } else {
                "full-rank"
            };
            format!(
                "{}: x0 = {inputs} ({w0} wide) | {} {rank} cross layers beside deep {w0}-{} | head {}-1",
                kind.name().to_uppercase(),
                cfg.cross_layers,
                join(&options.deep),
                w0 + cfg.deep.last().copied().unwrap_or(0)
            )
        }
        ModelKind::Fm => format!("FM: {inputs}, k = {d} latent factors"),
        ModelKind::Mf => return Err(ratings_needed().into()),
    })
}

/// What an MF run factorizes.
pub fn describe_mf(data: &MovieLensSource, factors: usize, options: &ModelOptions) -> String {
    format!(
        "MF: {} user rows x {} item rows, k = {factors}, mean rating {:.3}, weight decay {}",
        data.users, data.items, data.mean_rating, options.weight_decay
    )
}
