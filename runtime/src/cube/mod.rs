//! The cube backend: CubeCL kernels (`kiln_kernels::cube`) on any CubeCL runtime. `cube`
//! runs on wgpu (Vulkan, Metal, DX12, or Mesa's lavapipe on a CPU); `cube-cuda` on CUDA
//! when kiln is built with the `cube-cuda` feature.
//!
//! At load the program's weights and constants go into one device buffer, every entry's
//! arena is one device buffer, and every step's sizes and offsets into one `u32` buffer; a
//! run then only launches kernels (plus one upload per input and one read per output).
//! The program's states sit in the same device buffer, above every entry's arena: at load
//! each [`Slot::State`] operand becomes the arena range of its state, so the kernels and
//! their lowering need no notion of state.
//! Floats are f32 on the device (bf16/f16 weights are upcast once at load); integer and bool
//! tensors keep their byte layout in the arena (see `kiln_kernels::cube::typed`). An op or
//! dtype without a cube kernel is a compile error naming it.

mod expr;
mod kernel;
mod lower;

pub use kernel::CubeKernel;

use crate::backend::{Backend, Executable};
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use cubecl::prelude::*;
use cubecl::server::Handle;
use kiln_graph::program::{Program, Slot};
use kiln_graph::{Op, TensorType};
use kiln_kernels::cube as k;
use lower::{Launch, Lowered};
use std::sync::Arc;

/// Which CubeCL runtime a cube backend targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// wgpu: Vulkan (lavapipe on CPUs), Metal, DX12.
    Wgpu,
    /// CUDA (needs the `cube-cuda` feature and an NVIDIA driver).
    Cuda,
}

/// The cube backend on one device kind.
pub struct CubeBackend {
    pub device: Device,
}

impl CubeBackend {
    /// The backend for `--device wgpu|cuda`.
    pub fn on(device: &str) -> std::result::Result<Self, String> {
        match device {
            "wgpu" => Ok(CubeBackend { device: Device::Wgpu }),
            "cuda" if cfg!(feature = "cube-cuda") => Ok(CubeBackend { device: Device::Cuda }),
            "cuda" => Err("this kiln was built without the `cube-cuda` feature".into()),
            other => Err(format!("unknown device '{other}' (expected wgpu or cuda)")),
        }
    }
}

impl Backend for CubeBackend {
    fn name(&self) -> &'static str {
        match self.device {
            Device::Wgpu => "cube",
            Device::Cuda => "cube-cuda",
        }
    }

    fn kernel_for(&self, op: &Op, inputs: &[TensorType], out: &TensorType) -> std::result::Result<String, String> {
        kernel::choose(op, inputs, out).map(|k| k.name().to_string())
    }

    fn launches(&self, program: &Program, entry: usize) -> std::result::Result<Vec<usize>, String> {
        Ok(lowered(program, entry)?.steps.iter().map(Vec::len).collect())
    }

    fn merged_launches(&self, program: &Program, entry: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
        // The pairs `lower::merge` runs as one launch.
        Ok(lowered(program, entry)?.pairs)
    }

    fn absorbed_steps(&self, program: &Program, entry: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
        // The cache row writes done by a matmul's launch (`lower::absorb`).
        Ok(lowered(program, entry)?.absorbed)
    }

    fn load(&self, program: &Program, weights: Arc<WeightStore>) -> Result<Box<dyn Executable>> {
        kernel::check(program)?;
        match self.device {
            Device::Wgpu => Ok(Box::new(CubeExec::<cubecl::wgpu::WgpuRuntime>::new(program, &weights, Default::default())?)),
            #[cfg(feature = "cube-cuda")]
            Device::Cuda => Ok(Box::new(CubeExec::<cubecl::cuda::CudaRuntime>::new(program, &weights, Default::default())?)),
            #[cfg(not(feature = "cube-cuda"))]
            Device::Cuda => {
                Err(RuntimeError::Unsupported { backend: "cube-cuda".into(), msg: "built without the `cube-cuda` feature".into() })
            }
        }
    }
}

