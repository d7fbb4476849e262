//! What the CLI does to the inputs it is given before a run, shared with the Python package:
//! dtype and backend names, a text model's integer inputs and the defaults transformers'
//! forward fills in, float inputs cast to the entry's dtype.

use crate::{Error, Result};
use kiln_graph::DType;
use kiln_runtime::{Session, Tensor};
use std::path::Path;

/// `--dtype`: f32 or bf16.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::Usage(format!("--dtype {other}: expected f32 or bf16"))),
    }
}

/// An image size from `--resolution`: `N` (N x N) or `HxW`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub h: usize,
    pub w: usize,
}

/// Parses `--resolution`: `N` or `HxW`, each at least 1.
pub fn parse_resolution(s: &str) -> std::result::Result<Resolution, String> {
    let num = |t: &str| t.trim().parse::<usize>().ok().filter(|&v| v > 0);
    let hw = match s.split_once(['x', 'X']) {
        Some((h, w)) => num(h).zip(num(w)),
        None => num(s).map(|n| (n, n)),
    };
    hw.map(|(h, w)| Resolution { h, w })
        .ok_or_else(|| format!("'{s}': expected N (a square) or HxW, each at least 1 (e.g. 224 or 192x256)"))
}

/// The backend `--backend` and `--device` name together.
pub fn backend_for(backend: &str, device: Option<&str>) -> Result<String> {
    Ok(match (backend, device) {
        (b, None) => b.to_string(),
        ("cube", Some("wgpu")) => "cube".to_string(),
        ("cube", Some("cuda")) => "cube-cuda".to_string(),
        ("cube", Some(other)) => return Err(Error::Usage(format!("--device {other}: expected wgpu or cuda"))),
        (b, Some(_)) => return Err(Error::Usage(format!("--device applies to --backend cube, not {b}"))),
    })
}

/// For a text model's inputs: checks `input_ids [B, L]` (i64, or i32 converted), fills a
/// missing `attention_mask` with ones and missing `position_ids` with `0..L` (as transformers'
/// forward does) and gives `(B, L)`; `None` when there is no `input_ids`.
pub fn text_inputs(ins: &mut Vec<(String, Tensor)>, path: &Path) -> Result<Option<(usize, usize)>> {
    let Some(i) = ins.iter().position(|(n, _)| n == "input_ids") else { return Ok(None) };
    let bad = |msg: String| Error::File { path: path.into(), msg };
    for (name, t) in ins.iter_mut() {
        if matches!(name.as_str(), "input_ids" | "attention_mask" | "position_ids") {
            match t.ty.dtype {
                DType::I64 => {}
                DType::I32 | DType::U8 | DType::Bool => {
                    *t = Tensor::from_i64(&t.ty.shape.clone(), &t.to_f64().iter().map(|&x| x as i64).collect::<Vec<_>>())
                }
                other => return Err(bad(format!("'{name}' is {other}; expected an integer tensor"))),
            }
        }
    }
    let shape = ins[i].1.ty.shape.clone();
    let [b, l] = shape[..] else { return Err(bad(format!("input_ids is {}, expected [batch, length]", ins[i].1.ty))) };
    if b == 0 || l == 0 {
        return Err(bad(format!("input_ids is {}: empty", ins[i].1.ty)));
    }
    for name in ["attention_mask", "position_ids", "token_type_ids"] {
        match ins.iter().find(|(n, _)| n == name) {
            Some((_, t)) if t.ty.shape != shape => return Err(bad(format!("'{name}' is {}, input_ids is {}", t.ty, ins[i].1.ty))),
            Some(_) => {}
            None if name == "attention_mask" => ins.push((name.into(), Tensor::from_i64(&[b, l], &vec![1; b * l]))),
            None => {}
        }
    }
    Ok(Some((b, l)))
}

/// Fills what transformers' forward fills when not given: `position_ids` `0..L` (`1..=L` for
/// PaliGemma, the text model that takes `pixel_values`) and `token_type_ids` of ones (no
/// bidirectional prefix).
pub fn text_defaults(ins: &mut Vec<(String, Tensor)>, s: &Session) {
    crate::paligemma_bv::text_defaults(ins, s);
    let Some(e) = s.program().entry("forward") else { return };
    let Some((_, ids)) = ins.iter().find(|(n, _)| n == "input_ids") else { return };
    let (b, l) = (ids.ty.shape[0], ids.ty.shape.get(1).copied().unwrap_or(1));
    let has = |n: &str| e.inputs.iter().any(|io| io.name == n);
    let offset = if has("pixel_values") { 1 } else { 0 };
    if has("position_ids") && !ins.iter().any(|(n, _)| n == "position_ids") {
        ins.push(("position_ids".into(), Tensor::from_i64(&[b, l], &(0..b * l).map(|k| (k % l) as i64 + offset).collect::<Vec<_>>())));
    }
    if has("token_type_ids") && !ins.iter().any(|(n, _)| n == "token_type_ids") {
        ins.push(("token_type_ids".into(), Tensor::from_i64(&[b, l], &vec![1; b * l])));
    }
}

/// Float inputs given in another float dtype than the entry computes in (f32 pixels for a
/// bf16 profile) are converted, as a framework's `model.to(dtype)` expects its inputs to be.
pub fn cast_floats(ins: &mut [(String, Tensor)], s: &Session, entry: &str) {
    let Some(e) = s.program().entry(entry) else { return };
    for (name, t) in ins.iter_mut() {
        let Some(io) = e.inputs.iter().find(|io| io.name == *name) else { continue };
        let want = &io.operand.ty;
        if t.ty.shape == want.shape && t.ty.dtype != want.dtype && t.ty.dtype.is_float() && want.dtype.is_float() {
            *t = Tensor { bytes: kiln_runtime::tensor::convert(t.ty.dtype, want.dtype, &t.bytes), ty: want.clone() };
        }
    }
}
