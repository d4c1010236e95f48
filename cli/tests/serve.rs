//! `dlrm serve` over loopback: the server started as a process, real HTTP/1.1 requests, its
//! answers compared bit for bit with `dlrm predict`'s, hostile input, reload, shutdown.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Scratch, assert_ok, dlrm};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Synthetic Criteo rows (`rows` of them, small vocabularies) in `dir`/rows.tsv, preprocessed
/// into `dir`/ds.
fn make_data(dir: &Scratch, rows: u64) {
    let sizes = [
        50, 100, 20, 300, 7, 1000, 30, 60, 10, 500, 40, 80, 90, 100, 5, 6, 7, 8, 9,
    ]
    .iter()
    .chain(&[10, 11, 12, 13, 14, 15, 16])
    .map(|n| n.to_string())
    .collect::<Vec<_>>()
    .join("-");
    let (file, rows) = (dir.arg("rows.tsv"), rows.to_string());
    let args = ["synth", "--format", "criteo-tsv", "--rows", &rows];
    assert_ok(&dlrm(
        &[
            &args[..],
            &["--arch-embedding-size", &sizes, "--out", &file],
        ]
        .concat(),
    ));
    let o = dlrm(&[
        "preprocess",
        &file,
        "--out",
        &dir.arg("ds"),
        "--split",
        "8,1,1",
    ]);
    assert_ok(&o);
}

/// Trains a small model on `dir`/ds for `epochs` epochs into the checkpoint folder `ck`.
fn train(dir: &Scratch, ck: &Path, epochs: &str) {
    let ds = dir.arg("ds");
    let mut args = vec!["train", "--dataset", &ds, "--mini-batch-size", "128"];
    args.extend(["--arch-mlp-bot", "13-32-16", "--arch-mlp-top", "16-1"]);
    args.extend(["--nepochs", epochs, "--threads", "2", "--save-model", s(ck)]);
    assert_ok(&dlrm(&args));
}

/// `dlrm predict`'s probabilities for `input` (with `extra` flags).
fn predict(ck: &Path, input: &Path, out: &Path, extra: &[&str]) -> Vec<f32> {
    let args = ["predict", "--load-model", s(ck), "--criteo", s(input)];
    assert_ok(&dlrm(
        &[&args[..], &["--out", s(out), "--threads", "2"], extra].concat(),
    ));
    let text = std::fs::read_to_string(out).unwrap();
    text.lines().map(|l| l.parse().unwrap()).collect()
}

/// A running `dlrm serve`: its address, and its stderr as far as it has come.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(ck: &Path, extra: &[&str]) -> Server {
        let args = ["serve", "--load-model", s(ck), "--listen", "127.0.0.1:0"];
        let mut child = Command::new(env!("CARGO_BIN_EXE_dlrm"))
            .args([&args[..], &["--threads", "2"], extra].concat())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dlrm serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (mut stderr, sink) = (child.stderr.take().unwrap(), Arc::clone(&log));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        let mut stdout: BufReader<ChildStdout> = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("no address: {line:?} {}", log.lock().unwrap()))
            .trim()
            .to_string();
        Server { child, addr, log }
    }

    /// One request on its own connection: the status code and the body.
    fn request(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        request_to(&self.addr, method, path, content_type, body)
    }

    fn post(&self, content_type: &str, body: &[u8]) -> (u16, String) {
        self.request("POST", "/v1/predict", content_type, body)
    }

    fn get(&self, path: &str) -> String {
        let (code, body) = self.request("GET", path, "", b"");
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill takes plain integers; the child has not been waited for, so its pid is
        // ours.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Sends SIGTERM and returns the exit code (waiting at most 20 s).
    fn stop(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < until, "the server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request_to(addr: &str, method: &str, path: &str, kind: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let kind = match kind {
        "" => String::new(),
        k => format!("Content-Type: {k}\r\n"),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{kind}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) and close before it has read all of a large body.
    let _ = stream.write_all(body);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
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
    let dir = Scratch::new("serve-hostile");
    make_data(&dir, 600);
    let ck = dir.path("ck");
    train(&dir, &ck, "1");
    let text = std::fs::read_to_string(dir.path("rows.tsv")).unwrap();
    let good = text.lines().next().unwrap().to_string();
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
    let dir = Scratch::new("serve-ops");
    make_data(&dir, 600);
    let ck = dir.path("ck");
    train(&dir, &ck, "1");
    let text = std::fs::read_to_string(dir.path("rows.tsv")).unwrap();
    let good = text.lines().next().unwrap().to_string();
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

impl Server {
    /// Waits (at most 20 s) for the exit a signal already sent asked for.
    fn stop_after_signal(mut self) -> Option<i32> {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < until, "the server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
