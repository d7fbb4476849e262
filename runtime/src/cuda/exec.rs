//! The CUDA executor: one device allocation ([`Layout`]), weights uploaded once, modules
//! loaded from CUBINs, GEMMs planned with cuBLASLt at load, and each entry captured once
//! into a CUDA graph that every run replays.
//!
//! NOT YET RUN ON A GPU: this file compiles in CI but no machine of this project's CI has a
//! driver; scripts/device_cuda.sh is its first test.

use super::lower::{lower_step, Epilogue, Gemm, Launch, Layout, Work, GEMM_WORKSPACE};
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{result as dr, sys, CudaContext, CudaStream};
use kiln_graph::program::{Binary, Program, Slot};
use kiln_graph::DType;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Unsupported { backend: "cuda".into(), msg: msg.into() }
}

fn drv<T>(what: &str, r: std::result::Result<T, dr::DriverError>) -> Result<T> {
    r.map_err(|e| err(format!("{what}: {e:?}")))
}

fn blas<T>(what: &str, r: std::result::Result<T, lt::CublasError>) -> Result<T> {
    r.map_err(|e| err(format!("cuBLASLt {what}: {e:?}")))
}

/// A GEMM planned at load: descriptors and the algorithm cuBLASLt's heuristic chose.
struct PlannedGemm {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    d: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
    /// Our `b` is cuBLAS's A and our `a` its B (row-major C = col-major C^T = B^T A^T).
    a_ptr: u64,
    b_ptr: u64,
    c_ptr: u64,
}

enum Item {
    Gemm(usize),
    Kernel { f: sys::CUfunction, launch: Launch },
    Zero { ptr: u64, bytes: usize },
}

/// A program loaded on the GPU.
pub struct CudaExec {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    base: u64,
    layout: Layout,
    program: Program,
    modules: Vec<sys::CUmodule>,
    lt: ltsys::cublasLtHandle_t,
    gemms: Vec<PlannedGemm>,
    /// Per entry, per step, the device work.
    items: Vec<Vec<Vec<Item>>>,
    graphs: Vec<Option<sys::CUgraphExec>>,
    /// Arena offset of each persistent state (`states_in_arena`), zeroed at load and reset.
    states_at: Vec<usize>,
    /// `KILN_CUDA_DEBUG=1`: no graphs; each step issued alone and synchronised, so a fault
    /// names its step and kernel.
    debug: bool,
}

// SAFETY: the raw handles (module, cuBLASLt handle, descriptors, graphs) belong to this
// executor's context and are used only through `&mut self`, after binding the context to the
// calling thread.
unsafe impl Send for CudaExec {}

fn data_type(d: DType) -> Result<ltsys::cudaDataType> {
    Ok(match d {
        DType::F32 => ltsys::cudaDataType::CUDA_R_32F,
        DType::BF16 => ltsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => ltsys::cudaDataType::CUDA_R_16F,
        other => return Err(err(format!("no GEMM of {other}"))),
    })
}

/// Host bytes of each tensor of a table.
type Blobs = Vec<Vec<u8>>;

/// Weight and constant bytes in the program's declared dtypes.
fn host_bytes(program: &Program, store: &WeightStore) -> Result<(Blobs, Blobs)> {
    let mut w = Vec::with_capacity(program.weights.len());
    for spec in &program.weights {
        let (ty, bytes) = store.get(&spec.name, &spec.ty)?;
        w.push(if ty.dtype == spec.ty.dtype {
            bytes.to_vec()
        } else {
            crate::tensor::from_f64(spec.ty.dtype, &crate::tensor::to_f64(ty.dtype, bytes))
        });
    }
    let c = program.constants.iter().map(|c| crate::tensor::from_f64(c.ty.dtype, &c.values)).collect();
    Ok((w, c))
}

