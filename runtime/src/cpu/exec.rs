//! Running a prepared program on the CPU: operands resolved to slices of the arena, weights
//! and constants; one kernel call per step.

use super::fused::{expr_of, Region};
use super::{Aligned, WeightBuf};
use crate::backend::Executable;
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use kiln_graph::interp::{eval_op, Value};
use kiln_graph::program::{Entry, Operand, Program, Slot, Step};
use kiln_graph::{MaskKind, Op, ResizeMode};
use kiln_kernels::cpu::{attention as attn, gemm, index, movement, norm, resize, sgemm512, softmax};
use std::sync::Arc;

/// What a step needs beyond its operands, worked out once at load.
pub(crate) enum Prep {
    None,
    /// An elementwise step.
    Region(Region),
    /// A matmul: its epilogue, and its weight packed for the AVX-512 kernel when it has one.
    MatMul {
        epilogue: Option<Region>,
        packed: Option<Arc<sgemm512::PackedB>>,
    },
    /// Attention's buffers, made once.
    Attention(attn::AttnWorkspace),
}

fn attn_shape(s: &Step) -> attn::AttnShape {
    let (q, k, v) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &s.inputs[2].ty.shape);
    attn::AttnShape { batch: q[0], q_len: q[1], kv_len: k[1], q_heads: q[2], kv_heads: k[2], head_dim: q[3], v_head_dim: v[3] }
}

/// Packed right-hand sides by (weight index, transposed), shared by every step and entry that
/// reads the same weight the same way (a prefill and a decode entry pack each weight once).
pub(crate) type PackCache = std::collections::HashMap<(u32, bool), Arc<sgemm512::PackedB>>;

/// Prepares an entry's steps; `weight` reads a weight's f32 data (for packing).
pub(crate) fn prepare(e: &Entry, weight: &dyn Fn(u32, usize) -> Option<Vec<f32>>, cache: &mut PackCache) -> Result<Vec<Prep>> {
    e.steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let err = |msg| RuntimeError::Step { step: i, op: s.op.name(), msg };
            let shapes: Vec<&[usize]> = s.inputs.iter().map(|o| o.ty.shape.as_slice()).collect();
            Ok(match &s.op {
                Op::MatMul { epilogue, transpose_b } => {
                    let epilogue = match epilogue {
                        Some(ex) => {
                            let mut sh = vec![s.output.ty.shape.as_slice()];
                            sh.extend(&shapes[2..]);
                            Some(Region::new(ex.clone(), &sh, &s.output.ty.shape).map_err(err)?)
                        }
                        None => None,
                    };
                    Prep::MatMul { epilogue, packed: pack_weight(s, *transpose_b, weight, cache) }
                }
                op if s.kernel == "cpu.fused" => {
                    let ex = expr_of(op).ok_or_else(|| err("not an elementwise op".into()))?;
                    Prep::Region(Region::new(ex, &shapes, &s.output.ty.shape).map_err(err)?)
                }
                Op::Attention(_) if s.kernel == "cpu.flash_attention" => Prep::Attention(attn::AttnWorkspace::new(&attn_shape(s))),
                _ => Prep::None,
            })
        })
        .collect()
}

/// Packs a 2-D weight right-hand side once, when the AVX-512 kernel can use it.
fn pack_weight(
    s: &Step,
    tb: bool,
    weight: &dyn Fn(u32, usize) -> Option<Vec<f32>>,
    cache: &mut PackCache,
) -> Option<Arc<sgemm512::PackedB>> {
    let b = &s.inputs[1];
    let (Slot::Weight(i), true, true) = (b.slot, b.ty.rank() == 2, sgemm512::available()) else { return None };
    if s.kernel != "cpu.gemm" && s.kernel != "cpu.gemm+epilogue" {
        return None;
    }
    if let Some(p) = cache.get(&(i, tb)) {
        return Some(p.clone());
    }
    let data = weight(i, b.ty.numel())?;
    let (r, c) = (b.ty.shape[0], b.ty.shape[1]);
    let view = if tb { gemm::MatView::transposed(&data, c, r) } else { gemm::MatView::row_major(&data, r, c) };
    let p = Arc::new(sgemm512::PackedB::pack(view));
    cache.insert((i, tb), p.clone());
    Some(p)
}

pub(crate) struct CpuExec {
    pub(crate) weights: Arc<WeightStore>,
    pub(crate) wbufs: Vec<WeightBuf>,
    pub(crate) consts: Vec<Aligned>,
    pub(crate) arena: Aligned,
    pub(crate) program: Program,
    pub(crate) prepared: Vec<Vec<Prep>>,
}

