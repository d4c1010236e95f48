//! Named parameters, the role of PyTorch's `state_dict`: every model shows each of its tensors
//! under its PyTorch-style name, with its shape, its values and its optimizer state, so that
//! checkpoints, export, import and the finiteness checks walk any model without knowing it.

use super::architecture::Architecture;
use super::dcn::{Dcn, DcnConfig};
use super::dlrm::Dlrm;
use super::embedding::{EmbeddingTable, OptimizerState, create_tables};
use super::fm::{Fm, FmConfig};
use super::mlp::{Mlp, layer_names};
use super::{Model, ModelKind, OptimizerKind};
use crate::storage::{RowSpan, StorageKind, state_file_name, table_file_name};
use dlrm_kernels::cross::CrossKind;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

/// One parameter tensor of a model, read-only.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    /// Where the values live: a dense tensor, or an embedding table with its own storage.
    pub kind: TensorKind<'a>,
    /// The values, row-major (of a dense tensor; a table's come from the table, see
    /// [`Tensor::values`]).
    values: &'a [f32],
    /// The optimizer state: a dense tensor's Adagrad accumulators (one per value), a table's
    /// sparse state (rows x state width); empty when the optimizer keeps none.
    pub state: &'a [f32],
}

/// What a [`Tensor`] is.
#[derive(Clone, Copy, Debug)]
pub enum TensorKind<'a> {
    /// A dense tensor (MLP layer, cross layer, bias).
    Dense,
    /// An embedding table and its sparse optimizer state, each in its own storage.
    Table {
        table: &'a EmbeddingTable,
        state: &'a OptimizerState,
    },
}

/// One parameter tensor of a model, writable.
#[derive(Debug)]
pub enum TensorMut<'a> {
    Dense {
        values: &'a mut [f32],
        /// Empty when the optimizer keeps no state.
        state: &'a mut [f32],
    },
    Table {
        table: &'a mut EmbeddingTable,
        state: &'a mut OptimizerState,
    },
}

/// A name, a shape and a tensor: what a model's visitor is given.
pub type Named<T> = (String, Vec<usize>, T);

/// Visits every parameter tensor of a model in a fixed order.
pub trait Parameters {
    /// Every tensor with its PyTorch-style name (`bot_l.0.weight`, `emb_l.3.weight`) and shape.
    fn parameters<'a>(&'a self, visit: &mut dyn FnMut(Named<Tensor<'a>>));
    /// The same tensors, in the same order, writable.
    fn parameters_mut<'a>(&'a mut self, visit: &mut dyn FnMut(Named<TensorMut<'a>>));
}

impl<'a> Tensor<'a> {
    pub fn dense(values: &'a [f32], state: &'a [f32]) -> Tensor<'a> {
        Tensor {
            kind: TensorKind::Dense,
            values,
            state,
        }
    }

    pub fn table(table: &'a EmbeddingTable, state: &'a OptimizerState) -> Tensor<'a> {
        Tensor {
            kind: TensorKind::Table { table, state },
            values: &[],
            state: state.as_slice(),
        }
    }

    /// The values, row-major: borrowed, or for a split-BF16 table its halves joined into a
    /// new buffer.
    pub fn values(&self) -> Cow<'a, [f32]> {
        match self.kind {
            TensorKind::Dense => Cow::Borrowed(self.values),
            TensorKind::Table { table, .. } => table.values(),
        }
    }
}

/// Table `table`'s tensor: its name, rows x dim, and the tensor.
pub fn named_table<'a>(
    name: String,
    table: &'a EmbeddingTable,
    state: &'a OptimizerState,
) -> Named<Tensor<'a>> {
    (
        name,
        vec![table.rows(), table.dim()],
        Tensor::table(table, state),
    )
}

/// [`named_table`], writable.
pub fn named_table_mut<'a>(
    name: String,
    table: &'a mut EmbeddingTable,
    state: &'a mut OptimizerState,
) -> Named<TensorMut<'a>> {
    let shape = vec![table.rows(), table.dim()];
    (name, shape, TensorMut::Table { table, state })
}

