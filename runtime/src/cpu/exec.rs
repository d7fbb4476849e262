//! Running a prepared program on the CPU: operands resolved to slices of the arena, weights
//! and constants; one kernel call per step.

use super::fused::{Region, Src};
use super::group::Part;
use super::kernel::CpuKernel;
use super::pack;
use super::rotary::Roles;
use super::{Aligned, WeightBuf};
use crate::backend::Executable;
use crate::error::{Result, RuntimeError};
use crate::geometry::Split;
use crate::weights::WeightStore;
use kiln_graph::interp::{eval_op, Value};
use kiln_graph::program::{Entry, Operand, Program, Slot, Step};
use kiln_graph::sample;
use kiln_graph::{DType, MaskKind, Op, ReduceOp, ResizeMode};
use kiln_kernels::cpu::reduce::{self, RowReduce};
use kiln_kernels::cpu::{attention as attn, conv, gemm, index, movement, norm, resize, sgemm512, softmax};
use rayon::prelude::*;
use std::sync::Arc;

/// What a step needs beyond its operands, worked out once at load.
pub(crate) enum Prep {
    None,
    /// An elementwise step.
    Region(Region),
    /// A matmul: its epilogue, and its weight packed for the AVX-512 kernel when it has one
    /// (one packed matrix per batch for a batched weight, such as V-MoE's experts).
    MatMul {
        epilogue: Option<Region>,
        packed: Arc<Vec<sgemm512::PackedB>>,
    },
    /// Attention's buffers, made once.
    Attention(attn::AttnWorkspace),
    /// A gather reading its table's rows from the weight's transposed panels ([`pack::link_gathers`]).
    Gather(Arc<Vec<sgemm512::PackedB>>),
}

fn attn_shape(s: &Step) -> attn::AttnShape {
    let (q, k, v) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &s.inputs[2].ty.shape);
    attn::AttnShape { batch: q[0], q_len: q[1], kv_len: k[1], q_heads: q[2], kv_heads: k[2], head_dim: q[3], v_head_dim: v[3] }
}

pub(crate) use super::pack::{runs_packed, PackCache};

/// A step as loaded: its kernel, checked against its op and operands, and what it needs.
pub(crate) struct Prepared {
    pub(crate) kernel: CpuKernel,
    pub(crate) prep: Prep,
}

/// Checks that a stored step is one this backend would have made: the op's shape rule holds
/// for its operands (a hand-made or corrupt program fails here, not inside a kernel), and the
/// kernel is the one [`super::kernel::choose`] picks (or the interpreter, which runs any op).
fn resolve(s: &Step) -> std::result::Result<CpuKernel, String> {
    let ins: Vec<&kiln_graph::TensorType> = s.inputs.iter().map(|o| &o.ty).collect();
    let ty = kiln_graph::infer::infer(&s.op, &ins, Some(&s.output.ty)).map_err(|e| format!("inconsistent step (corrupt program): {e}"))?;
    if ty != s.output.ty {
        return Err(format!("inconsistent step (corrupt program): the op gives {ty}, the step stores {}", s.output.ty));
    }
    let stored = CpuKernel::parse(&s.kernel)
        .ok_or_else(|| format!("kernel `{}` is not a cpu kernel (a program lowered for another backend?)", s.kernel))?;
    let types: Vec<kiln_graph::TensorType> = s.inputs.iter().map(|o| o.ty.clone()).collect();
    let chosen = super::kernel::choose(&s.op, &types, &s.output.ty)?;
    if stored != chosen && stored != CpuKernel::Reference {
        return Err(format!("kernel `{}` cannot run this step (this build picks `{}`)", s.kernel, chosen.name()));
    }
    Ok(stored)
}

