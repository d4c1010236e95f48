//! The Criteo line parser alone: `criteo/parse_line/synthetic-<rows>` on rows written by the
//! synthetic writer (Kaggle table sizes, teacher labels). Throughput is in bytes of text, so
//! it reads as the parsing share of `dlrm preprocess`'s MB/s.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dlrm::config::KAGGLE_TABLE_SIZES;
use dlrm::data::Batch;
use dlrm::data::criteo::{NUM_DENSE, RawRow, SyntheticTsv, parse_line};
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData};
use std::hint::black_box;
use std::time::Duration;

fn bench_parse(c: &mut Criterion) {
    let rows = 10_000;
    let tsv = SyntheticTsv::new(SyntheticData::new(SyntheticConfig {
        num_dense: NUM_DENSE,
        table_sizes: KAGGLE_TABLE_SIZES.to_vec(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 1,
        fixed_bag_size: true,
        seed: 1,
    }))
    .expect("Criteo-shaped generator");
    let mut text = Vec::new();
    tsv.write_rows(0, rows, true, &mut Batch::default(), &mut text);
    let lines: Vec<&[u8]> = text
        .strip_suffix(b"\n")
        .expect("a final newline")
        .split(|&b| b == b'\n')
        .collect();
    let mut group = c.benchmark_group("criteo");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Bytes(text.len() as u64));
    let mut row = RawRow::default();
    group.bench_function(
        BenchmarkId::new("parse_line", format!("synthetic-{rows}")),
        |b| {
            b.iter(|| {
                for line in &lines {
                    parse_line(black_box(line), true, &mut row).expect("a good line");
                }
                black_box(&row);
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
