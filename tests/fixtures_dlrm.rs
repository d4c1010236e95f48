//! The full model against PyTorch: one step (forward values, loss, every gradient, parameters
//! after SGD / Adagrad / row-wise Adagrad), a 10-step SGD trajectory and 3 Adagrad steps.
//! Every size comes from the fixture, so other fixture sets (DLRM_FIXTURES) work unchanged.

mod common;

use common::fixtures::{Fixture, load};
use dlrm::data::Batch;
use dlrm::model::OptimizerKind;
use dlrm::model::PhaseTimer;
use dlrm::model::architecture::{Architecture, InteractionOp, parse_dims};
use dlrm::model::dlrm::Dlrm;
use dlrm::names::Field;
use dlrm::storage::StorageKind;

fn model_from(fx: &Fixture, optimizer: OptimizerKind) -> Dlrm {
    let dims = |field, key| parse_dims(field, fx.config_str(key)).unwrap();
    let top_full = dims(Field::Top, "arch_mlp_top");
    let op: InteractionOp = fx.config_str("arch_interaction_op").parse().unwrap();
    let arch = Architecture::new(
        fx.config_usize("arch_sparse_feature_size"),
        dims(Field::TableSizes, "table_rows"),
        dims(Field::Bottom, "arch_mlp_bot"),
        top_full[1..].to_vec(),
        op,
        fx.config_bool("arch_interaction_itself"),
    )
    .unwrap();
    assert_eq!(arch.top[0], top_full[0], "derived top input width");
    let mut model = Dlrm::new(arch, optimizer, &StorageKind::Anon, 0).unwrap();
    for (l, layer) in model.bottom.layers.iter_mut().enumerate() {
        layer.weight.copy_from_slice(fx.f32(&format!("bot_w{l}")));
        layer.bias.copy_from_slice(fx.f32(&format!("bot_b{l}")));
    }
    for (l, layer) in model.top.layers.iter_mut().enumerate() {
        layer.weight.copy_from_slice(fx.f32(&format!("top_w{l}")));
        layer.bias.copy_from_slice(fx.f32(&format!("top_b{l}")));
    }
    for (t, table) in model.embeddings.tables.iter_mut().enumerate() {
        table
            .weights_mut()
            .copy_from_slice(fx.f32(&format!("emb_t{t}")));
    }
    model.reserve(fx.config_usize("batch_size"));
    model
}

/// The fixture's batch (`step` selects one of a trajectory's batches).
fn batch_from(fx: &Fixture, step: Option<usize>) -> Batch {
    let b = fx.config_usize("batch_size");
    let nd = fx.config_usize("num_dense_features");
    let nt = fx.config_usize("num_tables");
    let s = step.unwrap_or(0);
    let mut batch = Batch::new(nd, nt);
    batch.dense = fx.f32("dense_x")[s * b * nd..(s + 1) * b * nd].to_vec();
    batch.labels = fx.f32("labels")[s * b..(s + 1) * b].to_vec();
    for t in 0..nt {
        let name = |what: &str| match step {
            Some(s) => format!("{what}_s{s}_t{t}"),
            None => format!("{what}_t{t}"),
        };
        batch.indices[t] = fx.u32(&name("indices"));
        batch.offsets[t] = fx.u32(&name("offsets"));
    }
    batch
}

/// Compares every dense parameter and table with tensors named `<prefix><param>`.
fn check_params(fx: &Fixture, model: &Dlrm, prefix: &str) {
    for (l, layer) in model.bottom.layers.iter().enumerate() {
        fx.assert_close(&format!("{prefix}bot_w{l}"), &layer.weight);
        fx.assert_close(&format!("{prefix}bot_b{l}"), &layer.bias);
    }
    for (l, layer) in model.top.layers.iter().enumerate() {
        fx.assert_close(&format!("{prefix}top_w{l}"), &layer.weight);
        fx.assert_close(&format!("{prefix}top_b{l}"), &layer.bias);
    }
    for (t, table) in model.embeddings.tables.iter().enumerate() {
        fx.assert_close(&format!("{prefix}emb_t{t}"), table.weights());
    }
}

/// Compares the Adagrad accumulators with `<prefix>state_<param>`.
fn check_states(fx: &Fixture, model: &Dlrm, prefix: &str) {
    let nb = model.bottom.layers.len();
    for (i, (sw, sb)) in model.dense_state().iter().enumerate() {
        let (part, l) = if i < nb { ("bot", i) } else { ("top", i - nb) };
        fx.assert_close(&format!("{prefix}state_{part}_w{l}"), sw);
        fx.assert_close(&format!("{prefix}state_{part}_b{l}"), sb);
    }
    for (t, st) in model.embeddings.states.iter().enumerate() {
        fx.assert_close(&format!("{prefix}state_emb_t{t}"), st.as_slice());
    }
}

