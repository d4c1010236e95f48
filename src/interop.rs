//! PyTorch interoperability: a DLRM's parameters as one safetensors file under the state_dict
//! names of the reference implementation (facebookresearch/dlrm, dlrm_s_pytorch.py), so a model
//! trained here can be evaluated there and the other way round.
//!
//! | here                         | state_dict name          | shape           |
//! |------------------------------|--------------------------|-----------------|
//! | embedding table t            | `emb_l.{t}.weight`       | rows_t x d      |
//! | bottom MLP layer k           | `bot_l.{2k}.weight/bias` | out x in, out   |
//! | top MLP layer k              | `top_l.{2k}.weight/bias` | out x in, out   |
//!
//! (The reference builds each MLP as nn.Sequential(Linear, ReLU, Linear, ...), so Linear k is
//! module 2k.) Optimizer state is not part of a state_dict and is not exported.
//!
//! The other models (DCN, DCN-v2, FM, MF) export the same way, every tensor under the name its
//! [`crate::model::Parameters`] visitor gives, with the model's kind and configuration in the
//! `__metadata__` (`model`, `model_config`), from which [`import_model`] builds it back.

use crate::cancel::{Cancel, Interrupted, PartialFile, note_removed};
use crate::checkpoint::{LoadOptions, read_tensor};
use crate::model::architecture::{Architecture, InteractionOp, interaction_width, join};
use crate::model::dlrm::Dlrm;
use crate::model::parameters::tensors;
use crate::model::{Model, ModelConfig, OptimizerKind, Parameters, TableSource, TensorMut};
use crate::names::{Field, FieldError};
use crate::storage::{StorageKind, map_read_only};
use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Writes every parameter of `model` to `path` as safetensors (streamed: the tables are not
/// copied in memory), with the model's description in the `__metadata__` (a DLRM's
/// architecture under the reference's flag names). Rows of a lazily initialised table that were
/// never touched are written with their initial values. Stops with [`Interrupted`] between
/// tensors once `cancel` is requested, leaving no partial file.
pub fn export_safetensors(model: &mut dyn Model, path: &Path, cancel: &Cancel) -> Result<()> {
    use rayon::prelude::*;
    let mut tables = Vec::new();
    model.parameters_mut(&mut |(_, _, t)| {
        if let TensorMut::Table { table, .. } = t {
            tables.push(table);
        }
    });
    tables.par_iter_mut().for_each(|t| t.materialize_all());
    let metadata = export_metadata(&model.config())?;
    let values: Vec<_> = tensors(&*model)
        .into_iter()
        .map(|(name, shape, t)| (name, shape, t.values()))
        .collect();
    let tensors: Vec<(String, Vec<usize>, &[u8])> = values
        .iter()
        .map(|(name, shape, v)| (name.clone(), shape.clone(), bytemuck::cast_slice(v)))
        .collect();
    write_safetensors_sorted(path, cancel, tensors, &metadata)
}

/// The `__metadata__` of an export: a DLRM's architecture under the reference's flag names,
/// another model's kind and configuration.
fn export_metadata(config: &ModelConfig) -> Result<BTreeMap<String, String>> {
    let arch = match config {
        ModelConfig::Dlrm(arch) => arch,
        other => {
            return Ok(BTreeMap::from([
                (META_MODEL.to_string(), other.kind().name().to_string()),
                (META_CONFIG.to_string(), serde_json::to_string(other)?),
            ]));
        }
    };
    Ok(BTreeMap::from([
        (META_BOTTOM.to_string(), join(&arch.bottom)),
        (META_TOP.to_string(), arch.top_flag()),
        (META_DIM.to_string(), arch.embedding_dim.to_string()),
        (
            META_OP.to_string(),
            interaction_name(arch.interaction).to_string(),
        ),
        (META_ITSELF.to_string(), arch.self_interaction.to_string()),
    ]))
}

/// `__metadata__` keys of the other models' exports: the model's kind and its configuration
/// (JSON).
const META_MODEL: &str = "model";
const META_CONFIG: &str = "model_config";

/// `__metadata__` keys of an export: the reference's flag names without the dashes.
const META_BOTTOM: &str = "arch_mlp_bot";
const META_TOP: &str = "arch_mlp_top";
const META_DIM: &str = "arch_sparse_feature_size";
const META_OP: &str = "arch_interaction_op";
const META_ITSELF: &str = "arch_interaction_itself";

fn interaction_name(op: InteractionOp) -> &'static str {
    match op {
        InteractionOp::Dot => "dot",
        InteractionOp::Cat => "cat",
    }
}

