//! `dlrm serve` over loopback: the server started as a process, real HTTP/1.1 requests, its
//! answers compared bit for bit with `dlrm predict`'s, hostile input, reload, shutdown.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};
use support::serve::{Server, make_data, request_to, s, train, trained_model};
use support::{Scratch, assert_ok, dlrm};

/// `dlrm predict`'s probabilities for `input` (with `extra` flags).
fn predict(ck: &Path, input: &Path, out: &Path, extra: &[&str]) -> Vec<f32> {
    let args = ["predict", "--load-model", s(ck), "--criteo", s(input)];
    assert_ok(&dlrm(
        &[&args[..], &["--out", s(out), "--threads", "2"], extra].concat(),
    ));
    let text = std::fs::read_to_string(out).unwrap();
    text.lines().map(|l| l.parse().unwrap()).collect()
}

/// The probabilities of an answer `{"version": ..., "probabilities": [...]}`.
fn probabilities(body: &str) -> Vec<f32> {
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let list = json["probabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"));
    // Written as predict writes them: each reads back as the same f32 through its text.
    let text = body.split_once('[').unwrap().1.split_once(']').unwrap().0;
    let probs: Vec<f32> = text.split(',').map(|p| p.parse().unwrap()).collect();
    assert_eq!(probs.len(), list.len());
    probs
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A TSV line as a JSON row: dense counts as numbers, categories as hex strings or numbers.
fn json_row(line: &str, labelled: bool, hex: bool) -> serde_json::Value {
    let fields: Vec<&str> = line.split('\t').collect();
    let (label, rest) = if labelled {
        (Some(fields[0].parse::<u8>().unwrap()), &fields[1..])
    } else {
        (None, &fields[..])
    };
    let dense: Vec<serde_json::Value> = rest[..13]
        .iter()
        .map(|f| f.parse::<i64>().map_or(serde_json::Value::Null, Into::into))
        .collect();
    let sparse: Vec<serde_json::Value> = rest[13..]
        .iter()
        .map(|f| match (f.is_empty(), hex) {
            (true, _) => serde_json::Value::Null,
            (false, true) => (*f).into(),
            (false, false) => u32::from_str_radix(f, 16).unwrap().into(),
        })
        .collect();
    let mut row = serde_json::json!({ "dense": dense, "sparse": sparse });
    if let Some(l) = label {
        row["label"] = l.into();
    }
    row
}

