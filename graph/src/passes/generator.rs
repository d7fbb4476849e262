//! Generator regions computed inside their readers: a fused region whose output is made from
//! much less data than it holds (RoPE's `cos(cast(position) * inv_freq)` and `sin(..)`, a
//! `[B, S, 1, D]` value from `[B, S]` positions and `D` constants) is recomputed by each region
//! or matmul epilogue that reads it, from its own inputs, instead of being a step of its own.
//! The step and its round trip through memory disappear; each reader computes the generator's
//! instructions once per element of its own output (for RoPE: a cast, a product and a cos or
//! sin per element of q and of k). Every instruction keeps its dtype and rounding (casts
//! included), so the result is bit-identical.

use super::fuse::renumber;
use super::{rebuild, Action, ExprBuilder, Uses};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::infer::infer;
use crate::op::{Instr, Op};
use std::collections::{HashMap, HashSet};

/// Most instructions a generator may have: it is copied into every reader.
pub const MAX_GENERATOR_INSTRS: usize = 16;
/// Most instructions and inputs a reader may have once its generators are inside (the cpu
/// backend evaluates at most 96 instructions over 16 inputs).
const MAX_READER: (usize, usize) = (64, 12);

/// Whether node `i` is a generator (see the module doc): a fused region of at most
/// [`MAX_GENERATOR_INSTRS`] instructions, no output, each input a constant (no step makes
/// it) of at most its elements or a tensor of fewer elements (broadcast up in it), and read
/// only by regions and by matmul epilogues (never as a matmul operand). One read by another
/// generator stays a step (see [`recompute_generators`]).
fn generator(g: &Graph, uses: &Uses, i: usize) -> bool {
    let n = &g.nodes[i];
    let Op::Fused(e) = &n.op else { return false };
    let size = n.ty.numel();
    let small = |q: &NodeId| match g.node(*q).op {
        Op::Constant { .. } => g.ty(*q).numel() <= size,
        _ => g.ty(*q).numel() < size,
    };
    let id = NodeId(i as u32);
    let reader_ok = |&r: &usize| match &g.nodes[r].op {
        Op::Fused(_) => true,
        Op::MatMul { epilogue: Some(_), .. } => !g.nodes[r].inputs[..2].contains(&id),
        _ => false,
    };
    e.instrs.len() <= MAX_GENERATOR_INSTRS
        && !uses.is_output[i]
        && !uses.readers[i].is_empty()
        && n.inputs.iter().all(small)
        && uses.readers[i].iter().all(reader_ok)
}

/// Recomputes every generator inside each of its readers (see the module doc).
pub fn recompute_generators(g: &Graph) -> Result<Graph> {
    let uses = Uses::of(g);
    let found: HashSet<usize> = (0..g.nodes.len()).filter(|&i| generator(g, &uses, i)).collect();
    // A generator read by another stays a step: its reader takes it as an input.
    let mut gens: HashSet<usize> = found.iter().copied().filter(|&i| !uses.readers[i].iter().any(|r| found.contains(r))).collect();
    // A reader whose new expression does not type as it did keeps its generators as they are,
    // and so must every other reader of those: drop them and try again until all readers take.
    loop {
        let mut readers: Vec<usize> = gens.iter().flat_map(|&q| uses.readers[q].iter().copied()).collect();
        readers.sort_unstable();
        readers.dedup();
        let mut actions = vec![Action::Keep; g.nodes.len()];
        let mut refused = Vec::new();
        for &r in &readers {
            match inlined(g, &gens, r) {
                Some((op, inputs)) => actions[r] = Action::Replace { op, inputs },
                None => refused.extend(g.nodes[r].inputs.iter().map(|q| q.index()).filter(|q| gens.contains(q))),
            }
        }
        if refused.is_empty() {
            for &q in &gens {
                actions[q] = Action::Drop;
            }
            return rebuild("recompute_generators", g, actions);
        }
        for q in refused {
            gens.remove(&q);
        }
    }
}

