//! The CUDA executor: one device allocation ([`Layout`]), weights uploaded once, modules
//! loaded from CUBINs, GEMMs planned with cuBLASLt at load, and each entry captured once
//! into a CUDA graph that every run replays.
//!
//! NOT YET RUN ON A GPU: this file compiles in CI but no machine of this project's CI has a
//! driver; scripts/device_cuda.sh is its first test.

use super::lower::{lower_entry, Epilogue, Gemm, Launch, Layout, Work, GEMM_WORKSPACE};
pub use super::tune::GemvMode;
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{result as dr, sys, CudaContext, CudaStream};
use kiln_graph::program::{Binary, Program, Slot};
use kiln_graph::DType;
use std::collections::{HashMap, HashSet};
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

/// Most algorithms asked of cuBLASLt's heuristic per GEMM (timed at load for small M).
const ALGOS: usize = 8;

/// How a planned GEMM runs: cuBLASLt with one of its algorithms, or kiln's GEMV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Choice {
    Lt(usize),
    Gemv,
}

/// A GEMM planned at load: descriptors, the algorithms cuBLASLt's heuristic offers (best
/// first), the GEMV alternative where it applies, and the choice between them.
pub(super) struct PlannedGemm {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    /// The layout of D, and of C (a residual has the output's layout).
    d: ltsys::cublasLtMatrixLayout_t,
    pub(super) algos: Vec<ltsys::cublasLtMatmulAlgo_t>,
    /// Our `b` is cuBLAS's A and our `a` its B (row-major C = col-major C^T = B^T A^T).
    a_ptr: u64,
    b_ptr: u64,
    /// C, read with `beta` (the residual, or D itself with beta = 0), and D.
    c_ptr: u64,
    d_ptr: u64,
    beta: f32,
    pub(super) gemv: Option<(sys::CUfunction, Launch)>,
    pub(super) choice: Choice,
    /// The lowered GEMM (offsets in the allocation), for tuning and reports.
    pub(super) gemm: Gemm,
}

#[derive(Clone)]
pub(super) enum Item {
    Gemm(usize),
    Kernel { f: sys::CUfunction, launch: Launch },
    Zero { ptr: u64, bytes: usize },
}

/// The load options [`CudaExec::new`] takes from `CudaBackend`.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Whether kiln's GEMV replaces cuBLASLt where it applies (see [`GemvMode`]).
    pub gemv: GemvMode,
    /// Whether steps run together where the modules allow (`CudaBackend::fuse`).
    pub fuse: bool,
    /// Whether kiln's kernels launch with programmatic dependent launch (`CudaBackend::pdl`).
    pub pdl: bool,
}

/// A program loaded on the GPU.
pub struct CudaExec {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) base: u64,
    pub(super) layout: Layout,
    pub(super) program: Program,
    modules: Vec<sys::CUmodule>,
    lt: ltsys::cublasLtHandle_t,
    pub(super) gemms: Vec<PlannedGemm>,
    /// Per entry, per step, the device work.
    pub(super) items: Vec<Vec<Vec<Item>>>,
    graphs: Vec<Option<sys::CUgraphExec>>,
    /// Arena offset of each persistent state (`states_in_arena`), zeroed at load and reset.
    pub(super) states_at: Vec<usize>,
    /// Every loaded kernel by name (the state-row gather launches `data` kernels by name).
    pub(super) funcs: HashMap<String, sys::CUfunction>,
    /// The functions (by address) launched with programmatic dependent launch: with
    /// `CudaBackend::pdl`, those of the modules that define the waits' marker (`pdl.rs`).
    pdl: HashSet<usize>,
    /// A second allocation for reordering state rows (indices, then a state's copy), made on
    /// first use: its address and size.
    rows_scratch: Option<(u64, usize)>,
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

