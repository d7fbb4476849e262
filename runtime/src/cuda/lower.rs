//! From program steps to CUDA work, with no driver: which kernel each step uses, its grid and
//! its parameter block. Device addresses are offsets into the backend's one allocation
//! ([`Layout`]) and are relocated by the executor once the allocation exists, so everything
//! here is testable on a machine without a GPU.

mod index;

use super::fused_codegen as codegen;
pub use super::gemm::{epilogue_kind, EpilogueKind};
use kiln_graph::dtype::broadcast_strides;
use kiln_graph::program::{Operand, Program, Slot, Step};
use kiln_graph::{DType, Expr, MaskKind, Op, ReduceOp, TensorType};
use kiln_kernels::cuda::{
    self as kc, fused, AttnParams, CopyParams, GatherParams, IotaParams, MoeParams, NormParams, ReduceParams, MAX_RANK,
};

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
    /// cuBLASLt workspace.
    pub workspace: usize,
    /// An `int` set by gathers, take-along-axis and scatter-add on an out-of-range index.
    pub error_flag: usize,
    pub total: usize,
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
    pub dtype: DType,
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

fn al(x: usize) -> usize {
    x.next_multiple_of(ALIGN)
}

/// Lays out a program: arena, weights, constants, split-K scratch, workspace, error flag.
pub fn layout(p: &Program) -> Result<Layout, String> {
    let mut l = Layout { arena_bytes: p.entries.iter().map(|e| e.arena_bytes).max().unwrap_or(0), ..Default::default() };
    let mut at = al(l.arena_bytes.max(ALIGN));
    for w in &p.weights {
        l.weights.push(at);
        at = al(at + w.ty.bytes().max(1));
    }
    for c in &p.constants {
        l.constants.push(at);
        at = al(at + c.ty.bytes().max(1));
    }
    let mut scratch = 0;
    for e in &p.entries {
        for s in &e.steps {
            if let Op::Attention(_) = &s.op {
                scratch = scratch.max(attention_plan(s)?.1);
            }
            scratch = scratch.max(index::matmul_scratch(s));
        }
    }
    l.scratch = at;
    l.scratch_bytes = scratch;
    at = al(at + scratch);
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

fn float_suffix(d: DType) -> Result<&'static str, String> {
    match d {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => Err(format!("{other} has no CUDA kernel here (floats only)")),
    }
}

fn index_suffix(d: DType) -> Result<&'static str, String> {
    match d {
        DType::I32 => Ok("i32"),
        DType::I64 => Ok("i64"),
        other => Err(format!("indices of {other} (expected i32 or i64)")),
    }
}

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
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