impl CudaExec {
    /// Loads `program` on device 0. `binaries` are the CUBINs (from the artifact or compiled
    /// just now); the caller checked that the driver exists.
    pub fn new(program: &Program, store: &WeightStore, binaries: &[Binary], states_at: Vec<usize>) -> Result<Self> {
        let ctx = drv("cuCtx (device 0)", CudaContext::new(0))?;
        // SAFETY: kiln orders all work on one stream; cudarc's event tracking would record
        // events inside graph capture.
        unsafe { ctx.disable_event_tracking() };
        let stream = drv("cuStreamCreate", ctx.new_stream())?;
        let layout = super::lower::layout(program).map_err(err)?;
        // SAFETY: a plain allocation of `total` bytes, freed in Drop.
        let base = drv("cuMemAlloc", unsafe { dr::malloc_sync(layout.total) })?;
        let mut me = CudaExec {
            ctx,
            stream,
            base,
            layout,
            program: program.clone(),
            modules: Vec::new(),
            lt: blas("create", lt::create_handle())?,
            gemms: Vec::new(),
            items: Vec::new(),
            graphs: Vec::new(),
            states_at,
            debug: std::env::var("KILN_CUDA_DEBUG").is_ok_and(|v| v == "1"),
        };
        me.upload(store)?;
        me.zero_states()?;
        let funcs = me.load_modules(binaries)?;
        for e in &program.entries {
            let mut steps = Vec::with_capacity(e.steps.len());
            for (i, s) in e.steps.iter().enumerate() {
                let work = lower_step(s, &me.layout).map_err(|msg| RuntimeError::Step { step: i, op: s.op.name(), msg })?;
                let mut items = Vec::with_capacity(work.len());
                for w in work {
                    items.push(match w {
                        Work::Gemm(g) => Item::Gemm(me.plan_gemm(&g)?),
                        Work::Zero { offset, bytes } => Item::Zero { ptr: me.base + offset, bytes },
                        Work::Kernel(mut l) => {
                            let f = *funcs.get(&l.kernel).ok_or_else(|| err(format!("kernel {} is in no loaded module", l.kernel)))?;
                            for &r in &l.relocs {
                                let v = u64::from_le_bytes(l.params[r..r + 8].try_into().map_err(|_| err("bad relocation"))?);
                                l.params[r..r + 8].copy_from_slice(&(v + me.base).to_le_bytes());
                            }
                            Item::Kernel { f, launch: l }
                        }
                    });
                }
                steps.push(items);
            }
            me.items.push(steps);
        }
        me.graphs = (0..program.entries.len()).map(|_| None).collect();
        if !me.debug {
            for e in 0..program.entries.len() {
                me.capture(e)?;
            }
        }
        Ok(me)
    }

    /// Zeroes every persistent state (they lie together at the top of the arena).
    fn zero_states(&mut self) -> Result<()> {
        let (Some(&first), Some(st)) = (self.states_at.first(), self.program.states.last()) else {
            return Ok(());
        };
        let last = self.states_at[self.states_at.len() - 1];
        drv("bind context", self.ctx.bind_to_thread())?;
        let cu = self.stream.cu_stream();
        let ptr = self.base + (self.layout.arena + first) as u64;
        // SAFETY: the states' ranges lie inside the arena of the allocation.
        drv("memset states", unsafe { dr::memset_d8_async(ptr, 0, last + st.ty.bytes() - first, cu) })?;
        drv("sync", self.stream.synchronize())
    }

    fn upload(&mut self, store: &WeightStore) -> Result<()> {
        let (w, c) = host_bytes(&self.program, store)?;
        let cu = self.stream.cu_stream();
        for (bytes, &off) in w.iter().zip(&self.layout.weights).chain(c.iter().zip(&self.layout.constants)) {
            // SAFETY: the destination range lies inside the allocation (layout); `bytes` lives
            // until the synchronize below.
            drv("upload", unsafe { dr::memcpy_htod_async(self.base + off as u64, bytes, cu) })?;
        }
        // SAFETY: the error flag's 256 bytes are inside the allocation.
        drv("memset", unsafe { dr::memset_d8_async(self.base + self.layout.error_flag as u64, 0, 256, cu) })?;
        drv("sync", self.stream.synchronize())
    }

    fn load_modules(&mut self, binaries: &[Binary]) -> Result<HashMap<String, sys::CUfunction>> {
        let mut funcs = HashMap::new();
        for b in binaries {
            // SAFETY: `code` is a CUBIN produced by NVRTC for this device's architecture; the
            // driver validates it and returns an error otherwise.
            let m = drv(&format!("cuModuleLoadData({})", b.name), unsafe { dr::module::load_data(b.code.as_ptr() as *const c_void) })?;
            self.modules.push(m);
            let names: Vec<String> = if b.name.starts_with("fused_") {
                vec![b.name.clone()]
            } else {
                kiln_kernels::cuda::modules()
                    .into_iter()
                    .find(|x| x.name == b.name)
                    .map(|x| x.kernels.into_iter().map(|k| k.name).collect())
                    .unwrap_or_default()
            };
            for n in names {
                let c = std::ffi::CString::new(n.clone()).map_err(|_| err("kernel name with NUL"))?;
                // SAFETY: `m` is a loaded module; a missing symbol is an error, not UB.
                let f = drv(&format!("cuModuleGetFunction({n})"), unsafe { dr::module::get_function(m, c) })?;
                if let Some(bytes) = kiln_kernels::cuda::dynamic_smem(&n) {
                    // SAFETY: `f` is a live function; Hopper allows up to 227 KiB.
                    drv("cuFuncSetAttribute", unsafe {
                        dr::function::set_function_attribute(
                            f,
                            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            bytes as i32,
                        )
                    })?;
                }
                funcs.insert(n, f);
            }
        }
        Ok(funcs)
    }

