//! The graph crate's error type.

use thiserror::Error;

/// Everything that can go wrong while building, checking, transforming or evaluating a graph.
#[derive(Debug, Error)]
pub enum GraphError {
    /// A shape or dtype rule refused a node's inputs.
    #[error("node %{node} ({op}): {msg}")]
    Type { node: usize, op: &'static str, msg: String },
    /// A node reads a node that does not come before it.
    #[error("node %{node} reads %{input}, which is not defined before it")]
    Order { node: usize, input: usize },
    /// The stored type of a node differs from what its rule gives.
    #[error("node %{node} ({op}) is typed {stored} but its rule gives {inferred}")]
    Mismatch { node: usize, op: &'static str, stored: String, inferred: String },
    /// An input value handed to the interpreter is missing or has the wrong type.
    #[error("input '{name}': {msg}")]
    Input { name: String, msg: String },
    /// A value error found while evaluating (an index out of range, say).
    #[error("node %{node} ({op}): {msg}")]
    Eval { node: usize, op: &'static str, msg: String },
    /// A pass failed.
    #[error("pass {pass}: {msg}")]
    Pass { pass: &'static str, msg: String },
    /// The graph is malformed in another way (duplicate output name, missing output, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T, E = GraphError> = std::result::Result<T, E>;