/// Attention: (use the tensor-core prefill, split-K scratch bytes, splits).
fn attention_plan(s: &Step) -> Result<(bool, usize, usize), String> {
    let (q, k, v) = (&s.inputs[0].ty, &s.inputs[1].ty, &s.inputs[2].ty);
    let (b, sq, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (sk, dv) = (k.shape[1], v.shape[3]);
    let half = matches!(q.dtype, DType::BF16 | DType::F16);
    let mma = half && sq > 1 && d == dv && kc::MMA_HEAD_DIMS.contains(&d);
    if mma {
        return Ok((true, 0, 1));
    }
    if d > kc::ROWS_MAX_D || dv > kc::ROWS_MAX_D {
        return Err(format!("head dims {d}/{dv} exceed the CUDA attention's {}", kc::ROWS_MAX_D));
    }
    let blocks = b * sq * hq;
    let splits = (2 * SMS).div_ceil(blocks.max(1)).clamp(1, sk.div_ceil(64).max(1));
    let scratch = if splits > 1 { b * sq * hq * splits * (dv + 2) * 4 } else { 0 };
    Ok((false, scratch, splits))
}

/// The kernel a step uses (shown by `kiln inspect`), or why there is none.
pub fn kernel_for(op: &Op, inputs: &[TensorType], out: &TensorType) -> Result<String, String> {
    let no = |what: &str| Err(format!("{} has no CUDA kernel ({what})", op.name()));
    Ok(match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => "source".into(),
        Op::Reshape { .. } => "view".into(),
        Op::MatMul { transpose_b, epilogue } => {
            let t = float_suffix(out.dtype)?;
            if inputs[0].dtype != out.dtype || inputs[1].dtype != out.dtype {
                return no("mixed dtypes");
            }
            let tb = if *transpose_b { "_tb" } else { "" };
            match epilogue {
                None => format!("cublaslt.gemm_{t}{tb}"),
                Some(e) => match epilogue_kind(e, &inputs[2..], out) {
                    Some(kind) => format!("cublaslt.gemm_{t}{tb}+{}", kind.name()),
                    None => {
                        let mut ins = vec![out.dtype];
                        ins.extend(inputs[2..].iter().map(|t| t.dtype));
                        format!("cublaslt.gemm_{t}{tb};{}", codegen::kernel_name(e, &ins, out.dtype))
                    }
                },
            }
        }
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } | Op::Broadcast { .. } | Op::Fused(_) => {
            let e = op.elementwise_expr().ok_or("not elementwise")?;
            if inputs.len() > fused::MAX_INPUTS {
                return no("more than 16 inputs");
            }
            if out.rank() > MAX_RANK {
                return no("rank above 8");
            }
            let ins: Vec<DType> = inputs.iter().map(|t| t.dtype).collect();
            codegen::kernel_name(&e, &ins, out.dtype)
        }
        Op::LayerNorm { .. } => format!("layer_norm_{}", float_suffix(out.dtype)?),
        Op::RmsNorm { .. } => format!("rms_norm_{}", float_suffix(out.dtype)?),
        Op::Softmax { axis } if axis + 1 == out.rank() => format!("softmax_{}", float_suffix(out.dtype)?),
        Op::Softmax { .. } => index::kernel_for(op, inputs, out)?,
        Op::Attention(a) => {
            let t = float_suffix(out.dtype)?;
            if a.mask == MaskKind::Additive && (inputs.len() != 4 || inputs[3].dtype != inputs[0].dtype) {
                return no("an additive mask must have the queries' dtype");
            }
            let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
            let (d, dv) = (q.shape[3], v.shape[3]);
            let half = matches!(q.dtype, DType::BF16 | DType::F16);
            if half && q.shape[1] > 1 && d == dv && kc::MMA_HEAD_DIMS.contains(&d) {
                format!("attn_mma_{t}_d{d}")
            } else if d > kc::ROWS_MAX_D || dv > kc::ROWS_MAX_D || k.shape[2] == 0 || q.shape[2] % k.shape[2] != 0 {
                return no("head dim above 256 or heads not grouped");
            } else {
                format!("attn_rows_{t}")
            }
        }
        Op::Permute { .. } | Op::Slice { .. } | Op::Concat { .. } => {
            if out.rank() > MAX_RANK {
                return no("rank above 8");
            }
            format!("copy_b{}", out.dtype.size())
        }
        Op::Gather { .. } => format!("gather_b{}_{}", out.dtype.size(), index_suffix(inputs[1].dtype)?),
        Op::WriteSlice { .. } => format!("write_rows_b{}_{}", out.dtype.size(), index_suffix(inputs[2].dtype)?),
        Op::MoeDispatch { .. } => format!("moe_dispatch_{}_{}", float_suffix(out.dtype)?, index_suffix(inputs[1].dtype)?),
        Op::MoeCombine => format!("moe_combine_{}_{}", float_suffix(out.dtype)?, index_suffix(inputs[1].dtype)?),
        Op::Reduce { .. } => format!("reduce_{}", float_suffix(out.dtype)?),
        Op::Iota { .. } => match out.dtype {
            DType::F32 | DType::BF16 | DType::F16 | DType::I32 | DType::I64 => format!("iota_{}", out.dtype.name()),
            other => return no(&format!("iota of {other}")),
        },
        Op::TakeAlongAxis { .. } | Op::ScatterAdd { .. } | Op::TopK { .. } | Op::CumSum { .. } | Op::Resize { .. } => {
            index::kernel_for(op, inputs, out)?
        }
    })
}

/// Every fused region of a program (deduplicated by kernel name), with its CUDA source.
pub fn regions(p: &Program) -> Result<Vec<Region>, String> {
    let mut out: Vec<Region> = Vec::new();
    for e in &p.entries {
        for s in &e.steps {
            let (expr, ins) = match &s.op {
                Op::MatMul { epilogue: Some(ep), .. } => {
                    let extra: Vec<TensorType> = s.inputs[2..].iter().map(|o| o.ty.clone()).collect();
                    if epilogue_kind(ep, &extra, &s.output.ty).is_some() {
                        continue;
                    }
                    let mut ins = vec![s.output.ty.dtype];
                    ins.extend(extra.iter().map(|t| t.dtype));
                    (ep.clone(), ins)
                }
                op => match op.elementwise_expr() {
                    Some(e) => (e, s.inputs.iter().map(|o| o.ty.dtype).collect()),
                    None => continue,
                },
            };
            let (name, source) = codegen::source(&expr, &ins, s.output.ty.dtype)?;
            if !out.iter().any(|r| r.name == name) {
                out.push(Region { name, source });
            }
        }
    }
    Ok(out)
}

