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
/// needed in memory; bool values (masks) may live inside; integer ops stay out, and an
/// integer value enters only through a cast to float. Casts to float join like any member
/// (each value is rounded to its own dtype), and a cast read from outside that heads no region
/// is computed inside from its operand (RoPE's position cast, in each angle region).
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
        let leaf = |q: usize| leaf_cast(g, &uses, &members, q);
        let region = [(true, true), (false, true), (false, false)]
            .into_iter()
            .find_map(|(broadcasts, consts)| build(g, m, broadcasts, consts, &leaf));
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
    if let Op::Cast { to } = node.op {
        // A cast to float may read anything: integers enter a region only through casts.
        return to.is_float();
    }
    let op_ok = matches!(node.op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Fused(_) | Op::Broadcast { .. });
    op_ok && float_or_bool(&NodeId(i as u32)) && node.inputs.iter().all(float_or_bool)
}

/// Whether node `q`, read by a region from outside, is a cast to float the region computes
/// itself from `q`'s operand (so a position cast read by both RoPE angle regions is one
/// instruction in each, and its own step goes once nothing else reads it): it is no output
/// and heads no region of its own.
fn leaf_cast(g: &Graph, uses: &Uses, members: &[Vec<usize>], q: usize) -> bool {
    matches!(g.nodes[q].op, Op::Cast { to } if to.is_float()) && !uses.is_output[q] && members[q].len() < 2
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
fn build(g: &Graph, members: &[usize], broadcasts: bool, consts: bool, leaf: &dyn Fn(usize) -> bool) -> Option<Region> {
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
                    let mut input = |q: NodeId, b: &mut ExprBuilder| {
                        let k = match inputs.iter().position(|&x| x == q) {
                            Some(k) => k,
                            None => {
                                inputs.push(q);
                                inputs.len() - 1
                            }
                        };
                        b.push(Instr::Input(u16::try_from(k).ok()?))
                    };
                    let v = match (scalar_constant(g, q).filter(|_| consts), &g.node(q).op) {
                        (Some(c), _) => b.push(Instr::Const(c))?,
                        (None, Op::Cast { to }) if leaf(q.index()) => {
                            let x = input(g.node(q).inputs[0], &mut b)?;
                            b.push(Instr::Cast(*to, x))?
                        }
                        (None, _) => input(q, &mut b)?,
                    };
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
            (Op::Cast { to }, &[x]) => b.push(Instr::Cast(*to, x))?,
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
pub(super) fn renumber(e: Expr, inputs: Vec<NodeId>) -> (Expr, Vec<NodeId>) {
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
            Instr::Unary(..) | Instr::Binary(..) | Instr::Select(..) | Instr::Cast(..) => {
                stack.extend(e.instrs[i].operands().into_iter().rev())
            }
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

    /// RoPE's angles in a bf16 model: an i64 position cast to f32 (read by both regions), a
    /// product, cos or sin, a cast to bf16. Each region computes its cast inside, and the
    /// fused graph gives the interpreter's bits.
    #[test]
    fn casts_join_regions_and_a_shared_cast_is_computed_in_each() {
        use crate::interp::{run, Value};
        use std::collections::HashMap;
        let mut g = Graph::new();
        let pos = g.input("pos", DType::I64, &[4, 1]).unwrap();
        let f = g.push(Op::Cast { to: DType::F32 }, &[pos]).unwrap();
        let inv = g.constant(DType::F32, &[1, 8], (0..8).map(|i| 10000f64.powf(-(i as f64) / 8.0) as f32 as f64).collect()).unwrap();
        let a = g.mul(f, inv).unwrap();
        let b = g.mul(f, inv).unwrap();
        let c = g.unary(UnaryOp::Cos, a).unwrap();
        let s = g.unary(UnaryOp::Sin, b).unwrap();
        let cb = g.push(Op::Cast { to: DType::BF16 }, &[c]).unwrap();
        let sb = g.push(Op::Cast { to: DType::BF16 }, &[s]).unwrap();
        g.output("cos", cb);
        g.output("sin", sb);
        let out = crate::passes::dead_code(&fuse_elementwise(&g).unwrap()).unwrap();
        let p = print(&out);
        assert!(p.contains("fused[cast[bf16](cos(mul(cast[f32]($0), $1)))](%0, %1) : bf16[4,8]"), "{p}");
        assert!(p.contains("fused[cast[bf16](sin(mul(cast[f32]($0), $1)))](%0, %1) : bf16[4,8]"), "{p}");
        assert!(!p.contains("= cast"), "{p}");
        let mut inputs = HashMap::new();
        let ty = crate::dtype::TensorType::new(DType::I64, vec![4, 1]);
        inputs.insert("pos".to_string(), Value::new(ty, vec![0.0, 7.0, 1000.0, 123456.0]).unwrap());
        let w = HashMap::new();
        assert_eq!(crate::interp::run(&g, &inputs, &w).unwrap(), run(&out, &inputs, &w).unwrap());
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
