//! From program steps to CUDA work, with no driver: which kernel each step uses, its grid and
//! its parameter block. Device addresses are offsets into the backend's one allocation
//! ([`Layout`]) and are relocated by the executor once the allocation exists, so everything
//! here is testable on a machine without a GPU. The index math (splits, strides, reduce axes,
//! batch broadcasting) comes from [`crate::geometry`], shared with the cube lowering.

pub mod attention;
pub mod copies;
pub mod fold;
pub(crate) mod index;
pub mod kv_prefill;
pub mod kv_write;
pub mod merge;
pub mod permute;

use super::fused_codegen as codegen;
pub use super::gemm::{epilogue_kind, epilogue_region, EpilogueKind};
pub use super::kernel::{choose, kernel_for, CudaKernel};
use super::rotation::{self, SignedPerm};
use crate::geometry::{
    at_least_1d, contiguous, Access, ConcatGeometry, ElementwiseGeometry, MatmulGeometry, ReduceGeometry, RowGeometry, Split, ViewGeometry,
};
use attention::{attention_plan, lower_attention};
use kiln_graph::program::{Operand, Program, Slot, Step};
use kiln_graph::{DType, Expr, Op, ReduceOp, TensorType};
use kiln_kernels::cuda::{
    self as kc, fused, CopyParams, GatherParams, IotaParams, MoeParams, NormParams, ReduceParams, ResidualNormParams, MAX_RANK,
};
pub use merge::lower_entry;

/// Bytes every region of the allocation is aligned to.
const ALIGN: usize = 256;
/// cuBLASLt workspace (Hopper kernels want up to 32 MiB).
pub const GEMM_WORKSPACE: usize = 32 << 20;
/// Streaming multiprocessors the split-K heuristic fills (H100 SXM: 132).
const SMS: usize = 132;

/// Where each part of the program lives in the one device allocation (offsets in bytes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layout {
    /// Intermediates of the entry that runs (the largest entry's plan).
    pub arena: usize,
    pub arena_bytes: usize,
    pub weights: Vec<usize>,
    pub constants: Vec<usize>,
    /// Split-K partials of attention; the operands of a partially broadcast matmul.
    pub scratch: usize,
    pub scratch_bytes: usize,
    /// `attn_rows1`'s counts of finished splits, a u32 per output row of the largest split
    /// attention (0 bytes where none splits). Apart from `scratch`, which the GEMM and
    /// sampling steps between two attentions overwrite; zeroed once at load, and each launch
    /// leaves it zero.
    pub counters: usize,
    pub counters_bytes: usize,
    /// cuBLASLt workspace.
    pub workspace: usize,
    /// An `int` set by gathers, take-along-axis and scatter-add on an out-of-range index.
    pub error_flag: usize,
    pub total: usize,
    /// The signed permutation each constant holds, if any: a matmul by one runs as one
    /// elementwise kernel ([`rotation`]).
    pub rotations: Vec<Option<SignedPerm>>,
}

impl Layout {
    /// Where an entry output in `slot` lies in the allocation (a state must have been moved
    /// into the arena first: `crate::states::states_in_arena`).
    pub fn output_at(&self, slot: Slot) -> Result<usize, String> {
        match slot {
            Slot::Arena { offset, .. } => Ok(self.arena + offset),
            Slot::Weight(i) => Ok(self.weights[i as usize]),
            Slot::Const(i) => Ok(self.constants[i as usize]),
            Slot::State(i) => Err(format!("state {i} was not placed in the arena")),
        }
    }
}

/// A cuBLASLt epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// `+ bias[n]` (offset of the bias vector).
    Bias(u64),
    GeluTanh,
    BiasGeluTanh(u64),
    /// `+ residual[m, n]`: cuBLASLt's C operand (the output's layout) with beta = 1.
    Residual(u64),
    BiasResidual {
        bias: u64,
        residual: u64,
    },
}

/// A row-major batched GEMM `c = a @ b` (or `a @ b^T`), offsets in the allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    /// The operands' dtype.
    pub dtype: DType,
    /// The output's: the operands', or f32 where an epilogue ends with a cast to f32 (the GEMM
    /// writes its accumulator; the epilogue region rounds it to `dtype` first).
    pub out_dtype: DType,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub transpose_b: bool,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    /// Element strides between batches (0: broadcast).
    pub a_stride: usize,
    pub b_stride: usize,
    /// Element stride between batches' bias rows (0: one bias for every batch).
    pub bias_stride: usize,
    pub epilogue: Epilogue,
    /// The small-M GEMV launch computing the same (`super::gemm`), where it applies: the
    /// executor times both at load and keeps the faster.
    pub gemv: Option<Launch>,
}

