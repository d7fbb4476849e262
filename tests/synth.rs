//! Integration tests for `kiln synth` (src/synth.rs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kiln::synth::{self, SiglipSynthConfig, SynthError, SynthSpec, TensorSpec};
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

/// The config of the transformers-written fixture.
fn fixture_cfg() -> SiglipSynthConfig {
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    let c: Value = serde_json::from_str(&text).unwrap();
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    SiglipSynthConfig {
        hidden_size: u("hidden_size"),
        intermediate_size: u("intermediate_size"),
        num_hidden_layers: u("num_hidden_layers"),
        num_attention_heads: u("num_attention_heads"),
        patch_size: u("patch_size"),
        image_size: u("image_size"),
        num_channels: u("num_channels"),
        layer_norm_eps: c["layer_norm_eps"].as_f64().unwrap(),
        vision_use_head: c["vision_use_head"].as_bool().unwrap(),
    }
}

/// A tiny config with the fixture's shape synthesizes to exactly the tensor
/// names / shapes / dtypes and config.json that transformers wrote.
#[test]
fn tiny_matches_transformers_fixture() {
    let cfg = fixture_cfg();
    let dir = TempDir::new("tiny");
    let report = synth::synth_siglip(&cfg, &dir.0, 0, false).unwrap();

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
    let cfg = SiglipSynthConfig {
        hidden_size: 64,
        intermediate_size: 16400,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        patch_size: 4,
        image_size: 16,
        num_channels: 3,
        layer_norm_eps: 1e-6,
        vision_use_head: true,
    };
    let (a, b, c) = (TempDir::new("seed-a"), TempDir::new("seed-b"), TempDir::new("seed-c"));
    let ra = synth::synth_siglip(&cfg, &a.0, 7, false).unwrap();
    let rb = synth::synth_siglip(&cfg, &b.0, 7, false).unwrap();
    let rc = synth::synth_siglip(&cfg, &c.0, 8, false).unwrap();
    let fa = std::fs::read(&ra.weights_path).unwrap();
    assert_eq!(fa, std::fs::read(&rb.weights_path).unwrap(), "same seed must give identical files");
    let fc = std::fs::read(&rc.weights_path).unwrap();
    assert_eq!(fa.len(), fc.len());
    assert_ne!(fa, fc, "different seeds must give different values");

    let specs: BTreeMap<String, TensorSpec> = cfg.tensors().into_iter().map(|t| (t.name.clone(), t)).collect();
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
    let model = synth::list().iter().min_by_key(|m| m.num_params()).unwrap();
    let SynthSpec::Siglip(cfg) = &model.spec else { panic!("the smallest model is a SigLIP tower") };
    let dir = TempDir::new("smallest");
    let report = synth::synth(model.name, &dir.0, 0, false).unwrap();
    assert_eq!(report.name, model.name);

    let (data_start, header) = read_header(&report.weights_path);
    let table = tensor_table(&header);
    assert_eq!(table.len(), report.num_tensors);
    assert!(table.values().all(|(dtype, _)| dtype == "F32"));
    let (d, f, p) = (cfg.hidden_size as u64, cfg.intermediate_size as u64, cfg.patch_size as u64);
    let n = (cfg.image_size as u64 / p).pow(2);
    let shape = |k: &str| table.get(k).unwrap_or_else(|| panic!("missing {k}")).1.clone();
    assert_eq!(shape("embeddings.patch_embedding.weight"), [d, 3, p, p]);
    assert_eq!(shape("embeddings.patch_embedding.bias"), [d]);
    assert_eq!(shape("embeddings.position_embedding.weight"), [n, d]);
    assert_eq!(shape("head.probe"), [1, 1, d]);
    assert_eq!(shape("head.attention.in_proj_weight"), [3 * d, d]);
    assert_eq!(shape("head.attention.in_proj_bias"), [3 * d]);
    assert_eq!(shape("head.mlp.fc1.weight"), [f, d]);
    assert_eq!(shape("post_layernorm.weight"), [d]);
    for i in 0..cfg.num_hidden_layers {
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
    assert_eq!(table.len(), 16 * cfg.num_hidden_layers + 3 + 2 + 11);

    // Offsets are contiguous in name order and cover the file.
    let mut end = 0;
    for k in table.keys() {
        let off = &header[k]["data_offsets"];
        assert_eq!(off[0].as_u64().unwrap(), end, "{k}");
        end = off[1].as_u64().unwrap();
    }
    assert_eq!(data_start + end, std::fs::metadata(&report.weights_path).unwrap().len());

    // Values are the documented ones for seed 0.
    let spec = model.tensors().into_iter().find(|t| t.name == "encoder.layers.11.mlp.fc2.weight").unwrap();
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
    let err = synth::synth_siglip(&fixture_cfg(), &out, 0, false).unwrap_err();
    assert!(matches!(err, SynthError::Io { .. }));
    assert!(err.to_string().contains("not-a-dir"), "{err}");

    let mut bad = fixture_cfg();
    bad.num_attention_heads = 5;
    assert!(matches!(synth::synth_siglip(&bad, &dir.0, 0, false), Err(SynthError::InvalidConfig(_))));
}
