//! kiln's runtime: backends, the arena executor, memory-mapped weights and sessions.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod geometry;
mod kernel_enum;
pub mod memory;
pub mod prepared;
pub mod progress;
pub mod rotation;
pub mod session;
#[cfg(any(feature = "cube", feature = "cuda"))]
mod states;
pub mod tensor;
pub mod weights;

pub use backend::{by_name, Backend, Executable};
pub use error::{Result, RuntimeError};
pub use session::{InputView, Session};
pub use tensor::Tensor;
pub use weights::WeightStore;
