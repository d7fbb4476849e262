//! Fused elementwise expressions as CubeCL code: the region's instruction list is a comptime
//! value, so each distinct region expands into its own straight-line kernel (no interpreter
//! loop on the device), and CubeCL caches one compiled kernel per region shape.

// An unrolled comptime loop indexes the instruction list (CubeCL's macro needs the index).
#![allow(clippy::needless_range_loop)]

use cubecl::prelude::*;
use kiln_graph::{BinaryOp, Expr, Instr, UnaryOp};

/// One instruction as a comptime value (the constant kept as bits so the list hashes).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum KInstr {
    Input(u32),
    Const(u32),
    Unary(UnaryOp, u32),
    Binary(BinaryOp, u32, u32),
    Select(u32, u32, u32),
}

/// The comptime form of an [`Expr`].
pub fn instrs(e: &Expr) -> Vec<KInstr> {
    e.instrs
        .iter()
        .map(|i| match *i {
            Instr::Input(k) => KInstr::Input(k as u32),
            Instr::Const(c) => KInstr::Const(c.to_bits()),
            Instr::Unary(op, a) => KInstr::Unary(op, a as u32),
            Instr::Binary(op, a, b) => KInstr::Binary(op, a as u32, b as u32),
            Instr::Select(c, a, b) => KInstr::Select(c as u32, a as u32, b as u32),
        })
        .collect()
}

/// Booleans are 1.0 / 0.0 inside a region.
#[cube]
fn truth<F: Float>(c: bool) -> F {
    select(c, F::new(1.0), F::new(0.0))
}

#[cube]
fn unary<F: Float>(x: F, #[comptime] op: UnaryOp) -> F {
    match comptime!(op) {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => F::abs(x),
        UnaryOp::Exp => F::exp(x),
        UnaryOp::Log => F::ln(x),
        UnaryOp::Sqrt => F::sqrt(x),
        UnaryOp::Rsqrt => F::new(1.0) / F::sqrt(x),
        UnaryOp::Recip => F::new(1.0) / x,
        UnaryOp::Square => x * x,
        UnaryOp::Tanh => F::tanh(x),
        UnaryOp::Sigmoid => F::new(1.0) / (F::new(1.0) + F::exp(-x)),
        UnaryOp::Erf => F::erf(x),
        UnaryOp::Sin => F::sin(x),
        UnaryOp::Cos => F::cos(x),
        UnaryOp::Floor => F::floor(x),
        UnaryOp::Relu => F::max(x, F::new(0.0)),
        UnaryOp::GeluTanh => {
            let inner = F::new(0.7978846) * (x + F::new(0.044715) * x * x * x);
            F::new(0.5) * x * (F::new(1.0) + F::tanh(inner))
        }
        UnaryOp::GeluErf => F::new(0.5) * x * (F::new(1.0) + F::erf(x * F::new(0.70710677))),
        UnaryOp::Silu => x / (F::new(1.0) + F::exp(-x)),
        UnaryOp::Softplus => {
            // log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|)).
            F::max(x, F::new(0.0)) + F::ln(F::new(1.0) + F::exp(-F::abs(x)))
        }
        UnaryOp::Not => truth::<F>(x == F::new(0.0)),
    }
}

#[cube]
fn binary<F: Float>(a: F, b: F, #[comptime] op: BinaryOp) -> F {
    match comptime!(op) {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => F::max(a, b),
        BinaryOp::Min => F::min(a, b),
        BinaryOp::Pow => F::powf(a, b),
        BinaryOp::Eq => truth::<F>(a == b),
        BinaryOp::Ne => truth::<F>(a != b),
        BinaryOp::Lt => truth::<F>(a < b),
        BinaryOp::Le => truth::<F>(a <= b),
        BinaryOp::Gt => truth::<F>(a > b),
        BinaryOp::Ge => truth::<F>(a >= b),
        BinaryOp::And => truth::<F>(a != F::new(0.0) && b != F::new(0.0)),
        BinaryOp::Or => truth::<F>(a != F::new(0.0) || b != F::new(0.0)),
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
        };
        vals.push(v);
    }
    *vals.index(comptime!(code.len() - 1))
}
