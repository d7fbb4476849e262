//! The Jet flow against big_vision's official code (`tests/fixtures/jet`, copied from the
//! shared fixtures; see its README): forward z and logdet on the interpreter and the cpu
//! backend, the inverse reconstruction, bits per dimension, forward(inverse(z)) == z on random
//! z, the frozen permutations against the schedule, and bad folders.

mod common;

use common::rel_err;
use kiln::{compile, CompileOptions};
use kiln_graph::interp::Value;
use kiln_models::jet::{Coupling, JetConfig, CHANNEL_MASKS, SPATIAL_MASKS};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jet")
}

/// The reference tensors (float32), and apart from them `derived_bits_per_dim` (float64, a
/// dtype kiln's tensors do not hold).
fn reference_all() -> (HashMap<String, Tensor>, Vec<f64>) {
    let bytes = std::fs::read(fixture().join("reference.safetensors")).expect("reference");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let (mut f32s, mut bpd) = (HashMap::new(), vec![]);
    for (name, v) in st.tensors() {
        if v.dtype() == safetensors::Dtype::F64 {
            bpd = v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
        } else {
            let ty = kiln_graph::TensorType::new(kiln_graph::DType::F32, v.shape());
            f32s.insert(name, Tensor { ty, bytes: v.data().to_vec() });
        }
    }
    (f32s, bpd)
}

fn reference() -> HashMap<String, Tensor> {
    reference_all().0
}

fn profile(batch: usize) -> Profile {
    Profile { batch, image_hw: Some((32, 32)), ..Profile::default() }
}

fn session(batch: usize) -> Session {
    session_on(batch, "cpu")
}

fn session_on(batch: usize, backend: &str) -> Session {
    let c = compile(&fixture(), &CompileOptions { profile: profile(batch), backend: backend.into(), trace: false })
        .unwrap_or_else(|e| panic!("{backend}: compile: {e}"));
    Session::new(c.program, Arc::new(WeightStore::open(&fixture()).expect("weights"))).expect("session")
}

fn out<'a>(outs: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &outs.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}")).1
}

/// z within 1e-4 relative error, logdet within 1e-3 absolute per image.
fn check_forward(z: &[f32], logdet: &[f32], what: &str) {
    let r = reference();
    let e = rel_err(z, &r["z"].to_f32());
    let worst = logdet.iter().zip(r["logdet"].to_f32()).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    eprintln!("{what}: z relative error {e:.3e}, logdet off by at most {worst:.3e}");
    assert!(e < 1e-4, "{what}: z relative error {e:.3e}");
    for (got, want) in logdet.iter().zip(r["logdet"].to_f32()) {
        assert!((got - want).abs() < 1e-3, "{what}: logdet {got} vs {want}");
    }
}

#[test]
fn forward_cpu_matches_big_vision() {
    let r = reference();
    let mut s = session(2);
    let outs = s.run("forward", &[("images", &r["images"])]).expect("run");
    check_forward(&out(&outs, "z").to_f32(), &out(&outs, "logdet").to_f32(), "cpu");
}

/// The forward entry on the cube backend (wgpu; lavapipe on the CPU machines).
#[cfg(feature = "cube")]
#[test]
fn forward_cube_matches_big_vision() {
    let r = reference();
    let mut s = session_on(2, "cube");
    let outs = s.run("forward", &[("images", &r["images"])]).expect("run");
    check_forward(&out(&outs, "z").to_f32(), &out(&outs, "logdet").to_f32(), "cube");
}

#[test]
fn forward_interpreter_matches_big_vision() {
    let r = reference();
    let built = kiln_models::build(&fixture(), &profile(2)).expect("build");
    let g = built.graph("forward").expect("forward entry");
    kiln_graph::verify::verify(g).expect("verify");
    let store = WeightStore::open(&fixture()).expect("weights");
    let weights: HashMap<String, Value> = g
        .weights()
        .map(|(_, name, ty)| {
            let (sty, bytes) = store.get(name, ty).expect("weight");
            (name.to_string(), Value::new(sty.clone(), kiln_runtime::tensor::to_f64(sty.dtype, bytes)).expect("value"))
        })
        .collect();
    let images = Value::new(r["images"].ty.clone(), r["images"].to_f64()).expect("images");
    let outs = kiln_graph::interp::run(g, &HashMap::from([("images".to_string(), images)]), &weights).expect("interpret");
    check_forward(&outs["z"].to_f32(), &outs["logdet"].to_f32(), "interpreter");
}

