//! The BF16 kernels against PyTorch (tests/fixtures/make_bf16_fixtures.py, torch's
//! `bfloat16`), on every ISA this CPU supports:
//! - f32 -> bf16 conversions: bit-identical to torch for every value but two classes where
//!   the kernels follow VCVTNEPS2BF16 (the hardware instruction) and torch does not: f32
//!   subnormals become signed zero (torch rounds them, to a subnormal or the smallest normal
//!   bf16), and a NaN keeps its sign and upper payload with the quiet bit set (torch gives the
//!   one pattern 0xFFFF). Both differences are asserted exactly, so a change on either side
//!   shows.
//! - the BF16 product (`gemm::Precision::Bf16`, and the VDPBF16PS kernel `gemm_bf16`) within
//!   the rounding of an f32 sum of the exact products;
//! - the split-BF16 EmbeddingBag forward: the widened bf16 rows pooled in f32, as torch pools
//!   them, and within bf16 rounding of torch's own bf16 EmbeddingBag.
//!
//! The fixtures are read from this package's tests/fixtures (they are not part of the shared
//! fixture sets that DLRM_FIXTURES may name).

use dlrm::kernels::bf16::{Bf16, Isa, f32_to_bf16_slice};
use dlrm::kernels::embedding::bf16::{SplitTable, embedding_bag_forward_split};
use dlrm::kernels::embedding::{Bags, Pooling};
use dlrm::kernels::gemm::{Bf16Mat, MatMut, MatRef, Precision, gemm_bf16, linear_forward};
use dlrm::kernels::parallel::Par;
use dlrm::kernels::reference;
use serde_json::Value;

