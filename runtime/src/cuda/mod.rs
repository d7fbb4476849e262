//! The cuda backend: cuBLASLt GEMMs (bf16/f16/f32, f32 accumulation, bias and GELU-tanh
//! epilogues), kiln's CUDA C kernels (`kiln_kernels::cuda`) compiled by NVRTC, one device
//! allocation laid out by the memory plan, and each entry replayed as a CUDA graph.
//!
//! Ahead of time, `kiln compile --backend cuda --arch sm_90a` stores the CUBINs in the
//! artifact ([`Program::binaries`]), so loading needs only the driver. Without stored
//! CUBINs, loading compiles them with NVRTC. The weights upload on a thread and stream of
//! their own meanwhile (`upload.rs`; from the prepared weight file when the artifact has one,
//! [`crate::prepared::cuda`]).
//!
//! GEMMs with at most 8 rows (decode) can run as kiln's own GEMV instead ([`gemm`]): the
//! executor times both at load and keeps the faster ([`tune`]).
//!
//! Status: the lowering ([`lower`]) and kernel compilation are tested without a GPU; the
//! executor ([`exec`]) runs on a GPU only (scripts/device_cuda.sh). With `KILN_CUDA_EMULATE=1`
//! a load runs the same lowering on the CPU instead ([`emulate`]: kiln's kernels built by the
//! host's C++ compiler, docs/cuda-host-emulator.md), for tests on machines without a GPU.

pub mod attn_tune;
pub mod emulate;
pub mod exec;
mod fused_codegen;
pub mod gemm;
pub mod kernel;
pub mod lower;
mod norm_tune;
mod pdl;
pub mod plan;
pub mod rotation;
mod state_rows;
pub mod tune;
mod upload;

use crate::backend::{Backend, Executable};
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use kiln_graph::program::{Binary, Program};
use kiln_graph::{Op, TensorType};
use kiln_kernels::cuda::nvrtc;
use std::sync::Arc;

/// The architecture kiln compiles for unless told otherwise (H100 / H200).
pub const DEFAULT_ARCH: &str = "sm_90a";

/// The cuda backend for one GPU architecture.
pub struct CudaBackend {
    /// `sm_90a`, ...
    pub arch: String,
    /// Whether kiln's GEMV replaces cuBLASLt for small-M GEMMs (a load option; default auto:
    /// whichever measures faster at load).
    pub gemv: tune::GemvMode,
    /// Whether steps run together where the loaded modules allow (a load option; default
    /// true): two launches of one kernel as its `_x2` entry, split attention as one launch
    /// that also stores the new K/V rows, the next token with its log-probability. False runs
    /// each as its own launches, as with modules from before those entries, to time them.
    pub fuse: bool,
    /// Whether kiln's kernels launch with programmatic dependent launch (a load option;
    /// default false): each may start while the kernel before it finishes, waiting on the
    /// device (`griddepcontrol.wait`) before it reads another kernel's output or stores, and
    /// the GEMVs prefetch their weight rows into L2 before that wait. cuBLASLt's GEMMs, and
    /// the kernels of CUBINs from before the waits, launch as without it.
    pub pdl: bool,
}

impl Default for CudaBackend {
    fn default() -> Self {
        CudaBackend { arch: DEFAULT_ARCH.into(), gemv: tune::GemvMode::Auto, fuse: true, pdl: false }
    }
}

fn unsupported(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Unsupported { backend: "cuda".into(), msg: msg.into() }
}

/// Whether an NVIDIA driver (libcuda) can be loaded and initialised. cudarc panics on its
/// first call without one, so every entry point asks this first.
pub fn driver_check() -> Result<()> {
    // SAFETY: only tries to dlopen libcuda by its candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unsupported(
            "no NVIDIA driver on this machine (libcuda.so not found): the cuda backend needs a GPU; \
             use --backend cpu, or compile here with `kiln compile --backend cuda` and load the artifact on a GPU machine",
        ));
    }
    cudarc::driver::result::init().map_err(|e| unsupported(format!("the NVIDIA driver failed to initialise: {e:?}")))?;
    let n = cudarc::driver::result::device::get_count().map_err(|e| unsupported(format!("cuDeviceGetCount: {e:?}")))?;
    if n < 1 {
        return Err(unsupported("the NVIDIA driver reports no GPU"));
    }
    Ok(())
}