/// Prepares an entry's steps; `weight` gives a weight's first `n` elements as stored (for
/// packing); `consts` are the program's constants (a constant right operand is packed too).
pub(crate) fn prepare<'w>(
    e: &Entry,
    weight: &dyn Fn(u32, usize) -> Option<sgemm512::Stored<'w>>,
    consts: &[kiln_graph::program::ConstData],
    cache: &mut PackCache,
) -> Result<Vec<Prepared>> {
    let total = e.steps.len() as u64;
    e.steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            crate::progress::report(&format!("preparing '{}'", e.name), i as u64, total);
            let err = |msg| RuntimeError::Step { step: i, op: s.op.name(), msg };
            let kernel = resolve(s).map_err(err)?;
            let prep = match kernel {
                CpuKernel::Gemm | CpuKernel::GemmEpilogue => {
                    let Op::MatMul { epilogue, transpose_b } = &s.op else { return Err(err("not a matmul".into())) };
                    let epilogue = match epilogue {
                        Some(ex) => {
                            let mut sh = vec![(s.output.ty.shape.as_slice(), s.inputs[0].ty.dtype)];
                            sh.extend(s.inputs[2..].iter().map(|o| (o.ty.shape.as_slice(), o.ty.dtype)));
                            Some(Region::new(ex.clone(), &sh, &s.output.ty.shape).map_err(err)?)
                        }
                        None => None,
                    };
                    let packed = match pack::pack_const(s, kernel, *transpose_b, consts) {
                        Some(p) => p,
                        None => pack::pack_weight(s, kernel, *transpose_b, weight, cache),
                    };
                    Prep::MatMul { epilogue, packed }
                }
                CpuKernel::GemmGated => super::gated::prepare(s, weight, cache).map_err(err)?,
                CpuKernel::Fused => {
                    let ex = s.op.elementwise_expr().ok_or_else(|| err("not an elementwise op".into()))?;
                    let tys: Vec<(&[usize], DType)> = s.inputs.iter().map(|o| (o.ty.shape.as_slice(), o.ty.dtype)).collect();
                    Prep::Region(Region::new(ex, &tys, &s.output.ty.shape).map_err(err)?)
                }
                CpuKernel::FlashAttention => Prep::Attention(attn::AttnWorkspace::new(&attn_shape(s))),
                CpuKernel::Source
                | CpuKernel::View
                | CpuKernel::LayerNorm
                | CpuKernel::RmsNorm
                | CpuKernel::ResidualRmsNorm
                | CpuKernel::Softmax
                | CpuKernel::Reduce
                | CpuKernel::Gather
                | CpuKernel::Permute
                | CpuKernel::Slice
                | CpuKernel::WriteSlice
                | CpuKernel::Concat
                | CpuKernel::Resize
                | CpuKernel::Conv
                | CpuKernel::TopK
                | CpuKernel::TakeAlongAxis
                | CpuKernel::ScatterAdd
                | CpuKernel::CumSum
                | CpuKernel::Cast
                | CpuKernel::MoeDispatch
                | CpuKernel::MoeCombine
                | CpuKernel::SampleToken
                | CpuKernel::LogSoftmax
                | CpuKernel::TokenLogProb
                | CpuKernel::Reference => Prep::None,
            };
            Ok(Prepared { kernel, prep })
        })
        .collect()
}

pub(crate) struct CpuExec {
    pub(crate) weights: Arc<WeightStore>,
    pub(crate) wbufs: Vec<WeightBuf>,
    pub(crate) consts: Vec<Aligned>,
    pub(crate) arena: Aligned,
    /// Every state of the program, each at `state_off[i]`.
    pub(crate) states: Aligned,
    pub(crate) state_off: Vec<usize>,
    pub(crate) program: Program,
    pub(crate) prepared: Vec<Vec<Prepared>>,
    /// Per entry, the rotations whose cache write runs in their launch ([`super::rotary`]).
    pub(crate) rotary: Vec<Roles>,
    /// Per entry and step, the independent steps run as one dispatch ([`super::group`]).
    pub(crate) groups: Vec<Vec<Part>>,
}

/// Operand access for one run. The arena and the states are reached through raw pointers
/// because a step reads some ranges while writing another; the memory plan guarantees that
/// arena ranges live at the same step never overlap (checked by the planner's property
/// tests), and a step writing a state reads that state only when it is a `write_slice` in
/// place, which never makes a slice of its destination input (checked at load).
pub(super) struct Mem<'a> {
    arena: *mut u8,
    states: *mut u8,
    state_off: &'a [usize],
    weights: &'a WeightStore,
    wbufs: &'a [WeightBuf],
    consts: &'a [Aligned],
}

// SAFETY: `Mem` hands out slices of the arena and states through raw pointers. It is shared
// across threads only by a group's dispatch ([`super::group`]), whose steps `group::plan`
// checked to write no byte another of them reads or writes; within a step, kernels split their
// output into disjoint parts as they do on one thread's call.
unsafe impl Sync for Mem<'_> {}

