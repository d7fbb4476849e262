//! Index and type ops: cast, iota, gather / take-along-axis, scatter-add, top-k, cumsum and
//! the mixture-of-experts dispatch and combine. Each is one unit per output element (per
//! word, for a byte output) that reads what it needs, so no kernel races or needs atomics:
//! scatter-add and dispatch gather their contributions instead of scattering them.

use super::params::{CastParams, GatherParams, IotaParams, LineParams, MoeCombineParams, MoeDispatchParams, ScatterParams, TopkParams};
use super::typed::{self, Repr, Src};
use cubecl::prelude::*;

/// What varies the code of a [`cast`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct CastCfg {
    pub x: Src,
    pub out: Repr,
    /// The output is `bool` (any non-zero value is 1).
    pub out_bool: bool,
    /// Truncate toward zero (a float cast to an integer type).
    pub trunc: bool,
}

/// Converts element types. Meta: [`CastParams`].
#[cube(launch_unchecked)]
pub fn cast<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: CastCfg) {
    let n = meta[CastParams::N] as usize;
    let x0 = meta[CastParams::X_OFF] as usize;
    let out = meta[CastParams::OUT_OFF] as usize;
    match comptime!(cfg.out) {
        Repr::Byte => {
            let w = ABSOLUTE_POS;
            if w * 4 < n {
                let mut word = 0u32;
                for e in 0..4usize {
                    let o = w * 4 + e;
                    if o < n {
                        let v = typed::read::<F>(arena, weights, x0 + o, cfg.x);
                        word |= typed::byte_of::<F>(v, cfg.out_bool) << ((e * 8) as u32);
                    }
                }
                typed::write_bytes::<F>(arena, out + w * 4, word);
            }
        }
        _ => {
            let o = ABSOLUTE_POS;
            if o < n {
                let mut v = typed::read::<F>(arena, weights, x0 + o, cfg.x);
                if comptime!(cfg.trunc) {
                    v = F::trunc(v);
                }
                typed::write::<F>(arena, out + o, v, comptime!(cfg.out));
            }
        }
    }
}

/// `start + step * (position along the axis)`. Meta: [`IotaParams`].
#[cube(launch_unchecked)]
pub fn iota<F: Float>(
    arena: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] start_bits: u32,
    #[comptime] step_bits: u32,
    #[comptime] out: Repr,
) {
    let n = meta[IotaParams::N] as usize;
    let o = ABSOLUTE_POS;
    if o < n {
        let len = meta[IotaParams::LEN_AXIS] as usize;
        let inner = meta[IotaParams::INNER] as usize;
        let start = F::new(comptime!(f32::from_bits(start_bits)));
        let step = F::new(comptime!(f32::from_bits(step_bits)));
        let v = start + step * F::cast_from(((o / inner) % len) as u32);
        let off = meta[IotaParams::OUT_OFF] as usize;
        typed::write::<F>(arena, off + o, v, out);
    }
}

/// What varies the code of a [`gather`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct GatherCfg {
    /// Take-along-axis (the index has x's rank, read at the output position) rather than
    /// gather (the index is read at the output's middle coordinate).
    pub along: bool,
    pub x: Src,
    pub idx: Src,
    pub out: Repr,
    /// A gather times a scale (`Op::GatherScaled`): each value times `f32::from_bits(scale_bits)`.
    pub scaled: bool,
    pub scale_bits: u32,
    /// Independent row writes run by a [`write_rows`] launch, one per `CUBE_POS_Y`
    /// ([`super::part_base`]); 1 for a gather.
    pub parts: u32,
}

/// `out[o, j, i] = x[o, idx[..], i]` (times the scale where `cfg.scaled`). Meta: [`GatherParams`] (the output `[outer, rows,
/// inner]`, x `[outer, len, inner]`).
#[cube(launch_unchecked)]
pub fn gather<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: GatherCfg) {
    let n = meta[GatherParams::N] as usize;
    let o = ABSOLUTE_POS;
    if o < n {
        let mid = meta[GatherParams::ROWS] as usize;
        let inner = meta[GatherParams::INNER] as usize;
        let x_len = meta[GatherParams::LEN_AXIS] as usize;
        let outer = o / (mid * inner);
        let mut at = (o / inner) % mid;
        if comptime!(cfg.along) {
            at = o;
        }
        let j = u32::cast_from(typed::read::<F>(arena, weights, meta[GatherParams::IDX_OFF] as usize + at, cfg.idx)) as usize;
        let mut x = typed::read::<F>(arena, weights, meta[GatherParams::X_OFF] as usize + (outer * x_len + j) * inner + o % inner, cfg.x);
        if comptime!(cfg.scaled) {
            x *= F::new(comptime!(f32::from_bits(cfg.scale_bits)));
        }
        let out = meta[GatherParams::OUT_OFF] as usize;
        typed::write::<F>(arena, out + o, x, cfg.out);
    }
}