/// (name, shape) of every tensor of an MLP of `widths` (input first): per layer the weight
/// (out x in) and the bias (out).
pub fn mlp_shapes(prefix: &str, widths: &[usize]) -> Vec<(String, Vec<usize>)> {
    let layers = widths.len().saturating_sub(1);
    layer_names(prefix, layers)
        .into_iter()
        .zip(widths.windows(2))
        .flat_map(|((w, b), io)| [(w, vec![io[1], io[0]]), (b, vec![io[1]])])
        .collect()
}

fn mlp_widths(mlp: &Mlp) -> Vec<usize> {
    std::iter::once(mlp.inputs())
        .chain(mlp.layers.iter().map(|l| l.outputs))
        .collect()
}

/// Visits an MLP's tensors (weight then bias per layer) with their optimizer states, taken in
/// order from `states`.
pub fn visit_mlp<'a>(
    prefix: &str,
    mlp: &'a Mlp,
    states: &mut impl Iterator<Item = &'a [f32]>,
    visit: &mut dyn FnMut(Named<Tensor<'a>>),
) {
    let values = mlp.layers.iter().flat_map(|l| [&l.weight[..], &l.bias[..]]);
    for ((name, shape), v) in mlp_shapes(prefix, &mlp_widths(mlp)).into_iter().zip(values) {
        let state = states.next().unwrap_or(&[]);
        visit((name, shape, Tensor::dense(v, state)));
    }
}

/// [`visit_mlp`], writable.
pub fn visit_mlp_mut<'a>(
    prefix: &str,
    mlp: &'a mut Mlp,
    states: &mut impl Iterator<Item = &'a mut [f32]>,
    visit: &mut dyn FnMut(Named<TensorMut<'a>>),
) {
    let shapes = mlp_shapes(prefix, &mlp_widths(mlp));
    let values = mlp
        .layers
        .iter_mut()
        .flat_map(|l| [&mut l.weight[..], &mut l.bias[..]]);
    for ((name, shape), values) in shapes.into_iter().zip(values) {
        let state = states.next().unwrap_or(&mut []);
        visit((name, shape, TensorMut::Dense { values, state }));
    }
}

/// Where a model's embedding tables come from when it is built.
#[derive(Clone, Copy, Debug)]
pub enum TableSource<'a> {
    /// New tables, initialised from the seed, in this storage.
    Init(&'a StorageKind),
    /// The table and state files of a checkpoint version folder, loaded into `storage`
    /// (anonymous: read into memory; file: mapped copy-on-write).
    Files {
        dir: &'a Path,
        storage: &'a StorageKind,
    },
}

impl TableSource<'_> {
    /// Tables `first_index + t` of `rows[t]` x `dim` with optimizer state `width` wide.
    pub fn tables(
        &self,
        first_index: usize,
        rows: &[usize],
        dim: usize,
        width: usize,
        seed: u64,
    ) -> anyhow::Result<(Vec<EmbeddingTable>, Vec<OptimizerState>)> {
        match *self {
            TableSource::Init(storage) => {
                Ok(create_tables(first_index, rows, dim, width, seed, storage)?)
            }
            TableSource::Files { dir, storage } => {
                let mut tables = Vec::with_capacity(rows.len());
                let mut states = Vec::with_capacity(rows.len());
                for (t, &n) in rows.iter().enumerate() {
                    let index = first_index + t;
                    let path = dir.join(table_file_name(index));
                    tables.push(EmbeddingTable::load(&path, index, n, dim, storage)?);
                    let path = dir.join(state_file_name(index));
                    states.push(OptimizerState::load(&path, index, n, width, storage)?);
                }
                Ok((tables, states))
            }
        }
    }

    /// Rows `rows` of table `index` (of `total_rows` x `dim`; a rank's row-wise shard, row i
    /// the table's row `rows.start + i`) with its optimizer state `width` wide, in anonymous
    /// memory: new, initialised as the whole table's rows are; or read from the checkpoint's
    /// whole-table files (only those rows), into the checkpoint's `storage`. A new shard in
    /// file storage is refused (shards are made in memory).
    pub fn row_shard(
        &self,
        index: usize,
        total_rows: usize,
        rows: Range<usize>,
        dim: usize,
        width: usize,
        seed: u64,
    ) -> anyhow::Result<(EmbeddingTable, OptimizerState)> {
        let table = match *self {
            TableSource::Init(StorageKind::Anon) => {
                EmbeddingTable::create_rows(index, total_rows, rows, dim, seed)?
            }
            TableSource::Init(StorageKind::File { .. }) => anyhow::bail!(
                "table {index} is split row-wise: new row-wise shards live in anonymous \
                 memory, not in file storage"
            ),
            TableSource::Files { dir, storage } => {
                let (span, n) = (
                    RowSpan {
                        first: rows.start,
                        total: total_rows,
                    },
                    rows.len(),
                );
                let path = dir.join(state_file_name(index));
                let state = OptimizerState::load_rows(&path, index, span, n, width, storage)?;
                let path = dir.join(table_file_name(index));
                let table = EmbeddingTable::load_rows(&path, index, span, n, dim, storage)?;
                return Ok((table, state));
            }
        };
        let state = OptimizerState::create_for(&table, width)?;
        Ok((table, state))
    }
}

