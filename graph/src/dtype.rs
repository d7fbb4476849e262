//! Element types and tensor types.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// Whether the type holds floating-point numbers.
    pub fn is_float(self) -> bool {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => true,
            DType::I32 | DType::I64 | DType::U8 | DType::Bool => false,
        }
    }

    /// The short lower-case name used in the text form (`f32`, `bf16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    /// Parses a name printed by [`DType::name`].
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "i32" => DType::I32,
            "i64" => DType::I64,
            "u8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    /// Rounds an f64 to the nearest value this type can hold (the interpreter's storage rule).
    pub fn round(self, x: f64) -> f64 {
        match self {
            DType::F32 => x as f32 as f64,
            // Through f32 rounded to odd, then to nearest even: correctly rounded (f32 has more
            // than two bits beyond either half type). `half`'s own `from_f64` drops the low 32
            // bits first and so rounds some values just above a tie down.
            DType::F16 => half::f16::from_f32(f32_round_to_odd(x)).to_f64(),
            DType::BF16 => half::bf16::from_f32(f32_round_to_odd(x)).to_f64(),
            DType::I32 => (x as i64 as i32) as f64,
            DType::I64 => x.trunc(),
            DType::U8 => (x as i64 as u8) as f64,
            DType::Bool => {
                if x != 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

/// `x` as f32, rounded to odd: where inexact, of the two neighbours the one whose last bit is
/// 1, so a later rounding to a narrower type sees that `x` was not a tie.
fn f32_round_to_odd(x: f64) -> f32 {
    let t = x as f32;
    if !t.is_finite() || t as f64 == x || t.to_bits() & 1 == 1 {
        return t;
    }
    // The neighbour on `x`'s side: one step away from zero when |x| > |t|, else toward it.
    let away = x.abs() > (t as f64).abs();
    f32::from_bits(if away { t.to_bits() + 1 } else { t.to_bits() - 1 })
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The static type of a value: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorType {
    /// A tensor type from a dtype and a shape.
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        TensorType { dtype, shape: shape.into() }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Numpy broadcasting of two shapes; `None` when they do not broadcast.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Row-major strides of a shape, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides that read a tensor of shape `from` as if broadcast to `to` (0 on broadcast axes).
pub fn broadcast_strides(from: &[usize], to: &[usize]) -> Vec<usize> {
    let base = strides(from);
    let off = to.len() - from.len();
    (0..to.len()).map(|i| if i < off || from[i - off] == 1 { 0 } else { base[i - off] }).collect()
}
