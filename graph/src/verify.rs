//! The verifier: every node's inputs come before it and its stored type is what its rule gives.

use crate::error::{GraphError, Result};
use crate::graph::Graph;
use crate::infer::infer;
use std::collections::HashSet;

/// Checks the whole graph; the first problem found is the error.
pub fn verify(g: &Graph) -> Result<()> {
    let mut names = HashSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for id in &n.inputs {
            if id.index() >= i {
                return Err(GraphError::Order { node: i, input: id.index() });
            }
        }
        let tys: Vec<_> = n.inputs.iter().map(|id| &g.nodes[id.index()].ty).collect();
        let given = n.op.is_source() || matches!(n.op, crate::op::Op::Iota { .. });
        let ty = infer(&n.op, &tys, given.then_some(&n.ty)).map_err(|msg| GraphError::Type { node: i, op: n.op.name(), msg })?;
        if ty != n.ty {
            return Err(GraphError::Mismatch { node: i, op: n.op.name(), stored: n.ty.to_string(), inferred: ty.to_string() });
        }
        if let crate::op::Op::Input { name } = &n.op {
            if !names.insert(name.clone()) {
                return Err(GraphError::Invalid(format!("input '{name}' is defined twice")));
            }
        }
    }
    let mut outs = HashSet::new();
    for (name, id) in &g.outputs {
        if id.index() >= g.nodes.len() {
            return Err(GraphError::Invalid(format!("output '{name}' names %{} of {} nodes", id.0, g.nodes.len())));
        }
        if !outs.insert(name) {
            return Err(GraphError::Invalid(format!("output '{name}' is named twice")));
        }
    }
    Ok(())
}
