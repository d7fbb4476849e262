//! Casts moved past reshapes, next to the node they can fuse with. A cast and a reshape
//! commute exactly (a reshape moves no value), so `cast(reshape(y))` with `y` a matmul or an
//! elementwise node becomes `reshape(cast(y))`, and the cast can join `y`'s region or epilogue
//! (a bf16 head's logits cast to f32 for sampling); and `reshape(cast(x))` with `x` anything
//! else (an i64 `position_ids` input) becomes `cast(reshape(x))`, so the cast sits beside the
//! elementwise nodes that read it (RoPE's angles) and is computed inside their region.

use super::{copy_node, copy_outputs, same_type, Uses};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::Op;

fn fusible(op: &Op) -> bool {
    matches!(op, Op::MatMul { .. } | Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Fused(_) | Op::Cast { .. })
}

fn is_reshape(g: &Graph, i: usize) -> bool {
    matches!(g.nodes[i].op, Op::Reshape { .. })
}

/// What happens to one node of the old graph.
#[derive(Clone, Copy, PartialEq)]
enum Move {
    Keep,
    /// Copied, then cast to the dtype (its readers, reshapes, change type).
    CastAfter(crate::DType),
    /// Not copied: its readers read its input (a cast moved elsewhere).
    Skip,
}

/// Moves casts past chains of reshapes (see the module doc).
pub fn casts_past_reshapes(g: &Graph) -> Result<Graph> {
    let uses = Uses::of(g);
    let n = g.nodes.len();
    let mut moves = vec![Move::Keep; n];
    // Nodes whose type changes (a reshape in a moved chain, a producer followed by its cast).
    let mut retyped = vec![false; n];
    for (c, node) in g.nodes.iter().enumerate() {
        let Op::Cast { to } = node.op else { continue };
        if !to.is_float() || node.inputs.len() != 1 {
            continue;
        }
        // Up: cast(reshape(..reshape(y))), each reshape read only by the next.
        let mut chain = Vec::new();
        let mut p = node.inputs[0].index();
        while is_reshape(g, p) && uses.sole_reader(p) == Some(chain.last().copied().unwrap_or(c)) {
            chain.push(p);
            p = g.nodes[p].inputs[0].index();
        }
        if !chain.is_empty() && fusible(&g.nodes[p].op) && uses.sole_reader(p) == chain.last().copied() && moves[p] == Move::Keep {
            moves[p] = Move::CastAfter(to);
            moves[c] = Move::Skip;
            retyped[p] = true;
            chain.iter().for_each(|&r| retyped[r] = true);
            continue;
        }
        // Down: reshape(..reshape(cast(x))) with x not fusible, the last reshape read by an
        // elementwise node.
        if fusible(&g.nodes[node.inputs[0].index()].op) || uses.is_output[c] {
            continue;
        }
        let mut last = c;
        let mut chain = Vec::new();
        while let Some(r) = uses.sole_reader(last).filter(|&r| is_reshape(g, r)) {
            chain.push(r);
            last = r;
        }
        let feeds_elementwise = uses.readers[last].iter().any(|&r| g.nodes[r].op.is_elementwise());
        if chain.is_empty() || !feeds_elementwise {
            continue;
        }
        moves[c] = Move::Skip;
        retyped[c] = true;
        moves[last] = Move::CastAfter(to);
        chain.iter().for_each(|&r| retyped[r] = true);
        retyped[last] = false;
    }
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(n);
    for (i, node) in g.nodes.iter().enumerate() {
        let ins: Vec<NodeId> = node.inputs.iter().map(|p| map[p.index()]).collect();
        let id = match moves[i] {
            Move::Skip => ins[0],
            Move::Keep => copy_node(&mut out, node, &ins)?,
            Move::CastAfter(to) => {
                let x = copy_node(&mut out, node, &ins)?;
                out.push(Op::Cast { to }, &[x])?
            }
        };
        if !retyped[i] {
            same_type("casts_past_reshapes", &out, i, node, id)?;
        }
        map.push(id);
    }
    copy_outputs(g, &mut out, &map);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::interp::{run, Value};
    use crate::op::UnaryOp;
    use crate::print::print;
    use std::collections::HashMap;

    fn val(d: DType, shape: &[usize], data: Vec<f64>) -> Value {
        Value::new(crate::dtype::TensorType::new(d, shape.to_vec()), data).unwrap()
    }

    fn same_outputs(a: &Graph, b: &Graph, inputs: &HashMap<String, Value>) {
        let w = HashMap::new();
        let (x, y) = (run(a, inputs, &w).unwrap(), run(b, inputs, &w).unwrap());
        assert_eq!(x, y);
    }

    #[test]
    fn a_cast_moves_up_to_its_producer_and_down_to_its_readers() {
        let mut g = Graph::new();
        let pos = g.input("pos", DType::I64, &[1, 4]).unwrap();
        let x = g.input("x", DType::BF16, &[4, 3]).unwrap();
        let f = g.push(Op::Cast { to: DType::F32 }, &[pos]).unwrap();
        let r = g.reshape(f, &[4, 1]).unwrap();
        let c = g.input("c", DType::F32, &[1, 3]).unwrap();
        let a = g.mul(r, c).unwrap();
        let e = g.unary(UnaryOp::Exp, x).unwrap();
        let er = g.reshape(e, &[12]).unwrap();
        let ef = g.push(Op::Cast { to: DType::F32 }, &[er]).unwrap();
        g.output("a", a);
        g.output("e", ef);
        let out = casts_past_reshapes(&g).unwrap();
        let p = print(&out);
        assert!(p.contains("reshape[[4, 1]](%0) : i64[4,1]"), "{p}");
        assert!(p.contains("cast[f32](%2) : f32[4,1]"), "{p}");
        assert!(p.contains("cast[f32](%6) : f32[4,3]"), "{p}");
        assert!(p.contains("reshape[[12]](%7) : f32[12]"), "{p}");
        let mut inputs = HashMap::new();
        inputs.insert("pos".to_string(), val(DType::I64, &[1, 4], vec![0.0, 1.0, 2.0, 3.0]));
        inputs.insert("x".to_string(), val(DType::BF16, &[4, 3], (0..12).map(|i| DType::BF16.round(i as f64 * 0.37 - 2.0)).collect()));
        inputs.insert("c".to_string(), val(DType::F32, &[1, 3], vec![0.1, 0.2, 0.3]));
        same_outputs(&g, &out, &inputs);
    }
}
