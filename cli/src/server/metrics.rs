//! The server's counters, rendered in Prometheus' text exposition format (version 0.0.4).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The status codes `/v1/predict` answers, each counted.
pub const CODES: [u16; 6] = [200, 400, 413, 415, 500, 503];

/// Upper bounds of the request latency buckets, in seconds.
const LATENCY_BOUNDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Upper bounds of the forward-pass size buckets, in rows.
const BATCH_BOUNDS: [f64; 13] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// A Prometheus histogram: a count per bucket (not cumulative: summed when rendered), the
/// observations' sum in `unit`s, and their count.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
    /// The sum's unit (1e-9 for nanoseconds).
    unit: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64], unit: f64) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            unit,
        }
    }

    fn observe(&self, value: f64) {
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum
            .fetch_add((value / self.unit).round() as u64, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum.load(Relaxed) as f64 * self.unit;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Everything `/metrics` reports that the server counts.
pub struct Metrics {
    /// Answers of `/v1/predict` by status code (as [`CODES`] lists them).
    requests: [AtomicU64; CODES.len()],
    rows: AtomicU64,
    latency: Histogram,
    batch_rows: Histogram,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: Default::default(),
            rows: AtomicU64::new(0),
            latency: Histogram::new(&LATENCY_BOUNDS, 1e-9),
            batch_rows: Histogram::new(&BATCH_BOUNDS, 1.0),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }
    }
}

/// What the server is serving and how it stands, for the gauges.
pub struct Gauges<'a> {
    pub version: &'a str,
    pub step: u64,
    pub queued_rows: usize,
    pub peak_rss_bytes: u64,
}

impl Metrics {
    /// An answer of `/v1/predict`: its status, how long it took, and the rows scored.
    pub fn request(&self, code: u16, seconds: f64, rows: usize) {
        // Every answer's code is one of CODES; another would be counted as a 500.
        let i = CODES.iter().position(|&c| c == code).unwrap_or(4);
        self.requests[i].fetch_add(1, Relaxed);
        self.rows.fetch_add(rows as u64, Relaxed);
        self.latency.observe(seconds);
    }

    /// One forward pass of `rows` rows.
    pub fn batch(&self, rows: usize) {
        self.batch_rows.observe(rows as f64);
    }

    pub fn reload(&self, ok: bool) {
        let counter = if ok {
            &self.reloads
        } else {
            &self.reload_failures
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP dlrm_requests_total Answers of /v1/predict, by status code.\n");
        out.push_str("# TYPE dlrm_requests_total counter\n");
        for (code, n) in CODES.iter().zip(&self.requests) {
            let n = n.load(Relaxed);
            let _ = writeln!(out, "dlrm_requests_total{{code=\"{code}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        counter(
            &mut out,
            "dlrm_rows_total",
            "Rows scored.",
            self.rows.load(Relaxed),
        );
        self.latency.render(
            "dlrm_request_seconds",
            "Time from a request's arrival to its answer.",
            &mut out,
        );
        self.batch_rows
            .render("dlrm_batch_rows", "Rows per forward pass.", &mut out);
        let (ok, failed) = (
            self.reloads.load(Relaxed),
            self.reload_failures.load(Relaxed),
        );
        counter(
            &mut out,
            "dlrm_model_reloads_total",
            "Model versions loaded after the first.",
            ok,
        );
        counter(
            &mut out,
            "dlrm_model_reload_failures_total",
            "Model versions that failed to load (the previous one kept serving).",
            failed,
        );
        let _ = writeln!(
            out,
            "# HELP dlrm_model_info The model version served.\n# TYPE dlrm_model_info gauge\ndlrm_model_info{{version=\"{}\"}} 1",
            gauges.version.replace(['\\', '"', '\n'], "_")
        );
        gauge(
            &mut out,
            "dlrm_model_step",
            "Training steps of the model served.",
            gauges.step,
        );
        let queued = gauges.queued_rows as u64;
        gauge(
            &mut out,
            "dlrm_queued_rows",
            "Rows waiting for a forward pass.",
            queued,
        );
        gauge(
            &mut out,
            "dlrm_peak_rss_bytes",
            "Peak resident set size of the process.",
            gauges.peak_rss_bytes,
        );
        out
    }
}
