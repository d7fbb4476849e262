//! The graph's expressions and reductions in the cube kernels' own terms: a fused region
//! becomes the comptime instruction list (`KInstr`) that `kiln_kernels::cube::expr::eval`
//! expands into straight-line code.

use kiln_graph::{BinaryOp, Expr, Instr, ReduceOp, UnaryOp};
use kiln_kernels::cube::expr::{KBinary, KInstr, KUnary};
use kiln_kernels::cube::reduce::ReduceKind;

/// The comptime form of an [`Expr`].
pub fn instrs(e: &Expr) -> Vec<KInstr> {
    e.instrs
        .iter()
        .map(|i| match *i {
            Instr::Input(k) => KInstr::Input(k as u32),
            Instr::Const(c) => KInstr::Const(c.to_bits()),
            Instr::Unary(op, a) => KInstr::Unary(unary(op), a as u32),
            Instr::Binary(op, a, b) => KInstr::Binary(binary(op), a as u32, b as u32),
            Instr::Select(c, a, b) => KInstr::Select(c as u32, a as u32, b as u32),
        })
        .collect()
}

fn unary(op: UnaryOp) -> KUnary {
    match op {
        UnaryOp::Neg => KUnary::Neg,
        UnaryOp::Abs => KUnary::Abs,
        UnaryOp::Exp => KUnary::Exp,
        UnaryOp::Log => KUnary::Log,
        UnaryOp::Sqrt => KUnary::Sqrt,
        UnaryOp::Rsqrt => KUnary::Rsqrt,
        UnaryOp::Recip => KUnary::Recip,
        UnaryOp::Square => KUnary::Square,
        UnaryOp::Tanh => KUnary::Tanh,
        UnaryOp::Sigmoid => KUnary::Sigmoid,
        UnaryOp::Erf => KUnary::Erf,
        UnaryOp::Sin => KUnary::Sin,
        UnaryOp::Cos => KUnary::Cos,
        UnaryOp::Floor => KUnary::Floor,
        UnaryOp::Relu => KUnary::Relu,
        UnaryOp::GeluTanh => KUnary::GeluTanh,
        UnaryOp::GeluErf => KUnary::GeluErf,
        UnaryOp::Silu => KUnary::Silu,
        UnaryOp::Softplus => KUnary::Softplus,
        UnaryOp::Not => KUnary::Not,
    }
}

fn binary(op: BinaryOp) -> KBinary {
    match op {
        BinaryOp::Add => KBinary::Add,
        BinaryOp::Sub => KBinary::Sub,
        BinaryOp::Mul => KBinary::Mul,
        BinaryOp::Div => KBinary::Div,
        BinaryOp::Max => KBinary::Max,
        BinaryOp::Min => KBinary::Min,
        BinaryOp::Pow => KBinary::Pow,
        BinaryOp::Eq => KBinary::Eq,
        BinaryOp::Ne => KBinary::Ne,
        BinaryOp::Lt => KBinary::Lt,
        BinaryOp::Le => KBinary::Le,
        BinaryOp::Gt => KBinary::Gt,
        BinaryOp::Ge => KBinary::Ge,
        BinaryOp::And => KBinary::And,
        BinaryOp::Or => KBinary::Or,
    }
}

/// The cube reduction of a graph reduction.
pub fn reduce_kind(op: ReduceOp) -> ReduceKind {
    match op {
        ReduceOp::Sum => ReduceKind::Sum,
        ReduceOp::Mean => ReduceKind::Mean,
        ReduceOp::Max => ReduceKind::Max,
        ReduceOp::Min => ReduceKind::Min,
    }
}
