//! Constant folding: evaluate small all-constant subgraphs with the interpreter, and drop
//! arithmetic identities (`x * 1`, `x + 0`, ...).

use super::{rebuild, Action};
use crate::error::Result;
use crate::graph::{Graph, Node, NodeId};
use crate::interp;
use crate::op::{BinaryOp, Op};
use std::collections::HashMap;

/// The largest tensor (in elements) folding reads or produces: bigger results would be
/// baked into the artifact where computing them at run time is cheaper.
pub const MAX_FOLD_ELEMENTS: usize = 1 << 16;

/// Replaces every node whose inputs are all constants (or iotas) by a constant holding its
/// value, when that value has at most [`MAX_FOLD_ELEMENTS`] elements; then makes `x + 0`,
/// `x - 0`, `x * 1`, `1 * x`, `x / 1` read `x` when that does not change the result's type.
/// A node whose evaluation fails (an index out of range, say) is left for run time to report.
pub fn constant_fold(g: &Graph) -> Result<Graph> {
    let n = g.nodes.len();
    let mut actions = vec![Action::Keep; n];
    // The values of nodes folded so far (source constants are read from the graph).
    let mut folded: Vec<Option<Vec<f64>>> = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let source = node.op.is_source() || matches!(node.op, Op::Iota { .. });
        if source {
            continue;
        }
        if let Some(values) = fold(g, &folded, node) {
            actions[i] = Action::Replace { op: Op::Constant { values: values.clone() }, inputs: vec![] };
            folded[i] = Some(values);
        } else if let Some(x) = identity(g, &folded, node) {
            actions[i] = Action::Alias(x);
        }
    }
    rebuild("constant_fold", g, actions)
}

/// The value of a node known at compile time, if it is small enough to handle.
fn known(g: &Graph, folded: &[Option<Vec<f64>>], id: NodeId) -> Option<Vec<f64>> {
    let node = g.node(id);
    if node.ty.numel() > MAX_FOLD_ELEMENTS {
        return None;
    }
    if let Some(v) = &folded[id.index()] {
        return Some(v.clone());
    }
    match &node.op {
        Op::Constant { values } => Some(values.clone()),
        Op::Iota { .. } => evaluate(node, &[]),
        _ => None,
    }
}

/// The value of `node` when all its inputs are known.
fn fold(g: &Graph, folded: &[Option<Vec<f64>>], node: &Node) -> Option<Vec<f64>> {
    if node.inputs.is_empty() || node.ty.numel() > MAX_FOLD_ELEMENTS {
        return None;
    }
    let args = node.inputs.iter().map(|&p| known(g, folded, p).map(|v| (p, v))).collect::<Option<Vec<_>>>()?;
    let args: Vec<_> = args.into_iter().map(|(p, v)| (g.node(p), v)).collect();
    evaluate(node, &args)
}

/// Evaluates one node on constant arguments with the reference interpreter, so folding
/// agrees with it bit for bit (including the rounding to the node's dtype).
fn evaluate(node: &Node, args: &[(&Node, Vec<f64>)]) -> Option<Vec<f64>> {
    let mut mini = Graph::new();
    let mut ids = Vec::with_capacity(args.len());
    for (arg, values) in args {
        ids.push(mini.push_source(Op::Constant { values: values.clone() }, arg.ty.clone()).ok()?);
    }
    let id =
        if ids.is_empty() { mini.push_source(node.op.clone(), node.ty.clone()).ok()? } else { mini.push(node.op.clone(), &ids).ok()? };
    mini.output("value", id);
    let mut out = interp::run(&mini, &HashMap::new(), &HashMap::new()).ok()?;
    out.remove("value").map(|v| v.data)
}

