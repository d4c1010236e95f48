//! GEMM throughput on the DLRM layer shapes, ours against the `matrixmultiply` crate.
//!
//! Ids: `gemm/<form>-<impl>-t<threads>/<M>x<N>x<K>`, form = fwd (Y = X W^T + b, ReLU),
//! dx (dX = dY W), dw (dW = dY^T X), nn (plain square product); throughput is 2 M N K
//! elements, so criterion's elem/s reads as FLOP/s.
//!
//! `DLRM_BENCH_SWEEP=1` adds an exhaustive sweep of square and skinny shapes.
//!
//! `gemm-bf16/fwd-t<threads>/<M>x<N>x<K>`: the forward products of the top MLP's wide layers
//! with bf16 X and W and f32 accumulation, on the ISA `Isa::selected` picks (AVX512-BF16
//! where present; `DLRM_ISA=portable` measures the portable path), 2 M N K FLOP as above.
//!
//! `gemm-precision/<form>-<path>-t<threads>/<M>x<N>x<K>`: the Kaggle MLP's products with f32
//! operands (`f32`) against bf16-rounded operands with f32 accumulation on each BF16 path the
//! CPU has (`bf16-avx512`: VDPBF16PS, `bf16-amx`: AMX tiles), 2 M N K FLOP as above.
//!
//! `gemm-chunk/<form>-t1/<M>x<N>x<K>`: the products of the Kaggle MLPs (bottom 13-512-256-64-16,
//! top 367-512-256-1) exactly as one row chunk of the training step runs them (`dlrm::model::
//! dlrm`: batch 2048 in 8 chunks of 256 rows, batch 128 in one chunk of 128), on one thread:
//! the forward with bias and ReLU and W^T prepacked, dX with the ReLU mask and W prepacked, dW
//! with the mask and overwritten. Each benchmark also prints its GFLOP/s and that rate's
//! fraction of the one-thread FMA peak probed right after (`dlrm::train::measure_fma_peak`, the
//! roofline bench's `fma-peak` probe).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dlrm::train::measure_fma_peak;
use dlrm_kernels::bf16::{Bf16, Isa, f32_to_bf16_slice};
use dlrm_kernels::gemm::{self, Bf16Mat, GemmOps, MatMut, MatRef, PackedB};
use dlrm_kernels::parallel::Par;
use std::hint::black_box;
use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
enum Form {
    Fwd,
    Dx,
    Dw,
    Nn,
}

impl Form {
    fn name(self) -> &'static str {
        match self {
            Form::Fwd => "fwd",
            Form::Dx => "dx",
            Form::Dw => "dw",
            Form::Nn => "nn",
        }
    }
}

/// One product with its operands stored as an MLP layer stores them.
struct Problem {
    form: Form,
    m: usize,
    n: usize,
    k: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    bias: Vec<f32>,
    c: Vec<f32>,
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32
                - 0.5
        })
        .collect()
}

impl Problem {
    /// A layer `inp -> out` at batch `batch`, in the given form.
    fn layer(form: Form, batch: usize, inp: usize, out: usize) -> Problem {
        let (m, n, k) = match form {
            Form::Fwd => (batch, out, inp),
            Form::Dx => (batch, inp, out),
            Form::Dw => (out, inp, batch),
            Form::Nn => (batch, out, inp),
        };
        Problem {
            form,
            m,
            n,
            k,
            a: values(m * k, 1),
            b: values(k * n, 2),
            bias: values(n, 3),
            c: vec![0.0; m * n],
        }
    }

    /// Operand views: A is m x k, B is k x n, laid out as the layer keeps them
    /// (fwd reads W^T, dw reads dY^T).
    fn views(&self) -> (MatRef<'_>, MatRef<'_>) {
        let (m, n, k) = (self.m, self.n, self.k);
        match self.form {
            Form::Fwd => (MatRef::new(&self.a, m, k), MatRef::new(&self.b, n, k).t()),
            Form::Dw => (MatRef::new(&self.a, k, m).t(), MatRef::new(&self.b, k, n)),
            Form::Dx | Form::Nn => (MatRef::new(&self.a, m, k), MatRef::new(&self.b, k, n)),
        }
    }

