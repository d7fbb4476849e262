//! The models crate's error type: every message names the file and the tensor or field.

use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong turning a checkpoint folder into a graph.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: field '{field}': {msg}")]
    Config { path: PathBuf, field: String, msg: String },
    #[error("{path}: not a readable weight file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{dir}: no tensor '{name}' in the checkpoint ({hint})")]
    MissingTensor { dir: PathBuf, name: String, hint: String },
    #[error("{path}: tensor '{name}' is {found}, expected {expected}")]
    TensorType { path: PathBuf, name: String, expected: String, found: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("building the graph: {0}")]
    Graph(#[from] kiln_graph::GraphError),
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
