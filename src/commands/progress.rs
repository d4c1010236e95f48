//! A training run on the terminal: a progress bar when stderr is one, plain lines otherwise
//! (logs and pipes).

use dlrm::metrics::EvalMetrics;
use dlrm::train::{IntervalReport, TrainObserver};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;

pub struct Console {
    bar: ProgressBar,
    interactive: bool,
}

impl Console {
    pub fn new() -> Console {
        Console {
            bar: ProgressBar::hidden(),
            interactive: std::io::stderr().is_terminal(),
        }
    }

    /// A line above the bar, or on its own.
    fn line(&self, text: String) {
        if self.interactive {
            self.bar.println(text);
        } else {
            eprintln!("{text}");
        }
    }
}

impl TrainObserver for Console {
    fn started(&mut self, first_step: u64, total_steps: u64) {
        if self.interactive {
            self.bar = ProgressBar::new(total_steps);
            self.bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
                )
                .expect("valid template"),
            );
            self.bar.set_position(first_step);
        }
    }

    fn stepped(&mut self, _step: u64) {
        self.bar.inc(1);
    }

    fn interval(&mut self, r: &IntervalReport) {
        if self.interactive {
            self.bar.set_message(format!(
                "loss {:.5}  {:.0} samples/s",
                r.loss, r.samples_per_sec
            ));
        } else {
            eprintln!(
                "step {}/{} (epoch {}): loss {:.6}, {:.2} ms/step, {:.0} samples/s",
                r.step, r.total_steps, r.epoch, r.loss, r.ms_per_step, r.samples_per_sec
            );
        }
    }

    fn evaluated(&mut self, step: u64, m: &EvalMetrics) {
        self.line(match m.rmse {
            Some(rmse) => format!("step {step}: test MSE {:.5}, RMSE {rmse:.4}", m.loss),
            None => format!(
                "step {step}: test loss {:.5}, accuracy {:.4}, {}",
                m.loss,
                m.accuracy,
                m.auc_and_ne()
            ),
        });
    }

    fn saved(&mut self, step: u64, path: &Path, seconds: f64) {
        self.line(format!(
            "step {step}: saved {} in {seconds:.2} s",
            path.display()
        ));
    }

    fn finished(&mut self) {
        self.bar.finish_and_clear();
    }
}