impl<'a> Mem<'a> {
    pub(super) fn read(&self, o: &Operand) -> &'a [u8] {
        let n = o.ty.bytes();
        match o.slot {
            // SAFETY: `load` checked every arena operand lies inside the arena; no step writes
            // this range while it is read (memory plan invariant, see the struct comment).
            Slot::Arena { offset, .. } => unsafe { std::slice::from_raw_parts(self.arena.add(offset), n) },
            Slot::Weight(i) => match &self.wbufs[i as usize] {
                WeightBuf::Mapped { start, file, .. } => &self.weights.map_bytes(*file)[*start..*start + n],
                WeightBuf::Owned(a) => &a.bytes()[..n],
                // Half as many bytes as the f32 operand: read only by `gather` (checked at load).
                WeightBuf::Bf16 { start, file } => &self.weights.map_bytes(*file)[*start..*start + n / 2],
            },
            Slot::Const(i) => &self.consts[i as usize].bytes()[..n],
            // SAFETY: `load` checked the state exists and has this size; see the struct comment.
            Slot::State(i) => unsafe { std::slice::from_raw_parts(self.states.add(self.state_off[i as usize]), n) },
        }
    }

    #[allow(clippy::mut_from_ref)]
    pub(super) fn write(&self, o: &Operand) -> &'a mut [u8] {
        match o.slot {
            // SAFETY: as in `read`; the output range of a step overlaps no range it reads.
            Slot::Arena { offset, .. } => unsafe { std::slice::from_raw_parts_mut(self.arena.add(offset), o.ty.bytes()) },
            // SAFETY: as in `read`.
            Slot::State(i) => unsafe { std::slice::from_raw_parts_mut(self.states.add(self.state_off[i as usize]), o.ty.bytes()) },
            Slot::Weight(_) | Slot::Const(_) => unreachable!("load() refuses programs whose steps write outside the arena and states"),
        }
    }

    pub(super) fn f32(&self, o: &Operand) -> &'a [f32] {
        bytemuck::cast_slice(self.read(o))
    }

    /// A region input: f32 as it is, anything else as its bytes.
    pub(super) fn src(&self, o: &Operand) -> Src<'a> {
        match o.ty.dtype {
            DType::F32 => Src::F32(self.f32(o)),
            d => Src::Raw(self.read(o), d),
        }
    }

    pub(super) fn f32_mut(&self, o: &Operand) -> &'a mut [f32] {
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

    fn reset_states(&mut self) -> Result<()> {
        self.states.bytes_mut().fill(0);
        Ok(())
    }

    fn read_state(&mut self, i: usize, out: &mut [u8]) -> Result<()> {
        let (off, n) = (self.state_off[i], self.program.states[i].ty.bytes());
        out.copy_from_slice(&self.states.bytes()[off..off + n]);
        Ok(())
    }

    fn gather_state_rows(&mut self, rows: &[usize]) -> Result<()> {
        use rayon::prelude::*;
        let states = self.states.bytes_mut();
        for (st, &off) in self.program.states.iter().zip(&self.state_off) {
            let n = st.ty.bytes();
            let row = n / rows.len().max(1);
            // The chosen rows gathered into a copy, then written back (rows may repeat).
            let old = states[off..off + n].to_vec();
            states[off..off + n].par_chunks_mut(row.max(1)).zip(rows.par_iter()).for_each(|(dst, &r)| {
                dst.copy_from_slice(&old[r * row..(r + 1) * row]);
            });
        }
        Ok(())
    }
}