#[test]
fn inverse_reconstructs_the_images() {
    let r = reference();
    let mut s = session(2);
    let outs = s.run("inverse", &[("z", &r["z"])]).expect("run");
    let (x, want) = (out(&outs, "images").to_f32(), r["images"].to_f32());
    let err = x.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err < 1e-4, "reconstruction error {err:.3e}");
    for (got, want) in out(&outs, "logdet").to_f32().iter().zip(r["logdet_inverse"].to_f32()) {
        assert!((got - want).abs() < 1e-3, "inverse logdet {got} vs {want}");
    }
}

#[test]
fn bits_per_dim_as_the_trainer_computes_it() {
    let r = reference();
    let mut s = session(2);
    let outs = s.run("forward", &[("images", &r["images"])]).expect("run");
    let (z, logdet) = (out(&outs, "z").to_f32(), out(&outs, "logdet").to_f64());
    let want = reference_all().1;
    assert_eq!(want.len(), 2);
    let per = z.len() / 2;
    for (i, w) in want.iter().enumerate() {
        let got = kiln_models::jet::bits_per_dim(&z[i * per..(i + 1) * per], logdet[i]);
        assert!((got - w).abs() < 1e-5, "image {i}: {got} bits per dim, big_vision {w}");
    }
}

#[test]
fn one_artifact_holds_both_entries_sharing_weights() {
    let c = compile(&fixture(), &CompileOptions { profile: profile(1), backend: "cpu".into(), trace: false }).expect("compile");
    let names: Vec<&str> = c.program.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["forward", "inverse"]);
    let io_names = |e: &str, inputs: bool| -> Vec<String> {
        let e = c.program.entry(e).expect("entry");
        (if inputs { &e.inputs } else { &e.outputs }).iter().map(|io| io.name.clone()).collect()
    };
    assert_eq!((io_names("forward", true), io_names("forward", false)), (vec!["images".into()], vec!["z".into(), "logdet".into()]));
    assert_eq!((io_names("inverse", true), io_names("inverse", false)), (vec!["z".into()], vec!["images".into(), "logdet".into()]));
    // Each weight (a layer of a stacked npz array) appears once although both entries read it.
    let mut w: Vec<&str> = c.program.weights.iter().map(|w| w.name.as_str()).collect();
    let n = w.len();
    w.sort();
    w.dedup();
    assert_eq!(w.len(), n);
    assert!(w.contains(&"couplings/dnn/init_proj/kernel[3]"), "{w:?}");
    let bytes = kiln_graph::artifact::save(&c.program);
    assert_eq!(kiln_graph::artifact::load(&bytes, "memory").expect("load"), c.program);
}

#[test]
fn frozen_permutations_follow_the_schedule() {
    let cfg = JetConfig::from_file(&fixture().join("config.json")).expect("config");
    let store = WeightStore::open(&fixture()).expect("weights");
    let (n, d, nh) = (64, 48, 8);
    for (i, c) in cfg.schedule().iter().enumerate() {
        let (cm, sm) = (format!("{CHANNEL_MASKS}[{i}]"), format!("{SPATIAL_MASKS}[{i}]"));
        let read = |name: &str, k: usize| {
            let ty = kiln_graph::TensorType::new(kiln_graph::DType::F32, [k, k]);
            let (ty, b) = store.get(name, &ty).expect("mask");
            kiln_runtime::tensor::to_f64(ty.dtype, b)
        };
        let (ch, sp) = (read(&cm, d), read(&sm, n));
        match c {
            Coupling::Channels => {
                assert!(sp.iter().all(|&v| v == 0.0), "layer {i}: spatial placeholder not zero");
                for col in 0..d {
                    assert_eq!((0..d).filter(|&r| ch[r * d + col] == 1.0).count(), 1, "layer {i}: column {col}");
                }
            }
            Coupling::Spatial(p) => {
                assert!(ch.iter().all(|&v| v == 0.0), "layer {i}: channel placeholder not zero");
                let (a, b) = p.groups(nh, nh);
                for (col, &t) in a.iter().chain(&b).enumerate() {
                    assert_eq!(sp[t * n + col], 1.0, "layer {i} ({p:?}): token {t} -> {col}");
                }
                assert_eq!(sp.iter().sum::<f64>(), n as f64);
            }
        }
    }
}

