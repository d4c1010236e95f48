//! Evaluation metrics: loss, accuracy, ROC AUC, normalized entropy for click prediction; mean
//! squared error and RMSE for regression (ratings).
//!
//! Scores and probabilities are f32 as the model produces them; every sum is taken in f64.
//! Labels are 0.0 / 1.0: accuracy and AUC count a label as positive when it is above 0.5, the
//! log loss and the background click rate use the label values as they are.

/// The Mann-Whitney U statistic of a scored, labelled set: over all (positive, negative)
/// pairs, 1 when the positive scores higher, 1/2 on a tie, 0 otherwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MannWhitney {
    /// U, a multiple of 1/2 (exact up to 2^52).
    pub u: f64,
    pub positives: u64,
    pub negatives: u64,
}

/// U by one sort: scores are grouped by value (in ascending order, after -0.0 is made +0.0,
/// by `f32::total_cmp`, so a NaN score is a value like any other and never poisons the
/// result); each positive in a group beats the negatives of every lower group and ties with
/// those of its own. Counted as the integer 2U, so the statistic is exact. O(n log n).
pub fn mann_whitney(scores: &[f32], labels: &[f32]) -> MannWhitney {
    assert_eq!(
        scores.len(),
        labels.len(),
        "mann_whitney: {} scores for {} labels",
        scores.len(),
        labels.len()
    );
    let mut ranked: Vec<(f32, bool)> = scores
        .iter()
        .zip(labels)
        .map(|(&s, &y)| (s + 0.0, y > 0.5))
        .collect();
    ranked.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let (mut twice_u, mut negatives_below, mut positives) = (0u128, 0u128, 0u128);
    for group in ranked.chunk_by(|a, b| a.0.total_cmp(&b.0).is_eq()) {
        let pos = group.iter().filter(|(_, positive)| *positive).count() as u128;
        let neg = group.len() as u128 - pos;
        twice_u += 2 * pos * negatives_below + pos * neg;
        negatives_below += neg;
        positives += pos;
    }
    MannWhitney {
        u: twice_u as f64 / 2.0,
        positives: positives as u64,
        negatives: negatives_below as u64,
    }
}

/// Exact ROC AUC = Mann-Whitney U / (n_pos * n_neg), ties counted one half (sort by score,
/// group equal scores); NaN-free; returns None if only one class is present.
pub fn roc_auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    let m = mann_whitney(scores, labels);
    (m.positives > 0 && m.negatives > 0).then(|| m.u / (m.positives as f64 * m.negatives as f64))
}

/// Fraction of predictions on the right side of 0.5 (p > 0.5 predicts 1); NaN when empty.
pub fn accuracy(probs: &[f32], labels: &[f32]) -> f64 {
    assert_eq!(probs.len(), labels.len(), "accuracy: lengths differ");
    let right = probs
        .iter()
        .zip(labels)
        .filter(|&(&p, &y)| (p > 0.5) == (y > 0.5))
        .count();
    right as f64 / probs.len() as f64
}

/// Precision, recall and F1 of the predictions p > 0.5 against labels above 0.5, as
/// scikit-learn's `precision_score`, `recall_score` and `f1_score` of `round(p)` (which the
/// reference's MLPerf path prints; `round` takes 0.5 to 0): 0 where a denominator is 0, as
/// scikit-learn's default `zero_division` gives.
pub fn precision_recall_f1(probs: &[f32], labels: &[f32]) -> (f64, f64, f64) {
    assert_eq!(
        probs.len(),
        labels.len(),
        "precision_recall_f1: lengths differ"
    );
    let (mut tp, mut fp, mut fneg) = (0u64, 0u64, 0u64);
    for (&p, &y) in probs.iter().zip(labels) {
        match (p > 0.5, y > 0.5) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fneg += 1,
            (false, false) => {}
        }
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (precision, recall) = (ratio(tp, tp + fp), ratio(tp, tp + fneg));
    (precision, recall, ratio(2 * tp, 2 * tp + fp + fneg))
}