impl CpuExec {
    fn run_inner(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], mut times: Option<&mut Vec<f64>>) -> Result<()> {
        let e = &self.program.entries[entry];
        let mem = Mem {
            arena: self.arena.bytes_mut().as_mut_ptr(),
            states: self.states.bytes_mut().as_mut_ptr(),
            state_off: &self.state_off,
            weights: &self.weights,
            wbufs: &self.wbufs,
            consts: &self.consts,
        };
        for (io, bytes) in e.inputs.iter().zip(inputs) {
            // An input living in a state reads it as it is unless given.
            if !(bytes.is_empty() && matches!(io.operand.slot, Slot::State(_))) {
                mem.write(&io.operand).copy_from_slice(bytes);
            }
        }
        let (roles, prepared) = (&self.rotary[entry], &self.prepared[entry]);
        let one = |i: usize| {
            super::rotary::run_step(&mem, e, roles, i, &prepared[i]).map_err(|msg| RuntimeError::Step {
                step: i,
                op: e.steps[i].op.name(),
                msg,
            })
        };
        for i in 0..e.steps.len() {
            let t = times.is_some().then(std::time::Instant::now);
            match &self.groups[entry][i] {
                Part::Alone => one(i)?,
                // Independent steps as the tasks of one dispatch ([`super::group`]).
                Part::Leads(members) => members.par_iter().try_for_each(|&j| one(j))?,
                Part::In(_) => {}
            }
            if let (Some(times), Some(t)) = (times.as_deref_mut(), t) {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        for (io, out) in e.outputs.iter().zip(outputs.iter_mut()) {
            // An output stored in a state is copied out only when asked for.
            if !(out.is_empty() && matches!(io.operand.slot, Slot::State(_))) {
                out.copy_from_slice(mem.read(&io.operand));
            }
        }
        Ok(())
    }
}

/// Runs one step with its kernel. The kernel was checked against the op at load
/// ([`resolve`]), so each arm destructures the op it was chosen for.
pub(super) fn step(mem: &Mem, s: &Step, kernel: CpuKernel, p: &Prep) -> std::result::Result<(), String> {
    let out_ty = &s.output.ty;
    let mismatch = || Err(format!("kernel {} does not run {} (corrupt program)", kernel.name(), s.op.name()));
    match kernel {
        CpuKernel::Source | CpuKernel::View => Ok(()),
        CpuKernel::Reference => reference(mem, s),
        CpuKernel::Gemm | CpuKernel::GemmEpilogue => match (&s.op, p) {
            (Op::MatMul { transpose_b, .. }, Prep::MatMul { epilogue, packed }) => matmul(mem, s, *transpose_b, epilogue.as_ref(), packed),
            _ => mismatch(),
        },
        CpuKernel::GemmGated => gated(mem, s, p).unwrap_or_else(mismatch),
        CpuKernel::Fused => {
            let Prep::Region(r) = p else { return mismatch() };
            let mut ins = [Src::F32(&[]); super::fused::MAX_INPUTS];
            for (k, o) in s.inputs.iter().enumerate() {
                ins[k] = mem.src(o);
            }
            r.eval(&ins[..s.inputs.len()], mem.f32_mut(&s.output));
            Ok(())
        }
        CpuKernel::LayerNorm => {
            let Op::LayerNorm { eps } = s.op else { return mismatch() };
            let d = *out_ty.shape.last().unwrap_or(&1);
            let rows = out_ty.numel() / d.max(1);
            let (x, g, b) = (mem.f32(&s.inputs[0]), mem.f32(&s.inputs[1]), mem.f32(&s.inputs[2]));
            norm::layer_norm(x, rows, d, g, Some(b), eps, mem.f32_mut(&s.output));
            Ok(())
        }
        CpuKernel::RmsNorm => {
            let Op::RmsNorm { eps, add_one } = s.op else { return mismatch() };
            let d = *out_ty.shape.last().unwrap_or(&1);
            let rows = out_ty.numel() / d.max(1);
            norm::rms_norm(mem.f32(&s.inputs[0]), rows, d, mem.f32(&s.inputs[1]), add_one, eps, mem.f32_mut(&s.output));
            Ok(())
        }
        CpuKernel::ResidualRmsNorm => residual_norm(mem, s),
        CpuKernel::Softmax => {
            let n = *out_ty.shape.last().unwrap_or(&1);
            softmax::softmax(mem.f32(&s.inputs[0]), out_ty.numel() / n.max(1), n, mem.f32_mut(&s.output));
            Ok(())
        }
        CpuKernel::LogSoftmax | CpuKernel::TokenLogProb => log_probs(mem, s),
        CpuKernel::Reduce => {
            let Op::Reduce { op, axes, .. } = &s.op else { return mismatch() };
            let sh = &s.inputs[0].ty.shape;
            let n: usize = axes.iter().map(|&a| sh[a]).product();
            if n == 0 {
                return reference(mem, s);
            }
            let kind = match op {
                ReduceOp::Sum => RowReduce::Sum,
                ReduceOp::Mean => RowReduce::Mean,
                ReduceOp::Max => RowReduce::Max,
                ReduceOp::Min => RowReduce::Min,
            };
            reduce::reduce_rows(mem.f32(&s.inputs[0]), out_ty.numel(), n, kind, mem.f32_mut(&s.output));
            Ok(())
        }
        CpuKernel::FlashAttention => match (&s.op, p) {
            (Op::Attention(a), Prep::Attention(ws)) => attention(mem, s, a, ws),
            _ => mismatch(),
        },
        CpuKernel::Gather => gather(mem, s, p),
        CpuKernel::Permute => {
            let Op::Permute { perm } = &s.op else { return mismatch() };
            let (src, dst) = (mem.read(&s.inputs[0]), mem.write(&s.output));
            let shape = &s.inputs[0].ty.shape;
            match out_ty.dtype.size() {
                4 => movement::permute(bytemuck::cast_slice::<u8, u32>(src), shape, perm, bytemuck::cast_slice_mut::<u8, u32>(dst)),
                8 => movement::permute(bytemuck::cast_slice::<u8, u64>(src), shape, perm, bytemuck::cast_slice_mut::<u8, u64>(dst)),
                2 => movement::permute(bytemuck::cast_slice::<u8, u16>(src), shape, perm, bytemuck::cast_slice_mut::<u8, u16>(dst)),
                _ => movement::permute(src, shape, perm, dst),
            }
            Ok(())
        }
        CpuKernel::Slice => {
            let Op::Slice { axis, start, end, step } = s.op else { return mismatch() };
            let Split { outer, len, inner } = Split::at(&s.inputs[0].ty.shape, axis);
            movement::slice(mem.read(&s.inputs[0]), outer, len, inner * out_ty.dtype.size(), start, end, step, mem.write(&s.output));
            Ok(())
        }
        CpuKernel::WriteSlice => {
            let Op::WriteSlice { axis } = s.op else { return mismatch() };
            write_slice(mem, s, axis)
        }
        CpuKernel::Concat => {
            let Op::Concat { axis } = s.op else { return mismatch() };
            concat(mem, s, axis);
            Ok(())
        }
        CpuKernel::Resize => {
            let Op::Resize { size, mode } = s.op else { return mismatch() };
            resize(mem, s, size, mode);
            Ok(())
        }
        CpuKernel::Conv => {
            let Op::Conv(c) = &s.op else { return mismatch() };
            conv(mem, s, c);
            Ok(())
        }
        CpuKernel::TopK => {
            let Op::TopK { k } = s.op else { return mismatch() };
            let n = *s.inputs[0].ty.shape.last().unwrap_or(&1);
            let rows = s.inputs[0].ty.numel() / n.max(1);
            index::topk_indices(mem.f32(&s.inputs[0]), rows, n, k, i64_mut(mem, &s.output));
            Ok(())
        }
        CpuKernel::SampleToken => sample_token(mem, s),
        CpuKernel::TakeAlongAxis => {
            let Op::TakeAlongAxis { axis } = s.op else { return mismatch() };
            take_along_axis(mem, s, axis)
        }
        CpuKernel::ScatterAdd => {
            let Op::ScatterAdd { axis } = s.op else { return mismatch() };
            scatter_add(mem, s, axis)
        }
        CpuKernel::CumSum => {
            let Op::CumSum { axis, exclusive } = s.op else { return mismatch() };
            let Split { outer, len, inner } = Split::at(&s.inputs[0].ty.shape, axis);
            match out_ty.dtype {
                DType::F32 => index::cumsum(mem.f32(&s.inputs[0]), outer, len, inner, exclusive, mem.f32_mut(&s.output)),
                _ => index::cumsum(i64s(mem, &s.inputs[0]), outer, len, inner, exclusive, i64_mut(mem, &s.output)),
            }
            Ok(())
        }
        CpuKernel::Cast => {
            let Op::Cast { to } = s.op else { return mismatch() };
            super::kernel::cast(mem.read(&s.inputs[0]), s.inputs[0].ty.dtype, to, mem.write(&s.output));
            Ok(())
        }
        CpuKernel::MoeDispatch => {
            let Op::MoeDispatch { rows } = s.op else { return mismatch() };
            let d = s.inputs[0].ty.shape[1];
            let slot = i64s(mem, &s.inputs[1]);
            check_slots(slot, rows)?;
            index::moe_dispatch(mem.f32(&s.inputs[0]), d, slot, s.inputs[1].ty.shape[1], mem.f32_mut(&s.output));
            Ok(())
        }
        CpuKernel::MoeCombine => {
            let (rows, d) = (s.inputs[0].ty.shape[0], s.inputs[0].ty.shape[1]);
            let slot = i64s(mem, &s.inputs[1]);
            check_slots(slot, rows)?;
            let k = s.inputs[1].ty.shape[1];
            index::moe_combine(mem.f32(&s.inputs[0]), d, slot, mem.f32(&s.inputs[2]), k, mem.f32_mut(&s.output));
            Ok(())
        }
    }
}

fn attention(mem: &Mem, s: &Step, a: &kiln_graph::Attention, ws: &attn::AttnWorkspace) -> std::result::Result<(), String> {
    let shape = attn_shape(s);
    let mask = match a.mask {
        MaskKind::None => attn::AttnMask::None,
        MaskKind::Causal { q_offset } => attn::AttnMask::Causal { q_offset },
        MaskKind::SlidingWindow { q_offset, window } => attn::AttnMask::SlidingWindow { q_offset, window },
        MaskKind::Additive => attn::AttnMask::Additive(mem.f32(&s.inputs[3])),
        MaskKind::Positions(pm) => {
            // A negative start reads as 0, as in the interpreter.
            let start = i64s(mem, &s.inputs[3]).first().map_or(0, |&x| x.max(0) as usize);
            let keep = pm.padding.then(|| i64s(mem, &s.inputs[4]));
            let prefix = pm.prefix.then(|| i64s(mem, &s.inputs[4 + usize::from(pm.padding)]));
            attn::AttnMask::Positions { start, window: pm.window, keep, prefix }
        }
    };
    let (qd, kd, vd) = (mem.f32(&s.inputs[0]), mem.f32(&s.inputs[1]), mem.f32(&s.inputs[2]));
    attn::attention_in(&shape, qd, kd, vd, a.scale, a.softcap, mask, mem.f32_mut(&s.output), ws);
    Ok(())
}

/// [`Op::Gather`] of rows, and [`Op::GatherScaled`]: those rows, then each value times the scale
/// in f32 (what the unfused product's `cpu.fused` step computes).
fn gather(mem: &Mem, s: &Step, p: &Prep) -> std::result::Result<(), String> {
    gather_rows(mem, s, p)?;
    if let Op::GatherScaled { scale, .. } = s.op {
        mem.f32_mut(&s.output).iter_mut().for_each(|x| *x *= scale);
    }
    Ok(())
}

fn gather_rows(mem: &Mem, s: &Step, p: &Prep) -> std::result::Result<(), String> {
    let table = &s.inputs[0].ty;
    let rows = table.shape.first().copied().unwrap_or(0);
    let d = table.numel() / rows.max(1);
    let ids: &[i64] = bytemuck::cast_slice(mem.read(&s.inputs[1]));
    if let Some((i, &bad)) = ids.iter().enumerate().find(|(_, &x)| x < 0 || x as usize >= rows) {
        return Err(format!("index {bad} (element {i} of the indices {}) is out of range 0..{rows}", s.inputs[1].ty));
    }
    if let Prep::Gather(b) = p {
        index::gather_columns(&b[0], ids, bytemuck::cast_slice_mut(mem.write(&s.output)));
        return Ok(());
    }
    let (table, out) = (mem.read(&s.inputs[0]), mem.write(&s.output));
    // A table held as bf16 ([`WeightBuf::Bf16`]) is widened row by row.
    match s.inputs[0].slot {
        Slot::Weight(i) if matches!(mem.wbufs[i as usize], WeightBuf::Bf16 { .. }) => {
            index::gather_rows_bf16(bytemuck::cast_slice(table), d, ids, bytemuck::cast_slice_mut(out))
        }
        _ => index::gather_rows::<u32>(bytemuck::cast_slice(table), d, ids, bytemuck::cast_slice_mut(out)),
    }
    Ok(())
}

/// [`Op::Resize`] of the last two axes, every leading index a plane.
fn resize(mem: &Mem, s: &Step, size: [usize; 2], mode: ResizeMode) {
    let sh = &s.inputs[0].ty.shape;
    let r = sh.len();
    let (ih, iw) = (sh[r - 2], sh[r - 1]);
    let planes = s.inputs[0].ty.numel() / (ih * iw).max(1);
    let (src, dst) = (mem.f32(&s.inputs[0]), mem.f32_mut(&s.output));
    match mode {
        ResizeMode::Bicubic => resize::resize_bicubic(src, planes, ih, iw, size[0], size[1], dst),
        ResizeMode::Bilinear => resize::resize_bilinear(src, planes, ih, iw, size[0], size[1], dst),
    }
}

/// [`Op::Conv`] on f32 NHWC images and HWIO kernels.
fn conv(mem: &Mem, s: &Step, c: &kiln_graph::Conv) {
    let (x, w, y) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &s.output.ty.shape);
    let g = conv::ConvShape {
        b: x[0],
        h: x[1],
        w: x[2],
        ci: x[3],
        kh: w[0],
        kw: w[1],
        co: w[3],
        oh: y[1],
        ow: y[2],
        stride: c.stride,
        pad: c.pad,
        transposed: c.transposed,
    };
    conv::conv2d(mem.f32(&s.inputs[0]), mem.f32(&s.inputs[1]), &g, mem.f32_mut(&s.output));
}

