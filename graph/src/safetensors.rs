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

/// The marker of a stacked weight's name: `p/~stack(a|b|c)` is the tensors named `p/a`, `p/b`
/// and `p/c` (each any weight name, views included) stacked along a new leading axis,
/// materialised once at load. The `stack_projections` pass makes these names for one GEMM over
/// sibling projections, keeping the parts' common prefix up to a `/` in front (so an ensemble
/// member's weights keep its `m0/` prefix). No checkpoint name holds `~stack(` or `|`, so the
/// form cannot collide with one. A part may fill several consecutive slices ([`stack_slots`]):
/// Q's `[2n, k]` weight beside K's and V's `[n, k]` is a `[4, n, k]` stack, the parts' bytes
/// joined in order.
pub const STACK_MARK: &str = "~stack(";

/// How many slices of a stack whose slice shape is `slice` (its shape without the leading axis)
/// a part stored in shape `part` fills: 1 when it has the slice's shape, `m` when it is `m`
/// slices joined along their first axis (`[m * slice[0], slice[1..]]`), `None` otherwise.
pub fn stack_slots(part: &[usize], slice: &[usize]) -> Option<usize> {
    if part == slice {
        return Some(1);
    }
    let (&p0, prest) = part.split_first()?;
    let (&s0, srest) = slice.split_first()?;
    (prest == srest && s0 > 0 && p0 > 0 && p0 % s0 == 0).then_some(p0 / s0)
}

/// The name of the stack of the weights `names` (see [`STACK_MARK`]).
pub fn stack_name(names: &[&str]) -> String {
    let first = names.first().copied().unwrap_or("");
    let mut common = first.len();
    for n in names {
        common = common.min(first.bytes().zip(n.bytes()).take_while(|(a, b)| a == b).count());
    }
    let prefix = first.get(..common).and_then(|c| c.rfind('/')).map_or("", |i| &first[..=i]);
    let rests: Vec<&str> = names.iter().map(|n| &n[prefix.len()..]).collect();
    format!("{prefix}{STACK_MARK}{})", rests.join("|"))
}

/// The full names of the weights a stacked weight's name stacks, in order, or `None` for any
/// other name.
pub fn stack_parts(name: &str) -> Option<Vec<String>> {
    let at = name.find(STACK_MARK)?;
    let (prefix, inner) = (&name[..at], name[at + STACK_MARK.len()..].strip_suffix(')')?);
    let parts: Vec<String> = inner.split('|').map(|p| format!("{prefix}{p}")).collect();
    (parts.len() >= 2 && inner.split('|').all(|p| !p.is_empty())).then_some(parts)
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

/// A weight name read as a view of a stored tensor: `base`, then `[i]` slices along leading
/// axes (`w[3][0]`: layer 3, then its first half), then optionally `~T(p0,p1,..)` (the slice's
/// axes permuted, then read in whatever shape of as many elements the program asks for) or
/// `~reshape` (read in such a shape, no copy). How one builder reads checkpoints whose layouts
/// differ (big_vision's `q_einsum [N, D, hd]` as transformers' `q_proj [N*hd, D]`): the
/// checkpoint index answers for the view, and the weight store materialises a permuted view once
/// at load.
#[derive(Clone, Debug, PartialEq)]
pub struct View<'a> {
    pub base: &'a str,
    pub index: Vec<usize>,
    pub perm: Option<Vec<usize>>,
    /// The program may read the view in another shape of the same size.
    pub any_shape: bool,
    /// `~bf16`: f32 values rounded to bfloat16 (to nearest even) and kept in f32, once at load
    /// (a Flax `Dense(dtype=bfloat16)` kernel).
    pub bf16: bool,
    /// `~T(..)[i][j]`: slices of the permuted tensor along its leading axes (`w~T(1,0,2)[3]` is
    /// `w[:, 3]`: layer 3 of an array stacked on axis 1, as Flax's `nn.scan` with
    /// `variable_axes={"params": 1}` stores it).
    pub post_index: Vec<usize>,
}

/// Parses a weight name as a [`View`] (a plain name is a view with no slice).
pub fn parse_view(name: &str) -> View<'_> {
    if let Some(b) = name.strip_suffix("~bf16") {
        return View { bf16: true, ..parse_view(b) };
    }
    // `base~T(..)[i]..`: slices after the permutation.
    let (mut head, mut post) = (name, Vec::new());
    while let Some((b, i)) = stacked_layer(head) {
        post.insert(0, i);
        head = b;
    }
    if !post.is_empty() && head.ends_with(')') && head.contains("~T(") {
        let v = parse_view(head);
        if v.perm.is_some() {
            return View { post_index: post, ..v };
        }
    }
    let (mut base, perm, any_shape) = match name.rsplit_once('~') {
        Some((b, "reshape")) => (b, None, true),
        Some((b, t)) => match t.strip_prefix("T(").and_then(|t| t.strip_suffix(')')) {
            Some(p) => match p.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>() {
                Ok(perm) => (b, Some(perm), true),
                Err(_) => (name, None, false),
            },
            None => (name, None, false),
        },
        None => (name, None, false),
    };
    let mut index = vec![];
    while let Some((b, i)) = stacked_layer(base) {
        index.insert(0, i);
        base = b;
    }
    View { base, index, perm, any_shape, bf16: false, post_index: vec![] }
}

