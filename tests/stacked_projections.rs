//! Sibling projections stacked into one GEMM (the `stack_projections` pass, issues 15 and 16):
//! the weight store's stacked weights, the SigLIP fixture's Q/K/V as one GEMM step per block on
//! the cpu and cuda lowerings (the cuda programs compiled with NVRTC, no GPU), and a big_vision
//! ViT at a batch whose blocks align, run on every backend against the interpreter on the
//! unrewritten graph.

mod common;

use common::{rel_err, siglip_case, BACKENDS};
use kiln::{compile, io, CompileOptions};
use kiln_graph::interp::{self, Value};
use kiln_graph::program::{Program, Slot};
use kiln_graph::{DType, Op, TensorType};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

/// The weight name each matmul step of `entry` reads as its right operand.
fn gemm_weights(p: &Program, entry: &str) -> Vec<String> {
    let e = p.entries.iter().find(|e| e.name == entry).expect("entry");
    e.steps
        .iter()
        .filter(|s| matches!(s.op, Op::MatMul { .. }))
        .filter_map(|s| match s.inputs.get(1).map(|o| o.slot) {
            Some(Slot::Weight(i)) => Some(p.weights[i as usize].name.clone()),
            _ => None,
        })
        .collect()
}

/// Per layer of a SigLIP program: the GEMM steps reading that layer's attention projections.
fn qkv_gemms(p: &Program, layers: usize) -> Vec<Vec<String>> {
    let names = gemm_weights(p, "forward");
    (0..layers)
        .map(|l| {
            let me = format!("layers.{l}.self_attn.");
            names.iter().filter(|n| ["q_proj", "k_proj", "v_proj"].iter().any(|x| n.contains(&format!("{me}{x}")))).cloned().collect()
        })
        .collect()
}

#[test]
fn stacked_weights_load_once_and_bad_stacks_are_clear_errors() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("stacked_projections_store");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let a = Tensor::from_f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let b = Tensor::from_f32(&[2, 3], &[7., 8., 9., 10., 11., 12.]);
    let t = Tensor::from_f32(&[3, 2], &[0.; 6]);
    // bf16 bits of 1.5, -2, 0.25, 3, 0, 1e30 (rounded): exact in f32.
    let hv: [u16; 6] = [0x3fc0, 0xc000, 0x3e80, 0x4040, 0x0000, 0x7149];
    let h = Tensor { ty: TensorType::new(DType::BF16, [2, 3]), bytes: hv.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let i = Tensor::zeros(TensorType::new(DType::I32, [2, 3]));
    // A wide part: two slices of [2, 3] (decode's Q beside K and V), and one of no whole count.
    let w = Tensor::from_f32(&[4, 3], &(20..32).map(|v| v as f32).collect::<Vec<_>>());
    let odd = Tensor::from_f32(&[3, 3], &[0.; 9]);
    let ts: Vec<(String, Tensor)> =
        [("a", a), ("b", b), ("t", t), ("h", h), ("i", i), ("w", w), ("odd", odd)].into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    io::write(&path, &ts).unwrap();
    let store = WeightStore::open(&path).unwrap();
    let want = TensorType::new(DType::F32, [2, 2, 3]);
    let (ty, bytes) = store.get("~stack(b|a)", &want).unwrap();
    assert_eq!(ty, want);
    let got: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(got, [7., 8., 9., 10., 11., 12., 1., 2., 3., 4., 5., 6.]);
    // Materialised once: the same bytes on the second ask.
    assert_eq!(store.get("~stack(b|a)", &want).unwrap().1.as_ptr(), bytes.as_ptr());
    let err = |name: &str, want: &TensorType| store.get(name, want).unwrap_err().to_string();
    // The wide part fills the first two slices, its bytes as stored, then `a`.
    let want3 = TensorType::new(DType::F32, [3, 2, 3]);
    let (ty, bytes) = store.get("~stack(w|a)", &want3).unwrap();
    assert_eq!(ty, want3);
    let got: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let mut expect: Vec<f32> = (20..32).map(|v| v as f32).collect();
    expect.extend([1., 2., 3., 4., 5., 6.]);
    assert_eq!(got, expect);
    let e = err("~stack(w|a)", &TensorType::new(DType::F32, [4, 2, 3]));
    assert!(e.contains("3 slices"), "{e}");
    let e = err("~stack(odd|a)", &want3);
    assert!(e.contains("odd") && e.contains("f32[3,3]"), "{e}");
    let e = err("~stack(a|t)", &want);
    assert!(e.contains("f32[3,2]") && e.contains("[2, 3]"), "{e}");
    // Floats of different dtypes stack in f32, each part exactly as stored.
    let (ty, bytes) = store.get("~stack(a|h)", &want).unwrap();
    assert_eq!(ty, want);
    let got: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let widened: Vec<f32> = hv.iter().map(|&v| f32::from_bits((v as u32) << 16)).collect();
    assert_eq!(got[..6], [1., 2., 3., 4., 5., 6.]);
    assert_eq!(got[6..], widened[..]);
    let e = err("~stack(a|i)", &want);
    assert!(e.contains("must be all floats"), "{e}");
    let e = err("~stack(a|nope)", &want);
    assert!(e.contains("nope") && e.contains("not found"), "{e}");
    let e = err("~stack(a|b)", &TensorType::new(DType::F32, [3, 2, 3]));
    assert!(e.contains("stacks 2 weights"), "{e}");
}

