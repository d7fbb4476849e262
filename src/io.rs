//! Reading and writing tensors as safetensors files (inputs and outputs of `kiln run`).

use crate::{Error, Result};
use kiln_graph::{DType, TensorType};
use kiln_runtime::Tensor;
use std::path::Path;

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I32 => safetensors::Dtype::I32,
        DType::I64 => safetensors::Dtype::I64,
        DType::U8 => safetensors::Dtype::U8,
        DType::Bool => safetensors::Dtype::BOOL,
    }
}

/// Reads every tensor of a safetensors file, in file order.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::File { path: path.into(), msg: e.to_string() })?;
    parse(&bytes, path)
}

/// Every tensor of a safetensors file held in memory (`path` names it in errors).
pub fn parse(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bad = |msg: String| Error::File { path: path.into(), msg };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    let mut out = Vec::new();
    for name in st.names() {
        let v = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        let dtype = kiln_graph::safetensors::parse_dtype(&format!("{:?}", v.dtype()))
            .ok_or_else(|| bad(format!("tensor '{name}' has unsupported dtype {:?}", v.dtype())))?;
        out.push((name.to_string(), Tensor { ty: TensorType::new(dtype, v.shape()), bytes: v.data().to_vec() }));
    }
    Ok(out)
}

/// Writes tensors to a safetensors file.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| {
            safetensors::tensor::TensorView::new(st_dtype(t.ty.dtype), t.ty.shape.clone(), &t.bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::File { path: path.into(), msg: format!("tensor '{n}': {e}") })
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::File { path: path.into(), msg: e.to_string() })
}
