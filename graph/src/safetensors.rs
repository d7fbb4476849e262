//! The safetensors header: the one parser the checkpoint index (models) and the weight
//! store (runtime) share, so both read and reject files the same way.

use crate::dtype::{DType, TensorType};

/// One tensor of a header: its type and its byte range within the whole file.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderEntry {
    pub name: String,
    pub ty: TensorType,
    pub start: usize,
    pub end: usize,
}

/// A weight named `base[i]` is layer `i` of the stacked tensor `base`: its slice along the first
/// axis. Scanned big_vision checkpoints stack every layer's parameter this way; naming a layer
/// lets a graph read it in place (no copy per run) from the same mapped bytes.
pub fn stacked_layer(name: &str) -> Option<(&str, usize)> {
    let open = name.strip_suffix(']')?.rfind('[')?;
    let i = name[open + 1..name.len() - 1].parse().ok()?;
    Some((&name[..open], i))
}

/// The type and byte range of layer `i` of a stacked tensor of type `ty` stored at
/// `start..end`, or `None` when `ty` has no layer `i`.
pub fn layer_range(ty: &TensorType, start: usize, end: usize, i: usize) -> Option<(TensorType, usize, usize)> {
    let (&layers, rest) = ty.shape.split_first()?;
    if i >= layers {
        return None;
    }
    let layer = TensorType::new(ty.dtype, rest);
    let at = start + i * layer.bytes();
    (at + layer.bytes() <= end).then(|| (layer.clone(), at, at + layer.bytes()))
}

/// The weight files of a checkpoint folder, sorted: `model*.safetensors`,
/// `pytorch_model*.safetensors` or `weights.safetensors` (other safetensors files beside them,
/// such as inputs or reference outputs, are not weights), and big_vision's `*.npz`.
pub fn weight_files(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (n.ends_with(".safetensors") && (n.starts_with("model") || n.starts_with("pytorch_model") || n == "weights.safetensors"))
                || n.ends_with(".npz")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Indexes one weight file held in memory: a `.npz` by its zip directory, anything else as
/// safetensors. Every tensor's range lies inside `bytes`.
pub fn index_file(path: &std::path::Path, bytes: &[u8]) -> Result<Vec<HeaderEntry>, String> {
    if path.extension().is_some_and(|e| e == "npz") {
        return crate::npz::parse_index(bytes);
    }
    let n = header_len(bytes, bytes.len() as u64)?;
    parse_header(&bytes[8..8 + n], bytes.len() as u64)
}

/// Maps a safetensors dtype name (`F32`, `BF16`, ...) to kiln's.
pub fn parse_dtype(d: &str) -> Option<DType> {
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

/// The header length stored in the first 8 bytes, checked against the file's length.
pub fn header_len(first8: &[u8], file_len: u64) -> Result<usize, String> {
    let b: [u8; 8] = first8.get(..8).and_then(|s| s.try_into().ok()).ok_or("shorter than the 8-byte header length")?;
    let n = u64::from_le_bytes(b);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(format!("header of {n} bytes in a file of {file_len} bytes (truncated, or not safetensors)"));
    }
    Ok(n as usize)
}

/// Parses the JSON header (the `header_len` bytes after the first 8) of a file of
/// `file_len` bytes; every tensor's range is checked to lie inside the file.
pub fn parse_header(json: &[u8], file_len: u64) -> Result<Vec<HeaderEntry>, String> {
    let header: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = header.as_object().ok_or("header is not a JSON object")?;
    let base = 8 + json.len() as u64;
    let mut out = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dt = info.get("dtype").and_then(|v| v.as_str()).unwrap_or("?");
        let dtype = parse_dtype(dt).ok_or_else(|| format!("tensor '{name}' has unsupported dtype {dt}"))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| format!("tensor '{name}' has no valid shape"))?;
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| format!("tensor '{name}' has no valid data_offsets"))?;
        let ty = TensorType::new(dtype, shape);
        if offs[1] - offs[0] != ty.bytes() as u64 {
            return Err(format!("tensor '{name}' {ty} needs {} bytes but has {}", ty.bytes(), offs[1] - offs[0]));
        }
        if base + offs[1] > file_len {
            return Err(format!("tensor '{name}' ends at byte {} but the file has {file_len} (truncated)", base + offs[1]));
        }
        out.push(HeaderEntry { name: name.clone(), ty, start: (base + offs[0]) as usize, end: (base + offs[1]) as usize });
    }
    Ok(out)
}

#[cfg(test)]
mod slice_name_tests {
    use super::stacked_layer;

    #[test]
    fn slice_names() {
        assert_eq!(
            stacked_layer("Transformer/encoderblock/MlpBlock_0/Dense_0/kernel[2]"),
            Some(("Transformer/encoderblock/MlpBlock_0/Dense_0/kernel", 2))
        );
        assert_eq!(stacked_layer("a/kernel"), None);
        assert_eq!(stacked_layer("a[x]"), None);
    }
}