/// The executor's lowering of entry `entry` with no device (what it launches does not depend on
/// where weights sit).
fn lowered(program: &Program, entry: usize) -> std::result::Result<Lowered, String> {
    let (program, _) = crate::states::states_in_arena(program);
    let e = program.entries.get(entry).ok_or_else(|| format!("entry {entry} does not exist"))?;
    let (woff, coff) = (vec![0; program.weights.len()], vec![0; program.constants.len()]);
    lower::lower_entry(e, &woff, &coff, &mut Vec::new()).map_err(|(i, op, m)| format!("step {i} ({op}): {m}"))
}

/// A program loaded on one CubeCL device.
pub struct CubeExec<R: Runtime> {
    client: ComputeClient<R>,
    program: Program,
    /// One arena per program (entries run one at a time), its size in bytes.
    arena: Handle,
    arena_bytes: usize,
    /// Each state's byte offset in the arena buffer (above every entry's own arena).
    states_at: Vec<usize>,
    weights: Handle,
    weights_len: usize,
    meta: Handle,
    lowered: Vec<Lowered>,
}

/// Bytes of f32 data for every weight and constant, each at a 256-byte aligned offset.
fn pack_weights(program: &Program, store: &WeightStore) -> Result<(Vec<f32>, Vec<usize>, Vec<usize>)> {
    let mut data: Vec<f32> = Vec::new();
    let mut place = |vals: &mut dyn Iterator<Item = f32>| {
        data.resize(data.len().next_multiple_of(64), 0.0);
        let at = data.len();
        data.extend(vals);
        at
    };
    let mut woff = Vec::with_capacity(program.weights.len());
    for spec in &program.weights {
        let (ty, bytes) = store.get(&spec.name, &spec.ty)?;
        if !ty.dtype.is_float() {
            return Err(RuntimeError::Weight {
                name: spec.name.clone(),
                msg: format!("stored as {}, the cube backend reads floats", ty.dtype),
            });
        }
        let vals = crate::tensor::to_f64(ty.dtype, bytes);
        woff.push(place(&mut vals.iter().map(|&v| v as f32)));
    }
    let coff = program.constants.iter().map(|c| place(&mut c.values.iter().map(|&v| v as f32))).collect();
    if data.is_empty() {
        data.push(0.0);
    }
    Ok((data, woff, coff))
}

