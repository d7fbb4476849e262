//! Reductions over any set of axes and softmax over any axis: one unit per output element (per
//! line, for softmax), reading the reduced elements through strides. The last-axis softmax of
//! attention-free graphs goes to [`super::norm`], a cube per row.

use super::params::{LineParams, ReduceParams, TokenParams};
use super::strided_index;
use super::typed::{self, Repr, Src};
use cubecl::prelude::*;

/// What a [`reduce`] launch folds the reduced elements with.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReduceKind {
    Sum,
    /// The sum divided by the count.
    Mean,
    Max,
    Min,
}

/// What varies the code of a [`reduce`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ReduceCfg {
    pub op: ReduceKind,
    /// Rank of the kept and of the reduced axes (each at least 1; size-1 axes pad them).
    pub kept_rank: usize,
    pub red_rank: usize,
    pub x: Src,
    pub out: Repr,
}

/// Meta: [`ReduceParams`].
#[cube(launch_unchecked)]
pub fn reduce<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: ReduceCfg) {
    let n = meta[ReduceParams::N_OUT] as usize;
    let o = ABSOLUTE_POS;
    if o < n {
        let r = meta[ReduceParams::REDUCED] as usize;
        let kr = comptime!(cfg.kept_rank);
        let rr = comptime!(cfg.red_rank);
        let base = strided_index(meta, o, ReduceParams::KEPT_SHAPE, comptime!(ReduceParams::x_at(kr)), kr);
        let mut acc = typed::read::<F>(arena, weights, base, cfg.x);
        for j in 1..r {
            let i = base
                + strided_index(meta, j, comptime!(ReduceParams::reduced_shape_at(kr)), comptime!(ReduceParams::reduced_at(kr, rr)), rr);
            let v = typed::read::<F>(arena, weights, i, cfg.x);
            match comptime!(cfg.op) {
                ReduceKind::Sum | ReduceKind::Mean => {
                    acc += v;
                }
                ReduceKind::Max => {
                    acc = F::max(acc, v);
                }
                ReduceKind::Min => {
                    acc = F::min(acc, v);
                }
            }
        }
        match comptime!(cfg.op) {
            ReduceKind::Mean => {
                acc /= F::cast_from(r as u32);
            }
            _ => {}
        }
        let out = meta[ReduceParams::OUT_OFF] as usize;
        typed::write::<F>(arena, out + o, acc, cfg.out);
    }
}

/// Softmax along an axis of stride `inner`, one unit per line. Meta: [`LineParams`].
#[cube(launch_unchecked)]
pub fn softmax_axis<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] x_in_arena: bool) {
    let lines = meta[LineParams::LINES] as usize;
    let line = ABSOLUTE_POS;
    if line < lines {
        let len = meta[LineParams::LEN_AXIS] as usize;
        let inner = meta[LineParams::INNER] as usize;
        let start = (line / inner) * len * inner + line % inner;
        let x0 = meta[LineParams::X_OFF] as usize + start;
        let o0 = meta[LineParams::OUT_OFF] as usize + start;
        let src = comptime!(Src::float(x_in_arena));
        let mut m = typed::read::<F>(arena, weights, x0, src);
        for j in 1..len {
            m = F::max(m, typed::read::<F>(arena, weights, x0 + j * inner, src));
        }
        let mut s = F::new(0.0);
        for j in 0..len {
            s += F::exp(typed::read::<F>(arena, weights, x0 + j * inner, src) - m);
        }
        for j in 0..len {
            arena[o0 + j * inner] = F::exp(typed::read::<F>(arena, weights, x0 + j * inner, src) - m) / s;
        }
    }
}

/// One token's log-probability per row (`Op::TokenLogProb`), one unit per row, in `F` (f32):
/// `x[id] - max - log(sum(exp(x - max)))`, the sum in index order. The interpreter takes the
/// log-sum-exp in f64 (WGSL has none), so the value differs from it by the f32 rounding of
/// the sum and the log: about `1e-6 * log(V)` relative. An id outside the row writes 0 (this
/// kernel has no error channel; the interpreter reports it). Meta: [`TokenParams`].
#[cube(launch_unchecked)]
pub fn token_log_prob<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] x: Src, #[comptime] idx: Src) {
    let rows = meta[TokenParams::ROWS] as usize;
    let row = ABSOLUTE_POS;
    if row < rows {
        let v = meta[TokenParams::V] as usize;
        let x0 = meta[TokenParams::X_OFF] as usize + row * v;
        let mut m = typed::read::<F>(arena, weights, x0, x);
        for j in 1..v {
            m = F::max(m, typed::read::<F>(arena, weights, x0 + j, x));
        }
        let mut s = F::new(0.0);
        for j in 0..v {
            s += F::exp(typed::read::<F>(arena, weights, x0 + j, x) - m);
        }
        let id = u32::cast_from(typed::read::<F>(arena, weights, meta[TokenParams::IDX_OFF] as usize + row, idx)) as usize;
        let mut out = F::new(0.0);
        if id < v {
            out = typed::read::<F>(arena, weights, x0 + id, x) - m - F::ln(s);
        }
        let o = meta[TokenParams::OUT_OFF] as usize + row;
        arena[o] = out;
    }
}