    fn plan_gemm(&mut self, g: &Gemm) -> Result<usize> {
        let dt = data_type(g.dtype)?;
        let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
        let desc = blas("desc", lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, ltsys::cudaDataType::CUDA_R_32F))?;
        let set_desc = |attr: ltsys::cublasLtMatmulDescAttributes_t, p: *const c_void, size: usize| {
            // SAFETY: `p` points at a live value of `size` bytes of the attribute's type.
            blas("desc attribute", unsafe { lt::set_matmul_desc_attribute(desc, attr, p, size) })
        };
        let op_t = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        if g.transpose_b {
            set_desc(
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &op_t as *const _ as *const c_void,
                std::mem::size_of_val(&op_t),
            )?;
        }
        let (epi, bias) = match g.epilogue {
            Epilogue::None => (ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT, None),
            Epilogue::Bias(b) => (ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS, Some(b)),
            Epilogue::GeluTanh => (ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU, None),
            Epilogue::BiasGeluTanh(b) => (ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS, Some(b)),
        };
        set_desc(
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epi as *const _ as *const c_void,
            std::mem::size_of_val(&epi),
        )?;
        if let Some(b) = bias {
            let ptr: u64 = self.base + b;
            set_desc(ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr as *const _ as *const c_void, 8)?;
        }
        // cuBLAS's A is our b: [N, K] as seen column-major (ld N), or [K, N] transposed.
        let a = if g.transpose_b {
            blas("layout", lt::create_matrix_layout(dt, k, n, k as i64))?
        } else {
            blas("layout", lt::create_matrix_layout(dt, n, k, n as i64))?
        };
        let b = blas("layout", lt::create_matrix_layout(dt, k, m, k as i64))?;
        let d = blas("layout", lt::create_matrix_layout(dt, n, m, n as i64))?;
        if g.batch > 1 {
            let count = g.batch as i32;
            for (l, stride) in [(a, g.b_stride as i64), (b, g.a_stride as i64), (d, (g.m * g.n) as i64)] {
                // SAFETY: attribute values of the documented types (i32 count, i64 stride).
                unsafe {
                    blas(
                        "batch",
                        lt::set_matrix_layout_attribute(
                            l,
                            ltsys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                            &count as *const _ as *const c_void,
                            4,
                        ),
                    )?;
                    blas(
                        "batch",
                        lt::set_matrix_layout_attribute(
                            l,
                            ltsys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            &stride as *const _ as *const c_void,
                            8,
                        ),
                    )?;
                }
            }
        }
        let pref = blas("preference", lt::create_matmul_pref())?;
        let ws = GEMM_WORKSPACE as u64;
        // SAFETY: a u64 attribute value; every handle is live.
        let heur = unsafe {
            blas(
                "preference",
                lt::set_matmul_pref_attribute(
                    pref,
                    ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const _ as *const c_void,
                    8,
                ),
            )?;
            let h = lt::get_matmul_algo_heuristic(self.lt, desc, a, b, d, d, pref);
            let _ = lt::destroy_matmul_pref(pref);
            blas(&format!("no algorithm for {}x{}x{} {:?}", g.m, g.n, g.k, g.dtype), h)?
        };
        self.gemms.push(PlannedGemm {
            desc,
            a,
            b,
            d,
            algo: heur.algo,
            a_ptr: self.base + g.b,
            b_ptr: self.base + g.a,
            c_ptr: self.base + g.c,
        });
        Ok(self.gemms.len() - 1)
    }

    fn issue(&self, item: &Item) -> Result<()> {
        let cu = self.stream.cu_stream();
        match item {
            Item::Gemm(i) => {
                let g = &self.gemms[*i];
                let (one, zero) = (1.0f32, 0.0f32);
                // SAFETY: descriptors planned at load for these pointers, all inside the
                // allocation; the workspace is ours alone.
                blas("matmul", unsafe {
                    lt::matmul(
                        self.lt,
                        g.desc,
                        &one as *const f32 as *const c_void,
                        &zero as *const f32 as *const c_void,
                        g.a_ptr as *const c_void,
                        g.a,
                        g.b_ptr as *const c_void,
                        g.b,
                        g.c_ptr as *const c_void,
                        g.d,
                        g.c_ptr as *mut c_void,
                        g.d,
                        &g.algo,
                        (self.base + self.layout.workspace as u64) as *mut c_void,
                        GEMM_WORKSPACE,
                        cu as ltsys::cudaStream_t,
                    )
                })
            }
            Item::Zero { ptr, bytes } => {
                // SAFETY: the range is an output operand inside the allocation.
                drv("memset", unsafe { dr::memset_d8_async(*ptr, 0, *bytes, cu) })
            }
            Item::Kernel { f, launch } => {
                let mut params = launch.params.clone();
                let mut args = [params.as_mut_ptr() as *mut c_void];
                // SAFETY: every kernel takes one by-value struct whose bytes are `params`
                // (layouts checked by tests in kiln-kernels); its addresses were relocated
                // into the allocation; the driver copies parameters at launch (and at
                // capture), so `params` may drop afterwards.
                drv(&format!("launch {}", launch.kernel), unsafe {
                    dr::launch_kernel(*f, launch.grid, (launch.block, 1, 1), launch.smem, cu, &mut args)
                })
            }
        }
    }

    fn capture(&mut self, entry: usize) -> Result<()> {
        let cu = self.stream.cu_stream();
        // SAFETY: the stream is ours; capture ends below on every path.
        drv("begin capture", unsafe { dr::stream::begin_capture(cu, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) })?;
        let mut issued = Ok(());
        for item in self.items[entry].iter().flatten() {
            issued = self.issue(item);
            if issued.is_err() {
                break;
            }
        }
        // SAFETY: capture was begun on this stream above.
        let graph = drv("end capture", unsafe { dr::stream::end_capture(cu) })?;
        issued?;
        // SAFETY: `graph` is the captured graph; it is destroyed once instantiated.
        let exec = unsafe {
            let e = dr::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = dr::graph::destroy(graph);
            drv("graph instantiate", e)?
        };
        self.graphs[entry] = Some(exec);
        Ok(())
    }

    /// Queues the copies of an entry's inputs into the arena (a state given as empty stays).
    fn upload_inputs(&self, entry: usize, inputs: &[&[u8]]) -> Result<()> {
        let cu = self.stream.cu_stream();
        let e = &self.program.entries[entry];
        for (io, bytes) in e.inputs.iter().zip(inputs) {
            if bytes.is_empty() && io.operand.ty.bytes() > 0 {
                continue; // a state, read where it lives
            }
            let Slot::Arena { offset, .. } = io.operand.slot else {
                return Err(RuntimeError::Input { name: io.name.clone(), msg: "not in the arena (corrupt program)".into() });
            };
            // SAFETY: the session checked the input's size against the operand, which lies in
            // the arena; `bytes` outlives the caller's synchronize.
            drv("upload input", unsafe { dr::memcpy_htod_async(self.base + (self.layout.arena + offset) as u64, bytes, cu) })?;
        }
        Ok(())
    }

    fn run_inner(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], times: Option<&mut Vec<f64>>) -> Result<()> {
        drv("bind context", self.ctx.bind_to_thread())?;
        let cu = self.stream.cu_stream();
        let e = &self.program.entries[entry];
        self.upload_inputs(entry, inputs)?;
        match times {
            None if self.debug => {
                for (i, step) in self.items[entry].iter().enumerate() {
                    let s = &self.program.entries[entry].steps[i];
                    let r = step.iter().try_for_each(|item| self.issue(item)).and_then(|_| drv("sync", self.stream.synchronize()));
                    r.map_err(|e| RuntimeError::Step { step: i, op: s.op.name(), msg: format!("{} ({}): {e}", s.kernel, s.output.ty) })?;
                }
            }
            None => {
                let g = self.graphs[entry].ok_or_else(|| err("entry not captured"))?;
                // SAFETY: an instantiated graph of this context.
                drv("graph launch", unsafe { dr::graph::launch(g, cu) })?;
            }
            Some(times) => {
                drv("sync", self.stream.synchronize())?;
                for step in &self.items[entry] {
                    let t = std::time::Instant::now();
                    for item in step {
                        self.issue(item)?;
                    }
                    drv("sync", self.stream.synchronize())?;
                    times.push(t.elapsed().as_secs_f64());
                }
            }
        }
        for (io, out) in e.outputs.iter().zip(outputs.iter_mut()) {
            if out.is_empty() && io.operand.ty.bytes() > 0 {
                continue; // a state, computed where it lives
            }
            let src = match io.operand.slot {
                Slot::Arena { offset, .. } => self.layout.arena + offset,
                Slot::Weight(i) => self.layout.weights[i as usize],
                Slot::Const(i) => self.layout.constants[i as usize],
                Slot::State(i) => return Err(err(format!("state {i} was not placed in the arena"))),
            };
            // SAFETY: the output buffer has the operand's size (checked by the session).
            drv("download output", unsafe { dr::memcpy_dtoh_async(&mut out[..], self.base + src as u64, cu) })?;
        }
        let mut flag = [0u8; 4];
        let fp = self.base + self.layout.error_flag as u64;
        // SAFETY: the flag lies inside the allocation.
        drv("download flag", unsafe { dr::memcpy_dtoh_async(&mut flag[..], fp, cu) })?;
        drv("sync", self.stream.synchronize())?;
        if flag != [0; 4] {
            // SAFETY: as above.
            drv("memset", unsafe { dr::memset_d8_async(fp, 0, 4, cu) })?;
            return Err(err("an index was out of range: a gather read outside its table (its output holds zeros there) or a write_slice position did not fit"));
        }
        Ok(())
    }
}

