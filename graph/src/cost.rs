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
use crate::op::{Expr, Instr, MaskKind, Op, ReduceOp, ResizeMode};

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
            Instr::Unary(..) | Instr::Binary(..) | Instr::Select(..) => true,
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
    }
}

/// The FLOPs and fewest bytes of `op` on inputs of types `inputs` giving `output`.
pub fn cost(op: &Op, inputs: &[TensorType], output: &TensorType) -> Cost {
    let n_out = output.numel() as u64;
    let all_bytes = inputs.iter().map(|t| t.bytes() as u64).sum::<u64>() + output.bytes() as u64;
    let keep_only = |extra: u64| 2 * output.bytes() as u64 + extra;
    let input_numel = |i: usize| inputs.get(i).map_or(0, |t| t.numel() as u64);
    let (flops, bytes) = match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Reshape { .. } => (0, 0),
        Op::Iota { .. } => (2 * n_out, output.bytes() as u64),
        Op::Unary(_) | Op::Binary(_) | Op::Select => (n_out, all_bytes),
        Op::Fused(e) => (expr_flops(e) * n_out, all_bytes),
        Op::Cast { .. } | Op::Permute { .. } | Op::Concat { .. } | Op::Broadcast { .. } => (0, all_bytes),
        Op::Slice { .. } => (0, keep_only(0)),
        // In place on persistent state: only the new rows move.
        Op::WriteSlice { .. } => (0, 2 * inputs.get(1).map_or(0, |t| t.bytes() as u64)),
        Op::Gather { .. } | Op::TakeAlongAxis { .. } => (0, keep_only(inputs.get(1).map_or(0, |t| t.bytes() as u64))),
        Op::Reduce { op, .. } => {
            let extra = match op {
                ReduceOp::Mean => n_out,
                ReduceOp::Sum | ReduceOp::Max | ReduceOp::Min => 0,
            };
            (input_numel(0) + extra, all_bytes)
        }
        Op::MatMul { epilogue, .. } => {
            let k = inputs.first().and_then(|a| a.shape.last()).copied().unwrap_or(0) as u64;
            (2 * n_out * k + epilogue.as_ref().map_or(0, expr_flops) * n_out, all_bytes)
        }
        Op::ScatterAdd { .. } => (input_numel(2), all_bytes),
        // Dispatch copies each kept token into its expert buffer: no arithmetic.
        Op::MoeDispatch { .. } => (0, all_bytes),
        // Combine: one multiply-add per kept assignment and model dimension.
        Op::MoeCombine => (2 * input_numel(1) * output.shape.last().copied().unwrap_or(1) as u64, all_bytes),
        Op::TopK { .. } => (input_numel(0), all_bytes),
        Op::CumSum { .. } => (n_out, all_bytes),
        Op::Resize { mode, .. } => {
            let taps = match mode {
                ResizeMode::Bilinear => 4,
                ResizeMode::Bicubic => 16,
            };
            (2 * taps * n_out, all_bytes)
        }
        Op::Softmax { .. } => (5 * n_out, all_bytes),
        Op::LayerNorm { .. } => (7 * n_out, all_bytes),
        Op::RmsNorm { .. } => (4 * n_out, all_bytes),
        Op::Attention(a) => {
            let dim = |i: usize, d: usize| inputs.get(i).and_then(|t| t.shape.get(d)).copied().unwrap_or(0);
            let (b, sq, hq, d) = (dim(0, 0), dim(0, 1), dim(0, 2), dim(0, 3));
            let (sk, dv) = (dim(1, 1), dim(2, 3));
            let per_pair = 2 * d as u64
                + 2 * dv as u64
                + 1
                + 5
                + if a.softcap.is_some() { 3 } else { 0 }
                + if a.mask == MaskKind::Additive { 1 } else { 0 };
            ((b * hq) as u64 * attended_pairs(a.mask, sq, sk) * per_pair, all_bytes)
        }
    };
    Cost { flops, bytes }
}
