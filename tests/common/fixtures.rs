//! Loader for the PyTorch golden fixtures (format: tests/fixtures/README.md).
//!
//! Cases are read from the folder named by `DLRM_FIXTURES` (an absolute path) when it is set,
//! else from `tests/fixtures` of this package, so the same tests can check any fixture set of
//! that format. A missing case file is a test failure, never a skip.

use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

pub struct Tensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

pub struct Fixture {
    pub case: String,
    pub config: serde_json::Map<String, Value>,
    pub tensors: HashMap<String, Tensor>,
}

/// The folder fixtures are read from.
pub fn fixture_dir() -> PathBuf {
    match std::env::var_os("DLRM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// Loads `<case>.json`; panics (fails the test) if it is missing or malformed.
pub fn load(case: &str) -> Fixture {
    let path = fixture_dir().join(format!("{case}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    let root: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fixture {}: bad JSON: {e}", path.display()));
    let config = root["config"].as_object().cloned().unwrap_or_default();
    let mut tensors = HashMap::new();
    for (name, t) in root["tensors"].as_object().expect("tensors object") {
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect();
        let data = t["data"].as_array().expect("data");
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "{case}: tensor {name} has {} values for shape {shape:?}",
            data.len()
        );
        let (f32v, i64v) = match t["dtype"].as_str() {
            Some("f32") => (
                data.iter()
                    .map(|x| x.as_f64().expect("f32") as f32)
                    .collect(),
                Vec::new(),
            ),
            Some("i64") => (
                Vec::new(),
                data.iter().map(|x| x.as_i64().expect("i64")).collect(),
            ),
            other => panic!("{case}: tensor {name} has unknown dtype {other:?}"),
        };
        tensors.insert(
            name.clone(),
            Tensor {
                shape,
                f32: f32v,
                i64: i64v,
            },
        );
    }
    Fixture {
        case: case.to_string(),
        config,
        tensors,
    }
}

impl Fixture {
    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor {name}", self.case))
    }

    pub fn f32(&self, name: &str) -> &[f32] {
        &self.tensor(name).f32
    }

    pub fn scalar(&self, name: &str) -> f32 {
        let t = self.tensor(name);
        assert_eq!(t.f32.len(), 1, "{}: {name} is not a scalar", self.case);
        t.f32[0]
    }

    pub fn i64(&self, name: &str) -> &[i64] {
        &self.tensor(name).i64
    }

    /// An i64 tensor as u32 ids/offsets (the kernels' index type).
    pub fn u32(&self, name: &str) -> Vec<u32> {
        self.i64(name)
            .iter()
            .map(|&x| u32::try_from(x).expect("non-negative index"))
            .collect()
    }

    pub fn shape(&self, name: &str) -> &[usize] {
        &self.tensor(name).shape
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn config_usize(&self, key: &str) -> usize {
        self.config[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: config {key} is not an integer", self.case))
            as usize
    }

    pub fn config_f32(&self, key: &str) -> f32 {
        self.config[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: config {key} is not a number", self.case)) as f32
    }

    pub fn config_str(&self, key: &str) -> &str {
        self.config[key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: config {key} is not a string", self.case))
    }

    pub fn config_bool(&self, key: &str) -> bool {
        self.config[key]
            .as_bool()
            .unwrap_or_else(|| panic!("{}: config {key} is not a bool", self.case))
    }

    /// The case's suggested tolerance (abs, rel).
    pub fn tolerance(&self) -> (f32, f32) {
        (
            self.config_f32("tolerance_abs"),
            self.config_f32("tolerance_rel"),
        )
    }

    /// Asserts `actual` matches tensor `name` elementwise with the numpy allclose rule
    /// |actual - expected| <= abs + rel * |expected|, using the case's tolerance.
    pub fn assert_close(&self, name: &str, actual: &[f32]) {
        let (abs, rel) = self.tolerance();
        self.assert_close_tol(name, actual, abs, rel);
    }

    pub fn assert_close_tol(&self, name: &str, actual: &[f32], abs: f32, rel: f32) {
        let expected = self.f32(name);
        assert_eq!(
            actual.len(),
            expected.len(),
            "{}: {name} has {} values, expected {}",
            self.case,
            actual.len(),
            expected.len()
        );
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= abs + rel * e.abs(),
                "{}: {name}[{i}] = {a}, PyTorch gives {e} (tolerance {abs} + {rel}*|e|)",
                self.case
            );
        }
    }
}