fn write_slice(mem: &Mem, s: &Step, axis: usize) -> std::result::Result<(), String> {
    let out_ty = &s.output.ty;
    let es = out_ty.dtype.size();
    let Split { outer, len, inner } = Split::at(&out_ty.shape, axis);
    let n = s.inputs[1].ty.shape[axis];
    let at = match s.inputs[2].ty.dtype {
        DType::I32 => bytemuck::cast_slice::<u8, i32>(mem.read(&s.inputs[2]))[0] as i64,
        _ => i64s(mem, &s.inputs[2])[0],
    };
    if at < 0 || at as usize + n > len {
        return Err(format!("write_slice of {n} rows at {at} does not fit {len} along axis {axis}"));
    }
    if s.inputs[0].slot != s.output.slot {
        // Out of place: start from a copy of the destination (distinct slots never overlap).
        mem.write(&s.output).copy_from_slice(mem.read(&s.inputs[0]));
    }
    // In place (a state): only the new rows are written.
    let (rows, out) = (mem.read(&s.inputs[1]), mem.write(&s.output));
    let (row, at) = (n * inner * es, at as usize * inner * es);
    for o in 0..outer {
        out[o * len * inner * es + at..][..row].copy_from_slice(&rows[o * row..(o + 1) * row]);
    }
    Ok(())
}