/// Writes `tensors` (name, shape, little-endian f32 bytes) and `metadata` as a safetensors
/// file whose header lists every key in sorted order, so the same parameters always give the
/// same bytes (the safetensors crate writes `__metadata__` in hash-map order). The data is
/// streamed to a temporary sibling, created with the process umask like any other output,
/// and renamed into place when complete.
fn write_safetensors_sorted(
    path: &Path,
    cancel: &Cancel,
    mut tensors: Vec<(String, Vec<usize>, &[u8])>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    use std::io::Write;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = format!("{{\"__metadata__\":{}", serde_json::to_string(metadata)?);
    let mut offset = 0usize;
    for (name, shape, bytes) in &tensors {
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"F32\",\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(name)?,
            serde_json::to_string(shape)?,
            offset + bytes.len()
        ));
        offset += bytes.len();
    }
    header.push('}');
    // The format pads the header with spaces to a multiple of 8 bytes.
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let partial = PartialFile::create(path)?;
    let write = || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, partial.file());
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        for (_, _, bytes) in &tensors {
            cancel.check().map_err(std::io::Error::other)?;
            out.write_all(bytes)?;
        }
        out.flush()
    };
    match write() {
        Ok(()) => partial.commit(),
        Err(e) => {
            let removed = partial.path().to_path_buf();
            drop(partial);
            match e.downcast::<Interrupted>() {
                Ok(interrupted) => Err(note_removed(interrupted.into(), &removed)),
                Err(e) => Err(e).with_context(|| format!("{}: cannot write", removed.display())),
            }
        }
    }
}

/// What `import` is told beyond the file.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImportOptions {
    /// The interaction, when stated (`--arch-interaction-op`).
    pub interaction: Option<InteractionOp>,
    /// Whether the dot interaction includes self-pairs, when stated (`--arch-interaction-itself`).
    pub self_interaction: Option<bool>,
    /// Skip tensors that are not DLRM parameters instead of refusing the file.
    pub ignore_unknown: bool,
    pub load: LoadOptions,
}

