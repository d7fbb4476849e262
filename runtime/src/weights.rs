//! Weights: safetensors files mapped into memory once, looked up by name.

use crate::error::{Result, RuntimeError};
use kiln_graph::{DType, TensorType};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor's place in a mapped file.
#[derive(Clone, Debug)]
pub struct WeightRef {
    pub file: usize,
    pub ty: TensorType,
    /// Byte range within the file.
    pub start: usize,
    pub end: usize,
}

/// Memory-mapped safetensors files and their tensor index.
pub struct WeightStore {
    pub paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    pub index: HashMap<String, WeightRef>,
}

fn st_dtype(s: &str) -> Option<DType> {
    Some(match s {
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

impl WeightStore {
    /// Maps the weights at `path`: a `.safetensors` file, or a folder whose `model*.safetensors`
    /// files are all mapped.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| RuntimeError::Io { path: p, source }
        };
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io(path))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    n.ends_with(".safetensors") && (n.starts_with("model") || n.starts_with("pytorch_model") || n == "weights.safetensors")
                })
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        if files.is_empty() {
            return Err(RuntimeError::Weights { path: path.into(), msg: "no model*.safetensors file here".into() });
        }
        let mut store = WeightStore { paths: vec![], maps: vec![], index: HashMap::new() };
        for f in files {
            let file = std::fs::File::open(&f).map_err(io(&f))?;
            // SAFETY: the file is opened read-only and kiln never writes to it; a file changed
            // by another process while mapped is outside what any mmap user can guard against.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&f))?;
            let k = store.maps.len();
            for (name, r) in parse_header(&f, &map, k)? {
                store.index.insert(name, r);
            }
            store.paths.push(f);
            store.maps.push(map);
        }
        Ok(store)
    }

    /// A weight's bytes and type, checked against the shape the program expects.
    pub fn get(&self, name: &str, want: &TensorType) -> Result<(&TensorType, &[u8])> {
        let r = self.index.get(name).ok_or_else(|| RuntimeError::Weight {
            name: name.into(),
            msg: format!("not found in {} (expected {want})", self.describe()),
        })?;
        if r.ty.shape != want.shape {
            return Err(RuntimeError::Weight {
                name: name.into(),
                msg: format!("{} holds {}, the program expects shape {:?}", self.paths[r.file].display(), r.ty, want.shape),
            });
        }
        Ok((&r.ty, &self.maps[r.file][r.start..r.end]))
    }

    fn describe(&self) -> String {
        self.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

fn parse_header(path: &Path, map: &[u8], file: usize) -> Result<Vec<(String, WeightRef)>> {
    let bad = |msg: String| RuntimeError::Weights { path: path.into(), msg };
    if map.len() < 8 {
        return Err(bad(format!("{} bytes: too short for a safetensors file", map.len())));
    }
    let n = u64::from_le_bytes([map[0], map[1], map[2], map[3], map[4], map[5], map[6], map[7]]) as usize;
    if n > map.len() - 8 {
        return Err(bad(format!("header of {n} bytes in a {}-byte file (truncated or not safetensors)", map.len())));
    }
    let header: serde_json::Value = serde_json::from_slice(&map[8..8 + n]).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let base = 8 + n;
    let mut out = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dt = info.get("dtype").and_then(|v| v.as_str()).unwrap_or("?");
        let dtype = st_dtype(dt).ok_or_else(|| bad(format!("tensor '{name}': unsupported dtype {dt}")))?;
        let shape: Option<Vec<usize>> =
            info.get("shape").and_then(|v| v.as_array()).and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
        let offs: Option<Vec<usize>> =
            info.get("data_offsets").and_then(|v| v.as_array()).and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
        let (Some(shape), Some(offs)) = (shape, offs) else {
            return Err(bad(format!("tensor '{name}': malformed shape or data_offsets")));
        };
        let ty = TensorType::new(dtype, shape);
        if offs.len() != 2 || offs[0] > offs[1] || offs[1] - offs[0] != ty.bytes() {
            return Err(bad(format!("tensor '{name}' {ty}: data_offsets {offs:?} do not hold {} bytes", ty.bytes())));
        }
        if base + offs[1] > map.len() {
            return Err(bad(format!("tensor '{name}' ends at byte {} but the file has {} (truncated)", base + offs[1], map.len())));
        }
        out.push((name.clone(), WeightRef { file, ty, start: base + offs[0], end: base + offs[1] }));
    }
    Ok(out)
}

impl WeightStore {
    /// The whole mapped file `file`.
    pub fn map_bytes(&self, file: usize) -> &[u8] {
        &self.maps[file]
    }
}

impl WeightStore {
    /// A store with no files, for programs that read no weights.
    pub fn empty() -> Self {
        WeightStore { paths: vec![], maps: vec![], index: HashMap::new() }
    }
}
