//! Evaluation metrics: loss, accuracy, ROC AUC, normalized entropy.
