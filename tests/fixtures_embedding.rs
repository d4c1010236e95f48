//! Embedding bags against PyTorch: forward output, the table gradient (the coalesced sparse
//! gradient spread into a dense table), the per-sample-weight gradient, and one fused SGD
//! step, for the embedding_bag_sum, embedding_bag_sum_weighted and embedding_bag_mean cases.
//! Every size is read from the fixture's tensors.

mod common;

use common::fixtures::{self, Fixture};
use dlrm::kernels::embedding::{
    self, Bags, Pooling, SparseGradWorkspace, embedding_bag_backward_coalesce,
};
use dlrm::kernels::mat::{MatMut, MatRef};
use dlrm::kernels::optim::{self, SparseOptimizer, TableMut};
use dlrm::kernels::parallel::Par;

struct Case {
    fx: Fixture,
    rows: usize,
    dim: usize,
    indices: Vec<u32>,
    offsets: Vec<u32>,
    weights: Option<Vec<f32>>,
    pooling: Pooling,
}

impl Case {
    fn load(name: &str) -> Case {
        let fx = fixtures::load(name);
        let (rows, dim) = match fx.shape("table") {
            &[rows, dim] => (rows, dim),
            s => panic!("{name}: table has shape {s:?}, expected (rows, dim)"),
        };
        let pooling = match fx.config_str("mode") {
            "sum" => Pooling::Sum,
            "mean" => Pooling::Mean,
            m => panic!("{name}: unknown mode {m}"),
        };
        let weights = fx
            .has("per_sample_weights")
            .then(|| fx.f32("per_sample_weights").to_vec());
        Case {
            indices: fx.u32("indices"),
            offsets: fx.u32("offsets"),
            fx,
            rows,
            dim,
            weights,
            pooling,
        }
    }

    fn bags(&self) -> Bags<'_> {
        Bags::with_offsets(&self.indices, &self.offsets).with_weights(self.weights.as_deref())
    }

    fn check(&self) {
        let (fx, dim) = (&self.fx, self.dim);
        let table = fx.f32("table");
        let grad_out = fx.f32("grad_output");
        assert_eq!(fx.shape("grad_output"), [self.bags().len(), dim]);

        let mut out = vec![f32::NAN; self.bags().len() * dim];
        embedding::embedding_bag_forward(
            MatRef::from_rows(table, dim),
            self.bags(),
            self.pooling,
            MatMut::new(&mut out, self.bags().len(), dim),
            Par::Rayon,
        );
        fx.assert_close("output", &out);

        let mut ws = SparseGradWorkspace::default();
        let g = embedding_bag_backward_coalesce(
            self.rows,
            self.bags(),
            self.pooling,
            MatRef::new(grad_out, self.bags().len(), dim),
            &mut ws,
            Par::Rayon,
        );
        let mut grad_table = vec![0.0f32; self.rows * dim];
        for (&r, gr) in g.rows.iter().zip(g.grads.chunks(dim)) {
            grad_table[r as usize * dim..(r as usize + 1) * dim].copy_from_slice(gr);
        }
        fx.assert_close("grad_table", &grad_table);

        if fx.has("grad_per_sample_weights") {
            let mut gw = vec![f32::NAN; self.indices.len()];
            embedding::embedding_bag_weight_grad(
                MatRef::from_rows(table, dim),
                self.bags(),
                MatRef::new(grad_out, self.bags().len(), dim),
                &mut gw,
                Par::Rayon,
            );
            fx.assert_close("grad_per_sample_weights", &gw);
        }

        // The fused SGD step moves the table by -lr times PyTorch's table gradient.
        let lr = 0.5;
        let mut stepped = table.to_vec();
        optim::embedding_bag_backward_update(
            TableMut {
                weights: MatMut::from_rows(&mut stepped, dim),
                state: &mut [],
            },
            self.bags(),
            self.pooling,
            MatRef::new(grad_out, self.bags().len(), dim),
            SparseOptimizer::Sgd { lr }.into(),
            &mut ws,
            Par::Rayon,
        );
        let moved: Vec<f32> = stepped
            .iter()
            .zip(table)
            .map(|(s, t)| (t - s) / lr)
            .collect();
        fx.assert_close("grad_table", &moved);
    }
}

#[test]
fn embedding_bag_sum() {
    Case::load("embedding_bag_sum").check();
}

#[test]
fn embedding_bag_sum_weighted() {
    Case::load("embedding_bag_sum_weighted").check();
}

#[test]
fn embedding_bag_mean() {
    Case::load("embedding_bag_mean").check();
}
