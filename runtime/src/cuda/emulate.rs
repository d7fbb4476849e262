//! The cuda backend's program run on the CPU, for tests on machines without a GPU
//! (`KILN_CUDA_EMULATE=1`): the same layout, lowering and launches as [`super::exec::CudaExec`],
//! with the kernels' CUDA C compiled by the system C++ compiler against a host shim
//! ([`kiln_kernels::cuda::host`]: blocks one after another, a block's threads as cooperative
//! fibers) and one host allocation standing for the device's. cuBLASLt's GEMMs are computed
//! here in f32 ([`gemm`]: its epilogues applied as cuBLASLt orders them, the result rounded once
//! to the output's dtype); where the lowering offers kiln's GEMV for a GEMM it runs instead
//! (unless `--cuda-gemv off`), so the GEMV kernels are checked too. What the emulation cannot
//! show: timings, races between blocks or threads (they never run at once), cuBLASLt itself, and
//! PDL (its waits are no-ops on the host).

use super::lower::{lower_entry, Epilogue, Gemm, Launch, Layout, Work};
use super::tune::GemvMode;
use crate::backend::Executable;
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use kiln_graph::program::{Program, Slot};
use kiln_graph::DType;
use kiln_kernels::cuda::host::HostModule;
use std::collections::HashMap;

/// The environment variable that makes the cuda backend load into this emulator.
pub const ENV: &str = "KILN_CUDA_EMULATE";

/// The card name the emulator answers for (`super::device_name`): a tuning table's entries
/// for it choose the prefill variants a load runs, as a GPU's do.
pub const CARD: &str = "kiln host emulator";

/// Whether loads are emulated (`KILN_CUDA_EMULATE=1`).
pub fn requested() -> bool {
    std::env::var(ENV).is_ok_and(|v| v == "1")
}

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Unsupported { backend: "cuda (emulated)".into(), msg: msg.into() }
}

/// One unit of work, its addresses relocated into the host allocation.
enum Item {
    Gemm(Gemm),
    Kernel(usize, Launch),
    Zero { at: usize, bytes: usize },
}

/// A loaded program on the host.
pub struct EmuExec {
    program: Program,
    layout: Layout,
    /// The allocation standing for the device's (16-byte aligned).
    mem: Vec<u128>,
    modules: Vec<HostModule>,
    /// Kernel name -> index into `modules`.
    funcs: HashMap<String, usize>,
    items: Vec<Vec<Vec<Item>>>,
    states_at: Vec<usize>,
}

// SAFETY: the raw addresses inside `items` point into `mem`, owned by the same value; the
// executor is used from one thread at a time (`&mut self`).
unsafe impl Send for EmuExec {}

impl EmuExec {
    /// Loads `program` (its states already in the arena: [`crate::states::states_in_arena`]).
    pub fn new(program: &Program, store: &WeightStore, states_at: Vec<usize>, opts: super::exec::LoadOptions) -> Result<Self> {
        if !kiln_kernels::cuda::host::available() {
            return Err(err("no C++ compiler (g++ or $CXX) to build the kernels for the host"));
        }
        let layout = super::lower::layout(program).map_err(err)?;
        let mem = vec![0u128; layout.total.div_ceil(16)];
        let mut me =
            EmuExec { program: program.clone(), layout, mem, modules: Vec::new(), funcs: HashMap::new(), items: Vec::new(), states_at };
        me.upload(store)?;
        me.compile_modules()?;
        let base = me.base();
        for e in &program.entries {
            let has = |k: &str| me.funcs.contains_key(k) && (opts.fuse || !super::lower::merge::fusing(k));
            let lowered = lower_entry(&e.steps, &me.layout, &has).map_err(|(i, msg)| RuntimeError::Step {
                step: i,
                op: e.steps.get(i).map_or("?", |s| s.op.name()),
                msg,
            })?;
            let mut steps = Vec::with_capacity(lowered.work.len());
            for (i, mut work) in lowered.work.into_iter().enumerate() {
                super::attn_tune::apply_tabled(&e.steps[i], &mut work, &program.tuning, CARD);
                let mut items = Vec::with_capacity(work.len());
                for w in work {
                    items.push(match w {
                        Work::Gemm(mut g) => match g.gemv.take().filter(|l| opts.gemv != GemvMode::Off && me.funcs.contains_key(&l.kernel))
                        {
                            Some(mut l) => {
                                if opts.pdl {
                                    kiln_kernels::cuda::gemv::set_prefetch(&mut l.params);
                                }
                                me.kernel(l, base)?
                            }
                            None => Item::Gemm(g),
                        },
                        Work::Zero { offset, bytes } => Item::Zero { at: offset as usize, bytes },
                        Work::Kernel(l) => me.kernel(l, base)?,
                    });
                }
                steps.push(items);
            }
            me.items.push(steps);
        }
        Ok(me)
    }

