//! Helpers shared by the integration tests: reading safetensors into interpreter values and
//! comparing tensors by relative error.
#![allow(dead_code)]

pub mod gemma2_two_rows;

use kiln_graph::interp::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository's fixture folder for a SigLIP case.
pub fn siglip_case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip").join(name)
}

/// Reads every tensor of a safetensors file as an interpreter value.
pub fn read_values(path: &Path) -> HashMap<String, Value> {
    let tensors = kiln::io::read(path).unwrap_or_else(|e| panic!("{e}"));
    tensors.into_iter().map(|(name, t)| (name, Value::new(t.ty.clone(), t.to_f64()).unwrap())).collect()
}

/// max |a - b| / max(max |b|, 1e-6): the normalised error used by every golden check.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs())).max(1e-6);
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

/// The repository's fixture folder for a Gemma case.
pub fn gemma_case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma").join(name)
}

/// A Gemma fixture case's generation batch (its `generate_inputs.safetensors` for PaliGemma,
/// else `inputs.safetensors`): ids, mask, pixel values (PaliGemma), batch, prompt length.
pub fn gemma_batch(case: &str) -> (Vec<i64>, Vec<i64>, Option<kiln_runtime::Tensor>, usize, usize) {
    let dir = gemma_case(case);
    let pali = dir.join("generate_inputs.safetensors").exists();
    let file = if pali { "generate_inputs.safetensors" } else { "inputs.safetensors" };
    let ins = kiln::io::read(&dir.join(file)).expect("inputs");
    let get = |n: &str| ins.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone());
    let ids = get("input_ids").expect("input_ids");
    let to_i64 = |t: &kiln_runtime::Tensor| t.to_f64().iter().map(|&x| x as i64).collect::<Vec<_>>();
    let (b, l) = (ids.ty.shape[0], ids.ty.shape[1]);
    (to_i64(&ids), to_i64(&get("attention_mask").expect("mask")), get("pixel_values"), b, l)
}

/// The tensor `name` of a file's named tensors.
pub fn tensor<'a>(ts: &'a [(String, kiln_runtime::Tensor)], name: &str) -> &'a kiln_runtime::Tensor {
    &ts.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor {name}")).1
}

/// A big_vision fixture folder (`tests/fixtures/big_vision`, copied by
/// `scripts/copy_big_vision_fixtures.py`).
pub fn big_vision_case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big_vision").join(name)
}

/// The backends of this build that run on any machine (cube: wgpu, on lavapipe without a GPU).
pub const BACKENDS: &[&str] = &[
    "cpu",
    #[cfg(feature = "cube")]
    "cube",
];

/// A copy of the tiny Gemma 2 fixture (`gemma2_gqa`: windows of 6, soft-capping, GQA) whose
/// config allows `max_positions` positions, in a fresh folder under the temp dir named for
/// `tag` (the weights are linked, not copied). Its `generation_config.json` names an EOS id
/// no vocabulary holds, so generation always runs the tokens it is asked for.
pub fn long_gemma2(tag: &str, max_positions: usize) -> PathBuf {
    let src = gemma_case("gemma2_gqa");
    let dir = std::env::temp_dir().join(format!("kiln-long-gemma2-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = max_positions.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 100000, "pad_token_id": 0}"#).unwrap();
    std::fs::hard_link(src.join("model.safetensors"), dir.join("model.safetensors"))
        .or_else(|_| std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).map(|_| ()))
        .unwrap();
    dir
}

/// Whether NVRTC loads here (cuda tests compile kernels with it, no GPU). Without it a test
/// skips, unless `KILN_REQUIRE_NVRTC=1` (CI) makes that a failure naming how to install it.
#[cfg(feature = "cuda")]
pub fn nvrtc() -> bool {
    if kiln_kernels::cuda::nvrtc::available() {
        return true;
    }
    assert!(
        std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"),
        "KILN_REQUIRE_NVRTC=1: {}",
        kiln_kernels::cuda::nvrtc::INSTALL_HINT
    );
    false
}
