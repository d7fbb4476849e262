//! From program steps to cube launches: each step's comptime configuration (which selects
//! the generated kernel) and its metadata block (sizes, offsets, strides) in the shared
//! `u32` buffer.

use super::expr::{instrs, reduce_kind};
use kiln_graph::dtype::broadcast_strides;
use kiln_graph::program::{Entry, Operand, Slot, Step};
use kiln_graph::{DType, MaskKind, Op, ResizeMode};
use kiln_kernels::cube::index::{CastCfg, CumsumCfg, GatherCfg, MoeCfg, ScatterCfg};
use kiln_kernels::cube::reduce::ReduceCfg;
use kiln_kernels::cube::{AttMask, AttentionCfg, CopyCfg, FusedCfg, MatmulCfg, NormCfg, NormKind, Repr, ResizeCfg, Src};

/// One kernel launch, with where its metadata block starts (in `u32`s) and its length.
#[derive(Clone, Debug)]
pub enum Launch {
    Copy {
        cfg: CopyCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    Fused {
        cfg: FusedCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    MatMul {
        cfg: MatmulCfg,
        m: usize,
        n: usize,
        batch: usize,
        meta: usize,
        len: usize,
    },
    Norm {
        cfg: NormCfg,
        rows: usize,
        meta: usize,
        len: usize,
    },
    Attention {
        cfg: AttentionCfg,
        sq: usize,
        heads: usize,
        batch: usize,
        meta: usize,
        len: usize,
    },
    Resize {
        cfg: ResizeCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    Reduce {
        cfg: ReduceCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    /// Softmax over a non-last axis: one unit per line.
    SoftmaxAxis {
        x_in_arena: bool,
        lines: usize,
        meta: usize,
        len: usize,
    },
    /// `n` units (for a byte output, one per word).
    Cast {
        cfg: CastCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    Iota {
        start: f32,
        step: f32,
        out: Repr,
        n: usize,
        meta: usize,
        len: usize,
    },
    Gather {
        cfg: GatherCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    /// `write_slice`: rows written at a position read on the device.
    WriteRows {
        cfg: GatherCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    ScatterAdd {
        cfg: ScatterCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    TopK {
        x: Src,
        out: Repr,
        n: usize,
        meta: usize,
        len: usize,
    },
    CumSum {
        cfg: CumsumCfg,
        lines: usize,
        meta: usize,
        len: usize,
    },
    MoeDispatch {
        cfg: MoeCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
    MoeCombine {
        cfg: MoeCfg,
        n: usize,
        meta: usize,
        len: usize,
    },
}

/// An entry's launches: one upload per input, then each step's (none for a view).
#[derive(Clone, Debug, Default)]
pub struct Lowered {
    pub uploads: Vec<Launch>,
    pub steps: Vec<Vec<Launch>>,
}

/// Appends a metadata block at a 256-byte boundary (wgpu binds buffers at such offsets).
fn push(meta: &mut Vec<u32>, block: Vec<u32>) -> (usize, usize) {
    meta.resize(meta.len().next_multiple_of(64), 0);
    let at = meta.len();
    let len = block.len();
    meta.extend(block);
    (at, len)
}

fn u(x: usize) -> Result<u32, String> {
    u32::try_from(x).map_err(|_| format!("size {x} exceeds the cube kernels' 32-bit indexing"))
}

/// Splits a shape at `axis` into (outer, len, inner).
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
}

/// How the arena stores a tensor of `d` (the weights buffer holds every dtype as floats).
pub fn repr(d: DType) -> Result<Repr, String> {
    match d {
        DType::F32 => Ok(Repr::Float),
        DType::I32 => Ok(Repr::I32),
        DType::I64 => Ok(Repr::I64),
        DType::Bool | DType::U8 => Ok(Repr::Byte),
        DType::F16 | DType::BF16 => Err(format!("the cube backend keeps activations in f32, not {d}")),
    }
}

/// Where an operand lives and how it is stored, and its offset in its element units.
fn src(o: &Operand, woff: &[usize], coff: &[usize]) -> Result<(Src, usize), String> {
    let (in_arena, off) = place(o, woff, coff)?;
    let repr = if in_arena { repr(o.ty.dtype)? } else { Repr::Float };
    Ok((Src { in_arena, repr }, off))
}

/// How an output (always in the arena) is stored, refusing a byte output where the kernel
/// writes one element per unit.
fn word_out(o: &Operand) -> Result<Repr, String> {
    match repr(o.ty.dtype)? {
        Repr::Byte => Err(format!("this cube kernel cannot write {} elements (one byte each)", o.ty.dtype)),
        r => Ok(r),
    }
}

/// Where an operand lives: (in the arena, offset in its element units: bytes for bool and u8,
/// 8-byte elements for i64).
fn place(o: &Operand, woff: &[usize], coff: &[usize]) -> Result<(bool, usize), String> {
    match o.slot {
        Slot::Arena { offset, .. } => Ok((true, offset / o.ty.dtype.size())),
        Slot::Weight(i) => woff.get(i as usize).map(|&w| (false, w)).ok_or_else(|| format!("weight {i} does not exist (corrupt program)")),
        Slot::Const(i) => coff.get(i as usize).map(|&c| (false, c)).ok_or_else(|| format!("constant {i} does not exist (corrupt program)")),
        // `CubeExec::new` moves every state operand to its arena range before lowering.
        Slot::State(i) => Err(format!("state {i} was not placed in the arena")),
    }
}

/// Scalars count as shape `[1]`.
fn shape_of(o: &Operand) -> Vec<usize> {
    if o.ty.shape.is_empty() {
        vec![1]
    } else {
        o.ty.shape.clone()
    }
}

/// A strided copy of `shape` elements from (`src_arena`, `src_off`, `src_st`) to the arena at
/// `dst_off` with `dst_st`.
#[allow(clippy::too_many_arguments)]
fn copy(
    meta: &mut Vec<u32>,
    shape: &[usize],
    src_arena: bool,
    src_off: usize,
    src_st: &[usize],
    dst_off: usize,
    dst_st: &[usize],
) -> Result<Launch, String> {
    let n: usize = shape.iter().product();
    let mut b = vec![u(n)?];
    for &d in shape {
        b.push(u(d)?);
    }
    b.push(u(src_off)?);
    for &s in src_st {
        b.push(u(s)?);
    }
    b.push(u(dst_off)?);
    for &s in dst_st {
        b.push(u(s)?);
    }
    let (at, len) = push(meta, b);
    Ok(Launch::Copy { cfg: CopyCfg { rank: shape.len(), src_in_arena: src_arena }, n, meta: at, len })
}

/// Per input: its offset and its strides broadcast to `out` (the layout `fused` and the
/// matmul epilogue read).
fn broadcast_block(b: &mut Vec<u32>, ins: &[&Operand], out: &[usize], woff: &[usize], coff: &[usize]) -> Result<Vec<Src>, String> {
    let mut srcs = Vec::with_capacity(ins.len());
    for o in ins {
        let (sr, off) = src(o, woff, coff)?;
        srcs.push(sr);
        b.push(u(off)?);
        let sh = if o.ty.shape.is_empty() { vec![] } else { o.ty.shape.clone() };
        let st = broadcast_strides(&sh, out);
        for s in st {
            b.push(u(s)?);
        }
    }
    Ok(srcs)
}

fn lower_step(s: &Step, woff: &[usize], coff: &[usize], meta: &mut Vec<u32>) -> Result<Vec<Launch>, String> {
    let out = shape_of(&s.output);
    let (_, out_off) = place(&s.output, woff, coff)?;
    let n: usize = out.iter().product();
    let ins: Vec<&Operand> = s.inputs.iter().collect();
    Ok(match &s.op {
        Op::Reshape { .. } => vec![],
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Broadcast { .. } | Op::Fused(_) => {
            let ex = s.op.elementwise_expr().ok_or("not an elementwise op")?;
            let mut b = vec![u(n)?, u(out_off)?];
            for &d in &out {
                b.push(u(d)?);
            }
            let srcs = broadcast_block(&mut b, &ins, &out, woff, coff)?;
            let (at, len) = push(meta, b);
            let cfg = FusedCfg {
                code: instrs(&ex),
                srcs,
                rank: out.len(),
                out: repr(s.output.ty.dtype)?,
                out_bool: s.output.ty.dtype == DType::Bool,
            };
            let units = if cfg.out == Repr::Byte { n.div_ceil(4) } else { n };
            vec![Launch::Fused { cfg, n: units, meta: at, len }]
        }
        Op::MatMul { transpose_b, epilogue } => {
            let (a, bm) = (&s.inputs[0].ty, &s.inputs[1].ty);
            let r = out.len();
            let (m, nn) = (out[r - 2], out[r - 1]);
            let kk = a.shape[a.rank() - 1];
            let batch = n / (m * nn).max(1);
            let (a_ar, a_off) = place(&s.inputs[0], woff, coff)?;
            let (b_ar, b_off) = place(&s.inputs[1], woff, coff)?;
            let mut b = vec![u(m)?, u(nn)?, u(kk)?, u(out_off)?];
            for &d in &out {
                b.push(u(d)?);
            }
            // Each operand's batch strides over the output's batch axes (0 where it broadcasts).
            for (t, off, mat) in [(a, a_off, m * kk), (bm, b_off, kk * nn)] {
                b.push(u(off)?);
                for st in broadcast_strides(&t.shape[..t.rank() - 2], &out[..r - 2]) {
                    b.push(u(st * mat)?);
                }
            }
            let epi = match epilogue {
                Some(e) => {
                    let srcs = broadcast_block(&mut b, &ins[2..], &out, woff, coff)?;
                    Some((instrs(e), srcs.iter().map(|s| s.in_arena).collect()))
                }
                None => None,
            };
            let (at, len) = push(meta, b);
            let cfg = MatmulCfg { transpose_b: *transpose_b, a_in_arena: a_ar, b_in_arena: b_ar, epilogue: epi, rank: r };
            vec![Launch::MatMul { cfg, m, n: nn, batch, meta: at, len }]
        }
        Op::LayerNorm { eps } => vec![norm(NormKind::Layer, *eps, s, woff, coff, meta)?],
        Op::RmsNorm { eps, add_one } => vec![norm(NormKind::Rms { add_one: *add_one }, *eps, s, woff, coff, meta)?],
        Op::Softmax { axis } if axis + 1 == out.len() => vec![norm(NormKind::Softmax, 0.0, s, woff, coff, meta)?],
        Op::Softmax { axis } => {
            let (x_in_arena, x_off) = place(&s.inputs[0], woff, coff)?;
            let (outer, len_, inner) = split(&out, *axis);
            let (at, len) = push(meta, vec![u(outer * inner)?, u(len_)?, u(inner)?, u(x_off)?, u(out_off)?]);
            vec![Launch::SoftmaxAxis { x_in_arena, lines: outer * inner, meta: at, len }]
        }
        Op::Reduce { op, axes, .. } => {
            let xs = shape_of(&s.inputs[0]);
            let (x, x_off) = src(&s.inputs[0], woff, coff)?;
            let st = contiguous(&xs);
            let (mut ks, mut kst, mut rs, mut rst) = (vec![], vec![], vec![], vec![]);
            for d in 0..xs.len() {
                if axes.contains(&d) {
                    rs.push(xs[d]);
                    rst.push(st[d]);
                } else {
                    ks.push(xs[d]);
                    kst.push(st[d]);
                }
            }
            for (sh, stv) in [(&mut ks, &mut kst), (&mut rs, &mut rst)] {
                if sh.is_empty() {
                    sh.push(1);
                    stv.push(0);
                }
            }
            let r: usize = rs.iter().product();
            let mut b = vec![u(n)?, u(r)?, u(out_off)?];
            b.extend(ks.iter().map(|&d| u(d)).collect::<Result<Vec<_>, _>>()?);
            b.push(u(x_off)?);
            b.extend(kst.iter().map(|&d| u(d)).collect::<Result<Vec<_>, _>>()?);
            b.extend(rs.iter().map(|&d| u(d)).collect::<Result<Vec<_>, _>>()?);
            b.push(0);
            b.extend(rst.iter().map(|&d| u(d)).collect::<Result<Vec<_>, _>>()?);
            let (at, len) = push(meta, b);
            let cfg = ReduceCfg { op: reduce_kind(*op), kept_rank: ks.len(), red_rank: rs.len(), x, out: word_out(&s.output)? };
            vec![Launch::Reduce { cfg, n, meta: at, len }]
        }
        Op::Cast { to } => {
            let (x, x_off) = src(&s.inputs[0], woff, coff)?;
            let out_r = repr(*to)?;
            let trunc = s.inputs[0].ty.dtype.is_float() && !to.is_float();
            let (at, len) = push(meta, vec![u(n)?, u(x_off)?, u(out_off)?]);
            let units = if out_r == Repr::Byte { n.div_ceil(4) } else { n };
            vec![Launch::Cast { cfg: CastCfg { x, out: out_r, out_bool: *to == DType::Bool, trunc }, n: units, meta: at, len }]
        }
        Op::Iota { axis, start, step } => {
            let (_, len_, inner) = split(&out, *axis);
            let (at, len) = push(meta, vec![u(n)?, u(len_)?, u(inner)?, u(out_off)?]);
            vec![Launch::Iota { start: *start as f32, step: *step as f32, out: word_out(&s.output)?, n, meta: at, len }]
        }
        Op::Gather { axis } | Op::TakeAlongAxis { axis } => {
            let along = matches!(s.op, Op::TakeAlongAxis { .. });
            let (x, x_off) = src(&s.inputs[0], woff, coff)?;
            let (idx, idx_off) = src(&s.inputs[1], woff, coff)?;
            let (_, x_len, inner) = split(&shape_of(&s.inputs[0]), *axis);
            let mid = if along { shape_of(&s.inputs[1])[*axis] } else { s.inputs[1].ty.numel() };
            let b = vec![u(n)?, u(mid)?, u(inner)?, u(x_len)?, u(x_off)?, u(idx_off)?, u(out_off)?];
            let (at, len) = push(meta, b);
            vec![Launch::Gather { cfg: GatherCfg { along, x, idx, out: word_out(&s.output)? }, n, meta: at, len }]
        }
        Op::WriteSlice { axis } => {
            // In place when the lowering aliased the output to the destination (a state);
            // otherwise the destination is copied first.
            let mut v = Vec::new();
            if s.inputs[0].slot != s.output.slot {
                v.push(strided(meta, s, &out, 0, &contiguous(&out), woff, coff)?);
            }
            let (x, x_off) = src(&s.inputs[1], woff, coff)?;
            let (idx, idx_off) = src(&s.inputs[2], woff, coff)?;
            let (_, len_, inner) = split(&out, *axis);
            let rows = shape_of(&s.inputs[1])[*axis];
            let units = s.inputs[1].ty.numel();
            let b = vec![u(units)?, u(rows)?, u(inner)?, u(len_)?, u(x_off)?, u(idx_off)?, u(out_off)?];
            let (at, len) = push(meta, b);
            v.push(Launch::WriteRows { cfg: GatherCfg { along: false, x, idx, out: word_out(&s.output)? }, n: units, meta: at, len });
            v
        }
        Op::ScatterAdd { axis } => {
            let (base, base_off) = src(&s.inputs[0], woff, coff)?;
            let (idx, idx_off) = src(&s.inputs[1], woff, coff)?;
            let (sr, src_off) = src(&s.inputs[2], woff, coff)?;
            let (_, len_, inner) = split(&out, *axis);
            let ilen = shape_of(&s.inputs[1])[*axis];
            let b = vec![u(n)?, u(len_)?, u(inner)?, u(ilen)?, u(base_off)?, u(idx_off)?, u(src_off)?, u(out_off)?];
            let (at, len) = push(meta, b);
            vec![Launch::ScatterAdd { cfg: ScatterCfg { base, idx, src: sr, out: word_out(&s.output)? }, n, meta: at, len }]
        }
        Op::TopK { k } => {
            let (x, x_off) = src(&s.inputs[0], woff, coff)?;
            let xs = shape_of(&s.inputs[0]);
            let d = xs[xs.len() - 1];
            let total: usize = xs.iter().product();
            let (at, len) = push(meta, vec![u(total)?, u(d)?, u(*k)?, u(x_off)?, u(out_off)?]);
            vec![Launch::TopK { x, out: word_out(&s.output)?, n: total, meta: at, len }]
        }
        Op::CumSum { axis, exclusive } => {
            let (x, x_off) = src(&s.inputs[0], woff, coff)?;
            let (outer, len_, inner) = split(&out, *axis);
            let (at, len) = push(meta, vec![u(outer * inner)?, u(len_)?, u(inner)?, u(x_off)?, u(out_off)?]);
            let cfg = CumsumCfg { exclusive: *exclusive, x, out: word_out(&s.output)? };
            vec![Launch::CumSum { cfg, lines: outer * inner, meta: at, len }]
        }
        Op::MoeDispatch { rows } => {
            let (x_in_arena, x_off) = place(&s.inputs[0], woff, coff)?;
            let (slot, slot_off) = src(&s.inputs[1], woff, coff)?;
            let d = s.inputs[0].ty.shape[1];
            let (tk, kk) = (s.inputs[1].ty.numel(), s.inputs[1].ty.shape[1]);
            let (at, len) = push(meta, vec![u(rows * d)?, u(d)?, u(tk)?, u(kk)?, u(x_off)?, u(slot_off)?, u(out_off)?]);
            vec![Launch::MoeDispatch { cfg: MoeCfg { x_in_arena, slot, w_in_arena: true }, n: rows * d, meta: at, len }]
        }
        Op::MoeCombine => {
            let (y_in_arena, y_off) = place(&s.inputs[0], woff, coff)?;
            let (slot, slot_off) = src(&s.inputs[1], woff, coff)?;
            let (w_in_arena, w_off) = place(&s.inputs[2], woff, coff)?;
            let d = s.inputs[0].ty.shape[1];
            let kk = s.inputs[1].ty.shape[1];
            let (at, len) = push(meta, vec![u(n)?, u(d)?, u(kk)?, u(y_off)?, u(slot_off)?, u(w_off)?, u(out_off)?]);
            vec![Launch::MoeCombine { cfg: MoeCfg { x_in_arena: y_in_arena, slot, w_in_arena }, n, meta: at, len }]
        }
        Op::Attention(att) => {
            let (q, kt, v) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &s.inputs[2].ty.shape);
            let (batch, sq, hq, d) = (q[0], q[1], q[2], q[3]);
            let (sk, hkv, dv) = (kt[1], kt[2], v[3]);
            let mut offs = [0usize; 4];
            let mut in_arena = [true; 4];
            for (j, o) in ins.iter().enumerate().take(4) {
                let (a, off) = place(o, woff, coff)?;
                in_arena[j] = a;
                offs[j] = off;
            }
            let (mask, q_offset, window) = match att.mask {
                MaskKind::None => (AttMask::None, 0, 0),
                MaskKind::Causal { q_offset } => (AttMask::Causal, q_offset, 0),
                MaskKind::SlidingWindow { q_offset, window } => (AttMask::Sliding, q_offset, window),
                MaskKind::Additive => (AttMask::Additive { in_arena: in_arena[3] }, 0, 0),
            };
            let b = vec![
                u(sq)?,
                u(sk)?,
                u(hq)?,
                u(hkv)?,
                u(offs[0])?,
                u(offs[1])?,
                u(offs[2])?,
                u(out_off)?,
                u(offs[3])?,
                u(q_offset)?,
                u(window)?,
            ];
            let (at, len) = push(meta, b);
            let cfg = AttentionCfg {
                d,
                dv,
                scale_bits: att.scale.to_bits(),
                softcap_bits: att.softcap.map(f32::to_bits),
                mask,
                in_arena: [in_arena[0], in_arena[1], in_arena[2]],
            };
            vec![Launch::Attention { cfg, sq, heads: hq, batch, meta: at, len }]
        }
        Op::Resize { size, mode } => {
            let (a, off) = place(&s.inputs[0], woff, coff)?;
            let sh = &s.inputs[0].ty.shape;
            let (ih, iw) = (sh[sh.len() - 2], sh[sh.len() - 1]);
            let b = vec![u(n)?, u(ih)?, u(iw)?, u(size[0])?, u(size[1])?, u(off)?, u(out_off)?];
            let (at, len) = push(meta, b);
            vec![Launch::Resize { cfg: ResizeCfg { bicubic: *mode == ResizeMode::Bicubic, in_arena: a }, n, meta: at, len }]
        }
        Op::Permute { perm } => {
            let st = contiguous(&s.inputs[0].ty.shape);
            let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            vec![strided(meta, s, &out, 0, &pst, woff, coff)?]
        }
        Op::Slice { axis, start, step, .. } => {
            let mut st = contiguous(&s.inputs[0].ty.shape);
            let skip = start * st[*axis];
            st[*axis] *= step;
            vec![strided(meta, s, &out, skip, &st, woff, coff)?]
        }
        Op::Concat { axis } => {
            let dt = s.output.ty.dtype;
            // An i64 element is two words: copy words, with a trailing axis of 2.
            let w = if dt == DType::I64 { 2 } else { 1 };
            let widen = |sh: &[usize]| if w == 2 { sh.iter().copied().chain([2]).collect() } else { sh.to_vec() };
            let dst = contiguous(&widen(&out));
            let mut at = 0;
            let mut v = Vec::with_capacity(ins.len());
            for o in &ins {
                let (sr, off) = src(o, woff, coff)?;
                let word_copy = match sr.repr {
                    Repr::Float => dt == DType::F32,
                    Repr::I32 | Repr::I64 => true,
                    Repr::Byte => false,
                };
                if !word_copy {
                    return Err(format!("concat of {dt} from the weights buffer or in bytes has no cube kernel"));
                }
                let sh = widen(&shape_of(o));
                v.push(copy(meta, &sh, sr.in_arena, off * w, &contiguous(&sh), out_off * w + at * dst[*axis], &dst)?);
                at += sh[*axis];
            }
            v
        }
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => return Err("a source is not a step".into()),
    })
}

/// A permute or slice: a strided read of input 0 (`skip` elements in, strides `st`) into the
/// contiguous output. f32 goes through `copy`; other dtypes through an identity `fused`
/// region, which converts between the weights buffer's floats and the arena's layouts.
fn strided(
    meta: &mut Vec<u32>,
    s: &Step,
    out: &[usize],
    skip: usize,
    st: &[usize],
    woff: &[usize],
    coff: &[usize],
) -> Result<Launch, String> {
    let (sr, off) = src(&s.inputs[0], woff, coff)?;
    let (_, out_off) = place(&s.output, woff, coff)?;
    if s.output.ty.dtype == DType::F32 {
        return copy(meta, out, sr.in_arena, off + skip, st, out_off, &contiguous(out));
    }
    let n: usize = out.iter().product();
    let mut b = vec![u(n)?, u(out_off)?];
    for &d in out {
        b.push(u(d)?);
    }
    b.push(u(off + skip)?);
    for &x in st {
        b.push(u(x)?);
    }
    let (at, len) = push(meta, b);
    let out_r = repr(s.output.ty.dtype)?;
    let code = instrs(&kiln_graph::Expr { instrs: vec![kiln_graph::Instr::Input(0)] });
    let cfg = FusedCfg { code, srcs: vec![sr], rank: out.len(), out: out_r, out_bool: s.output.ty.dtype == DType::Bool };
    let units = if out_r == Repr::Byte { n.div_ceil(4) } else { n };
    Ok(Launch::Fused { cfg, n: units, meta: at, len })
}

/// A row-wise normalisation over the last axis: inputs x and (for norms) weight and bias.
fn norm(kind: NormKind, eps: f32, s: &Step, woff: &[usize], coff: &[usize], meta: &mut Vec<u32>) -> Result<Launch, String> {
    let out = shape_of(&s.output);
    let (_, out_off) = place(&s.output, woff, coff)?;
    let d = *out.last().unwrap_or(&1);
    let rows = out.iter().product::<usize>() / d.max(1);
    let mut offs = [0usize; 3];
    let mut in_arena = [true; 3];
    for (j, o) in s.inputs.iter().enumerate().take(3) {
        (in_arena[j], offs[j]) = place(o, woff, coff)?;
    }
    let (at, len) = push(meta, vec![u(rows)?, u(d)?, u(offs[0])?, u(offs[1])?, u(offs[2])?, u(out_off)?]);
    Ok(Launch::Norm { cfg: NormCfg { kind, eps_bits: eps.to_bits(), in_arena }, rows, meta: at, len })
}

/// Lowers every step of `e`; errors carry (step, op, message).
pub fn lower_entry(e: &Entry, woff: &[usize], coff: &[usize], meta: &mut Vec<u32>) -> Result<Lowered, (usize, &'static str, String)> {
    let mut low = Lowered::default();
    for io in &e.inputs {
        // Inputs arrive as raw bytes: copy whole words to the slot's word offset.
        let Slot::Arena { offset, .. } = io.operand.slot else {
            return Err((0, "input", format!("input {} is not in the arena (corrupt program)", io.name)));
        };
        let words = io.operand.ty.bytes().div_ceil(4);
        low.uploads.push(copy(meta, &[words], false, 0, &[1], offset / 4, &[1]).map_err(|m| (0, "input", m))?);
    }
    for (i, s) in e.steps.iter().enumerate() {
        low.steps.push(lower_step(s, woff, coff, meta).map_err(|m| (i, s.op.name(), m))?);
    }
    Ok(low)
}
