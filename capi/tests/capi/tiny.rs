//! The tiny model shipped in `capi/examples/tiny/`: how it is made, and a check that the
//! committed files are what this code makes (`KILN_BLESS=1` rewrites them).
//!
//! Two inputs (`x` f32[2,8], `bias` f32[2,4]) and two outputs:
//! `hidden = gelu_tanh(layer_norm(x) @ fc1^T + b1)` (f32[2,16]) and
//! `probs = softmax(hidden @ fc2^T + b2 + bias)` (f32[2,4]).

use kiln_graph::passes::Pipeline;
use kiln_graph::program::Program;
use kiln_graph::{DType, Graph, TensorType, UnaryOp};
use std::path::{Path, PathBuf};

/// The folder holding the shipped files.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny")
}

/// The tiny model's files, as bytes.
pub struct Tiny {
    pub program: Program,
    pub weights: Vec<(String, TensorType, Vec<u8>)>,
    /// (name, raw little-endian bytes) in the entry's declared order.
    pub inputs: Vec<(String, Vec<u8>)>,
}

/// Values exactly representable in f32 in [-scale, scale), from splitmix64.
fn values(seed: u64, n: usize, scale: f32) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .flat_map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u32 << 24) as f32;
            ((u * 2.0 - 1.0) * scale).to_le_bytes()
        })
        .collect()
}

/// Builds, optimizes and lowers the tiny model for the cpu backend.
pub fn build() -> Tiny {
    let (b, d, h, c) = (2, 8, 16, 4);
    let shapes: [(&str, Vec<usize>, f32); 6] = [
        ("ln.weight", vec![d], 1.0),
        ("ln.bias", vec![d], 0.25),
        ("fc1.weight", vec![h, d], 0.5),
        ("fc1.bias", vec![h], 0.25),
        ("fc2.weight", vec![c, h], 0.5),
        ("fc2.bias", vec![c], 0.25),
    ];
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[b, d]).expect("x");
    let bias = g.input("bias", DType::F32, &[b, c]).expect("bias");
    let w: Vec<_> = shapes.iter().map(|(n, s, _)| g.weight(n, DType::F32, s).expect("weight")).collect();
    let t = g.layer_norm(x, w[0], w[1], 1e-6).expect("layer_norm");
    let t = g.matmul(t, w[2], true).expect("fc1");
    let t = g.add(t, w[3]).expect("fc1 bias");
    let hidden = g.unary(UnaryOp::GeluTanh, t).expect("gelu");
    let t = g.matmul(hidden, w[4], true).expect("fc2");
    let t = g.add(t, w[5]).expect("fc2 bias");
    let t = g.add(t, bias).expect("bias");
    let probs = g.softmax(t, 1).expect("softmax");
    g.output("hidden", hidden);
    g.output("probs", probs);

    let g = Pipeline::standard().run(&g, None).expect("passes");
    let backend = kiln_runtime::by_name("cpu").expect("cpu backend");
    let namer = |op: &kiln_graph::Op, ins: &[TensorType], out: &TensorType| backend.kernel_for(op, ins, out).expect("a cpu kernel");
    let mut program = Program {
        model: "tiny: layer norm, two linear layers, tanh GELU, softmax (kiln-capi example)".into(),
        backend: "cpu".into(),
        source: String::new(),
        weights: vec![],
        constants: vec![],
        entries: vec![],
        states: vec![],
        binaries: vec![],
        weight_sets: vec![],
        tuning: vec![],
    };
    let (entry, _, _) = kiln_graph::lower::compile_entry(&g, "forward", &mut program, &namer).expect("lower");
    program.entries.push(entry);

    let weights = shapes
        .iter()
        .enumerate()
        .map(|(i, (n, s, scale))| {
            let ty = TensorType::new(DType::F32, s.clone());
            let bytes = values(100 + i as u64, ty.numel(), *scale);
            (n.to_string(), ty, bytes)
        })
        .collect();
    let inputs = vec![("x".to_string(), values(1, b * d, 2.0)), ("bias".to_string(), values(2, b * c, 1.0))];
    Tiny { program, weights, inputs }
}

/// A safetensors file of f32 tensors (header sorted by name, padded to 8 bytes).
pub fn safetensors(tensors: &[(String, TensorType, Vec<u8>)]) -> Vec<u8> {
    let mut sorted: Vec<_> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let (mut fields, mut offset) = (Vec::new(), 0usize);
    for (name, ty, bytes) in &sorted {
        let dt = match ty.dtype {
            DType::F32 => "F32",
            DType::I32 => "I32",
            DType::I64 => "I64",
            other => panic!("the test writer has no {other:?}"),
        };
        let shape: Vec<String> = ty.shape.iter().map(|d| d.to_string()).collect();
        fields.push(format!(
            "\"{name}\":{{\"dtype\":\"{dt}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            shape.join(","),
            offset + bytes.len()
        ));
        offset += bytes.len();
    }
    let mut header = format!("{{{}}}", fields.join(","));
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for (_, _, bytes) in sorted {
        out.extend_from_slice(bytes);
    }
    out
}

/// The shipped files: (file name, bytes).
pub fn files(t: &Tiny) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("tiny.kiln".to_string(), kiln_graph::artifact::save(&t.program)),
        ("weights.safetensors".to_string(), safetensors(&t.weights)),
    ];
    files.extend(t.inputs.iter().map(|(n, b)| (format!("{n}.bin"), b.clone())));
    files
}

#[test]
fn shipped_tiny_model_is_current() {
    let t = build();
    let bless = std::env::var_os("KILN_BLESS").is_some();
    for (name, bytes) in files(&t) {
        let path = dir().join(&name);
        if bless {
            std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            continue;
        }
        let have = std::fs::read(&path).unwrap_or_default();
        assert!(
            have == bytes,
            "{} is stale (not what tests/capi/tiny.rs makes): regenerate with\n  KILN_BLESS=1 cargo test -p kiln-capi --test capi tiny\nand commit it",
            path.display()
        );
    }
}

#[test]
fn building_twice_gives_the_same_bytes() {
    assert_eq!(files(&build()), files(&build()));
}