/// The type and byte range of `view`'s slices of a tensor of type `ty` stored at `start..end`
/// (before any permutation), or `None` when `ty` has no such slice.
pub fn view_range(ty: &TensorType, start: usize, end: usize, view: &View) -> Option<(TensorType, usize, usize)> {
    let mut at = (ty.clone(), start, end);
    for &i in &view.index {
        at = layer_range(&at.0, at.1, at.2, i)?;
    }
    Some(at)
}

/// The type of `view` of a tensor of type `ty`: its slices, then its permutation (`None`
/// when a slice or the permutation does not fit).
pub fn view_type(ty: &TensorType, view: &View) -> Option<TensorType> {
    let (t, _, _) = view_range(ty, 0, ty.bytes(), view)?;
    match &view.perm {
        None => Some(t),
        Some(p) => {
            let mut seen = vec![false; t.shape.len()];
            if p.len() != t.shape.len() || p.iter().any(|&a| a >= seen.len() || std::mem::replace(&mut seen[a], true)) {
                return None;
            }
            let shape: Vec<usize> = p.iter().map(|&a| t.shape[a]).collect();
            let k = view.post_index.len();
            if k > shape.len() || view.post_index.iter().zip(&shape).any(|(&i, &n)| i >= n) {
                return None;
            }
            Some(TensorType::new(t.dtype, shape[k..].to_vec()))
        }
    }
}

/// The bytes of a permuted view: `src` (the view's slices before the permutation, of shape
/// `shape`) permuted by `view.perm`, then sliced by `view.post_index`. Only the slice is
/// copied. The caller has checked the view with [`view_type`].
pub fn view_bytes(src: &[u8], elem: usize, shape: &[usize], view: &View) -> Vec<u8> {
    match &view.perm {
        Some(perm) => permuted_slice(src, elem, shape, perm, &view.post_index),
        None => src.to_vec(),
    }
}

/// Rounds little-endian f32 `bytes` in place to bfloat16 values (to nearest even).
pub fn round_bf16(bytes: &mut [u8]) {
    for c in bytes.chunks_exact_mut(4) {
        let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        c.copy_from_slice(&half::bf16::from_f32(x).to_f32().to_le_bytes());
    }
}

/// Row-major `bytes` of elements of `elem` bytes and shape `shape`, with output axis `i` being
/// input axis `perm[i]`.
pub fn permute_bytes(bytes: &[u8], elem: usize, shape: &[usize], perm: &[usize]) -> Vec<u8> {
    permuted_slice(bytes, elem, shape, perm, &[])
}

