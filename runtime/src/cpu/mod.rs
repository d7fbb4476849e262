//! The cpu backend: f32 kernels from `kiln_kernels::cpu`, one aligned arena per program,
//! weights borrowed from the memory map when their layout allows, upcast once otherwise.

mod exec;
pub mod fused;
mod gated;
mod group;
pub mod kernel;
mod pack;
pub mod prepared;
mod rotary;

use crate::backend::{Backend, Executable};
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
pub use kernel::CpuKernel;
use kiln_graph::program::{Entry, Program, Slot};
use kiln_graph::{DType, Op, TensorType};
use kiln_kernels::cpu::sgemm512::Stored;
use std::sync::Arc;

/// The cpu backend.
pub struct CpuBackend;

/// Bytes with 8-byte alignment (so f32 and i64 views are always valid).
pub(crate) struct Aligned(Vec<u64>, usize);

impl Aligned {
    pub(crate) fn zeroed(bytes: usize) -> Self {
        Aligned(vec![0; bytes.div_ceil(8)], bytes)
    }
    /// [`Aligned::zeroed`] that fails with the size named (`what`) instead of aborting.
    pub(crate) fn try_zeroed(bytes: usize, what: &str) -> Result<Self> {
        Ok(Aligned(crate::memory::try_zeroed(bytes.div_ceil(8), what)?, bytes))
    }
    pub(crate) fn from_bytes(b: &[u8]) -> Self {
        let mut a = Aligned::zeroed(b.len());
        a.bytes_mut().copy_from_slice(b);
        a
    }
    pub(crate) fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.0)[..self.1]
    }
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.0)[..self.1]
    }
}

/// A weight as the kernels read it.
pub(crate) enum WeightBuf {
    /// Borrowed from the memory map (same dtype, aligned).
    Mapped { start: usize, file: usize },
    /// Converted once at load.
    Owned(Aligned),
    /// The bfloat16 bits of a weight the program reads as f32, borrowed from the memory map
    /// (2-byte aligned): only `cpu.gather` steps read it unpacked ([`Read::Rows`]), widening
    /// each row they copy, which is exact; so a bf16 embedding is never held in f32.
    Bf16 { start: usize, file: usize },
}

/// How the steps of a program read a weight besides through its packed copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// Never: only packed matrices of it are read (by matmuls, or gathers from the panels),
    /// or nothing.
    Packed,
    /// Only as the table of `cpu.gather` steps, a row at a time (a gather reading the rows
    /// from the weight's packed panels does not count: [`pack::link_gathers`]).
    Rows,
    /// Some step reads it whole, in the program's dtype.
    Whole,
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn kernel_for(&self, op: &Op, inputs: &[TensorType], out: &TensorType) -> std::result::Result<String, String> {
        kernel::choose(op, inputs, out).map(|k| k.name().to_string())
    }

    fn interpreted(&self, kernel: &str) -> bool {
        CpuKernel::parse(kernel) == Some(CpuKernel::Reference)
    }

    fn launches(&self, program: &Program, entry: usize) -> std::result::Result<Vec<usize>, String> {
        let e = program.entries.get(entry).ok_or_else(|| format!("entry {entry} does not exist"))?;
        let one = |s: &kiln_graph::program::Step| match CpuKernel::parse(&s.kernel) {
            Some(CpuKernel::Source | CpuKernel::View) => Ok(0),
            // Every other kernel is one pass over its output (a GEMM's epilogue runs per tile).
            Some(_) => Ok(1),
            None => Err(format!("step {} stores kernel {}, not a cpu kernel", s.node, s.kernel)),
        };
        let (roles, parts) = roles_and_parts(e, program);
        let joined = |i: usize| roles.role[i] == rotary::Role::Absorbed || matches!(parts[i], group::Part::In(_));
        e.steps.iter().enumerate().map(|(i, s)| if joined(i) { Ok(0) } else { one(s) }).collect()
    }

    fn merged_launches(&self, program: &Program, entry: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
        let e = program.entries.get(entry).ok_or_else(|| format!("entry {entry} does not exist"))?;
        let (_, parts) = roles_and_parts(e, program);
        Ok(parts.iter().enumerate().filter_map(|(i, p)| if let group::Part::In(lead) = p { Some((i, *lead)) } else { None }).collect())
    }

    fn absorbed_steps(&self, program: &Program, entry: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
        let e = program.entries.get(entry).ok_or_else(|| format!("entry {entry} does not exist"))?;
        Ok(rotary::plan(e, &program.constants).into_iter().map(|p| (p.write, p.rot)).collect())
    }

    fn load(&self, program: &Program, weights: Arc<WeightStore>) -> Result<Box<dyn Executable>> {
        let arena = program.entries.iter().map(|e| e.arena_bytes).max().unwrap_or(0);
        let states: usize = program.states.iter().map(|st| st.ty.bytes().next_multiple_of(kiln_graph::program::ALIGN)).sum();
        let what = format!("the arena ({}) and states ({})", crate::memory::human(arena as u64), crate::memory::human(states as u64));
        crate::memory::check_host(&what, arena as u64 + states as u64)?;
        match weights.prepared() {
            Some(file) => Ok(Box::new(prepared::load(program, file.clone(), weights.clone())?)),
            None => Ok(Box::new(build(program, weights)?)),
        }
    }
}

