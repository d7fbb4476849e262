//! Composing graphs: one graph's nodes copied into another (an ensemble runs several models'
//! graphs as one program, so the scheduler and the memory planner see them all at once).

use crate::error::{GraphError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::Op;

/// Copies every node of `src` into `dst` and gives `src`'s outputs as nodes of `dst`, in order.
/// Each input of `src` becomes the node `bind(name)` of `dst`, which must have the input's type;
/// each weight `w` becomes weight `prefix + w`. Nodes the caller does not use stay dead and
/// the dead-code pass removes them.
pub fn inline(dst: &mut Graph, src: &Graph, bind: &dyn Fn(&str) -> Option<NodeId>, prefix: &str) -> Result<Vec<(String, NodeId)>> {
    let mut map: Vec<NodeId> = Vec::with_capacity(src.nodes.len());
    for (i, n) in src.nodes.iter().enumerate() {
        let id = match &n.op {
            Op::Input { name } => {
                let to = bind(name).ok_or_else(|| GraphError::Type {
                    node: i,
                    op: "input",
                    msg: format!("input '{name}' {} is not bound", n.ty),
                })?;
                if dst.ty(to) != &n.ty {
                    let msg = format!("input '{name}' is {}, bound to a node of type {}", n.ty, dst.ty(to));
                    return Err(GraphError::Type { node: i, op: "input", msg });
                }
                to
            }
            Op::Weight { name } => dst.push_source(Op::Weight { name: format!("{prefix}{name}") }, n.ty.clone())?,
            op if n.inputs.is_empty() => dst.push_source(op.clone(), n.ty.clone())?,
            op => {
                let ins: Vec<NodeId> = n.inputs.iter().map(|x| map[x.index()]).collect();
                dst.push(op.clone(), &ins)?
            }
        };
        map.push(id);
    }
    Ok(src.outputs.iter().map(|(name, id)| (name.clone(), map[id.index()])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{run, Value};
    use crate::{DType, TensorType};
    use std::collections::HashMap;

    /// `y = x @ w^T + 1` inlined twice into one graph reads each copy's weights under its
    /// prefix and computes what the graph alone computes.
    #[test]
    fn inlined_graph_computes_the_same() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]).unwrap();
        let w = g.weight("w", DType::F32, &[4, 3]).unwrap();
        let y = g.matmul(x, w, true).unwrap();
        let one = g.scalar(DType::F32, 1.0).unwrap();
        let y = g.add(y, one).unwrap();
        g.output("y", y);

        let mut e = Graph::new();
        let xe = e.input("images", DType::F32, &[2, 3]).unwrap();
        let a = inline(&mut e, &g, &|n| (n == "x").then_some(xe), "m0/").unwrap();
        let b = inline(&mut e, &g, &|n| (n == "x").then_some(xe), "m1/").unwrap();
        e.output("a", a[0].1);
        e.output("b", b[0].1);
        let names: Vec<&str> = e.weights().map(|(_, n, _)| n).collect();
        assert_eq!(names, ["m0/w", "m1/w"]);

        let hm = |v: Vec<(&str, Value)>| v.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<HashMap<_, _>>();
        let xv = Value::new(TensorType::new(DType::F32, [2, 3]), (0..6).map(|i| i as f64 * 0.5).collect()).unwrap();
        let wv = Value::new(TensorType::new(DType::F32, [4, 3]), (0..12).map(|i| i as f64 - 4.0).collect()).unwrap();
        let alone = run(&g, &hm(vec![("x", xv.clone())]), &hm(vec![("w", wv.clone())])).unwrap();
        let both = run(&e, &hm(vec![("images", xv)]), &hm(vec![("m0/w", wv.clone()), ("m1/w", wv)])).unwrap();
        assert_eq!(alone["y"].data, both["a"].data);
        assert_eq!(alone["y"].data, both["b"].data);
    }

    #[test]
    fn unbound_or_mistyped_inputs_are_refused() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]).unwrap();
        g.output("x", x);
        let mut e = Graph::new();
        let z = e.input("z", DType::F32, &[3, 2]).unwrap();
        let msg = inline(&mut e, &g, &|_| None, "").unwrap_err().to_string();
        assert!(msg.contains("input 'x'") && msg.contains("not bound"), "{msg}");
        let msg = inline(&mut e, &g, &|_| Some(z), "").unwrap_err().to_string();
        assert!(msg.contains("bound to a node of type"), "{msg}");
    }
}
