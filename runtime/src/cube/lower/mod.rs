//! From program steps to cube launches: each step's comptime configuration (which selects
//! the generated kernel) and its metadata block in the shared `u32` buffer, a typed
//! `kiln_kernels::cube::params` struct packed in one place. The index math comes from
//! [`crate::geometry`], shared with the cuda lowering.

mod absorb;
mod compute;
mod merge;

use super::expr::{instrs, reduce_kind};
use crate::geometry::{self, at_least_1d, contiguous, ConcatGeometry, ElementwiseGeometry, ReduceGeometry, Split, ViewGeometry};
use kiln_graph::program::{Entry, Operand, Slot, Step};
use kiln_graph::{DType, Expr, Instr, Op, ReduceOp, ResizeMode};
use kiln_kernels::cube::index::{CastCfg, CumsumCfg, GatherCfg, MoeCfg, ScatterCfg};
use kiln_kernels::cube::params::{
    Axis, CastParams, CopyParams, FusedParams, GatherParams, IotaParams, LineParams, MoeCombineParams, MoeDispatchParams, ReduceParams,
    ResizeParams, ScatterParams, Strided, TokenParams, TopkParams,
};
use kiln_kernels::cube::reduce::ReduceCfg;
use kiln_kernels::cube::residual::ResidualNormCfg;
use kiln_kernels::cube::{AttentionCfg, CopyCfg, FusedCfg, GatedCfg, MatmulCfg, NormCfg, NormKind, Repr, ResizeCfg, Src};

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
    /// A GLU's two products and epilogue, on [`MatMul`](Launch::MatMul)'s grid.
    Gated {
        cfg: GatedCfg,
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
    ResidualNorm {
        cfg: ResidualNormCfg,
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
    /// One unit per row: each row's token log-probability.
    TokenLogProb {
        x: Src,
        idx: Src,
        rows: usize,
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

/// An entry's launches: one upload per input, then each step's (none for a view, nor for the
/// earlier step of a joined pair).
#[derive(Clone, Debug, Default)]
pub struct Lowered {
    pub uploads: Vec<Launch>,
    pub steps: Vec<Vec<Launch>>,
    /// (earlier step, later step) of each pair run as one launch at the later step
    /// ([`merge::merge_pairs`]).
    pub pairs: Vec<(usize, usize)>,
    /// (write, matmul) of each cache row write the matmul's launch does
    /// ([`absorb::absorb_cache_writes`]); the write makes no launch.
    pub absorbed: Vec<(usize, usize)>,
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

/// How an output (always in the arena) is stored, refusing a byte output where the kernel
/// writes one element per unit.
fn word_out(o: &Operand) -> Result<Repr, String> {
    match repr(o.ty.dtype)? {
        Repr::Byte => Err(format!("this cube kernel cannot write {} elements (one byte each)", o.ty.dtype)),
        r => Ok(r),
    }
}

/// Units of a launch writing `n` elements stored as `out` (a byte output: one per word).
fn units(n: usize, out: Repr) -> usize {
    if out == Repr::Byte {
        n.div_ceil(4)
    } else {
        n
    }
}

/// Scalars count as shape `[1]`.
fn shape_of(o: &Operand) -> Vec<usize> {
    at_least_1d(&o.ty.shape)
}

/// The lowering of one program's steps: where its weights and constants start in the weights
/// buffer, and the metadata buffer every launch's block is appended to.
struct Lower<'a> {
    woff: &'a [usize],
    coff: &'a [usize],
    meta: &'a mut Vec<u32>,
}

impl Lower<'_> {
    /// Appends a packed metadata block at a 256-byte boundary (wgpu binds buffers at such
    /// offsets): its start (in `u32`s) and length.
    fn push(&mut self, block: Result<Vec<u32>, String>) -> Result<(usize, usize), String> {
        let block = block?;
        self.meta.resize(self.meta.len().next_multiple_of(64), 0);
        let at = self.meta.len();
        let len = block.len();
        self.meta.extend(block);
        Ok((at, len))
    }

    /// Where an operand lives: (in the arena, offset in its element units: bytes for bool and
    /// u8, 8-byte elements for i64).
    fn place(&self, o: &Operand) -> Result<(bool, usize), String> {
        match o.slot {
            Slot::Arena { offset, .. } => Ok((true, offset / o.ty.dtype.size())),
            Slot::Weight(i) => {
                self.woff.get(i as usize).map(|&w| (false, w)).ok_or_else(|| format!("weight {i} does not exist (corrupt program)"))
            }
            Slot::Const(i) => {
                self.coff.get(i as usize).map(|&c| (false, c)).ok_or_else(|| format!("constant {i} does not exist (corrupt program)"))
            }
            // `CubeExec::new` moves every state operand to its arena range before lowering.
            Slot::State(i) => Err(format!("state {i} was not placed in the arena")),
        }
    }

    /// Where an operand lives and how it is stored, and its offset in its element units.
    fn src(&self, o: &Operand) -> Result<(Src, usize), String> {
        let (in_arena, off) = self.place(o)?;
        let repr = if in_arena { repr(o.ty.dtype)? } else { Repr::Float };
        Ok((Src { in_arena, repr }, off))
    }

    /// The output's offset (always in the arena).
    fn out_off(&self, s: &Step) -> Result<usize, String> {
        Ok(self.place(&s.output)?.1)
    }

    /// A strided copy of `shape` elements from (`src_arena`, `src`) to the arena at `dst`.
    fn copy(&mut self, shape: &[usize], src_arena: bool, src: Strided, dst: Strided) -> Result<Launch, String> {
        let cfg = CopyCfg { rank: shape.len(), src_in_arena: vec![src_arena] };
        let n = shape.iter().product();
        let (meta, len) = self.push(CopyParams { shape: shape.to_vec(), src, dst }.pack())?;
        Ok(Launch::Copy { cfg, n, meta, len })
    }

    /// Per input: where it lives and its (offset, strides broadcast to the output).
    fn broadcast_inputs(&self, ins: &[Operand], strides: &[Vec<usize>]) -> Result<(Vec<Src>, Vec<Strided>), String> {
        let mut srcs = Vec::with_capacity(ins.len());
        let mut st = Vec::with_capacity(ins.len());
        for (o, strides) in ins.iter().zip(strides) {
            let (sr, off) = self.src(o)?;
            srcs.push(sr);
            st.push(Strided { off, strides: strides.clone() });
        }
        Ok((srcs, st))
    }

    /// The launches of one step, by the kernel its program stores (checked at load against
    /// `kernel::choose`): every cube kernel has an arm; an op with no cube kernel needs none.
    fn step(&mut self, s: &Step) -> Result<Vec<Launch>, String> {
        use super::kernel::CubeKernel as K;
        let kernel = K::parse(&s.kernel).ok_or_else(|| format!("{} is not a cube kernel", s.kernel))?;
        let mismatch = || Err(format!("kernel {} does not run {}", s.kernel, s.op.name()));
        Ok(match kernel {
            K::Source => return Err("a source is not a step".into()),
            K::View => vec![],
            K::Fused => vec![self.elementwise(s)?],
            K::MatMul | K::MatMulEpilogue => {
                let Op::MatMul { transpose_b, epilogue } = &s.op else { return mismatch() };
                vec![self.matmul(s, *transpose_b, epilogue.as_ref())?]
            }
            K::GatedMatMul => {
                let Op::GatedMatMul { transpose_b, epilogue } = &s.op else { return mismatch() };
                vec![self.gated_matmul(s, *transpose_b, epilogue)?]
            }
            K::Norm => match &s.op {
                Op::LayerNorm { eps } => vec![self.norm(NormKind::Layer, *eps, s)?],
                Op::RmsNorm { eps, add_one } => vec![self.norm(NormKind::Rms { add_one: *add_one }, *eps, s)?],
                Op::ResidualRmsNorm(r) => vec![self.residual_norm(s, r)?],
                _ => return mismatch(),
            },
            K::Softmax => vec![self.norm(NormKind::Softmax, 0.0, s)?],
            K::SoftmaxAxis => {
                let Op::Softmax { axis } = &s.op else { return mismatch() };
                vec![self.softmax_axis(s, *axis)?]
            }
            K::Reduce => {
                let Op::Reduce { op, axes, .. } = &s.op else { return mismatch() };
                vec![self.reduce(s, *op, axes)?]
            }
            K::Cast => {
                let Op::Cast { to } = &s.op else { return mismatch() };
                vec![self.cast(s, *to)?]
            }
            K::Iota => {
                let Op::Iota { axis, start, step } = &s.op else { return mismatch() };
                let sp = Split::at(&shape_of(&s.output), *axis);
                let n = s.output.ty.numel();
                let (meta, len) = self.push(IotaParams { n, len: sp.len, inner: sp.inner, out_off: self.out_off(s)? }.pack())?;
                vec![Launch::Iota { start: *start as f32, step: *step as f32, out: word_out(&s.output)?, n, meta, len }]
            }
            K::Gather => {
                let (Op::Gather { axis } | Op::GatherScaled { axis, .. } | Op::TakeAlongAxis { axis }) = &s.op else { return mismatch() };
                vec![self.gather(s, *axis)?]
            }
            K::TokenLogProb => {
                let Op::TokenLogProb = &s.op else { return mismatch() };
                let ((x, x_off), (idx, idx_off)) = (self.src(&s.inputs[0])?, self.src(&s.inputs[1])?);
                let [rows, v] = shape_of(&s.inputs[0])[..] else { return mismatch() };
                let (meta, len) = self.push(TokenParams { rows, v, x_off, idx_off, out_off: self.out_off(s)? }.pack())?;
                vec![Launch::TokenLogProb { x, idx, rows, meta, len }]
            }
            K::WriteRows => {
                let Op::WriteSlice { axis } = &s.op else { return mismatch() };
                self.write_slice(s, *axis)?
            }
            K::ScatterAdd => {
                let Op::ScatterAdd { axis } = &s.op else { return mismatch() };
                vec![self.scatter_add(s, *axis)?]
            }
            K::TopK => {
                let Op::TopK { k } = &s.op else { return mismatch() };
                vec![self.topk(s, *k)?]
            }
            K::CumSum => {
                let Op::CumSum { axis, exclusive } = &s.op else { return mismatch() };
                vec![self.cumsum(s, *axis, *exclusive)?]
            }
            K::MoeDispatch => {
                let Op::MoeDispatch { rows } = &s.op else { return mismatch() };
                vec![self.moe_dispatch(s, *rows)?]
            }
            K::MoeCombine => vec![self.moe_combine(s)?],
            K::FlashAttention => {
                let Op::Attention(att) = &s.op else { return mismatch() };
                vec![self.attention(s, att)?]
            }
            K::Resize => {
                let Op::Resize { size, mode } = &s.op else { return mismatch() };
                vec![self.resize(s, *size, *mode)?]
            }
            K::Copy | K::StridedCopy => match &s.op {
                Op::Permute { perm } => vec![self.strided(s, &ViewGeometry::permute(&s.inputs[0].ty.shape, perm))?],
                Op::Slice { axis, start, step, .. } => {
                    vec![self.strided(s, &ViewGeometry::slice(&s.inputs[0].ty.shape, *axis, *start, *step))?]
                }
                Op::Concat { axis } => self.concat(s, *axis)?,
                _ => return mismatch(),
            },
        })
    }

    fn elementwise(&mut self, s: &Step) -> Result<Launch, String> {
        let ex = s.op.elementwise_expr().ok_or("not an elementwise op")?;
        let shapes: Vec<&[usize]> = s.inputs.iter().map(|o| o.ty.shape.as_slice()).collect();
        let g = ElementwiseGeometry::new(&shapes, &s.output.ty.shape);
        let (srcs, inputs) = self.broadcast_inputs(&s.inputs, &g.strides)?;
        let out = repr(s.output.ty.dtype)?;
        let dtypes: Vec<DType> = s.inputs.iter().map(|o| o.ty.dtype).collect();
        let cfg = FusedCfg { code: instrs(&ex, &dtypes)?, srcs, rank: g.shape.len(), out, out_bool: s.output.ty.dtype == DType::Bool };
        let n = units(g.n(), out);
        let (meta, len) = self.push(FusedParams { out_off: self.out_off(s)?, shape: g.shape, inputs }.pack())?;
        Ok(Launch::Fused { cfg, n, meta, len })
    }

    /// Softmax over an axis other than the last: one unit per line.
    fn softmax_axis(&mut self, s: &Step, axis: usize) -> Result<Launch, String> {
        let (x_in_arena, x_off) = self.place(&s.inputs[0])?;
        let sp = Split::at(&shape_of(&s.output), axis);
        let p = LineParams { lines: sp.lines(), len: sp.len, inner: sp.inner, x_off, out_off: self.out_off(s)? };
        let (meta, len) = self.push(p.pack())?;
        Ok(Launch::SoftmaxAxis { x_in_arena, lines: sp.lines(), meta, len })
    }

    fn reduce(&mut self, s: &Step, op: ReduceOp, axes: &[usize]) -> Result<Launch, String> {
        let (x, x_off) = self.src(&s.inputs[0])?;
        let g = ReduceGeometry::new(&shape_of(&s.inputs[0]), axes);
        // The kernel indexes at least one kept and one reduced axis: pad with a size-1 axis.
        let axes = |list: &[geometry::Axis]| -> Vec<Axis> {
            let v: Vec<Axis> = list.iter().map(|a| Axis { len: a.len, stride: a.stride }).collect();
            if v.is_empty() {
                vec![Axis { len: 1, stride: 0 }]
            } else {
                v
            }
        };
        let (kept, reduced) = (axes(&g.kept), axes(&g.reduced));
        let cfg = ReduceCfg { op: reduce_kind(op), kept_rank: kept.len(), red_rank: reduced.len(), x, out: word_out(&s.output)? };
        let (meta, len) = self.push(ReduceParams { out_off: self.out_off(s)?, x_off, kept, reduced }.pack())?;
        Ok(Launch::Reduce { cfg, n: shape_of(&s.output).iter().product(), meta, len })
    }

    fn cast(&mut self, s: &Step, to: DType) -> Result<Launch, String> {
        let (x, x_off) = self.src(&s.inputs[0])?;
        let out = repr(to)?;
        let trunc = s.inputs[0].ty.dtype.is_float() && !to.is_float();
        let n = shape_of(&s.output).iter().product();
        let (meta, len) = self.push(CastParams { n, x_off, out_off: self.out_off(s)? }.pack())?;
        Ok(Launch::Cast { cfg: CastCfg { x, out, out_bool: to == DType::Bool, trunc }, n: units(n, out), meta, len })
    }

    /// Gather (the index read at the output's middle coordinate) or take-along-axis (the index
    /// has x's rank and is read at the output position).
    fn gather(&mut self, s: &Step, axis: usize) -> Result<Launch, String> {
        let along = matches!(s.op, Op::TakeAlongAxis { .. });
        let (x, x_off) = self.src(&s.inputs[0])?;
        let (idx, idx_off) = self.src(&s.inputs[1])?;
        let sp = Split::at(&shape_of(&s.inputs[0]), axis);
        let rows = if along { shape_of(&s.inputs[1])[axis] } else { s.inputs[1].ty.numel() };
        let n = shape_of(&s.output).iter().product();
        let p = GatherParams { n, rows, inner: sp.inner, len: sp.len, x_off, idx_off, out_off: self.out_off(s)? };
        let (meta, len) = self.push(p.pack())?;
        let (scaled, scale_bits) = match s.op {
            Op::GatherScaled { scale, .. } => (true, scale.to_bits()),
            _ => (false, 0),
        };
        Ok(Launch::Gather { cfg: GatherCfg { along, x, idx, out: word_out(&s.output)?, scaled, scale_bits, parts: 1 }, n, meta, len })
    }

    /// `write_slice`: in place when the lowering aliased the output to the destination (a
    /// state); otherwise the destination is copied first.
    fn write_slice(&mut self, s: &Step, axis: usize) -> Result<Vec<Launch>, String> {
        let out = shape_of(&s.output);
        let mut v = Vec::new();
        if s.inputs[0].slot != s.output.slot {
            v.push(self.strided(s, &ViewGeometry { skip: 0, strides: contiguous(&out) })?);
        }
        let (x, x_off) = self.src(&s.inputs[1])?;
        let (idx, idx_off) = self.src(&s.inputs[2])?;
        let sp = Split::at(&out, axis);
        let rows = shape_of(&s.inputs[1])[axis];
        let n = s.inputs[1].ty.numel();
        let p = GatherParams { n, rows, inner: sp.inner, len: sp.len, x_off, idx_off, out_off: self.out_off(s)? };
        let (meta, len) = self.push(p.pack())?;
        let cfg = GatherCfg { along: false, x, idx, out: word_out(&s.output)?, scaled: false, scale_bits: 0, parts: 1 };
        v.push(Launch::WriteRows { cfg, n, meta, len });
        Ok(v)
    }

    fn scatter_add(&mut self, s: &Step, axis: usize) -> Result<Launch, String> {
        let (base, base_off) = self.src(&s.inputs[0])?;
        let (idx, idx_off) = self.src(&s.inputs[1])?;
        let (src, src_off) = self.src(&s.inputs[2])?;
        let out = shape_of(&s.output);
        let sp = Split::at(&out, axis);
        let n = out.iter().product();
        let idx_len = shape_of(&s.inputs[1])[axis];
        let p = ScatterParams { n, len: sp.len, inner: sp.inner, idx_len, base_off, idx_off, src_off, out_off: self.out_off(s)? };
        let (meta, len) = self.push(p.pack())?;
        Ok(Launch::ScatterAdd { cfg: ScatterCfg { base, idx, src, out: word_out(&s.output)? }, n, meta, len })
    }

    fn topk(&mut self, s: &Step, k: usize) -> Result<Launch, String> {
        let (x, x_off) = self.src(&s.inputs[0])?;
        let xs = shape_of(&s.inputs[0]);
        let (d, n) = (xs[xs.len() - 1], xs.iter().product());
        let (meta, len) = self.push(TopkParams { n, d, k, x_off, out_off: self.out_off(s)? }.pack())?;
        Ok(Launch::TopK { x, out: word_out(&s.output)?, n, meta, len })
    }

    fn cumsum(&mut self, s: &Step, axis: usize, exclusive: bool) -> Result<Launch, String> {
        let (x, x_off) = self.src(&s.inputs[0])?;
        let sp = Split::at(&shape_of(&s.output), axis);
        let p = LineParams { lines: sp.lines(), len: sp.len, inner: sp.inner, x_off, out_off: self.out_off(s)? };
        let (meta, len) = self.push(p.pack())?;
        Ok(Launch::CumSum { cfg: CumsumCfg { exclusive, x, out: word_out(&s.output)? }, lines: sp.lines(), meta, len })
    }

    fn moe_dispatch(&mut self, s: &Step, rows: usize) -> Result<Launch, String> {
        let (x_in_arena, x_off) = self.place(&s.inputs[0])?;
        let (slot, slot_off) = self.src(&s.inputs[1])?;
        let d = s.inputs[0].ty.shape[1];
        let (assignments, k) = (s.inputs[1].ty.numel(), s.inputs[1].ty.shape[1]);
        let p = MoeDispatchParams { n: rows * d, d, assignments, k, x_off, slot_off, out_off: self.out_off(s)? };
        let (meta, len) = self.push(p.pack())?;
        Ok(Launch::MoeDispatch { cfg: MoeCfg { x_in_arena, slot, w_in_arena: true }, n: rows * d, meta, len })
    }

    fn moe_combine(&mut self, s: &Step) -> Result<Launch, String> {
        let (y_in_arena, y_off) = self.place(&s.inputs[0])?;
        let (slot, slot_off) = self.src(&s.inputs[1])?;
        let (w_in_arena, w_off) = self.place(&s.inputs[2])?;
        let (d, k) = (s.inputs[0].ty.shape[1], s.inputs[1].ty.shape[1]);
        let n = shape_of(&s.output).iter().product();
        let (meta, len) = self.push(MoeCombineParams { n, d, k, y_off, slot_off, w_off, out_off: self.out_off(s)? }.pack())?;
        Ok(Launch::MoeCombine { cfg: MoeCfg { x_in_arena: y_in_arena, slot, w_in_arena }, n, meta, len })
    }

    fn resize(&mut self, s: &Step, size: [usize; 2], mode: ResizeMode) -> Result<Launch, String> {
        let (in_arena, x_off) = self.place(&s.inputs[0])?;
        let sh = &s.inputs[0].ty.shape;
        let (ih, iw) = (sh[sh.len() - 2], sh[sh.len() - 1]);
        let n = shape_of(&s.output).iter().product();
        let p = ResizeParams { n, ih, iw, oh: size[0], ow: size[1], x_off, out_off: self.out_off(s)? };
        let (meta, len) = self.push(p.pack())?;
        Ok(Launch::Resize { cfg: ResizeCfg { bicubic: mode == ResizeMode::Bicubic, in_arena }, n, meta, len })
    }

    /// A permute, slice or copy: a strided read of input 0 into the contiguous output. f32
    /// goes through `copy`; other dtypes through an identity `fused` region, which converts
    /// between the weights buffer's floats and the arena's layouts.
    fn strided(&mut self, s: &Step, view: &ViewGeometry) -> Result<Launch, String> {
        let out = shape_of(&s.output);
        let (sr, off) = self.src(&s.inputs[0])?;
        let out_off = self.out_off(s)?;
        let src = Strided { off: off + view.skip, strides: view.strides.clone() };
        if s.output.ty.dtype == DType::F32 {
            return self.copy(&out, sr.in_arena, src, Strided { off: out_off, strides: contiguous(&out) });
        }
        let out_r = repr(s.output.ty.dtype)?;
        let code = instrs(&Expr { instrs: vec![Instr::Input(0)] }, &[s.inputs[0].ty.dtype])?;
        let cfg = FusedCfg { code, srcs: vec![sr], rank: out.len(), out: out_r, out_bool: s.output.ty.dtype == DType::Bool };
        let n = units(out.iter().product(), out_r);
        let (meta, len) = self.push(FusedParams { out_off, shape: out, inputs: vec![src] }.pack())?;
        Ok(Launch::Fused { cfg, n, meta, len })
    }

    fn concat(&mut self, s: &Step, axis: usize) -> Result<Vec<Launch>, String> {
        let dt = s.output.ty.dtype;
        // An i64 element is two words: copy words, with a trailing axis of 2.
        let w = if dt == DType::I64 { 2 } else { 1 };
        let widen = |sh: Vec<usize>| if w == 2 { sh.into_iter().chain([2]).collect() } else { sh };
        let shapes: Vec<Vec<usize>> = s.inputs.iter().map(|o| widen(shape_of(o))).collect();
        let g = ConcatGeometry::new(&shapes, &widen(shape_of(&s.output)), axis);
        let out_off = self.out_off(s)?;
        let mut v = Vec::with_capacity(s.inputs.len());
        for ((o, sh), start) in s.inputs.iter().zip(&shapes).zip(&g.starts) {
            let (sr, off) = self.src(o)?;
            let word_copy = match sr.repr {
                Repr::Float => dt == DType::F32,
                Repr::I32 | Repr::I64 => true,
                Repr::Byte => false,
            };
            if !word_copy {
                return Err(format!("concat of {dt} from the weights buffer or in bytes has no cube kernel"));
            }
            let src = Strided { off: off * w, strides: contiguous(sh) };
            let dst = Strided { off: out_off * w + start, strides: g.dst_strides.clone() };
            v.push(self.copy(sh, sr.in_arena, src, dst)?);
        }
        Ok(v)
    }
}

/// Lowers every step of `e`; errors carry (step, op, message).
pub fn lower_entry(e: &Entry, woff: &[usize], coff: &[usize], meta: &mut Vec<u32>) -> Result<Lowered, (usize, &'static str, String)> {
    let mut low = Lowered::default();
    let mut l = Lower { woff, coff, meta };
    for io in &e.inputs {
        // Inputs arrive as raw bytes: copy whole words to the slot's word offset.
        let Slot::Arena { offset, .. } = io.operand.slot else {
            return Err((0, "input", format!("input {} is not in the arena (corrupt program)", io.name)));
        };
        let words = io.operand.ty.bytes().div_ceil(4);
        let (src, dst) = (Strided { off: 0, strides: vec![1] }, Strided { off: offset / 4, strides: vec![1] });
        low.uploads.push(l.copy(&[words], false, src, dst).map_err(|m| (0, "input", m))?);
    }
    for (i, s) in e.steps.iter().enumerate() {
        low.steps.push(l.step(s).map_err(|m| (i, s.op.name(), m))?);
    }
    merge::join_concat_parts(&e.steps, &mut low.steps, l.meta);
    low.absorbed = absorb::absorb_cache_writes(&e.steps, &mut low.steps, l.meta);
    low.pairs = merge::merge_pairs(&e.steps, &mut low.steps, l.meta, &low.absorbed);
    Ok(low)
}