/// The name the driver gives device 0 (`cuDeviceGetName`): a tuning table's `card`.
pub fn device_name() -> Result<String> {
    if emulate::requested() {
        return Ok(emulate::CARD.to_string());
    }
    driver_check()?;
    let dev = cudarc::driver::result::device::get(0).map_err(|e| unsupported(format!("cuDeviceGet: {e:?}")))?;
    cudarc::driver::result::device::get_name(dev).map_err(|e| unsupported(format!("cuDeviceGetName: {e:?}")))
}

/// Compiles every module `program` needs (the hand-written ones and its fused regions) for
/// `arch` with NVRTC. Needs libnvrtc, no GPU.
pub fn compile_binaries(program: &Program, arch: &str) -> Result<Vec<Binary>> {
    // What a load needs: every module but the on-demand variants no tuning entry names.
    let need = plan::kernel_plan(program, arch).map_err(unsupported)?;
    compile_modules(program, arch, Some(&need.needed))
}

/// [`compile_binaries`] of the modules named in `only` (all when `None`).
fn compile_modules(program: &Program, arch: &str, only: Option<&std::collections::BTreeSet<String>>) -> Result<Vec<Binary>> {
    if !nvrtc::available() {
        return Err(unsupported(nvrtc::INSTALL_HINT));
    }
    let mut units: Vec<(String, String)> = kiln_kernels::cuda::modules().into_iter().map(|m| (m.name, m.source)).collect();
    units.extend(lower::regions(program).map_err(unsupported)?.into_iter().map(|r| (r.name, r.source)));
    units.retain(|(name, _)| only.is_none_or(|o| o.contains(name)));
    // In parallel (NVRTC uses one core per module), through the CUBIN cache.
    let codes: Vec<std::result::Result<Vec<u8>, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = units.iter().map(|(name, source)| sc.spawn(move || nvrtc::compile_cached(name, source, arch))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("NVRTC panicked".into()))).collect()
    });
    units
        .into_iter()
        .zip(codes)
        .map(|((name, _), code)| Ok(Binary { backend: "cuda".into(), arch: arch.into(), name, code: code.map_err(unsupported)? }))
        .collect()
}