/// A kernel launch: the parameter block is a `#[repr(C)]` struct's bytes, and `relocs` are
/// the byte offsets of its device addresses (held as offsets until the executor adds the
/// allocation's base).
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub module: String,
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
    pub params: Vec<u8>,
    pub relocs: Vec<usize>,
}

/// One unit of device work.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    Gemm(Gemm),
    Kernel(Launch),
    /// Zero `bytes` at `offset`.
    Zero {
        offset: u64,
        bytes: usize,
    },
}

/// A fused region the program needs: its kernel name and source.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub name: String,
    pub source: String,
}

/// Whether a loaded module may lack `kernel`, an entry kiln added to a module later: the
/// lowering launches it only where it is loaded (`has` of [`lower_entry`]).
pub fn optional_kernel(kernel: &str) -> bool {
    merge::fusing(kernel)
}

fn al(x: usize) -> usize {
    x.next_multiple_of(ALIGN)
}

/// Lays out a program: arena, weights, constants, scratch, attention's counters, workspace,
/// error flag.
pub fn layout(p: &Program) -> Result<Layout, String> {
    let arena_bytes = p.entries.iter().map(|e| e.arena_bytes).max().unwrap_or(0);
    let mut l = Layout { arena_bytes, rotations: rotation::of_constants(&p.constants), ..Default::default() };
    let mut at = al(l.arena_bytes.max(ALIGN));
    for w in &p.weights {
        l.weights.push(at);
        at = al(at + w.ty.bytes().max(1));
    }
    for c in &p.constants {
        l.constants.push(at);
        at = al(at + c.ty.bytes().max(1));
    }
    let (mut scratch, mut counters) = (0, 0);
    for e in &p.entries {
        for s in &e.steps {
            if let Op::Attention(_) = &s.op {
                let plan = attention_plan(s)?;
                scratch = scratch.max(plan.scratch);
                counters = counters.max(plan.counters);
            }
            scratch = scratch.max(index::matmul_scratch(s));
            scratch = scratch.max(index::sample_scratch(s));
        }
    }
    l.scratch = at;
    l.scratch_bytes = scratch;
    at = al(at + scratch);
    l.counters = at;
    l.counters_bytes = counters;
    at = al(at + counters);
    l.workspace = at;
    at = al(at + GEMM_WORKSPACE);
    l.error_flag = at;
    l.total = at + ALIGN;
    Ok(l)
}

fn addr(o: &Operand, l: &Layout) -> Result<u64, String> {
    let a = match o.slot {
        Slot::Arena { offset, .. } => l.arena + offset,
        Slot::Weight(i) => *l.weights.get(i as usize).ok_or_else(|| format!("weight {i} does not exist (corrupt program)"))?,
        Slot::Const(i) => *l.constants.get(i as usize).ok_or_else(|| format!("constant {i} does not exist (corrupt program)"))?,
        Slot::State(i) => return Err(format!("state {i} was not placed in the arena (states_in_arena runs before lowering)")),
    };
    Ok(a as u64)
}

pub(crate) fn float_suffix(d: DType) -> Result<&'static str, String> {
    match d {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => Err(format!("{other} has no CUDA kernel here (floats only)")),
    }
}

pub(crate) fn index_suffix(d: DType) -> Result<&'static str, String> {
    match d {
        DType::I32 => Ok("i32"),
        DType::I64 => Ok("i64"),
        other => Err(format!("indices of {other} (expected i32 or i64)")),
    }
}

pub(super) fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is one of kiln's `#[repr(C)]` parameter structs: plain integers and floats, no
    // padding bytes that would be uninitialised (every struct pads with explicit fields).
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }.to_vec()
}

/// The byte offset of field `f` inside `base` (both references into the same struct).
pub(super) fn off_of<T, F>(base: &T, f: &F) -> usize {
    f as *const F as usize - base as *const T as usize
}

fn grid1(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(kc::BLOCK as usize).clamp(1, 65535 * 8) as u32, 1, 1)
}

