//! `dlrm serve`'s row limits over loopback: a request that finds the queue full answers 503
//! and one with more rows than `--queue-rows` answers 413, each naming the limit, while the
//! requests already queued are answered as usual.

mod support;

use std::time::{Duration, Instant};
use support::serve::{Server, trained_model};

const TSV: &str = "text/tab-separated-values";

/// `n` copies of `row`, one a line.
fn rows(row: &str, n: usize) -> String {
    format!("{row}\n").repeat(n)
}

/// The value of the metric line `name value`.
fn metric(server: &Server, name: &str) -> f64 {
    let metrics = server.get("/metrics");
    let line = metrics
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("no {name}: {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits (at most 20 s) until `rows` rows wait in the queue.
fn wait_for_queued(server: &Server, rows: f64) {
    let until = Instant::now() + Duration::from_secs(20);
    while metric(server, "dlrm_queued_rows") != rows {
        assert!(Instant::now() < until, "{rows} rows never queued");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The number of probabilities in a 200 answer.
fn answered(code: u16, body: &str) -> usize {
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    json["probabilities"].as_array().unwrap().len()
}

#[test]
fn a_full_queue_answers_503_and_the_queued_request_is_still_answered() {
    let (_dir, ck, row) = trained_model("serve-full", 300);
    // A request of 40 rows waits up to 2 s for a batch of 64; the queue holds 64 rows.
    let limits = ["--queue-rows", "64", "--max-batch-rows", "64"];
    let wait = ["--max-wait-us", "2000000", "--timeout-ms", "20000"];
    let server = Server::start(&ck, &[&limits[..], &wait].concat());
    std::thread::scope(|scope| {
        let first = scope.spawn(|| server.post(TSV, rows(&row, 40).as_bytes()));
        wait_for_queued(&server, 40.0);
        // 40 + 25 > 64: refused at once, naming why.
        let (code, body) = server.post(TSV, rows(&row, 25).as_bytes());
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("the queue is full"), "{body}");
        // 40 + 24 = 64 fits, fills the batch and is scored with the first.
        let (code, body) = server.post(TSV, rows(&row, 24).as_bytes());
        assert_eq!(answered(code, &body), 24);
        let (code, body) = first.join().unwrap();
        assert_eq!(answered(code, &body), 40);
    });
    assert_eq!(metric(&server, "dlrm_queued_rows"), 0.0);
    let metrics = server.get("/metrics");
    assert!(
        metrics.contains("dlrm_requests_total{code=\"503\"} 1"),
        "{metrics}"
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn more_rows_than_queue_rows_answers_413_naming_the_flag() {
    let (_dir, ck, row) = trained_model("serve-rows", 300);
    let args = [
        "--queue-rows",
        "64",
        "--max-batch-rows",
        "32",
        "--max-wait-us",
        "1000",
    ];
    let server = Server::start(&ck, &args);
    // As many rows as the queue holds are accepted (and split into two forward passes).
    let (code, body) = server.post(TSV, rows(&row, 64).as_bytes());
    assert_eq!(answered(code, &body), 64);
    for n in [65, 1000] {
        let (code, answer) = server.post(TSV, rows(&row, n).as_bytes());
        assert_eq!(code, 413, "{n} rows: {answer}");
        let why = format!("the request has {n} rows, more than --queue-rows (64)");
        assert!(answer.contains(&why), "{answer}");
    }
    // The server goes on answering.
    let (code, body) = server.post(TSV, rows(&row, 1).as_bytes());
    assert_eq!(answered(code, &body), 1);
    assert_eq!(metric(&server, "dlrm_queued_rows"), 0.0);
    assert!(!server.log().contains("panicked"), "{}", server.log());
    assert_eq!(server.stop(), Some(0));
}
