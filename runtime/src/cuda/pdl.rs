//! Programmatic dependent launch (`CudaBackend::pdl`): kiln's kernels launched with
//! `cuLaunchKernelEx` and `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 1`, so each
//! may start while the kernel before it in the stream finishes; the kernels wait
//! (`griddepcontrol.wait`, `kiln_kernels::cuda::pdl`) before they read what another kernel
//! wrote or store anything, and the GEMVs prefetch their weight rows into L2 before that
//! wait. Inside stream capture the attribute becomes a programmatic edge of the CUDA graph.
//! cuBLASLt's GEMMs launch as before.
//!
//! Only a module whose CUBIN defines [`kiln_kernels::cuda::pdl::MARKER`] (every module built
//! from `common.cuh` with the waits) launches its kernels this way: an artifact's CUBINs from
//! before the waits launch as before.

use cudarc::driver::{result as dr, sys};
use std::ffi::c_void;

/// Whether loaded module `m` defines the marker of kernels that wait (see the module doc).
pub(super) fn module_waits(m: sys::CUmodule) -> bool {
    let Ok(name) = std::ffi::CString::new(kiln_kernels::cuda::pdl::MARKER) else { return false };
    // SAFETY: `m` is a loaded module; a missing symbol is an error result, not UB.
    unsafe { dr::module::get_global(m, name) }.is_ok()
}

/// The launch attribute that lets a launch overlap the end of the kernel before it.
pub(super) fn attribute() -> sys::CUlaunchAttribute {
    // SAFETY: a plain C union of integers; zeroed is a valid value of every field.
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.programmaticStreamSerializationAllowed = 1;
    sys::CUlaunchAttribute { id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, pad: [0; 4], value }
}

/// Launches `f` on `stream` like `cuLaunchKernel`, with [`attribute`].
///
/// # Safety
/// As `cuLaunchKernel`: `f` is a live function of the current context, `args` the kernel's
/// parameters, `stream` a stream of that context; and `f` waits (`griddepcontrol.wait`)
/// before its first read of another kernel's output and its first global store.
pub(super) unsafe fn launch(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    stream: sys::CUstream,
    args: &mut [*mut c_void],
) -> std::result::Result<(), dr::DriverError> {
    let mut attrs = [attribute()];
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: stream,
        attrs: attrs.as_mut_ptr(),
        numAttrs: attrs.len() as u32,
    };
    // SAFETY: per the caller; `config` and `attrs` outlive the call, which copies them.
    unsafe { sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()) }.result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attribute_allows_programmatic_serialization() {
        let a = attribute();
        assert_eq!(a.id, sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);
        // SAFETY: the field `attribute` set.
        assert_eq!(unsafe { a.value.programmaticStreamSerializationAllowed }, 1);
        // The driver reads the id as a 4-byte enum, then 4 bytes of padding, then the value.
        assert_eq!(std::mem::offset_of!(sys::CUlaunchAttribute, value), 8);
    }
}
