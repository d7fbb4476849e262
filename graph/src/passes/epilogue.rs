//! Matmul epilogue fusion: `x @ W^T + b -> gelu -> + residual` becomes one matmul whose
//! epilogue applies the bias, the activation and the residual to each product element.

use super::{rebuild, scalar_constant, Action, ExprBuilder, Uses};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::infer::infer;
use crate::op::{Expr, Instr, Op};

/// A matmul as it grows: the original operands and attributes plus the epilogue so far.
#[derive(Clone)]
struct Chain {
    transpose_b: bool,
    epilogue: Option<Expr>,
    /// `a`, `b`, then the epilogue's extra inputs (`Input(i)` reads `inputs[i + 1]`).
    inputs: Vec<NodeId>,
    /// Nodes computed inside the epilogue besides the chain itself (dropped).
    inlined: Vec<usize>,
}

/// Folds into a matmul each elementwise consumer (unary, binary, select, fused, a cast to
/// float) that is the only reader of the matmul's result and has the result's type (a cast:
/// its shape; so the product is never broadcast up), repeatedly, so a chain of them all lands
/// in one epilogue (a bf16 head: GEMM, soft-cap, then the cast to f32). The
/// consumer's other operands become epilogue inputs (one-element constants become
/// `Const`s). A product read by anything else stays unfused: its raw value is needed.
pub fn fuse_matmul_epilogue(g: &Graph) -> Result<Graph> {
    let uses = Uses::of(g);
    let mut actions = vec![Action::Keep; g.nodes.len()];
    // chains[i]: the matmul node i computes, once it is a matmul or has been absorbed into one.
    let mut chains: Vec<Option<Chain>> = vec![None; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        if let Op::MatMul { transpose_b, epilogue } = &node.op {
            chains[i] = Some(Chain { transpose_b: *transpose_b, epilogue: epilogue.clone(), inputs: node.inputs.clone(), inlined: vec![] });
            continue;
        }
        if !matches!(node.op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Fused(_) | Op::Cast { .. }) {
            continue;
        }
        // Only one reader, so no other operand of `node` can depend on the product. A cast
        // (to float) changes the dtype only: the epilogue ends converting its value.
        let cast_ok = matches!(node.op, Op::Cast { to } if to.is_float());
        let grown = node.inputs.iter().find_map(|&p| {
            let chain = chains[p.index()].as_ref()?;
            let fits = g.ty(p) == &node.ty || (cast_ok && g.ty(p).shape == node.ty.shape);
            if uses.sole_reader(p.index()) != Some(i) || !fits {
                return None;
            }
            absorb(g, &uses, &actions, chain, p, i).map(|c| (p, c))
        });
        if let Some((p, chain)) = grown {
            let op = Op::MatMul { transpose_b: chain.transpose_b, epilogue: chain.epilogue.clone() };
            actions[p.index()] = Action::Drop;
            for &q in &chain.inlined {
                actions[q] = Action::Drop;
            }
            actions[i] = Action::Replace { op, inputs: chain.inputs.clone() };
            chains[i] = Some(chain);
        }
    }
    rebuild("fuse_matmul_epilogue", g, actions)
}

/// The chain with `node` (which reads the chain's result `p`) appended to its epilogue, or
/// `None` when the expression would not type-check or grows too long. An operand of `node`
/// that is itself elementwise, read by `node` alone, of `node`'s type and not yet fused
/// (`x * cos` beside `rot * sin` in RoPE) is computed inside the epilogue too, its node listed
/// in `Chain::inlined` to be dropped.
fn absorb(g: &Graph, uses: &Uses, actions: &[Action], chain: &Chain, p: NodeId, i: usize) -> Option<Chain> {
    let node = &g.nodes[i];
    let mut b = ExprBuilder::default();
    let mut inputs = chain.inputs.clone();
    let mut inlined = chain.inlined.clone();
    let product = match &chain.epilogue {
        Some(e) => {
            // Copied verbatim: the chain's inputs keep their positions.
            let mut last = None;
            for ins in &e.instrs {
                last = Some(b.push(*ins)?);
            }
            last?
        }
        None => b.push(Instr::Input(0))?,
    };
    let mut args = Vec::with_capacity(node.inputs.len());
    for &q in &node.inputs {
        let a = if q == p {
            product
        } else if let Some(c) = scalar_constant(g, q) {
            b.push(Instr::Const(c))?
        } else if inlinable(g, uses, actions, q, i) {
            let mut qargs = Vec::with_capacity(g.node(q).inputs.len());
            for &r in &g.node(q).inputs {
                qargs.push(operand(g, &mut b, &mut inputs, r)?);
            }
            inlined.push(q.index());
            apply(&mut b, &g.node(q).op, &qargs)?
        } else {
            operand(g, &mut b, &mut inputs, q)?
        };
        args.push(a);
    }
    let result = apply(&mut b, &node.op, &args)?;
    let epilogue = Some(b.finish(result)?);
    let op = Op::MatMul { transpose_b: chain.transpose_b, epilogue: epilogue.clone() };
    let tys: Vec<_> = inputs.iter().map(|&q| g.ty(q)).collect();
    if infer(&op, &tys, None).ok().as_ref() != Some(&node.ty) {
        return None;
    }
    Some(Chain { transpose_b: chain.transpose_b, epilogue, inputs, inlined })
}

/// Whether operand `q` of node `i` can be computed inside `i`'s epilogue (see [`absorb`]).
fn inlinable(g: &Graph, uses: &Uses, actions: &[Action], q: NodeId, i: usize) -> bool {
    let n = g.node(q);
    matches!(n.op, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Fused(_))
        && matches!(actions[q.index()], Action::Keep)
        && uses.sole_reader(q.index()) == Some(i)
        && &n.ty == g.ty(NodeId(i as u32))
}

