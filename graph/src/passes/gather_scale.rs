//! An embedding's scale inside its gather: `gather(table, ids) * c` (`c` a one-element
//! constant; Gemma's `E[ids] * sqrt(hidden)`) becomes one [`Op::GatherScaled`] step where the
//! gather is read by the product alone and has its type. The gathered rows are copied values,
//! so the step's product is the unfused product element by element, with the scale rounded to
//! the dtype as the constant is: the result is exact (the same bits). It runs before elementwise
//! fusion, so that a region reading the product (PaliGemma's merge of image and text tokens, a
//! select) does not take the multiply first.

use super::{rebuild, scalar_constant, Action, Uses};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::{BinaryOp, Expr, Instr, Op};

/// The gather and the scale when node `i` is `gather * c` as the module doc says.
fn scaled_gather(g: &Graph, uses: &Uses, i: usize) -> Option<(NodeId, f32)> {
    let n = &g.nodes[i];
    if !matches!(n.op, Op::Binary(BinaryOp::Mul) | Op::Fused(_)) || !n.ty.dtype.is_float() {
        return None;
    }
    let Expr { instrs } = n.op.elementwise_expr()?;
    let (a, b) = match instrs[..] {
        [a, b, Instr::Binary(BinaryOp::Mul, 0, 1)] => (a, b),
        [a, b, Instr::Binary(BinaryOp::Mul, 1, 0)] => (b, a),
        _ => return None,
    };
    let input = |ins: Instr| match ins {
        Instr::Input(k) => n.inputs.get(k as usize).copied(),
        _ => None,
    };
    let gather_of = |ins: Instr| {
        let p = input(ins)?;
        let ok = matches!(g.node(p).op, Op::Gather { .. }) && g.ty(p) == &n.ty && uses.sole_reader(p.index()) == Some(i);
        ok.then_some(p)
    };
    let scale_of = |ins: Instr| match ins {
        Instr::Const(c) => Some(c),
        _ => scalar_constant(g, input(ins)?),
    };
    let (p, c) = match (gather_of(a), gather_of(b)) {
        (Some(p), _) if scale_of(b).is_some() => (p, scale_of(b)?),
        (_, Some(p)) => (p, scale_of(a)?),
        _ => return None,
    };
    // The constant as the product reads it: a value of the dtype.
    Some((p, n.ty.dtype.round(c as f64) as f32))
}

/// Makes each `gather(table, ids) * c` one gather with the scale (see the module doc).
pub fn gather_scale(g: &Graph) -> Result<Graph> {
    let uses = Uses::of(g);
    let mut actions = vec![Action::Keep; g.nodes.len()];
    for i in 0..g.nodes.len() {
        let Some((p, scale)) = scaled_gather(g, &uses, i) else { continue };
        let Op::Gather { axis } = g.node(p).op else { continue };
        actions[p.index()] = Action::Drop;
        actions[i] = Action::Replace { op: Op::GatherScaled { axis, scale }, inputs: g.node(p).inputs.clone() };
    }
    rebuild("gather_scale", g, actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::interp::{run, Value};
    use std::collections::HashMap;

    /// `E[ids] * sqrt(64)`-like graphs: the table, the ids, the gather, the product (by a
    /// constant given as `c`, on the left when `left`); `also` makes the gather an output too.
    fn graph(dt: DType, c: f64, left: bool, also: bool) -> Graph {
        let mut g = Graph::new();
        let t = g.input("table", dt, &[7, 5]).unwrap();
        let ids = g.input("ids", DType::I64, &[2, 3]).unwrap();
        let x = g.push(Op::Gather { axis: 0 }, &[t, ids]).unwrap();
        let s = g.scalar(dt, c).unwrap();
        let y = if left { g.mul(s, x).unwrap() } else { g.mul(x, s).unwrap() };
        g.output("y", y);
        if also {
            g.output("x", x);
        }
        g
    }

    fn inputs(dt: DType) -> HashMap<String, Value> {
        let table = (0..35).map(|i| dt.round((i as f64 - 17.0) * 0.173)).collect();
        [
            ("table".to_string(), Value::new(crate::TensorType::new(dt, [7, 5]), table).unwrap()),
            ("ids".to_string(), Value::new(crate::TensorType::new(DType::I64, [2, 3]), vec![6.0, 0.0, 3.0, 3.0, 1.0, 5.0]).unwrap()),
        ]
        .into()
    }

    /// The product becomes one gather with the scale rounded to the dtype, and the interpreter
    /// gives the same bits before and after (the scale 8.1 is not a bf16 or f16 value).
    #[test]
    fn a_gather_times_a_constant_is_one_step_with_the_same_bits() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for left in [false, true] {
                let g = graph(dt, 8.1, left, false);
                let out = crate::passes::dead_code(&gather_scale(&g).unwrap()).unwrap();
                crate::verify::verify(&out).unwrap();
                let steps: Vec<&Op> = out.nodes.iter().map(|n| &n.op).filter(|op| !op.is_source()).collect();
                assert!(matches!(steps[..], [Op::GatherScaled { axis: 0, scale }] if *scale as f64 == dt.round(8.1)), "{dt}: {steps:?}");
                let (a, b) = (run(&g, &inputs(dt), &HashMap::new()).unwrap(), run(&out, &inputs(dt), &HashMap::new()).unwrap());
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a["y"].data), bits(&b["y"].data), "{dt}");
            }
        }
    }

    /// A gather read elsewhere too, a product by a non-constant or by a tensor constant, stay.
    #[test]
    fn other_products_stay() {
        let g = graph(DType::F32, 8.0, false, true);
        assert_eq!(gather_scale(&g).unwrap(), g);
        let mut h = Graph::new();
        let t = h.input("table", DType::F32, &[7, 5]).unwrap();
        let ids = h.input("ids", DType::I64, &[3]).unwrap();
        let x = h.push(Op::Gather { axis: 0 }, &[t, ids]).unwrap();
        let w = h.constant(DType::F32, &[5], vec![1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let y = h.mul(x, w).unwrap();
        let z = h.push(Op::Gather { axis: 0 }, &[t, ids]).unwrap();
        let q = h.mul(z, z).unwrap();
        h.output("y", y);
        h.output("q", q);
        assert_eq!(gather_scale(&h).unwrap(), h);
    }
}
