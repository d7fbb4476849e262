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

/// Encodes f64 values as little-endian bytes of a dtype.
pub fn from_f64(dtype: DType, v: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * dtype.size());
    for &x in v {
        match dtype {
            DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
            DType::I32 => out.extend_from_slice(&(x as i32).to_le_bytes()),
            DType::I64 => out.extend_from_slice(&(x as i64).to_le_bytes()),
            DType::U8 | DType::Bool => out.push(x as u8),
        }
    }
    out
}