/// A cpu session at batch 1, shared by the property test's cases.
fn shared() -> &'static Mutex<Session> {
    static S: OnceLock<Mutex<Session>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(session(1)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn forward_inverts_inverse(seed in any::<u64>(), temperature in 0.3f64..1.2) {
        let mut s = shared().lock().unwrap_or_else(|e| e.into_inner());
        let ty = kiln_graph::TensorType::new(kiln_graph::DType::F32, [1, 32, 32, 3]);
        let mut g = kiln::sample::Gaussian::new(seed);
        let z: Vec<f64> = (0..ty.numel()).map(|_| temperature * g.next_value()).collect();
        let z = Tensor { bytes: kiln_runtime::tensor::from_f64(ty.dtype, &z), ty };
        let inv = s.run("inverse", &[("z", &z)]).expect("inverse");
        let fwd = s.run("forward", &[("images", out(&inv, "images"))]).expect("forward");
        let e = rel_err(&out(&fwd, "z").to_f32(), &z.to_f32());
        prop_assert!(e < 1e-4, "forward(inverse(z)) relative error {e:.3e}");
        let (a, b) = (out(&inv, "logdet").to_f32()[0], out(&fwd, "logdet").to_f32()[0]);
        prop_assert!((a + b).abs() < 1e-3 * (1.0 + a.abs()), "logdets {a} and {b} do not cancel");
    }
}

/// A copy of the fixture folder with `config.json` replaced.
fn folder_with_config(tag: &str, model: serde_json::Value) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-jet-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(fixture().join("params.npz"), dir.join("params.npz")).expect("copy");
    std::fs::write(dir.join("config.json"), serde_json::json!({"model_name": "proj.jet.jet", "model": model}).to_string()).expect("write");
    dir
}

fn build_err(dir: &Path) -> String {
    let e = match kiln_models::build(dir, &profile(1)) {
        Ok(_) => panic!("{}: built, expected an error", dir.display()),
        Err(e) => e.to_string(),
    };
    let _ = std::fs::remove_dir_all(dir);
    e
}

#[test]
fn bad_kwargs_are_refused_by_name() {
    let mut kw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let kw = kw["model"].take();
    let mut unknown = kw.clone();
    unknown["num_layers"] = 3.into();
    let e = build_err(&folder_with_config("unknown", unknown));
    assert!(e.contains("model.num_layers") && e.contains("does not know"), "{e}");
    let mut kind = kw.clone();
    kind["kinds"] = serde_json::json!(["channels", "diagonal"]);
    let e = build_err(&folder_with_config("kind", kind));
    assert!(e.contains("model.kinds") && e.contains("diagonal"), "{e}");
    let mut proj = kw.clone();
    proj["spatial_coupling_projs"] = serde_json::json!(["zigzag"]);
    let e = build_err(&folder_with_config("proj", proj));
    assert!(e.contains("spatial_coupling_projs") && e.contains("zigzag"), "{e}");
    let mut depth = kw.clone();
    depth["depth"] = 6.into();
    let e = build_err(&folder_with_config("depth", depth));
    assert!(e.contains(CHANNEL_MASKS) && e.contains("[6, k, k]"), "{e}");
}

