//! Multilayer perceptrons on the GEMM: fully connected layers in the PyTorch layout
//! (weight out x in, y = x W^T + b) with bias and ReLU fused into the product, and the backward
//! with the ReLU mask fused into the read of the output gradient.

use crate::rng::SplitMix64;
use dlrm_kernels::gemm::{
    MatMut, MatRef, PackedB, Precision, bias_grad, linear_backward_input_prepacked,
    linear_backward_weight, linear_forward_prepacked,
};
use dlrm_kernels::parallel::Par;

/// One fully connected layer and its gradients.
#[derive(Clone, Debug)]
pub struct Linear {
    pub inputs: usize,
    pub outputs: usize,
    /// outputs x inputs, row-major.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub grad_weight: Vec<f32>,
    pub grad_bias: Vec<f32>,
    /// A ReLU follows the layer.
    pub relu: bool,
}

impl Linear {
    /// The reference's initialisation (dlrm_s_pytorch.py create_mlp):
    /// W ~ N(0, sqrt(2 / (in + out))), b ~ N(0, sqrt(1 / out)).
    pub fn new(inputs: usize, outputs: usize, relu: bool, rng: &mut SplitMix64) -> Linear {
        let w_std = (2.0 / (inputs + outputs) as f32).sqrt();
        let b_std = (1.0 / outputs as f32).sqrt();
        let weight = (0..inputs * outputs)
            .map(|_| rng.normal() * w_std)
            .collect();
        let bias = (0..outputs).map(|_| rng.normal() * b_std).collect();
        Linear {
            inputs,
            outputs,
            weight,
            bias,
            grad_weight: vec![0.0; inputs * outputs],
            grad_bias: vec![0.0; outputs],
            relu,
        }
    }

    pub fn weight_view(&self) -> MatRef<'_> {
        MatRef::new(&self.weight, self.outputs, self.inputs)
    }
}

/// The weight and bias gradients of one layer, computed apart from the layer (by one chunk of a
/// batch) and added into the layer's own gradients afterwards.
#[derive(Clone, Debug, Default)]
pub struct LayerGrads {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl LayerGrads {
    /// Zeroed gradients for each of `layers`.
    pub fn for_layers(layers: &[Linear]) -> Vec<LayerGrads> {
        layers
            .iter()
            .map(|l| LayerGrads {
                weight: vec![0.0; l.weight.len()],
                bias: vec![0.0; l.bias.len()],
            })
            .collect()
    }
}

/// A layer's weights packed for the products that read them as the GEMM's B operand: W^T in
/// the forward, W in dX. Packed once per step, they serve every row chunk of the batch.
#[derive(Clone, Debug, Default)]
pub struct PackedWeights {
    forward: PackedB,
    backward_input: PackedB,
}

impl PackedWeights {
    /// Empty packings for each of `layers` (allocated by the first [`PackedWeights::pack`]).
    pub fn for_layers(layers: &[Linear]) -> Vec<PackedWeights> {
        vec![PackedWeights::default(); layers.len()]
    }

    /// Packs `layer`'s current weights for f32 products.
    pub fn pack(&mut self, layer: &Linear) {
        self.pack_for(layer, Precision::F32);
    }

    /// Packs `layer`'s current weights for the products of `precision` (f32 panels, or
    /// rounded to bf16 in the BF16 product's pair layout).
    pub fn pack_for(&mut self, layer: &Linear, precision: Precision) {
        self.forward.pack_for(layer.weight_view().t(), precision);
        self.backward_input.pack_for(layer.weight_view(), precision);
    }
}

/// Swaps each layer's gradients with `grads` (moving a Vec swaps three words: no copy, no
/// allocation).
pub fn swap_grads(layers: &mut [Linear], grads: &mut [LayerGrads]) {
    for (layer, g) in layers.iter_mut().zip(grads) {
        std::mem::swap(&mut layer.grad_weight, &mut g.weight);
        std::mem::swap(&mut layer.grad_bias, &mut g.bias);
    }
}

/// The activation and gradient buffers of a forward and backward through a stack of layers,
/// sized once for the largest batch and reused every step. Several buffers may serve one stack
/// of layers (one per chunk of a batch).
#[derive(Clone, Debug)]
pub struct MlpBuffers {
    /// Output of each layer (batch x outputs); the last one unused when the caller redirects
    /// the output into its own buffer.
    acts: Vec<Vec<f32>>,
    /// Gradient w.r.t. each layer's output but the last (which the caller owns).
    grads: Vec<Vec<f32>>,
    /// Batch sizes the forward and the gradient buffers are sized for.
    capacity: usize,
    grad_capacity: usize,
    /// Width of the last layer's output.
    outputs: usize,
}

impl MlpBuffers {
    /// Empty buffers for `layers` (nothing allocated before `reserve`).
    pub fn new(layers: &[Linear]) -> MlpBuffers {
        MlpBuffers {
            acts: vec![Vec::new(); layers.len()],
            grads: vec![Vec::new(); layers.len()],
            capacity: 0,
            grad_capacity: 0,
            outputs: layers.last().map_or(0, |l| l.outputs),
        }
    }

