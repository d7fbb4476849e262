//! big_vision ViT and vmoe V-MoE against the official JAX code's outputs
//! (`tests/fixtures/big_vision`, copied by `scripts/copy_big_vision_fixtures.py`): every case
//! runs through the reference interpreter and through the cpu backend. Logits and
//! activations within 1e-4 relative; V-MoE dispatch masks identical, combine weights and
//! gates within 1e-5, drop counts per block and group as the official run reported.

mod common;

use common::{rel_err, tensor, BACKENDS};
use kiln::{compile, io, CompileOptions};
use kiln_graph::interp::{self, Value};
use kiln_models::{MoeOptions, MoeOutputs, Profile};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    common::big_vision_case(name)
}

/// Outputs by name, as f32.
type Outputs = HashMap<String, Vec<f32>>;

/// Runs a model folder on `images` through the interpreter and every backend of the build;
/// returns (who, outputs), the interpreter first and the cpu backend second.
fn run_both(dir: &Path, images: &Tensor, moe: MoeOptions) -> Vec<(&'static str, Outputs)> {
    let s = &images.ty.shape;
    let profile = Profile { batch: s[0], image_hw: Some((s[1], s[2])), moe, ..Profile::default() };
    let store = Arc::new(WeightStore::open(dir).expect("weights"));

    let built = kiln_models::build(dir, &profile).unwrap_or_else(|e| panic!("build: {e}"));
    let mut weights = HashMap::new();
    for (_, name, ty) in built.graph("forward").expect("forward").weights() {
        let (wt, bytes) = store.get(name, ty).unwrap_or_else(|e| panic!("{e}"));
        weights.insert(name.to_string(), Value::new(wt.clone(), kiln_runtime::tensor::to_f64(wt.dtype, bytes)).unwrap());
    }
    let inputs = HashMap::from([("images".to_string(), Value::new(images.ty.clone(), images.to_f64()).unwrap())]);
    let interp: Outputs = interp::run(built.graph("forward").expect("forward"), &inputs, &weights)
        .expect("interpreter")
        .into_iter()
        .map(|(n, v)| (n, v.to_f32()))
        .collect();

    let mut runs = vec![("interpreter", interp)];
    for &backend in BACKENDS {
        let c = compile(dir, &CompileOptions { profile: profile.clone(), backend: backend.into(), trace: false })
            .unwrap_or_else(|e| panic!("{backend}: compile: {e}"));
        let mut session = Session::new(c.program, store.clone()).expect("session");
        let outs = session.run("forward", &[("images", images)]).expect("run").into_iter().map(|(n, t)| (n, t.to_f32())).collect();
        runs.push((backend, outs));
    }
    runs
}

/// Checks `got[ours]` against `reference[theirs]` for both runs (relative error < `tol`).
fn close(runs: &[(&str, Outputs)], reference: &[(String, Tensor)], pairs: &[(&str, &str)], tol: f64) {
    for (ours, theirs) in pairs {
        let want = tensor(reference, theirs).to_f32();
        for (which, got) in runs {
            let g = got.get(*ours).unwrap_or_else(|| panic!("{which}: no output {ours}"));
            let e = rel_err(g, &want);
            eprintln!("{which}: {ours} relative error {e:.3e}");
            assert!(e < tol, "{which}: {ours} vs {theirs}: relative error {e:.3e}");
        }
    }
}

const VIT_OUTPUTS: [(&str, &str); 6] = [
    ("logits", "logits"),
    ("pre_logits", "pre_logits"),
    ("head_input", "pooled"),
    ("encoded", "encoded"),
    ("pre_logits_2d", "out/pre_logits_2d"),
    ("logits_2d", "out/logits_2d"),
];

#[test]
fn vit_map_learn_per_layer() {
    let dir = fixture("vit_map_learn");
    let r = io::read(&dir.join("reference.safetensors")).unwrap();
    let runs = run_both(&dir, tensor(&r, "images"), MoeOptions::default());
    close(&runs, &r, &VIT_OUTPUTS, 1e-4);
}

#[test]
fn vit_map_learn_scan_layout() {
    // The stacked layout reads each layer as a slice of one array; same outputs.
    let r = io::read(&fixture("vit_map_learn").join("reference.safetensors")).unwrap();
    let runs = run_both(&fixture("vit_map_learn_scan"), tensor(&r, "images"), MoeOptions::default());
    close(&runs, &r, &VIT_OUTPUTS, 1e-4);
    let per_layer = run_both(&fixture("vit_map_learn"), tensor(&r, "images"), MoeOptions::default());
    for name in ["logits", "encoded"] {
        let e = rel_err(&runs[1].1[name], &per_layer[1].1[name]);
        assert!(e < 1e-5, "scan vs per-layer {name}: {e:.3e}");
    }
}

#[test]
fn vit_tok_sincos2d_square_and_24x32() {
    let dir = fixture("vit_tok_sincos2d");
    for reference in ["reference.safetensors", "reference_24x32.safetensors"] {
        let r = io::read(&dir.join(reference)).unwrap();
        let runs = run_both(&dir, tensor(&r, "images"), MoeOptions::default());
        close(&runs, &r, &VIT_OUTPUTS, 1e-4);
    }
}

