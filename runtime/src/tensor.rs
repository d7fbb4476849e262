//! Host tensors: a type and little-endian bytes, the currency of `Session::run`.

use kiln_graph::{DType, TensorType};

/// A tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub ty: TensorType,
    pub bytes: Vec<u8>,
}

impl Tensor {
    /// Zeros of a type.
    pub fn zeros(ty: TensorType) -> Self {
        let bytes = vec![0; ty.bytes()];
        Tensor { ty, bytes }
    }

    /// An f32 tensor from values.
    pub fn from_f32(shape: &[usize], data: &[f32]) -> Self {
        Tensor { ty: TensorType::new(DType::F32, shape), bytes: bytemuck::cast_slice(data).to_vec() }
    }

    /// An i64 tensor from values.
    pub fn from_i64(shape: &[usize], data: &[i64]) -> Self {
        Tensor { ty: TensorType::new(DType::I64, shape), bytes: bytemuck::cast_slice(data).to_vec() }
    }

    /// The values as f64 whatever the dtype (for printing and comparing).
    pub fn to_f64(&self) -> Vec<f64> {
        to_f64(self.ty.dtype, &self.bytes)
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.to_f64().into_iter().map(|x| x as f32).collect()
    }
}

/// Decodes little-endian bytes of a dtype into f64 values.
pub fn to_f64(dtype: DType, b: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        DType::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64).collect(),
        DType::U8 | DType::Bool => b.iter().map(|&x| x as f64).collect(),
    }
}

/// Decodes little-endian float bytes (f32, f16 or bf16) into f32 values, in parallel: the
/// load-time path of a weight stored in a narrower float dtype. Exact (every f16 and bf16 is an
/// f32). `None` for a non-float dtype.
pub fn floats_to_f32(dtype: DType, b: &[u8]) -> Option<Vec<f32>> {
    use kiln_kernels::cpu::sgemm512::Stored;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    // One monomorphic loop per dtype (the same element reads as the packing of weights).
    fn fill(n: usize, get: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
        let mut out = vec![0f32; n];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, d)| {
            for (j, o) in d.iter_mut().enumerate() {
                *o = get(c * CHUNK + j);
            }
        });
        out
    }
    Some(match dtype {
        DType::F32 => fill(b.len() / 4, |i| Stored::F32(b).get(i)),
        DType::BF16 => fill(b.len() / 2, |i| Stored::Bf16(b).get(i)),
        DType::F16 => fill(b.len() / 2, |i| Stored::F16(b).get(i)),
        _ => return None,
    })
}