    /// Sizes the buffers for training on batches of up to `batch` samples (allocates only when
    /// growing).
    pub fn reserve(&mut self, layers: &[Linear], batch: usize) {
        self.reserve_forward(layers, batch);
        if batch <= self.grad_capacity {
            return;
        }
        for (grad, layer) in self.grads.iter_mut().zip(layers) {
            grad.resize(batch * layer.outputs, 0.0);
        }
        self.grad_capacity = batch;
    }

    /// Sizes only the forward buffers (inference: no gradient memory).
    pub fn reserve_forward(&mut self, layers: &[Linear], batch: usize) {
        if batch <= self.capacity {
            return;
        }
        for (act, layer) in self.acts.iter_mut().zip(layers) {
            act.resize(batch * layer.outputs, 0.0);
        }
        self.capacity = batch;
    }

    /// The last layer's output (when forward had no `out`).
    pub fn output(&self, batch: usize) -> MatRef<'_> {
        let (last, o) = (self.acts.last().expect("non-empty"), self.outputs);
        MatRef::new(&last[..batch * o], batch, o)
    }

    /// Forward of `layers` over `x` (batch x inputs). The last layer writes into `out` when
    /// given (e.g. straight into the interaction's input rows), else into these buffers.
    /// `precision` is that of the products' operands (the weights stay f32 masters). `packed`:
    /// the layers' weights packed ahead ([`PackedWeights`]), or None to pack them here.
    pub fn forward(
        &mut self,
        layers: &[Linear],
        packed: Option<&[PackedWeights]>,
        x: MatRef,
        mut out: Option<MatMut>,
        precision: Precision,
        par: Par,
    ) {
        let batch = x.rows();
        assert!(
            batch <= self.capacity,
            "reserve() the MLP for batch {batch}"
        );
        let n = layers.len();
        for (l, layer) in layers.iter().enumerate() {
            let (done, rest) = self.acts.split_at_mut(l);
            let input = if l == 0 {
                x
            } else {
                MatRef::new(&done[l - 1][..batch * layer.inputs], batch, layer.inputs)
            };
            let y = match (&mut out, l + 1 == n) {
                (Some(o), true) => o.rb_mut(),
                _ => MatMut::new(&mut rest[0][..batch * layer.outputs], batch, layer.outputs),
            };
            linear_forward_prepacked(
                input,
                layer.weight_view(),
                packed.map(|p| &p[l].forward),
                Some(&layer.bias),
                layer.relu,
                y,
                precision,
                par,
            );
        }
    }

    /// Backward of `layers` from `d_out` (gradient w.r.t. the output): fills `grads[l]` with
    /// layer l's weight and bias gradients (overwritten) and, when `dx` is given, the gradient
    /// w.r.t. the input `x`. `out` is where forward wrote the output: the caller's buffer, or
    /// None for these buffers. `packed` as in [`MlpBuffers::forward`].
    ///
    /// Each layer's ReLU backward is applied once: to `d_out` inside the last layer's products
    /// (as their operand mask), and below it in the store of the layer above's dX (masked by
    /// its input, the ReLU's output), so the gradients between layers are stored already
    /// masked, in f32 and bf16 alike (the bf16 products apply the mask in their f32 epilogue),
    /// and the weight and bias gradients read them without a mask.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        layers: &[Linear],
        packed: Option<&[PackedWeights]>,
        x: MatRef,
        out: Option<MatRef>,
        d_out: MatRef,
        mut dx: Option<MatMut>,
        grads: &mut [LayerGrads],
        precision: Precision,
        par: Par,
    ) {
        let batch = x.rows();
        assert!(
            batch <= self.grad_capacity,
            "reserve() the MLP for training on batch {batch}"
        );
        let n = layers.len();
        for l in (0..n).rev() {
            let (ins, outs) = (layers[l].inputs, layers[l].outputs);
            let input = if l == 0 {
                x
            } else {
                MatRef::new(&self.acts[l - 1][..batch * ins], batch, ins)
            };
            let y = match out {
                Some(o) if l + 1 == n => o,
                _ => MatRef::new(&self.acts[l][..batch * outs], batch, outs),
            };
            let (below, here) = self.grads.split_at_mut(l);
            let dy = if l + 1 == n {
                d_out
            } else {
                MatRef::new(&here[0][..batch * outs], batch, outs)
            };
            // Above the last layer, dY was masked when the layer above stored it.
            let mask = (l + 1 == n && layers[l].relu).then_some(y);
            let g = &mut grads[l];
            linear_backward_weight(
                dy,
                mask,
                input,
                MatMut::new(&mut g.weight, outs, ins),
                false,
                precision,
                par,
            );
            bias_grad(dy, mask, &mut g.bias, false, par);
            // dX of the layer's input: the caller's (unmasked), or the layer below's output
            // gradient, masked here by its ReLU.
            let (d_input, input_relu) = if l == 0 {
                (dx.as_mut().map(|d| d.rb_mut()), None)
            } else {
                let d = MatMut::new(&mut below[l - 1][..batch * ins], batch, ins);
                (Some(d), layers[l - 1].relu.then_some(input))
            };
            if let Some(d) = d_input {
                let packed_w = packed.map(|p| &p[l].backward_input);
                let w = layers[l].weight_view();
                linear_backward_input_prepacked(
                    dy, mask, w, packed_w, input_relu, d, precision, par,
                );
            }
        }
    }
}

