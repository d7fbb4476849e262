//! Common-subexpression elimination: one node per distinct (op, inputs, type).

use super::{rebuild, Action};
use crate::dtype::TensorType;
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::Op;
use std::collections::HashMap;

/// Makes every node that repeats an earlier node's op, inputs and type read the earlier
/// one instead. Ops hold floats, so they are compared by their `Debug` text (exact for
/// f32/f64, and it tells `-0.0` from `0.0`). Commutative binary ops match with their
/// operands swapped. Inputs are never merged: each is part of the interface.
pub fn cse(g: &Graph) -> Result<Graph> {
    let n = g.nodes.len();
    let mut actions = vec![Action::Keep; n];
    // The surviving node each node stands for.
    let mut rep: Vec<NodeId> = (0..n as u32).map(NodeId).collect();
    let mut seen: HashMap<(String, Vec<NodeId>, TensorType), NodeId> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        if matches!(node.op, Op::Input { .. }) {
            continue;
        }
        let mut inputs: Vec<NodeId> = node.inputs.iter().map(|p| rep[p.index()]).collect();
        if let Op::Binary(b) = node.op {
            if b.is_commutative() {
                inputs.sort();
            }
        }
        let key = (format!("{:?}", node.op), inputs, node.ty.clone());
        match seen.get(&key) {
            Some(&first) => {
                actions[i] = Action::Alias(first);
                rep[i] = first;
            }
            None => {
                seen.insert(key, NodeId(i as u32));
            }
        }
    }
    rebuild("cse", g, actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::UnaryOp;

    #[test]
    fn merges_duplicate_subtrees_and_swapped_operands() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2]).unwrap();
        let w = g.weight("w", DType::F32, &[2]).unwrap();
        let a1 = g.add(x, w).unwrap();
        let e1 = g.unary(UnaryOp::Exp, a1).unwrap();
        let a2 = g.add(w, x).unwrap();
        let e2 = g.unary(UnaryOp::Exp, a2).unwrap();
        let y = g.mul(e1, e2).unwrap();
        g.output("y", y);
        let out = cse(&g).unwrap();
        assert_eq!(out.nodes.len(), 5);
        assert_eq!(out.nodes[4].inputs, vec![NodeId(3), NodeId(3)]);
    }

    #[test]
    fn inputs_of_the_same_type_stay_apart() {
        let mut g = Graph::new();
        let a = g.input("a", DType::F32, &[2]).unwrap();
        let b = g.input("b", DType::F32, &[2]).unwrap();
        let ea = g.unary(UnaryOp::Exp, a).unwrap();
        let eb = g.unary(UnaryOp::Exp, b).unwrap();
        g.output("ea", ea);
        g.output("eb", eb);
        assert_eq!(cse(&g).unwrap(), g);
    }

    #[test]
    fn constants_merge_by_exact_value() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[]).unwrap();
        let z1 = g.scalar(DType::F32, 0.0).unwrap();
        let z2 = g.scalar(DType::F32, -0.0).unwrap();
        let z3 = g.scalar(DType::F32, 0.0).unwrap();
        let a = g.add(x, z1).unwrap();
        let b = g.add(x, z2).unwrap();
        let c = g.add(x, z3).unwrap();
        g.output("a", a);
        g.output("b", b);
        g.output("c", c);
        let out = cse(&g).unwrap();
        assert_eq!(out.outputs[0].1, out.outputs[2].1);
        assert_ne!(out.outputs[0].1, out.outputs[1].1);
    }
}
