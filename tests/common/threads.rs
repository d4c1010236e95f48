//! Thread-invariance setup: the tiny DLRM trained on teacher rows inside a pool of a given
//! number of threads, and the bits of what it learned.

use dlrm::config::Preset;
use dlrm::data::Batch;
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::kernels::parallel::Par;
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dlrm::Dlrm;
use dlrm::model::{Model, OptimizerKind, PhaseTimer};
use dlrm::storage::StorageKind;
use dlrm::train::DataSource;

/// The tiny preset's network with 16-wide embeddings.
pub fn tiny_arch(interaction: InteractionOp) -> Architecture {
    tiny_network(Preset::Tiny.values().table_sizes, interaction)
}

/// The tiny preset's MLPs with 16-wide embeddings over tables of `tables` rows.
pub fn tiny_network(tables: Vec<usize>, interaction: InteractionOp) -> Architecture {
    let p = Preset::Tiny.values();
    Architecture::new(
        16,
        tables,
        p.bottom.to_vec(),
        p.top.to_vec(),
        interaction,
        false,
    )
    .unwrap()
}

/// `train_rows` teacher-labelled rows (512 test rows) with bags of up to `ids_per_lookup` ids.
pub fn teacher(
    arch: &Architecture,
    ids_per_lookup: usize,
    seed: u64,
    train_rows: u64,
) -> SyntheticSource {
    teacher_rows(arch, ids_per_lookup, seed, train_rows, 512)
}

/// `train_rows` and `test_rows` teacher-labelled rows with bags of up to `ids_per_lookup` ids.
pub fn teacher_rows(
    arch: &Architecture,
    ids_per_lookup: usize,
    seed: u64,
    train_rows: u64,
    test_rows: u64,
) -> SyntheticSource {
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: arch.num_dense(),
        table_sizes: arch.table_sizes.clone(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: ids_per_lookup,
        fixed_bag_size: false,
        seed,
    });
    SyntheticSource::new(data, train_rows, test_rows)
}

/// A DLRM over anonymous memory with parallelism `par` and room for batches of `max_batch`.
pub fn new_dlrm(
    arch: &Architecture,
    optimizer: OptimizerKind,
    seed: u64,
    par: Par,
    max_batch: usize,
) -> Dlrm {
    let mut m = Dlrm::new(arch.clone(), optimizer, &StorageKind::Anon, seed).unwrap();
    m.set_parallelism(par);
    Model::reserve(&mut m, max_batch);
    m
}

/// One step per entry of `sizes`, on consecutive training rows from the first.
pub fn train_steps(m: &mut Dlrm, data: &SyntheticSource, sizes: &[usize], lr: f32) {
    let mut batch = Batch::default();
    let mut start = 0;
    for &b in sizes {
        data.fill_train(start, b, &mut batch).unwrap();
        start += b as u64;
        Model::train_step(m, &batch.view(), lr, &mut PhaseTimer::default()).unwrap();
    }
}

/// Runs `f` inside a fresh pool of `threads` threads.
pub fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Every dense weight and bias (bottom MLP, then top), then every table's weights.
pub fn parameters(m: &Dlrm) -> impl Iterator<Item = &f32> {
    let layers = m.bottom.layers.iter().chain(&m.top.layers);
    let dense = layers.flat_map(|l| l.weight.iter().chain(&l.bias));
    let tables = m.embeddings.tables.iter().flat_map(|t| t.weights());
    dense.chain(tables)
}
