//! A run resolved once ([`dlrm::spec`]): a preset becomes an architecture in one place, the
//! overrides apply on top, a `RunSpec` builds the same model and data a hand-built run uses,
//! and library errors name the run's fields.

use dlrm::config::Preset;
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dlrm::Dlrm;
use dlrm::model::{ModelKind, OptimizerKind};
use dlrm::names::Choice;
use dlrm::schedule::LrSchedule;
use dlrm::spec::{ArchitectureOverrides, DataSpec, ModelOptions, RunSpec, resolve_architecture};
use dlrm::storage::StorageKind;
use dlrm::train::{Quiet, TrainOptions, TrainReport, train};

fn tiny_arch() -> Architecture {
    Preset::Tiny.values().architecture()
}

fn synthetic(arch: &Architecture, seed: u64) -> SyntheticConfig {
    SyntheticConfig {
        num_dense: arch.num_dense(),
        table_sizes: arch.table_sizes.clone(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 2,
        fixed_bag_size: true,
        seed,
    }
}

fn options(seed: u64) -> TrainOptions {
    TrainOptions {
        num_batches: 20,
        test_batch_size: 512,
        seed,
        ..TrainOptions::new(64, LrSchedule::constant(0.1))
    }
}

fn spec(model: ModelKind, optimizer: OptimizerKind) -> RunSpec {
    let arch = tiny_arch();
    RunSpec {
        model,
        data: DataSpec::Synthetic {
            config: synthetic(&arch, 3),
            train_len: 20 * 64,
            test_len: 1024,
        },
        arch,
        model_options: ModelOptions {
            cross_layers: 2,
            deep: vec![32, 16],
            weight_decay: 0.0,
        },
        optimizer,
        precision: Default::default(),
        storage: StorageKind::Anon,
        threads: 1,
        train: options(3),
    }
}

fn run(spec: RunSpec) -> TrainReport {
    let pool = spec.pool().unwrap();
    let mut run = spec.build(None).unwrap();
    pool.install(|| {
        train(
            run.model.as_mut(),
            run.source.as_ref(),
            &run.train,
            run.threads,
            &mut Quiet,
        )
    })
    .unwrap()
}

#[test]
fn a_run_spec_builds_what_a_hand_built_run_uses() {
    let from_spec = run(spec(ModelKind::Dlrm, OptimizerKind::Adagrad));
    let arch = tiny_arch();
    let mut model = Dlrm::new(arch.clone(), OptimizerKind::Adagrad, &StorageKind::Anon, 3).unwrap();
    let data = SyntheticSource::new(SyntheticData::new(synthetic(&arch, 3)), 20 * 64, 1024);
    let pool = dlrm::spec::thread_pool(1).unwrap();
    let by_hand = pool
        .install(|| train(&mut model, &data, &options(3), 1, &mut Quiet))
        .unwrap();
    assert_eq!(from_spec.steps, by_hand.steps);
    assert_eq!(from_spec.train_loss.to_bits(), by_hand.train_loss.to_bits());
    assert_eq!(from_spec.test_loss.to_bits(), by_hand.test_loss.to_bits());
    assert_eq!(from_spec.test_auc.to_bits(), by_hand.test_auc.to_bits());
}

#[test]
fn every_model_but_mf_builds_and_trains_from_a_spec() {
    for &kind in ModelKind::ALL {
        if kind == ModelKind::Mf {
            // MF's shape comes from its rating files: a spec without them is refused.
            let e = spec(kind, OptimizerKind::Sgd).build(None).err().unwrap();
            assert!(
                e.to_string().contains("model mf trains on rating files"),
                "{e}"
            );
            continue;
        }
        let report = run(spec(kind, OptimizerKind::Sgd));
        assert_eq!(report.model, kind.name());
        // The dense compute's rate is the architecture's FLOPs per sample at the run's rate.
        match kind {
            ModelKind::Dlrm => {
                let flops = tiny_arch().flops_per_sample();
                let want = flops * report.samples_per_sec * 1e-9;
                let got = report.gflop_per_sec.expect("DLRM counts its FLOPs");
                assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
            }
            _ => assert_eq!(report.gflop_per_sec, None, "{kind}"),
        }
        assert_eq!(report.steps, 20);
        assert!(report.test_loss.is_finite(), "{kind}: {}", report.test_loss);
    }
}

#[test]
fn a_preset_is_an_architecture_and_overrides_apply_on_top() {
    for &preset in Preset::ALL {
        let v = preset.values();
        let resolved = resolve_architecture(&v, &ArchitectureOverrides::default(), None).unwrap();
        let mut expected = v.architecture();
        if let Some(cap) = v.max_ind_range {
            expected
                .table_sizes
                .iter_mut()
                .for_each(|r| *r = (*r).min(cap));
        }
        assert_eq!(resolved, expected, "{preset}");
    }
    let given = ArchitectureOverrides {
        embedding_dim: Some(8),
        table_sizes: Some(vec![50, 7]),
        bottom: Some(vec![13, 8]),
        top: Some(vec![4, 1]),
        interaction: Some(InteractionOp::Cat),
        self_interaction: false,
        max_ind_range: Some(10),
    };
    let arch = resolve_architecture(&Preset::Tiny.values(), &given, None).unwrap();
    assert_eq!(arch.table_sizes, vec![10, 7]);
    assert_eq!(arch.bottom, vec![13, 8]);
    assert_eq!(arch.top, vec![3 * 8, 4, 1]);
}

#[test]
fn library_errors_name_fields_not_flags() {
    let p = Preset::Tiny.values();
    let cases: [(ArchitectureOverrides, &str); 3] = [
        (
            ArchitectureOverrides {
                bottom: Some(vec![13, 32]),
                ..ArchitectureOverrides::default()
            },
            "bottom: the bottom MLP ends in 32 outputs but embedding_dim is 16",
        ),
        (
            ArchitectureOverrides {
                table_sizes: Some(vec![10, 0]),
                ..ArchitectureOverrides::default()
            },
            "table_sizes: '10-0': item 2 is 0",
        ),
        (
            ArchitectureOverrides {
                max_ind_range: Some(0),
                ..ArchitectureOverrides::default()
            },
            "max_ind_range must be at least 1",
        ),
    ];
    for (given, needle) in cases {
        let e = resolve_architecture(&p, &given, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
        assert!(!e.contains("--"), "a library error names a flag: {e}");
    }
    let schedule = LrSchedule {
        base: 0.1,
        warmup_steps: 10,
        decay_start_step: 5,
        decay_steps: 5,
    };
    let e = schedule.validate().unwrap_err().to_string();
    assert!(
        e.starts_with("decay_start_step 5 is before the end of the warm-up (warmup_steps 10)"),
        "{e}"
    );
}