/// Every fused region of a program (deduplicated by kernel name), with its CUDA source.
pub fn regions(p: &Program) -> Result<Vec<Region>, String> {
    let mut out: Vec<Region> = Vec::new();
    let rotations = rotation::of_constants(&p.constants);
    for e in &p.entries {
        for s in &e.steps {
            let perm = rotation::of_step(s, &rotations);
            let (expr, ins) = match &s.op {
                Op::MatMul { epilogue, .. } if perm.is_some() => rotation_region(s, epilogue.as_ref()),
                Op::MatMul { epilogue: Some(ep), .. } => {
                    let extra: Vec<TensorType> = s.inputs[2..].iter().map(|o| o.ty.clone()).collect();
                    let (a, out) = (s.inputs[0].ty.dtype, s.output.ty.dtype);
                    if a == out && epilogue_kind(ep, &extra, &s.output.ty).is_some() {
                        continue;
                    }
                    epilogue_region(ep, a, out, &extra.iter().map(|t| t.dtype).collect::<Vec<_>>())
                }
                op => match op.elementwise_expr() {
                    Some(e) => (e, s.inputs.iter().map(|o| o.ty.dtype).collect()),
                    None => continue,
                },
            };
            let (name, source) = codegen::source(&expr, &ins, s.output.ty.dtype, perm)?;
            if !out.iter().any(|r| r.name == name) {
                out.push(Region { name, source });
            }
        }
    }
    Ok(out)
}

/// The region a rotation matmul runs as: its epilogue (or the product alone) over `x` and the
/// epilogue's inputs.
fn rotation_region(s: &Step, epilogue: Option<&Expr>) -> (Expr, Vec<DType>) {
    let e = epilogue.cloned().unwrap_or(Expr { instrs: vec![kiln_graph::Instr::Input(0)] });
    let mut ins = vec![s.inputs[0].ty.dtype];
    ins.extend(s.inputs[2..].iter().map(|o| o.ty.dtype));
    (e, ins)
}

/// The kernel a rotation matmul runs as.
fn rotation_kernel(s: &Step, perm: &SignedPerm) -> String {
    let Op::MatMul { epilogue, .. } = &s.op else { return String::new() };
    let (e, ins) = rotation_region(s, epilogue.as_ref());
    codegen::rotation_kernel_name(&e, &ins, s.output.ty.dtype, perm)
}

/// Names the kernel each rotation matmul of `p` runs as (`fused_rot_*`) in its steps, which
/// hold the GEMM's name from their types alone until the program's constants are known.
pub fn rotation_kernels(p: &mut Program) {
    let rotations = rotation::of_constants(&p.constants);
    for s in p.entries.iter_mut().flat_map(|e| e.steps.iter_mut()) {
        if let Some(perm) = rotation::of_step(s, &rotations) {
            s.kernel = rotation_kernel(s, perm);
        }
    }
}

fn launch<T: Copy>(module: &str, kernel: String, grid: (u32, u32, u32), block: u32, smem: u32, p: &T, ptrs: &[usize]) -> Work {
    Work::Kernel(Launch { module: module.to_string(), kernel, grid, block, smem, params: bytes_of(p), relocs: ptrs.to_vec() })
}

/// A fused elementwise launch writing `out` from `ins` (each broadcast to `out`'s shape).
fn fused_launch(e: &Expr, ins: &[(u64, &TensorType)], out: (u64, &TensorType)) -> Result<Work, String> {
    fused_launch_with(e, ins, out, None)
}

/// [`fused_launch`] with input 0 read through a signed permutation of the last axis.
fn fused_launch_with(e: &Expr, ins: &[(u64, &TensorType)], out: (u64, &TensorType), perm: Option<&SignedPerm>) -> Result<Work, String> {
    let dtypes: Vec<DType> = ins.iter().map(|(_, t)| t.dtype).collect();
    let name = match perm {
        Some(p) => codegen::rotation_kernel_name(e, &dtypes, out.1.dtype, p),
        None => codegen::kernel_name(e, &dtypes, out.1.dtype),
    };
    let shapes: Vec<&[usize]> = ins.iter().map(|(_, t)| t.shape.as_slice()).collect();
    let g = ElementwiseGeometry::new(&shapes, &out.1.shape);
    if g.shape.len() > MAX_RANK || ins.len() > fused::MAX_INPUTS {
        return Err("fused region beyond rank 8 or 16 inputs".into());
    }
    let mut p = fused::FusedParams { out: out.0, n: g.n() as i64, rank: g.shape.len() as i32, ..Default::default() };
    for (a, &d) in g.shape.iter().enumerate() {
        p.dims[a] = d as i64;
    }
    for (i, ((addr, _), access)) in ins.iter().zip(&g.access).enumerate() {
        p.ins[i] = *addr;
        p.access[i] = match access {
            Access::Scalar => fused::Access::Scalar,
            Access::Contiguous => fused::Access::Contiguous,
            Access::Strided(st) => {
                p.strided = 1;
                for (a, &s) in st.iter().enumerate() {
                    p.st[i][a] = s as i64;
                }
                fused::Access::Strided
            }
        } as i32;
    }
    let mut relocs = vec![off_of(&p, &p.out)];
    relocs.extend((0..ins.len()).map(|i| off_of(&p, &p.ins[i])));
    Ok(launch(&name, name.clone(), grid1(p.n as usize), kc::BLOCK, 0, &p, &relocs))
}

