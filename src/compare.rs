//! `kiln compare`: a gate between two safetensors files. It passes only when both files hold
//! the same tensor names with the same shapes, no value is NaN on either side, and every
//! tensor's relative error (max |got - want| / max |want|) is within the tolerance. Every
//! tensor is reported, whatever fails first.

use crate::{Error, Result};
use safetensors::Dtype;
use std::path::Path;

/// One tensor as compared: its dtype's name, shape and values.
struct Values {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// Decodes any element type safetensors stores (sub-byte float formats excepted: their
/// packing is not one element per byte).
fn decode(dtype: Dtype, b: &[u8]) -> std::result::Result<Vec<f64>, String> {
    fn le<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        b.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
    }
    Ok(match dtype {
        Dtype::F64 => le(b, f64::from_le_bytes),
        Dtype::F32 => le(b, |c| f32::from_le_bytes(c) as f64),
        Dtype::F16 => le(b, |c| half::f16::from_le_bytes(c).to_f64()),
        Dtype::BF16 => le(b, |c| half::bf16::from_le_bytes(c).to_f64()),
        Dtype::I64 => le(b, |c| i64::from_le_bytes(c) as f64),
        Dtype::I32 => le(b, |c| i32::from_le_bytes(c) as f64),
        Dtype::I16 => le(b, |c| i16::from_le_bytes(c) as f64),
        Dtype::I8 => b.iter().map(|&x| x as i8 as f64).collect(),
        Dtype::U64 => le(b, |c| u64::from_le_bytes(c) as f64),
        Dtype::U32 => le(b, |c| u32::from_le_bytes(c) as f64),
        Dtype::U16 => le(b, |c| u16::from_le_bytes(c) as f64),
        Dtype::U8 | Dtype::BOOL => b.iter().map(|&x| x as f64).collect(),
        Dtype::F8_E4M3 => b.iter().map(|&x| f8(x, 3, 7, true)).collect(),
        Dtype::F8_E5M2 => b.iter().map(|&x| f8(x, 2, 15, false)).collect(),
        other => return Err(format!("dtype {other:?} is not supported by kiln compare")),
    })
}

/// An 8-bit float with `mbits` mantissa bits and exponent bias `bias`. `fn_nan`: the E4M3FN
/// convention (no infinities; only all-ones exponent and mantissa is NaN).
fn f8(x: u8, mbits: u32, bias: i32, fn_nan: bool) -> f64 {
    let sign = if x & 0x80 != 0 { -1.0 } else { 1.0 };
    let ebits = 7 - mbits;
    let e = ((x >> mbits) & ((1 << ebits) - 1)) as i32;
    let m = (x & ((1 << mbits) - 1)) as f64;
    let emax = (1 << ebits) - 1;
    let scale = (1u32 << mbits) as f64;
    if fn_nan && e == emax && m == scale - 1.0 {
        return f64::NAN;
    }
    if !fn_nan && e == emax {
        return if m == 0.0 { sign * f64::INFINITY } else { f64::NAN };
    }
    if e == 0 {
        sign * m / scale * 2f64.powi(1 - bias)
    } else {
        sign * (1.0 + m / scale) * 2f64.powi(e - bias)
    }
}

fn read(path: &Path) -> Result<Vec<(String, Values)>> {
    let bad = |msg: String| Error::File { path: path.into(), msg };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    let mut names = st.names();
    names.sort_unstable();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let v = st.tensor(name).map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        let data = decode(v.dtype(), v.data()).map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        out.push((name.to_string(), Values { dtype: format!("{:?}", v.dtype()), shape: v.shape().to_vec(), data }));
    }
    Ok(out)
}

/// The verdict on one tensor present in both files.
fn judge(g: &Values, w: &Values, tol: f64) -> std::result::Result<f64, String> {
    if g.shape != w.shape {
        return Err(format!("shape {:?} vs {:?}", g.shape, w.shape));
    }
    let nans = |v: &[f64]| v.iter().filter(|x| x.is_nan()).count();
    let (ng, nw) = (nans(&g.data), nans(&w.data));
    if ng + nw > 0 {
        return Err(format!("NaN: {ng} in got, {nw} in want"));
    }
    let scale = w.data.iter().filter(|x| x.is_finite()).fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    // Equal infinities agree; any other pair with an infinity differs by infinity.
    let diff = g.data.iter().zip(&w.data).fold(0f64, |m, (a, b)| if a == b { m } else { m.max((a - b).abs()) });
    let e = diff / scale;
    if e > tol {
        return Err(format!("relative error {e:.3e} exceeds {tol:e}"));
    }
    Ok(e)
}