    fn base(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    fn bytes(&mut self) -> &mut [u8] {
        let n = self.layout.total;
        // SAFETY: `mem` holds at least `total` bytes; u8 has no alignment or validity needs.
        unsafe { std::slice::from_raw_parts_mut(self.mem.as_mut_ptr() as *mut u8, n) }
    }

    /// The weights and constants at their offsets, as the device upload places them.
    fn upload(&mut self, store: &WeightStore) -> Result<()> {
        let program = self.program.clone();
        let (weights_at, constants_at) = (self.layout.weights.clone(), self.layout.constants.clone());
        for (i, &at) in weights_at.iter().enumerate().take(program.weights.len()) {
            let b = crate::prepared::cuda::upload_bytes(&program, store, i)?;
            self.bytes()[at..at + b.len()].copy_from_slice(&b);
        }
        for (c, &at) in program.constants.iter().zip(&constants_at) {
            let b = crate::tensor::from_f64(c.ty.dtype, &c.values);
            self.bytes()[at..at + b.len()].copy_from_slice(&b);
        }
        Ok(())
    }

    /// Every module the program needs (hand-written and generated), compiled for the host.
    fn compile_modules(&mut self) -> Result<()> {
        let need = super::plan::kernel_plan(&self.program, super::DEFAULT_ARCH).map_err(err)?;
        // (module, source, the kernels it defines).
        let mut units: Vec<(String, String, Vec<String>)> = kiln_kernels::cuda::modules()
            .into_iter()
            .map(|m| (m.name, m.source, m.kernels.into_iter().map(|k| k.name).collect()))
            .collect();
        // A generated region's module holds its kernel and the `_x2` entry.
        units.extend(super::lower::regions(&self.program).map_err(err)?.into_iter().map(|r| {
            let kernels = vec![r.name.clone(), format!("{}_x2", r.name)];
            (r.name, r.source, kernels)
        }));
        units.retain(|(name, _, _)| need.needed.contains(name));
        let built: Vec<std::result::Result<HostModule, String>> = std::thread::scope(|sc| {
            let handles: Vec<_> = units.iter().map(|(_, source, _)| sc.spawn(move || HostModule::compile(source))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the host compile panicked".into()))).collect()
        });
        for ((name, _, kernels), m) in units.into_iter().zip(built) {
            let m = m.map_err(|e| err(format!("module {name}: {e}")))?;
            for k in kernels.into_iter().filter(|k| m.has(k)) {
                self.funcs.insert(k, self.modules.len());
            }
            self.modules.push(m);
        }
        Ok(())
    }

    /// A launch with its addresses made host pointers (`base` added, as the device executor does).
    fn kernel(&self, mut l: Launch, base: u64) -> Result<Item> {
        let m = *self.funcs.get(&l.kernel).ok_or_else(|| err(format!("kernel {} is in no compiled module", l.kernel)))?;
        for &r in &l.relocs {
            let v = u64::from_le_bytes(l.params.get(r..r + 8).and_then(|b| b.try_into().ok()).ok_or_else(|| err("bad relocation"))?);
            l.params[r..r + 8].copy_from_slice(&(v + base).to_le_bytes());
        }
        Ok(Item::Kernel(m, l))
    }

    fn launch(&self, m: usize, l: &Launch) -> Result<()> {
        // SAFETY: the parameters' addresses were relocated into `mem`, which the lowering's
        // layout sizes for every operand a launch touches.
        unsafe { self.modules[m].launch(&l.kernel, l.grid, l.block, l.smem, &l.params) }.map_err(|e| err(format!("{}: {e}", l.kernel)))
    }

    fn issue(&mut self, entry: usize, step: usize, k: usize) -> Result<()> {
        match &self.items[entry][step][k] {
            Item::Kernel(m, l) => self.launch(*m, l),
            &Item::Zero { at, bytes } => {
                self.bytes()[at..at + bytes].fill(0);
                Ok(())
            }
            Item::Gemm(g) => {
                let g = g.clone();
                gemm(self.bytes(), &g).map_err(err)
            }
        }
    }

    fn run_inner(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], times: Option<&mut Vec<f64>>) -> Result<()> {
        let e = self.program.entries[entry].clone();
        for (io, bytes) in e.inputs.iter().zip(inputs) {
            if bytes.is_empty() && io.operand.ty.bytes() > 0 {
                continue; // a state, read where it lives
            }
            let Slot::Arena { offset, .. } = io.operand.slot else {
                return Err(RuntimeError::Input { name: io.name.clone(), msg: "not in the arena (corrupt program)".into() });
            };
            let at = self.layout.arena + offset;
            self.bytes()[at..at + bytes.len()].copy_from_slice(bytes);
        }
        let mut times = times;
        for step in 0..self.items[entry].len() {
            let t = std::time::Instant::now();
            for k in 0..self.items[entry][step].len() {
                self.issue(entry, step, k).map_err(|m| RuntimeError::Step {
                    step,
                    op: e.steps[step].op.name(),
                    msg: format!("{} ({}): {m}", e.steps[step].kernel, e.steps[step].output.ty),
                })?;
            }
            if let Some(t_out) = times.as_deref_mut() {
                t_out.push(t.elapsed().as_secs_f64());
            }
        }
        for (io, out) in e.outputs.iter().zip(outputs.iter_mut()) {
            if out.is_empty() && io.operand.ty.bytes() > 0 {
                continue; // a state, computed where it lives
            }
            let src = self.layout.output_at(io.operand.slot).map_err(err)?;
            let n = out.len();
            out.copy_from_slice(&self.bytes()[src..src + n]);
        }
        let flag = self.layout.error_flag;
        if self.bytes()[flag..flag + 4] != [0; 4] {
            self.bytes()[flag..flag + 4].fill(0);
            return Err(err("an index was out of range: a gather or take-along-axis read outside its table, a scatter-add index fell outside its target, or a write_slice position did not fit"));
        }
        Ok(())
    }
}

impl Executable for EmuExec {
    fn run(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<()> {
        self.run_inner(entry, inputs, outputs, None)
    }

    fn run_timed(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], times: &mut Vec<f64>) -> Result<()> {
        times.clear();
        self.run_inner(entry, inputs, outputs, Some(times))
    }

