//! The reference interpreter against transformers' outputs on the SigLIP fixtures: checks the
//! model builder and the oracle together, before any backend is involved.

mod common;

use common::{read_values, rel_err, siglip_case};
use kiln_models::Profile;

fn check(case: &str, hw: Option<(usize, usize)>) {
    let dir = siglip_case(case);
    let inputs = read_values(&dir.join("inputs.safetensors"));
    let reference = read_values(&dir.join("reference.safetensors"));
    let weights = read_values(&dir.join("model.safetensors"));
    let batch = inputs["pixel_values"].ty.shape[0];
    let built = kiln_models::build(&dir, &Profile { batch, image_hw: hw, ..Profile::default() }).expect("build");
    let graph = built.graph("forward").expect("forward entry");
    kiln_graph::verify::verify(graph).expect("verify");
    let out = kiln_graph::interp::run(graph, &inputs, &weights).expect("interpret");
    let mut checked = 0;
    for (name, want) in &reference {
        let Some(got) = out.get(name) else { continue };
        assert_eq!(got.ty.shape, want.ty.shape, "{case}/{name} shape");
        let e = rel_err(&got.to_f32(), &want.to_f32());
        assert!(e < 1e-4, "{case}/{name}: relative error {e:.3e}");
        checked += 1;
    }
    assert!(checked >= 1 && out.len() == checked, "{case}: checked {checked} of {} outputs", out.len());
}

#[test]
fn vision_map() {
    check("vision_map", None);
}

#[test]
fn vision_nohead() {
    check("vision_nohead", None);
}

#[test]
fn vision_map_interp() {
    check("vision_map_interp", Some((48, 48)));
}

#[test]
fn siglip_full() {
    check("siglip_full", None);
}

#[test]
fn paligemma_tower() {
    check("paligemma_tower", None);
}

#[test]
fn vision_bf16() {
    check("vision_bf16", None);
}