/// The operand `node` equals when it is an arithmetic identity of the same type.
/// (`x + 0` turns `-0` into `+0`; like XLA we accept that.)
fn identity(g: &Graph, folded: &[Option<Vec<f64>>], node: &Node) -> Option<NodeId> {
    let Op::Binary(op) = node.op else { return None };
    let (a, b) = (*node.inputs.first()?, *node.inputs.get(1)?);
    let all = |id: NodeId, c: f64| known(g, folded, id).is_some_and(|v| v.iter().all(|&x| x == c));
    let same = |id: NodeId| g.ty(id) == &node.ty;
    let pick = match op {
        BinaryOp::Add if all(b, 0.0) => a,
        BinaryOp::Add if all(a, 0.0) => b,
        BinaryOp::Sub if all(b, 0.0) => a,
        BinaryOp::Mul if all(b, 1.0) => a,
        BinaryOp::Mul if all(a, 1.0) => b,
        BinaryOp::Div if all(b, 1.0) => a,
        BinaryOp::Add
        | BinaryOp::Sub
        | BinaryOp::Mul
        | BinaryOp::Div
        | BinaryOp::Max
        | BinaryOp::Min
        | BinaryOp::Pow
        | BinaryOp::Eq
        | BinaryOp::Ne
        | BinaryOp::Lt
        | BinaryOp::Le
        | BinaryOp::Gt
        | BinaryOp::Ge
        | BinaryOp::And
        | BinaryOp::Or => return None,
    };
    same(pick).then_some(pick)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{DType, TensorType};
    use crate::op::UnaryOp;

    #[test]
    fn folds_constant_chains_and_keeps_inputs() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[3]).unwrap();
        let c = g.constant(DType::F32, &[3], vec![1.0, 2.0, 3.0]).unwrap();
        let two = g.scalar(DType::F32, 2.0).unwrap();
        let c2 = g.mul(c, two).unwrap();
        let e = g.unary(UnaryOp::Neg, c2).unwrap();
        let y = g.add(x, e).unwrap();
        g.output("y", y);
        let out = super::super::dead_code(&constant_fold(&g).unwrap()).unwrap();
        assert_eq!(out.nodes.len(), 3);
        assert_eq!(out.nodes[1].op, Op::Constant { values: vec![-2.0, -4.0, -6.0] });
        assert!(matches!(out.nodes[2].op, Op::Binary(BinaryOp::Add)));
    }

    #[test]
    fn iota_feeds_folding_but_large_results_stay() {
        let mut g = Graph::new();
        let small = g.push_source(Op::Iota { axis: 0, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, [4])).unwrap();
        let one = g.scalar(DType::F32, 1.0).unwrap();
        let s = g.add(small, one).unwrap();
        let big_shape = [MAX_FOLD_ELEMENTS + 1];
        let big = g.push_source(Op::Iota { axis: 0, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, big_shape)).unwrap();
        let b = g.unary(UnaryOp::Neg, big).unwrap();
        g.output("s", s);
        g.output("b", b);
        let out = constant_fold(&g).unwrap();
        let s_new = out.outputs[0].1;
        assert_eq!(out.node(s_new).op, Op::Constant { values: vec![1.0, 2.0, 3.0, 4.0] });
        let b_new = out.outputs[1].1;
        assert!(matches!(out.node(b_new).op, Op::Unary(UnaryOp::Neg)));
    }

    #[test]
    fn identities_only_when_the_type_is_kept() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2]).unwrap();
        let one = g.scalar(DType::F32, 1.0).unwrap();
        let y = g.mul(x, one).unwrap();
        let ones = g.constant(DType::F32, &[2, 2], vec![1.0; 4]).unwrap();
        let z = g.mul(x, ones).unwrap(); // broadcasts x up: not an identity
        g.output("y", y);
        g.output("z", z);
        let out = constant_fold(&g).unwrap();
        assert_eq!(out.outputs[0].1, NodeId(0));
        assert!(matches!(out.node(out.outputs[1].1).op, Op::Binary(BinaryOp::Mul)));
    }
}