    fn reset_states(&mut self) -> Result<()> {
        let arena = self.layout.arena;
        let ranges: Vec<(usize, usize)> =
            self.states_at.iter().zip(&self.program.states).map(|(&at, st)| (arena + at, st.ty.bytes())).collect();
        for (at, n) in ranges {
            self.bytes()[at..at + n].fill(0);
        }
        Ok(())
    }

    fn read_state(&mut self, i: usize, out: &mut [u8]) -> Result<()> {
        let (Some(&offset), Some(st)) = (self.states_at.get(i), self.program.states.get(i)) else {
            return Err(RuntimeError::Output { name: format!("state #{i}"), msg: "no such state".into() });
        };
        let n = out.len().min(st.ty.bytes());
        let at = self.layout.arena + offset;
        out[..n].copy_from_slice(&self.bytes()[at..at + n]);
        Ok(())
    }

    /// Through the device's own launches (`state_rows`: a gather into scratch, a copy back), on
    /// a host scratch buffer.
    fn gather_state_rows(&mut self, rows: &[usize]) -> Result<()> {
        let biggest = self.program.states.iter().map(|st| st.ty.bytes()).max().unwrap_or(0);
        if biggest == 0 || rows.is_empty() {
            return Ok(());
        }
        let idx_bytes = (8 * rows.len()).next_multiple_of(256);
        let mut scratch = vec![0u128; (idx_bytes + biggest).div_ceil(16)];
        let sp = scratch.as_mut_ptr() as u64;
        for (k, &r) in rows.iter().enumerate() {
            // SAFETY: the index block lies at the head of `scratch`.
            unsafe { *(sp as *mut i64).add(k) = r as i64 };
        }
        let flag = self.base() + self.layout.error_flag as u64;
        let states: Vec<(u64, usize)> = self
            .states_at
            .iter()
            .zip(&self.program.states)
            .map(|(&at, st)| (self.base() + (self.layout.arena + at) as u64, st.ty.bytes()))
            .collect();
        for (state, bytes) in states {
            for l in super::state_rows::launches(state, sp + idx_bytes as u64, sp, flag, rows.len(), bytes / rows.len()) {
                let m = *self.funcs.get(&l.kernel).ok_or_else(|| err(format!("kernel {} is in no compiled module", l.kernel)))?;
                self.launch(m, &l)?;
            }
        }
        drop(scratch);
        Ok(())
    }
}

/// Element `i` of a `dtype` array at `p`, as f32.
fn load(bytes: &[u8], dtype: DType, at: usize, i: usize) -> f32 {
    let s = dtype.size();
    let b = &bytes[at + i * s..at + (i + 1) * s];
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => f32::NAN,
    }
}