fn concat(mem: &Mem, s: &Step, axis: usize) {
    let es = s.output.ty.dtype.size();
    let out = mem.write(&s.output);
    let Split { outer, len: total, inner } = Split::at(&s.output.ty.shape, axis);
    let mut at = 0;
    for o in &s.inputs {
        let len = o.ty.shape[axis];
        let src = mem.read(o);
        for r in 0..outer {
            let n = len * inner * es;
            let d0 = (r * total + at) * inner * es;
            out[d0..d0 + n].copy_from_slice(&src[r * n..(r + 1) * n]);
        }
        at += len;
    }
}

fn take_along_axis(mem: &Mem, s: &Step, axis: usize) -> std::result::Result<(), String> {
    let Split { outer, len, inner } = Split::at(&s.inputs[0].ty.shape, axis);
    let ilen = s.inputs[1].ty.shape[axis];
    let idx = i64s(mem, &s.inputs[1]);
    check_indices(idx, len)?;
    let (src, dst) = (mem.read(&s.inputs[0]), mem.write(&s.output));
    match s.output.ty.dtype.size() {
        4 => index::take_along_axis(bytemuck::cast_slice::<u8, u32>(src), outer, len, inner, idx, ilen, bytemuck::cast_slice_mut(dst)),
        _ => index::take_along_axis(bytemuck::cast_slice::<u8, u64>(src), outer, len, inner, idx, ilen, bytemuck::cast_slice_mut(dst)),
    }
    Ok(())
}

