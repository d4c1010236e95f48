//! The crate's modules import only from the layers below their own (see the crate's doc): a
//! scan of every `crate::` path in src/ finds no import upward or sideways, hence no cycle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module's layer (lowest first), as the crate's doc lists them.
const LAYERS: [(&str, u32); 17] = [
    ("names", 0),
    ("rng", 0),
    ("cancel", 0),
    ("metrics", 0),
    ("distributed", 0),
    ("storage", 1),
    ("data", 2),
    ("model", 3),
    ("schedule", 3),
    ("checkpoint", 4),
    ("train", 5),
    ("config", 5),
    ("spec", 6),
    ("interop", 6),
    ("predict", 6),
    // Not modules: crate-level items.
    ("lib", 7),
    ("kernels", 0),
];

fn layer(module: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .unwrap_or_else(|| panic!("module {module} has no layer: add it to LAYERS and the doc"))
        .1
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file's code names through `crate::` (comments left out), with
/// grouped imports (`use crate::{a::b, c};`) expanded.
fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let body = &group[..group.find('}').unwrap_or(group.len())];
            for item in body.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

#[test]
fn no_module_imports_from_its_own_layer_or_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(file).unwrap();
        for target in imports(&text) {
            if target == module || !LAYERS.iter().any(|(m, _)| *m == target) {
                continue;
            }
            if layer(&target) >= layer(&module) && layer(&module) > 0 {
                wrong.push(format!("{} imports {target}", rel.display()));
            }
            if layer(&module) == 0 && module != "lib" {
                wrong.push(format!("{} (a leaf) imports {target}", rel.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_sees_grouped_and_nested_paths() {
    let text =
        "use crate::{data::Batch, model};\n// crate::train in a comment\nlet x = crate::spec::f();";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, ["data", "model", "spec"]);
}
