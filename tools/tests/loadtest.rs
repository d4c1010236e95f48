//! `dlrm-loadtest` against a minimal HTTP server in the test: every point of the grid is
//! measured and reported; addresses off the loopback are refused before any connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};

fn loadtest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlrm-loadtest"))
        .args(args)
        .output()
        .expect("run dlrm-loadtest")
}

/// Answers each request on `stream` with one probability per body line.
fn answer(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.trim_end().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let n = body.iter().filter(|&&b| b == b'\n').count();
        let probs = vec!["0.5"; n].join(",");
        let text = format!("{{\"version\":\"v\",\"probabilities\":[{probs}]}}");
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", text.len());
        writer.write_all((head + &text).as_bytes()).unwrap();
    }
}

#[test]
fn every_point_is_measured_against_a_loopback_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            std::thread::spawn(move || answer(stream.unwrap()));
        }
    });
    let dir = std::env::temp_dir().join(format!("dlrm-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rows.tsv");
    std::fs::write(&file, "1\t2\n3\t4\n5\t6\n").unwrap();
    let o = loadtest(&[
        "--addr",
        &addr,
        "--rows",
        file.to_str().unwrap(),
        "--clients",
        "1,3",
        "--rows-per-request",
        "1,4",
        "--seconds",
        "0.3",
        "--warmup-seconds",
        "0.1",
        "--max-requests",
        "200",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let points: Vec<Vec<f64>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(points.len(), 4, "{out}");
    for (p, (rows_per_request, clients)) in
        points.iter().zip([(1., 1.), (1., 3.), (4., 1.), (4., 3.)])
    {
        assert_eq!((p[0], p[1]), (clients, rows_per_request), "{out}");
        // Rows/s is requests/s times the rows per request (both rounded to integers);
        // latencies are positive; no failure.
        assert!(
            (p[3] - p[2] * rows_per_request).abs() <= rows_per_request,
            "{out}"
        );
        assert!(
            p[2] > 0.0 && p[4] > 0.0 && p[5] >= p[4] && p[6] == 0.0,
            "{out}"
        );
    }
}

#[test]
fn addresses_off_the_loopback_are_refused() {
    for addr in ["10.1.2.3:8080", "192.168.0.1:80", "[2001:db8::1]:80"] {
        let o = loadtest(&["--addr", addr, "--rows", "/nonexistent"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("only loopback addresses"),
            "{err}"
        );
    }
}