/// What a model is, enough to build it again: the description a checkpoint or an export
/// records, under its kind's key (`arch` for DLRM, as its checkpoints always named it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelConfig {
    #[serde(rename = "arch")]
    Dlrm(Architecture),
    /// DCN or DCN-v2 (`kind` says which).
    Dcn(DcnConfig),
    /// FM, or MF (a two-field regression FM, see [`super::mf`]).
    Fm(FmConfig),
}

impl ModelConfig {
    pub fn kind(&self) -> ModelKind {
        match self {
            ModelConfig::Dlrm(_) => ModelKind::Dlrm,
            ModelConfig::Dcn(c) => match c.kind {
                CrossKind::RankOne => ModelKind::Dcn,
                CrossKind::FullRank => ModelKind::DcnV2,
            },
            ModelConfig::Fm(c) => c.model,
        }
    }

    /// Rows of each embedding table the batches index, and dense features per sample.
    pub fn inputs(&self) -> (&[usize], usize) {
        match self {
            ModelConfig::Dlrm(a) => (&a.table_sizes, a.num_dense()),
            ModelConfig::Dcn(c) => (&c.table_sizes, c.num_dense),
            ModelConfig::Fm(c) => (&c.table_sizes, c.num_dense),
        }
    }

    /// The model, its dense parameters initialised from `seed` and its tables from `tables`.
    pub fn build(
        &self,
        optimizer: OptimizerKind,
        seed: u64,
        tables: TableSource,
    ) -> anyhow::Result<Box<dyn Model>> {
        Ok(match self {
            ModelConfig::Dlrm(arch) => {
                Box::new(Dlrm::build(arch.clone(), optimizer, seed, tables)?)
            }
            ModelConfig::Dcn(c) => Box::new(Dcn::build(c.clone(), optimizer, seed, tables)?),
            ModelConfig::Fm(c) => Box::new(Fm::build(c.clone(), optimizer, seed, tables)?),
        })
    }

    /// (name, shape) of every dense tensor the model has, in visiting order, known before the
    /// model is built (so that files can be checked before anything is allocated).
    pub fn dense_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            ModelConfig::Dlrm(arch) => {
                let mut s = mlp_shapes("bot_l", &arch.bottom);
                s.extend(mlp_shapes("top_l", &arch.top));
                s
            }
            ModelConfig::Dcn(c) => c.dense_shapes(),
            ModelConfig::Fm(_) => vec![(super::fm::BIAS.to_string(), vec![1])],
        }
    }
}

/// Collects a model's tensors (in visiting order).
pub fn tensors<P: Parameters + ?Sized>(model: &P) -> Vec<Named<Tensor<'_>>> {
    let mut out = Vec::new();
    model.parameters(&mut |t| out.push(t));
    out
}

/// Collects a model's tensors, writable.
pub fn tensors_mut<P: Parameters + ?Sized>(model: &mut P) -> Vec<Named<TensorMut<'_>>> {
    let mut out = Vec::new();
    model.parameters_mut(&mut |t| out.push(t));
    out
}