/// The architecture name of the current device (`sm_90a` for compute capability 9.0).
fn device_arch() -> Result<String> {
    let dev = cudarc::driver::result::device::get(0).map_err(|e| unsupported(format!("cuDeviceGet: {e:?}")))?;
    let attr = |a| {
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        unsafe { cudarc::driver::result::device::get_attribute(dev, a) }.map_err(|e| unsupported(format!("cuDeviceGetAttribute: {e:?}")))
    };
    use cudarc::driver::sys::CUdevice_attribute as A;
    let (major, minor) = (attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
    // Architecture-specific features (wgmma, setmaxnreg) need the `a` target on 9.0.
    Ok(if (major, minor) == (9, 0) { "sm_90a".into() } else { format!("sm_{major}{minor}") })
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn kernel_for(&self, op: &Op, inputs: &[TensorType], out: &TensorType) -> std::result::Result<String, String> {
        lower::kernel_for(op, inputs, out)
    }

    fn name_kernels(&self, program: &mut Program) {
        lower::rotation_kernels(program)
    }

    fn reads_permutes_free(&self) -> bool {
        // A permute read only by fused regions and RoPE rotations (`lower::permute`).
        true
    }

    fn launches(&self, program: &Program, entry: usize) -> std::result::Result<Vec<usize>, String> {
        Ok(lowered(program, entry)?.work.iter().map(Vec::len).collect())
    }

    fn merged_launches(&self, program: &Program, entry: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
        Ok(lowered(program, entry)?.pairs)
    }

    fn absorbed_steps(&self, program: &Program, entry: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
        // K's and V's cache writes done by the attention's launch (`lower::kv_write`,
        // `lower::kv_prefill`), permutes read through strides by their readers (`lower::permute`).
        Ok(lowered(program, entry)?.absorbed)
    }

    fn load(&self, program: &Program, weights: Arc<WeightStore>) -> Result<Box<dyn Executable>> {
        let opts = exec::LoadOptions { gemv: self.gemv, fuse: self.fuse, pdl: self.pdl };
        if emulate::requested() {
            // Tests without a GPU: the same lowering, run on the CPU (`emulate`).
            let (laid, states_at) = crate::states::states_in_arena(program);
            return Ok(Box::new(emulate::EmuExec::new(&laid, &weights, states_at, opts)?));
        }
        driver_check()?;
        // SAFETY: only tries to dlopen libcublasLt (cudarc panics on its first call without it).
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(unsupported(
                "libcublasLt.so.13 was not found: install CUDA 13's cuBLAS (the `nvidia-cublas` wheel, or a toolkit) and add its lib folder to LD_LIBRARY_PATH",
            ));
        }
        let arch = device_arch()?;
        // The stored CUBINs of this architecture; NVRTC compiles only what they lack.
        let mut need = plan::kernel_plan(program, &arch).map_err(unsupported)?;
        let mut binaries: Vec<Binary> =
            program.binaries.iter().filter(|b| b.backend == "cuda" && b.arch == arch && !b.code.is_empty()).cloned().collect();
        if attn_tune::tuning_requested() {
            // Measuring the prefill's variants needs their modules, stored or not.
            let stored: Vec<String> = binaries.iter().map(|b| b.name.clone()).collect();
            need.missing.extend(attn_tune::tunable_modules(program).into_iter().filter(|m| !stored.contains(m)));
        }
        // Compiled (what the CUBINs lack) and loaded while the weights upload.
        let modules = || -> Result<Vec<Binary>> {
            if !need.compiles_none() {
                if binaries.is_empty() && !program.binaries.is_empty() {
                    let mut have: Vec<&str> = program.binaries.iter().map(|b| b.arch.as_str()).collect();
                    have.dedup();
                    eprintln!("kiln: the artifact holds CUBINs for {} but this GPU is {arch}: compiling with NVRTC", have.join(", "));
                } else if !binaries.is_empty() {
                    eprintln!("kiln: the artifact's CUBINs for {arch} lack {} modules: compiling them with NVRTC", need.missing.len());
                }
                binaries.extend(compile_modules(program, &arch, Some(&need.missing))?);
            }
            Ok(binaries)
        };
        let (laid, states_at) = crate::states::states_in_arena(program);
        Ok(Box::new(exec::CudaExec::new(&laid, &weights, modules, states_at, opts)?))
    }
}

/// Entry `entry` of `program` as the executor lowers it, with no device: states moved into the
/// arena first, as a load does, and launches merged as a load merges them (every `_x2` and
/// one-launch entry compiled: split attention as one `attn_rows1_*` launch, decode's and prefill's cache
/// writes inside it).
fn lowered(program: &Program, entry: usize) -> std::result::Result<lower::merge::Lowered, String> {
    let (program, _) = crate::states::states_in_arena(program);
    let layout = lower::layout(&program)?;
    let e = program.entries.get(entry).ok_or_else(|| format!("entry {entry} does not exist"))?;
    lower::lower_entry(&e.steps, &layout, &|_| true).map_err(|(i, m)| format!("step {i}: {m}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loading_without_a_driver_is_a_clear_error() {
        // SAFETY: only probes for libcuda.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // a GPU machine: the device script covers loading.
        }
        let e = driver_check().unwrap_err().to_string();
        assert!(e.contains("no NVIDIA driver"), "{e}");
        let p = Program::new("t", "cuda", "");
        let store = Arc::new(WeightStore::empty());
        let e = CudaBackend::default().load(&p, store).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("backend cuda: no NVIDIA driver"), "{e}");
    }
}
