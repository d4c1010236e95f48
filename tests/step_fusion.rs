//! The dense step packs each MLP weight matrix once for all row chunks of a batch
//! (`PackedWeights`): the chunks' forward and backward must give the same bits as products that
//! pack their own operands, and a repacking must follow the weights after an update.

use dlrm::kernels::gemm::{MatMut, MatRef, Precision};
use dlrm::kernels::parallel::Par;
use dlrm::model::mlp::{LayerGrads, Linear, MlpBuffers, PackedWeights};
use dlrm::rng::SplitMix64;

/// Layers `widths[0] -> widths[1] -> ...`, ReLU after all but the last.
fn layers(widths: &[usize], seed: u64) -> Vec<Linear> {
    let mut rng = SplitMix64::new(seed);
    let n = widths.len() - 1;
    (0..n)
        .map(|l| Linear::new(widths[l], widths[l + 1], l + 1 < n, &mut rng))
        .collect()
}

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| rng.normal()).collect()
}

/// Everything one forward and backward writes: output, input gradient, weight and bias
/// gradients, as bits.
fn run(layers: &[Linear], packed: Option<&[PackedWeights]>, rows: usize) -> Vec<u32> {
    let (ins, outs) = (layers[0].inputs, layers.last().unwrap().outputs);
    let x = values(rows * ins, 1);
    let d_out = values(rows * outs, 2);
    let mut buffers = MlpBuffers::new(layers);
    buffers.reserve(layers, rows);
    let mut out = vec![0.0; rows * outs];
    let xm = MatRef::new(&x, rows, ins);
    let om = Some(MatMut::new(&mut out, rows, outs));
    buffers.forward(layers, packed, xm, om, Precision::F32, Par::Seq);
    let mut dx = vec![0.0; rows * ins];
    let mut grads = LayerGrads::for_layers(layers);
    buffers.backward(
        layers,
        packed,
        xm,
        Some(MatRef::new(&out, rows, outs)),
        MatRef::new(&d_out, rows, outs),
        Some(MatMut::new(&mut dx, rows, ins)),
        &mut grads,
        Precision::F32,
        Par::Seq,
    );
    let grads = grads.iter().flat_map(|g| g.weight.iter().chain(&g.bias));
    out.iter()
        .chain(&dx)
        .chain(grads)
        .map(|v| v.to_bits())
        .collect()
}

fn packed(layers: &[Linear]) -> Vec<PackedWeights> {
    let mut packed = PackedWeights::for_layers(layers);
    packed.iter_mut().zip(layers).for_each(|(p, l)| p.pack(l));
    packed
}

#[test]
fn packed_weights_give_the_same_bits_on_the_kaggle_mlps() {
    for widths in [
        &[13, 512, 256, 64, 16][..],
        &[367, 512, 256, 1],
        &[5, 33, 17, 3],
    ] {
        let layers = layers(widths, 7);
        let packed = packed(&layers);
        // The chunk of a 2048 batch, a short last chunk, one row, and rows off the tile.
        for rows in [256, 77, 1, 25] {
            assert_eq!(
                run(&layers, Some(&packed), rows),
                run(&layers, None, rows),
                "{widths:?} on {rows} rows"
            );
        }
    }
}

#[test]
fn repacking_follows_updated_weights() {
    let mut layers = layers(&[13, 64, 16], 3);
    let mut packed = packed(&layers);
    for layer in &mut layers {
        layer.weight.iter_mut().for_each(|w| *w *= -0.5);
    }
    assert_ne!(run(&layers, Some(&packed), 40), run(&layers, None, 40));
    packed.iter_mut().zip(&layers).for_each(|(p, l)| p.pack(l));
    assert_eq!(run(&layers, Some(&packed), 40), run(&layers, None, 40));
}