    fn run_ours(&mut self) {
        self.run_on(None);
    }

    /// The product in f32 (`None`) or with bf16 operands on `isa`'s path.
    fn run_on(&mut self, bf16_isa: Option<Isa>) {
        let (m, n) = (self.m, self.n);
        let mut c = std::mem::take(&mut self.c);
        let (a, b) = self.views();
        let ops = match self.form {
            Form::Fwd => GemmOps {
                bias: Some(&self.bias),
                relu: true,
                ..GemmOps::default()
            },
            Form::Dw => GemmOps {
                beta: 1.0,
                ..GemmOps::default()
            },
            _ => GemmOps::default(),
        };
        let c_mat = MatMut::new(&mut c, m, n);
        match bf16_isa {
            None => gemm::gemm(a, b, c_mat, &ops, Par::Rayon),
            Some(isa) => gemm::gemm_rounded_bf16(a, b, c_mat, &ops, isa, Par::Rayon),
        }
        self.c = c;
    }

    fn run_matrixmultiply(&mut self) {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut c = std::mem::take(&mut self.c);
        let (a, b) = self.views();
        let beta = if matches!(self.form, Form::Dw) {
            1.0
        } else {
            0.0
        };
        // SAFETY: the views describe valid m x k and k x n matrices; C is m x n contiguous.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                a.row_stride() as isize,
                a.col_stride() as isize,
                b.as_ptr(),
                b.row_stride() as isize,
                b.col_stride() as isize,
                beta,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        }
        self.c = c;
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn shapes() -> Vec<(Form, usize, usize, usize)> {
    // (form, batch, in, out)
    let mut v = Vec::new();
    let layers = [
        (13, 512),
        (512, 256),
        (256, 64),
        (64, 16),
        (367, 512),
        (512, 256),
        (256, 1),
    ];
    let mut seen = Vec::new();
    for (i, o) in layers {
        if seen.contains(&(i, o)) {
            continue;
        }
        seen.push((i, o));
        for form in [Form::Fwd, Form::Dx, Form::Dw] {
            v.push((form, 2048, i, o));
        }
    }
    for (i, o) in [(367, 512), (512, 256)] {
        for form in [Form::Fwd, Form::Dx, Form::Dw] {
            v.push((form, 128, i, o));
        }
    }
    v.push((Form::Nn, 512, 512, 512));
    v.push((Form::Nn, 1024, 1024, 1024));
    if std::env::var_os("DLRM_BENCH_SWEEP").is_some() {
        for s in [64, 96, 128, 192, 256, 384, 768, 1536, 2048] {
            v.push((Form::Nn, s, s, s));
        }
        for n in [1, 2, 4, 8, 16, 24, 32, 48, 64] {
            v.push((Form::Fwd, 2048, 256, n));
            v.push((Form::Dx, 2048, n, 512));
        }
        for m in [1, 8, 16, 32, 48, 64, 96, 128] {
            v.push((Form::Fwd, m, 512, 512));
        }
    }
    v
}

fn bench_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200));
    let pools = [(1, pool(1)), (2, pool(2))];
    for (form, batch, inp, out) in shapes() {
        let mut p = Problem::layer(form, batch, inp, out);
        let shape = format!("{}x{}x{}", p.m, p.n, p.k);
        group.throughput(Throughput::Elements((2 * p.m * p.n * p.k) as u64));
        for (t, pl) in &pools {
            let id = BenchmarkId::new(format!("{}-ours-t{t}", form.name()), &shape);
            group.bench_function(id, |b| pl.install(|| b.iter(|| p.run_ours())));
        }
        let id = BenchmarkId::new(format!("{}-matrixmultiply-t1", form.name()), &shape);
        group.bench_function(id, |b| b.iter(|| p.run_matrixmultiply()));
        black_box(&p.c);
    }
    group.finish();
}

