//! What the distributed tests share: the tiny preset's network over given tables, teacher data
//! for it, the costs a sharding plan weighs, and every tensor of a model.

use super::threads::{self, teacher_rows, tiny_network};
use dlrm::data::Batch;
use dlrm::data::synthetic::SyntheticSource;
use dlrm::distributed::{ShardPlan, TableCost};
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dlrm::Dlrm;
use dlrm::model::parameters::Parameters;
use dlrm::model::{Model, OptimizerKind, PhaseTimer};
use dlrm::storage::StorageKind;
use dlrm::train::DataSource;
use std::collections::BTreeMap;

/// The tiny preset's MLPs and dimension 16 over tables of `tables` rows.
pub fn tiny_arch(tables: Vec<usize>) -> Architecture {
    tiny_network(tables, InteractionOp::Dot)
}

/// The tiny preset's network.
pub fn tiny_preset_arch() -> Architecture {
    threads::tiny_arch(InteractionOp::Dot)
}

/// 16,384 training and 1,000 held-out teacher rows for `arch`, bags of 1 to `ids_per_lookup`.
pub fn teacher_data(arch: &Architecture, ids_per_lookup: usize, seed: u64) -> SyntheticSource {
    teacher_rows(arch, ids_per_lookup, seed, 16_384, 1_000)
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

/// How the one-process run the ranks are compared with is set up.
pub struct SingleRun<'a> {
    pub arch: Architecture,
    pub data: &'a SyntheticSource,
    pub seed: u64,
    pub learning_rate: f32,
}

impl SingleRun<'_> {
    /// One process: the parameters after `steps` steps of `batch` samples (the training rows
    /// taken in order, from the start again past 15,360), and the predictions for the first
    /// 1,000 held-out rows.
    pub fn train(
        &self,
        optimizer: OptimizerKind,
        batch: usize,
        steps: usize,
    ) -> (Tensors, Vec<f32>) {
        let kind = StorageKind::Anon;
        let mut m = Dlrm::new(self.arch.clone(), optimizer, &kind, self.seed).unwrap();
        Model::reserve(&mut m, batch);
        let mut b = Batch::default();
        for s in 0..steps {
            let first = ((s * batch) % 15_360) as u64;
            self.data.fill_train(first, batch, &mut b).unwrap();
            m.train_step(&b.view(), self.learning_rate, &mut PhaseTimer::default())
                .unwrap();
        }
        self.data.fill_test(0, 1_000, &mut b).unwrap();
        m.reserve_inference(1_000);
        let mut probs = Vec::new();
        m.predict(&b.view(), &mut probs).unwrap();
        (tensors(&m), probs)
    }
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

/// The whole model from every rank's tensors: the ranges of `plan`'s row-split tables joined in
/// rank order, and every other tensor required to be bit-equal on every rank that holds it.
pub fn merge_ranks<'a>(
    plan: &ShardPlan,
    per_rank: impl IntoIterator<Item = &'a Tensors>,
) -> Tensors {
    let split: Vec<String> = (plan.row_split().iter())
        .map(|t| format!("emb_l.{t}.weight"))
        .collect();
    let mut merged = Tensors::new();
    for tensors in per_rank {
        for (name, values) in tensors {
            if split.iter().any(|s| s == name.trim_end_matches(" state")) {
                merged.entry(name.clone()).or_default().extend(values);
            } else if let Some(other) = merged.insert(name.clone(), values.clone()) {
                assert_eq!(bits(&other), bits(values), "{name} differs between ranks");
            }
        }
    }
    merged
}

/// The values' bit patterns, compared where equality must be exact (and NaN equal to itself).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