/// Average precision as scikit-learn's `average_precision_score`: the sum over the distinct
/// scores, highest first, of (R_n - R_(n-1)) P_n, with P_n and R_n the precision and recall
/// of predicting positive every sample scored at least the n-th score; NaN without
/// positives. O(n log n).
pub fn average_precision(scores: &[f32], labels: &[f32]) -> f64 {
    assert_eq!(
        scores.len(),
        labels.len(),
        "average_precision: lengths differ"
    );
    let mut ranked: Vec<(f32, bool)> = scores
        .iter()
        .zip(labels)
        .map(|(&s, &y)| (s + 0.0, y > 0.5))
        .collect();
    ranked.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let positives = ranked.iter().filter(|(_, p)| *p).count() as f64;
    if positives == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut seen, mut ap) = (0.0f64, 0.0f64, 0.0f64);
    for group in ranked.chunk_by(|a, b| a.0.total_cmp(&b.0).is_eq()) {
        let pos = group.iter().filter(|(_, p)| *p).count() as f64;
        tp += pos;
        seen += group.len() as f64;
        ap += (pos / positives) * (tp / seen);
    }
    ap
}

/// Probabilities are clamped to [LOG_LOSS_EPS, 1 - LOG_LOSS_EPS] before the logarithm, so one
/// confidently wrong prediction costs at most -ln(1e-7) ≈ 16.1 instead of infinity.
pub const LOG_LOSS_EPS: f64 = 1e-7;

/// Mean binary cross-entropy -(y ln p + (1 - y) ln(1 - p)), probabilities clamped to
/// [1e-7, 1 - 1e-7]; NaN when empty.
pub fn log_loss(probs: &[f32], labels: &[f32]) -> f64 {
    assert_eq!(probs.len(), labels.len(), "log_loss: lengths differ");
    let sum: f64 = probs
        .iter()
        .zip(labels)
        .map(|(&p, &y)| {
            let p = f64::from(p).clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS);
            let y = f64::from(y);
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum();
    sum / probs.len() as f64
}

/// Normalized entropy (He et al. 2014, "Practical lessons from predicting clicks on ads at
/// Facebook"): mean log loss divided by the entropy of the background CTR p (mean label),
/// `-(p ln p + (1 - p) ln(1 - p))`. Below 1 the model beats always predicting p. NaN when p is
/// not strictly between 0 and 1 (the background entropy is then zero).
pub fn normalized_entropy(mean_log_loss: f64, positive_rate: f64) -> f64 {
    let p = positive_rate;
    if !(p > 0.0 && p < 1.0) {
        return f64::NAN;
    }
    mean_log_loss / -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
}

/// Mean of (prediction - target)^2, summed in f64; NaN when empty.
pub fn mean_squared_error(preds: &[f32], targets: &[f32]) -> f64 {
    assert_eq!(
        preds.len(),
        targets.len(),
        "mean_squared_error: lengths differ"
    );
    let sum: f64 = preds
        .iter()
        .zip(targets)
        .map(|(&p, &t)| (f64::from(p) - f64::from(t)).powi(2))
        .sum();
    sum / preds.len() as f64
}

/// An AUC to four places, or `undefined (one class)` for NaN: the AUC of a set with one class
/// only (pairs of a positive and a negative are what it counts).
pub fn format_auc(auc: f64) -> String {
    if auc.is_nan() {
        "undefined (one class)".to_string()
    } else {
        format!("{auc:.4}")
    }
}

/// A normalized entropy to four places, or `undefined` for NaN (one class: the background
/// entropy is zero).
pub fn format_ne(ne: f64) -> String {
    if ne.is_nan() {
        "undefined".to_string()
    } else {
        format!("{ne:.4}")
    }
}

/// The evaluation summary of a scored set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalMetrics {
    /// Mean log loss ([`log_loss`]), or the mean squared error for regression.
    pub loss: f64,
    /// Classification only (NaN for regression).
    pub accuracy: f64,
    /// ROC AUC, NaN when only one class is present (and for regression).
    pub auc: f64,
    /// Normalized entropy, NaN when only one class is present (and for regression).
    pub ne: f64,
    /// Root mean squared error, for regression only.
    pub rmse: Option<f64>,
    /// Precision, recall and F1 of p > 0.5, and the average precision ([`precision_recall_f1`],
    /// [`average_precision`]): what the reference's MLPerf path prints (NaN for regression).
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub average_precision: f64,
}

