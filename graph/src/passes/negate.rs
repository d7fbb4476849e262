//! Negations through concatenations: `concat(.., neg(a), ..)` becomes
//! `concat(.., a, ..) * sign`, with `sign` a constant of ±1 along the concat axis (broadcast
//! over the other axes). The negation's step disappears and the multiply joins the reader's
//! elementwise region: RoPE's `rotate_half(x) = concat(-x2, x1)` loses a launch per use.

use super::{copy_node, copy_outputs, same_type, Uses};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::{BinaryOp, Op, UnaryOp};

/// Moves every negation read only by one float concat past it (see the module doc).
pub fn negation_through_concat(g: &Graph) -> Result<Graph> {
    let uses = Uses::of(g);
    // The negations absorbed by the concat that alone reads them.
    let absorbed: Vec<bool> = (0..g.nodes.len())
        .map(|i| {
            let n = &g.nodes[i];
            matches!(n.op, Op::Unary(UnaryOp::Neg))
                && n.ty.dtype.is_float()
                && uses.sole_reader(i).is_some_and(|r| matches!(g.nodes[r].op, Op::Concat { .. }))
        })
        .collect();
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    for (i, node) in g.nodes.iter().enumerate() {
        if absorbed[i] {
            // Only the concat reads it: it reads the operand and the sign restores the value.
            map.push(map[node.inputs[0].index()]);
            continue;
        }
        let ins: Vec<NodeId> = node.inputs.iter().map(|p| map[p.index()]).collect();
        let id = match &node.op {
            Op::Concat { axis } if node.inputs.iter().any(|p| absorbed[p.index()]) => {
                let cat = out.push(node.op.clone(), &ins)?;
                let mut signs = Vec::with_capacity(node.ty.shape[*axis]);
                for p in &node.inputs {
                    let s = if absorbed[p.index()] { -1.0 } else { 1.0 };
                    signs.extend(std::iter::repeat_n(s, g.ty(*p).shape[*axis]));
                }
                let mut shape = vec![1; node.ty.rank()];
                shape[*axis] = signs.len();
                let sign = out.constant(node.ty.dtype, &shape, signs)?;
                out.push(Op::Binary(BinaryOp::Mul), &[cat, sign])?
            }
            _ => copy_node(&mut out, node, &ins)?,
        };
        same_type("negation_through_concat", &out, i, node, id)?;
        map.push(id);
    }
    copy_outputs(g, &mut out, &map);
    Ok(out)
}