fn copy_launch(shape: &[usize], esize: usize, src: u64, src_st: &[usize], dst: u64, dst_st: &[usize]) -> Result<Work, String> {
    if shape.len() > MAX_RANK {
        return Err("copy beyond rank 8".into());
    }
    let mut p = CopyParams { src, dst, n: shape.iter().product::<usize>() as i64, rank: shape.len() as i32, ..Default::default() };
    for (a, &d) in shape.iter().enumerate() {
        p.dims[a] = d as i64;
        p.src_st[a] = src_st[a] as i64;
        p.dst_st[a] = dst_st[a] as i64;
    }
    let relocs = [off_of(&p, &p.src), off_of(&p, &p.dst)];
    Ok(launch("data", format!("copy_b{esize}"), grid1(p.n as usize), kc::BLOCK, 0, &p, &relocs))
}

/// Lowers one step to device work.
pub fn lower_step(s: &Step, l: &Layout) -> Result<Vec<Work>, String> {
    use CudaKernel as K;
    let out_ty = &s.output.ty;
    let types: Vec<TensorType> = s.inputs.iter().map(|o| o.ty.clone()).collect();
    // Dispatch on the kernel this build picks, which must be the one the program stores: every
    // kernel family has an arm below, and an op with no CUDA kernel needs none.
    let kernel = choose(&s.op, &types, out_ty)?;
    // A rotation matmul may store the name of the kernel it runs ([`rotation_kernels`]).
    let rotation = rotation::of_step(s, &l.rotations).map(|p| rotation_kernel(s, p));
    if kernel.name() != s.kernel && rotation.as_deref() != Some(s.kernel.as_str()) {
        return Err(format!("the program stores kernel {} where this build picks {} (recompile the artifact)", s.kernel, kernel.name()));
    }
    let mismatch = || Err(format!("kernel {} does not run {}", s.kernel, s.op.name()));
    let out = addr(&s.output, l)?;
    let ins: Vec<u64> = s.inputs.iter().map(|o| addr(o, l)).collect::<Result<_, _>>()?;
    let shape = at_least_1d(&out_ty.shape);
    let es = out_ty.dtype.size();
    // A strided read of input 0 into the contiguous output.
    let view = |v: ViewGeometry| copy_launch(&shape, es, ins[0] + (v.skip * es) as u64, &v.strides, out, &contiguous(&shape));
    Ok(match kernel {
        K::Source | K::View => vec![],
        K::Fused(_) => {
            let e = s.op.elementwise_expr().ok_or("not elementwise")?;
            let list: Vec<(u64, &TensorType)> = ins.iter().zip(&s.inputs).map(|(&a, o)| (a, &o.ty)).collect();
            vec![fused_launch(&e, &list, (out, out_ty))?]
        }
        K::Gemm(_) => {
            let Op::MatMul { transpose_b, epilogue } = &s.op else { return mismatch() };
            lower_matmul(s, l, ins, out, *transpose_b, epilogue.as_ref())?
        }
        K::Gemv(_) => vec![Work::Kernel(super::gemm::gated_launch(s, &ins, out)?)],
        K::Norm(_) => match &s.op {
            Op::ResidualRmsNorm(r) => vec![lower_residual_norm(s, &ins, out, r)?],
            Op::LayerNorm { eps } | Op::RmsNorm { eps, .. } => vec![lower_norm(s, &ins, out, *eps)?],
            _ => return mismatch(),
        },
        K::Softmax(name) => {
            let g = RowGeometry::new(&shape);
            let p = NormParams { x: ins[0], out, rows: g.rows as i32, d: g.d as i32, ..Default::default() };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
            vec![launch("norm", name, (p.rows.max(1) as u32, 1, 1), kc::BLOCK, 0, &p, &relocs)]
        }
        K::Attention(_) => {
            let Op::Attention(att) = &s.op else { return mismatch() };
            lower_attention(s, l, &ins, out, att)?
        }
        K::Copy(_) => match &s.op {
            Op::Permute { perm } => vec![view(ViewGeometry::permute(&s.inputs[0].ty.shape, perm))?],
            Op::Slice { axis, start, step, .. } => vec![view(ViewGeometry::slice(&s.inputs[0].ty.shape, *axis, *start, *step))?],
            Op::Concat { axis } => {
                let shapes: Vec<Vec<usize>> = s.inputs.iter().map(|o| at_least_1d(&o.ty.shape)).collect();
                let g = ConcatGeometry::new(&shapes, &shape, *axis);
                let mut v = Vec::new();
                for ((sh, &a), start) in shapes.iter().zip(&ins).zip(&g.starts) {
                    v.push(copy_launch(sh, es, a, &contiguous(sh), out + (start * es) as u64, &g.dst_strides)?);
                }
                v
            }
            _ => return mismatch(),
        },
        K::Gather(name) => {
            let (axis, scale) = match s.op {
                Op::Gather { axis } => (axis, None),
                Op::GatherScaled { axis, scale } => (axis, Some(scale)),
                _ => return mismatch(),
            };
            let (x, nidx) = (Split::at(&s.inputs[0].ty.shape, axis), s.inputs[1].ty.numel());
            vec![gather_launch(name, [ins[0], ins[1], out, l.error_flag as u64], x, nidx, shape.iter().product(), scale)]
        }
        K::WriteRows(name) => {
            let Op::WriteSlice { axis } = &s.op else { return mismatch() };
            // Rows [outer, rows, inner] written at a position read on the device. In place
            // when the lowering aliased the output to the destination (a state); otherwise
            // the destination is copied first.
            let mut v = Vec::new();
            if s.inputs[0].slot != s.output.slot {
                v.push(copy_launch(&shape, es, ins[0], &contiguous(&shape), out, &contiguous(&shape))?);
            }
            let rows = s.inputs[1].ty.shape[*axis];
            v.push(gather_launch(
                name,
                [ins[1], ins[2], out, l.error_flag as u64],
                Split::at(&shape, *axis),
                rows,
                s.inputs[1].ty.numel(),
                None,
            ));
            v
        }
        K::MoeDispatch(_) | K::MoeCombine(_) => lower_moe(s, &ins, out)?,
        K::Reduce(_) => {
            let Op::Reduce { op, axes, .. } = &s.op else { return mismatch() };
            vec![lower_reduce(s, &ins, out, *op, axes)?]
        }
        K::Iota(name) => {
            let Op::Iota { axis, start, step } = &s.op else { return mismatch() };
            let sp = Split::at(&shape, *axis);
            let n = shape.iter().product::<usize>();
            let p = IotaParams { out, n: n as i64, inner: sp.inner as i64, len: sp.len as i64, start: *start, step: *step };
            let relocs = [off_of(&p, &p.out)];
            vec![launch("data", name, grid1(n), kc::BLOCK, 0, &p, &relocs)]
        }
        K::Index(_) => index::lower(s, l, &ins, out)?,
    })
}

