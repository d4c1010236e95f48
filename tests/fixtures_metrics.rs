//! ROC AUC against scikit-learn's roc_auc_score (fixture `auc`): scores with many ties,
//! including ties between a positive and a negative.

mod common;

use common::fixtures;
use dlrm::metrics::{mann_whitney, roc_auc};

#[test]
fn auc_matches_sklearn() {
    let fx = fixtures::load("auc");
    let (scores, labels) = (fx.f32("scores"), fx.f32("labels"));
    let auc = roc_auc(scores, labels).expect("both classes present");
    let (abs, _) = fx.tolerance();
    let want = fx.scalar("auc") as f64;
    assert!(
        (auc - want).abs() <= abs as f64,
        "AUC {auc}, sklearn {want}"
    );
    let want_f64 = fx.config["auc_f64"].as_f64().expect("auc_f64");
    assert!(
        (auc - want_f64).abs() <= 1e-12,
        "AUC {auc}, f64 value {want_f64}"
    );

    // The statistic itself is exact: a multiple of 1/2, counted, not accumulated.
    let m = mann_whitney(scores, labels);
    assert_eq!(
        m.u,
        fx.config["mann_whitney_u"]
            .as_f64()
            .expect("mann_whitney_u")
    );
    assert_eq!(m.positives as usize, fx.config_usize("n_pos"));
    assert_eq!(m.negatives as usize, fx.config_usize("n_neg"));
}