/// The instruction reading `q`: a one-element constant inline, else an extra input of the
/// epilogue (`Input(k + 1)` reads `inputs[k + 2]`), reused when `q` is one already.
fn operand(g: &Graph, b: &mut ExprBuilder, inputs: &mut Vec<NodeId>, q: NodeId) -> Option<u16> {
    if let Some(c) = scalar_constant(g, q) {
        return b.push(Instr::Const(c));
    }
    let k = match inputs[2..].iter().position(|&x| x == q) {
        Some(k) => k,
        None => {
            inputs.push(q);
            inputs.len() - 3
        }
    };
    b.push(Instr::Input(u16::try_from(k + 1).ok()?))
}

/// Appends elementwise `op` over the instructions `args`; its result.
fn apply(b: &mut ExprBuilder, op: &Op, args: &[u16]) -> Option<u16> {
    match (op, args) {
        (Op::Unary(u), &[x]) => b.push(Instr::Unary(*u, x)),
        (Op::Binary(op), &[x, y]) => b.push(Instr::Binary(*op, x, y)),
        (Op::Select, &[c, x, y]) => b.push(Instr::Select(c, x, y)),
        (Op::Fused(e), _) => b.inline(e, args),
        (Op::Cast { to }, &[x]) => b.push(Instr::Cast(*to, x)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::UnaryOp;
    use crate::print::print;

    fn linear(g: &mut Graph) -> (NodeId, NodeId, NodeId) {
        let x = g.input("x", DType::F32, &[2, 4]).unwrap();
        let w = g.weight("w", DType::F32, &[4, 4]).unwrap();
        let b = g.weight("b", DType::F32, &[4]).unwrap();
        let m = g.matmul(x, w, true).unwrap();
        (x, b, m)
    }

    #[test]
    fn bias_gelu_residual_fold_into_one_matmul() {
        let mut g = Graph::new();
        let (x, b, m) = linear(&mut g);
        let h = g.add(m, b).unwrap();
        let a = g.unary(UnaryOp::GeluTanh, h).unwrap();
        let y = g.add(x, a).unwrap();
        g.output("y", y);
        let out = fuse_matmul_epilogue(&g).unwrap();
        assert_eq!(
            print(&out),
            "%0 = input[\"x\"]() : f32[2,4]\n%1 = weight[\"w\"]() : f32[4,4]\n%2 = weight[\"b\"]() : f32[4]\n\
             %3 = matmul[b^T, epilogue=add($2, gelutanh(add($0, $1)))](%0, %1, %2, %0) : f32[2,4]\noutput \"y\" = %3\n"
        );
    }

    /// A bf16 head: GEMM, soft-cap, then the logits cast to f32: one matmul whose epilogue
    /// ends with the cast, computing the interpreter's bits.
    #[test]
    fn a_cast_ends_the_epilogue() {
        use crate::interp::{run, Value};
        use std::collections::HashMap;
        let mut g = Graph::new();
        let x = g.input("x", DType::BF16, &[3, 4]).unwrap();
        let w = g.input("w", DType::BF16, &[5, 4]).unwrap();
        let m = g.matmul(x, w, true).unwrap();
        let c = g.scalar(DType::BF16, 2.5).unwrap();
        let d = g.binary(crate::op::BinaryOp::Div, m, c).unwrap();
        let t = g.unary(UnaryOp::Tanh, d).unwrap();
        let y = g.mul(t, c).unwrap();
        let f = g.push(Op::Cast { to: DType::F32 }, &[y]).unwrap();
        g.output("logits", f);
        let out = fuse_matmul_epilogue(&g).unwrap();
        let p = print(&out);
        assert!(p.contains("epilogue=cast[f32](mul(tanh(div($0, 2.5)), 2.5))](%0, %1) : f32[3,5]"), "{p}");
        let val = |shape: &[usize], k: f64| {
            let n: usize = shape.iter().product();
            let data = (0..n).map(|i| DType::BF16.round(((i as f64) * k).sin() * 3.0)).collect();
            Value::new(crate::dtype::TensorType::new(DType::BF16, shape.to_vec()), data).unwrap()
        };
        let inputs: HashMap<String, Value> = [("x".to_string(), val(&[3, 4], 0.7)), ("w".to_string(), val(&[5, 4], 1.3))].into();
        let none = HashMap::new();
        assert_eq!(run(&g, &inputs, &none).unwrap(), run(&out, &inputs, &none).unwrap());
    }

    #[test]
    fn a_matmul_read_twice_is_not_fused() {
        let mut g = Graph::new();
        let (_, b, m) = linear(&mut g);
        let h = g.add(m, b).unwrap();
        let e = g.unary(UnaryOp::Exp, m).unwrap();
        g.output("h", h);
        g.output("e", e);
        assert_eq!(fuse_matmul_epilogue(&g).unwrap(), g);
    }

    #[test]
    fn a_matmul_that_is_an_output_is_not_fused() {
        let mut g = Graph::new();
        let (_, b, m) = linear(&mut g);
        let h = g.add(m, b).unwrap();
        g.output("m", m);
        g.output("h", h);
        assert_eq!(fuse_matmul_epilogue(&g).unwrap(), g);
    }

    #[test]
    fn the_product_is_not_broadcast_up() {
        let mut g = Graph::new();
        let (_, _, m) = linear(&mut g);
        let big = g.input("big", DType::F32, &[3, 2, 4]).unwrap();
        let y = g.add(m, big).unwrap();
        g.output("y", y);
        assert_eq!(fuse_matmul_epilogue(&g).unwrap(), g);
    }
}
