//! The backend interface: what a backend must say at compile time (which kernel runs each
//! op, or why it cannot) and do at load time (turn a program and weights into something that
//! runs).

use crate::error::Result;
use crate::weights::WeightStore;
use kiln_graph::program::Program;
use kiln_graph::{Op, TensorType};
use std::sync::Arc;

/// A compiled-for target.
pub trait Backend: Send + Sync {
    /// The name used on the command line and in artifacts.
    fn name(&self) -> &'static str;
    /// The kernel a step of `op` uses, or why this backend cannot run it.
    fn kernel_for(&self, op: &Op, inputs: &[TensorType], out: &TensorType) -> std::result::Result<String, String>;
    /// Whether a step of kernel `kernel` runs through the reference interpreter (slow and
    /// allocating: `kiln inspect` and the parity suite list such steps).
    fn interpreted(&self, _kernel: &str) -> bool {
        false
    }
    /// Kernel launches each step of entry `entry` makes, from this backend's lowering with no
    /// device (a source or a view makes none; a GEMM with a separate epilogue kernel, two).
    /// The default counts one per step that runs.
    fn launches(&self, program: &Program, entry: usize) -> std::result::Result<Vec<usize>, String> {
        let e = program.entries.get(entry).ok_or_else(|| format!("entry {entry} does not exist"))?;
        Ok(e.steps.iter().map(|s| usize::from(!matches!(s.kernel.as_str(), "source" | "view"))).collect())
    }
    /// Steps of entry `entry` whose launches run as one, as (step, the step at whose place the
    /// one launch runs): cuda, two launches of one kernel at the later step (`lower::merge`),
    /// (earlier, later), or (later, earlier) where a fused region moved back; cpu, a group of independent steps at its first (`cpu::group`), (member,
    /// first). The default: none.
    fn merged_launches(&self, _program: &Program, _entry: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
        Ok(Vec::new())
    }
    /// Steps of entry `entry` that make no launch of their own, their work done inside another
    /// step's launch, as (absorbed step, the step whose launch does it) (cpu: a KV-cache write
    /// inside the RoPE rotation it stores, `cpu::rotary`; cuda: K's and V's cache writes inside
    /// the decode attention, `lower::kv_write`). The default: none.
    fn absorbed_steps(&self, _program: &Program, _entry: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
        Ok(Vec::new())
    }
    /// Whether a permute whose readers are elementwise launches costs no launch of its own (the
    /// readers read its source through strides): the compile then stacks projections of
    /// different widths over many rows (`passes::stack_projections_rows`), a wide one read
    /// through such a permute. The default: no (a permute is a copy).
    fn reads_permutes_free(&self) -> bool {
        false
    }
    /// Renames step kernels that depend on the program's constants, not only on the step's
    /// types, once the whole program exists (cuda: a matmul by a constant signed permutation
    /// runs as one elementwise kernel). The default changes nothing.
    fn name_kernels(&self, _program: &mut Program) {}
    /// Prepares a program to run: weights placed, memory reserved.
    fn load(&self, program: &Program, weights: Arc<WeightStore>) -> Result<Box<dyn Executable>>;
}

/// A loaded program. `run` takes inputs and outputs in the entry's declared order, already
/// checked by the session against the declared types. The executable owns the program's
/// persistent state ([`kiln_graph::program::Slot::State`]), zeroed at load: an input that
/// lives in a state may be given as an empty slice (the state is read as it is) or in full
/// (the state is set to it first); an output named like a state may be an empty slice (it is
/// only stored in the state) or a full one (the stored value is also copied out).
pub trait Executable: Send {
    /// Runs entry `entry` writing each output into its buffer; allocates nothing.
    fn run(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<()>;
    /// Like `run`, recording each step's wall time in seconds into `times` (one per step).
    fn run_timed(&mut self, entry: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]], times: &mut Vec<f64>) -> Result<()>;
    /// Zeroes every state (an empty KV cache, as after load).
    fn reset_states(&mut self) -> Result<()>;
    /// Copies state `i`'s bytes into `out` (of the state's size).
    fn read_state(&mut self, i: usize, out: &mut [u8]) -> Result<()>;
    /// Reorders the batch rows of every state in place, on the device: afterwards row `r` of
    /// each state holds what its row `rows[r]` held (rows may repeat or be left out). The
    /// session checked that every state's leading axis has `rows.len()` rows and every index
    /// is below it.
    fn gather_state_rows(&mut self, rows: &[usize]) -> Result<()>;
    /// Seconds of each of `runs` executions of `entry` on the device alone: inputs uploaded
    /// before each run and outputs left on the device, as a peer framework is timed with its
    /// tensors already there. `None` where the backend computes in host memory (cpu), whose
    /// `run` has no transfers to leave out.
    fn time_device(&mut self, _entry: usize, _inputs: &[&[u8]], _runs: usize) -> Option<Result<Vec<f64>>> {
        None
    }
}

/// The backends this build has (`cube` runs CubeCL on wgpu, `cube-cuda` on CUDA).
pub const AVAILABLE: &[&str] = &[
    "cpu",
    #[cfg(feature = "cube")]
    "cube",
    #[cfg(feature = "cube-cuda")]
    "cube-cuda",
    #[cfg(feature = "cuda")]
    "cuda",
];

/// The backend called `name`.
pub fn by_name(name: &str) -> Result<Box<dyn Backend>> {
    match name {
        "cpu" => Ok(Box::new(crate::cpu::CpuBackend)),
        #[cfg(feature = "cube")]
        "cube" => Ok(Box::new(crate::cube::CubeBackend { device: crate::cube::Device::Wgpu })),
        #[cfg(feature = "cube-cuda")]
        "cube-cuda" => Ok(Box::new(crate::cube::CubeBackend { device: crate::cube::Device::Cuda })),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Box::new(crate::cuda::CudaBackend::default())),
        other => Err(crate::error::RuntimeError::Unsupported {
            backend: other.into(),
            msg: format!("unknown backend (available in this build: {})", AVAILABLE.join(", ")),
        }),
    }
}
