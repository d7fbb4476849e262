//! The graph's expressions and reductions in the cube kernels' own terms: a fused region
//! becomes the comptime instruction list (`KInstr`) that `kiln_kernels::cube::expr::eval`
//! expands into straight-line code.

use kiln_graph::{BinaryOp, DType, Expr, Instr, ReduceOp, UnaryOp};
use kiln_kernels::cube::expr::KUnary;
use kiln_kernels::cube::expr::{KBinary, KInstr, KRound};
use kiln_kernels::cube::reduce::ReduceKind;

/// How a value of dtype `d` computed in f32 is rounded.
fn rounding(d: DType) -> KRound {
    match d {
        DType::F32 => KRound::Keep,
        DType::BF16 => KRound::Bf16,
        DType::F16 => KRound::F16,
        DType::I64 | DType::I32 | DType::U8 => KRound::Trunc,
        DType::Bool => KRound::Bool,
    }
}

/// The comptime form of an [`Expr`] over inputs of `inputs` (their dtypes): a value whose
/// dtype is narrower than f32 (bf16, f16) is followed by a `Round` to it, and a cast is a
/// `Round` to its target, so every value holds what the interpreter's does. (Integer and bool
/// inputs arrive exact; comparisons give 1.0 / 0.0.)
pub fn instrs(e: &Expr, inputs: &[DType]) -> Result<Vec<KInstr>, String> {
    let dtypes = e.dtypes(inputs)?;
    let mut out: Vec<KInstr> = Vec::with_capacity(e.instrs.len());
    // The code index holding each instruction's value.
    let mut at: Vec<u32> = Vec::with_capacity(e.instrs.len());
    for (ins, &d) in e.instrs.iter().zip(&dtypes) {
        let m = |a: u16| at[a as usize];
        let k = match *ins {
            Instr::Input(k) => KInstr::Input(k as u32),
            Instr::Const(c) => KInstr::Const(c.to_bits()),
            Instr::Unary(op, a) => KInstr::Unary(unary(op), m(a)),
            Instr::Binary(op, a, b) => KInstr::Binary(binary(op), m(a), m(b)),
            Instr::Select(c, a, b) => KInstr::Select(m(c), m(a), m(b)),
            Instr::Cast(to, a) => KInstr::Round(rounding(to), m(a)),
        };
        out.push(k);
        let narrow = matches!(d, DType::BF16 | DType::F16);
        if narrow && !matches!(ins, Instr::Input(_) | Instr::Cast(..)) {
            out.push(KInstr::Round(rounding(d), out.len() as u32 - 1));
        }
        at.push(out.len() as u32 - 1);
    }
    Ok(out)
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