fn scatter_add(mem: &Mem, s: &Step, axis: usize) -> std::result::Result<(), String> {
    let Split { outer, len, inner } = Split::at(&s.inputs[0].ty.shape, axis);
    let ilen = s.inputs[1].ty.shape[axis];
    let idx = i64s(mem, &s.inputs[1]);
    check_indices(idx, len)?;
    let dst = mem.write(&s.output);
    dst.copy_from_slice(mem.read(&s.inputs[0]));
    match s.output.ty.dtype {
        DType::F32 => {
            index::scatter_add_along_axis(bytemuck::cast_slice_mut::<u8, f32>(dst), outer, len, inner, idx, ilen, mem.f32(&s.inputs[2]))
        }
        _ => index::scatter_add_along_axis(bytemuck::cast_slice_mut::<u8, i64>(dst), outer, len, inner, idx, ilen, i64s(mem, &s.inputs[2])),
    }
    Ok(())
}

/// [`Op::SampleToken`] on f32 logits `[B, V]`: greedy is the first argmax, read in place (no
/// allocation); a sampled row runs `kiln_graph::sample::pick`, the interpreter's and the host
/// sampler's code, on the row widened to f64 (exact), so every path draws the same token.
fn sample_token(mem: &Mem, s: &Step) -> std::result::Result<(), String> {
    let (logits, o, c, streams) = (mem.f32(&s.inputs[0]), mem.f32(&s.inputs[1]), i64s(mem, &s.inputs[2]), i64s(mem, &s.inputs[3]));
    let counters = [c[0] as f64, c[1] as f64, c[2] as f64, c[3] as f64];
    let (f, seed, step) = sample::runtime_filters(&[o[0] as f64, o[1] as f64], &counters)?;
    let v = s.inputs[0].ty.shape[1].max(1);
    let out = i64_mut(mem, &s.output);
    for (r, row) in logits.chunks(v).enumerate() {
        out[r] = if f.temperature <= 0.0 || v < 2 {
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            best as i64
        } else {
            let stream = u64::try_from(streams[r]).map_err(|_| format!("stream {} of row {r}: expected >= 0", streams[r]))?;
            let x: Vec<f64> = row.iter().map(|&z| z as f64).collect();
            sample::pick(&x, &f, sample::uniform(seed, stream, step)) as i64
        };
    }
    Ok(())
}

/// [`Op::LogSoftmax`] over the last axis, and [`Op::TokenLogProb`] on f32 logits `[R, V]`: the
/// host's log-sum-exp per row (`kiln_graph::sample`), so a token's value is the log-softmax's
/// element bit for bit.
fn log_probs(mem: &Mem, s: &Step) -> std::result::Result<(), String> {
    let v = s.inputs[0].ty.shape.last().copied().unwrap_or(1).max(1);
    if let Op::LogSoftmax = s.op {
        sample::log_softmax_rows_f32(mem.f32(&s.inputs[0]), v, mem.f32_mut(&s.output));
        return Ok(());
    }
    let ids = i64s(mem, &s.inputs[1]);
    check_indices(ids, v)?;
    let out = mem.f32_mut(&s.output);
    for ((o, row), &id) in out.iter_mut().zip(mem.f32(&s.inputs[0]).chunks(v)).zip(ids) {
        *o = sample::token_log_prob_f32(row, id as usize);
    }
    Ok(())
}

fn i64s<'a>(mem: &Mem<'a>, o: &Operand) -> &'a [i64] {
    bytemuck::cast_slice(mem.read(o))
}

fn i64_mut<'a>(mem: &Mem<'a>, o: &Operand) -> &'a mut [i64] {
    bytemuck::cast_slice_mut(mem.write(o))
}

/// Index operands are data: a bad one is an error, never an out-of-bounds access.
fn check_indices(idx: &[i64], len: usize) -> std::result::Result<(), String> {
    match idx.iter().find(|&&i| i < 0 || i as usize >= len) {
        Some(i) => Err(format!("index {i} out of range 0..{len}")),
        None => Ok(()),
    }
}

