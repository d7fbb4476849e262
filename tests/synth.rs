//! Integration tests for `kiln synth` (src/synth.rs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kiln::synth::{self, SynthError, TensorSpec};
use kiln_graph::DType;
use kiln_models::registry::{SynthRecipe, WeightFormat};
use kiln_models::siglip;
use serde_json::Value;

/// Temp dir removed on drop (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kiln-synth-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (header length incl. the 8-byte prefix, parsed header JSON)
fn read_header(path: &Path) -> (u64, serde_json::Map<String, Value>) {
    let mut f = File::open(path).unwrap();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let n = u64::from_le_bytes(len);
    assert_eq!(n % 8, 0, "header must be padded to a multiple of 8");
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).unwrap();
    let text = std::str::from_utf8(&buf).unwrap();
    assert!(text.trim_end_matches(' ').ends_with('}'), "padding must be spaces");
    let Value::Object(map) = serde_json::from_str(text).unwrap() else { panic!("header is not an object") };
    (8 + n, map)
}

/// name -> (dtype, shape) for every tensor of a safetensors header.
fn tensor_table(header: &serde_json::Map<String, Value>) -> BTreeMap<String, (String, Vec<u64>)> {
    header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let dtype = v["dtype"].as_str().unwrap().to_string();
            let shape = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
            (k.clone(), (dtype, shape))
        })
        .collect()
}

/// Reads `count` f32 values of tensor `name` starting at element `start`.
fn read_f32s(path: &Path, name: &str, start: usize, count: usize) -> Vec<f32> {
    let (data_start, header) = read_header(path);
    let off = header[name]["data_offsets"][0].as_u64().unwrap();
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(data_start + off + 4 * start as u64)).unwrap();
    let mut buf = vec![0u8; 4 * count];
    f.read_exact(&mut buf).unwrap();
    buf.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip/vision_map")
}

/// A SigLIP tower recipe (f32 safetensors).
fn siglip_recipe(config: Value) -> SynthRecipe {
    SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Safetensors, roots: &[""], given: Vec::new(), batch: 1 }
}

/// The transformers-written fixture's sizes, through kiln's own config writer.
fn fixture_recipe() -> SynthRecipe {
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    let c: Value = serde_json::from_str(&text).unwrap();
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let (d, f, l, h) = (u("hidden_size"), u("intermediate_size"), u("num_hidden_layers"), u("num_attention_heads"));
    siglip_recipe(siglip::synth_config(d, f, l, h, u("patch_size"), u("image_size"), c["vision_use_head"].as_bool().unwrap()))
}

/// A tiny config with the fixture's shape synthesizes to exactly the tensor
/// names / shapes / dtypes and config.json that transformers wrote: the weight list kiln's
/// builder asks for is the one transformers saves.
#[test]
fn tiny_matches_transformers_fixture() {
    let dir = TempDir::new("tiny");
    let report = synth::synth_folder(&siglip::FAMILY, &fixture_recipe(), &dir.0, 0, false).unwrap();

    let (_, ours) = read_header(&report.weights_path);
    let (_, theirs) = read_header(&fixture_dir().join("model.safetensors"));
    assert_eq!(tensor_table(&ours), tensor_table(&theirs));
    assert_eq!(ours["__metadata__"], theirs["__metadata__"]);
    assert_eq!(report.num_tensors, tensor_table(&theirs).len());

    // config.json: same keys and values, except the transformers version stamp.
    let read_json = |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let mut want = read_json(&fixture_dir().join("config.json"));
    want.as_object_mut().unwrap().remove("transformers_version");
    assert_eq!(read_json(&report.config_path), want);

    // The safetensors crate accepts the file (contiguous offsets, full coverage).
    let bytes = std::fs::read(&report.weights_path).unwrap();
    assert_eq!(bytes.len() as u64, report.bytes);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), report.num_tensors);
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let vals: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert!(vals.iter().all(|v| v.is_finite()), "{name}");
        if name.ends_with("layer_norm1.weight") || name.ends_with("layernorm.weight") {
            assert!(vals.iter().all(|v| (v - 1.0).abs() < 0.25), "{name}: {vals:?}");
        }
    }
}