/// `s` with the kernel this build picks stored in it, as a compiled program has it (tests).
#[cfg(test)]
pub(crate) fn with_kernel(mut s: Step) -> Step {
    let types: Vec<TensorType> = s.inputs.iter().map(|o| o.ty.clone()).collect();
    s.kernel = kernel_for(&s.op, &types, &s.output.ty).unwrap_or_default();
    s
}

/// A gather (`x` split around the axis, `nidx` indices) or a row write (`x` the destination's
/// split, `nidx` rows): `ptrs` are x, idx, out and the error flag; `units` threads. With
/// `scale`, a gather times a scale (its parameters hold the gather's first).
fn gather_launch(name: String, ptrs: [u64; 4], x: Split, nidx: usize, units: usize, scale: Option<f32>) -> Work {
    let [x_ptr, idx, out, err] = ptrs;
    let p = GatherParams { x: x_ptr, idx, out, err, outer: x.outer as i64, len: x.len as i64, nidx: nidx as i64, inner: x.inner as i64 };
    let relocs = [off_of(&p, &p.x), off_of(&p, &p.idx), off_of(&p, &p.out), off_of(&p, &p.err)];
    match scale {
        None => launch("data", name, grid1(units), kc::BLOCK, 0, &p, &relocs),
        Some(scale) => launch("data", name, grid1(units), kc::BLOCK, 0, &kc::ScaledGatherParams { g: p, scale, pad: 0 }, &relocs),
    }
}