/// The SigLIP fixture (hidden 48, 16 patches: each projection's block is 3072 bytes in f32,
/// 1536 in bf16, whole arena blocks) has one Q/K/V GEMM per block on cpu and cuda.
#[test]
fn siglip_qkv_is_one_gemm_per_block() {
    let dir = siglip_case("vision_map");
    let mut runs = vec![("cpu", DType::F32)];
    if cfg!(feature = "cuda") {
        runs.extend([("cuda", DType::BF16), ("cuda", DType::F32)]);
    }
    for (backend, dtype) in runs {
        let profile = Profile { batch: 1, dtype, ..Profile::default() };
        let c = compile(&dir, &CompileOptions { profile, backend: backend.into(), trace: false }).unwrap();
        for (l, gemms) in qkv_gemms(&c.program, 3).iter().enumerate() {
            assert_eq!(gemms.len(), 1, "{backend} {dtype} layer {l}: {gemms:?}");
            let want = format!(
                "~stack(encoder.layers.{l}.self_attn.q_proj.weight|encoder.layers.{l}.self_attn.k_proj.weight|encoder.layers.{l}.self_attn.v_proj.weight)"
            );
            assert_eq!(gemms[0], want);
        }
        let launches = kiln::launches::count(&c.program).unwrap();
        eprintln!("{backend} {dtype}: {} steps, {} launches", launches[0].steps, launches[0].launches);
        compiles_with_nvrtc(&c.program);
    }
}

#[cfg(feature = "cuda")]
fn compiles_with_nvrtc(p: &Program) {
    if p.backend != "cuda" {
        return;
    }
    if !kiln_kernels::cuda::nvrtc::available() {
        assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "KILN_REQUIRE_NVRTC=1 but NVRTC is missing");
        return;
    }
    let bins = kiln_runtime::cuda::compile_binaries(p, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
    assert!(!bins.is_empty());
}

#[cfg(not(feature = "cuda"))]
fn compiles_with_nvrtc(_: &Program) {}

/// big_vision's ViT (non-transposed `[D, N]` kernels read through views) at batch 4: 36 tokens
/// of 48 f32 columns, 6912 bytes per projection, so Q/K/V stack; every backend against the
/// interpreter on the graph as built (no pass).
#[test]
fn vit_stacked_at_an_aligned_batch_matches_the_interpreter() {
    let dir = common::big_vision_case("vit_map_learn");
    let (n, hw) = (4, 24);
    let data: Vec<f32> = (0..n * hw * hw * 3).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let images = Tensor::from_f32(&[n, hw, hw, 3], &data);
    let profile = Profile { batch: n, image_hw: Some((hw, hw)), ..Profile::default() };
    let store = Arc::new(WeightStore::open(&dir).expect("weights"));
    let built = kiln_models::build(&dir, &profile).unwrap();
    let graph = built.graph("forward").unwrap();
    let mut weights = HashMap::new();
    for (_, name, ty) in graph.weights() {
        let (wt, bytes) = store.get(name, ty).unwrap();
        weights.insert(name.to_string(), Value::new(wt.clone(), kiln_runtime::tensor::to_f64(wt.dtype, bytes)).unwrap());
    }
    let inputs = HashMap::from([("images".to_string(), Value::new(images.ty.clone(), images.to_f64()).unwrap())]);
    let want = interp::run(graph, &inputs, &weights).unwrap();
    for &backend in BACKENDS {
        let c = compile(&dir, &CompileOptions { profile: profile.clone(), backend: backend.into(), trace: false }).unwrap();
        let stacks = gemm_weights(&c.program, "forward").into_iter().filter(|w| w.contains("~stack(")).count();
        assert!(stacks >= 3, "{backend}: {stacks} stacked GEMMs (3 blocks)");
        let mut s = Session::new(c.program, store.clone()).unwrap();
        let outs = s.run("forward", &[("images", &images)]).unwrap();
        assert_eq!(outs.len(), want.len());
        for (name, got) in &outs {
            let e = rel_err(&got.to_f32(), &want[name].to_f32());
            eprintln!("{backend}: {name} relative error {e:.3e}");
            assert!(e < 1e-4, "{backend}: {name}: relative error {e:.3e}");
        }
    }
}