/// Operand access for one run. The arena is reached through a raw pointer because a step
/// reads some arena ranges while writing another; the memory plan guarantees that ranges
/// live at the same step never overlap (checked by the planner's property tests).
struct Mem<'a> {
    arena: *mut u8,
    weights: &'a WeightStore,
    wbufs: &'a [WeightBuf],
    consts: &'a [Aligned],
}

impl<'a> Mem<'a> {
    fn read(&self, o: &Operand) -> &'a [u8] {
        let n = o.ty.bytes();
        match o.slot {
            // SAFETY: `load` checked every arena operand lies inside the arena; no step writes
            // this range while it is read (memory plan invariant, see the struct comment).
            Slot::Arena { offset, .. } => unsafe { std::slice::from_raw_parts(self.arena.add(offset), n) },
            Slot::Weight(i) => match &self.wbufs[i as usize] {
                WeightBuf::Mapped { start, file, .. } => &self.weights.map_bytes(*file)[*start..*start + n],
                WeightBuf::Owned(a) => &a.bytes()[..n],
            },
            Slot::Const(i) => &self.consts[i as usize].bytes()[..n],
        }
    }

    #[allow(clippy::mut_from_ref)]
    fn write(&self, o: &Operand) -> &'a mut [u8] {
        match o.slot {
            // SAFETY: as in `read`; the output range of a step overlaps no range it reads.
            Slot::Arena { offset, .. } => unsafe { std::slice::from_raw_parts_mut(self.arena.add(offset), o.ty.bytes()) },
            Slot::Weight(_) | Slot::Const(_) => unreachable!("load() refuses programs whose steps write outside the arena"),
        }
    }

    fn f32(&self, o: &Operand) -> &'a [f32] {
        bytemuck::cast_slice(self.read(o))
    }

    fn f32_mut(&self, o: &Operand) -> &'a mut [f32] {
        bytemuck::cast_slice_mut(self.write(o))
    }
}

impl Executable for CpuExec {
    fn run(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<()> {
        // The whole run executes on a pool worker: kernels' parallel loops then queue work on
        // that worker's own deque instead of rayon's global injector, whose linked blocks
        // would be allocated as runs go by.
        rayon::scope(|_| self.run_inner(entry, inputs, outputs, None))
    }

    fn run_timed(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], times: &mut Vec<f64>) -> Result<()> {
        times.clear();
        rayon::scope(|_| self.run_inner(entry, inputs, outputs, Some(times)))
    }
}