/// Same seed gives the same bytes; another seed gives different values; the
/// streamed file matches `TensorSpec::values`, also across chunk boundaries.
#[test]
fn deterministic_by_seed() {
    // fc1/fc2 have 16400 * 64 > 2^20 elements, so they span two chunks.
    let recipe = siglip_recipe(siglip::synth_config(64, 16400, 1, 4, 4, 16, true));
    let (a, b, c) = (TempDir::new("seed-a"), TempDir::new("seed-b"), TempDir::new("seed-c"));
    let ra = synth::synth_folder(&siglip::FAMILY, &recipe, &a.0, 7, false).unwrap();
    let rb = synth::synth_folder(&siglip::FAMILY, &recipe, &b.0, 7, false).unwrap();
    let rc = synth::synth_folder(&siglip::FAMILY, &recipe, &c.0, 8, false).unwrap();
    let fa = std::fs::read(&ra.weights_path).unwrap();
    assert_eq!(fa, std::fs::read(&rb.weights_path).unwrap(), "same seed must give identical files");
    let fc = std::fs::read(&rc.weights_path).unwrap();
    assert_eq!(fa.len(), fc.len());
    assert_ne!(fa, fc, "different seeds must give different values");

    let specs: BTreeMap<String, TensorSpec> =
        [("encoder.layers.0.mlp.fc1.weight", vec![16400, 64]), ("head.probe", vec![1, 1, 64]), ("post_layernorm.weight", vec![64])]
            .into_iter()
            .map(|(n, shape)| (n.to_string(), TensorSpec::f32(n.into(), shape.clone(), siglip::synth_init(n, &shape))))
            .collect();
    for name in ["encoder.layers.0.mlp.fc1.weight", "head.probe", "post_layernorm.weight"] {
        let spec = &specs[name];
        let n = spec.numel();
        let want = spec.values(7);
        let start = n.saturating_sub(1 << 20).saturating_sub(3); // straddles the chunk boundary when n > 2^20
        let got = read_f32s(&ra.weights_path, name, start, 6.min(n - start));
        assert_eq!(got, want[start..start + got.len()], "{name}");
        assert_eq!(read_f32s(&ra.weights_path, name, 0, 4), want[..4], "{name}");
    }

    // Pin the generator: benchmark weights should not silently change between
    // kiln versions. Update deliberately if the PRNG or init scheme changes.
    let pinned = TensorSpec::f32("x".into(), vec![4], synth::Init::Normal { mean: 0.0, std: 1.0 }).values(0);
    assert_eq!(pinned, [-1.374572, 0.26492426, -0.586248, -1.030493], "generator output changed: {pinned:?}");
}

/// The smallest listed model synthesizes end to end with the exact
/// transformers tensor names and shapes.
#[test]
fn smallest_listed_model() {
    let model = synth::list().into_iter().filter(|m| m.family.name == "siglip").min_by_key(|m| m.num_params().unwrap()).unwrap();
    let cfg = model.recipe(0).unwrap().config;
    let dir = TempDir::new("smallest");
    let report = synth::synth(model.name, &dir.0, 0, false).unwrap();
    assert_eq!(report.name, model.name);

    let (data_start, header) = read_header(&report.weights_path);
    let table = tensor_table(&header);
    assert_eq!(table.len(), report.num_tensors);
    assert!(table.values().all(|(dtype, _)| dtype == "F32"));
    let u = |k: &str| cfg[k].as_u64().unwrap();
    let (d, f, p, layers) = (u("hidden_size"), u("intermediate_size"), u("patch_size"), u("num_hidden_layers"));
    let n = (u("image_size") / p).pow(2);
    let shape = |k: &str| table.get(k).unwrap_or_else(|| panic!("missing {k}")).1.clone();
    assert_eq!(shape("embeddings.patch_embedding.weight"), [d, 3, p, p]);
    assert_eq!(shape("embeddings.patch_embedding.bias"), [d]);
    assert_eq!(shape("embeddings.position_embedding.weight"), [n, d]);
    assert_eq!(shape("head.probe"), [1, 1, d]);
    assert_eq!(shape("head.attention.in_proj_weight"), [3 * d, d]);
    assert_eq!(shape("head.attention.in_proj_bias"), [3 * d]);
    assert_eq!(shape("head.mlp.fc1.weight"), [f, d]);
    assert_eq!(shape("post_layernorm.weight"), [d]);
    for i in 0..layers {
        let l = format!("encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            assert_eq!(shape(&format!("{l}.self_attn.{proj}.weight")), [d, d]);
            assert_eq!(shape(&format!("{l}.self_attn.{proj}.bias")), [d]);
        }
        assert_eq!(shape(&format!("{l}.mlp.fc1.weight")), [f, d]);
        assert_eq!(shape(&format!("{l}.mlp.fc2.weight")), [d, f]);
        assert_eq!(shape(&format!("{l}.layer_norm1.weight")), [d]);
        assert_eq!(shape(&format!("{l}.layer_norm2.bias")), [d]);
    }
    // 4 (ln) + 8 (attn) + 4 (mlp) per layer; 3 embeddings; 2 post-LN; 11 head.
    assert_eq!(table.len() as u64, 16 * layers + 3 + 2 + 11);

    // Offsets are contiguous in name order and cover the file.
    let mut end = 0;
    for k in table.keys() {
        let off = &header[k]["data_offsets"];
        assert_eq!(off[0].as_u64().unwrap(), end, "{k}");
        end = off[1].as_u64().unwrap();
    }
    assert_eq!(data_start + end, std::fs::metadata(&report.weights_path).unwrap().len());

    // Values are the documented ones for seed 0.
    let spec = model.tensors().unwrap().into_iter().find(|t| t.name == "encoder.layers.11.mlp.fc2.weight").unwrap();
    let want = spec.values(0);
    assert_eq!(read_f32s(&report.weights_path, &spec.name, 1000, 8), want[1000..1008]);

    let cfg_json: Value = serde_json::from_str(&std::fs::read_to_string(&report.config_path).unwrap()).unwrap();
    assert_eq!(cfg_json["model_type"], "siglip_vision_model");
    assert_eq!(cfg_json["architectures"][0], "SiglipVisionModel");
    assert_eq!(cfg_json["hidden_size"].as_u64(), Some(d));
}

