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

use crate::checkpoint::{LoadOptions, layer_names, read_tensor};
use crate::config::{Architecture, InteractionOp, join};
use crate::model::OptimizerKind;
use crate::model::dlrm::Dlrm;
use crate::model::embedding_tables::{EmbeddingTable, OptimizerState, StorageKind};
use crate::model::mlp::Mlp;
use crate::rng::SplitMix64;
use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::path::Path;

/// Writes every parameter of `model` to `path` as safetensors (streamed: the tables are not
/// copied in memory).
pub fn export_safetensors(model: &Dlrm, path: &Path) -> Result<()> {
    let arch = model.arch();
    let mut dense: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, mlp) in [("bot_l", &model.bottom), ("top_l", &model.top)] {
        for (layer, (wn, bn)) in mlp.layers.iter().zip(layer_names(prefix, mlp.layers.len())) {
            let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            dense.push((wn, vec![layer.outputs, layer.inputs], le(&layer.weight)));
            dense.push((bn, vec![layer.outputs], le(&layer.bias)));
        }
    }
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for (t, table) in model.tables.iter().enumerate() {
        let shape = vec![table.rows(), arch.embedding_dim];
        views.push((
            format!("emb_l.{t}.weight"),
            TensorView::new(Dtype::F32, shape, table.weight_bytes())?,
        ));
    }
    for (n, s, b) in &dense {
        views.push((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?));
    }
    let info = [
        ("arch_mlp_bot".to_string(), join(&arch.bottom)),
        ("arch_mlp_top".to_string(), arch.top_flag()),
        (
            "arch_sparse_feature_size".to_string(),
            arch.embedding_dim.to_string(),
        ),
        (
            "arch_interaction_op".to_string(),
            match arch.interaction {
                InteractionOp::Dot => "dot",
                InteractionOp::Cat => "cat",
            }
            .to_string(),
        ),
        (
            "arch_interaction_itself".to_string(),
            arch.self_interaction.to_string(),
        ),
    ]
    .into_iter()
    .collect();
    safetensors::serialize_to_file(views, Some(info), path)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Reads a DLRM from a safetensors state_dict. The architecture follows from the tensor shapes
/// (the interaction from the top MLP's input width); `optimizer` sets up fresh optimizer state.
/// Non-finite values are refused unless `opts` allows them.
pub fn import_safetensors(
    path: &Path,
    optimizer: OptimizerKind,
    storage: &StorageKind,
    seed: u64,
    opts: LoadOptions,
) -> Result<Dlrm> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let shape = |name: &str| -> Result<Vec<usize>> {
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
    };
    let count = |prefix: &str, suffix: &str, step: usize| {
        (0..)
            .take_while(|k| {
                st.tensor(&format!("{prefix}.{}.{suffix}", k * step))
                    .is_ok()
            })
            .count()
    };
    let tables = count("emb_l", "weight", 1);
    ensure!(
        tables > 0,
        "{}: no emb_l.0.weight: not a DLRM state_dict",
        path.display()
    );
    let first = shape("emb_l.0.weight")?;
    ensure!(
        first.len() == 2,
        "{}: emb_l.0.weight is not a matrix",
        path.display()
    );
    let d = first[1];
    let mut sizes = Vec::with_capacity(tables);
    for t in 0..tables {
        let s = shape(&format!("emb_l.{t}.weight"))?;
        ensure!(
            s.len() == 2 && s[1] == d,
            "{}: emb_l.{t}.weight has shape {s:?}, expected (rows, {d})",
            path.display()
        );
        sizes.push(s[0]);
    }
    let widths = |prefix: &str| -> Result<Vec<usize>> {
        let n = count(prefix, "weight", 2);
        ensure!(n > 0, "{}: no {prefix}.0.weight", path.display());
        let mut w = Vec::with_capacity(n + 1);
        for k in 0..n {
            let s = shape(&format!("{prefix}.{}.weight", 2 * k))?;
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
    };
    let bottom = widths("bot_l")?;
    let top = widths("top_l")?;
    let f = tables + 1;
    let (op, itself) = if top[0] == d + f * (f - 1) / 2 {
        (InteractionOp::Dot, false)
    } else if top[0] == d + f * (f + 1) / 2 {
        (InteractionOp::Dot, true)
    } else if top[0] == f * d {
        (InteractionOp::Cat, false)
    } else {
        bail!(
            "{}: the top MLP takes {} inputs, which no interaction of {f} vectors of width {d} gives",
            path.display(),
            top[0]
        );
    };
    let arch = Architecture::from_flags(
        d,
        &join(&sizes),
        &join(&bottom),
        &join(&top[1..]),
        op,
        itself,
    )
    .with_context(|| format!("{}: inconsistent architecture", path.display()))?;
    let width = optimizer.sparse(0.0).state_width(d);
    let mut emb = Vec::with_capacity(tables);
    let mut states = Vec::with_capacity(tables);
    for (t, &rows) in sizes.iter().enumerate() {
        let mut values = vec![0.0f32; rows * d];
        read_tensor(
            &st,
            path,
            &format!("emb_l.{t}.weight"),
            &[rows, d],
            &mut values,
            opts,
        )?;
        let table = EmbeddingTable::create_from(t, d, seed, &values, storage)?;
        states.push(OptimizerState::create_for(&table, width)?);
        emb.push(table);
    }
    let mut rng = SplitMix64::new(seed);
    let mut bot = Mlp::new(&arch.bottom, true, &mut rng);
    let mut topm = Mlp::new(&arch.top, false, &mut rng);
    for (prefix, mlp) in [("bot_l", &mut bot), ("top_l", &mut topm)] {
        let n = mlp.layers.len();
        for (layer, (wn, bn)) in mlp.layers.iter_mut().zip(layer_names(prefix, n)) {
            read_tensor(
                &st,
                path,
                &wn,
                &[layer.outputs, layer.inputs],
                &mut layer.weight,
                opts,
            )?;
            read_tensor(&st, path, &bn, &[layer.outputs], &mut layer.bias, opts)?;
        }
    }
    Ok(Dlrm::assemble(arch, optimizer, bot, topm, emb, states))
}
