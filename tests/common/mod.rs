//! Helpers shared by the integration tests: reading safetensors into interpreter values and
//! comparing tensors by relative error.
#![allow(dead_code)]

use kiln_graph::interp::Value;
use kiln_graph::{DType, TensorType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository's fixture folder for a SigLIP case.
pub fn siglip_case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip").join(name)
}

/// Reads every tensor of a safetensors file as an interpreter value.
pub fn read_values(path: &Path) -> HashMap<String, Value> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let (dtype, data): (DType, Vec<f64>) = match view.dtype() {
            safetensors::Dtype::F32 => {
                (DType::F32, d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect())
            }
            safetensors::Dtype::BF16 => {
                (DType::BF16, d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect())
            }
            safetensors::Dtype::F16 => (DType::F16, d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect()),
            safetensors::Dtype::I64 => (DType::I64, d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()),
            other => panic!("{}: dtype {other:?} not handled by the test reader", path.display()),
        };
        out.insert(name.to_string(), Value::new(TensorType::new(dtype, view.shape()), data).unwrap());
    }
    out
}

/// max |a - b| / max(max |b|, 1e-6): the normalised error used by every golden check.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs())).max(1e-6);
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}