/// Reads a DLRM from a safetensors state_dict; `optimizer` sets up fresh optimizer state.
/// The widths follow from the tensor shapes; the interaction from the file's
/// `__metadata__` (as [`export_safetensors`] writes it) and what `opts` states, which must
/// agree with each other and with the top MLP's input width. A file whose width more than one
/// interaction gives, and that says nothing, is refused rather than guessed. Tensors that are
/// not DLRM parameters are refused unless `opts.ignore_unknown` (as PyTorch's strict
/// `load_state_dict`).
pub fn import_safetensors(
    path: &Path,
    optimizer: OptimizerKind,
    storage: &StorageKind,
    seed: u64,
    opts: ImportOptions,
) -> Result<Dlrm> {
    let bytes = map_file(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let shapes = DlrmShapes::of(&st, path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let (op, itself) = interaction(
        path,
        header.metadata().as_ref(),
        opts,
        shapes.table_sizes.len() + 1,
        shapes.embedding_dim,
        shapes.top[0],
    )?;
    let arch = Architecture::new(
        shapes.embedding_dim,
        shapes.table_sizes,
        shapes.bottom,
        shapes.top[1..].to_vec(),
        op,
        itself,
    )
    .with_context(|| format!("{}: inconsistent architecture", path.display()))?;
    let mut model = Dlrm::build(arch, optimizer, seed, TableSource::Init(&eager(storage)))?;
    read_parameters(&mut model, &st, path, opts)?;
    Ok(model)
}

/// What a DLRM state_dict's tensor shapes say of its architecture: the embedding width, the
/// table sizes, and the widths of both MLPs (input first).
struct DlrmShapes {
    embedding_dim: usize,
    table_sizes: Vec<usize>,
    bottom: Vec<usize>,
    top: Vec<usize>,
}

impl DlrmShapes {
    /// Reads the shapes of `emb_l.*`, `bot_l.*` and `top_l.*` in `st` (the file at `path`).
    fn of(st: &SafeTensors, path: &Path) -> Result<DlrmShapes> {
        let tables = count_layers(st, "emb_l", 1);
        ensure!(
            tables > 0,
            "{}: no emb_l.0.weight: not a DLRM state_dict",
            path.display()
        );
        let first = f32_shape(st, path, "emb_l.0.weight")?;
        ensure!(
            first.len() == 2,
            "{}: emb_l.0.weight is not a matrix",
            path.display()
        );
        let d = first[1];
        let mut table_sizes = Vec::with_capacity(tables);
        for t in 0..tables {
            let s = f32_shape(st, path, &format!("emb_l.{t}.weight"))?;
            ensure!(
                s.len() == 2 && s[1] == d,
                "{}: emb_l.{t}.weight has shape {s:?}, expected (rows, {d})",
                path.display()
            );
            table_sizes.push(s[0]);
        }
        Ok(DlrmShapes {
            embedding_dim: d,
            table_sizes,
            bottom: mlp_widths(st, path, "bot_l")?,
            top: mlp_widths(st, path, "top_l")?,
        })
    }
}

/// The shape of F32 tensor `name` of `st` (the file at `path`).
fn f32_shape(st: &SafeTensors, path: &Path, name: &str) -> Result<Vec<usize>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{}: no tensor {name}", path.display()))?;
    ensure!(
        t.dtype() == Dtype::F32,
        "{}: {name} is {:?}, expected F32",
        path.display(),
        t.dtype()
    );
    Ok(t.shape().to_vec())
}

/// How many layers `{prefix}.{k * step}.weight` (k = 0, 1, ...) `st` holds in a row.
fn count_layers(st: &SafeTensors, prefix: &str, step: usize) -> usize {
    (0..)
        .take_while(|k| st.tensor(&format!("{prefix}.{}.weight", k * step)).is_ok())
        .count()
}

/// The widths (input first) of the MLP `prefix` of a DLRM state_dict: Linear k is module 2k
/// of the reference's nn.Sequential, each taking the previous layer's outputs.
fn mlp_widths(st: &SafeTensors, path: &Path, prefix: &str) -> Result<Vec<usize>> {
    let n = count_layers(st, prefix, 2);
    ensure!(n > 0, "{}: no {prefix}.0.weight", path.display());
    let mut w = Vec::with_capacity(n + 1);
    for k in 0..n {
        let s = f32_shape(st, path, &format!("{prefix}.{}.weight", 2 * k))?;
        ensure!(
            s.len() == 2,
            "{}: {prefix}.{}.weight is not a matrix",
            path.display(),
            2 * k
        );
        if k == 0 {
            w.push(s[1]);
        } else if s[1] != w[k] {
            bail!(
                "{}: {prefix}.{}.weight takes {} inputs, the layer before gives {}",
                path.display(),
                2 * k,
                s[1],
                w[k]
            );
        }
        w.push(s[0]);
    }
    Ok(w)
}

/// Reads any exported model: a DLRM state_dict as [`import_safetensors`] does, another model
/// from the kind and configuration its `__metadata__` records ([`export_safetensors`]), every
/// tensor checked against the model built from them; `optimizer` sets up fresh optimizer
/// state.
pub fn import_model(
    path: &Path,
    optimizer: OptimizerKind,
    storage: &StorageKind,
    seed: u64,
    opts: ImportOptions,
) -> Result<Box<dyn Model>> {
    let bytes = map_file(path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let Some(kind) = metadata.get(META_MODEL) else {
        return Ok(Box::new(import_safetensors(
            path, optimizer, storage, seed, opts,
        )?));
    };
    if opts.interaction.is_some() || opts.self_interaction.is_some() {
        let (file, kind) = (path.display().to_string(), kind.clone());
        return Err(FieldError::new(move |name| {
            format!(
                "{} and {} apply to DLRM files, and {file} holds a {kind} model",
                name(Field::Interaction),
                name(Field::SelfInteraction)
            )
        })
        .into());
    }
    let config_json = metadata.get(META_CONFIG).with_context(|| {
        format!(
            "{}: __metadata__ names a {kind} model but has no {META_CONFIG}",
            path.display()
        )
    })?;
    let config: ModelConfig = serde_json::from_str(config_json).with_context(|| {
        format!(
            "{}: __metadata__ {META_CONFIG} is malformed",
            path.display()
        )
    })?;
    ensure!(
        config.kind().name() == kind,
        "{}: __metadata__ names a {kind} model but {META_CONFIG} describes a {} model",
        path.display(),
        config.kind().name()
    );
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    // The dense shapes first: a corrupt width is an error, not an allocation failure.
    for (name, shape) in config.dense_shapes() {
        let t = st
            .tensor(&name)
            .with_context(|| format!("{}: no tensor {name}", path.display()))?;
        ensure!(
            t.shape() == shape,
            "{}: tensor {name} has shape {:?}, the model expects {shape:?}",
            path.display(),
            t.shape()
        );
    }
    let mut model = config.build(optimizer, seed, TableSource::Init(&eager(storage)))?;
    read_parameters(model.as_mut(), &st, path, opts)?;
    Ok(model)
}

/// Maps a safetensors file read-only: it is deserialized in place, never read whole.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    map_read_only(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// `storage` with every row initialised up front: imported values overwrite them all.
fn eager(storage: &StorageKind) -> StorageKind {
    match storage {
        StorageKind::File { dir, .. } => StorageKind::File {
            dir: dir.clone(),
            lazy_init: false,
        },
        StorageKind::Anon => StorageKind::Anon,
    }
}

/// Reads every tensor of `model` from `st` (tables and dense tensors alike), after refusing
/// tensors of the file that are not the model's unless `opts.ignore_unknown` (as PyTorch's
/// strict `load_state_dict`).
fn read_parameters(
    model: &mut dyn Parameters,
    st: &SafeTensors,
    path: &Path,
    opts: ImportOptions,
) -> Result<()> {
    let known: Vec<String> = tensors(&*model).into_iter().map(|(n, _, _)| n).collect();
    if !opts.ignore_unknown {
        let mut unknown: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| !known.iter().any(|k| k == n))
            .collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            let (file, unknown) = (path.display().to_string(), unknown.join(", "));
            return Err(FieldError::new(move |name| {
                format!(
                    "{file}: tensors that are not parameters of this model: {unknown}; pass {} to skip them",
                    name(Field::IgnoreUnknown)
                )
            })
            .into());
        }
    }
    let mut result = Ok(());
    model.parameters_mut(&mut |(name, shape, tensor)| {
        if result.is_ok() {
            let values = match tensor {
                TensorMut::Dense { values, .. } => values,
                TensorMut::Table { table, .. } => table.weights_mut(),
            };
            result = read_tensor(st, path, &name, &shape, values, opts.load);
        }
    });
    result
}