fn launch<T: Copy>(module: &str, kernel: String, grid: (u32, u32, u32), block: u32, smem: u32, p: &T, ptrs: &[usize]) -> Work {
    Work::Kernel(Launch { module: module.to_string(), kernel, grid, block, smem, params: bytes_of(p), relocs: ptrs.to_vec() })
}

/// A fused elementwise launch writing `out` from `ins` (each broadcast to `out`'s shape).
fn fused_launch(e: &Expr, ins: &[(u64, &TensorType)], out: (u64, &TensorType)) -> Result<Work, String> {
    let dtypes: Vec<DType> = ins.iter().map(|(_, t)| t.dtype).collect();
    let name = codegen::kernel_name(e, &dtypes, out.1.dtype);
    let shape = if out.1.shape.is_empty() { vec![1] } else { out.1.shape.clone() };
    if shape.len() > MAX_RANK || ins.len() > fused::MAX_INPUTS {
        return Err("fused region beyond rank 8 or 16 inputs".into());
    }
    let mut p =
        fused::FusedParams { out: out.0, n: shape.iter().product::<usize>() as i64, rank: shape.len() as i32, ..Default::default() };
    for (a, &d) in shape.iter().enumerate() {
        p.dims[a] = d as i64;
    }
    for (i, (addr, t)) in ins.iter().enumerate() {
        p.ins[i] = *addr;
        let access = if t.numel() == 1 {
            fused::Access::Scalar
        } else if t.shape == shape {
            fused::Access::Contiguous
        } else {
            fused::Access::Strided
        };
        p.access[i] = access as i32;
        if access == fused::Access::Strided {
            p.strided = 1;
            for (a, s) in broadcast_strides(&t.shape, &shape).into_iter().enumerate() {
                p.st[i][a] = s as i64;
            }
        }
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
    let out_ty = &s.output.ty;
    let out = addr(&s.output, l)?;
    let ins: Vec<u64> = s.inputs.iter().map(|o| addr(o, l)).collect::<Result<_, _>>()?;
    let shape = if out_ty.shape.is_empty() { vec![1] } else { out_ty.shape.clone() };
    let n: usize = shape.iter().product();
    let es = out_ty.dtype.size();
    Ok(match &s.op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Reshape { .. } => vec![],
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } | Op::Broadcast { .. } | Op::Fused(_) => {
            let e = s.op.elementwise_expr().ok_or("not elementwise")?;
            let list: Vec<(u64, &TensorType)> = ins.iter().zip(&s.inputs).map(|(&a, o)| (a, &o.ty)).collect();
            vec![fused_launch(&e, &list, (out, out_ty))?]
        }
        Op::MatMul { transpose_b, epilogue } => {
            let (a, b) = (&s.inputs[0].ty, &s.inputs[1].ty);
            let r = out_ty.rank();
            let (m, nn) = (out_ty.shape[r - 2], out_ty.shape[r - 1]);
            let k = a.shape[a.rank() - 1];
            let batch = n / (m * nn).max(1);
            let lead = |t: &TensorType| t.shape[..t.rank() - 2].iter().product::<usize>();
            // Batch axes that broadcast partially: those operands are copied to the full batch.
            let (pre, ins, (la, lb)) = index::broadcast_operands(s, l, ins, (lead(a), lead(b)))?;
            // A batched `a` against one `b` is one GEMM with batch folded into M.
            let (gm, gbatch, a_stride, b_stride) = if batch > 1 && la == batch && lb == 1 {
                (m * batch, 1, 0, 0)
            } else {
                (m, batch, if la == 1 { 0 } else { m * k }, if lb == 1 { 0 } else { k * nn })
            };
            let extra: Vec<TensorType> = s.inputs[2..].iter().map(|o| o.ty.clone()).collect();
            let mut g = Gemm {
                dtype: out_ty.dtype,
                m: gm,
                n: nn,
                k,
                batch: gbatch,
                transpose_b: *transpose_b,
                a: ins[0],
                b: ins[1],
                c: out,
                a_stride,
                b_stride,
                epilogue: Epilogue::None,
                gemv: None,
            };
            let mut work = Vec::new();
            match epilogue.as_ref().map(|e| (e, epilogue_kind(e, &extra, out_ty))) {
                None => {}
                Some((_, Some(kind))) => g.epilogue = kind.epilogue(&ins[2..]),
                Some((e, None)) => {
                    let mut list: Vec<(u64, &TensorType)> = vec![(out, out_ty)];
                    list.extend(ins[2..].iter().zip(&s.inputs[2..]).map(|(&a, o)| (a, &o.ty)));
                    work.push(fused_launch(e, &list, (out, out_ty))?);
                }
            }
            g.gemv = super::gemm::gemv_launch(&g);
            work.insert(0, Work::Gemm(g));
            work.splice(0..0, pre);
            work
        }
        Op::LayerNorm { eps } | Op::RmsNorm { eps, .. } => {
            let d = *shape.last().unwrap_or(&1);
            let layer = matches!(s.op, Op::LayerNorm { .. });
            let add_one = matches!(s.op, Op::RmsNorm { add_one: true, .. });
            let mut p = NormParams {
                x: ins[0],
                w: ins[1],
                b: 0,
                out,
                rows: (n / d.max(1)) as i32,
                d: d as i32,
                eps: *eps,
                add_one: add_one as i32,
            };
            let mut relocs = vec![off_of(&p, &p.x), off_of(&p, &p.w), off_of(&p, &p.out)];
            if layer {
                p.b = ins[2];
                relocs.push(off_of(&p, &p.b));
            }
            let name = if layer { "layer_norm" } else { "rms_norm" };
            vec![launch("norm", format!("{name}_{}", float_suffix(out_ty.dtype)?), (p.rows.max(1) as u32, 1, 1), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::Softmax { axis } if axis + 1 < s.inputs[0].ty.rank() => index::lower(s, l, &ins, out)?,
        Op::Softmax { .. } => {
            let d = *shape.last().unwrap_or(&1);
            let p = NormParams { x: ins[0], out, rows: (n / d.max(1)) as i32, d: d as i32, ..Default::default() };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
            vec![launch(
                "norm",
                format!("softmax_{}", float_suffix(out_ty.dtype)?),
                (p.rows.max(1) as u32, 1, 1),
                kc::BLOCK,
                0,
                &p,
                &relocs,
            )]
        }
        Op::Attention(att) => {
            let (q, k, v) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &s.inputs[2].ty.shape);
            let (mma, _, splits) = attention_plan(s)?;
            let (mask_kind, q_offset, window) = match att.mask {
                MaskKind::None => (0, 0, 0),
                MaskKind::Causal { q_offset } => (1, q_offset, 0),
                MaskKind::SlidingWindow { q_offset, window } => (2, q_offset, window),
                MaskKind::Additive => (3, 0, 0),
            };
            let mut p = AttnParams {
                q: ins[0],
                k: ins[1],
                v: ins[2],
                mask: if mask_kind == 3 { ins[3] } else { 0 },
                out,
                partial: if splits > 1 { l.scratch as u64 } else { 0 },
                batch: q[0] as i32,
                sq: q[1] as i32,
                sk: k[1] as i32,
                hq: q[2] as i32,
                hkv: k[2] as i32,
                d: q[3] as i32,
                dv: v[3] as i32,
                mask_kind,
                q_offset: q_offset as i32,
                window: window as i32,
                splits: splits as i32,
                pad: 0,
                scale: att.scale,
                softcap: att.softcap.unwrap_or(0.0),
            };
            let mut relocs = vec![off_of(&p, &p.q), off_of(&p, &p.k), off_of(&p, &p.v), off_of(&p, &p.out)];
            if mask_kind == 3 {
                relocs.push(off_of(&p, &p.mask));
            }
            if splits > 1 {
                relocs.push(off_of(&p, &p.partial));
            }
            let t = float_suffix(out_ty.dtype)?;
            if mma {
                let d = q[3];
                let grid = (q[1].div_ceil(kc::MMA_BQ) as u32, q[2] as u32, q[0] as u32);
                vec![launch("attention", format!("attn_mma_{t}_d{d}"), grid, 128, kc::mma_smem(d) as u32, &p, &relocs)]
            } else {
                let grid = ((q[1] * q[2]) as u32, q[0] as u32, splits as u32);
                let mut w = vec![launch("attention", format!("attn_rows_{t}"), grid, 128, 0, &p, &relocs)];
                if splits > 1 {
                    p.splits = splits as i32;
                    w.push(launch("attention", format!("attn_combine_{t}"), (grid.0, grid.1, 1), 128, 0, &p, &relocs));
                }
                w
            }
        }
        Op::Permute { perm } => {
            let st = contiguous(&s.inputs[0].ty.shape);
            let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            vec![copy_launch(&shape, es, ins[0], &pst, out, &contiguous(&shape))?]
        }
        Op::Slice { axis, start, step, .. } => {
            let mut st = contiguous(&s.inputs[0].ty.shape);
            let base = ins[0] + (start * st[*axis] * es) as u64;
            st[*axis] *= step;
            vec![copy_launch(&shape, es, base, &st, out, &contiguous(&shape))?]
        }
        Op::Concat { axis } => {
            let dst = contiguous(&shape);
            let mut at = 0;
            let mut v = Vec::new();
            for (o, &a) in s.inputs.iter().zip(&ins) {
                let sh = if o.ty.shape.is_empty() { vec![1] } else { o.ty.shape.clone() };
                v.push(copy_launch(&sh, es, a, &contiguous(&sh), out + (at * dst[*axis] * es) as u64, &dst)?);
                at += sh[*axis];
            }
            v
        }
        Op::Gather { axis } => {
            let x = &s.inputs[0].ty.shape;
            let p = GatherParams {
                x: ins[0],
                idx: ins[1],
                out,
                err: l.error_flag as u64,
                outer: x[..*axis].iter().product::<usize>() as i64,
                len: x[*axis] as i64,
                nidx: s.inputs[1].ty.numel() as i64,
                inner: x[axis + 1..].iter().product::<usize>() as i64,
            };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.idx), off_of(&p, &p.out), off_of(&p, &p.err)];
            let it = index_suffix(s.inputs[1].ty.dtype)?;
            vec![launch("data", format!("gather_b{es}_{it}"), grid1(n), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::WriteSlice { axis } => {
            // Rows [outer, rows, inner] written at a position read on the device. In place
            // when the lowering aliased the output to the destination (a state); otherwise
            // the destination is copied first.
            let (dst, rows) = (&s.inputs[0], &s.inputs[1].ty.shape);
            let mut v = Vec::new();
            if dst.slot != s.output.slot {
                v.push(copy_launch(&shape, es, ins[0], &contiguous(&shape), out, &contiguous(&shape))?);
            }
            let p = GatherParams {
                x: ins[1],
                idx: ins[2],
                out,
                err: l.error_flag as u64,
                outer: shape[..*axis].iter().product::<usize>() as i64,
                len: shape[*axis] as i64,
                nidx: rows[*axis] as i64,
                inner: shape[axis + 1..].iter().product::<usize>() as i64,
            };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.idx), off_of(&p, &p.out), off_of(&p, &p.err)];
            let it = index_suffix(s.inputs[2].ty.dtype)?;
            v.push(launch("data", format!("write_rows_b{es}_{it}"), grid1(s.inputs[1].ty.numel()), kc::BLOCK, 0, &p, &relocs));
            v
        }
        Op::MoeDispatch { rows } => {
            let (x, slot) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape);
            let p = MoeParams {
                x: ins[0],
                slot: ins[1],
                w: 0,
                out,
                tokens: x[0] as i32,
                k: slot[1] as i32,
                d: x[1] as i32,
                rows: *rows as i32,
            };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.slot), off_of(&p, &p.out)];
            let name = format!("moe_dispatch_{}_{}", float_suffix(out_ty.dtype)?, index_suffix(s.inputs[1].ty.dtype)?);
            vec![
                Work::Zero { offset: out, bytes: out_ty.bytes() },
                launch("data", name, ((x[0] * slot[1]).max(1) as u32, 1, 1), kc::BLOCK, 0, &p, &relocs),
            ]
        }
        Op::MoeCombine => {
            let (y, slot) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape);
            let p = MoeParams {
                x: ins[0],
                slot: ins[1],
                w: ins[2],
                out,
                tokens: slot[0] as i32,
                k: slot[1] as i32,
                d: y[1] as i32,
                rows: y[0] as i32,
            };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.slot), off_of(&p, &p.w), off_of(&p, &p.out)];
            let name = format!("moe_combine_{}_{}", float_suffix(out_ty.dtype)?, index_suffix(s.inputs[1].ty.dtype)?);
            vec![launch("data", name, (slot[0].max(1) as u32, 1, 1), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::Reduce { op, axes, .. } => {
            let x = &s.inputs[0].ty.shape;
            let st = contiguous(x);
            if x.len() > MAX_RANK {
                return Err("reduce beyond rank 8".into());
            }
            let mut p = ReduceParams {
                x: ins[0],
                out,
                op: match op {
                    ReduceOp::Sum => 0,
                    ReduceOp::Mean => 1,
                    ReduceOp::Max => 2,
                    ReduceOp::Min => 3,
                },
                ..Default::default()
            };
            let (mut no, mut nr) = (1usize, 1usize);
            for (a, &d) in x.iter().enumerate() {
                if axes.contains(&a) {
                    p.dims_r[p.rank_r as usize] = d as i64;
                    p.st_r[p.rank_r as usize] = st[a] as i64;
                    p.rank_r += 1;
                    nr *= d;
                } else {
                    p.dims_o[p.rank_o as usize] = d as i64;
                    p.st_o[p.rank_o as usize] = st[a] as i64;
                    p.rank_o += 1;
                    no *= d;
                }
            }
            p.nout = no as i64;
            p.nred = nr as i64;
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
            vec![launch("data", format!("reduce_{}", float_suffix(out_ty.dtype)?), grid1(no), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::Iota { axis, start, step } => {
            let p = IotaParams {
                out,
                n: n as i64,
                inner: shape[axis + 1..].iter().product::<usize>() as i64,
                len: shape[*axis] as i64,
                start: *start,
                step: *step,
            };
            let relocs = [off_of(&p, &p.out)];
            vec![launch("data", format!("iota_{}", out_ty.dtype.name()), grid1(n), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::TakeAlongAxis { .. } | Op::ScatterAdd { .. } | Op::TopK { .. } | Op::CumSum { .. } | Op::Resize { .. } => {
            index::lower(s, l, &ins, out)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_graph::{Attention, BinaryOp, Instr, UnaryOp};

    pub(super) fn tt(d: DType, s: &[usize]) -> TensorType {
        TensorType::new(d, s.to_vec())
    }

    pub(super) fn arena(offset: usize, ty: TensorType) -> Operand {
        Operand { slot: Slot::Arena { offset, bytes: ty.bytes() }, ty }
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
    fn attention_picks_tensor_cores_for_half_prefill_and_rows_for_decode() {
        let att = Op::Attention(Attention { scale: 0.1, softcap: Some(50.0), mask: MaskKind::Causal { q_offset: 0 } });
        let q = tt(DType::BF16, &[1, 1024, 8, 256]);
        let kv = tt(DType::BF16, &[1, 1024, 4, 256]);
        assert_eq!(kernel_for(&att, &[q.clone(), kv.clone(), kv.clone()], &q).unwrap(), "attn_mma_bf16_d256");
        let q1 = tt(DType::BF16, &[1, 1, 8, 256]);
        assert_eq!(kernel_for(&att, &[q1.clone(), kv.clone(), kv.clone()], &q1).unwrap(), "attn_rows_bf16");
        let step = Step {
            node: 0,
            op: att,
            kernel: String::new(),
            inputs: vec![arena(0, q1.clone()), arena(4096, kv.clone()), arena(1 << 22, kv)],
            output: arena(1 << 23, q1),
        };
        let l = Layout { scratch: 1 << 24, ..Default::default() };
        let w = lower_step(&step, &l).unwrap();
        assert_eq!(w.len(), 2, "split-K: partials, then the combine");
        let Work::Kernel(k) = &w[0] else { panic!() };
        assert_eq!(k.kernel, "attn_rows_bf16");
        assert!(k.grid.2 > 1);
        assert_eq!(k.relocs.len(), 5);
    }

    #[test]
    fn relocations_point_at_the_addresses() {
        let x = tt(DType::F32, &[4, 8]);
        let step = Step {
            node: 0,
            op: Op::Unary(UnaryOp::Exp),
            kernel: String::new(),
            inputs: vec![arena(256, x.clone())],
            output: arena(512, x),
        };
        let w = lower_step(&step, &Layout::default()).unwrap();
        let Work::Kernel(k) = &w[0] else { panic!() };
        let read = |at: usize| u64::from_le_bytes(k.params[at..at + 8].try_into().unwrap());
        assert_eq!(k.relocs.iter().map(|&r| read(r)).collect::<Vec<_>>(), [512, 256]);
    }
}