/// A GEMM (cuBLASLt, or the GEMV the executor may pick), after the copies of operands whose
/// batch broadcasts partially, and before a fused launch for an epilogue cuBLASLt lacks.
fn lower_matmul(s: &Step, l: &Layout, ins: Vec<u64>, out: u64, transpose_b: bool, epilogue: Option<&Expr>) -> Result<Vec<Work>, String> {
    let out_ty = &s.output.ty;
    if let Some(perm) = rotation::of_step(s, &l.rotations) {
        // `x @ P` read as `sign * x[.., perm]`, its epilogue in the same kernel.
        let (e, _) = rotation_region(s, epilogue);
        let mut list: Vec<(u64, &TensorType)> = vec![(ins[0], &s.inputs[0].ty)];
        list.extend(ins[2..].iter().zip(&s.inputs[2..]).map(|(&a, o)| (a, &o.ty)));
        return Ok(vec![fused_launch_with(&e, &list, (out, out_ty), Some(perm))?]);
    }
    let g = MatmulGeometry::new(&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &out_ty.shape);
    let (m, nn, k, batch) = (g.m, g.n, g.k, g.matrices());
    // Batch axes that broadcast partially: those operands are copied to the full batch.
    let (pre, ins, [la, lb]) = index::broadcast_operands(s, l, &g, ins)?;
    let extra: Vec<TensorType> = s.inputs[2..].iter().map(|o| o.ty.clone()).collect();
    let operands = s.inputs[0].ty.dtype;
    let kind = epilogue.and_then(|e| epilogue_kind(e, &extra, out_ty)).filter(|_| operands == out_ty.dtype);
    let batched_bias = kind.as_ref().is_some_and(|k| k.bias_batched);
    // A batched `a` against one `b` is one GEMM with batch folded into M (unless each batch
    // has its own bias row). One row of a shared `a` against stacked `[G, N, K]` weights
    // (stacked projections at decode) is one `[1, G*N]` product: the GEMV applies.
    let (gm, gn, gbatch, a_stride, b_stride) = if batch > 1 && la == batch && lb == 1 && !batched_bias {
        (m * batch, nn, 1, 0, 0)
    } else if batch > 1
        && la == 1
        && lb == batch
        && m == 1
        && transpose_b
        && (kind.as_ref().is_none_or(|k| k.bias.is_none() || batched_bias))
    {
        (1, nn * batch, 1, 0, 0)
    } else {
        (m, nn, batch, if la == 1 { 0 } else { g.mat[0] }, if lb == 1 { 0 } else { g.mat[1] })
    };
    let mut gemm = Gemm {
        dtype: operands,
        out_dtype: out_ty.dtype,
        m: gm,
        n: gn,
        k,
        batch: gbatch,
        transpose_b,
        a: ins[0],
        b: ins[1],
        c: out,
        a_stride,
        b_stride,
        bias_stride: if batched_bias && gbatch > 1 { nn } else { 0 },
        epilogue: Epilogue::None,
        gemv: None,
    };
    let mut work = Vec::new();
    match epilogue.map(|e| (e, kind)) {
        None => {}
        Some((_, Some(kind))) => gemm.epilogue = kind.epilogue(&ins[2..]),
        Some((e, None)) => {
            let mut list: Vec<(u64, &TensorType)> = vec![(out, out_ty)];
            list.extend(ins[2..].iter().zip(&s.inputs[2..]).map(|(&a, o)| (a, &o.ty)));
            let extra: Vec<DType> = extra.iter().map(|t| t.dtype).collect();
            let (e, _) = epilogue_region(e, operands, out_ty.dtype, &extra);
            work.push(fused_launch(&e, &list, (out, out_ty))?);
        }
    }
    gemm.gemv = super::gemm::gemv_launch(&gemm);
    work.insert(0, Work::Gemm(gemm));
    work.splice(0..0, pre);
    Ok(work)
}

