//! DLRM trains to the same bits on any thread count: every kernel splits its work by shape
//! alone, so 1, 2 and 3 threads, with every kernel on its parallel path (`Par::AlwaysSplit`),
//! give bit-identical parameters, optimizer state and predictions, and so does the serial path.

use dlrm::config::Preset;
use dlrm::data::Batch;
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::kernels::parallel::Par;
use dlrm::model::PhaseTimer;
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dlrm::Dlrm;
use dlrm::model::{Model, OptimizerKind};
use dlrm::storage::StorageKind;
use dlrm::train::DataSource;

fn arch(interaction: InteractionOp) -> Architecture {
    let p = Preset::Tiny.values();
    Architecture::new(
        16,
        p.table_sizes,
        p.bottom.to_vec(),
        p.top.to_vec(),
        interaction,
        false,
    )
    .unwrap()
}

fn teacher(arch: &Architecture) -> SyntheticSource {
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: arch.num_dense(),
        table_sizes: arch.table_sizes.clone(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 3,
        fixed_bag_size: false,
        seed: 7,
    });
    SyntheticSource::new(data, 4_096, 512)
}

/// The bits of every parameter and optimizer state, then of the predictions on the test set,
/// after 6 steps of 256 samples on a pool of `threads` threads under `par`.
fn train_bits(
    interaction: InteractionOp,
    optimizer: OptimizerKind,
    threads: usize,
    par: Par,
) -> Vec<u32> {
    let arch = arch(interaction);
    let data = teacher(&arch);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut m = Dlrm::new(arch.clone(), optimizer, &StorageKind::Anon, 3).unwrap();
        m.set_parallelism(par);
        Model::reserve(&mut m, 512);
        let mut batch = Batch::default();
        for i in 0..6 {
            data.fill_train(i * 256, 256, &mut batch).unwrap();
            Model::train_step(&mut m, &batch.view(), 0.1, &mut PhaseTimer::default()).unwrap();
        }
        let mut test = Batch::default();
        data.fill_test(0, 512, &mut test).unwrap();
        let mut probs = Vec::new();
        Model::predict(&mut m, &test.view(), &mut probs).unwrap();
        let layers = m.bottom.layers.iter().chain(&m.top.layers);
        let dense = layers.flat_map(|l| l.weight.iter().chain(&l.bias));
        let tables = m.embeddings.tables.iter().flat_map(|t| t.weights());
        let states = m.embeddings.states.iter().flat_map(|s| s.as_slice());
        dense
            .chain(tables)
            .chain(states)
            .chain(&probs)
            .map(|x| x.to_bits())
            .collect()
    })
}

#[test]
fn dlrm_trains_bit_identically_on_1_2_3_threads() {
    for interaction in [InteractionOp::Dot, InteractionOp::Cat] {
        for optimizer in [OptimizerKind::Adagrad, OptimizerKind::RowwiseAdagrad] {
            let run = |threads, par| train_bits(interaction, optimizer, threads, par);
            let one = run(1, Par::AlwaysSplit);
            let what = format!("{interaction:?} {optimizer:?}");
            assert_eq!(one, run(2, Par::AlwaysSplit), "{what}: 2 threads");
            assert_eq!(one, run(3, Par::AlwaysSplit), "{what}: 3 threads");
            assert_eq!(one, run(3, Par::Seq), "{what}: serial kernels");
            assert_eq!(one, run(3, Par::Rayon), "{what}: size-chosen paths");
        }
    }
}