/// [`permute_bytes`], then the leading axes of the result fixed at `index` (only that slice is
/// produced).
fn permuted_slice(bytes: &[u8], elem: usize, shape: &[usize], perm: &[usize], index: &[usize]) -> Vec<u8> {
    let mut in_strides = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        in_strides[a] = in_strides[a + 1] * shape[a + 1];
    }
    let k = index.len();
    let out_shape: Vec<usize> = perm[k..].iter().map(|&a| shape[a]).collect();
    let strides: Vec<usize> = perm[k..].iter().map(|&a| in_strides[a]).collect();
    let n: usize = out_shape.iter().product();
    let mut out = vec![0u8; n * elem];
    let mut idx = vec![0usize; out_shape.len()];
    let mut src: usize = index.iter().zip(perm).map(|(&i, &a)| i * in_strides[a]).sum();
    for o in 0..n {
        out[o * elem..(o + 1) * elem].copy_from_slice(&bytes[src * elem..(src + 1) * elem]);
        // Odometer over the output's axes, moving `src` by each axis's input stride.
        for a in (0..idx.len()).rev() {
            idx[a] += 1;
            src += strides[a];
            if idx[a] < out_shape[a] {
                break;
            }
            src -= strides[a] * out_shape[a];
            idx[a] = 0;
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacked_names_keep_the_common_folder_and_parse_back() {
        let names = ["m0/enc/q/kernel", "m0/enc/k/kernel~T(1,0)", "m0/enc/v/kernel"];
        let s = stack_name(&names);
        assert_eq!(s, "m0/enc/~stack(q/kernel|k/kernel~T(1,0)|v/kernel)");
        assert_eq!(stack_parts(&s).unwrap(), names);
        assert_eq!(stack_name(&["a.q", "a.k"]), "~stack(a.q|a.k)");
        assert_eq!(stack_parts("~stack(a.q|a.k)").unwrap(), ["a.q", "a.k"]);
        for not in ["w", "~stack(a)", "~stack(a|)", "~stack(a|b", "p/q[3]~T(1,0)"] {
            assert_eq!(stack_parts(not), None, "{not}");
        }
    }
    use crate::DType;

    #[test]
    fn views_parse_and_type() {
        let v = parse_view("llm/kv[3][1]~T(0,2,1)");
        assert_eq!(
            v,
            View { base: "llm/kv", index: vec![3, 1], perm: Some(vec![0, 2, 1]), any_shape: true, bf16: false, post_index: vec![] }
        );
        assert_eq!(parse_view("a/b"), View { base: "a/b", index: vec![], perm: None, any_shape: false, bf16: false, post_index: vec![] });
        assert_eq!(
            parse_view("a/b[2]~bf16"),
            View { base: "a/b", index: vec![2], perm: None, any_shape: false, bf16: true, post_index: vec![] }
        );
        let mut b: Vec<u8> = [1.01f32, -3.0e-3, 7.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        round_bf16(&mut b);
        let got: Vec<f32> = b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, [1.0078125, half::bf16::from_f32(-3.0e-3).to_f32(), 7.0]);
        assert!(parse_view("a~reshape").any_shape);
        // Not a view suffix: the name is taken as it is.
        assert_eq!(parse_view("a~T(x)").base, "a~T(x)");
        let ty = TensorType::new(DType::F32, vec![4, 2, 3, 5, 6]);
        assert_eq!(view_type(&ty, &v), Some(TensorType::new(DType::F32, vec![3, 6, 5])));
        assert_eq!(view_type(&ty, &parse_view("w[4]")), None);
        assert_eq!(view_type(&ty, &parse_view("w[0]~T(0,0,1,2)")), None);
        // Slices: layer 3, then its second half, of a [4, 2, 3, 5, 6] f32 tensor at byte 100.
        let (t, a, b) = view_range(&ty, 100, 100 + ty.bytes(), &v).unwrap();
        assert_eq!((t.shape.as_slice(), a, b), (&[3, 5, 6][..], 100 + (3 * 2 + 1) * 90 * 4, 100 + (3 * 2 + 2) * 90 * 4));
    }

    /// `w~T(1,0,2)[i]` is `w[:, i]`: typed and copied as numpy slices it.
    #[test]
    fn slices_after_a_permutation_are_numpy_slices() {
        let v = parse_view("dec/w~T(1,0,2)[2]");
        assert_eq!((v.base, v.perm.as_deref(), v.post_index.as_slice()), ("dec/w", Some(&[1, 0, 2][..]), &[2][..]));
        let ty = TensorType::new(DType::F32, vec![2, 3, 4]);
        assert_eq!(view_type(&ty, &v), Some(TensorType::new(DType::F32, vec![2, 4])));
        assert_eq!(view_type(&ty, &parse_view("dec/w~T(1,0,2)[3]")), None);
        // x = arange(24).reshape(2, 3, 4); x[:, 2] = [[8, 9, 10, 11], [20, 21, 22, 23]].
        let x: Vec<u8> = (0..24u32).flat_map(|i| i.to_le_bytes()).collect();
        let got: Vec<u32> = view_bytes(&x, 4, &ty.shape, &v).chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, [8, 9, 10, 11, 20, 21, 22, 23]);
        // x.transpose(2, 0, 1)[1, 0] = x[0, :, 1] = [1, 5, 9].
        let got: Vec<u32> = view_bytes(&x, 4, &ty.shape, &parse_view("w~T(2,0,1)[1][0]"))
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, [1, 5, 9]);
    }

    #[test]
    fn permutes_like_numpy_transpose() {
        // x = arange(24).reshape(2, 3, 4); x.transpose(1, 2, 0)[i, j, k] = x[k, i, j].
        let x: Vec<u8> = (0..24u16).flat_map(|v| v.to_le_bytes()).collect();
        let y = permute_bytes(&x, 2, &[2, 3, 4], &[1, 2, 0]);
        let get = |b: &[u8], i: usize| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
        for i in 0..3 {
            for j in 0..4 {
                for k in 0..2 {
                    assert_eq!(get(&y, (i * 4 + j) * 2 + k), get(&x, (k * 3 + i) * 4 + j));
                }
            }
        }
        assert_eq!(permute_bytes(&x, 2, &[2, 3, 4], &[0, 1, 2]), x);
    }
}