/// Layer norm or RMS norm over the last axis, one block per row.
fn lower_norm(s: &Step, ins: &[u64], out: u64, eps: f32) -> Result<Work, String> {
    let g = RowGeometry::new(&at_least_1d(&s.output.ty.shape));
    let layer = matches!(s.op, Op::LayerNorm { .. });
    let add_one = matches!(s.op, Op::RmsNorm { add_one: true, .. });
    let mut p = NormParams { x: ins[0], w: ins[1], b: 0, out, rows: g.rows as i32, d: g.d as i32, eps, add_one: add_one as i32 };
    let mut relocs = vec![off_of(&p, &p.x), off_of(&p, &p.w), off_of(&p, &p.out)];
    if layer {
        p.b = ins[2];
        relocs.push(off_of(&p, &p.b));
    }
    let name = if layer { "layer_norm" } else { "rms_norm" };
    let kernel = format!("{name}_{}", float_suffix(s.output.ty.dtype)?);
    Ok(launch("norm", kernel, (p.rows.max(1) as u32, 1, 1), kc::BLOCK, 0, &p, &relocs))
}

/// The residual junction between two RMS norms: one block per output row (padding rows too,
/// which it zeroes).
fn lower_residual_norm(s: &Step, ins: &[u64], out: u64, r: &kiln_graph::ResidualRmsNorm) -> Result<Work, String> {
    let x = &s.inputs[0].ty;
    let d = *x.shape.last().ok_or("a scalar residual")?;
    let rows = x.numel() / d.max(1);
    let (w_post, w_pre) = (if r.post { ins[2] } else { 0 }, ins[ins.len() - 1]);
    let p = ResidualNormParams {
        x: ins[0],
        o: ins[1],
        w_post,
        w_pre,
        out,
        rows: rows as i32,
        rows_pad: r.rows_pad as i32,
        d: d as i32,
        eps: r.eps,
        add_one: r.add_one as i32,
        post: r.post as i32,
    };
    let mut relocs = vec![off_of(&p, &p.x), off_of(&p, &p.o), off_of(&p, &p.w_pre), off_of(&p, &p.out)];
    if r.post {
        relocs.push(off_of(&p, &p.w_post));
    }
    let kernel = format!("residual_rms_norm_{}", float_suffix(s.output.ty.dtype)?);
    Ok(launch("norm", kernel, (r.rows_pad.max(1) as u32, 1, 1), kc::BLOCK, 0, &p, &relocs))
}

/// MoE dispatch (zero the expert rows, then add each token to its slots) or combine.
fn lower_moe(s: &Step, ins: &[u64], out: u64) -> Result<Vec<Work>, String> {
    let out_ty = &s.output.ty;
    let (x, slot) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape);
    let (t, it) = (float_suffix(out_ty.dtype)?, index_suffix(s.inputs[1].ty.dtype)?);
    Ok(match s.op {
        Op::MoeDispatch { rows } => {
            let p =
                MoeParams { x: ins[0], slot: ins[1], w: 0, out, tokens: x[0] as i32, k: slot[1] as i32, d: x[1] as i32, rows: rows as i32 };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.slot), off_of(&p, &p.out)];
            vec![
                Work::Zero { offset: out, bytes: out_ty.bytes() },
                launch("data", format!("moe_dispatch_{t}_{it}"), ((x[0] * slot[1]).max(1) as u32, 1, 1), kc::BLOCK, 0, &p, &relocs),
            ]
        }
        _ => {
            // Combine: x is the experts' output `[rows, d]`.
            let p = MoeParams {
                x: ins[0],
                slot: ins[1],
                w: ins[2],
                out,
                tokens: slot[0] as i32,
                k: slot[1] as i32,
                d: x[1] as i32,
                rows: x[0] as i32,
            };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.slot), off_of(&p, &p.w), off_of(&p, &p.out)];
            vec![launch("data", format!("moe_combine_{t}_{it}"), (slot[0].max(1) as u32, 1, 1), kc::BLOCK, 0, &p, &relocs)]
        }
    })
}