fn bench_gemm_bf16(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm-bf16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200));
    let pools = [(1, pool(1)), (2, pool(2))];
    let isa = Isa::selected();
    let to_bf16 = |x: Vec<f32>| {
        let mut out = vec![Bf16::default(); x.len()];
        f32_to_bf16_slice(&x, &mut out, isa);
        out
    };
    // (batch, in, out): the top MLP's layers wide enough for register tiles.
    for (m, k, n) in [(2048, 367, 512), (2048, 512, 256), (2048, 256, 64)] {
        let x = to_bf16(values(m * k, 1));
        let w = to_bf16(values(n * k, 2));
        let mut y = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for (t, pl) in &pools {
            let id = BenchmarkId::new(format!("fwd-t{t}"), format!("{m}x{n}x{k}"));
            group.bench_function(id, |b| {
                pl.install(|| {
                    b.iter(|| {
                        gemm::gemm_bf16(
                            Bf16Mat::new(&x, m, k),
                            Bf16Mat::new(&w, n, k),
                            0.0,
                            MatMut::new(&mut y, m, n),
                            isa,
                            Par::Rayon,
                        )
                    })
                })
            });
        }
        black_box(&y);
    }
    group.finish();
}

/// The Kaggle preset's MLP products (layers 13-512-256-64 and 367-512-256, batch 2048 and
/// 1024), f32 against bf16 operands on each BF16 path this CPU has.
fn bench_gemm_precision(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm-precision");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200));
    let pools = [(1, pool(1)), (2, pool(2))];
    let mut paths = vec![("f32", None)];
    for (name, isa) in [("bf16-avx512", Isa::Avx512Bf16), ("bf16-amx", Isa::Amx)] {
        if isa.is_supported() {
            paths.push((name, Some(isa)));
        }
    }
    let layers = [
        (2048, 13, 512),
        (2048, 512, 256),
        (2048, 256, 64),
        (2048, 367, 512),
    ];
    let more = [(1024, 367, 512), (1024, 512, 256)];
    for (batch, inp, out) in layers.into_iter().chain(more) {
        for form in [Form::Fwd, Form::Dx, Form::Dw] {
            let mut p = Problem::layer(form, batch, inp, out);
            let shape = format!("{}x{}x{}", p.m, p.n, p.k);
            group.throughput(Throughput::Elements((2 * p.m * p.n * p.k) as u64));
            for (name, isa) in &paths {
                for (t, pl) in &pools {
                    let id = BenchmarkId::new(format!("{}-{name}-t{t}", form.name()), &shape);
                    group.bench_function(id, |b| pl.install(|| b.iter(|| p.run_on(*isa))));
                }
            }
            black_box(&p.c);
        }
    }
    group.finish();
}

/// One layer product of a training chunk, operands laid out as `MlpBuffers` keeps them.
struct ChunkProduct {
    form: Form,
    rows: usize,
    inp: usize,
    out: usize,
    relu: bool,
    /// X (rows x inp) for fwd and dW; dY (rows x out) for dX.
    x: Vec<f32>,
    /// dY (rows x out) for dW.
    dy: Vec<f32>,
    /// The layer's output Y (rows x out): the ReLU mask of dX and dW.
    y: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    /// W^T (fwd) or W (dX) packed once, as the step packs it for all its chunks.
    packed: PackedB,
    c: Vec<f32>,
}

impl ChunkProduct {
    fn new(form: Form, rows: usize, inp: usize, out: usize, relu: bool) -> ChunkProduct {
        let w = values(out * inp, 2);
        let mut packed = PackedB::new();
        match form {
            Form::Fwd => packed.pack(MatRef::new(&w, out, inp).t()),
            Form::Dx => packed.pack(MatRef::new(&w, out, inp)),
            Form::Dw | Form::Nn => {}
        }
        let c_len = match form {
            Form::Dx => rows * inp,
            Form::Dw => out * inp,
            Form::Fwd | Form::Nn => rows * out,
        };
        ChunkProduct {
            form,
            rows,
            inp,
            out,
            relu,
            x: values(rows * inp.max(out), 1),
            dy: values(rows * out, 4),
            y: values(rows * out, 5),
            w,
            bias: values(out, 3),
            packed,
            c: vec![0.0; c_len],
        }
    }