impl crate::backend::Executable for CudaExec {
    fn reset_states(&mut self) -> Result<()> {
        self.zero_states()
    }

    fn read_state(&mut self, i: usize, out: &mut [u8]) -> Result<()> {
        let (Some(&offset), Some(st)) = (self.states_at.get(i), self.program.states.get(i)) else {
            return Err(RuntimeError::Output { name: format!("state #{i}"), msg: "no such state".into() });
        };
        let n = out.len().min(st.ty.bytes());
        drv("bind context", self.ctx.bind_to_thread())?;
        let cu = self.stream.cu_stream();
        // SAFETY: the state's range lies inside the arena; `out` holds at least `n` bytes.
        drv("download state", unsafe { dr::memcpy_dtoh_async(&mut out[..n], self.base + (self.layout.arena + offset) as u64, cu) })?;
        drv("sync", self.stream.synchronize())
    }

    fn run(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<()> {
        self.run_inner(entry, inputs, outputs, None)
    }

    fn time_device(&mut self, entry: usize, inputs: &[&[u8]], runs: usize) -> Option<Result<Vec<f64>>> {
        let go = || -> Result<Vec<f64>> {
            drv("bind context", self.ctx.bind_to_thread())?;
            let cu = self.stream.cu_stream();
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs {
                // The arena's input slots may be reused by later steps: upload each time,
                // outside the timed span.
                self.upload_inputs(entry, inputs)?;
                drv("sync", self.stream.synchronize())?;
                let t = std::time::Instant::now();
                match self.graphs[entry] {
                    // SAFETY: an instantiated graph of this context.
                    Some(g) if !self.debug => drv("graph launch", unsafe { dr::graph::launch(g, cu) })?,
                    _ => self.items[entry].iter().flatten().try_for_each(|item| self.issue(item))?,
                }
                drv("sync", self.stream.synchronize())?;
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(times)
        };
        Some(go())
    }

    fn run_timed(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], times: &mut Vec<f64>) -> Result<()> {
        times.clear();
        self.run_inner(entry, inputs, outputs, Some(times))
    }
}

impl Drop for CudaExec {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        // SAFETY: each handle was created by this executor and is released once; nothing
        // runs on the stream any more.
        unsafe {
            for g in self.graphs.iter().flatten() {
                let _ = dr::graph::exec_destroy(*g);
            }
            for g in &self.gemms {
                let _ = lt::destroy_matrix_layout(g.a);
                let _ = lt::destroy_matrix_layout(g.b);
                let _ = lt::destroy_matrix_layout(g.d);
                let _ = lt::destroy_matmul_desc(g.desc);
            }
            let _ = lt::destroy_handle(self.lt);
            for m in &self.modules {
                let _ = dr::module::unload(*m);
            }
            let _ = dr::free_sync(self.base);
        }
    }
}
