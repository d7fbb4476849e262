//! From program steps to cube launches: each step's comptime configuration (which selects
//! the generated kernel) and its metadata block (sizes, offsets, strides) in the shared
//! `u32` buffer.

use kiln_graph::dtype::broadcast_strides;
use kiln_graph::program::{Entry, Operand, Slot, Step};
use kiln_graph::{MaskKind, Op, ResizeMode};
use kiln_kernels::cube::{expr::instrs, AttMask, AttentionCfg, CopyCfg, FusedCfg, MatmulCfg, NormCfg, NormKind, ResizeCfg};

/// One kernel launch, with where its metadata block starts (in `u32`s) and its length.
#[derive(Clone, Debug)]
pub enum Launch {
    Copy { cfg: CopyCfg, n: usize, meta: usize, len: usize },
    Fused { cfg: FusedCfg, n: usize, meta: usize, len: usize },
    MatMul { cfg: MatmulCfg, m: usize, n: usize, batch: usize, meta: usize, len: usize },
    Norm { cfg: NormCfg, rows: usize, meta: usize, len: usize },
    Attention { cfg: AttentionCfg, sq: usize, heads: usize, batch: usize, meta: usize, len: usize },
    Resize { cfg: ResizeCfg, n: usize, meta: usize, len: usize },
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

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
}

/// Where an operand lives: (in the arena, element offset).
fn place(o: &Operand, woff: &[usize], coff: &[usize]) -> Result<(bool, usize), String> {
    match o.slot {
        Slot::Arena { offset, .. } => Ok((true, offset / 4)),
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
fn broadcast_block(b: &mut Vec<u32>, ins: &[&Operand], out: &[usize], woff: &[usize], coff: &[usize]) -> Result<Vec<bool>, String> {
    let mut in_arena = Vec::with_capacity(ins.len());
    for o in ins {
        let (a, off) = place(o, woff, coff)?;
        in_arena.push(a);
        b.push(u(off)?);
        let sh = if o.ty.shape.is_empty() { vec![] } else { o.ty.shape.clone() };
        let st = broadcast_strides(&sh, out);
        for s in st {
            b.push(u(s)?);
        }
    }
    Ok(in_arena)
}

fn lower_step(s: &Step, woff: &[usize], coff: &[usize], meta: &mut Vec<u32>) -> Result<Vec<Launch>, String> {
    let out = shape_of(&s.output);
    let (_, out_off) = place(&s.output, woff, coff)?;
    let n: usize = out.iter().product();
    let ins: Vec<&Operand> = s.inputs.iter().collect();
    Ok(match &s.op {
        Op::Reshape { .. } => vec![],
        Op::Unary(_) | Op::Binary(_) | Op::Broadcast { .. } | Op::Fused(_) => {
            let ex = crate::cpu::fused::expr_of(&s.op).ok_or("not an elementwise op")?;
            let mut b = vec![u(n)?, u(out_off)?];
            for &d in &out {
                b.push(u(d)?);
            }
            let in_arena = broadcast_block(&mut b, &ins, &out, woff, coff)?;
            let (at, len) = push(meta, b);
            vec![Launch::Fused { cfg: FusedCfg { code: instrs(&ex), in_arena, rank: out.len() }, n, meta: at, len }]
        }
        Op::MatMul { transpose_b, epilogue } => {
            let (a, bm) = (&s.inputs[0].ty, &s.inputs[1].ty);
            let r = out.len();
            let (m, nn) = (out[r - 2], out[r - 1]);
            let kk = a.shape[a.rank() - 1];
            let batch = n / (m * nn).max(1);
            let lead = |t: &kiln_graph::TensorType| t.shape[..t.rank() - 2].iter().product::<usize>();
            let a_bs = if lead(a) == batch && batch > 1 { m * kk } else { 0 };
            let b_bs = if lead(bm) == batch && batch > 1 { kk * nn } else { 0 };
            let (a_ar, a_off) = place(&s.inputs[0], woff, coff)?;
            let (b_ar, b_off) = place(&s.inputs[1], woff, coff)?;
            let mut b = vec![u(m)?, u(nn)?, u(kk)?, u(a_off)?, u(b_off)?, u(out_off)?, u(a_bs)?, u(b_bs)?];
            for &d in &out {
                b.push(u(d)?);
            }
            let epi = match epilogue {
                Some(e) => Some((instrs(e), broadcast_block(&mut b, &ins[2..], &out, woff, coff)?)),
                None => None,
            };
            let (at, len) = push(meta, b);
            let cfg = MatmulCfg { transpose_b: *transpose_b, a_in_arena: a_ar, b_in_arena: b_ar, epilogue: epi, rank: r };
            vec![Launch::MatMul { cfg, m, n: nn, batch, meta: at, len }]
        }
        Op::LayerNorm { eps } => vec![norm(NormKind::Layer, *eps, s, woff, coff, meta)?],
        Op::RmsNorm { eps, add_one } => vec![norm(NormKind::Rms { add_one: *add_one }, *eps, s, woff, coff, meta)?],
        Op::Softmax { .. } => vec![norm(NormKind::Softmax, 0.0, s, woff, coff, meta)?],
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
            let (a, off) = place(&s.inputs[0], woff, coff)?;
            let st = contiguous(&s.inputs[0].ty.shape);
            let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            vec![copy(meta, &out, a, off, &pst, out_off, &contiguous(&out))?]
        }
        Op::Slice { axis, start, step, .. } => {
            let (a, off) = place(&s.inputs[0], woff, coff)?;
            let mut st = contiguous(&s.inputs[0].ty.shape);
            let base = off + start * st[*axis];
            st[*axis] *= step;
            vec![copy(meta, &out, a, base, &st, out_off, &contiguous(&out))?]
        }
        Op::Concat { axis } => {
            let dst = contiguous(&out);
            let mut at = 0;
            let mut v = Vec::with_capacity(ins.len());
            for o in &ins {
                let (a, off) = place(o, woff, coff)?;
                let sh = shape_of(o);
                v.push(copy(meta, &sh, a, off, &contiguous(&sh), out_off + at * dst[*axis], &dst)?);
                at += sh[*axis];
            }
            v
        }
        other => return Err(format!("{} has no cube kernel", other.name())),
    })
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
        let sh = shape_of(&io.operand);
        let (_, off) = place(&io.operand, woff, coff).map_err(|m| (0, "input", m))?;
        low.uploads.push(copy(meta, &[sh.iter().product()], false, 0, &[1], off, &[1]).map_err(|m| (0, "input", m))?);
    }
    for (i, s) in e.steps.iter().enumerate() {
        low.steps.push(lower_step(s, woff, coff, meta).map_err(|m| (i, s.op.name(), m))?);
    }
    Ok(low)
}