#[test]
fn a_missing_parameter_is_named() {
    let dir = std::env::temp_dir().join(format!("kiln-jet-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).expect("copy");
    let store = WeightStore::open(&fixture()).expect("weights");
    let mut arrays = Vec::new();
    let mut names: Vec<&String> = store.index.keys().collect();
    names.sort();
    for name in names.into_iter().filter(|n| !n.ends_with("encoder_norm/scale")) {
        let r = &store.index[name];
        let (ty, bytes) = store.get(name, &r.ty).expect("weight");
        arrays.push((name.clone(), ty.shape.clone(), kiln_runtime::tensor::to_f64(ty.dtype, bytes).iter().map(|&v| v as f32).collect()));
    }
    kiln::npz_write::write(&dir.join("params.npz"), &arrays).expect("npz");
    let e = build_err(&dir);
    assert!(e.contains("couplings/dnn/vit/encoder_norm/scale[0]") && e.contains("no tensor"), "{e}");
}

#[test]
fn a_synthesized_folder_builds_and_inverts() {
    // 20 couplings: more per-coupling logdets than a fused cpu region may read.
    let kwargs = kiln_models::jet::synth_kwargs(20, 1, 16, 2, 2, &["channels", "spatial"], &["hstripes-inv", "checkerboard"]);
    let recipe = kiln_models::jet::synth_recipe(kwargs, 8, 3, 5).expect("recipe");
    let dir = std::env::temp_dir().join(format!("kiln-jet-synth-{}", std::process::id()));
    let report = kiln::synth::synth_folder(&kiln_models::jet::FAMILY, &recipe, &dir, 5, false).expect("synth");
    assert_eq!(report.num_tensors, 2 + 3 + 16 + 2 + 2);
    let profile = Profile { batch: 2, ..Profile::default() };
    let c = compile(&dir, &CompileOptions { profile, backend: "cpu".into(), trace: false }).expect("compile");
    let mut s = Session::new(c.program, Arc::new(WeightStore::open(&dir).expect("weights"))).expect("session");
    let ty = kiln_graph::TensorType::new(kiln_graph::DType::F32, [2, 8, 8, 3]);
    let mut g = kiln::sample::Gaussian::new(9);
    let z: Vec<f64> = (0..ty.numel()).map(|_| g.next_value()).collect();
    let z = Tensor { bytes: kiln_runtime::tensor::from_f64(ty.dtype, &z), ty };
    let inv = s.run("inverse", &[("z", &z)]).expect("inverse");
    let fwd = s.run("forward", &[("images", out(&inv, "images"))]).expect("forward");
    let e = rel_err(&out(&fwd, "z").to_f32(), &z.to_f32());
    assert!(e < 1e-4, "forward(inverse(z)) relative error {e:.3e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The state after each of the first k couplings: big_vision ran the model at `depth = k` with
/// the parameters' first k layers, and so does this (a folder with the npz cut to k layers).
#[test]
fn every_coupling_prefix_matches_big_vision() {
    let r = reference();
    let store = WeightStore::open(&fixture()).expect("weights");
    let mut kw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    for k in 1..=3 {
        let dir = folder_with_config(&format!("prefix{k}"), {
            kw["model"]["depth"] = k.into();
            kw["model"].clone()
        });
        let mut arrays = Vec::new();
        let mut names: Vec<&String> = store.index.keys().collect();
        names.sort();
        for name in names {
            let wr = &store.index[name];
            let (ty, bytes) = store.get(name, &wr.ty).expect("weight");
            let per = ty.numel() / ty.shape[0];
            let vals: Vec<f32> = kiln_runtime::tensor::to_f64(ty.dtype, bytes)[..k * per].iter().map(|&v| v as f32).collect();
            let mut shape = ty.shape.clone();
            shape[0] = k;
            arrays.push((name.clone(), shape, vals));
        }
        kiln::npz_write::write(&dir.join("params.npz"), &arrays).expect("npz");
        let c = compile(&dir, &CompileOptions { profile: profile(2), backend: "cpu".into(), trace: false }).expect("compile");
        let mut s = Session::new(c.program, Arc::new(WeightStore::open(&dir).expect("weights"))).expect("session");
        let outs = s.run("forward", &[("images", &r["images"])]).expect("run");
        let e = rel_err(&out(&outs, "z").to_f32(), &r[&format!("z_after_coupling_{k}")].to_f32());
        assert!(e < 1e-4, "after {k} couplings: z relative error {e:.3e}");
        for (got, want) in out(&outs, "logdet").to_f32().iter().zip(r[&format!("logdet_after_coupling_{k}")].to_f32()) {
            assert!((got - want).abs() < 1e-3, "after {k} couplings: logdet {got} vs {want}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
