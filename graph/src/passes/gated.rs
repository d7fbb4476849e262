//! A gated linear unit's two projections and their epilogue as one [`Op::GatedMatMul`] node
//! (Gemma's MLP: `gelu(x @ w_gate) * (x @ w_up)`), where the backend computes both products
//! and the epilogue in one kernel. Two shapes of the graph are taken, as the standard pipeline
//! leaves them:
//!
//! - the gate a plain matmul read by nothing but the up matmul's epilogue, both reading one `x`
//!   against weights (or reshapes of weights) of one shape and dtype: the node reads `x` and the
//!   weights stacked at load (`~stack(w_gate|w_up)`, as `stack_projections` names them);
//! - `stack_projections`' form (where each product fills whole arena blocks): a plain matmul
//!   against a stacked weight `[2, ..]`, read only by its two slices (each maybe reshaped), read
//!   only by one fused region: the node reads the matmul's operands, and the region's
//!   expression becomes its epilogue (reshaped to the region's shape).
//!
//! The node's epilogue is the old one with its inputs renumbered (gate `Input(0)`, up
//! `Input(1)`), so every value is computed and rounded as before. A backend says where it takes
//! the node (`accept`: its kernel choice); elsewhere the graph is left alone.

use super::stack::weight_of;
use super::{copy_mapped, dead_code, map_outputs, same_type, Uses};
use crate::dtype::TensorType;
use crate::error::{GraphError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::{Expr, Instr, Op};
use crate::safetensors::stack_name;

/// Whether a backend runs a node of this op on these operand types, giving this type.
pub type Accept<'a> = &'a dyn Fn(&Op, &[TensorType], &TensorType) -> bool;

/// Where the node's stacked weight comes from.
enum Weights {
    /// An existing node (a stacked weight, maybe reshaped).
    Node(NodeId),
    /// The stack of two weight nodes, read as `[2, ..read]`.
    Stack { gate: NodeId, up: NodeId, read: Vec<usize> },
}

/// One rewrite: the node emitted in place of old node `at`.
struct Rewrite {
    at: usize,
    x: NodeId,
    weights: Weights,
    transpose_b: bool,
    epilogue: Expr,
    extra: Vec<NodeId>,
    /// Old nodes that go (the gate, the slices...).
    gone: Vec<usize>,
}

/// `e` with input `k` read as `map[k]`.
fn renumber(e: &Expr, map: &[u16]) -> Expr {
    Expr { instrs: e.instrs.iter().map(|&i| if let Instr::Input(k) = i { Instr::Input(map[k as usize]) } else { i }).collect() }
}

/// The first form: `u` an up matmul whose epilogue reads a gate matmul of the same `x`.
fn unstacked(g: &Graph, uses: &Uses, u: usize) -> Option<Rewrite> {
    let node = &g.nodes[u];
    let Op::MatMul { transpose_b, epilogue: Some(e) } = &node.op else { return None };
    let (x, wu) = (node.inputs[0], node.inputs[1]);
    // The extra input that is the gate: read once, by this node alone.
    let mut gates = node.inputs[2..].iter().enumerate().filter(|(_, &p)| {
        let gn = &g.nodes[p.index()];
        matches!(gn.op, Op::MatMul { transpose_b: t, epilogue: None } if t == *transpose_b)
            && gn.inputs.len() == 2
            && gn.inputs[0] == x
            && uses.sole_reader(p.index()) == Some(u)
    });
    let (j, &gate) = gates.next()?;
    if node.inputs.iter().filter(|&&p| p == gate).count() != 1 || gates.next().is_some() {
        return None;
    }
    let wg = g.nodes[gate.index()].inputs[1];
    let (sg, su) = (weight_of(g, wg)?, weight_of(g, wu)?);
    let (tg, tu) = (g.ty(wg), g.ty(wu));
    let (tgate, tout) = (g.ty(gate), g.ty(NodeId(u as u32)));
    if sg == su || tg != tu || tg.rank() != 2 || g.ty(sg) != g.ty(su) || tgate.shape != tout.shape || tgate.dtype != g.ty(x).dtype {
        return None;
    }
    // Old expression inputs: 0 the up product, 1.. the extra inputs (j + 1 the gate).
    let mut map = vec![0u16; node.inputs.len() - 1];
    map[0] = 1;
    let mut extra = Vec::new();
    for (i, &p) in node.inputs[2..].iter().enumerate() {
        if i == j {
            map[i + 1] = 0;
        } else {
            map[i + 1] = 2 + extra.len() as u16;
            extra.push(p);
        }
    }
    Some(Rewrite {
        at: u,
        x,
        weights: Weights::Stack { gate: sg, up: su, read: tg.shape.clone() },
        transpose_b: *transpose_b,
        epilogue: renumber(e, &map),
        extra,
        gone: vec![gate.index()],
    })
}

/// The node a slice's reader sees: the slice, or its one reshape (read by `f` alone).
fn slice_of(g: &Graph, uses: &Uses, f: usize, p: NodeId) -> Option<(usize, Vec<usize>)> {
    let mut chain = vec![p.index()];
    let mut at = p.index();
    if let Op::Reshape { .. } = g.nodes[at].op {
        at = g.nodes[at].inputs[0].index();
        chain.push(at);
    }
    let Op::Slice { axis: 0, start, end, step: 1 } = g.nodes[at].op else { return None };
    // Each link read once, by the next.
    let mut reader = f;
    for &c in &chain {
        if uses.is_output[c] || uses.readers[c] != [reader] {
            return None;
        }
        reader = c;
    }
    (end == start + 1).then_some((start, chain))
}

/// The second form: `f` a fused region reading the two slices of a stacked plain matmul.
fn stacked(g: &Graph, uses: &Uses, f: usize) -> Option<Rewrite> {
    let node = &g.nodes[f];
    let Op::Fused(e) = &node.op else { return None };
    let mut halves: [Option<(usize, Vec<usize>)>; 2] = [None, None];
    let mut y = None;
    for (i, &p) in node.inputs.iter().enumerate() {
        let Some((half, chain)) = slice_of(g, uses, f, p) else { continue };
        let src = g.nodes[*chain.last()?].inputs[0];
        if half > 1 || halves[half].is_some() || y.is_some_and(|y| y != src) || g.ty(p).shape != node.ty.shape {
            return None;
        }
        halves[half] = Some((i, chain));
        y = Some(src);
    }
    let (y, [Some((i0, c0)), Some((i1, c1))]) = (y?, halves) else { return None };
    let mm = &g.nodes[y.index()];
    let Op::MatMul { transpose_b, epilogue: None } = mm.op else { return None };
    let (x, w) = (mm.inputs[0], mm.inputs[1]);
    let (tx, tw) = (g.ty(x), g.ty(w));
    // `[1, M, K]` against `[2, N, K]` (stack_projections' form): `[2, M, N]`, read by the two
    // slices alone.
    let readers = &uses.readers[y.index()];
    if uses.is_output[y.index()] || readers.len() != 2 || tw.rank() != 3 || tw.shape[0] != 2 || tx.rank() != 3 || tx.shape[0] != 1 {
        return None;
    }
    let mut map = vec![0u16; node.inputs.len()];
    let mut extra = Vec::new();
    for (i, &p) in node.inputs.iter().enumerate() {
        map[i] = match i {
            _ if i == i0 => 0,
            _ if i == i1 => 1,
            _ => {
                extra.push(p);
                1 + extra.len() as u16
            }
        };
    }
    let mut gone = vec![y.index()];
    gone.extend(c0.iter().chain(&c1));
    Some(Rewrite { at: f, x, weights: Weights::Node(w), transpose_b, epilogue: renumber(e, &map), extra, gone })
}

/// Emits rewrite `r` (its new node, reshaped to the old node's type) into `out`.
fn emit(g: &Graph, out: &mut Graph, r: &Rewrite, map: &[Option<NodeId>]) -> Result<NodeId> {
    let get = |p: NodeId| map[p.index()].ok_or_else(|| GraphError::Pass { pass: "gated_matmul", msg: format!("{p} not yet built") });
    let w = match &r.weights {
        Weights::Node(w) => get(*w)?,
        Weights::Stack { gate, up, read } => {
            let name = |w: &NodeId| match &g.node(*w).op {
                Op::Weight { name } => name.clone(),
                _ => String::new(),
            };
            let t = g.ty(*gate);
            let mut stored = vec![2];
            stored.extend_from_slice(&t.shape);
            let w = out.weight(&stack_name(&[&name(gate), &name(up)]), t.dtype, &stored)?;
            let mut shape = vec![2];
            shape.extend_from_slice(read);
            if shape == stored {
                w
            } else {
                out.reshape(w, &shape)?
            }
        }
    };
    let mut ins = vec![get(r.x)?, w];
    for &p in &r.extra {
        ins.push(get(p)?);
    }
    let op = Op::GatedMatMul { transpose_b: r.transpose_b, epilogue: r.epilogue.clone() };
    let id = out.push(op, &ins)?;
    let want = &g.nodes[r.at].ty;
    if out.ty(id).shape == want.shape {
        Ok(id)
    } else {
        out.reshape(id, &want.shape)
    }
}

/// The rewrite at old node `i`, if the backend takes it.
fn find(g: &Graph, uses: &Uses, i: usize, accept: Accept) -> Option<Rewrite> {
    let r = unstacked(g, uses, i).or_else(|| stacked(g, uses, i))?;
    let x = g.ty(r.x).clone();
    let w = match &r.weights {
        Weights::Node(w) => g.ty(*w).clone(),
        Weights::Stack { gate, read, .. } => TensorType::new(g.ty(*gate).dtype, [&[2][..], read].concat()),
    };
    let mut ins = vec![x, w];
    ins.extend(r.extra.iter().map(|&p| g.ty(p).clone()));
    let op = Op::GatedMatMul { transpose_b: r.transpose_b, epilogue: r.epilogue.clone() };
    let refs: Vec<&TensorType> = ins.iter().collect();
    let ty = crate::infer::infer(&op, &refs, None).ok()?;
    (ty.numel() == g.nodes[i].ty.numel() && ty.dtype == g.nodes[i].ty.dtype && accept(&op, &ins, &ty)).then_some(r)
}

/// Rewrites each gate and up pair the backend takes (`accept`) as one [`Op::GatedMatMul`]
/// (see the module doc), then removes what no output reads any more.
pub fn gated_matmul(g: &Graph, accept: Accept) -> Result<Graph> {
    let uses = Uses::of(g);
    let n = g.nodes.len();
    let mut at: Vec<Option<Rewrite>> = (0..n).map(|_| None).collect();
    let mut gone = vec![false; n];
    for (i, slot) in at.iter_mut().enumerate() {
        let Some(r) = find(g, &uses, i, accept) else { continue };
        if r.gone.iter().any(|&k| gone[k]) {
            continue;
        }
        r.gone.iter().for_each(|&k| gone[k] = true);
        *slot = Some(r);
    }
    if at.iter().all(Option::is_none) {
        return Ok(g.clone());
    }
    let err = |msg: String| GraphError::Pass { pass: "gated_matmul", msg };
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        if gone[i] {
            continue;
        }
        let id = match &at[i] {
            Some(r) => emit(g, &mut out, r, &map)?,
            None => copy_mapped("gated_matmul", &mut out, i, node, &map)?,
        };
        same_type("gated_matmul", &out, i, node, id)?;
        map[i] = Some(id);
    }
    map_outputs("gated_matmul", g, &mut out, &map)?;
    let out = dead_code(&out)?;
    crate::verify::verify(&out).map_err(|e| err(format!("result fails verification: {e}")))?;
    Ok(out)
}

