//! Multilayer perceptrons on the GEMM: fully connected layers in the PyTorch layout
//! (weight out x in, y = x W^T + b) with bias and ReLU fused into the product, and the backward
//! with the ReLU mask fused into the read of the output gradient.

use crate::rng::SplitMix64;
use dlrm_kernels::gemm::{
    MatMut, MatRef, Precision, bias_grad, linear_backward_input, linear_backward_weight,
    linear_forward,
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

/// A stack of layers with its activation and gradient buffers, sized once for the largest
/// batch and reused every step.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub layers: Vec<Linear>,
    /// Output of each layer (batch x outputs); the last one unused when the caller redirects
    /// the output into its own buffer.
    acts: Vec<Vec<f32>>,
    /// Gradient w.r.t. each layer's output but the last (which the caller owns).
    grads: Vec<Vec<f32>>,
    /// Batch sizes the forward and the gradient buffers are sized for.
    capacity: usize,
    grad_capacity: usize,
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
        let layers = (0..n)
            .map(|l| Linear::new(widths[l], widths[l + 1], relu_last || l + 1 < n, rng))
            .collect();
        Mlp {
            layers,
            acts: vec![Vec::new(); n],
            grads: vec![Vec::new(); n],
            capacity: 0,
            grad_capacity: 0,
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
        self.reserve_forward(batch);
        if batch <= self.grad_capacity {
            return;
        }
        for (l, layer) in self.layers.iter().enumerate() {
            self.grads[l].resize(batch * layer.outputs, 0.0);
        }
        self.grad_capacity = batch;
    }

    /// Sizes only the forward buffers (inference: no gradient memory).
    pub fn reserve_forward(&mut self, batch: usize) {
        if batch <= self.capacity {
            return;
        }
        for (l, layer) in self.layers.iter().enumerate() {
            self.acts[l].resize(batch * layer.outputs, 0.0);
        }
        self.capacity = batch;
    }

    /// Forward over `x` (batch x inputs). The last layer writes into `out` when given (e.g.
    /// straight into the interaction's input rows), else into the MLP's own buffer.
    pub fn forward(&mut self, x: MatRef, mut out: Option<MatMut>, par: Par) {
        let batch = x.rows();
        assert!(
            batch <= self.capacity,
            "reserve() the MLP for batch {batch}"
        );
        let n = self.layers.len();
        for l in 0..n {
            let layer = &self.layers[l];
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
            linear_forward(
                input,
                layer.weight_view(),
                Some(&layer.bias),
                layer.relu,
                y,
                self.precision,
                par,
            );
        }
    }

    /// The last layer's output in the MLP's own buffer (when forward had no `out`).
    pub fn output(&self, batch: usize) -> MatRef<'_> {
        let o = self.outputs();
        MatRef::new(&self.acts[self.layers.len() - 1][..batch * o], batch, o)
    }

    /// Backward: from `d_out` (gradient w.r.t. the output), fills every layer's grad_weight /
    /// grad_bias (overwritten) and, when `dx` is given, the gradient w.r.t. the input `x`.
    /// `out` is where forward wrote the output: the caller's buffer, or None for the MLP's own.
    pub fn backward(
        &mut self,
        x: MatRef,
        out: Option<MatRef>,
        d_out: MatRef,
        mut dx: Option<MatMut>,
        par: Par,
    ) {
        let batch = x.rows();
        assert!(
            batch <= self.grad_capacity,
            "reserve() the MLP for training on batch {batch}"
        );
        let (n, precision) = (self.layers.len(), self.precision);
        for l in (0..n).rev() {
            let (ins, outs) = (self.layers[l].inputs, self.layers[l].outputs);
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
            let layer = &mut self.layers[l];
            let mask = layer.relu.then_some(y);
            linear_backward_weight(
                dy,
                mask,
                input,
                MatMut::new(&mut layer.grad_weight, outs, ins),
                false,
                precision,
                par,
            );
            bias_grad(dy, mask, &mut layer.grad_bias, false, par);
            let d_input = if l == 0 {
                dx.as_mut().map(|d| d.rb_mut())
            } else {
                Some(MatMut::new(&mut below[l - 1][..batch * ins], batch, ins))
            };
            if let Some(d) = d_input {
                linear_backward_input(dy, mask, layer.weight_view(), d, precision, par);
            }
        }
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
