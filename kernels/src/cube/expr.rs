//! Fused elementwise expressions as CubeCL code: the region's instruction list is a comptime
//! value, so each distinct region expands into its own straight-line kernel (no interpreter
//! loop on the device), and CubeCL caches one compiled kernel per region shape.

// An unrolled comptime loop indexes the instruction list (CubeCL's macro needs the index).
#![allow(clippy::needless_range_loop)]

use cubecl::prelude::*;

/// A unary operation of a region (the compiler translates its own operations to these).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum KUnary {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Square,
    Tanh,
    Sigmoid,
    Erf,
    Sin,
    Cos,
    Floor,
    Relu,
    GeluTanh,
    GeluErf,
    Silu,
    Softplus,
    /// 1 where the input is 0, else 0.
    Not,
}

/// A binary operation of a region; comparisons and logic give 1.0 / 0.0.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum KBinary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// How a value computed in `F` is rounded to the dtype it holds (the graph's per-value
/// precision: a bf16 value inside an f32 region, a cast's target).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum KRound {
    /// Kept as computed (an f32 value, a cast to f32).
    Keep,
    /// To the nearest bfloat16, ties to even.
    Bf16,
    /// To the nearest IEEE half, ties to even (subnormals and overflow to infinity included).
    F16,
    /// Toward zero (a cast to an integer type).
    Trunc,
    /// 1.0 where nonzero, else 0.0 (a cast to bool).
    Bool,
}

/// One instruction as a comptime value (the constant kept as bits so the list hashes). Value
/// `i` of a region is the result of instruction `i`; operands name earlier values.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum KInstr {
    /// The region's input `k`.
    Input(u32),
    /// An f32 constant, as its bits.
    Const(u32),
    Unary(KUnary, u32),
    Binary(KBinary, u32, u32),
    /// `c != 0 ? a : b`.
    Select(u32, u32, u32),
    /// The value rounded to a narrower type.
    Round(KRound, u32),
}

/// `x` rounded to nearest even, dropping the low `n` bits of its f32 mantissa (NaN kept; a
/// carry into the exponent gives the next binade, or infinity).
#[cube]
fn drop_bits(x: f32, #[comptime] n: u32) -> f32 {
    let b = u32::reinterpret(x);
    let half = comptime!((1u32 << (n - 1)) - 1);
    let mask = comptime!(!((1u32 << n) - 1));
    let r = (b + half + ((b >> n) & 1u32)) & mask;
    // NaN by its bits (a shader compiler may fold `x != x`).
    select((b & 0x7fff_ffffu32) > 0x7f80_0000u32, x, f32::reinterpret(r))
}

/// `x` rounded to the nearest IEEE half (as `half::f16::from_f32`), as an f32.
#[cube]
fn to_f16(x: f32) -> f32 {
    let a = f32::abs(x);
    // Subnormal halves are multiples of 2^-24: `a * 2^24` rounded to an even integer, in
    // integer arithmetic (a shader compiler may fold `(a + c) - c` back to `a`).
    let b = u32::reinterpret(a);
    let m = (b & 0x007f_ffffu32) | 0x0080_0000u32;
    // a = m * 2^(e - 23); a * 2^24 = m >> s with s = -1 - e (at least 14 here).
    let s = 126u32 - u32::min(b >> 23, 126u32);
    let sh = u32::min(s, 31u32);
    let q = select(s > 25u32, 0u32, m >> sh);
    let rem = select(s > 25u32, 0u32, m & ((1u32 << sh) - 1u32));
    let half = select(s > 25u32, 1u32, 1u32 << (sh - 1u32));
    let up = rem > half || (rem == half && (q & 1u32) == 1u32);
    let sub = f32::cast_from(q + select(up, 1u32, 0u32)) * 5.9604645e-8f32;
    // x's sign by its bit (a negation may compile to `0 - v`, losing -0).
    let sign = u32::reinterpret(x) & 0x8000_0000u32;
    let sub = f32::reinterpret(u32::reinterpret(sub) | sign);
    let normal = drop_bits(x, 13u32);
    let inf = f32::reinterpret(sign | 0x7f80_0000u32);
    select(a >= 65520.0f32, inf, select(a < 6.1035156e-5f32, sub, normal))
}