/// A V-MoE variant's folder: the shared params beside that variant's config.
fn vmoe_case(variant: &str) -> PathBuf {
    let src = fixture("vmoe");
    let dir = std::env::temp_dir().join(format!("kiln-vmoe-{variant}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("params.npz"), dir.join("params.npz")).unwrap();
    std::fs::copy(src.join(format!("config_{variant}.json")), dir.join("config.json")).unwrap();
    dir
}

fn check_vmoe(variant: &str) {
    let dir = vmoe_case(variant);
    let r = io::read(&fixture("vmoe").join(format!("reference_{variant}.safetensors"))).unwrap();
    let moe = MoeOptions { outputs: MoeOutputs::Debug, ..MoeOptions::default() };
    let runs = run_both(&dir, tensor(&r, "images"), moe);
    close(&runs, &r, &[("logits", "logits"), ("pre_logits", "inter/pre_logits"), ("encoded", "inter/encoded")], 1e-4);
    let drops: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("vmoe").join(format!("dropping_{variant}.json"))).unwrap()).unwrap();
    for block in ["encoderblock_1", "encoderblock_3", "encoderblock_5"] {
        let p = format!("moe/{block}");
        let dispatch = tensor(&r, &format!("{p}/dispatch_weights")).to_f32();
        let combine = tensor(&r, &format!("{p}/combine_weights")).to_f32();
        let gates = tensor(&r, &format!("{p}/gates_softmax")).to_f32();
        for (which, got) in &runs {
            assert_eq!(got[&format!("{p}/dispatch_weights")], dispatch, "{variant} {which}: {block} dispatch weights");
            let e = max_abs(&got[&format!("{p}/combine_weights")], &combine);
            assert!(e <= 1e-5, "{variant} {which}: {block} combine weights off by {e:.3e}");
            let e = max_abs(&got[&format!("{p}/gates_softmax")], &gates);
            assert!(e <= 1e-5, "{variant} {which}: {block} gates off by {e:.3e}");
            // Drop counts per group, from the per-assignment expert output.
            let expert = &got[&format!("{p}/expert")];
            let d = &drops["dropping"][block];
            let groups = d["groups"].as_u64().unwrap() as usize;
            let per_group = expert.len() / groups;
            for gi in 0..groups {
                let dropped = expert[gi * per_group..(gi + 1) * per_group].iter().filter(|&&x| x < 0.0).count();
                assert_eq!(
                    dropped as u64,
                    d["per_group_assignments_dropped"][gi].as_u64().unwrap(),
                    "{variant} {which}: {block} group {gi}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64))
}

#[test]
fn vmoe_k1_cap1_no_bpr_drops_tokens() {
    check_vmoe("k1_cap1.0_nobpr");
}

#[test]
fn vmoe_k2_cap075_bpr_drops_tokens() {
    check_vmoe("k2_cap0.75_bpr");
}

#[test]
fn vmoe_k2_cap4_drops_nothing() {
    check_vmoe("k2_cap4.0_nodrop");
}

/// The MAP fixture with a PatchMerger (no official code exists, so no official numbers):
/// after block 1 the 9 tokens become 3, the planner handles the changed token count, the cpu
/// backend agrees with the interpreter, and a zero scoring kernel makes every merged token
/// the plain mean of the normed tokens, so all merged tokens are equal.
#[test]
fn patch_merger_in_vit() {
    use kiln::npz_write::NpzWriter;
    let src = fixture("vit_map_learn");
    let dir = std::env::temp_dir().join(format!("kiln-pm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["model"]["patch_merger"] = serde_json::json!({"num_tokens": 3, "blocks_before": 1});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("params.npz"), dir.join("params.npz")).unwrap();
    let mut buf = Vec::new();
    let mut w = NpzWriter::new(std::io::Cursor::new(&mut buf));
    w.add_f32("Transformer/PatchMerger/LayerNorm/scale", &[48], &[1.0; 48]).unwrap();
    w.add_f32("Transformer/PatchMerger/LayerNorm/bias", &[48], &[0.0; 48]).unwrap();
    w.add_f32("Transformer/PatchMerger/kernel", &[48, 3], &[0.0; 48 * 3]).unwrap();
    w.finish().unwrap();
    std::fs::write(dir.join("merger.npz"), buf).unwrap();

    let r = io::read(&src.join("reference.safetensors")).unwrap();
    let runs = run_both(&dir, tensor(&r, "images"), MoeOptions::default());
    let interp = &runs[0].1;
    for (which, got) in &runs[1..] {
        for name in ["logits", "encoded", "head_input"] {
            let e = rel_err(&got[name], &interp[name]);
            assert!(e < 1e-5, "{name}: {which} vs interpreter {e:.3e}");
        }
    }
    let enc = &runs[1].1["encoded"];
    assert_eq!(enc.len(), 2 * 3 * 48, "encoded is [2, 3, 48]");
    for b in 0..2 {
        let t0 = &enc[b * 144..b * 144 + 48];
        for t in 1..3 {
            let e = rel_err(&enc[b * 144 + t * 48..b * 144 + (t + 1) * 48], t0);
            assert!(e < 1e-5, "image {b}: merged token {t} differs from token 0 by {e:.3e}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