/// Loads `program` from a checkpoint: weights borrowed from its map where their layout
/// allows, converted once otherwise, and every matmul weight packed for the AVX-512 kernel.
pub(crate) fn build(program: &Program, weights: Arc<WeightStore>) -> Result<exec::CpuExec> {
    let mut wbufs = Vec::with_capacity(program.weights.len());
    for spec in &program.weights {
        let (ty, bytes) = weights.get(&spec.name, &spec.ty)?;
        let r = weights.resolve(&spec.name).ok_or_else(|| RuntimeError::Weight { name: spec.name.clone(), msg: "not found".into() })?;
        let buf = if ty.dtype == spec.ty.dtype && (bytes.as_ptr() as usize).is_multiple_of(8) {
            WeightBuf::Mapped { start: r.start, file: r.file }
        } else if ty.dtype == spec.ty.dtype {
            WeightBuf::Owned(Aligned::from_bytes(bytes))
        } else if ty.dtype.is_float() && spec.ty.dtype.is_float() {
            // Converted below, once it is known whether any step reads it unpacked.
            WeightBuf::Owned(Aligned::zeroed(0))
        } else {
            return Err(RuntimeError::Weight {
                name: spec.name.clone(),
                msg: format!("stored as {}, the program needs {}", ty.dtype, spec.ty.dtype),
            });
        };
        wbufs.push(buf);
    }
    let (state_off, state_bytes) = check(program)?;
    // A weight stored in another dtype, converted to the program's (in parallel, with no
    // f64 copy: a 257k x 2304 embedding would need 4.7 GB for one).
    let convert = |i: usize| -> Result<Vec<u8>> {
        let spec = &program.weights[i];
        let (ty, bytes) = weights.get(&spec.name, &spec.ty)?;
        Ok(crate::tensor::convert(ty.dtype, spec.ty.dtype, bytes))
    };
    let converted = |i: usize| matches!(&wbufs[i], WeightBuf::Owned(a) if a.bytes().is_empty() && program.weights[i].ty.bytes() > 0);
    // A weight as its bytes lie (checkpoint map or owned buffer), packed from them directly.
    let weight = |i: u32, n: usize| -> Option<Stored<'_>> {
        let i = i as usize;
        if converted(i) {
            // Packed straight from the checkpoint's dtype: no f32 copy exists.
            let spec = &program.weights[i];
            let (ty, bytes) = weights.get(&spec.name, &spec.ty).ok()?;
            return match (spec.ty.dtype, ty.dtype) {
                (DType::F32, DType::BF16) => Some(Stored::Bf16(&bytes[..2 * n])),
                (DType::F32, DType::F16) => Some(Stored::F16(&bytes[..2 * n])),
                _ => None,
            };
        }
        Some(match wbufs.get(i)? {
            WeightBuf::Mapped { start, file } => Stored::F32(&weights.map_bytes(*file)[*start..*start + 4 * n]),
            WeightBuf::Owned(a) => Stored::F32(&a.bytes()[..4 * n]),
            WeightBuf::Bf16 { start, file } => Stored::Bf16(&weights.map_bytes(*file)[*start..*start + 2 * n]),
        })
    };
    let mut packs = exec::PackCache::new();
    let mut prepared =
        program.entries.iter().map(|e| exec::prepare(e, &weight, &program.constants, &mut packs)).collect::<Result<Vec<_>>>()?;
    pack::link_gathers(program, &mut prepared, &packs);
    // A converted weight that every step reads only through its packed copy never gets an
    // unpacked one: a bf16 checkpoint would otherwise sit in memory twice in f32. One read
    // only a row at a time by gathers (an embedding) stays bf16, mapped: the gather widens.
    let read = reads(program, &prepared);
    let pending: Vec<usize> = (0..wbufs.len()).filter(|&i| converted(i) && read[i] != Read::Packed).collect();
    for i in pending {
        let spec = &program.weights[i];
        let (ty, bytes) = weights.get(&spec.name, &spec.ty)?;
        let rows_of_bf16 = read[i] == Read::Rows && ty.dtype == DType::BF16 && spec.ty.dtype == DType::F32;
        wbufs[i] = match weights.resolve(&spec.name) {
            Some(r) if rows_of_bf16 && (bytes.as_ptr() as usize).is_multiple_of(2) => WeightBuf::Bf16 { start: r.start, file: r.file },
            _ => WeightBuf::Owned(Aligned::from_bytes(&convert(i)?)),
        };
    }
    finish(program, weights, wbufs, prepared, (state_off, state_bytes))
}