/// Re-encodes little-endian bytes from one dtype to another, as `from_f64(to, &to_f64(from,
/// b))` would (round to nearest even into a narrower float), but without the f64 copy and in
/// parallel for the float-to-float cases; other pairs take the f64 route a million elements at
/// a time.
pub fn convert(from: DType, to: DType, b: &[u8]) -> Vec<u8> {
    use rayon::prelude::*;
    if from == to {
        return b.to_vec();
    }
    let floats = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    if !(floats(from) && floats(to)) {
        let step = from.size() << 20;
        let mut out = Vec::with_capacity(b.len() / from.size() * to.size());
        for chunk in b.chunks(step) {
            out.extend(from_f64(to, &to_f64(from, chunk)));
        }
        return out;
    }
    let v = floats_to_f32(from, b).expect("a float dtype");
    let mut out = vec![0u8; v.len() * to.size()];
    const CHUNK: usize = 1 << 16;
    let dst = out.par_chunks_mut(CHUNK * to.size());
    match to {
        DType::F32 => dst.zip(v.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(bytemuck::cast_slice(s))),
        DType::BF16 => dst.zip(v.par_chunks(CHUNK)).for_each(|(d, s)| {
            for (o, &x) in d.chunks_exact_mut(2).zip(s) {
                o.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
        }),
        DType::F16 => dst.zip(v.par_chunks(CHUNK)).for_each(|(d, s)| {
            for (o, &x) in d.chunks_exact_mut(2).zip(s) {
                o.copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
            }
        }),
        _ => unreachable!(),
    }
    out
}

/// `x` as an f32 rounded to odd: exact values stay, others become the f32 toward zero with its
/// last bit set. Rounding that to nearest-even into f16 or bf16 (at least two bits shorter)
/// gives the correctly rounded f64 -> f16 / bf16 conversion, with no double-rounding error.
/// (`half::bf16::from_f64` is not correctly rounded: it maps the f32 0xb3d68001 to 0xb3d6
/// where nearest-even gives 0xb3d7.)
fn f32_round_to_odd(x: f64) -> f32 {
    let t = x as f32;
    if t.is_nan() || t.is_infinite() || t as f64 == x {
        return t;
    }
    let mut bits = t.to_bits();
    if (t as f64).abs() > x.abs() {
        bits -= 1; // one step toward zero, same sign
    }
    f32::from_bits(bits | 1)
}

/// Encodes f64 values as little-endian bytes of a dtype.
pub fn from_f64(dtype: DType, v: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * dtype.size());
    for &x in v {
        match dtype {
            DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(f32_round_to_odd(x)).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(f32_round_to_odd(x)).to_le_bytes()),
            DType::I32 => out.extend_from_slice(&(x as i32).to_le_bytes()),
            DType::I64 => out.extend_from_slice(&(x as i64).to_le_bytes()),
            DType::U8 | DType::Bool => out.push(x as u8),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 16-bit pattern of f16 and bf16, and f32 patterns around every rounding boundary
    /// kind (ties, subnormals, overflow, infinities): `convert` gives the f64 route's bits,
    /// and NaN stays NaN.
    #[test]
    fn convert_matches_the_f64_route() {
        let halves: Vec<u8> = (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect();
        let mut f32s: Vec<u8> = Vec::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..200_000u32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bits = match i % 4 {
                0 => state as u32,
                // Ties and near-ties for bf16 (low 16 bits 0x8000 +- 1) and f16 (low 13 bits).
                1 => (state as u32 & 0xffff_0000) | [0x8000, 0x7fff, 0x8001][i as usize % 3],
                2 => (state as u32 & 0xffff_e000) | [0x1000, 0x0fff, 0x1001][i as usize % 3],
                _ => (state as u32) >> 3, // small and subnormal magnitudes
            };
            f32s.extend(bits.to_le_bytes());
        }
        for (from, bytes) in [(DType::F16, &halves), (DType::BF16, &halves), (DType::F32, &f32s)] {
            for to in [DType::F32, DType::F16, DType::BF16] {
                let fast = convert(from, to, bytes);
                let slow = from_f64(to, &to_f64(from, bytes));
                assert_eq!(fast.len(), slow.len());
                let (a, b) = (to_f64(to, &fast), to_f64(to, &slow));
                for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                    let same = if y.is_nan() { x.is_nan() } else { x.to_bits() == y.to_bits() };
                    assert!(same, "{from:?} -> {to:?}, element {k}: {x} against {y}");
                }
            }
            if from == DType::F32 {
                // Nearest-even by integer arithmetic on the bits, independent of both routes.
                let fast = convert(from, DType::BF16, bytes);
                for (k, (c, o)) in bytes.chunks_exact(4).zip(fast.chunks_exact(2)).enumerate() {
                    let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if f32::from_bits(b).is_nan() {
                        continue;
                    }
                    let want = ((b as u64 + 0x7fff + ((b >> 16) & 1) as u64) >> 16) as u16;
                    assert_eq!(u16::from_le_bytes([o[0], o[1]]), want, "f32 {b:#010x} -> bf16, element {k}");
                }
            }
            if let Some(v) = floats_to_f32(from, bytes) {
                let want = to_f64(from, bytes);
                assert!(v.iter().zip(&want).all(|(x, y)| (*x as f64).to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())));
            }
        }
        assert_eq!(convert(DType::I64, DType::I32, &7i64.to_le_bytes()), 7i32.to_le_bytes());
        // f64 values just off a bf16 tie: nearest-even must look past the f32 rounding.
        let one = 1.0f64;
        let ulp = 2f64.powi(-7); // bf16's spacing at 1
        for (x, want) in [
            (one + ulp / 2.0 + 1e-12, one + ulp), // above the tie: up
            (one + ulp / 2.0 - 1e-12, one),       // below the tie: down
            (one + ulp / 2.0, one),               // the tie: even
            (one + 1.5 * ulp, one + 2.0 * ulp),   // the tie: even
            (-(one + ulp / 2.0 + 1e-12), -(one + ulp)),
        ] {
            let got = to_f64(DType::BF16, &from_f64(DType::BF16, &[x]))[0];
            assert_eq!(got, want, "bf16 of {x:e}");
        }
    }
}