impl EvalMetrics {
    /// All metrics of `probs` against `labels`.
    pub fn compute(probs: &[f32], labels: &[f32]) -> EvalMetrics {
        let loss = log_loss(probs, labels);
        let positive_rate = labels.iter().map(|&y| f64::from(y)).sum::<f64>() / labels.len() as f64;
        let (precision, recall, f1) = precision_recall_f1(probs, labels);
        EvalMetrics {
            loss,
            accuracy: accuracy(probs, labels),
            auc: roc_auc(probs, labels).unwrap_or(f64::NAN),
            ne: normalized_entropy(loss, positive_rate),
            rmse: None,
            precision,
            recall,
            f1,
            average_precision: average_precision(probs, labels),
        }
    }

    /// `AUC 0.7512  NE 0.9034`, or `AUC undefined (one class)  NE undefined` when the labels
    /// are all of one class (both are then NaN).
    pub fn auc_and_ne(&self) -> String {
        format!("AUC {}  NE {}", format_auc(self.auc), format_ne(self.ne))
    }

    /// The metrics of a regression: the mean squared error as the loss, and its root.
    pub fn regression(preds: &[f32], targets: &[f32]) -> EvalMetrics {
        let mse = mean_squared_error(preds, targets);
        EvalMetrics {
            loss: mse,
            accuracy: f64::NAN,
            auc: f64::NAN,
            ne: f64::NAN,
            rmse: Some(mse.sqrt()),
            precision: f64::NAN,
            recall: f64::NAN,
            f1: f64::NAN,
            average_precision: f64::NAN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Values scikit-learn gives for the same inputs (`precision_score`, `recall_score`,
    /// `f1_score` of `round(p)`, `average_precision_score`).
    #[test]
    fn precision_recall_f1_and_average_precision_as_scikit_learn() {
        let p = [0.9f32, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2];
        let y = [1.0f32, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        let (precision, recall, f1) = precision_recall_f1(&p, &y);
        assert_eq!((precision, recall), (0.75, 0.75));
        assert!((f1 - 0.75).abs() < 1e-12);
        // 1/4 (1/1 + 2/3 + 3/4 + 4/6)
        let ap = average_precision(&p, &y);
        assert!((ap - 0.770_833_333_333_333_3).abs() < 1e-12, "{ap}");
        // Ties form one threshold: precision 1/2 at recall 1.
        assert_eq!(average_precision(&[0.5, 0.5], &[1.0, 0.0]), 0.5);
        assert!(average_precision(&[0.5], &[0.0]).is_nan());
        assert_eq!(precision_recall_f1(&[0.2], &[1.0]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn auc_of_orderings_and_ties() {
        assert_eq!(
            roc_auc(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]),
            Some(0.75)
        );
        assert_eq!(roc_auc(&[0.9, 0.1], &[1.0, 0.0]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.1], &[0.0, 1.0]), Some(0.0));
        // One tie between a positive and a negative counts one half: (1 + 0.5 + 1 + 1) / 4.
        assert_eq!(
            roc_auc(&[0.2, 0.5, 0.5, 0.9], &[0.0, 0.0, 1.0, 1.0]),
            Some(0.875)
        );
        // -0.0 and +0.0 are the same score.
        assert_eq!(roc_auc(&[-0.0, 0.0], &[1.0, 0.0]), Some(0.5));
    }

    #[test]
    fn all_equal_scores_give_one_half() {
        let labels = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        assert_eq!(roc_auc(&[0.3; 7], &labels), Some(0.5));
    }

    #[test]
    fn one_class_has_no_auc() {
        assert_eq!(roc_auc(&[0.1, 0.7, 0.2], &[1.0; 3]), None);
        assert_eq!(roc_auc(&[0.1, 0.7, 0.2], &[0.0; 3]), None);
        assert_eq!(roc_auc(&[], &[]), None);
        let m = EvalMetrics::compute(&[0.1, 0.7], &[1.0, 1.0]);
        assert!(m.auc.is_nan() && m.ne.is_nan() && m.loss.is_finite());
    }

    #[test]
    fn nan_scores_do_not_poison_the_auc() {
        let auc = roc_auc(&[f32::NAN, 0.2, 0.8, f32::NAN], &[1.0, 0.0, 1.0, 0.0]).unwrap();
        assert!((0.0..=1.0).contains(&auc));
    }

    #[test]
    fn accuracy_thresholds_at_one_half() {
        assert_eq!(accuracy(&[0.5, 0.51, 0.2, 0.9], &[0.0, 1.0, 1.0, 0.0]), 0.5);
        assert!(accuracy(&[], &[]).is_nan());
    }

    #[test]
    fn log_loss_clamps_certain_mistakes() {
        let l = log_loss(&[0.0, 1.0], &[1.0, 0.0]);
        assert!((l + LOG_LOSS_EPS.ln()).abs() < 1e-6, "{l}");
        let l = log_loss(&[0.8, 0.25], &[1.0, 0.0]);
        let want = -(0.8f64.ln() + 0.75f64.ln()) / 2.0;
        assert!((l - want).abs() < 1e-7, "{l} vs {want}");
    }

    #[test]
    fn regression_reports_the_root_of_the_mean_squared_error() {
        let m = EvalMetrics::regression(&[3.0, 4.0, 1.0], &[4.0, 4.0, 3.0]);
        assert!((m.loss - 5.0 / 3.0).abs() < 1e-12);
        assert!((m.rmse.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!(m.auc.is_nan() && m.accuracy.is_nan() && m.ne.is_nan());
        assert_eq!(EvalMetrics::compute(&[0.5], &[1.0]).rmse, None);
    }

    #[test]
    fn predicting_the_background_rate_has_unit_ne() {
        let labels = [1.0, 0.0, 0.0, 0.0];
        let m = EvalMetrics::compute(&[0.25; 4], &labels);
        assert!((m.ne - 1.0).abs() < 1e-6, "{m:?}");
        assert_eq!(m.auc, 0.5);
        assert_eq!(m.accuracy, 0.75);
        assert!(normalized_entropy(0.3, 0.0).is_nan() && normalized_entropy(0.3, 1.0).is_nan());
    }

    /// 2U by comparing every (positive, negative) pair.
    fn brute_twice_u(scores: &[f32], labels: &[f32]) -> u64 {
        let mut twice_u = 0;
        for (sp, _) in scores.iter().zip(labels).filter(|(_, y)| **y > 0.5) {
            for (sn, _) in scores.iter().zip(labels).filter(|(_, y)| **y <= 0.5) {
                twice_u += if sp > sn {
                    2
                } else if sp == sn {
                    1
                } else {
                    0
                };
            }
        }
        twice_u
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn sorted_u_equals_pair_count(
            sy in prop::collection::vec((0u8..12, any::<bool>()), 0..120),
        ) {
            // Few distinct scores: many ties, within and across classes.
            let scores: Vec<f32> = sy.iter().map(|&(s, _)| f32::from(s) / 11.0).collect();
            let labels: Vec<f32> = sy.iter().map(|&(_, y)| f32::from(u8::from(y))).collect();
            let m = mann_whitney(&scores, &labels);
            prop_assert_eq!(m.u * 2.0, brute_twice_u(&scores, &labels) as f64);
            let pos = labels.iter().filter(|&&y| y > 0.5).count() as u64;
            prop_assert_eq!((m.positives, m.negatives), (pos, labels.len() as u64 - pos));
            match roc_auc(&scores, &labels) {
                Some(auc) => prop_assert!((0.0..=1.0).contains(&auc)),
                None => prop_assert!(pos == 0 || pos == labels.len() as u64),
            }
        }
    }
}