impl CudaExec {
    /// Loads `program` on device 0. `binaries` gives the CUBINs (the artifact's, and NVRTC's
    /// of what it lacks): called while the weights upload on a thread and stream of their own,
    /// so compiling and loading modules overlap the upload; both finish before any GEMM is
    /// timed or entry captured. The caller checked that the driver exists.
    /// `opts`: the load options ([`LoadOptions`]).
    pub fn new(
        program: &Program,
        store: &WeightStore,
        binaries: impl FnOnce() -> Result<Vec<Binary>>,
        states_at: Vec<usize>,
        opts: LoadOptions,
    ) -> Result<Self> {
        let LoadOptions { gemv, fuse, pdl } = opts;
        let ctx = drv("cuCtx (device 0)", CudaContext::new(0))?;
        // SAFETY: kiln orders all work on one stream; cudarc's event tracking would record
        // events inside graph capture.
        unsafe { ctx.disable_event_tracking() };
        let stream = drv("cuStreamCreate", ctx.new_stream())?;
        let layout = super::lower::layout(program).map_err(err)?;
        let (free, all) = drv("cuMemGetInfo", dr::mem_get_info())?;
        if layout.total > free {
            let h = |b: usize| crate::memory::human(b as u64);
            return Err(RuntimeError::Memory(format!(
                "the program needs {} of GPU memory (weights, arena and states), the GPU has {} free of {}",
                h(layout.total),
                h(free),
                h(all)
            )));
        }
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
            funcs: HashMap::new(),
            pdl: HashSet::new(),
            rows_scratch: None,
            debug: std::env::var("KILN_CUDA_DEBUG").is_ok_and(|v| v == "1"),
        };
        let (ctx, base) = (me.ctx.clone(), me.base);
        let (weights_at, constants_at) = (me.layout.weights.clone(), me.layout.constants.clone());
        let (uploaded, funcs) = std::thread::scope(|sc| {
            let up = sc.spawn(move || super::upload::upload_on_own_stream(&ctx, program, store, base, &weights_at, &constants_at));
            let funcs = binaries().and_then(|b| me.load_modules(&b, pdl));
            (up.join().unwrap_or_else(|_| Err(err("the weight upload thread panicked"))), funcs)
        });
        uploaded?;
        let funcs = funcs?;
        me.clear_flags()?;
        for e in &program.entries {
            let mut steps = Vec::with_capacity(e.steps.len());
            // Pairs merge, and split attention runs as one launch, only where the loaded
            // modules hold the `_x2` or `attn_rows1_*` entry.
            let has = |k: &str| funcs.contains_key(k) && (fuse || !super::lower::merge::fusing(k));
            let lowered = lower_entry(&e.steps, &me.layout, &has).map_err(|(i, msg)| RuntimeError::Step {
                step: i,
                op: e.steps.get(i).map_or("?", |s| s.op.name()),
                msg,
            })?;
            for work in lowered.work {
                let mut items = Vec::with_capacity(work.len());
                for w in work {
                    items.push(match w {
                        Work::Gemm(g) => {
                            // An artifact's CUBINs from before the GEMV existed lack it: cuBLASLt.
                            let mut gemv =
                                g.gemv.clone().filter(|l| funcs.contains_key(&l.kernel)).map(|l| me.relocate(&funcs, l)).transpose()?;
                            // A GEMV launched with PDL prefetches its weights before it waits.
                            if let Some((_, l)) = gemv.as_mut().filter(|(f, _)| me.pdl.contains(&(*f as usize))) {
                                if !kiln_kernels::cuda::gemv::set_prefetch(&mut l.params) {
                                    return Err(err(format!("{}: a parameter block of {} bytes", l.kernel, l.params.len())));
                                }
                            }
                            Item::Gemm(me.plan_gemm(g, gemv)?)
                        }
                        Work::Zero { offset, bytes } => Item::Zero { ptr: me.base + offset, bytes },
                        Work::Kernel(l) => {
                            let (f, launch) = me.relocate(&funcs, l)?;
                            Item::Kernel { f, launch }
                        }
                    });
                }
                steps.push(items);
            }
            me.items.push(steps);
        }
        me.graphs = (0..program.entries.len()).map(|_| None).collect();
        me.funcs = funcs;
        // Timing writes GEMM outputs (arena intermediates): before the states are zeroed.
        me.tune(gemv)?;
        me.zero_states()?;
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

    /// Zeroes the error flag and attention's split counters (which each `attn_rows1` launch
    /// then leaves zero).
    fn clear_flags(&mut self) -> Result<()> {
        let cu = self.stream.cu_stream();
        // SAFETY: the error flag's 256 bytes are inside the allocation.
        drv("memset", unsafe { dr::memset_d8_async(self.base + self.layout.error_flag as u64, 0, 256, cu) })?;
        if self.layout.counters_bytes > 0 {
            let at = self.base + self.layout.counters as u64;
            // SAFETY: the counters' region lies inside the allocation (`layout`).
            drv("memset counters", unsafe { dr::memset_d8_async(at, 0, self.layout.counters_bytes, cu) })?;
        }
        drv("sync", self.stream.synchronize())
    }

