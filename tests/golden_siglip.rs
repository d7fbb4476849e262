//! Every backend of the build end to end against transformers' outputs: compile each SigLIP
//! fixture folder, load it in a session, run, compare (f32: relative error under 1e-4).

mod common;

use common::{rel_err, siglip_case, BACKENDS};
use kiln::{compile, io, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::sync::Arc;

fn run_case(case: &str, backend: &str) -> Vec<(String, f64)> {
    let dir = siglip_case(case);
    let inputs = io::read(&dir.join("inputs.safetensors")).expect("inputs");
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let px = &inputs.iter().find(|(n, _)| n == "pixel_values").expect("pixel_values").1;
    let profile = Profile { batch: px.ty.shape[0], image_hw: Some((px.ty.shape[2], px.ty.shape[3])), ..Profile::default() };
    let c = compile(&dir, &CompileOptions { profile, backend: backend.into(), trace: false })
        .unwrap_or_else(|e| panic!("{case}: {backend}: {e}"));
    let mut s = Session::new(c.program, Arc::new(WeightStore::open(&dir).expect("weights"))).expect("session");
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let outs = s.run("forward", &refs).expect("run");
    let mut errs = vec![];
    for (name, got) in &outs {
        let want = &reference.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{case}: no reference for {name}")).1;
        assert_eq!(got.ty.shape, want.ty.shape, "{case}/{name}");
        errs.push((name.clone(), rel_err(&got.to_f32(), &want.to_f32())));
    }
    errs
}

fn check(case: &str, outputs: usize) {
    for backend in BACKENDS {
        let errs = run_case(case, backend);
        assert_eq!(errs.len(), outputs, "{case}: {backend}: outputs {errs:?}");
        for (name, e) in errs {
            assert!(e < 1e-4, "{case}/{name}: {backend}: relative error {e:.3e}");
        }
    }
}

#[test]
fn vision_map() {
    check("vision_map", 2);
}

#[test]
fn vision_nohead() {
    check("vision_nohead", 1);
}

#[test]
fn vision_map_interp() {
    check("vision_map_interp", 2);
}

#[test]
fn siglip_full() {
    check("siglip_full", 2);
}

#[test]
fn paligemma_tower() {
    check("paligemma_tower", 1);
}

#[test]
fn vision_bf16_weights_upcast() {
    check("vision_bf16", 2);
}