/// Reader `r` with each generator input's expression inlined over the generator's own inputs:
/// its new op and inputs, or `None` when that would not type as `r` did (or outgrows `u16`).
fn inlined(g: &Graph, gens: &HashSet<usize>, r: usize) -> Option<(Op, Vec<NodeId>)> {
    let node = &g.nodes[r];
    // A region's `Input(k)` reads `inputs[k]`; an epilogue's `Input(0)` is the product and
    // `Input(k)` reads `inputs[k + 1]`.
    let (e, skip, mut inputs) = match &node.op {
        Op::Fused(e) => (e, 0usize, Vec::new()),
        Op::MatMul { epilogue: Some(e), .. } => (e, 1, node.inputs[..2].to_vec()),
        _ => return None,
    };
    let first = inputs.len();
    let mut b = ExprBuilder::default();
    // The `Input` instruction already reading each node of the new inputs.
    let mut read: HashMap<NodeId, u16> = HashMap::new();
    let mut input = |q: NodeId, b: &mut ExprBuilder, inputs: &mut Vec<NodeId>| -> Option<u16> {
        if let Some(&v) = read.get(&q) {
            return Some(v);
        }
        let k = match inputs[first..].iter().position(|&x| x == q) {
            Some(k) => k,
            None => {
                inputs.push(q);
                inputs.len() - 1 - first
            }
        };
        let v = b.push(Instr::Input(u16::try_from(k + skip).ok()?))?;
        read.insert(q, v);
        Some(v)
    };
    let mut at: Vec<u16> = Vec::with_capacity(e.instrs.len());
    for ins in &e.instrs {
        let v = match *ins {
            Instr::Input(0) if skip == 1 => b.push(Instr::Input(0))?,
            Instr::Input(k) => {
                let q = *node.inputs.get(k as usize + first - skip)?;
                let gen = &g.node(q);
                match &gen.op {
                    Op::Fused(ge) if gens.contains(&q.index()) => {
                        let args = gen.inputs.iter().map(|&x| input(x, &mut b, &mut inputs)).collect::<Option<Vec<_>>>()?;
                        b.inline(ge, &args)?
                    }
                    _ => input(q, &mut b, &mut inputs)?,
                }
            }
            other => {
                let mut ok = true;
                let mapped = other.map_operands(|a| {
                    at.get(a as usize).copied().unwrap_or_else(|| {
                        ok = false;
                        0
                    })
                });
                if !ok {
                    return None;
                }
                b.push(mapped)?
            }
        };
        at.push(v);
    }
    let expr = b.finish(*at.last()?)?;
    if expr.instrs.len() > MAX_READER.0 || inputs.len() - first > MAX_READER.1 {
        return None;
    }
    let (op, inputs) = match &node.op {
        Op::Fused(_) => {
            let (expr, inputs) = renumber(expr, inputs);
            (Op::Fused(expr), inputs)
        }
        Op::MatMul { transpose_b, .. } => (Op::MatMul { transpose_b: *transpose_b, epilogue: Some(expr) }, inputs),
        _ => return None,
    };
    let tys: Vec<_> = inputs.iter().map(|&q| g.ty(q)).collect();
    (infer(&op, &tys, None).ok().as_ref() == Some(&node.ty)).then_some((op, inputs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{DType, TensorType};
    use crate::interp::{run, Value};
    use crate::op::{Expr, UnaryOp};
    use crate::passes::Pipeline;
    use crate::print::print;

    /// RoPE on q `[1, 4, 2, 8]` in `dt`: angles from i64 positions `[1, 4]` times frequencies,
    /// cos and sin cast to `dt`, `q * cos + rotate_half(q) * sin`; with `exp_reader`, a region
    /// `exp(cos + q)` reads the cos too.
    fn rope(dt: DType, exp_reader: bool) -> Graph {
        let mut g = Graph::new();
        let q = g.input("q", dt, &[1, 4, 2, 8]).unwrap();
        let pos = g.input("pos", DType::I64, &[1, 4]).unwrap();
        let p = g.reshape(pos, &[1, 4, 1, 1]).unwrap();
        let f = g.push(Op::Cast { to: DType::F32 }, &[p]).unwrap();
        let inv =
            g.constant(DType::F32, &[1, 1, 1, 8], (0..8).map(|i| 10000f64.powf(-((i % 4) as f64) / 4.0) as f32 as f64).collect()).unwrap();
        let ang = g.mul(f, inv).unwrap();
        let (c, s) = (g.unary(UnaryOp::Cos, ang).unwrap(), g.unary(UnaryOp::Sin, ang).unwrap());
        let (c, s) = if dt == DType::F32 {
            (c, s)
        } else {
            (g.push(Op::Cast { to: dt }, &[c]).unwrap(), g.push(Op::Cast { to: dt }, &[s]).unwrap())
        };
        let hi = g.slice(q, 3, 4, 8).unwrap();
        let lo = g.slice(q, 3, 0, 4).unwrap();
        let n = g.unary(UnaryOp::Neg, hi).unwrap();
        let rot = g.concat(&[n, lo], 3).unwrap();
        let (a, b) = (g.mul(q, c).unwrap(), g.mul(rot, s).unwrap());
        let y = g.add(a, b).unwrap();
        g.output("y", y);
        if exp_reader {
            let m = g.add(c, q).unwrap();
            let z = g.unary(UnaryOp::Exp, m).unwrap();
            g.output("z", z);
        }
        g
    }

    fn inputs(dt: DType) -> HashMap<String, Value> {
        let q = Value::new(TensorType::new(dt, vec![1, 4, 2, 8]), (0..64).map(|i| dt.round((i as f64 - 29.0) / 7.0)).collect());
        let pos = Value::new(TensorType::new(DType::I64, vec![1, 4]), vec![0.0, 3.0, 1000.0, 123457.0]);
        [("q".to_string(), q.unwrap()), ("pos".to_string(), pos.unwrap())].into()
    }

    /// The standard pipeline without this pass, then with it.
    fn before_after(g: &Graph) -> (Graph, Graph) {
        let mut without = Pipeline::standard();
        without.passes.retain(|p| p.name != "recompute_generators");
        let before = without.run(g, None).unwrap();
        let after = Pipeline::standard().run(g, None).unwrap();
        (before, after)
    }

    fn regions(g: &Graph) -> usize {
        g.nodes.iter().filter(|n| matches!(n.op, Op::Fused(_))).count()
    }

    #[test]
    fn rope_angles_are_computed_in_the_rotation_epilogue_bit_for_bit() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let g = rope(dt, false);
            let (before, after) = before_after(&g);
            let p = print(&after);
            assert_eq!(regions(&before), 2, "{dt}: the cos and sin regions\n{}", print(&before));
            assert_eq!(regions(&after), 0, "{dt}\n{p}");
            let steps = |g: &Graph| g.nodes.iter().filter(|n| !n.op.is_source() && !matches!(n.op, Op::Reshape { .. })).count();
            assert_eq!(steps(&after) + 2, steps(&before), "{dt}\n{p}");
            let want = if dt == DType::F32 { "cos(mul(cast[f32](" } else { "cast[bf16](cos(mul(cast[f32](" };
            if dt != DType::F16 {
                assert!(p.contains(want), "{dt}\n{p}");
            }
            let none = HashMap::new();
            let (ins, w) = (inputs(dt), run(&g, &inputs(dt), &none).unwrap());
            assert_eq!(w, run(&before, &ins, &none).unwrap(), "{dt}");
            assert_eq!(w, run(&after, &ins, &none).unwrap(), "{dt}");
        }
    }

    #[test]
    fn a_region_reading_a_generator_computes_it_too() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let g = rope(dt, true);
            let (before, after) = before_after(&g);
            let p = print(&after);
            assert!(p.contains("fused[exp(add("), "{dt}\n{p}");
            assert_eq!(regions(&before), 3, "{dt}\n{}", print(&before));
            assert_eq!(regions(&after), 1, "{dt}\n{p}");
            assert!(!p.contains("fused[cos") && !p.contains("fused[cast[bf16](cos") && !p.contains("fused[cast[f16](cos"), "{dt}\n{p}");
            let none = HashMap::new();
            let ins = inputs(dt);
            assert_eq!(run(&before, &ins, &none).unwrap(), run(&after, &ins, &none).unwrap(), "{dt}");
        }
    }

    /// `gen = cos(s * c)` over `[4, 8]` (`s` `[4, 1]`, or `[4, 8]` with `big_input`) and
    /// `y = read(gen, x)`.
    fn lone(big_input: bool, read: fn(&mut Graph, NodeId, NodeId) -> NodeId) -> Graph {
        use crate::op::BinaryOp;
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4, 8]).unwrap();
        let s = g.input("s", DType::F32, if big_input { &[4, 8] } else { &[4, 1] }).unwrap();
        let c = g.constant(DType::F32, &[8], (0..8).map(f64::from).collect()).unwrap();
        let e = Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Mul, 0, 1), Instr::Unary(UnaryOp::Cos, 2)] };
        let gen = g.push(Op::Fused(e), &[s, c]).unwrap();
        let y = read(&mut g, gen, x);
        g.output("y", y);
        g
    }

    /// `exp(x) + gen` as one region.
    fn region(g: &mut Graph, gen: NodeId, x: NodeId) -> NodeId {
        use crate::op::BinaryOp;
        let e = Expr { instrs: vec![Instr::Input(0), Instr::Unary(UnaryOp::Exp, 0), Instr::Input(1), Instr::Binary(BinaryOp::Add, 1, 2)] };
        g.push(Op::Fused(e), &[x, gen]).unwrap()
    }

    #[test]
    fn generators_stay_where_a_reader_cannot_take_them() {
        // Read as a matmul operand: stays.
        let g = lone(false, |g, gen, x| g.matmul(x, gen, true).unwrap());
        assert_eq!(recompute_generators(&g).unwrap(), g);
        // An input as large as the output: not a generator.
        let g = lone(true, region);
        assert_eq!(recompute_generators(&g).unwrap(), g);
        // An output: stays.
        let mut g = lone(false, region);
        g.output("gen", NodeId(3));
        assert_eq!(recompute_generators(&g).unwrap(), g);
    }

    #[test]
    fn a_generator_read_by_a_generator_stays_a_step() {
        // `inner = s * 2` (`[4, 1]` from `[4, 1]` and a scalar, no generator) feeds
        // `gen = cos(inner * c)`, which feeds `exp(x) + gen`; with `inner` over `[1, 1]` instead,
        // inner is a generator read by one.
        use crate::op::BinaryOp;
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4, 8]).unwrap();
        let s = g.input("s", DType::F32, &[1, 1]).unwrap();
        let k = g.constant(DType::F32, &[4, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let mul =
            Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Mul, 0, 1), Instr::Unary(UnaryOp::Neg, 2)] };
        let inner = g.push(Op::Fused(mul), &[s, k]).unwrap();
        let c = g.constant(DType::F32, &[8], (0..8).map(f64::from).collect()).unwrap();
        let e = Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Mul, 0, 1), Instr::Unary(UnaryOp::Cos, 2)] };
        let gen = g.push(Op::Fused(e), &[inner, c]).unwrap();
        let y = region(&mut g, gen, x);
        g.output("y", y);
        let out = recompute_generators(&g).unwrap();
        let p = print(&out);
        assert!(p.contains("fused[neg(mul($0, $1))](%1, %2) : f32[4,1]"), "{p}");
        assert!(p.contains("fused[add(exp($0), cos(mul($1, $2)))](%0, %3, %4) : f32[4,8]"), "{p}");
        let xv = Value::new(TensorType::new(DType::F32, vec![4, 8]), (0..32).map(|i| i as f64 / 9.0).collect()).unwrap();
        let sv = Value::new(TensorType::new(DType::F32, vec![1, 1]), vec![0.7]).unwrap();
        let ins: HashMap<_, _> = [("x".to_string(), xv), ("s".to_string(), sv)].into();
        let none = HashMap::new();
        assert_eq!(run(&g, &ins, &none).unwrap(), run(&out, &ins, &none).unwrap());
    }

    #[test]
    fn a_reader_too_long_keeps_its_generator() {
        // `add(neg(neg(..neg(x))), gen)`: 63 instructions, 66 with the generator inside.
        let g = lone(false, |g, gen, x| {
            use crate::op::BinaryOp;
            let mut instrs = vec![Instr::Input(0)];
            instrs.extend((0..60).map(|i| Instr::Unary(UnaryOp::Neg, i)));
            instrs.extend([Instr::Input(1), Instr::Binary(BinaryOp::Add, 60, 61)]);
            g.push(Op::Fused(Expr { instrs }), &[x, gen]).unwrap()
        });
        assert_eq!(recompute_generators(&g).unwrap(), g);
    }

    #[test]
    fn a_generator_joins_a_region_reading_it() {
        let g = lone(false, region);
        let out = recompute_generators(&g).unwrap();
        assert_eq!(regions(&out), 1, "{}", print(&out));
        assert!(print(&out).contains("fused[add(exp($0), cos(mul($1, $2)))](%0, %1, %2) : f32[4,8]"), "{}", print(&out));
        let x = Value::new(TensorType::new(DType::F32, vec![4, 8]), (0..32).map(|i| i as f64 / 9.0).collect()).unwrap();
        let s = Value::new(TensorType::new(DType::F32, vec![4, 1]), vec![0.5, -1.25, 3.0, 77.0]).unwrap();
        let ins: HashMap<_, _> = [("x".to_string(), x), ("s".to_string(), s)].into();
        let none = HashMap::new();
        assert_eq!(run(&g, &ins, &none).unwrap(), run(&out, &ins, &none).unwrap());
    }
}