/// `out[o, at + j, i] = x[o, j, i]` with `at` read from `idx[0]` (a KV-cache row written in
/// place): one unit per element of `x`. Meta: [`GatherParams`] for `x [outer, rows, inner]`
/// and `out [outer, len, inner]`. A position that does not fit writes nothing (the
/// interpreter reports it; this kernel has no error channel).
#[cube(launch_unchecked)]
pub fn write_rows<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: GatherCfg) {
    let base = crate::cube::part_base(meta, CUBE_POS_Y, cfg.parts);
    let n = meta[base + GatherParams::N] as usize;
    let o = ABSOLUTE_POS_X as usize;
    if o < n {
        let rows = meta[base + GatherParams::ROWS] as usize;
        let inner = meta[base + GatherParams::INNER] as usize;
        let len = meta[base + GatherParams::LEN_AXIS] as usize;
        let at = u32::cast_from(typed::read::<F>(arena, weights, meta[base + GatherParams::IDX_OFF] as usize, cfg.idx)) as usize;
        if at + rows <= len {
            let outer = o / (rows * inner);
            let j = (o / inner) % rows;
            let x = typed::read::<F>(arena, weights, meta[base + GatherParams::X_OFF] as usize + o, cfg.x);
            let out = meta[base + GatherParams::OUT_OFF] as usize;
            typed::write::<F>(arena, out + (outer * len + at + j) * inner + o % inner, x, cfg.out);
        }
    }
}

/// A matmul's output element `o` (value `v`) also stored where the row write it absorbed puts
/// it: meta at `at` holds the write's rows' element offset in the matmul's output, then the
/// write's [`GatherParams`] (its rows are that range of the output, its output an f32 cache).
#[cube]
pub(crate) fn store_row<F: Float>(
    arena: &mut Array<F>,
    weights: &Array<F>,
    meta: &Array<u32>,
    at: usize,
    o: usize,
    v: F,
    #[comptime] idx: Src,
) {
    let delta = meta[at] as usize;
    let g = at + 1;
    let n = meta[g + GatherParams::N] as usize;
    if o >= delta && o - delta < n {
        let r = o - delta;
        let rows = meta[g + GatherParams::ROWS] as usize;
        let inner = meta[g + GatherParams::INNER] as usize;
        let len = meta[g + GatherParams::LEN_AXIS] as usize;
        let pos = u32::cast_from(typed::read::<F>(arena, weights, meta[g + GatherParams::IDX_OFF] as usize, idx)) as usize;
        if pos + rows <= len {
            let outer = r / (rows * inner);
            let j = (r / inner) % rows;
            let out = meta[g + GatherParams::OUT_OFF] as usize;
            arena[out + (outer * len + pos + j) * inner + r % inner] = v;
        }
    }
}

/// What varies the code of a [`scatter_add`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ScatterCfg {
    pub base: Src,
    pub idx: Src,
    pub src: Src,
    pub out: Repr,
}

/// `out = base; out[o, idx[o, j, i], i] += src[o, j, i]`, each output element summing the
/// entries that name it (in index order, so the sum is deterministic). Meta:
/// [`ScatterParams`] for a `[outer, len, inner]` output.
#[cube(launch_unchecked)]
pub fn scatter_add<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: ScatterCfg) {
    let n = meta[ScatterParams::N] as usize;
    let o = ABSOLUTE_POS;
    if o < n {
        let len = meta[ScatterParams::LEN_AXIS] as usize;
        let inner = meta[ScatterParams::INNER] as usize;
        let ilen = meta[ScatterParams::IDX_LEN] as usize;
        let outer = o / (len * inner);
        let t = (o / inner) % len;
        let i = o % inner;
        let mut acc = typed::read::<F>(arena, weights, meta[ScatterParams::BASE_OFF] as usize + o, cfg.base);
        for j in 0..ilen {
            let e = (outer * ilen + j) * inner + i;
            let target = u32::cast_from(typed::read::<F>(arena, weights, meta[ScatterParams::IDX_OFF] as usize + e, cfg.idx)) as usize;
            if target == t {
                acc += typed::read::<F>(arena, weights, meta[ScatterParams::SRC_OFF] as usize + e, cfg.src);
            }
        }
        let out = meta[ScatterParams::OUT_OFF] as usize;
        typed::write::<F>(arena, out + o, acc, cfg.out);
    }
}