fn store(bytes: &mut [u8], dtype: DType, at: usize, i: usize, v: f32) {
    let s = dtype.size();
    let out = &mut bytes[at + i * s..at + (i + 1) * s];
    match dtype {
        DType::BF16 => out.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        DType::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        _ => out.copy_from_slice(&v.to_le_bytes()),
    }
}

/// GELU, tanh form, as cuBLASLt's epilogue computes it.
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh())
}

/// cuBLASLt's GEMM on the host: `c = a @ b` (or `a @ b^T`) per batch, accumulated in f32;
/// then `+ residual` (C with beta 1), `+ bias`, GELU, in cuBLASLt's order; rounded once to the
/// output's dtype. Offsets are into `mem`.
pub fn gemm(mem: &mut [u8], g: &Gemm) -> std::result::Result<(), String> {
    if !matches!(g.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(format!("a GEMM in {}", g.dtype));
    }
    let (m, n, k) = (g.m, g.n, g.k);
    let (bias, residual, gelu) = match g.epilogue {
        Epilogue::None => (None, None, false),
        Epilogue::Bias(b) => (Some(b), None, false),
        Epilogue::GeluTanh => (None, None, true),
        Epilogue::BiasGeluTanh(b) => (Some(b), None, true),
        Epilogue::Residual(r) => (None, Some(r), false),
        Epilogue::BiasResidual { bias, residual } => (Some(bias), Some(residual), false),
    };
    let mut out = vec![0f32; m * n];
    for batch in 0..g.batch {
        let (a0, b0) = (batch * g.a_stride, batch * g.b_stride);
        let bf: Vec<f32> = (0..k * n).map(|i| load(mem, g.dtype, g.b as usize, b0 + i)).collect();
        for r in 0..m {
            let arow: Vec<f32> = (0..k).map(|i| load(mem, g.dtype, g.a as usize, a0 + r * k + i)).collect();
            for c in 0..n {
                let mut acc = 0f32;
                for (i, &x) in arow.iter().enumerate() {
                    acc += x * if g.transpose_b { bf[c * k + i] } else { bf[i * n + c] };
                }
                if let Some(res) = residual {
                    acc += load(mem, g.out_dtype, res as usize, batch * m * n + r * n + c);
                }
                if let Some(b) = bias {
                    acc += load(mem, g.dtype, b as usize, batch * g.bias_stride + c);
                }
                out[r * n + c] = if gelu { gelu_tanh(acc) } else { acc };
            }
        }
        for (i, &v) in out.iter().enumerate() {
            store(mem, g.out_dtype, g.c as usize, batch * m * n + i, v);
        }
    }
    Ok(())
}
