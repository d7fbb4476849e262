//! Elementwise fusion: maximal regions of elementwise nodes become one `Fused` node.

use super::{rebuild, scalar_constant, Action, ExprBuilder, Uses};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::infer::infer;
use crate::op::{Expr, Instr, Op};
use std::collections::HashMap;

/// Groups elementwise nodes (unary, binary, select, fused, and broadcasts that only feed
/// them) into regions and replaces each region of two or more nodes by one `Fused` node
/// over the region's external inputs, deduplicated; lone nodes stay as they are.
///
/// A region has a float root; every member has the root's shape (inputs broadcast up to
/// it); a member other than the root is read only inside the region, so its value is never
/// needed in memory; bool values (masks) may live inside; integer ops stay out.
/// One-element constants become `Const` instructions.
pub fn fuse_elementwise(g: &Graph) -> Result<Graph> {
    let n = g.nodes.len();
    let uses = Uses::of(g);
    // group[i]: the root of the region node i belongs to. Readers come after a node, so
    // walking backwards sees every reader's region before the node decides to join it.
    let mut group: Vec<Option<usize>> = vec![None; n];
    for i in (0..n).rev() {
        if !candidate(g, i) {
            continue;
        }
        if let Some(r) = joinable(g, &uses, &group, i) {
            group[i] = Some(r);
        } else if g.nodes[i].ty.dtype.is_float() && !is_broadcast(g, i) {
            group[i] = Some(i);
        }
    }
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, r) in group.iter().enumerate() {
        if let Some(r) = r {
            members[*r].push(i);
        }
    }
    let mut actions = vec![Action::Keep; n];
    for (root, m) in members.iter().enumerate() {
        if m.len() < 2 {
            continue;
        }
        // If the full region does not type as its root (all inputs smaller than the root
        // once broadcasts are inlined, say), keep the broadcasts, then the constants, out.
        let region =
            [(true, true), (false, true), (false, false)].into_iter().find_map(|(broadcasts, consts)| build(g, m, broadcasts, consts));
        if let Some(region) = region {
            for &x in &region.inside {
                actions[x] = Action::Drop;
            }
            actions[root] = Action::Replace { op: region.op, inputs: region.inputs };
        }
    }
    rebuild("fuse_elementwise", g, actions)
}

/// Whether node `i` may be part of a region at all.
fn candidate(g: &Graph, i: usize) -> bool {
    let node = &g.nodes[i];
    let float_or_bool = |id: &NodeId| {
        let d = g.ty(*id).dtype;
        d.is_float() || d == crate::DType::Bool
    };
    let op_ok = matches!(node.op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Fused(_) | Op::Broadcast { .. });
    op_ok && float_or_bool(&NodeId(i as u32)) && node.inputs.iter().all(float_or_bool)
}

fn is_broadcast(g: &Graph, i: usize) -> bool {
    matches!(g.nodes[i].op, Op::Broadcast { .. })
}

/// The region node `i` joins: the one all its readers are in, when it has the root's shape,
/// is not an output, and no reader is a broadcast (a broadcast's operand is never a member).
fn joinable(g: &Graph, uses: &Uses, group: &[Option<usize>], i: usize) -> Option<usize> {
    if uses.is_output[i] {
        return None;
    }
    let readers = &uses.readers[i];
    let r = group[*readers.first()?]?;
    let all_inside = readers.iter().all(|&u| group[u] == Some(r) && !is_broadcast(g, u));
    (all_inside && g.nodes[i].ty.shape == g.nodes[r].ty.shape).then_some(r)
}

/// A region ready to replace its root.
struct Region {
    op: Op,
    inputs: Vec<NodeId>,
    /// Members other than the root that are now computed inside the fused node.
    inside: Vec<usize>,
}

/// The fused node for region `members` (ascending; the root last), with broadcasts and
/// one-element constants inlined or not; `None` unless it types exactly as the root.
fn build(g: &Graph, members: &[usize], broadcasts: bool, consts: bool) -> Option<Region> {
    let root = *members.last()?;
    let inside: Vec<usize> = members.iter().copied().filter(|&m| broadcasts || !is_broadcast(g, m)).collect();
    if inside.len() < 2 {
        return None;
    }
    let mut b = ExprBuilder::default();
    // The instruction holding each member's or external operand's value.
    let mut val: HashMap<usize, u16> = HashMap::new();
    let mut inputs: Vec<NodeId> = Vec::new();
    for &m in &inside {
        let node = &g.nodes[m];
        let mut args = Vec::with_capacity(node.inputs.len());
        for &q in &node.inputs {
            let v = match val.get(&q.index()) {
                Some(&v) => v,
                None => {
                    let ins = match scalar_constant(g, q).filter(|_| consts) {
                        Some(c) => Instr::Const(c),
                        None => {
                            inputs.push(q);
                            Instr::Input(u16::try_from(inputs.len() - 1).ok()?)
                        }
                    };
                    let v = b.push(ins)?;
                    val.insert(q.index(), v);
                    v
                }
            };
            args.push(v);
        }
        let v = match (&node.op, args.as_slice()) {
            (Op::Unary(u), &[x]) => b.push(Instr::Unary(*u, x))?,
            (Op::Binary(op), &[x, y]) => b.push(Instr::Binary(*op, x, y))?,
            (Op::Select, &[c, x, y]) => b.push(Instr::Select(c, x, y))?,
            (Op::Fused(e), _) => b.inline(e, &args)?,
            (Op::Broadcast { .. }, &[x]) => x,
            _ => return None,
        };
        val.insert(m, v);
    }
    let (expr, inputs) = renumber(b.finish(*val.get(&root)?)?, inputs);
    let op = Op::Fused(expr);
    let tys: Vec<_> = inputs.iter().map(|&q| g.ty(q)).collect();
    if infer(&op, &tys, None).ok().as_ref() != Some(&g.nodes[root].ty) {
        return None;
    }
    let inside = inside.into_iter().filter(|&m| m != root).collect();
    Some(Region { op, inputs, inside })
}

