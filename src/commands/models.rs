//! The models of `dlrm train --model` and `dlrm compare`, built from the command line's flags:
//! the DLRM architecture flags give every model its tables, embedding width and dense feature
//! count; these flags add what DCN, FM and MF need beyond them.

use anyhow::{Result, bail};
use clap::Args;
use dlrm::config::{Architecture, join, parse_dims};
use dlrm::data::movielens::MovieLensSource;
use dlrm::kernels::cross::CrossKind;
use dlrm::model::dcn::{Dcn, DcnConfig};
use dlrm::model::dlrm::Dlrm;
use dlrm::model::fm::{Fm, FmConfig};
use dlrm::model::{Model, ModelKind, OptimizerKind, Task, mf};
use dlrm::storage::StorageKind;
use dlrm::train::ensure_fits_in_memory;

/// Flags of the models other than DLRM.
#[derive(Args, Clone, Debug)]
pub struct ModelFlags {
    /// DCN, DCN-v2: number of cross layers.
    #[arg(long, default_value_t = 6)]
    pub cross_layers: usize,
    /// DCN, DCN-v2: widths of the deep network's layers, dash-separated (its input is the dense
    /// features and the embeddings side by side).
    #[arg(long, default_value = "512-256")]
    pub arch_mlp_deep: String,
    /// FM, MF: L2 regularisation of the embedding rows each step looks up (added to their
    /// gradient times this factor, inside the fused sparse update).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
}

impl ModelFlags {
    fn deep(&self) -> Result<Vec<usize>> {
        Ok(parse_dims("--arch-mlp-deep", &self.arch_mlp_deep)?)
    }

    fn check(&self, kind: ModelKind) -> Result<()> {
        if self.weight_decay != 0.0 && !matches!(kind, ModelKind::Fm | ModelKind::Mf) {
            bail!(
                "--weight-decay applies to --model fm and mf, not {}",
                kind.name()
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("--weight-decay must be a non-negative number");
        }
        Ok(())
    }

    fn dcn_config(&self, kind: ModelKind, arch: &Architecture) -> Result<DcnConfig> {
        Ok(DcnConfig {
            kind: if kind == ModelKind::Dcn {
                CrossKind::RankOne
            } else {
                CrossKind::FullRank
            },
            embedding_dim: arch.embedding_dim,
            table_sizes: arch.table_sizes.clone(),
            num_dense: arch.num_dense(),
            cross_layers: self.cross_layers,
            deep: self.deep()?,
        })
    }
}

/// A model of `kind` (any but MF, see [`build_mf`]) over the tables, embedding width and dense
/// features of `arch`.
pub fn build(
    kind: ModelKind,
    arch: &Architecture,
    flags: &ModelFlags,
    optimizer: OptimizerKind,
    storage: &StorageKind,
    seed: u64,
) -> Result<Box<dyn Model>> {
    flags.check(kind)?;
    let rows = arch.table_sizes.iter().map(|&r| r as u64).sum();
    ensure_tables_fit(kind, rows, arch.embedding_dim, optimizer, storage)?;
    Ok(match kind {
        ModelKind::Dlrm => Box::new(Dlrm::new(arch.clone(), optimizer, storage, seed)?),
        ModelKind::Dcn | ModelKind::DcnV2 => Box::new(Dcn::new(
            flags.dcn_config(kind, arch)?,
            optimizer,
            storage,
            seed,
        )?),
        ModelKind::Fm => Box::new(Fm::new(
            FmConfig {
                model: ModelKind::Fm,
                task: Task::Classification,
                factors: arch.embedding_dim,
                table_sizes: arch.table_sizes.clone(),
                num_dense: arch.num_dense(),
                weight_decay: flags.weight_decay,
                initial_bias: 0.0,
            },
            optimizer,
            storage,
            seed,
        )?),
        ModelKind::Mf => bail!("--model mf trains on rating files: give --train FILE --test FILE"),
    })
}

/// Matrix factorization of the ratings of `data`, with latent vectors of `factors`.
pub fn build_mf(
    data: &MovieLensSource,
    factors: usize,
    flags: &ModelFlags,
    optimizer: OptimizerKind,
    storage: &StorageKind,
    seed: u64,
) -> Result<Box<dyn Model>> {
    flags.check(ModelKind::Mf)?;
    let rows = (data.users + data.items) as u64;
    ensure_tables_fit(ModelKind::Mf, rows, factors, optimizer, storage)?;
    let cfg = mf::MfConfig {
        users: data.users,
        items: data.items,
        factors,
        global_mean: data.mean_rating,
        weight_decay: flags.weight_decay,
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

/// One line saying what `kind` computes with these flags (MF: see [`describe_mf`]).
pub fn describe(kind: ModelKind, arch: &Architecture, flags: &ModelFlags) -> Result<String> {
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
            let cfg = flags.dcn_config(kind, arch)?;
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
                flags.arch_mlp_deep,
                w0 + cfg.deep.last().copied().unwrap_or(0)
            )
        }
        ModelKind::Fm => format!("FM: {inputs}, k = {d} latent factors"),
        ModelKind::Mf => bail!("MF is described from its ratings"),
    })
}

/// What an MF run factorizes.
pub fn describe_mf(data: &MovieLensSource, factors: usize, flags: &ModelFlags) -> String {
    format!(
        "MF: {} user rows x {} item rows, k = {factors}, mean rating {:.3}, weight decay {}",
        data.users, data.items, data.mean_rating, flags.weight_decay
    )
}