/// Top-k indices along the last axis by rank: the unit of element `j` counts the elements
/// ahead of it (larger, or equal at a lower index), stopping once `k` are, and if fewer than
/// `k` writes `j` at that rank (so a row of `d` costs about `d * k * ln(d)` reads, not `d^2`:
/// greedy decoding's argmax over a vocabulary). Meta: [`TopkParams`].
#[cube(launch_unchecked)]
pub fn topk<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] x: Src, #[comptime] out: Repr) {
    let n = meta[TopkParams::N] as usize;
    let o = ABSOLUTE_POS;
    if o < n {
        let d = meta[TopkParams::D] as usize;
        let k = meta[TopkParams::K] as usize;
        let row = o / d;
        let j = o % d;
        let x0 = meta[TopkParams::X_OFF] as usize + row * d;
        let v = typed::read::<F>(arena, weights, x0 + j, x);
        let mut rank = 0usize;
        let mut e = 0usize;
        while e < d && rank < k {
            let w = typed::read::<F>(arena, weights, x0 + e, x);
            if w > v || (w == v && e < j) {
                rank += 1;
            }
            e += 1;
        }
        if rank < k {
            let dst = meta[TopkParams::OUT_OFF] as usize + row * k + rank;
            typed::write::<F>(arena, dst, F::cast_from(j as u32), out);
        }
    }
}

/// What varies the code of a [`cumsum`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct CumsumCfg {
    pub exclusive: bool,
    pub x: Src,
    pub out: Repr,
}

/// Running sum along an axis of stride `inner`, one unit per line. Meta: [`LineParams`].
#[cube(launch_unchecked)]
pub fn cumsum<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: CumsumCfg) {
    let lines = meta[LineParams::LINES] as usize;
    let line = ABSOLUTE_POS;
    if line < lines {
        let len = meta[LineParams::LEN_AXIS] as usize;
        let inner = meta[LineParams::INNER] as usize;
        let start = (line / inner) * len * inner + line % inner;
        let x0 = meta[LineParams::X_OFF] as usize + start;
        let o0 = meta[LineParams::OUT_OFF] as usize + start;
        let mut acc = F::new(0.0);
        for j in 0..len {
            let v = typed::read::<F>(arena, weights, x0 + j * inner, cfg.x);
            if comptime!(cfg.exclusive) {
                typed::write::<F>(arena, o0 + j * inner, acc, cfg.out);
                acc += v;
            } else {
                acc += v;
                typed::write::<F>(arena, o0 + j * inner, acc, cfg.out);
            }
        }
    }
}

/// What varies the code of the MoE launches.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct MoeCfg {
    /// Where the activations (x for dispatch, y for combine) live.
    pub x_in_arena: bool,
    pub slot: Src,
    pub w_in_arena: bool,
}

/// Dispatch: `out[r, c] = sum over (t, k) with slot[t, k] == r of x[t, c]`. Meta:
/// [`MoeDispatchParams`].
#[cube(launch_unchecked)]
pub fn moe_dispatch<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: MoeCfg) {
    let n = meta[MoeDispatchParams::N] as usize;
    let o = ABSOLUTE_POS;
    if o < n {
        let d = meta[MoeDispatchParams::D] as usize;
        let tk = meta[MoeDispatchParams::ASSIGNMENTS] as usize;
        let kk = meta[MoeDispatchParams::K] as usize;
        let r = F::cast_from((o / d) as u32);
        let c = o % d;
        let mut acc = F::new(0.0);
        for a in 0..tk {
            if typed::read::<F>(arena, weights, meta[MoeDispatchParams::SLOT_OFF] as usize + a, cfg.slot) == r {
                let x = meta[MoeDispatchParams::X_OFF] as usize + (a / kk) * d + c;
                acc += typed::read::<F>(arena, weights, x, comptime!(Src::float(cfg.x_in_arena)));
            }
        }
        let out = meta[MoeDispatchParams::OUT_OFF] as usize;
        arena[out + o] = acc;
    }
}

/// Combine: `out[t, c] = sum_k w[t, k] y[slot[t, k], c]` over `slot >= 0`. Meta:
/// [`MoeCombineParams`].
#[cube(launch_unchecked)]
pub fn moe_combine<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: MoeCfg) {
    let n = meta[MoeCombineParams::N] as usize;
    let o = ABSOLUTE_POS;
    if o < n {
        let d = meta[MoeCombineParams::D] as usize;
        let kk = meta[MoeCombineParams::K] as usize;
        let t = o / d;
        let c = o % d;
        let mut acc = F::new(0.0);
        for j in 0..kk {
            let s = typed::read::<F>(arena, weights, meta[MoeCombineParams::SLOT_OFF] as usize + t * kk + j, cfg.slot);
            if s >= F::new(0.0) {
                let r = u32::cast_from(s) as usize;
                let w_at = meta[MoeCombineParams::W_OFF] as usize + t * kk + j;
                let w = typed::read::<F>(arena, weights, w_at, comptime!(Src::float(cfg.w_in_arena)));
                let y_at = meta[MoeCombineParams::Y_OFF] as usize + r * d + c;
                acc += w * typed::read::<F>(arena, weights, y_at, comptime!(Src::float(cfg.x_in_arena)));
            }
        }
        let out = meta[MoeCombineParams::OUT_OFF] as usize;
        arena[out + o] = acc;
    }
}