/// A reduction over any axes: one thread per output element.
fn lower_reduce(s: &Step, ins: &[u64], out: u64, op: ReduceOp, axes: &[usize]) -> Result<Work, String> {
    let x = &s.inputs[0].ty.shape;
    if x.len() > MAX_RANK {
        return Err("reduce beyond rank 8".into());
    }
    let g = ReduceGeometry::new(x, axes);
    let code = match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
    };
    let mut p = ReduceParams { x: ins[0], out, op: code, ..Default::default() };
    for (i, a) in g.kept.iter().enumerate() {
        (p.dims_o[i], p.st_o[i]) = (a.len as i64, a.stride as i64);
    }
    for (i, a) in g.reduced.iter().enumerate() {
        (p.dims_r[i], p.st_r[i]) = (a.len as i64, a.stride as i64);
    }
    (p.rank_o, p.rank_r) = (g.kept.len() as i32, g.reduced.len() as i32);
    (p.nout, p.nred) = (g.n_out() as i64, g.n_reduced() as i64);
    let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
    Ok(launch("data", format!("reduce_{}", float_suffix(s.output.ty.dtype)?), grid1(g.n_out()), kc::BLOCK, 0, &p, &relocs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_graph::{BinaryOp, Instr, UnaryOp};

    pub(super) fn tt(d: DType, s: &[usize]) -> TensorType {
        TensorType::new(d, s.to_vec())
    }

    pub(super) fn arena(offset: usize, ty: TensorType) -> Operand {
        Operand { slot: Slot::Arena { offset, bytes: ty.bytes() }, ty }
    }

    /// The layout of the cache-write fold tests (`kv_write`, `kv_prefill`): a 16 MiB arena,
    /// then scratch, split counters, the workspace and the error flag.
    pub(super) const FOLD_LAYOUT: Layout = Layout {
        arena: 0,
        arena_bytes: 1 << 24,
        weights: Vec::new(),
        constants: Vec::new(),
        scratch: 1 << 24,
        scratch_bytes: 1 << 20,
        counters: (1 << 24) + (1 << 20),
        counters_bytes: 256,
        workspace: (1 << 24) + (2 << 20),
        error_flag: (1 << 24) + (3 << 20),
        total: (1 << 24) + (4 << 20),
        rotations: Vec::new(),
    };

    /// An exp of the 512 bytes (bf16 `[256]`) at `input` into `output`: a step between others.
    pub(super) fn exp_between(input: usize, output: usize) -> Step {
        let t = tt(DType::BF16, &[256]);
        with_kernel(Step {
            node: 0,
            op: Op::Unary(UnaryOp::Exp),
            kernel: String::new(),
            inputs: vec![arena(input, t.clone())],
            output: arena(output, t),
        })
    }

    /// The launches of `w`, each item a kernel launch.
    pub(super) fn kernels(w: &[Work]) -> Vec<&Launch> {
        w.iter().map(|w| if let Work::Kernel(k) = w { k } else { panic!("{w:?}") }).collect()
    }

    #[test]
    fn bias_and_gelu_epilogues_go_to_cublaslt() {
        let bias = Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Add, 0, 1)] };
        let mut bg = bias.instrs.clone();
        bg.push(Instr::Unary(UnaryOp::GeluTanh, 2));
        let ins = [tt(DType::BF16, &[256, 1152]), tt(DType::BF16, &[4304, 1152]), tt(DType::BF16, &[4304])];
        let out = tt(DType::BF16, &[256, 4304]);
        let k = |e: Expr| kernel_for(&Op::MatMul { transpose_b: true, epilogue: Some(e) }, &ins, &out).unwrap();
        assert_eq!(k(bias), "cublaslt.gemm_bf16_tb+bias");
        assert_eq!(k(Expr { instrs: bg }), "cublaslt.gemm_bf16_tb+bias_gelu_tanh");
        let odd = Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Mul, 0, 1)] };
        assert!(k(odd).starts_with("cublaslt.gemm_bf16_tb;fused_"));
    }

    #[test]
    fn relocations_point_at_the_addresses() {
        let x = tt(DType::F32, &[4, 8]);
        let mut step = Step {
            node: 0,
            op: Op::Unary(UnaryOp::Exp),
            kernel: "copy_b4".into(),
            inputs: vec![arena(256, x.clone())],
            output: arena(512, x),
        };
        // A stored kernel this build would not pick is refused by name.
        let e = lower_step(&step, &Layout::default()).unwrap_err();
        assert!(e.contains("stores kernel copy_b4") && e.contains("fused_"), "{e}");
        step = with_kernel(step);
        let w = lower_step(&step, &Layout::default()).unwrap();
        let Work::Kernel(k) = &w[0] else { panic!() };
        let read = |at: usize| u64::from_le_bytes(k.params[at..at + 8].try_into().unwrap());
        assert_eq!(k.relocs.iter().map(|&r| read(r)).collect::<Vec<_>>(), [512, 256]);
    }
}