impl<R: Runtime> CubeExec<R> {
    /// Places the program on `device`: weights uploaded, arena and metadata allocated.
    pub fn new(program: &Program, store: &WeightStore, device: R::Device) -> Result<Self> {
        let backend = program.backend.clone();
        // wgpu panics in its device thread when no adapter exists; say what to install.
        let client =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| R::client(&device))).map_err(|_| RuntimeError::Unsupported {
                backend: backend.clone(),
                msg: "no GPU adapter found (on a machine without a GPU, install Mesa's lavapipe: apt-get install mesa-vulkan-drivers)"
                    .into(),
            })?;
        let (wdata, woff, coff) = pack_weights(program, store)?;
        let (program, states_at) = &crate::states::states_in_arena(program);
        let mut meta: Vec<u32> = Vec::new();
        let lowered = program
            .entries
            .iter()
            .map(|e| lower::lower_entry(e, &woff, &coff, &mut meta))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|(step, op, msg)| RuntimeError::Step { step, op, msg })?;
        if meta.is_empty() {
            meta.push(0);
        }
        let arena_bytes = program.entries.iter().map(|e| e.arena_bytes).max().unwrap_or(0).max(256);
        for e in &program.entries {
            for s in &e.steps {
                for o in s.inputs.iter().chain([&s.output]) {
                    if let Slot::Arena { offset, bytes } = o.slot {
                        if offset + bytes > e.arena_bytes {
                            return Err(RuntimeError::Unsupported { backend, msg: "operand outside the arena (corrupt program)".into() });
                        }
                    }
                }
            }
        }
        // The zeroed arena is made on the host first: checked against the host's memory (no API
        // here gives the device's), and allocated fallibly.
        let h = |b: usize| crate::memory::human(b as u64);
        let what = format!("the arena ({}) and weights ({})", h(arena_bytes), h(4 * wdata.len()));
        crate::memory::check_host(&what, (arena_bytes + 4 * wdata.len()) as u64)?;
        // Zeroed: the states start empty.
        let arena = client.create_from_slice(&crate::memory::try_zeroed::<u8>(arena_bytes, "the arena")?);
        let weights = client.create_from_slice(f32::as_bytes(&wdata));
        let meta_h = client.create_from_slice(u32::as_bytes(&meta));
        Ok(CubeExec {
            client,
            program: program.clone(),
            arena,
            arena_bytes,
            states_at: states_at.clone(),
            weights,
            weights_len: wdata.len(),
            meta: meta_h,
            lowered,
        })
    }

    /// The bytes `[offset, offset + bytes)` of the arena, read back.
    /// Reads `bytes` from the arena at `offset`. Device reads copy whole words: a byte tensor
    /// reads into its slot's padding (the result may hold up to 3 bytes more).
    fn read_arena(&self, offset: usize, bytes: usize) -> std::result::Result<cubecl::bytes::Bytes, String> {
        let end = (offset + bytes.next_multiple_of(4)).min(self.arena_bytes);
        let h = self.arena.clone().offset_start(offset as u64).offset_end((self.arena_bytes - end) as u64);
        self.client.read_one(h).map_err(|e| format!("device read failed: {e:?}"))
    }

    fn meta_at(&self, at: usize, len: usize) -> ArrayArg<R> {
        // SAFETY: `at` and `len` come from the block `lower` wrote into the metadata buffer.
        unsafe { ArrayArg::from_raw_parts(self.meta.clone().offset_start(4 * at as u64), len) }
    }

    fn arena_arg(&self) -> ArrayArg<R> {
        // SAFETY: the arena was allocated with `arena_bytes`; every offset was checked against it.
        unsafe { ArrayArg::from_raw_parts(self.arena.clone(), self.arena_bytes / 4) }
    }

    fn weights_arg(&self) -> ArrayArg<R> {
        // SAFETY: the weights buffer holds `weights_len` f32 values.
        unsafe { ArrayArg::from_raw_parts(self.weights.clone(), self.weights_len) }
    }

    fn launch(&self, l: &Launch, src: Option<(&Handle, usize)>) {
        let c = &self.client;
        let blocks = |n: usize| CubeCount::Static(n.div_ceil(k::BLOCK as usize).max(1) as u32, 1, 1);
        // A launch of `parts` independent parts, one per cube row.
        let part_blocks = |n: usize, parts: u32| CubeCount::Static(n.div_ceil(k::BLOCK as usize).max(1) as u32, parts, 1);
        let dim1 = CubeDim::new_1d(k::BLOCK);
        // A kernel over `units` threads that takes (arena, weights, metadata block, args..).
        macro_rules! unit_launch {
            ($($kernel:ident)::+, $units:expr, $meta:expr, $len:expr, $($arg:expr),+) => {
                $($kernel)::+::launch_unchecked::<f32, R>(c, blocks($units), dim1, self.arena_arg(), self.weights_arg(), self.meta_at($meta, $len), $($arg),+)
            };
        }
        // SAFETY (all launches): each kernel bounds-checks its unit against the sizes in its
        // metadata, and `lower` checked every operand range against its buffer.
        unsafe {
            match l {
                Launch::Copy { cfg, n, meta, len } => {
                    let src = match src {
                        // SAFETY: an input staging buffer of `n` f32 values.
                        Some((h, n)) => ArrayArg::from_raw_parts(h.clone(), n),
                        None => self.weights_arg(),
                    };
                    let count = part_blocks(*n, cfg.parts());
                    k::copy::launch_unchecked::<f32, R>(c, count, dim1, self.arena_arg(), src, self.meta_at(*meta, *len), cfg.clone())
                }
                Launch::Resize { cfg, n, meta, len } => unit_launch!(k::resize, *n, *meta, *len, cfg.clone()),
                Launch::Fused { cfg, n, meta, len } => unit_launch!(k::fused, *n, *meta, *len, cfg.clone()),
                Launch::MatMul { cfg, m, n, batch, meta, len } => {
                    let t = k::TILE as usize;
                    let count = CubeCount::Static(n.div_ceil(t) as u32, m.div_ceil(t) as u32, *batch as u32 * cfg.parts);
                    k::matmul::launch_unchecked::<f32, R>(
                        c,
                        count,
                        CubeDim::new_2d(k::TILE, k::TILE),
                        self.arena_arg(),
                        self.weights_arg(),
                        self.meta_at(*meta, *len),
                        cfg.clone(),
                    )
                }
                Launch::Gated { cfg, m, n, batch, meta, len } => {
                    let t = k::TILE as usize;
                    let count = CubeCount::Static(n.div_ceil(t) as u32, m.div_ceil(t) as u32, *batch as u32);
                    k::gated::gated_matmul::launch_unchecked::<f32, R>(
                        c,
                        count,
                        CubeDim::new_2d(k::TILE, k::TILE),
                        self.arena_arg(),
                        self.weights_arg(),
                        self.meta_at(*meta, *len),
                        cfg.clone(),
                    )
                }
                Launch::Norm { cfg, rows, meta, len } => k::norm::launch_unchecked::<f32, R>(
                    c,
                    CubeCount::Static(*rows as u32, 1, 1),
                    dim1,
                    self.arena_arg(),
                    self.weights_arg(),
                    self.meta_at(*meta, *len),
                    cfg.clone(),
                ),
                Launch::ResidualNorm { cfg, rows, meta, len } => k::residual::residual_norm::launch_unchecked::<f32, R>(
                    c,
                    CubeCount::Static(*rows as u32, 1, 1),
                    dim1,
                    self.arena_arg(),
                    self.weights_arg(),
                    self.meta_at(*meta, *len),
                    cfg.clone(),
                ),
                Launch::Reduce { cfg, n, meta, len } => unit_launch!(k::reduce::reduce, *n, *meta, *len, cfg.clone()),
                Launch::SoftmaxAxis { x_in_arena, lines, meta, len } => {
                    unit_launch!(k::reduce::softmax_axis, *lines, *meta, *len, *x_in_arena)
                }
                Launch::Cast { cfg, n, meta, len } => unit_launch!(k::index::cast, *n, *meta, *len, cfg.clone()),
                Launch::Iota { start, step, out, n, meta, len } => k::index::iota::launch_unchecked::<f32, R>(
                    c,
                    blocks(*n),
                    dim1,
                    self.arena_arg(),
                    self.meta_at(*meta, *len),
                    start.to_bits(),
                    step.to_bits(),
                    *out,
                ),
                Launch::Gather { cfg, n, meta, len } => unit_launch!(k::index::gather, *n, *meta, *len, cfg.clone()),
                Launch::TokenLogProb { x, idx, rows, meta, len } => unit_launch!(k::reduce::token_log_prob, *rows, *meta, *len, *x, *idx),
                Launch::WriteRows { cfg, n, meta, len } => k::index::write_rows::launch_unchecked::<f32, R>(
                    c,
                    part_blocks(*n, cfg.parts),
                    dim1,
                    self.arena_arg(),
                    self.weights_arg(),
                    self.meta_at(*meta, *len),
                    cfg.clone(),
                ),
                Launch::ScatterAdd { cfg, n, meta, len } => unit_launch!(k::index::scatter_add, *n, *meta, *len, cfg.clone()),
                Launch::TopK { x, out, n, meta, len } => unit_launch!(k::index::topk, *n, *meta, *len, *x, *out),
                Launch::CumSum { cfg, lines, meta, len } => unit_launch!(k::index::cumsum, *lines, *meta, *len, cfg.clone()),
                Launch::MoeDispatch { cfg, n, meta, len } => unit_launch!(k::index::moe_dispatch, *n, *meta, *len, cfg.clone()),
                Launch::MoeCombine { cfg, n, meta, len } => unit_launch!(k::index::moe_combine, *n, *meta, *len, cfg.clone()),
                Launch::Attention { cfg, sq, heads, batch, meta, len } => {
                    let count = CubeCount::Static(sq.div_ceil(k::ATT_BQ as usize) as u32, *heads as u32, *batch as u32);
                    k::attention::launch_unchecked::<f32, R>(
                        c,
                        count,
                        CubeDim::new_1d(k::ATT_BQ),
                        self.arena_arg(),
                        self.weights_arg(),
                        self.meta_at(*meta, *len),
                        cfg.clone(),
                    )
                }
            }
        }
    }

    fn run_inner(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], mut times: Option<&mut Vec<f64>>) -> Result<()> {
        let low = &self.lowered[entry];
        for (l, bytes) in low.uploads.iter().zip(inputs) {
            if bytes.is_empty() {
                continue; // A state read as it is.
            }
            // The upload copies whole words; pad a byte tensor's tail.
            let staging = if bytes.len() % 4 == 0 {
                self.client.create_from_slice(bytes)
            } else {
                let mut padded = bytes.to_vec();
                padded.resize(bytes.len().next_multiple_of(4), 0);
                self.client.create_from_slice(&padded)
            };
            self.launch(l, Some((&staging, bytes.len().div_ceil(4))));
        }
        for steps in &low.steps {
            let t = times.is_some().then(std::time::Instant::now);
            for l in steps {
                self.launch(l, None);
            }
            if let (Some(times), Some(t)) = (times.as_deref_mut(), t) {
                cubecl::future::block_on(self.client.sync())
                    .map_err(|e| RuntimeError::Unsupported { backend: self.program.backend.clone(), msg: format!("{e:?}") })?;
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let e = &self.program.entries[entry];
        for (io, out) in e.outputs.iter().zip(outputs.iter_mut()) {
            if out.is_empty() {
                continue; // Stored in its state only.
            }
            let Slot::Arena { offset, bytes } = io.operand.slot else {
                return Err(RuntimeError::Output { name: io.name.clone(), msg: "not in the arena (corrupt program)".into() });
            };
            let got = self.read_arena(offset, bytes).map_err(|msg| RuntimeError::Output { name: io.name.clone(), msg })?;
            out.copy_from_slice(&got[..bytes]);
        }
        Ok(())
    }
}

impl<R: Runtime> Executable for CubeExec<R> {
    fn run(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<()> {
        self.run_inner(entry, inputs, outputs, None)
    }

    fn run_timed(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], times: &mut Vec<f64>) -> Result<()> {
        times.clear();
        self.run_inner(entry, inputs, outputs, Some(times))
    }

    fn reset_states(&mut self) -> Result<()> {
        if !self.states_at.is_empty() {
            self.arena = self.client.create_from_slice(&vec![0u8; self.arena_bytes]);
        }
        Ok(())
    }

    fn read_state(&mut self, i: usize, out: &mut [u8]) -> Result<()> {
        let (Some(&offset), Some(st)) = (self.states_at.get(i), self.program.states.get(i)) else {
            return Err(RuntimeError::Output { name: format!("state #{i}"), msg: "no such state".into() });
        };
        let got = self.read_arena(offset, st.ty.bytes()).map_err(|msg| RuntimeError::Output { name: st.name.clone(), msg })?;
        out.copy_from_slice(&got[..out.len()]);
        Ok(())
    }

    fn gather_state_rows(&mut self, rows: &[usize]) -> Result<()> {
        let backend = self.program.backend.clone();
        let fail = |msg: String| RuntimeError::Unsupported { backend: backend.clone(), msg };
        let biggest = self.program.states.iter().map(|st| st.ty.bytes()).max().unwrap_or(0);
        if biggest == 0 || rows.is_empty() {
            return Ok(());
        }
        let scratch = self.client.empty(biggest.next_multiple_of(4));
        let blocks = |n: usize| CubeCount::Static(n.div_ceil(k::BLOCK as usize).max(1) as u32, 1, 1);
        for (st, &at) in self.program.states.iter().zip(&self.states_at) {
            let bytes = st.ty.bytes();
            if !bytes.is_multiple_of(4 * rows.len()) || !at.is_multiple_of(4) {
                return Err(fail(format!("state {} ({}): rows are not whole 4-byte words", st.name, st.ty)));
            }
            let (n, w) = (bytes / 4, bytes / 4 / rows.len());
            let mut params: Vec<u32> = vec![(at / 4) as u32, w as u32, n as u32];
            params.extend(rows.iter().map(|&r| r as u32));
            let p = self.client.create_from_slice(u32::as_bytes(&params));
            for back in [false, true] {
                // SAFETY: the state's words `[at / 4, at / 4 + n)` lie in the arena (placed by
                // `states_in_arena`), the scratch holds `biggest >= 4 n` bytes, and every row
                // index was checked below the row count by the session.
                unsafe {
                    k::state_rows::launch_unchecked::<f32, R>(
                        &self.client,
                        blocks(n),
                        CubeDim::new_1d(k::BLOCK),
                        self.arena_arg(),
                        ArrayArg::from_raw_parts(scratch.clone(), n),
                        ArrayArg::from_raw_parts(p.clone(), params.len()),
                        back,
                    )
                };
            }
        }
        Ok(())
    }
}