#[test]
fn errors_are_descriptive() {
    let err = synth::synth("siglip-xxl", Path::new("/nonexistent"), 0, false).unwrap_err();
    assert!(matches!(err, SynthError::UnknownModel { .. }));
    let msg = err.to_string();
    for m in synth::list() {
        assert!(msg.contains(m.name), "{msg}");
    }

    // An output path under a regular file cannot be created.
    let dir = TempDir::new("err");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("model");
    let err = synth::synth_folder(&siglip::FAMILY, &fixture_recipe(), &out, 0, false).unwrap_err();
    assert!(matches!(err, SynthError::Io { .. }));
    assert!(err.to_string().contains("not-a-dir"), "{err}");

    // A config the builder refuses (48 wide in 5 heads) is refused with the builder's reason.
    let bad = siglip_recipe(siglip::synth_config(48, 96, 3, 5, 8, 32, true));
    let err = synth::synth_folder(&siglip::FAMILY, &bad, &dir.0, 0, false).unwrap_err();
    assert!(matches!(err, SynthError::Model(_)), "{err:?}");
    assert!(err.to_string().contains("num_attention_heads") || err.to_string().contains("heads"), "{err}");
}

/// Every table row's weight list (name, shape, dtype, init), now learned from the family's
/// builder, is the one the hand-written lists it replaced gave: pinned as one FNV-1a hash per
/// row of the sorted `name [shape] dtype init` lines (given tensors show as `Constant(0.0)`).
/// On a deliberate change, the failure prints the new listing.
#[test]
fn weight_lists_are_pinned() {
    let pinned: &[(&str, usize, u64)] = &[
        // Learned from the CapPa builder when it landed (no hand-written list preceded it).
        ("cappa-b16-224", 281, 0xae4e8ccdbf25d6e6),
        ("gemma2-2b", 288, 0x54ff7c307760eee2),
        ("gemma2-2b-bf16", 288, 0xb5e0ffde9fa12d1c),
        ("jet-imagenet64", 41, 0xda153b4e15f019cc),
        ("jet-jetformer-256", 73, 0x9a30a65a95ae931a),
        // Learned from the JetFormer builder when it landed.
        ("jetformer-350m-256", 88, 0x45c3d27c4c39092),
        ("paligemma2-3b-224", 727, 0x1f023f569fc1520d),
        // Learned from the builder when the 448 and 896 px rows landed (the headline's model).
        ("paligemma2-3b-448", 727, 0xaa53c9391ad269bd),
        ("paligemma2-3b-896", 727, 0xcce84a640acb8435),
        // Learned from the mask decoder's builder when its row landed.
        ("paligemma-seg-oid", 25, 0x341a5c08f4e428e8),
        ("siglip-b16-224", 208, 0xa87b21708eaebd12),
        ("siglip-l16-224", 400, 0x4f2b4769a243a227),
        ("siglip-so400m-14-224", 448, 0xa74e5e247da220dd),
        ("siglip-so400m-14-448", 448, 0x81c36bbc646d3ccd),
        ("siglip-so400m-14-896", 448, 0x1d6385211565acb5),
        // Learned from the UViM builders when they landed.
        ("uvim-vqvae-depth", 308, 0x829c164839f89f79),
        ("uvim-vtt-l16-depth", 827, 0x8f476d71ea3ffab9),
        ("vit-b16", 199, 0x9adb57de053ded1a),
        ("vit-b16-pm8", 202, 0x2c456a73735c6e87),
        ("vmoe-b16-dense", 200, 0x1856708fd4f49d4c),
        ("vmoe-b16-e8", 206, 0x5c4042ce7c58b4d1),
    ];
    let fnv = |b: &[u8]| b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &c| (h ^ c as u64).wrapping_mul(0x0000_0100_0000_01b3));
    let models = synth::list();
    assert_eq!(models.len(), pinned.len(), "a row was added or removed: pin it");
    for &(name, count, hash) in pinned {
        let m = synth::find(name).unwrap_or_else(|| panic!("{name} is no longer listed"));
        let mut lines: Vec<String> = m
            .tensors()
            .unwrap()
            .into_iter()
            .map(|s| {
                let init = if s.given.is_some() { synth::Init::Constant(0.0) } else { s.init };
                format!("{} {:?} {:?} {:?}", s.name, s.shape, s.dtype, init)
            })
            .collect();
        lines.sort();
        let text = lines.join("\n");
        assert!(lines.len() == count && fnv(text.as_bytes()) == hash, "{name}: the weight list changed:\n{text}");
    }
}