#[test]
fn answers_equal_predicts_to_the_bit_for_tsv_and_json_rows() {
    let dir = Scratch::new("serve-exact");
    make_data(&dir, 2000);
    let ck = dir.path("ck");
    train(&dir, &ck, "1");
    let file = dir.path("rows.tsv");
    let expected = predict(&ck, &file, &dir.path("p.txt"), &[]);
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let unlabelled: Vec<&str> = lines
        .iter()
        .map(|l| l.split_once('\t').unwrap().1)
        .collect();
    let server = Server::start(&ck, &["--max-batch-rows", "64", "--max-wait-us", "2000"]);
    // Requests of 1 to 300 rows, 8 clients at once: batches mix requests and split large ones.
    let sizes = [1, 7, 300, 2, 64, 65, 128, 1, 33];
    let mut requests = Vec::new();
    let mut at = 0;
    for i in 0.. {
        let n = sizes[i % sizes.len()].min(lines.len() - at);
        if n == 0 {
            break;
        }
        requests.push((at, n, i % 4));
        at += n;
    }
    let answers: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let chunks: Vec<_> = requests.chunks(requests.len().div_ceil(8)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (server, lines, unlabelled) = (&server, &lines, &unlabelled);
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&(at, n, form)| {
                            let (kind, body) = match form {
                                0 => (
                                    "text/tab-separated-values",
                                    lines[at..at + n].join("\n") + "\n",
                                ),
                                1 => ("text/plain", unlabelled[at..at + n].join("\n")),
                                // Labelled rows with hex strings, unlabelled ones with numbers.
                                _ => {
                                    let source = if form == 2 { lines } else { unlabelled };
                                    let rows: Vec<_> = source[at..at + n]
                                        .iter()
                                        .map(|l| json_row(l, form == 2, form == 2))
                                        .collect();
                                    (
                                        "application/json",
                                        serde_json::json!({ "rows": rows }).to_string(),
                                    )
                                }
                            };
                            let (code, answer) = server.post(kind, body.as_bytes());
                            assert_eq!(code, 200, "{answer}");
                            let probs = probabilities(&answer);
                            assert_eq!(probs.len(), n);
                            probs
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let served: Vec<f32> = answers.concat();
    assert_eq!(bits(&served), bits(&expected));
    // The micro-batches merged requests: fewer forward passes than requests.
    let metrics = server.get("/metrics");
    let passes = number(&metrics, "dlrm_batch_rows_count");
    assert!(
        passes > 0.0 && number(&metrics, "dlrm_rows_total") == 2000.0,
        "{metrics}"
    );
    assert_eq!(server.stop(), Some(0));
}

/// The value of the first metric line starting with `name`.
fn number(metrics: &str, name: &str) -> f64 {
    let line = metrics
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name}: {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn hostile_input_answers_4xx_naming_row_and_field_never_500() {
    let (_dir, ck, good) = trained_model("serve-hostile", 600);
    let server = Server::start(&ck, &["--max-body-bytes", "65536"]);
    let tsv = "text/tab-separated-values";
    let json = "application/json";
    let mut bad_field: Vec<String> = good.split('\t').map(String::from).collect();
    bad_field[4] = "99999999999999999999999".into();
    let mut bad_category: Vec<String> = good.split('\t').map(String::from).collect();
    bad_category[20] = "zz".into();
    // A second line whose last category is bytes that are not UTF-8.
    let mut invalid_utf8 = format!("{good}\n").into_bytes();
    invalid_utf8.extend(&good.as_bytes()[..good.rfind('\t').unwrap() + 1]);
    invalid_utf8.extend([0xff, 0xfe]);
    let row = json_row(&good, true, true);
    let with = |key: &str, value: serde_json::Value| {
        let mut r = row.clone();
        r[key] = value;
        serde_json::json!({ "rows": [row.clone(), r] })
            .to_string()
            .into_bytes()
    };
    let mut dense = row["dense"].clone();
    dense[2] = 2.5.into();
    let mut sparse = row["sparse"].clone();
    sparse[0] = 4294967296u64.into();
    let deep = "[".repeat(60_000).into_bytes();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (tsv, b"".to_vec(), 400, "no rows"),
        (tsv, b"\n".to_vec(), 400, "no rows"),
        (
            tsv,
            format!("{good}\n1\t2\t3\n").into_bytes(),
            400,
            "row 2: 3 tab-separated fields",
        ),
        (tsv, format!("{good}\n\n{good}").into_bytes(), 400, "row 2"),
        (
            tsv,
            bad_field.join("\t").into_bytes(),
            400,
            "row 1: field 5 (I4)",
        ),
        (tsv, bad_category.join("\t").into_bytes(), 400, "(C7)"),
        (tsv, invalid_utf8, 400, "row 2: field 40 (C26)"),
        (tsv, vec![0xff; 5000], 400, "row 1"),
        (tsv, vec![b'\t'; 60_000], 400, "60001 tab-separated fields"),
        (
            tsv,
            format!("{good}\n").repeat(400).into_bytes(),
            413,
            "--max-body-bytes",
        ),
        (json, b"".to_vec(), 400, "malformed JSON"),
        (json, b"{\"rows\": []}".to_vec(), 400, "no rows"),
        (
            json,
            b"{\"rows\": [1]}".to_vec(),
            400,
            "row 1: 1 is not an object",
        ),
        (
            json,
            b"{\"rows\": [{}], \"x\": 1}".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            json,
            b"{\"rows\": [{\"dense\": 1e400}]}".to_vec(),
            400,
            "malformed JSON",
        ),
        (json, deep, 400, "malformed JSON"),
        (json, vec![0xff, 0xfe, 0x00], 400, "malformed JSON"),
        (json, with("dense", dense), 400, "row 2: dense[2] (I3): 2.5"),
        (
            json,
            with("sparse", sparse),
            400,
            "row 2: sparse[0] (C1): 4294967296",
        ),
        (
            json,
            with("sparse", serde_json::json!(["a"])),
            400,
            "\"sparse\" has 1 values, expected 26",
        ),
        (json, with("label", 7.into()), 400, "row 2: label: 7"),
        (
            json,
            with("extra", 7.into()),
            400,
            "row 2: unknown key \"extra\"",
        ),
        ("image/png", b"x".to_vec(), 415, "Content-Type"),
        (
            "multipart/form-data; boundary=x",
            b"x".to_vec(),
            415,
            "Content-Type",
        ),
    ];
    for (kind, body, code, needle) in &cases {
        let (got, answer) = server.post(kind, body);
        assert_eq!(
            got,
            *code,
            "{kind} {:?}: {answer}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        let json: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let error = json["error"].as_str().unwrap();
        assert!(error.contains(needle), "{needle:?} not in {error}");
    }
    let metrics = server.get("/metrics");
    assert_eq!(number(&metrics, "dlrm_requests_total{code=\"500\"}"), 0.0);
    let bad = cases.iter().filter(|c| c.2 == 400).count();
    assert_eq!(
        number(&metrics, "dlrm_requests_total{code=\"400\"}"),
        bad as f64,
        "{metrics}"
    );
    // Not HTTP at all, a request cut short, a body longer than announced: the server stays up.
    for raw in [
        &b"\x00\x01\x02garbage\r\n\r\n"[..],
        b"POST /v1/predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n1\t2",
        b"POST /v1/predict HTTP/1.1\r\nContent-Length: 2\r\n\r\n1\t2\t3\t4",
    ] {
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        stream.write_all(raw).unwrap();
        drop(stream);
    }
    assert_eq!(server.get("/healthz"), "ok\n");
    let (code, answer) = server.post(tsv, good.as_bytes());
    assert_eq!(code, 200, "{answer}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn model_metrics_deadlines_and_graceful_shutdown() {
    let (_dir, ck, good) = trained_model("serve-ops", 600);
    // Each request waits 300 ms for others: longer than its 100 ms deadline.
    let server = Server::start(&ck, &["--max-wait-us", "300000", "--timeout-ms", "100"]);
    assert_eq!(server.get("/healthz"), "ok\n");
    let model: serde_json::Value = serde_json::from_str(&server.get("/v1/model")).unwrap();
    let version = std::fs::read_to_string(ck.join("LATEST")).unwrap();
    assert_eq!(model["version"], version.trim());
    assert_eq!(model["model"], "dlrm");
    assert!(model["step"].as_u64().unwrap() > 0, "{model}");
    assert!(
        model["encoding_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("fnv1a64:"),
        "{model}"
    );
    assert_eq!(
        model["architecture"]["arch"]["bottom"],
        serde_json::json!([13, 32, 16])
    );
    let (code, answer) = server.post("text/plain", good.as_bytes());
    assert_eq!(code, 503, "{answer}");
    assert!(answer.contains("--timeout-ms (100 ms)"), "{answer}");
    let metrics = server.get("/metrics");
    for name in [
        "dlrm_requests_total{code=\"503\"} 1",
        "dlrm_request_seconds_bucket{le=\"+Inf\"} 1",
        "dlrm_request_seconds_count 1",
        "dlrm_batch_rows_count 0",
        "dlrm_model_reloads_total 0",
        "# TYPE dlrm_request_seconds histogram",
        "dlrm_model_info{version=",
    ] {
        assert!(metrics.contains(name), "{name} not in {metrics}");
    }
    assert!(number(&metrics, "dlrm_peak_rss_bytes") > 1e6, "{metrics}");
    drop(server);

    // A request in flight when SIGTERM comes is answered, then the server exits 0.
    let server = Server::start(&ck, &["--max-wait-us", "500000"]);
    let addr = server.addr.clone();
    let body = good.clone();
    let client = std::thread::spawn(move || {
        request_to(&addr, "POST", "/v1/predict", "text/plain", body.as_bytes())
    });
    std::thread::sleep(Duration::from_millis(150));
    server.signal(libc::SIGTERM);
    let (code, answer) = client.join().unwrap();
    assert_eq!(code, 200, "{answer}");
    let log = server.log.clone();
    assert_eq!(server.stop_after_signal(), Some(0));
    let log = log.lock().unwrap();
    assert!(
        log.contains("SIGTERM: finishing") && log.contains("peak resident memory"),
        "{log}"
    );
}

/// Polls `/v1/model` until it names `version` (at most 20 s).
fn wait_for_version(server: &Server, version: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let model: serde_json::Value = serde_json::from_str(&server.get("/v1/model")).unwrap();
        if model["version"] == version {
            return;
        }
        assert!(
            Instant::now() < until,
            "still {model}; log: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Points `ck`'s LATEST at `version` as the trainer does: a new file renamed over it.
fn set_latest(ck: &Path, version: &str) {
    let tmp = ck.join("LATEST.tmp");
    std::fs::write(&tmp, format!("{version}\n")).unwrap();
    std::fs::rename(&tmp, ck.join("LATEST")).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_new_version_is_swapped_in_and_a_broken_one_keeps_the_old() {
    let dir = Scratch::new("serve-reload");
    make_data(&dir, 600);
    let (ck, ck2) = (dir.path("ck"), dir.path("ck2"));
    train(&dir, &ck, "1");
    train(&dir, &ck2, "2");
    let first = std::fs::read_to_string(ck.join("LATEST"))
        .unwrap()
        .trim()
        .to_string();
    let second = std::fs::read_to_string(ck2.join("LATEST"))
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(first, second);
    let file = dir.path("rows.tsv");
    let rows = std::fs::read(&file).unwrap();
    let expected2 = predict(&ck2, &file, &dir.path("p2.txt"), &[]);
    let server = Server::start(&ck, &["--reload-poll-ms", "100"]);

    // A new version under LATEST is picked up and scores as predict does with it.
    copy_dir(&ck2.join(&second), &ck.join(&second));
    set_latest(&ck, &second);
    wait_for_version(&server, &second);
    let (code, answer) = server.post("text/plain", &rows);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(bits(&probabilities(&answer)), bits(&expected2));
    assert!(answer.contains(&second), "{answer}");

    // A version that cannot load leaves the old one serving, logged and counted.
    let broken = "ckpt-000000009999-000";
    copy_dir(&ck.join(&second), &ck.join(broken));
    std::fs::write(
        ck.join(broken).join("dense.safetensors"),
        b"not a tensor file",
    )
    .unwrap();
    set_latest(&ck, broken);
    let until = Instant::now() + Duration::from_secs(20);
    while number(&server.get("/metrics"), "dlrm_model_reload_failures_total") < 1.0 {
        assert!(
            Instant::now() < until,
            "no failure counted: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        server.log().contains(&format!("still serving {second}")),
        "{}",
        server.log()
    );
    let (code, answer) = server.post("text/plain", &rows);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(bits(&probabilities(&answer)), bits(&expected2));

    // SIGHUP reloads what LATEST names, once it loads.
    set_latest(&ck, &first);
    server.signal(libc::SIGHUP);
    wait_for_version(&server, &first);
    assert!(number(&server.get("/metrics"), "dlrm_model_reloads_total") >= 2.0);
    assert_eq!(server.stop(), Some(0));
}
