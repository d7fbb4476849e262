//! kiln's kernels: plain functions over slices that the runtime calls.
//!
//! `cpu` holds the multi-threaded f32 kernels (rayon global pool, `gemm` crate for matrix
//! products). Kernels assume the caller validated shapes; they `debug_assert` them and use
//! real asserts only where an unchecked pointer computation depends on them.

#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod cpu;
/// CubeCL kernels: `#[cube]` functions generate items without doc comments.
#[cfg(feature = "cube")]
#[allow(missing_docs)]
pub mod cube;
/// CUDA C kernels (sources for NVRTC) and, with the `cuda` feature, their compilation.
/// Parameter-struct fields mirror the C structs named in each doc comment.
#[allow(missing_docs)]
pub mod cuda;