#[test]
fn dlrm_step_forward_loss_and_gradients() {
    let fx = load("dlrm_step");
    let batch = batch_from(&fx, None);
    let lr = fx.config_f32("lr");
    let mut model = model_from(&fx, OptimizerKind::Sgd);
    let b = batch.size();

    let mut probs = Vec::new();
    model.predict(&batch.view(), &mut probs).unwrap();
    fx.assert_close("probs", &probs);
    fx.assert_close("logits", model.logits(b));
    fx.assert_close("interaction_out", model.interaction_output(b));
    let d = model.arch().embedding_dim;
    let f = model.arch().num_features();
    let slot = |k: usize| -> Vec<f32> {
        model
            .features(b)
            .chunks(f * d)
            .flat_map(|row| row[k * d..(k + 1) * d].to_vec())
            .collect()
    };
    fx.assert_close("bot_out", &slot(0));
    for t in 0..model.embeddings.tables.len() {
        fx.assert_close(&format!("emb_out_t{t}"), &slot(t + 1));
    }

    let loss = model
        .train_step(&batch.view(), lr, &mut PhaseTimer::default())
        .unwrap();
    fx.assert_close("loss", &[loss as f32]);
    for (l, layer) in model.bottom.layers.iter().enumerate() {
        fx.assert_close(&format!("grad_bot_w{l}"), &layer.grad_weight);
        fx.assert_close(&format!("grad_bot_b{l}"), &layer.grad_bias);
    }
    for (l, layer) in model.top.layers.iter().enumerate() {
        fx.assert_close(&format!("grad_top_w{l}"), &layer.grad_weight);
        fx.assert_close(&format!("grad_top_b{l}"), &layer.grad_bias);
    }
    // The sparse gradient is applied in place (fused); SGD's result pins it: emb - lr * grad.
    check_params(&fx, &model, "sgd_");
    for t in 0..model.embeddings.tables.len() {
        let before = fx.f32(&format!("emb_t{t}"));
        let grad: Vec<f32> = before
            .iter()
            .zip(model.embeddings.tables[t].weights())
            .map(|(b, a)| (b - a) / lr)
            .collect();
        // Recovering the gradient divides the rounding error by lr.
        let (abs, rel) = fx.tolerance();
        fx.assert_close_tol(
            &format!("grad_emb_t{t}"),
            &grad,
            abs / lr * 10.0,
            rel * 10.0,
        );
    }
}

#[test]
fn dlrm_step_adagrad_and_rowwise_adagrad() {
    let fx = load("dlrm_step");
    let batch = batch_from(&fx, None);
    let lr = fx.config_f32("lr");
    for (kind, prefix) in [
        (OptimizerKind::Adagrad, "adagrad_"),
        (OptimizerKind::RowwiseAdagrad, "rowwise_"),
    ] {
        let mut model = model_from(&fx, kind);
        model
            .train_step(&batch.view(), lr, &mut PhaseTimer::default())
            .unwrap();
        check_params(&fx, &model, prefix);
        check_states(&fx, &model, prefix);
    }
}

#[test]
fn dlrm_sgd_trajectory() {
    let fx = load("dlrm_sgd_10_steps");
    let lr = fx.config_f32("lr");
    let steps = fx.config_usize("num_steps");
    let mut model = model_from(&fx, OptimizerKind::Sgd);
    let mut losses = Vec::new();
    for s in 0..steps {
        losses.push(
            model
                .train_step(
                    &batch_from(&fx, Some(s)).view(),
                    lr,
                    &mut PhaseTimer::default(),
                )
                .unwrap() as f32,
        );
    }
    fx.assert_close("losses", &losses);
    check_params(&fx, &model, "final_");
}

#[test]
fn dlrm_adagrad_trajectories() {
    let fx = load("dlrm_adagrad_3_steps");
    let lr = fx.config_f32("lr");
    let steps = fx.config_usize("num_steps");
    for (kind, prefix) in [
        (OptimizerKind::Adagrad, "adagrad_"),
        (OptimizerKind::RowwiseAdagrad, "rowwise_"),
    ] {
        let mut model = model_from(&fx, kind);
        let mut losses = Vec::new();
        for s in 0..steps {
            losses.push(
                model
                    .train_step(
                        &batch_from(&fx, Some(s)).view(),
                        lr,
                        &mut PhaseTimer::default(),
                    )
                    .unwrap() as f32,
            );
        }
        fx.assert_close(&format!("{prefix}losses"), &losses);
        check_params(&fx, &model, &format!("{prefix}final_"));
        check_states(&fx, &model, prefix);
    }
}