/// [`gated_matmul`] wherever the pattern is found (for `Pipeline::parse` and tests).
pub fn gated_matmul_everywhere(g: &Graph) -> Result<Graph> {
    gated_matmul(g, &|_, _, _| true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::interp::{run, Value};
    use crate::op::UnaryOp;
    use crate::passes::Pipeline;
    use std::collections::HashMap;

    /// `gelu_tanh(x @ wg^T) * (x @ wu^T)` with `x [rows, k]`, `wg, wu [f, k]` (`wg [k, f]` read
    /// untransposed with `gate_tb` false), after the standard pipeline; the gate is an output
    /// too with `gate_out`.
    fn glu(rows: usize, k: usize, f: usize, gate_tb: bool, gate_out: bool) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[rows, k]).unwrap();
        let shape = if gate_tb { [f, k] } else { [k, f] };
        let wg = g.weight("mlp/gate", DType::F32, &shape).unwrap();
        let wu = g.weight("mlp/up", DType::F32, &[f, k]).unwrap();
        let gate = g.matmul(x, wg, gate_tb).unwrap();
        let up = g.matmul(x, wu, true).unwrap();
        let act = g.push(Op::Unary(UnaryOp::GeluTanh), &[gate]).unwrap();
        let h = g.mul(act, up).unwrap();
        g.output("h", h);
        if gate_out {
            g.output("gate", gate);
        }
        Pipeline::standard().run(&g, None).unwrap()
    }

    fn values(ty: &TensorType, seed: usize) -> Value {
        let data = (0..ty.numel()).map(|i| (((i * 7 + seed * 13) % 23) as f64 - 11.0) / 8.0).collect();
        Value::new(ty.clone(), data).unwrap()
    }

    /// Every output of `g` and `out` in the interpreter, bit for bit.
    fn same_outputs(g: &Graph, out: &Graph) {
        let (mut ins, mut ws) = (HashMap::new(), HashMap::new());
        for (i, n) in g.nodes.iter().enumerate() {
            match &n.op {
                Op::Input { name } => drop(ins.insert(name.clone(), values(&n.ty, i))),
                Op::Weight { name } => match crate::safetensors::stack_parts(name) {
                    // The standard pipeline's stacks: each part of its own values.
                    Some(parts) => {
                        let part = TensorType::new(n.ty.dtype, n.ty.shape[1..].to_vec());
                        for (j, p) in parts.iter().enumerate() {
                            ws.insert(p.clone(), values(&part, 100 + j));
                        }
                    }
                    None => drop(ws.insert(name.clone(), values(&n.ty, i))),
                },
                _ => {}
            }
        }
        let (a, b) = (run(g, &ins, &ws).unwrap(), run(out, &ins, &ws).unwrap());
        assert_eq!(a.len(), b.len());
        for (name, v) in &a {
            assert_eq!(v.ty, b[name].ty, "{name}");
            let bits = |v: &Value| v.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(v), bits(&b[name]), "{name}");
        }
    }

    fn ops(g: &Graph) -> Vec<&'static str> {
        g.nodes.iter().filter(|n| !n.op.is_source() && !matches!(n.op, Op::Reshape { .. })).map(|n| n.op.name()).collect()
    }

    #[test]
    fn the_gate_read_by_the_up_epilogue_joins_it() {
        // One row of 96 f32 columns (384 bytes): stack_projections leaves the pair alone.
        let g = glu(1, 64, 96, true, false);
        assert_eq!(ops(&g), ["matmul", "matmul"]);
        let out = gated_matmul_everywhere(&g).unwrap();
        assert_eq!(ops(&out), ["gated_matmul"]);
        let names: Vec<&str> = out.weights().map(|(_, n, _)| n).collect();
        // The product holding the epilogue comes second (here the gate's: `gelu(in0) * in2`).
        assert!(names == ["mlp/~stack(gate|up)"] || names == ["mlp/~stack(up|gate)"], "{names:?}");
        same_outputs(&g, &out);
    }

    #[test]
    fn the_stacked_product_and_its_region_join() {
        // 64 rows of 96 columns fill whole arena blocks: one stacked GEMM, then the region.
        let g = glu(64, 64, 96, true, false);
        assert_eq!(ops(&g), ["matmul", "slice", "slice", "fused"]);
        let out = gated_matmul_everywhere(&g).unwrap();
        assert_eq!(ops(&out), ["gated_matmul"]);
        assert_eq!(out.ty(out.outputs[0].1).shape, [64, 96]);
        same_outputs(&g, &out);
    }

    #[test]
    fn left_alone_where_it_does_not_apply() {
        // The gate is read by another node (an output), in both forms.
        for rows in [1, 64] {
            let g = glu(rows, 64, 96, true, true);
            let out = gated_matmul_everywhere(&g).unwrap();
            assert!(!ops(&out).contains(&"gated_matmul"), "{rows}: {:?}", ops(&out));
        }
        // The gate's weight is read untransposed, the up's transposed.
        let g = glu(1, 64, 96, false, false);
        assert!(!ops(&gated_matmul_everywhere(&g).unwrap()).contains(&"gated_matmul"));
        // The backend takes no such node.
        let g = glu(1, 64, 96, true, false);
        let out = gated_matmul(&g, &|_, _, _| false).unwrap();
        assert_eq!(ops(&out), ops(&g));
    }

    #[test]
    fn products_of_different_inputs_stay_apart() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[1, 32]).unwrap();
        let y = g.input("y", DType::F32, &[1, 32]).unwrap();
        let wg = g.weight("gate", DType::F32, &[48, 32]).unwrap();
        let wu = g.weight("up", DType::F32, &[48, 32]).unwrap();
        let gate = g.matmul(x, wg, true).unwrap();
        let up = g.matmul(y, wu, true).unwrap();
        let act = g.push(Op::Unary(UnaryOp::GeluTanh), &[gate]).unwrap();
        let h = g.mul(act, up).unwrap();
        g.output("h", h);
        let g = Pipeline::standard().run(&g, None).unwrap();
        assert_eq!(ops(&gated_matmul_everywhere(&g).unwrap()), ops(&g));
    }
}
