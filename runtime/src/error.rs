//! The runtime's error type.

use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong loading or running a program.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    #[error("weight '{name}': {msg}")]
    Weight { name: String, msg: String },
    #[error("input '{name}': {msg}")]
    Input { name: String, msg: String },
    #[error("output '{name}': {msg}")]
    Output { name: String, msg: String },
    #[error("no entry '{name}' in this program (it has: {have})")]
    Entry { name: String, have: String },
    #[error("backend {backend}: {msg}")]
    Unsupported { backend: String, msg: String },
    #[error("invalid program (corrupt or hand-made artifact?): {0}")]
    Invalid(String),
    #[error("out of memory: {0}")]
    Memory(String),
    #[error("step {step} ({op}): {msg}")]
    Step { step: usize, op: &'static str, msg: String },
    #[error(transparent)]
    Graph(#[from] kiln_graph::GraphError),
    #[error(transparent)]
    Artifact(#[from] kiln_graph::artifact::ArtifactError),
}

/// Result alias for this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
