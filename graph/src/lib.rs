//! kiln's IR and everything that works on it without a device: types, the builder, the
//! verifier, the printer, the reference interpreter, passes, the scheduler, the memory
//! planner, the lowered program and the artifact format.

pub mod artifact;
pub mod cost;
pub mod dtype;
pub mod error;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod lower;
pub mod npz;
pub mod op;
pub mod passes;
pub mod plan;
pub mod print;
pub mod program;
pub mod safetensors;
pub mod scalar;
pub mod sched;
pub mod verify;

pub use artifact::ArtifactError;
pub use dtype::{DType, TensorType};
pub use error::{GraphError, Result};
pub use graph::{Graph, Node, NodeId};
pub use op::{Attention, BinaryOp, Expr, Instr, MaskKind, Op, ReduceOp, ResizeMode, UnaryOp};
