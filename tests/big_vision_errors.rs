//! Bad big_vision input gets a clear error, never a panic: a V-MoE config naming an unknown
//! router or dispatcher, a group size that does not divide the batch's tokens, a params file
//! missing a key, an unknown kwarg.

use kiln::npz_write::NpzWriter;
use kiln::{compile, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::WeightStore;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big_vision").join(name)
}

/// A scratch model folder (params + config copied from a fixture), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn of(case: &str, config: &str, tag: &str) -> Scratch {
        let dst = std::env::temp_dir().join(format!("kiln-bverr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::copy(fixture(case).join("params.npz"), dst.join("params.npz")).unwrap();
        std::fs::copy(fixture(case).join(config), dst.join("config.json")).unwrap();
        Scratch(dst)
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let p = self.0.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn compile_err(dir: &Path, batch: usize, hw: (usize, usize)) -> String {
    let profile = Profile { batch, image_hw: Some(hw), ..Profile::default() };
    match compile(dir, &CompileOptions { profile, backend: "cpu".into(), trace: false }) {
        Ok(_) => panic!("{}: compiled, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

#[test]
fn unknown_router() {
    let s = Scratch::of("vmoe", "config.json", "router");
    s.edit_config(|v| v["model"]["encoder"]["moe"]["router"]["name"] = "NoisyTopItemsPerExpertRouter".into());
    let msg = compile_err(&s.0, 4, (24, 32));
    assert_names(&msg, &["config.json", "encoder.moe.router.name", "unknown router", "NoisyTopItemsPerExpertRouter"]);
}

#[test]
fn unknown_dispatcher() {
    let s = Scratch::of("vmoe", "config.json", "dispatcher");
    s.edit_config(|v| v["model"]["encoder"]["moe"]["router"]["dispatcher"]["name"] = "sparse".into());
    let msg = compile_err(&s.0, 4, (24, 32));
    assert_names(&msg, &["config.json", "encoder.moe.router.dispatcher.name", "unknown dispatcher", "sparse"]);
}

#[test]
fn group_size_not_dividing_the_batch() {
    // 3 images x 13 tokens = 39 tokens: groups of 26 do not tile them.
    let s = Scratch::of("vmoe", "config.json", "group");
    let msg = compile_err(&s.0, 3, (24, 32));
    assert_names(&msg, &["group_size 26", "39 tokens", "encoderblock_1"]);
}

#[test]
fn unknown_kwarg_is_refused() {
    let s = Scratch::of("vit_map_learn", "config.json", "kwarg");
    s.edit_config(|v| v["model"]["registers"] = 4.into());
    let msg = compile_err(&s.0, 2, (24, 24));
    assert_names(&msg, &["config.json", "model.registers", "does not know"]);
}

#[test]
fn params_missing_a_key() {
    let s = Scratch::of("vit_map_learn", "config.json", "missing");
    let gone = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias";
    let store = WeightStore::open(&s.0.join("params.npz")).unwrap();
    let mut names: Vec<&String> = store.index.keys().collect();
    names.sort();
    let mut buf = Vec::new();
    let mut w = NpzWriter::new(std::io::Cursor::new(&mut buf));
    for n in names.into_iter().filter(|n| *n != gone) {
        let r = &store.index[n];
        let (_, bytes) = store.get(n, &r.ty).unwrap();
        let vals: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        w.add_f32(n, &r.ty.shape, &vals).unwrap();
    }
    w.finish().unwrap();
    drop(store);
    std::fs::write(s.0.join("params.npz"), buf).unwrap();
    let msg = compile_err(&s.0, 2, (24, 24));
    assert_names(&msg, &[gone, "no tensor", "expected shape [96]"]);
}

#[test]
fn scan_layer_out_of_range() {
    // A scan checkpoint with depth 3 read as depth 4: block 3 exists in neither layout.
    let s = Scratch::of("vit_map_learn_scan", "config.json", "scan");
    s.edit_config(|v| v["model"]["depth"] = 4.into());
    let msg = compile_err(&s.0, 2, (24, 24));
    assert_names(&msg, &["Transformer/encoderblock_3/LayerNorm_0/scale", "scan layout"]);
}

/// A kwarg given as JSON null is the module's default (Python's `None`), as configs dumped from
/// Python have it: `num_classes: null` (ViT: no head, as absent) and `representation_size:
/// null` (V-MoE) build the same graph as leaving them out; a null kwarg the module does not
/// have is still refused by name.
#[test]
fn null_kwargs_are_the_defaults() {
    // The V-MoE fixture's images fix its batch (whole routing groups) and size.
    let images = kiln::io::read(&fixture("vmoe").join("inputs.safetensors")).unwrap().remove(0).1;
    let s = &images.ty.shape;
    let profile = Profile { batch: s[0], image_hw: Some((s[1], s[2])), ..Profile::default() };
    let outputs = |dir: &Path, profile: &Profile| -> Vec<String> {
        let built = kiln_models::build(dir, profile).unwrap_or_else(|e| panic!("{e}"));
        built.graph("forward").unwrap().outputs.iter().map(|(n, _)| n.clone()).collect()
    };
    let vit = Scratch::of("vit_map_learn", "config.json", "null-vit");
    vit.edit_config(|v| v["model"].as_object_mut().unwrap().remove("num_classes").map(|_| ()).unwrap());
    let absent = outputs(&vit.0, &Profile::default());
    vit.edit_config(|v| v["model"]["num_classes"] = serde_json::Value::Null);
    assert_eq!(outputs(&vit.0, &Profile::default()), absent);
    assert!(!absent.iter().any(|n| n == "logits"), "no head without num_classes: {absent:?}");

    let moe = Scratch::of("vmoe", "config_k2_cap0.75_bpr.json", "null-vmoe");
    let before = outputs(&moe.0, &profile);
    moe.edit_config(|v| v["model"]["representation_size"] = serde_json::Value::Null);
    assert_eq!(outputs(&moe.0, &profile), before);

    moe.edit_config(|v| v["model"]["not_a_kwarg"] = serde_json::Value::Null);
    let e = kiln_models::build(&moe.0, &profile).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("not_a_kwarg"), "{e}");
}