    /// Loads `binaries`' modules and returns their kernels by name; with `pdl`, records the
    /// kernels of the modules that wait (`pdl::module_waits`) for PDL launches.
    fn load_modules(&mut self, binaries: &[Binary], pdl: bool) -> Result<HashMap<String, sys::CUfunction>> {
        let mut funcs = HashMap::new();
        for b in binaries {
            // SAFETY: `code` is a CUBIN produced by NVRTC for this device's architecture; the
            // driver validates it and returns an error otherwise.
            let m = drv(&format!("cuModuleLoadData({})", b.name), unsafe { dr::module::load_data(b.code.as_ptr() as *const c_void) })?;
            self.modules.push(m);
            let waits = pdl && super::pdl::module_waits(m);
            let names: Vec<String> = if b.name.starts_with("fused_") {
                vec![b.name.clone(), format!("{}{}", b.name, super::lower::merge::X2)]
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
                let f = match unsafe { dr::module::get_function(m, c) } {
                    Ok(f) => f,
                    // CUBINs from before the `_x2` and one-launch entries: their work runs
                    // as it did then.
                    Err(_) if super::lower::optional_kernel(&n) => continue,
                    Err(e) => return Err(err(format!("cuModuleGetFunction({n}): {e:?}"))),
                };
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
                if waits {
                    self.pdl.insert(f as usize);
                }
                funcs.insert(n, f);
            }
        }
        if pdl && std::env::var("KILN_CUDA_VERBOSE").is_ok_and(|v| v == "1") {
            eprintln!("kiln: programmatic dependent launch for {} of {} kernels", self.pdl.len(), funcs.len());
        }
        Ok(funcs)
    }

    /// A kernel launch's function, with its parameters' addresses relocated into the allocation.
    fn relocate(&self, funcs: &HashMap<String, sys::CUfunction>, mut l: Launch) -> Result<(sys::CUfunction, Launch)> {
        let f = *funcs.get(&l.kernel).ok_or_else(|| err(format!("kernel {} is in no loaded module", l.kernel)))?;
        for &r in &l.relocs {
            let v = u64::from_le_bytes(l.params.get(r..r + 8).and_then(|b| b.try_into().ok()).ok_or_else(|| err("bad relocation"))?);
            l.params[r..r + 8].copy_from_slice(&(v + self.base).to_le_bytes());
        }
        Ok((f, l))
    }

    fn plan_gemm(&mut self, g: Gemm, gemv: Option<(sys::CUfunction, Launch)>) -> Result<usize> {
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
        use ltsys::cublasLtEpilogue_t as E;
        let (epi, bias, residual) = match g.epilogue {
            Epilogue::None => (E::CUBLASLT_EPILOGUE_DEFAULT, None, None),
            Epilogue::Bias(b) => (E::CUBLASLT_EPILOGUE_BIAS, Some(b), None),
            Epilogue::GeluTanh => (E::CUBLASLT_EPILOGUE_GELU, None, None),
            Epilogue::BiasGeluTanh(b) => (E::CUBLASLT_EPILOGUE_GELU_BIAS, Some(b), None),
            // D = A B + 1 * C (+ bias), with C the residual in D's layout.
            Epilogue::Residual(r) => (E::CUBLASLT_EPILOGUE_DEFAULT, None, Some(r)),
            Epilogue::BiasResidual { bias, residual } => (E::CUBLASLT_EPILOGUE_BIAS, Some(bias), Some(residual)),
        };
        set_desc(
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epi as *const _ as *const c_void,
            std::mem::size_of_val(&epi),
        )?;
        if let Some(b) = bias {
            let ptr: u64 = self.base + b;
            set_desc(ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr as *const _ as *const c_void, 8)?;
            if g.bias_stride != 0 {
                // One bias row per batch (stacked projections' biases).
                let stride = g.bias_stride as i64;
                set_desc(
                    ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                    &stride as *const _ as *const c_void,
                    8,
                )?;
            }
        }
        // cuBLAS's A is our b: [N, K] as seen column-major (ld N), or [K, N] transposed.
        let a = if g.transpose_b {
            blas("layout", lt::create_matrix_layout(dt, k, n, k as i64))?
        } else {
            blas("layout", lt::create_matrix_layout(dt, n, k, n as i64))?
        };
        let b = blas("layout", lt::create_matrix_layout(dt, k, m, k as i64))?;
        // D (and C, a residual) in the output's dtype: f32 from bf16 operands where an
        // epilogue ends with a cast to f32 (compute and scale stay f32).
        let d = blas("layout", lt::create_matrix_layout(data_type(g.out_dtype)?, n, m, n as i64))?;
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
        let algos = self.heuristic(desc, a, b, d)?;
        if algos.is_empty() && gemv.is_none() {
            return Err(err(format!("cuBLASLt has no algorithm for {}x{}x{} {:?}", g.m, g.n, g.k, g.dtype)));
        }
        let choice = if algos.is_empty() { Choice::Gemv } else { Choice::Lt(0) };
        self.gemms.push(PlannedGemm {
            desc,
            a,
            b,
            d,
            algos,
            a_ptr: self.base + g.b,
            b_ptr: self.base + g.a,
            c_ptr: self.base + residual.unwrap_or(g.c),
            d_ptr: self.base + g.c,
            beta: if residual.is_some() { 1.0 } else { 0.0 },
            gemv,
            choice,
            gemm: g,
        });
        Ok(self.gemms.len() - 1)
    }