impl CpuExec {
    fn run_inner(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], mut times: Option<&mut Vec<f64>>) -> Result<()> {
        let e = &self.program.entries[entry];
        let mem = Mem { arena: self.arena.bytes_mut().as_mut_ptr(), weights: &self.weights, wbufs: &self.wbufs, consts: &self.consts };
        for (io, bytes) in e.inputs.iter().zip(inputs) {
            mem.write(&io.operand).copy_from_slice(bytes);
        }
        for (i, (s, p)) in e.steps.iter().zip(&self.prepared[entry]).enumerate() {
            let t = times.is_some().then(std::time::Instant::now);
            step(&mem, s, p).map_err(|msg| RuntimeError::Step { step: i, op: s.op.name(), msg })?;
            if let (Some(times), Some(t)) = (times.as_deref_mut(), t) {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        for (io, out) in e.outputs.iter().zip(outputs.iter_mut()) {
            out.copy_from_slice(mem.read(&io.operand));
        }
        Ok(())
    }
}

fn step(mem: &Mem, s: &Step, p: &Prep) -> std::result::Result<(), String> {
    let out_ty = &s.output.ty;
    match (&s.op, p) {
        (Op::MatMul { transpose_b, .. }, Prep::MatMul { epilogue, packed }) => {
            matmul(mem, s, *transpose_b, epilogue.as_ref(), packed.as_deref())
        }
        (_, Prep::Region(r)) => {
            let mut ins: [&[f32]; super::fused::MAX_INPUTS] = [&[]; super::fused::MAX_INPUTS];
            for (k, o) in s.inputs.iter().enumerate() {
                ins[k] = mem.f32(o);
            }
            r.eval(&ins[..s.inputs.len()], mem.f32_mut(&s.output));
            Ok(())
        }
        (Op::LayerNorm { eps }, _) => {
            let d = *out_ty.shape.last().unwrap_or(&1);
            let rows = out_ty.numel() / d.max(1);
            let (x, g, b) = (mem.f32(&s.inputs[0]), mem.f32(&s.inputs[1]), mem.f32(&s.inputs[2]));
            norm::layer_norm(x, rows, d, g, Some(b), *eps, mem.f32_mut(&s.output));
            Ok(())
        }
        (Op::RmsNorm { eps, add_one }, _) => {
            let d = *out_ty.shape.last().unwrap_or(&1);
            let rows = out_ty.numel() / d.max(1);
            norm::rms_norm(mem.f32(&s.inputs[0]), rows, d, mem.f32(&s.inputs[1]), *add_one, *eps, mem.f32_mut(&s.output));
            Ok(())
        }
        (Op::Softmax { .. }, _) if s.kernel == "cpu.softmax" => {
            let n = *out_ty.shape.last().unwrap_or(&1);
            softmax::softmax(mem.f32(&s.inputs[0]), out_ty.numel() / n.max(1), n, mem.f32_mut(&s.output));
            Ok(())
        }
        (Op::Attention(a), Prep::Attention(ws)) => {
            let shape = attn_shape(s);
            let mask = match a.mask {
                MaskKind::None => attn::AttnMask::None,
                MaskKind::Causal { q_offset } => attn::AttnMask::Causal { q_offset },
                MaskKind::SlidingWindow { q_offset, window } => attn::AttnMask::SlidingWindow { q_offset, window },
                MaskKind::Additive => attn::AttnMask::Additive(mem.f32(&s.inputs[3])),
            };
            let (qd, kd, vd) = (mem.f32(&s.inputs[0]), mem.f32(&s.inputs[1]), mem.f32(&s.inputs[2]));
            attn::attention_in(&shape, qd, kd, vd, a.scale, a.softcap, mask, mem.f32_mut(&s.output), ws);
            Ok(())
        }
        (Op::Gather { .. }, _) if s.kernel == "cpu.gather" => {
            let table = &s.inputs[0].ty;
            let rows = table.shape.first().copied().unwrap_or(0);
            let d = table.numel() / rows.max(1);
            let ids: &[i64] = bytemuck::cast_slice(mem.read(&s.inputs[1]));
            if let Some((i, &bad)) = ids.iter().enumerate().find(|(_, &x)| x < 0 || x as usize >= rows) {
                return Err(format!("index {bad} (element {i} of the indices {}) is out of range 0..{rows}", s.inputs[1].ty));
            }
            let src: &[u32] = bytemuck::cast_slice(mem.read(&s.inputs[0]));
            index::gather_rows(src, d, ids, bytemuck::cast_slice_mut(mem.write(&s.output)));
            Ok(())
        }
        (Op::Permute { perm }, _) => {
            let es = s.output.ty.dtype.size();
            let (src, dst) = (mem.read(&s.inputs[0]), mem.write(&s.output));
            let shape = &s.inputs[0].ty.shape;
            match es {
                4 => movement::permute(bytemuck::cast_slice::<u8, u32>(src), shape, perm, bytemuck::cast_slice_mut::<u8, u32>(dst)),
                8 => movement::permute(bytemuck::cast_slice::<u8, u64>(src), shape, perm, bytemuck::cast_slice_mut::<u8, u64>(dst)),
                2 => movement::permute(bytemuck::cast_slice::<u8, u16>(src), shape, perm, bytemuck::cast_slice_mut::<u8, u16>(dst)),
                _ => movement::permute(src, shape, perm, dst),
            }
            Ok(())
        }
        (Op::Slice { axis, start, end, step }, _) => {
            let es = s.output.ty.dtype.size();
            let sh = &s.inputs[0].ty.shape;
            let (outer, len, inner) = split(sh, *axis);
            movement::slice(mem.read(&s.inputs[0]), outer, len, inner * es, *start, *end, *step, mem.write(&s.output));
            Ok(())
        }
        (Op::Concat { axis }, _) => {
            let es = s.output.ty.dtype.size();
            let out = mem.write(&s.output);
            let (outer, total, inner) = split(&s.output.ty.shape, *axis);
            let mut at = 0;
            for o in &s.inputs {
                let len = o.ty.shape[*axis];
                let src = mem.read(o);
                for r in 0..outer {
                    let n = len * inner * es;
                    let d0 = (r * total + at) * inner * es;
                    out[d0..d0 + n].copy_from_slice(&src[r * n..(r + 1) * n]);
                }
                at += len;
            }
            Ok(())
        }
        (Op::Resize { size, mode }, _) if s.kernel == "cpu.resize" => {
            let sh = &s.inputs[0].ty.shape;
            let r = sh.len();
            let (ih, iw) = (sh[r - 2], sh[r - 1]);
            let planes = s.inputs[0].ty.numel() / (ih * iw).max(1);
            let (src, dst) = (mem.f32(&s.inputs[0]), mem.f32_mut(&s.output));
            match mode {
                ResizeMode::Bicubic => resize::resize_bicubic(src, planes, ih, iw, size[0], size[1], dst),
                ResizeMode::Bilinear => resize::resize_bilinear(src, planes, ih, iw, size[0], size[1], dst),
            }
            Ok(())
        }
        _ => reference(mem, s),
    }
}

fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Batched matmul; the product's batch axes are flattened into rows when `b` is shared.
fn matmul(mem: &Mem, s: &Step, tb: bool, region: Option<&Region>, packed: Option<&sgemm512::PackedB>) -> std::result::Result<(), String> {
    let (at, bt, ot) = (&s.inputs[0].ty, &s.inputs[1].ty, &s.output.ty);
    let (ra, rb, ro) = (at.rank(), bt.rank(), ot.rank());
    let (m, k, n) = (at.shape[ra - 2], at.shape[ra - 1], ot.shape[ro - 1]);
    let (a, b, c) = (mem.f32(&s.inputs[0]), mem.f32(&s.inputs[1]), mem.f32_mut(&s.output));
    let b_batches: usize = bt.shape[..rb - 2].iter().product();
    let a_batches: usize = at.shape[..ra - 2].iter().product();
    let out_batches: usize = ot.shape[..ro - 2].iter().product();
    let bview = |data| if tb { gemm::MatView::transposed(data, k, n) } else { gemm::MatView::row_major(data, k, n) };
    let mut extra: [&[f32]; super::fused::MAX_INPUTS] = [&[]; super::fused::MAX_INPUTS];
    for (i, o) in s.inputs[2..].iter().enumerate() {
        extra[i] = mem.f32(o);
    }
    let extra = &extra[..s.inputs.len() - 2];
    if let (Some(pb), true) = (packed, b_batches == 1 && a_batches == out_batches) {
        sgemm512::matmul_packed(a, m * a_batches, k, pb, c);
        if let Some(r) = region {
            r.eval_in_place(extra, c);
        }
        return Ok(());
    }
    if b_batches == 1 && a_batches == out_batches {
        // One weight for every row: a single (m * batches) x k x n product, epilogue fused per panel.
        let av = gemm::MatView::row_major(a, m * a_batches, k);
        match region {
            Some(r) => gemm::matmul_with_epilogue(av, bview(b), c, &|row, panel| r.eval_rows(extra, panel, row, true)),
            None => gemm::matmul(av, bview(b), c),
        }
        return Ok(());
    }
    if a_batches == out_batches && b_batches == out_batches {
        gemm::batched_matmul(out_batches, gemm::MatView::row_major(a, m, k), m * k, bview(b), k * n, c);
    } else {
        // General broadcasting of batch axes: one product per output batch.
        let sa = kiln_graph::dtype::broadcast_strides(&at.shape[..ra - 2], &ot.shape[..ro - 2]);
        let sb = kiln_graph::dtype::broadcast_strides(&bt.shape[..rb - 2], &ot.shape[..ro - 2]);
        let bshape = &ot.shape[..ro - 2];
        for (bi, cb) in c.chunks_mut(m * n).enumerate() {
            let (mut i, mut oa, mut ob) = (bi, 0, 0);
            for d in (0..bshape.len()).rev() {
                oa += (i % bshape[d]) * sa[d];
                ob += (i % bshape[d]) * sb[d];
                i /= bshape[d];
            }
            gemm::matmul(gemm::MatView::row_major(&a[oa * m * k..], m, k), bview(&b[ob * k * n..]), cb);
        }
    }
    if let Some(r) = region {
        let rows = c.len() / n.max(1);
        r.eval_rows(extra, &mut c[..rows * n], 0, true);
    }
    Ok(())
}

/// Any op without a fast kernel: the interpreter's arm on converted values. Correct for every
/// dtype, slow and allocating; `kiln inspect` names these steps `cpu.reference`.
fn reference(mem: &Mem, s: &Step) -> std::result::Result<(), String> {
    let vals: Vec<Value> =
        s.inputs.iter().map(|o| Value { ty: o.ty.clone(), data: crate::tensor::to_f64(o.ty.dtype, mem.read(o)) }).collect();
    let refs: Vec<&Value> = vals.iter().collect();
    let v = eval_op(&s.op, &refs, &s.output.ty)?;
    mem.write(&s.output).copy_from_slice(&crate::tensor::from_f64(s.output.ty.dtype, &v.data));
    Ok(())
}