/// A stack of layers with its activation and gradient buffers.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub layers: Vec<Linear>,
    buffers: MlpBuffers,
    /// Where [`Mlp::backward`] holds the layers' gradients while it writes them (empty vectors
    /// otherwise): moved out of the layers, so that the layers stay readable meanwhile.
    grads_out: Vec<LayerGrads>,
    /// The operands of every product: f32, or rounded to bf16 in the GEMM (the weights stay
    /// f32 masters).
    pub precision: Precision,
}

impl Mlp {
    /// Layers `widths[0] -> widths[1] -> ...`, ReLU after every layer, or after every layer but
    /// the last when `!relu_last`.
    pub fn new(widths: &[usize], relu_last: bool, rng: &mut SplitMix64) -> Mlp {
        assert!(widths.len() >= 2, "an MLP needs at least one layer");
        let n = widths.len() - 1;
        let layers: Vec<Linear> = (0..n)
            .map(|l| Linear::new(widths[l], widths[l + 1], relu_last || l + 1 < n, rng))
            .collect();
        Mlp {
            buffers: MlpBuffers::new(&layers),
            grads_out: vec![LayerGrads::default(); n],
            layers,
            precision: Precision::F32,
        }
    }

    pub fn inputs(&self) -> usize {
        self.layers[0].inputs
    }

    pub fn outputs(&self) -> usize {
        self.layers.last().expect("non-empty").outputs
    }

    /// Sizes the buffers for training on batches of up to `batch` samples (allocates only when
    /// growing).
    pub fn reserve(&mut self, batch: usize) {
        self.buffers.reserve(&self.layers, batch);
    }

    /// Sizes only the forward buffers (inference: no gradient memory).
    pub fn reserve_forward(&mut self, batch: usize) {
        self.buffers.reserve_forward(&self.layers, batch);
    }

    /// Forward over `x` (batch x inputs). The last layer writes into `out` when given (e.g.
    /// straight into the interaction's input rows), else into the MLP's own buffer.
    pub fn forward(&mut self, x: MatRef, out: Option<MatMut>, par: Par) {
        self.buffers
            .forward(&self.layers, None, x, out, self.precision, par);
    }

    /// The last layer's output in the MLP's own buffer (when forward had no `out`).
    pub fn output(&self, batch: usize) -> MatRef<'_> {
        self.buffers.output(batch)
    }

    /// Backward: from `d_out` (gradient w.r.t. the output), fills every layer's grad_weight /
    /// grad_bias (overwritten) and, when `dx` is given, the gradient w.r.t. the input `x`.
    /// `out` is where forward wrote the output: the caller's buffer, or None for the MLP's own.
    pub fn backward(
        &mut self,
        x: MatRef,
        out: Option<MatRef>,
        d_out: MatRef,
        dx: Option<MatMut>,
        par: Par,
    ) {
        swap_grads(&mut self.layers, &mut self.grads_out);
        let precision = self.precision;
        self.buffers.backward(
            &self.layers,
            None,
            x,
            out,
            d_out,
            dx,
            &mut self.grads_out,
            precision,
            par,
        );
        swap_grads(&mut self.layers, &mut self.grads_out);
    }
}

/// PyTorch state_dict names of the MLP layers: dlrm_s_pytorch.py builds each MLP as an
/// nn.Sequential of Linear, ReLU, Linear, ... so Linear k is module 2k.
pub fn layer_names(prefix: &str, layers: usize) -> Vec<(String, String)> {
    (0..layers)
        .map(|k| {
            (
                format!("{prefix}.{}.weight", 2 * k),
                format!("{prefix}.{}.bias", 2 * k),
            )
        })
        .collect()
}
