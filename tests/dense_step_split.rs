//! The dense step runs on row chunks of the batch (a function of the batch size alone), each
//! chunk's weight gradients reduced in chunk order: the parameters stay bit-identical on any
//! thread count, for batches that are and are not multiples of the chunk, and the reduced
//! gradients are the batch mean of the per-sample gradients.

mod common;

use common::threads::{new_dlrm, on_threads, parameters, teacher, tiny_arch, train_steps};
use dlrm::data::Batch;
use dlrm::data::synthetic::SyntheticSource;
use dlrm::kernels::parallel::Par;
use dlrm::model::PhaseTimer;
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dlrm::{Dlrm, MAX_CHUNKS, MIN_CHUNK_ROWS, chunking};
use dlrm::model::{Model, OptimizerKind};
use dlrm::train::DataSource;

fn arch() -> Architecture {
    tiny_arch(InteractionOp::Dot)
}

/// The bits of every dense parameter and table after steps of `sizes` samples on a pool of
/// `threads` threads under `par`.
fn train_bits(optimizer: OptimizerKind, sizes: &[usize], threads: usize, par: Par) -> Vec<u32> {
    let arch = arch();
    let data = teacher(&arch, 2, 11, 8_192);
    on_threads(threads, || {
        let mut m = new_dlrm(&arch, optimizer, 5, par, *sizes.iter().max().unwrap());
        train_steps(&mut m, &data, sizes, 0.05);
        parameters(&m).map(|x| x.to_bits()).collect()
    })
}

#[test]
fn chunking_depends_on_the_batch_size_only_and_covers_it() {
    for b in 1..3000 {
        let (n, rows) = chunking(b);
        assert!((1..=MAX_CHUNKS).contains(&n), "batch {b}: {n} chunks");
        assert!(
            n * rows >= b && (n - 1) * rows < b,
            "batch {b}: {n} x {rows}"
        );
        assert!(
            n == 1 || rows >= MIN_CHUNK_ROWS,
            "batch {b}: chunks of {rows}"
        );
    }
    assert_eq!(chunking(2048), (8, 256));
    assert_eq!(chunking(128), (1, 128));
}

#[test]
fn steps_are_bit_identical_on_1_2_3_threads() {
    // 512 (4 chunks) and 300 (2): whole chunks; 601, 401 and 1100 (8 chunks): a shorter last
    // chunk; 100: one chunk.
    let sizes = [512, 601, 401, 100, 300, 1100];
    for optimizer in [OptimizerKind::Sgd, OptimizerKind::Adagrad] {
        let one = train_bits(optimizer, &sizes, 1, Par::Rayon);
        for (threads, par) in [
            (2, Par::Rayon),
            (3, Par::Rayon),
            (2, Par::AlwaysSplit),
            (3, Par::AlwaysSplit),
            (2, Par::Seq),
        ] {
            let bits = train_bits(optimizer, &sizes, threads, par);
            assert!(
                one == bits,
                "{optimizer:?}: {threads} threads under {par:?} differ from 1 thread"
            );
        }
    }
}

/// The loss and the dense gradients of one step on a batch of `b` samples starting at
/// `start`, with a zero learning rate (the parameters stay as they are).
fn loss_and_grads(m: &mut Dlrm, data: &SyntheticSource, start: u64, b: usize) -> (f64, Vec<f64>) {
    let mut batch = Batch::default();
    data.fill_train(start, b, &mut batch).unwrap();
    let loss = Model::train_step(m, &batch.view(), 0.0, &mut PhaseTimer::default()).unwrap();
    let layers = m.bottom.layers.iter().chain(&m.top.layers);
    let grads = layers
        .flat_map(|l| l.grad_weight.iter().chain(&l.grad_bias))
        .map(|&g| f64::from(g))
        .collect();
    (loss, grads)
}

#[test]
fn chunked_gradients_are_the_mean_of_per_sample_gradients() {
    let arch = arch();
    let data = teacher(&arch, 2, 11, 8_192);
    let mut m = new_dlrm(&arch, OptimizerKind::Sgd, 9, Par::default(), 512);
    // 3 chunks of 133 rows, the last one of 397 - 2 * 133 = 131.
    let b = 397;
    assert_eq!(chunking(b), (3, 133));
    let (loss, grads) = loss_and_grads(&mut m, &data, 40, b);
    let mut mean_loss = 0.0;
    let mut mean = vec![0.0f64; grads.len()];
    for i in 0..b as u64 {
        let (l, g) = loss_and_grads(&mut m, &data, 40 + i, 1);
        mean_loss += l / b as f64;
        for (s, x) in mean.iter_mut().zip(g) {
            *s += x / b as f64;
        }
    }
    assert!(
        (loss - mean_loss).abs() <= 1e-6 * mean_loss.abs(),
        "loss {loss} vs {mean_loss}"
    );
    let scale = mean.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    for (k, (g, r)) in grads.iter().zip(&mean).enumerate() {
        assert!(
            (g - r).abs() <= 1e-4 * scale,
            "gradient {k}: {g} vs the per-sample mean {r}"
        );
    }
}