/// Renumbers a region's inputs in the order its printed formula first mentions them, so
/// `kiln inspect` reads `f($0, $1, ..)` left to right.
fn renumber(e: Expr, inputs: Vec<NodeId>) -> (Expr, Vec<NodeId>) {
    let mut order: Vec<u16> = Vec::new();
    let mut visited = vec![false; e.instrs.len()];
    // Preorder, left operand first: the order `expr_to_string` prints in.
    let mut stack: Vec<u16> = e.instrs.len().checked_sub(1).and_then(|i| u16::try_from(i).ok()).into_iter().collect();
    while let Some(i) = stack.pop() {
        let i = i as usize;
        if std::mem::replace(&mut visited[i], true) {
            continue;
        }
        match e.instrs[i] {
            Instr::Input(k) => {
                if !order.contains(&k) {
                    order.push(k);
                }
            }
            Instr::Const(_) => {}
            Instr::Unary(_, a) => stack.push(a),
            Instr::Binary(_, a, b) => stack.extend([b, a]),
            Instr::Select(c, a, b) => stack.extend([b, a, c]),
        }
    }
    let mut new_of = vec![u16::MAX; inputs.len()];
    for (new, &old) in order.iter().enumerate() {
        if let Some(slot) = new_of.get_mut(old as usize) {
            *slot = new as u16;
        }
    }
    let instrs = e
        .instrs
        .into_iter()
        .map(|ins| match ins {
            Instr::Input(k) => Instr::Input(new_of.get(k as usize).copied().unwrap_or(k)),
            other => other,
        })
        .collect();
    let inputs = order.iter().filter_map(|&k| inputs.get(k as usize).copied()).collect();
    (Expr { instrs }, inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::{BinaryOp, UnaryOp};
    use crate::print::print;

    #[test]
    fn a_value_read_outside_splits_regions() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]).unwrap();
        let e = g.unary(UnaryOp::Exp, x).unwrap();
        let t = g.unary(UnaryOp::Tanh, e).unwrap();
        let s = g.softmax(e, 1).unwrap();
        let y = g.add(t, s).unwrap();
        let z = g.unary(UnaryOp::Neg, y).unwrap();
        g.output("z", z);
        let out = fuse_elementwise(&g).unwrap();
        assert_eq!(
            print(&out),
            "%0 = input[\"x\"]() : f32[2,3]\n%1 = unary[exp](%0) : f32[2,3]\n%2 = softmax[axis=1](%1) : f32[2,3]\n\
             %3 = fused[neg(add(tanh($0), $1))](%1, %2) : f32[2,3]\noutput \"z\" = %3\n"
        );
    }

    #[test]
    fn integer_ops_stay_out() {
        let mut g = Graph::new();
        let i = g.input("i", DType::I32, &[4]).unwrap();
        let j = g.add(i, i).unwrap();
        let k = g.binary(BinaryOp::Mul, j, i).unwrap();
        g.output("k", k);
        assert_eq!(fuse_elementwise(&g).unwrap(), g);
    }

    #[test]
    fn a_broadcast_that_sets_the_shape_stays_a_node() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[3]).unwrap();
        let bx = g.push(Op::Broadcast { shape: vec![2, 3] }, &[x]).unwrap();
        let two = g.scalar(DType::F32, 2.0).unwrap();
        let y = g.mul(bx, two).unwrap();
        let z = g.unary(UnaryOp::Exp, y).unwrap();
        g.output("z", z);
        let out = fuse_elementwise(&g).unwrap();
        assert_eq!(
            print(&out),
            "%0 = input[\"x\"]() : f32[3]\n%1 = broadcast[[2, 3]](%0) : f32[2,3]\n%2 = constant[[2.0]]() : f32[]\n\
             %3 = fused[exp(mul($0, 2.0))](%1) : f32[2,3]\noutput \"z\" = %3\n"
        );
    }
}