/// The interaction of an imported model with `features` vectors of width `d` whose top MLP
/// takes `top_in` inputs: the one that gives that width among those the file's metadata and
/// the flags allow.
fn interaction(
    path: &Path,
    metadata: Option<&HashMap<String, String>>,
    opts: ImportOptions,
    features: usize,
    d: usize,
    top_in: usize,
) -> Result<(InteractionOp, bool)> {
    let file_op = match metadata.and_then(|m| m.get(META_OP)) {
        Some(v) => Some(
            v.parse::<InteractionOp>()
                .with_context(|| format!("{}: __metadata__ {META_OP} '{v}'", path.display()))?,
        ),
        None => None,
    };
    let file_itself = match metadata.and_then(|m| m.get(META_ITSELF)) {
        Some(v) => Some(v.parse::<bool>().map_err(|_| {
            anyhow::anyhow!(
                "{}: __metadata__ {META_ITSELF} is '{v}', not true or false",
                path.display()
            )
        })?),
        None => None,
    };
    if let (Some(flag), Some(file)) = (opts.interaction, file_op)
        && flag != file
    {
        let path = path.display().to_string();
        return Err(FieldError::new(move |name| {
            format!(
                "{} {} contradicts {path}, whose metadata says {}",
                name(Field::Interaction),
                interaction_name(flag),
                interaction_name(file)
            )
        })
        .into());
    }
    if let (Some(flag), Some(file)) = (opts.self_interaction, file_itself)
        && flag != file
    {
        let path = path.display().to_string();
        return Err(FieldError::new(move |name| {
            format!(
                "{} {flag} contradicts {path}, whose metadata says {file}",
                name(Field::SelfInteraction)
            )
        })
        .into());
    }
    let op = opts.interaction.or(file_op);
    let itself = opts.self_interaction.or(file_itself);
    // Self-interaction changes nothing in a concatenation: cat keeps whatever is stated.
    let candidates: Vec<(InteractionOp, bool)> = [
        (InteractionOp::Dot, false),
        (InteractionOp::Dot, true),
        (InteractionOp::Cat, itself.unwrap_or(false)),
    ]
    .into_iter()
    .filter(|&(o, i)| op.is_none_or(|op| op == o) && itself.is_none_or(|s| s == i))
    .filter(|&(o, i)| interaction_width(o, i, features, d) == top_in)
    .collect();
    match candidates[..] {
        [one] => Ok(one),
        [] => bail!(
            "{}: the top MLP takes {top_in} inputs, which no{} interaction of {features} vectors of width {d} gives",
            path.display(),
            match op {
                Some(o) => format!(" {} (as stated)", interaction_name(o)),
                None => String::new(),
            }
        ),
        _ => {
            let path = path.display().to_string();
            Err(FieldError::new(move |name| {
                format!(
                    "{path}: the top MLP's {top_in} inputs fit both the dot and the cat interaction of {features} vectors of width {d}, and the file's metadata does not say which: pass {} (and {})",
                    name(Field::Interaction),
                    name(Field::SelfInteraction)
                )
            })
            .into())
        }
    }
}
