//! DLRM trains to the same bits on any thread count: every kernel splits its work by shape
//! alone, so 1, 2 and 3 threads, with every kernel on its parallel path (`Par::AlwaysSplit`),
//! give bit-identical parameters, optimizer state and predictions, and so does the serial path.

mod common;

use common::threads::{new_dlrm, on_threads, parameters, teacher, tiny_arch, train_steps};
use dlrm::data::Batch;
use dlrm::kernels::parallel::Par;
use dlrm::model::architecture::InteractionOp;
use dlrm::model::{Model, OptimizerKind};
use dlrm::train::DataSource;

/// The bits of every parameter and optimizer state, then of the predictions on the test set,
/// after 6 steps of 256 samples on a pool of `threads` threads under `par`.
fn train_bits(
    interaction: InteractionOp,
    optimizer: OptimizerKind,
    threads: usize,
    par: Par,
) -> Vec<u32> {
    let arch = tiny_arch(interaction);
    let data = teacher(&arch, 3, 7, 4_096);
    on_threads(threads, || {
        let mut m = new_dlrm(&arch, optimizer, 3, par, 512);
        train_steps(&mut m, &data, &[256; 6], 0.1);
        let mut test = Batch::default();
        data.fill_test(0, 512, &mut test).unwrap();
        let mut probs = Vec::new();
        Model::predict(&mut m, &test.view(), &mut probs).unwrap();
        let states = m.embeddings.states.iter().flat_map(|s| s.as_slice());
        parameters(&m)
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