#[cube]
fn round_to<F: Float>(x: F, #[comptime] r: KRound) -> F {
    match comptime!(r) {
        KRound::Keep => x,
        KRound::Bf16 => F::cast_from(drop_bits(f32::cast_from(x), 16u32)),
        KRound::F16 => F::cast_from(to_f16(f32::cast_from(x))),
        KRound::Trunc => select(x < F::new(0.0), -F::floor(-x), F::floor(x)),
        KRound::Bool => truth::<F>(x != F::new(0.0)),
    }
}

/// Booleans are 1.0 / 0.0 inside a region.
#[cube]
fn truth<F: Float>(c: bool) -> F {
    select(c, F::new(1.0), F::new(0.0))
}

#[cube]
fn unary<F: Float>(x: F, #[comptime] op: KUnary) -> F {
    match comptime!(op) {
        KUnary::Neg => -x,
        KUnary::Abs => F::abs(x),
        KUnary::Exp => F::exp(x),
        KUnary::Log => F::ln(x),
        KUnary::Sqrt => F::sqrt(x),
        KUnary::Rsqrt => F::new(1.0) / F::sqrt(x),
        KUnary::Recip => F::new(1.0) / x,
        KUnary::Square => x * x,
        KUnary::Tanh => F::tanh(x),
        KUnary::Sigmoid => F::new(1.0) / (F::new(1.0) + F::exp(-x)),
        KUnary::Erf => F::erf(x),
        KUnary::Sin => F::sin(x),
        KUnary::Cos => F::cos(x),
        KUnary::Floor => F::floor(x),
        KUnary::Relu => F::max(x, F::new(0.0)),
        KUnary::GeluTanh => {
            let inner = F::new(0.7978846) * (x + F::new(0.044715) * x * x * x);
            F::new(0.5) * x * (F::new(1.0) + F::tanh(inner))
        }
        KUnary::GeluErf => F::new(0.5) * x * (F::new(1.0) + F::erf(x * F::new(0.70710677))),
        KUnary::Silu => x / (F::new(1.0) + F::exp(-x)),
        KUnary::Softplus => {
            // log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|)).
            F::max(x, F::new(0.0)) + F::ln(F::new(1.0) + F::exp(-F::abs(x)))
        }
        KUnary::Not => truth::<F>(x == F::new(0.0)),
    }
}

#[cube]
fn binary<F: Float>(a: F, b: F, #[comptime] op: KBinary) -> F {
    match comptime!(op) {
        KBinary::Add => a + b,
        KBinary::Sub => a - b,
        KBinary::Mul => a * b,
        KBinary::Div => a / b,
        KBinary::Max => F::max(a, b),
        KBinary::Min => F::min(a, b),
        KBinary::Pow => F::powf(a, b),
        KBinary::Eq => truth::<F>(a == b),
        KBinary::Ne => truth::<F>(a != b),
        KBinary::Lt => truth::<F>(a < b),
        KBinary::Le => truth::<F>(a <= b),
        KBinary::Gt => truth::<F>(a > b),
        KBinary::Ge => truth::<F>(a >= b),
        KBinary::And => truth::<F>(a != F::new(0.0) && b != F::new(0.0)),
        KBinary::Or => truth::<F>(a != F::new(0.0) || b != F::new(0.0)),
    }
}

/// Evaluates the instruction list on the region's inputs; the result is the last value. An
/// integer or bool output is converted only when stored (as the cpu backend's regions do).
#[cube]
pub fn eval<F: Float>(inputs: &Sequence<F>, #[comptime] code: Vec<KInstr>) -> F {
    let mut vals = Sequence::<F>::new();
    #[unroll]
    for i in 0..code.len() {
        let v = match comptime!(code[i]) {
            KInstr::Input(k) => *inputs.index(k as usize),
            KInstr::Const(bits) => F::new(comptime!(f32::from_bits(bits))),
            KInstr::Unary(op, a) => unary::<F>(*vals.index(a as usize), op),
            KInstr::Binary(op, a, b) => binary::<F>(*vals.index(a as usize), *vals.index(b as usize), op),
            KInstr::Select(c, a, b) => select(*vals.index(c as usize) != F::new(0.0), *vals.index(a as usize), *vals.index(b as usize)),
            KInstr::Round(r, a) => round_to::<F>(*vals.index(a as usize), r),
        };
        vals.push(v);
    }
    *vals.index(comptime!(code.len() - 1))
}