/// Tensor `name` of fixture `case`: its shape and its values as f64 (exact for f32 and i64).
fn tensor(case: &str, name: &str) -> (Vec<usize>, Vec<f64>) {
    let path = format!("{}/tests/fixtures/{case}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let root: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let t = &root["tensors"][name];
    let shape = t["shape"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no {name}"));
    let shape = shape.iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let data = t["data"].as_array().unwrap().iter();
    (shape, data.map(|x| x.as_f64().unwrap()).collect())
}

fn f32s(case: &str, name: &str) -> (Vec<usize>, Vec<f32>) {
    let (shape, v) = tensor(case, name);
    (shape, v.into_iter().map(|x| x as f32).collect())
}

fn ints(case: &str, name: &str) -> Vec<u32> {
    tensor(case, name).1.into_iter().map(|x| x as u32).collect()
}

/// What torch gives an f32 subnormal: round to nearest even of its upper half, no flush.
fn rounded_without_flush(bits: u32) -> u16 {
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

#[test]
fn conversions_match_torch_bit_for_bit_outside_subnormals_and_nan_payloads() {
    const CASE: &str = "bf16_conversion";
    let words = ints(CASE, "input_bits");
    let values: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
    let scalar = ints(CASE, "bf16_bits_scalar");
    let vectorised = ints(CASE, "bf16_bits_tensor");
    assert_eq!(scalar, vectorised, "torch's two paths agree");
    let ours: Vec<Vec<u16>> = Isa::all_supported()
        .into_iter()
        .map(|isa| {
            let mut out = vec![Bf16::from_bits(0); values.len()];
            f32_to_bf16_slice(&values, &mut out, isa);
            out.iter().map(|b| b.to_bits()).collect()
        })
        .collect();
    let (mut exact, mut subnormal, mut nan) = (0, 0, 0);
    for (i, (&x, &want)) in values.iter().zip(&scalar).enumerate() {
        let want = want as u16;
        let mine = Bf16::from_f32(x).to_bits();
        assert_eq!(mine, reference::f32_to_bf16(x).to_bits(), "{x:e}: twin");
        for o in &ours {
            assert_eq!(o[i], mine, "{x:e}: the ISAs agree");
        }
        if x.is_nan() {
            assert_eq!(want, 0xFFFF, "torch's NaN");
            assert_eq!(mine, (words[i] >> 16) as u16 | 0x0040, "ours: quieted NaN");
            nan += 1;
        } else if x.is_subnormal() {
            assert_eq!(want, rounded_without_flush(words[i]), "torch rounds {x:e}");
            assert_eq!(mine, (words[i] >> 16) as u16 & 0x8000, "ours: signed zero");
            subnormal += 1;
        } else {
            assert_eq!(mine, want, "{x:e} (bits {:#010x})", words[i]);
            exact += 1;
        }
    }
    assert!(
        exact > 250 && subnormal >= 4 && nan >= 4,
        "{exact} {subnormal} {nan}"
    );
}

/// |y - y_ref| within the rounding of an f32 sum of k exact products (bf16 x bf16 is exact in
/// f32): (k + 2) u sum |products|, u = 2^-24, with a factor 2 of slack.
fn assert_product_close(what: &str, y: &[f32], want: &[f32], bound: &[f32]) {
    for (i, ((a, e), b)) in y.iter().zip(want).zip(bound).enumerate() {
        assert!(
            (a - e).abs() <= *b,
            "{what}[{i}] = {a}, torch {e} (bound {b})"
        );
    }
}

#[test]
fn bf16_products_match_torch() {
    const CASE: &str = "bf16_matmul";
    let (xs, x) = f32s(CASE, "x");
    let (ws, w) = f32s(CASE, "w");
    let (_, want) = f32s(CASE, "y");
    let (m, k, n) = (xs[0], xs[1], ws[0]);
    let round = |v: &[f32]| -> Vec<Bf16> { v.iter().map(|&x| Bf16::from_f32(x)).collect() };
    let (xb, wb) = (round(&x), round(&w));
    let bound: Vec<f32> = (0..m * n)
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            let mag: f32 = (0..k)
                .map(|p| (xb[i * k + p].to_f32() * wb[j * k + p].to_f32()).abs())
                .sum();
            2.0 * (k + 2) as f32 * f32::EPSILON / 2.0 * mag + f32::MIN_POSITIVE
        })
        .collect();
    let mut y = vec![0.0f32; m * n];
    linear_forward(
        MatRef::new(&x, m, k),
        MatRef::new(&w, n, k),
        None,
        false,
        MatMut::new(&mut y, m, n),
        Precision::Bf16,
        Par::Seq,
    );
    assert_product_close("linear_forward bf16", &y, &want, &bound);
    for isa in Isa::all_supported() {
        let mut y = vec![0.0f32; m * n];
        let (a, b) = (Bf16Mat::new(&xb, m, k), Bf16Mat::new(&wb, n, k));
        gemm_bf16(a, b, 0.0, MatMut::new(&mut y, m, n), isa, Par::Seq);
        assert_product_close(&format!("gemm_bf16 {isa:?}"), &y, &want, &bound);
    }
}

#[test]
fn split_table_forward_matches_torch_embedding_bag() {
    const CASE: &str = "embedding_bag_bf16";
    let (shape, weight) = f32s(CASE, "weight");
    let dim = shape[1];
    let (hi, lo) = reference::split_f32(&weight);
    assert!(lo.iter().all(|&l| l == 0), "the weights are bf16 values");
    let (indices, offsets) = (ints(CASE, "indices"), ints(CASE, "offsets"));
    let bags = Bags::with_offsets(&indices, &offsets);
    let (_, want) = f32s(CASE, "output");
    let (_, torch_bf16) = f32s(CASE, "output_bf16");
    for isa in Isa::all_supported() {
        let mut out = vec![f32::NAN; offsets.len() * dim];
        let lookup = |_| (SplitTable::new(&hi, dim), bags);
        let out_mut = MatMut::new(&mut out, offsets.len(), dim);
        embedding_bag_forward_split(1, lookup, Pooling::Sum, out_mut, isa, Par::Seq);
        // Bags of up to 6 rows of values in [-1, 1]: f32 summation error below 6 * 6 * u.
        for (i, (a, e)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a - e).abs() <= 4e-6,
                "{isa:?}: output[{i}] = {a}, torch {e}"
            );
        }
        // torch's bf16 EmbeddingBag rounds its output to bf16 (relative error <= 2^-8).
        for (i, (a, e)) in out.iter().zip(&torch_bf16).enumerate() {
            let tol = e.abs() / 256.0 + 1e-6;
            assert!(
                (a - e).abs() <= tol,
                "{isa:?}: vs bf16 output[{i}] = {a}, torch {e}"
            );
        }
    }
}
