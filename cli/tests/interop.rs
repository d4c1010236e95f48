//! Export to and import from PyTorch-named safetensors: the names and shapes are the reference's,
//! a round trip keeps every parameter bit for bit, and an imported model trains on.

use dlrm::checkpoint;
use dlrm::storage::StorageKind;
use safetensors::SafeTensors;
use std::path::PathBuf;
use std::process::Command;

fn dlrm(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn export_import_round_trip() {
    let dir = TempDir(std::env::temp_dir().join(format!("dlrm-interop-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let p = |n: &str| dir.0.join(n).to_str().unwrap().to_string();
    let train = [
        "train",
        "--data-size",
        "2048",
        "--test-data-size",
        "1024",
        "--threads",
        "2",
    ];
    dlrm(&[&train[..], &["--save-model", &p("a")]].concat());
    dlrm(&[
        "export",
        "--load-model",
        &p("a"),
        "--out",
        &p("a.safetensors"),
    ]);
    dlrm(&[
        "import",
        "--in",
        &p("a.safetensors"),
        "--save-model",
        &p("b"),
    ]);
    dlrm(&[
        "export",
        "--load-model",
        &p("b"),
        "--out",
        &p("b.safetensors"),
    ]);

    let (fa, fb) = (
        std::fs::read(p("a.safetensors")).unwrap(),
        std::fs::read(p("b.safetensors")).unwrap(),
    );
    let (a, b) = (
        SafeTensors::deserialize(&fa).unwrap(),
        SafeTensors::deserialize(&fb).unwrap(),
    );
    let mut names = a.names();
    names.sort();
    let mut names_b = b.names();
    names_b.sort();
    assert_eq!(names, names_b);
    assert!(
        names.contains(&"emb_l.0.weight")
            && names.contains(&"bot_l.2.weight")
            && names.contains(&"top_l.0.bias")
    );
    for n in &names {
        let (ta, tb) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(ta.shape(), tb.shape(), "{n}");
        assert_eq!(ta.data(), tb.data(), "{n} differs after the round trip");
    }
    // The checkpoint's own parameters equal the exported ones.
    let (model, _) = checkpoint::load_dlrm(
        &checkpoint::resolve(&dir.0.join("a")).unwrap(),
        &StorageKind::Anon,
    )
    .unwrap();
    let w = a.tensor("top_l.0.weight").unwrap();
    assert_eq!(
        w.shape(),
        [model.top.layers[0].outputs, model.top.layers[0].inputs]
    );
    let le: Vec<u8> = model.top.layers[0]
        .weight
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(w.data(), &le[..]);
    // An imported model trains on.
    dlrm(&[&train[..], &["--load-model", &p("b")]].concat());
}