    /// Up to [`ALGOS`] algorithms for a GEMM that fit the workspace, the heuristic's best first.
    fn heuristic(
        &self,
        desc: ltsys::cublasLtMatmulDesc_t,
        a: ltsys::cublasLtMatrixLayout_t,
        b: ltsys::cublasLtMatrixLayout_t,
        d: ltsys::cublasLtMatrixLayout_t,
    ) -> Result<Vec<ltsys::cublasLtMatmulAlgo_t>> {
        let pref = blas("preference", lt::create_matmul_pref())?;
        let ws = GEMM_WORKSPACE as u64;
        // SAFETY: zeroed results are plain data the call overwrites (it writes at most ALGOS
        // of them and says how many); every handle is live; a u64 attribute value.
        unsafe {
            let mut results: [ltsys::cublasLtMatmulHeuristicResult_t; ALGOS] = std::mem::zeroed();
            let mut found = 0i32;
            let set = lt::set_matmul_pref_attribute(
                pref,
                ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                8,
            );
            let status =
                ltsys::cublasLtMatmulAlgoGetHeuristic(self.lt, desc, a, b, d, d, pref, ALGOS as i32, results.as_mut_ptr(), &mut found);
            let _ = lt::destroy_matmul_pref(pref);
            blas("preference", set)?;
            if status != ltsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                // No algorithm (CUBLAS_STATUS_NOT_SUPPORTED): the caller falls back or fails.
                return Ok(Vec::new());
            }
            Ok(results[..(found.clamp(0, ALGOS as i32) as usize)]
                .iter()
                .filter(|r| r.state == ltsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= GEMM_WORKSPACE)
                .map(|r| r.algo)
                .collect())
        }
    }

    /// Issues planned GEMM `i` as `choice`.
    pub(super) fn issue_gemm(&self, i: usize, choice: Choice) -> Result<()> {
        let cu = self.stream.cu_stream();
        let g = &self.gemms[i];
        match choice {
            Choice::Gemv => {
                let (f, l) = g.gemv.as_ref().ok_or_else(|| err("GEMM without a GEMV chosen as one"))?;
                self.launch(*f, l)
            }
            Choice::Lt(a) => {
                let algo = g.algos.get(a).ok_or_else(|| err("no such cuBLASLt algorithm"))?;
                let one = 1.0f32;
                // SAFETY: descriptors planned at load for these pointers, all inside the
                // allocation (C is D or a residual of D's layout); the workspace is ours alone.
                blas("matmul", unsafe {
                    lt::matmul(
                        self.lt,
                        g.desc,
                        &one as *const f32 as *const c_void,
                        &g.beta as *const f32 as *const c_void,
                        g.a_ptr as *const c_void,
                        g.a,
                        g.b_ptr as *const c_void,
                        g.b,
                        g.c_ptr as *const c_void,
                        g.d,
                        g.d_ptr as *mut c_void,
                        g.d,
                        algo,
                        (self.base + self.layout.workspace as u64) as *mut c_void,
                        GEMM_WORKSPACE,
                        cu as ltsys::cudaStream_t,
                    )
                })
            }
        }
    }

    fn launch(&self, f: sys::CUfunction, launch: &Launch) -> Result<()> {
        let mut params = launch.params.clone();
        let mut args = [params.as_mut_ptr() as *mut c_void];
        // SAFETY: every kernel takes one by-value struct whose bytes are `params` (layouts
        // checked by tests in kiln-kernels); its addresses were relocated into the
        // allocation; the driver copies parameters at launch (and at capture), so `params`
        // may drop afterwards. PDL only for the kernels of modules that wait (`load_modules`).
        let cu = self.stream.cu_stream();
        drv(&format!("launch {}", launch.kernel), unsafe {
            if self.pdl.contains(&(f as usize)) {
                // The kernel's module waits before it touches another kernel's memory.
                super::pdl::launch(f, launch.grid, launch.block, launch.smem, cu, &mut args)
            } else {
                dr::launch_kernel(f, launch.grid, (launch.block, 1, 1), launch.smem, cu, &mut args)
            }
        })
    }

    pub(super) fn issue(&self, item: &Item) -> Result<()> {
        let cu = self.stream.cu_stream();
        match item {
            Item::Gemm(i) => self.issue_gemm(*i, self.gemms[*i].choice),
            Item::Zero { ptr, bytes } => {
                // SAFETY: the range is an output operand inside the allocation.
                drv("memset", unsafe { dr::memset_d8_async(*ptr, 0, *bytes, cu) })
            }
            Item::Kernel { f, launch } => self.launch(*f, launch),
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
                // Each step between two CUDA events, all queued at once: the GPU's time per
                // step, without the launch latency a host timer would add to small kernels.
                drv("sync", self.stream.synchronize())?;
                let n = self.items[entry].len();
                let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
                let events = (0..=n).map(|_| drv("cuEventCreate", dr::event::create(flags))).collect::<Result<Vec<_>>>()?;
                let timed = (|| -> Result<()> {
                    // SAFETY: live events of this context, recorded on our stream.
                    drv("cuEventRecord", unsafe { dr::event::record(events[0], cu) })?;
                    for (i, step) in self.items[entry].iter().enumerate() {
                        for item in step {
                            self.issue(item)?;
                        }
                        // SAFETY: as above.
                        drv("cuEventRecord", unsafe { dr::event::record(events[i + 1], cu) })?;
                    }
                    drv("sync", self.stream.synchronize())?;
                    for w in events.windows(2) {
                        // SAFETY: both events completed (the stream was synchronised).
                        times.push(drv("cuEventElapsedTime", unsafe { dr::event::elapsed(w[0], w[1]) })? as f64 * 1e-3);
                    }
                    Ok(())
                })();
                for ev in events {
                    // SAFETY: created above, destroyed once, no longer recorded.
                    let _ = unsafe { dr::event::destroy(ev) };
                }
                timed?;
            }
        }
        for (io, out) in e.outputs.iter().zip(outputs.iter_mut()) {
            if out.is_empty() && io.operand.ty.bytes() > 0 {
                continue; // a state, computed where it lives
            }
            let src = self.layout.output_at(io.operand.slot).map_err(err)?;
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
            return Err(err("an index was out of range: a gather or take-along-axis read outside its table (its output holds zeros there), a scatter-add index fell outside its target, or a write_slice position did not fit"));
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

    fn gather_state_rows(&mut self, rows: &[usize]) -> Result<()> {
        let biggest = self.program.states.iter().map(|st| st.ty.bytes()).max().unwrap_or(0);
        if biggest == 0 || rows.is_empty() {
            return Ok(());
        }
        drv("bind context", self.ctx.bind_to_thread())?;
        let cu = self.stream.cu_stream();
        let need = 256 + biggest.next_multiple_of(256) + 8 * rows.len();
        let (scratch, _) = match self.rows_scratch {
            Some(s) if s.1 >= need => s,
            old => {
                if let Some((ptr, _)) = old {
                    drv("sync", self.stream.synchronize())?;
                    // SAFETY: our own earlier scratch; nothing is queued on it any more.
                    drv("cuMemFree", unsafe { dr::free_sync(ptr) })?;
                    self.rows_scratch = None;
                }
                // SAFETY: a plain allocation of `need` bytes, freed in Drop or above.
                let ptr = drv("cuMemAlloc", unsafe { dr::malloc_sync(need) })?;
                self.rows_scratch = Some((ptr, need));
                (ptr, need)
            }
        };
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx_bytes: Vec<u8> = idx.iter().flat_map(|v| v.to_le_bytes()).collect();
        let copy_at = scratch + (8 * rows.len()).next_multiple_of(256) as u64;
        // SAFETY: the index block fits the scratch's head; `idx_bytes` lives until the sync below.
        drv("upload rows", unsafe { dr::memcpy_htod_async(scratch, &idx_bytes[..], cu) })?;
        let flag = self.base + self.layout.error_flag as u64;
        for (st, &at) in self.program.states.iter().zip(&self.states_at) {
            let state = self.base + (self.layout.arena + at) as u64;
            for l in super::state_rows::launches(state, copy_at, scratch, flag, rows.len(), st.ty.bytes() / rows.len()) {
                let f = *self.funcs.get(&l.kernel).ok_or_else(|| err(format!("kernel {} is in no loaded module", l.kernel)))?;
                self.launch(f, &l)?;
            }
        }
        drv("sync", self.stream.synchronize())
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
            if let Some((ptr, _)) = self.rows_scratch {
                let _ = dr::free_sync(ptr);
            }
            let _ = dr::free_sync(self.base);
        }
    }
}