    /// (M, N, K) of the product.
    fn mnk(&self) -> (usize, usize, usize) {
        match self.form {
            Form::Dx => (self.rows, self.inp, self.out),
            Form::Dw => (self.out, self.inp, self.rows),
            Form::Fwd | Form::Nn => (self.rows, self.out, self.inp),
        }
    }

    fn run(&mut self) {
        let (r, i, o) = (self.rows, self.inp, self.out);
        let w = MatRef::new(&self.w, o, i);
        let mask = self.relu.then(|| MatRef::new(&self.y, r, o));
        let seq = Par::Seq;
        let precision = gemm::Precision::F32;
        match self.form {
            Form::Fwd => gemm::linear_forward_prepacked(
                MatRef::new(&self.x[..r * i], r, i),
                w,
                Some(&self.packed),
                Some(&self.bias),
                self.relu,
                MatMut::new(&mut self.c, r, o),
                precision,
                seq,
            ),
            Form::Dx => gemm::linear_backward_input_prepacked(
                MatRef::new(&self.dy, r, o),
                mask,
                w,
                Some(&self.packed),
                None,
                MatMut::new(&mut self.c, r, i),
                precision,
                seq,
            ),
            Form::Dw => gemm::linear_backward_weight(
                MatRef::new(&self.dy, r, o),
                mask,
                MatRef::new(&self.x[..r * i], r, i),
                MatMut::new(&mut self.c, o, i),
                false,
                precision,
                seq,
            ),
            Form::Nn => unreachable!("no square product in a chunk"),
        }
    }
}

/// The products one chunk of `rows` rows runs in a Kaggle training step: (form, in, out, relu).
/// The bottom MLP's first layer has no dX (the dense features need no gradient); the 512-256
/// layer of both MLPs is listed once.
fn chunk_products() -> Vec<(Form, usize, usize, bool)> {
    let layers = [
        (13, 512, true),
        (512, 256, true),
        (256, 64, true),
        (64, 16, true),
        (367, 512, true),
        (256, 1, false),
    ];
    let mut v = Vec::new();
    for (l, (inp, out, relu)) in layers.into_iter().enumerate() {
        for form in [Form::Fwd, Form::Dx, Form::Dw] {
            if l > 0 || !matches!(form, Form::Dx) {
                v.push((form, inp, out, relu));
            }
        }
    }
    v
}

fn bench_gemm_chunk(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm-chunk");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000));
    let one = pool(1);
    for rows in [256, 128] {
        for (form, inp, out, relu) in chunk_products() {
            let mut p = ChunkProduct::new(form, rows, inp, out, relu);
            let (m, n, k) = p.mnk();
            let flops = 2 * m * n * k;
            group.throughput(Throughput::Elements(flops as u64));
            let (name, shape) = (format!("{}-t1", form.name()), format!("{m}x{n}x{k}"));
            let (mut runs, mut seconds) = (0u64, 0.0f64);
            group.bench_function(BenchmarkId::new(&name, &shape), |b| {
                one.install(|| {
                    b.iter_custom(|iters| {
                        let started = Instant::now();
                        for _ in 0..iters {
                            p.run();
                        }
                        let elapsed = started.elapsed();
                        (runs, seconds) = (runs + iters, seconds + elapsed.as_secs_f64());
                        elapsed
                    })
                })
            });
            black_box(&p.c);
            if runs > 0 {
                let gflops = (flops as u64 * runs) as f64 / seconds * 1e-9;
                let peak = one.install(|| measure_fma_peak(0.1));
                println!(
                    "gemm-chunk/{name}/{shape}: {gflops:.1} GFLOP/s, {:.1}% of the {peak:.1} GFLOP/s one-thread FMA peak",
                    100.0 * gflops / peak
                );
            }
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_gemm_bf16,
    bench_gemm_precision,
    bench_gemm_chunk
);
criterion_main!(benches);
