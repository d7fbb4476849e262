//! A checkpoint folder's tensor index: names, dtypes and shapes from safetensors headers.
//! Only headers are read here; the runtime maps the bytes.

use crate::error::{ModelError, Result};
use kiln_graph::{DType, TensorType};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where one tensor lives and what it is.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub file: PathBuf,
    pub ty: TensorType,
}

/// Every tensor of a folder's `*.safetensors` files.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Maps a safetensors dtype name to kiln's.
pub fn parse_st_dtype(d: &str) -> Option<DType> {
    Some(match d {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "U8" => DType::U8,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

/// Reads the header of one safetensors file (name -> type), without its data.
pub fn read_header(path: &Path) -> Result<Vec<(String, TensorType)>> {
    use std::io::Read;
    let io = |source| ModelError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| ModelError::Safetensors { path: path.into(), msg: "shorter than the 8-byte header length".into() })?;
    let n = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(io)?.len();
    if n > 100_000_000 || 8 + n > file_len {
        return Err(ModelError::Safetensors {
            path: path.into(),
            msg: format!("header of {n} bytes in a file of {file_len} bytes (truncated?)"),
        });
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(io)?;
    let bad = |msg: String| ModelError::Safetensors { path: path.into(), msg };
    let header: serde_json::Value = serde_json::from_slice(&head).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = file_len - 8 - n;
    let mut out = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dt = info.get("dtype").and_then(|v| v.as_str()).unwrap_or("?");
        let dtype = parse_st_dtype(dt).ok_or_else(|| bad(format!("tensor '{name}' has unsupported dtype {dt}")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| bad(format!("tensor '{name}' has no valid shape")))?;
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad(format!("tensor '{name}' has no valid data_offsets")))?;
        let ty = TensorType::new(dtype, shape);
        if offs[1] - offs[0] != ty.bytes() as u64 {
            return Err(bad(format!("tensor '{name}' {ty} needs {} bytes but has {}", ty.bytes(), offs[1] - offs[0])));
        }
        if offs[1] > data_len {
            return Err(bad(format!("tensor '{name}' ends at byte {} of a {data_len}-byte data section (truncated)", offs[1])));
        }
        out.push((name.clone(), ty));
    }
    Ok(out)
}

impl Checkpoint {
    /// Indexes every `*.safetensors` file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let rd = std::fs::read_dir(dir).map_err(|source| ModelError::Io { path: dir.into(), source })?;
        let mut files: Vec<PathBuf> =
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect();
        files.sort();
        // Sidecar files that are not weights (kiln's own inputs/references live beside them in tests).
        files.retain(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("model") || n.starts_with("pytorch_model") || n == "weights.safetensors"
        });
        if files.is_empty() {
            return Err(ModelError::Unsupported(format!("{}: no model*.safetensors file in this folder", dir.display())));
        }
        let mut tensors = BTreeMap::new();
        for f in files {
            for (name, ty) in read_header(&f)? {
                tensors.insert(name, TensorInfo { file: f.clone(), ty });
            }
        }
        Ok(Checkpoint { dir: dir.into(), tensors })
    }

    /// The type of a tensor, checked against the expected shape (any float dtype accepted).
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let t = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
            dir: self.dir.clone(),
            name: name.into(),
            hint: format!("expected shape {shape:?}"),
        })?;
        if t.ty.shape != shape || !t.ty.dtype.is_float() {
            return Err(ModelError::TensorType {
                path: t.file.clone(),
                name: name.into(),
                expected: format!("a float tensor of shape {shape:?}"),
                found: t.ty.to_string(),
            });
        }
        Ok(t)
    }
}
