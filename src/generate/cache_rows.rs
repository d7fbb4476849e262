//! The prefill of a generation whose prompts each decode several rows (samples, beams): built
//! for the prompts' rows, it writes them into the first rows of the whole cache.

use crate::Result;
use kiln_graph::{DType, Graph, Node, NodeId, Op};

/// A prefill built for fewer rows than the cache's `rows`: its cache inputs become the whole
/// `[rows, ..]` states, of which it reads and rewrites the first rows (its K/V rows written in
/// place there); the rows after them keep what they held, for
/// [`kiln_runtime::Session::gather_state_rows`] to overwrite.
pub(super) fn pad_cache_rows(g: Graph, rows: usize) -> Result<Graph> {
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    let mut states: Vec<(String, NodeId)> = vec![];
    for node in &g.nodes {
        let id = match &node.op {
            Op::Input { name } if name.starts_with("cache.") => {
                let mut shape = node.ty.shape.to_vec();
                let few = shape[0];
                shape[0] = rows;
                let whole = out.input(name, node.ty.dtype, &shape)?;
                states.push((name.clone(), whole));
                out.slice(whole, 0, 0, few)?
            }
            _ => {
                let inputs = node.inputs.iter().map(|i| map[i.index()]).collect();
                out.nodes.push(Node { op: node.op.clone(), inputs, ty: node.ty.clone() });
                NodeId(out.nodes.len() as u32 - 1)
            }
        };
        map.push(id);
    }
    let zero = out.constant(DType::I64, &[1], vec![0.0])?;
    for (name, id) in &g.outputs {
        let id = map[id.index()];
        let id = match states.iter().find(|(n, _)| n == name) {
            Some(&(_, whole)) => out.write_slice(whole, id, zero, 0)?,
            None => id,
        };
        out.output(name.clone(), id);
    }
    Ok(out)
}
