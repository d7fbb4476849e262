//! The work of one op counted from its shapes: floating-point operations and the fewest bytes
//! a kernel can move (every input read once, the output written once). `kiln bench kernels`
//! divides these by measured times to place each kernel on the machine's roofline.
//!
//! Counting rules, per output element unless stated (a multiply-add is 2 FLOPs; a
//! transcendental such as `exp` or `tanh` is 1, as roofline counts usually take it):
//! - elementwise (`Unary`, `Binary`, `Select`): 1; a fused region or matmul epilogue: one
//!   per arithmetic instruction (`Input` and `Const` instructions are loads, not FLOPs).
//! - matmul: `2 * M * N * K` per batch, plus its epilogue's instructions per element.
//! - attention: per attended (query, key) pair, `2 * D` for `q . k`, `2 * Dv` for `p . v`,
//!   1 for the scale, 5 for the softmax (max, subtract, exp, sum, divide), 3 for a softcap
//!   (divide, tanh, multiply) and 1 for an additive mask. Causal and sliding-window masks
//!   count only the pairs they keep, as flash kernels skip the others.
//! - softmax: 5 per element (max, subtract, exp, sum, divide).
//! - layer norm: 7 per element (sum; subtract the mean; square and accumulate; multiply by
//!   the reciprocal deviation; scale; bias). RMS norm: 4 (square and accumulate; multiply by
//!   the reciprocal root; scale). Per-row square roots are ignored.
//! - reductions: 1 per input element, and a mean 1 more per output element; cumulative sum 1
//!   per element; top-k 1 comparison per input element; scatter-add 1 per source element.
//! - resize: 2 FLOPs per tap per output element (4 taps bilinear, 16 bicubic).
//! - iota: 2 (`start + i * step`). Movement and conversion (`Cast`, `Permute`, `Slice`,
//!   `Concat`, `Broadcast`, `Gather`, `TakeAlongAxis`): 0.
//!
//! Bytes: every input once plus the output once (weights included), except that `Slice`,
//! `Gather` and `TakeAlongAxis` read only the elements they keep (plus their indices).
//! Sources (inputs, weights, constants) and reshapes (views) run no kernel: 0 and 0.

use crate::dtype::TensorType;
use crate::op::{Expr, Instr, MaskKind, Op};

/// The work of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Floating-point operations.
    pub flops: u64,
    /// Fewest bytes moved: inputs read once, output written once.
    pub bytes: u64,
}

impl Cost {
    /// FLOPs per byte (0 when nothing moves).
    pub fn intensity(&self) -> f64 {
        if self.bytes == 0 {
            0.0
        } else {
            self.flops as f64 / self.bytes as f64
        }
    }
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost { flops: self.flops + o.flops, bytes: self.bytes + o.bytes }
    }
}

impl std::iter::Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(it: I) -> Cost {
        it.fold(Cost::default(), |a, b| a + b)
    }
}

/// Arithmetic instructions of a fused expression (loads and constants excluded).
pub fn expr_flops(e: &Expr) -> u64 {
    e.instrs
        .iter()
        .filter(|i| match i {
            Instr::Input(_) | Instr::Const(_) => false,
            Instr::Unary(..) | Instr::Binary(..) | Instr::Select(..) | Instr::Cast(..) => true,
        })
        .count() as u64
}

/// (query, key) pairs a mask keeps for `sq` queries over `sk` keys.
pub fn attended_pairs(mask: MaskKind, sq: usize, sk: usize) -> u64 {
    let kept = |i: usize, q_offset: usize, window: Option<usize>| -> u64 {
        let last = (q_offset + i + 1).min(sk); // keys 0..last are at or before the query
        let first = window.map_or(0, |w| (q_offset + i + 1).saturating_sub(w)).min(last);
        (last - first) as u64
    };
    match mask {
        MaskKind::None | MaskKind::Additive => (sq * sk) as u64,
        MaskKind::Causal { q_offset } => (0..sq).map(|i| kept(i, q_offset, None)).sum(),
        MaskKind::SlidingWindow { q_offset, window } => (0..sq).map(|i| kept(i, q_offset, Some(window))).sum(),
        // The start is a run-time value: counted as a prefill from 0 when the queries fill the
        // keys, and over every key (the worst case, a full cache) for a decode step.
        MaskKind::Positions(pm) if sq >= sk => (0..sq).map(|i| kept(i, 0, pm.window)).sum(),
        MaskKind::Positions(pm) => (0..sq).map(|i| kept(i, sk - sq, pm.window)).sum(),
    }
}

/// The FLOPs and fewest bytes of `op` on inputs of types `inputs` giving `output` (each op's
/// rule is its arm of [`Op::cost`], next to its definition).
pub fn cost(op: &Op, inputs: &[TensorType], output: &TensorType) -> Cost {
    op.cost(inputs, output)
}
