//! Products shared by elementwise functions, recomputed by each: `m = x op c` (`c` a
//! constant) read only by unary nodes of its shape (RoPE's `cos(emb)` and `sin(emb)` with
//! `emb = position * inv_freq`) gets one copy per reader, so that elementwise fusion makes
//! each reader and its copy one region: the product's own step and its round trip through
//! memory disappear, for one more operation per element in each reader. Each copy computes
//! the same value, so the result is exact.

use super::{copy_node, copy_outputs, same_type, Uses};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::Op;

/// Whether node `i` is such a shared product (see the module doc).
fn shared(g: &Graph, uses: &Uses, i: usize) -> bool {
    let n = &g.nodes[i];
    let readers = &uses.readers[i];
    matches!(n.op, Op::Binary(_))
        && n.ty.dtype.is_float()
        && !uses.is_output[i]
        && n.inputs.iter().any(|p| matches!(g.node(*p).op, Op::Constant { .. }))
        && readers.len() >= 2
        && readers.iter().all(|&r| matches!(g.nodes[r].op, Op::Unary(_)) && g.nodes[r].ty == n.ty)
}

/// Gives every reader of a shared product its own copy (see the module doc).
pub fn recompute_shared_products(g: &Graph) -> Result<Graph> {
    let uses = Uses::of(g);
    let is_shared: Vec<bool> = (0..g.nodes.len()).map(|i| shared(g, &uses, i)).collect();
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    // Whether a shared product's first copy has been taken by a reader.
    let mut taken = vec![false; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        let mut ins: Vec<NodeId> = node.inputs.iter().map(|p| map[p.index()]).collect();
        if let (Op::Unary(_), [p]) = (&node.op, node.inputs.as_slice()) {
            let p = p.index();
            if is_shared[p] && std::mem::replace(&mut taken[p], true) {
                let q = &g.nodes[p];
                let q_ins: Vec<NodeId> = q.inputs.iter().map(|x| map[x.index()]).collect();
                ins[0] = copy_node(&mut out, q, &q_ins)?;
            }
        }
        let id = copy_node(&mut out, node, &ins)?;
        same_type("recompute_shared_products", &out, i, node, id)?;
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
    use std::collections::HashMap;

    /// `m = x * c`, `cos(m)` and `sin(m)` outputs; with `extra`, `m` is also read by an add.
    fn graph(extra: bool) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 1]).unwrap();
        let c = g.constant(DType::F32, &[1, 4], vec![0.5, 1.25, -3.0, 7.0]).unwrap();
        let m = g.mul(x, c).unwrap();
        let a = g.unary(UnaryOp::Cos, m).unwrap();
        let b = g.unary(UnaryOp::Sin, m).unwrap();
        let b = if extra { g.add(b, m).unwrap() } else { b };
        g.output("cos", a);
        g.output("sin", b);
        g
    }

    fn count(g: &Graph, f: fn(&Op) -> bool) -> usize {
        g.nodes.iter().filter(|n| f(&n.op)).count()
    }

    fn same_values(a: &Graph, b: &Graph) {
        let x = Value::new(a.ty(NodeId(0)).clone(), vec![0.3, -1.7]).unwrap();
        let ins: HashMap<_, _> = [("x".to_string(), x)].into();
        let (ra, rb) = (run(a, &ins, &HashMap::new()).unwrap(), run(b, &ins, &HashMap::new()).unwrap());
        for k in ["cos", "sin"] {
            assert_eq!(ra[k].data, rb[k].data, "{k}");
        }
    }

    #[test]
    fn each_function_gets_its_product_and_fuses_with_it() {
        let g = graph(false);
        let out = recompute_shared_products(&g).unwrap();
        assert_eq!(count(&out, |op| matches!(op, Op::Binary(_))), 2);
        same_values(&g, &out);
        let fused = crate::passes::fuse_elementwise(&out).unwrap();
        assert_eq!(count(&fused, |op| matches!(op, Op::Binary(_))), 0);
        assert_eq!(count(&fused, |op| matches!(op, Op::Fused(_))), 2);
        same_values(&g, &fused);
    }

    #[test]
    fn a_product_read_otherwise_stays_shared() {
        let g = graph(true);
        assert_eq!(recompute_shared_products(&g).unwrap(), g);
    }
}