/// Expert-buffer slots: -1 (dropped) or a row of the buffer.
fn check_slots(slot: &[i64], rows: usize) -> std::result::Result<(), String> {
    match slot.iter().find(|&&i| i < -1 || i >= rows as i64) {
        Some(i) => Err(format!("expert slot {i} out of range -1..{rows}")),
        None => Ok(()),
    }
}

/// `cpu.gemm_gated` ([`super::gated`]); `None` where the step is no prepared gated matmul.
fn gated(mem: &Mem, s: &Step, p: &Prep) -> Option<std::result::Result<(), String>> {
    let (Op::GatedMatMul { transpose_b, .. }, Prep::MatMul { epilogue: Some(r), packed }) = (&s.op, p) else { return None };
    Some(super::gated::run(s, *transpose_b, r, packed, mem.f32(&s.inputs[0]), &|o| mem.src(o), mem.f32_mut(&s.output)))
}

/// Batched matmul; the product's batch axes are flattened into rows when `b` is shared.
fn matmul(mem: &Mem, s: &Step, tb: bool, region: Option<&Region>, packed: &[sgemm512::PackedB]) -> std::result::Result<(), String> {
    let (at, bt, ot) = (&s.inputs[0].ty, &s.inputs[1].ty, &s.output.ty);
    let (ra, rb, ro) = (at.rank(), bt.rank(), ot.rank());
    let (m, k, n) = (at.shape[ra - 2], at.shape[ra - 1], ot.shape[ro - 1]);
    let (a, c) = (mem.f32(&s.inputs[0]), mem.f32_mut(&s.output));
    // Read only off the packed paths: a weight used only packed has no unpacked copy.
    let b = if runs_packed(s, packed) { &[][..] } else { mem.f32(&s.inputs[1]) };
    let b_batches: usize = bt.shape[..rb - 2].iter().product();
    let a_batches: usize = at.shape[..ra - 2].iter().product();
    let out_batches: usize = ot.shape[..ro - 2].iter().product();
    let bview = |data| if tb { gemm::MatView::transposed(data, k, n) } else { gemm::MatView::row_major(data, k, n) };
    let mut extra = [Src::F32(&[]); super::fused::MAX_INPUTS];
    for (i, o) in s.inputs[2..].iter().enumerate() {
        extra[i] = mem.src(o);
    }
    let extra = &extra[..s.inputs.len() - 2];
    if let ([pb], true) = (packed, b_batches == 1 && a_batches == out_batches) {
        sgemm512::matmul_packed(a, m * a_batches, k, pb, c);
        if let Some(r) = region {
            r.eval_in_place(extra, c);
        }
        return Ok(());
    }
    if packed.len() == out_batches && b_batches == out_batches && (a_batches == out_batches || a_batches == 1) && out_batches > 1 {
        // One packed matrix per batch (each expert's weights; stacked projections of shared rows).
        for (bi, pb) in packed.iter().enumerate() {
            let at = if a_batches == 1 { 0 } else { bi * m * k };
            sgemm512::matmul_packed(&a[at..at + m * k], m, k, pb, &mut c[bi * m * n..(bi + 1) * m * n]);
        }
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
    } else if a_batches == 1 && b_batches == out_batches {
        // One left operand for every batch (a flow's token permutation): one product per batch.
        for (bi, cb) in c.chunks_mut(m * n).enumerate() {
            gemm::matmul(gemm::MatView::row_major(a, m, k), bview(&b[bi * k * n..]), cb);
        }
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
/// `cpu.residual_rms_norm`: both halves of the output and zeros in its padding rows.
fn residual_norm(mem: &Mem, s: &Step) -> std::result::Result<(), String> {
    let Op::ResidualRmsNorm(r) = s.op else { return Err(format!("cpu.residual_rms_norm does not run {}", s.op.name())) };
    let (x, o, w_pre) = (mem.f32(&s.inputs[0]), mem.f32(&s.inputs[1]), mem.f32(&s.inputs[s.inputs.len() - 1]));
    norm::residual_rms_norm(x, o, r.post.then(|| mem.f32(&s.inputs[2])), w_pre, (r.add_one, r.eps, r.rows_pad), mem.f32_mut(&s.output));
    Ok(())
}

fn reference(mem: &Mem, s: &Step) -> std::result::Result<(), String> {
    let vals: Vec<Value> =
        s.inputs.iter().map(|o| Value { ty: o.ty.clone(), data: crate::tensor::to_f64(o.ty.dtype, mem.read(o)) }).collect();
    let refs: Vec<&Value> = vals.iter().collect();
    let v = eval_op(&s.op, &refs, &s.output.ty)?;
    mem.write(&s.output).copy_from_slice(&crate::tensor::from_f64(s.output.ty.dtype, &v.data));
    Ok(())
}
