//! kiln's IR and everything that works on it without a device: types, the builder, the
//! verifier, the printer, the reference interpreter, passes, the scheduler, the memory
//! planner, the lowered program and the artifact format.
//!
//! The default feature `compiler` holds the stages that turn a graph into a program (passes,
//! verifier, scheduler, planner, lowering, printer); without it the crate is the part a
//! runtime links (IR, interpreter, program, artifact).

pub mod artifact;
pub mod compose;
pub mod cost;
pub mod dtype;
pub mod error;
pub mod expr;
pub mod graph;
pub mod infer;
pub mod interp;
#[cfg(feature = "compiler")]
pub mod lower;
pub mod npz;
pub mod op;
#[cfg(feature = "compiler")]
pub mod passes;
#[cfg(feature = "compiler")]
pub mod plan;
#[cfg(feature = "compiler")]
pub mod print;
pub mod program;
pub mod safetensors;
pub mod sample;
pub mod scalar;
#[cfg(feature = "compiler")]
pub mod sched;
pub mod tuning;
pub mod validate;
#[cfg(feature = "compiler")]
pub mod verify;

pub use artifact::ArtifactError;
pub use dtype::{DType, TensorType};
pub use error::{GraphError, Result};
pub use graph::{Graph, Node, NodeId};
// Every op type (an op's attribute struct included) at the crate root.
pub use op::*;