/// Compares `got` with `want`, printing one line per tensor; an error when anything differs.
pub fn compare(got: &Path, want: &Path, tol: f64) -> Result<()> {
    if tol.is_nan() || tol < 0.0 {
        return Err(Error::Usage(format!("--tol {tol}: expected a number >= 0")));
    }
    let (a, b) = (read(got)?, read(want)?);
    let mut failures = Vec::new();
    let mut worst = 0f64;
    for (name, g) in &a {
        let Some((_, w)) = b.iter().find(|(n, _)| n == name) else {
            println!("{name}: missing from {}", want.display());
            failures.push(format!("{name}: missing from {}", want.display()));
            continue;
        };
        let types = if g.dtype == w.dtype { g.dtype.clone() } else { format!("{} vs {}", g.dtype, w.dtype) };
        match judge(g, w, tol) {
            Ok(e) => {
                worst = worst.max(e);
                println!("{name}: {types} {:?} relative error {e:.3e}", g.shape);
            }
            Err(why) => {
                println!("{name}: {types} {:?} FAILS: {why}", g.shape);
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    for (name, _) in b.iter().filter(|(n, _)| !a.iter().any(|(m, _)| m == n)) {
        println!("{name}: missing from {}", got.display());
        failures.push(format!("{name}: missing from {}", got.display()));
    }
    if a.is_empty() && b.is_empty() {
        failures.push("both files hold no tensor".into());
    }
    if !failures.is_empty() {
        // Every name either file holds, counted once.
        let names = a.len() + b.iter().filter(|(n, _)| !a.iter().any(|(m, _)| m == n)).count();
        return Err(Error::Usage(format!("{} of {names} tensors differ: {}", failures.len(), failures.join("; "))));
    }
    println!("all {} tensors within {tol:e} (worst {worst:.3e})", a.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f8_formats_decode_their_reference_values() {
        // E4M3FN: 0x38 = 1.0, 0x7e = 448 (the largest), 0x7f = NaN, 0x01 = 2^-9.
        assert_eq!(f8(0x38, 3, 7, true), 1.0);
        assert_eq!(f8(0x7e, 3, 7, true), 448.0);
        assert!(f8(0x7f, 3, 7, true).is_nan());
        assert_eq!(f8(0x01, 3, 7, true), 2f64.powi(-9));
        assert_eq!(f8(0xb8, 3, 7, true), -1.0);
        // E5M2: 0x3c = 1.0, 0x7b = 57344, 0x7c = inf, 0x7d = NaN.
        assert_eq!(f8(0x3c, 2, 15, false), 1.0);
        assert_eq!(f8(0x7b, 2, 15, false), 57344.0);
        assert_eq!(f8(0x7c, 2, 15, false), f64::INFINITY);
        assert!(f8(0x7d, 2, 15, false).is_nan());
    }

    fn v(data: &[f64]) -> Values {
        Values { dtype: "F32".into(), shape: vec![data.len()], data: data.to_vec() }
    }

    #[test]
    fn nan_infinity_and_shape_are_judged() {
        assert!(judge(&v(&[1.0, f64::NAN]), &v(&[1.0, 2.0]), 1e-4).is_err());
        assert!(judge(&v(&[1.0, 2.0]), &v(&[1.0, f64::NAN]), 1e-4).is_err());
        assert!(judge(&v(&[1.0, f64::INFINITY]), &v(&[1.0, f64::INFINITY]), 1e-4).is_ok());
        assert!(judge(&v(&[1.0, f64::INFINITY]), &v(&[1.0, 2.0]), 1e-4).is_err());
        assert!(judge(&v(&[1.0, 2.0]), &v(&[1.0, 2.0, 3.0]), 1e-4).is_err());
        assert_eq!(judge(&v(&[1.0, 2.0]), &v(&[1.0, 2.0]), 0.0), Ok(0.0));
        assert!(judge(&v(&[1.0, 2.001]), &v(&[1.0, 2.0]), 1e-4).is_err());
    }
}
