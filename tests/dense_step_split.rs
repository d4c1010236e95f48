//! The dense step runs on row chunks of the batch (a function of the batch size alone), each
//! chunk's weight gradients reduced in chunk order: the parameters stay bit-identical on any
//! thread count, for batches that are and are not multiples of the chunk, and the reduced
//! gradients are the batch mean of the per-sample gradients.

use dlrm::config::Preset;
use dlrm::data::Batch;
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::kernels::parallel::Par;
use dlrm::model::PhaseTimer;
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dlrm::{Dlrm, MAX_CHUNKS, MIN_CHUNK_ROWS, chunking};
use dlrm::model::{Model, OptimizerKind};
use dlrm::storage::StorageKind;
use dlrm::train::DataSource;

fn arch() -> Architecture {
    let p = Preset::Tiny.values();
    Architecture::new(
        16,
        p.table_sizes,
        p.bottom.to_vec(),
        p.top.to_vec(),
        InteractionOp::Dot,
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
        num_indices_per_lookup: 2,
        fixed_bag_size: false,
        seed: 11,
    });
    SyntheticSource::new(data, 8_192, 512)
}

/// The bits of every dense parameter and table after steps of `sizes` samples on a pool of
/// `threads` threads under `par`.
fn train_bits(optimizer: OptimizerKind, sizes: &[usize], threads: usize, par: Par) -> Vec<u32> {
    let arch = arch();
    let data = teacher(&arch);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut m = Dlrm::new(arch.clone(), optimizer, &StorageKind::Anon, 5).unwrap();
        m.set_parallelism(par);
        Model::reserve(&mut m, *sizes.iter().max().unwrap());
        let mut batch = Batch::default();
        let mut start = 0;
        for &b in sizes {
            data.fill_train(start, b, &mut batch).unwrap();
            start += b as u64;
            Model::train_step(&mut m, &batch.view(), 0.05, &mut PhaseTimer::default()).unwrap();
        }
        let layers = m.bottom.layers.iter().chain(&m.top.layers);
        let dense = layers.flat_map(|l| l.weight.iter().chain(&l.bias));
        let tables = m.embeddings.tables.iter().flat_map(|t| t.weights());
        dense.chain(tables).map(|x| x.to_bits()).collect()
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
    let data = teacher(&arch);
    let mut m = Dlrm::new(arch, OptimizerKind::Sgd, &StorageKind::Anon, 9).unwrap();
    Model::reserve(&mut m, 512);
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