/// How the steps read each weight besides through a packed copy ([`Read`]).
pub(crate) fn reads(program: &Program, prepared: &[Vec<exec::Prepared>]) -> Vec<Read> {
    let mut read = vec![Read::Packed; program.weights.len()];
    for (e, preps) in program.entries.iter().zip(prepared) {
        for (s, p) in e.steps.iter().zip(preps) {
            let (packed_b, panel_rows) = match &p.prep {
                exec::Prep::MatMul { packed, .. } => (exec::runs_packed(s, packed), false),
                exec::Prep::Gather(_) => (false, true),
                exec::Prep::None | exec::Prep::Region(_) | exec::Prep::Attention(_) => (false, false),
            };
            for (k, o) in s.inputs.iter().enumerate() {
                let Slot::Weight(i) = o.slot else { continue };
                let r = &mut read[i as usize];
                *r = match (k, p.kernel) {
                    (1, _) if packed_b => *r,
                    (0, _) if panel_rows => *r,
                    (0, CpuKernel::Gather) if *r != Read::Whole => Read::Rows,
                    _ => Read::Whole,
                };
            }
        }
    }
    read
}

/// The executable, once weights are placed and steps prepared.
fn finish(
    program: &Program,
    weights: Arc<WeightStore>,
    wbufs: Vec<WeightBuf>,
    prepared: Vec<Vec<exec::Prepared>>,
    (state_off, state_bytes): (Vec<usize>, usize),
) -> Result<exec::CpuExec> {
    let consts = program.constants.iter().map(|c| Aligned::from_bytes(&crate::tensor::from_f64(c.ty.dtype, &c.values))).collect();
    let arena = program.entries.iter().map(|e| e.arena_bytes).max().unwrap_or(0);
    let (rotary, groups) = program.entries.iter().map(|e| roles_and_parts(e, program)).unzip();
    Ok(exec::CpuExec {
        weights,
        wbufs,
        consts,
        arena: Aligned::try_zeroed(arena, "the arena")?,
        states: Aligned::try_zeroed(state_bytes, "the states")?,
        state_off,
        program: program.clone(),
        prepared,
        rotary,
        groups,
    })
}

/// The rotary roles of entry `e`'s steps ([`rotary`]) and the groups they run in ([`group`]),
/// worked out from the program alone, as the run and the launch counts both use them.
fn roles_and_parts(e: &Entry, program: &Program) -> (rotary::Roles, Vec<group::Part>) {
    let roles = rotary::Roles::of(e, &program.constants);
    let parts = group::plan(e, &roles);
    (roles, parts)
}

/// Checks every operand of `program` lies where this backend can place it (a corrupt or
/// hand-made program fails here, not in a kernel); gives each state's offset and their total.
fn check(program: &Program) -> Result<(Vec<usize>, usize)> {
    // All states in one buffer, each at an aligned offset.
    let mut state_off = Vec::with_capacity(program.states.len());
    let mut state_bytes = 0;
    for st in &program.states {
        state_off.push(state_bytes);
        state_bytes += st.ty.bytes().next_multiple_of(kiln_graph::program::ALIGN);
    }
    let state_ok = |o: &kiln_graph::program::Operand| match o.slot {
        Slot::State(i) => program.states.get(i as usize).is_some_and(|st| st.ty.bytes() == o.ty.bytes()),
        Slot::Arena { .. } | Slot::Weight(_) | Slot::Const(_) => true,
    };
    for e in &program.entries {
        if let Some(io) = e.inputs.iter().find(|io| !matches!(io.operand.slot, Slot::Arena { .. } | Slot::State(_))) {
            return Err(RuntimeError::Input { name: io.name.clone(), msg: "not placed in the arena or a state (corrupt program)".into() });
        }
        if let Some(io) = e.inputs.iter().chain(&e.outputs).find(|io| !state_ok(&io.operand)) {
            return Err(RuntimeError::Input { name: io.name.clone(), msg: "a state operand of the wrong size (corrupt program)".into() });
        }
        for (i, s) in e.steps.iter().enumerate() {
            let end = |o: &kiln_graph::program::Operand| match o.slot {
                Slot::Arena { offset, bytes } => offset + bytes,
                Slot::Weight(_) | Slot::Const(_) | Slot::State(_) => 0,
            };
            if s.inputs.iter().chain([&s.output]).any(|o| end(o) > e.arena_bytes || !state_ok(o)) {
                return Err(RuntimeError::Step {
                    step: i,
                    op: s.op.name(),
                    msg: "operand outside the arena or its state (corrupt program)".into(),
                });
            }
            if let Slot::State(st) = s.output.slot {
                let aliased = |k: usize| s.inputs.get(k).is_some_and(|o| o.slot == Slot::State(st));
                let in_place = matches!(s.op, Op::WriteSlice { .. }) && aliased(0);
                if (0..s.inputs.len()).any(|k| aliased(k) && !(k == 0 && in_place)) {
                    return Err(RuntimeError::Step { step: i, op: s.op.name(), msg: "reads the state it writes (corrupt program)".into() });
                }
            }
            if !matches!(s.output.slot, Slot::Arena { .. } | Slot::State(_)) {
                return Err(RuntimeError::Step { step: i, op: s.op.name(), msg: "writes a weight or constant (corrupt program)".into() });
            }
        }
    }
    Ok((state_off, state_bytes))
}
