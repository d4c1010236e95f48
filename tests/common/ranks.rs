//! What the distributed tests share: the tiny preset's network over given tables, teacher data
//! for it, the costs a sharding plan weighs, and every tensor of a model.

use dlrm::config::Preset;
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::distributed::TableCost;
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::parameters::Parameters;
use std::collections::BTreeMap;

/// The tiny preset's MLPs and dimension 16 over tables of `tables` rows.
pub fn tiny_arch(tables: Vec<usize>) -> Architecture {
    let p = Preset::Tiny.values();
    Architecture::new(
        16,
        tables,
        p.bottom.to_vec(),
        p.top.to_vec(),
        InteractionOp::Dot,
        false,
    )
    .unwrap()
}

/// The tiny preset's network.
pub fn tiny_preset_arch() -> Architecture {
    tiny_arch(Preset::Tiny.values().table_sizes)
}

/// 16,384 training and 1,000 held-out teacher rows for `arch`, bags of 1 to `ids_per_lookup`.
pub fn teacher_data(arch: &Architecture, ids_per_lookup: usize, seed: u64) -> SyntheticSource {
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: arch.num_dense(),
        table_sizes: arch.table_sizes.clone(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: ids_per_lookup,
        fixed_bag_size: false,
        seed,
    });
    SyntheticSource::new(data, 16_384, 1_000)
}

/// Each table's weights and `optimizer` state in bytes, and two lookups a sample.
pub fn table_costs(arch: &Architecture, optimizer: OptimizerKind) -> Vec<TableCost> {
    let d = arch.embedding_dim;
    let width = optimizer.sparse(0.0).state_width(d);
    (arch.table_sizes.iter())
        .map(|&rows| TableCost {
            rows,
            bytes: (rows * (d + width) * 4) as u64,
            lookup_bytes: 2 * d as u64 * 4,
        })
        .collect()
}

/// Every named tensor's values (weights and optimizer state).
pub type Tensors = BTreeMap<String, Vec<f32>>;

pub fn tensors(model: &dyn Parameters) -> Tensors {
    let mut out = Tensors::new();
    model.parameters(&mut |(name, _, tensor)| {
        out.insert(format!("{name} state"), tensor.state.to_vec());
        out.insert(name, tensor.values().to_vec());
    });
    out
}
