//! Property tests of the passes: on random small graphs, every pass alone and the standard
//! pipeline keep the interpreter's outputs (within 1e-5 relative and absolute for f32)
//! and give graphs that verify.
//!
//! A graph is decoded from a list of random byte tuples, one step each (a unary op, a
//! binary op against another node or a fresh leaf, a matmul with bias / activation /
//! residual, a reshape, a reduction, a softmax, a masked select, a broadcast, an iota, an
//! integer detour, a duplicate node for CSE, RoPE's rotate_half with negated halves, a residual
//! add between RMS norms). Each
//! node carries a bound on its magnitude and steps that would exceed it are skipped, so
//! results stay where f32 rounding differences between fused and unfused evaluation are far
//! below the tolerance.

use kiln_graph::interp::{self, Value};
use kiln_graph::passes::{Pass, Pipeline};
use kiln_graph::verify::verify;
use kiln_graph::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, TensorType, UnaryOp};
use proptest::prelude::*;
use std::collections::HashMap;

/// Largest magnitude a generated node may reach.
const LIMIT: f64 = 16.0;

/// Step kinds from this one on build a residual junction ([`Gen::junction`]).
const JUNCTION_KINDS: u8 = 234;

/// Step kinds from this one on build sibling projections of one input ([`Gen::siblings`]).
const SIBLING_KINDS: u8 = 245;

/// Largest tensor a generated node may be (repeated broadcasts would grow without end).
const MAX_ELEMENTS: usize = 256;

/// A bound on `|f(x)|` from a bound on `|x|`.
type UnaryBound = fn(f64) -> f64;

/// A bound on `|f(a, b)|` from bounds on `|a|` and `|b|`.
type BinaryBound = fn(f64, f64) -> f64;

/// Unary ops defined everywhere, with a bound on `|f(x)|` given `|x| <= b`.
const UNARY: [(UnaryOp, UnaryBound); 14] = [
    (UnaryOp::Neg, |b| b),
    (UnaryOp::Abs, |b| b),
    (UnaryOp::Exp, f64::exp),
    (UnaryOp::Square, |b| b * b),
    (UnaryOp::Tanh, |_| 1.0),
    (UnaryOp::Sigmoid, |_| 1.0),
    (UnaryOp::Erf, |_| 1.0),
    (UnaryOp::Sin, |_| 1.0),
    (UnaryOp::Cos, |_| 1.0),
    (UnaryOp::Relu, |b| b),
    (UnaryOp::GeluTanh, |b| b),
    (UnaryOp::GeluErf, |b| b),
    (UnaryOp::Silu, |b| b),
    (UnaryOp::Softplus, |b| b + 1.0),
];

/// Binary ops with a bound on the result given the operands' bounds.
const BINARY: [(BinaryOp, BinaryBound); 5] = [
    (BinaryOp::Add, |a, b| a + b),
    (BinaryOp::Sub, |a, b| a + b),
    (BinaryOp::Mul, |a, b| a * b),
    (BinaryOp::Max, f64::max),
    (BinaryOp::Min, f64::max),
];

mod common;
use common::Rng;

impl Rng {
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// A graph under construction with the values of its inputs and weights.
struct Gen {
    g: Graph,
    /// Float nodes that later steps may read, with their magnitude bounds.
    pool: Vec<(NodeId, f64)>,
    inputs: HashMap<String, Value>,
    weights: HashMap<String, Value>,
    rng: Rng,
}

impl Gen {
    fn new(shape: &[usize], seed: u64) -> Self {
        let mut gen = Gen { g: Graph::new(), pool: vec![], inputs: HashMap::new(), weights: HashMap::new(), rng: Rng(seed) };
        let x = gen.leaf(2, shape, 1.0);
        gen.pool.push((x, 1.0));
        gen
    }

    fn data(&mut self, ty: &TensorType, scale: f64) -> Vec<f64> {
        (0..ty.numel()).map(|_| self.rng.unit() * scale).collect()
    }

    /// A new input (kind 0 mod 3), weight (1) or constant (2) with values in [-scale, scale].
    fn leaf(&mut self, kind: u8, shape: &[usize], scale: f64) -> NodeId {
        let ty = TensorType::new(DType::F32, shape);
        let data = self.data(&ty, scale);
        match kind % 3 {
            0 => {
                let name = format!("w{}", self.weights.len());
                self.weights.insert(name.clone(), Value::new(ty.clone(), data).unwrap());
                self.g.weight(&name, DType::F32, shape).unwrap()
            }
            1 => {
                let data = if ty.numel() == 1 && scale == 1.0 { vec![[0.5, 1.0, 2.0, -1.0][self.rng.next() as usize % 4]] } else { data };
                let data = data.into_iter().map(|x| x as f32 as f64).collect();
                self.g.constant(DType::F32, shape, data).unwrap()
            }
            _ => {
                let name = format!("x{}", self.inputs.len());
                self.inputs.insert(name.clone(), Value::new(ty.clone(), data).unwrap());
                self.g.input(&name, DType::F32, shape).unwrap()
            }
        }
    }

    /// A pool node: usually one of the last two (deep chains), sometimes any.
    fn pick(&self, t: u8) -> (NodeId, f64) {
        let n = self.pool.len();
        let i = if t & 0xc0 == 0xc0 { t as usize % n } else { n - 1 - (t as usize % n.min(2)) };
        self.pool[i]
    }

    /// A pool node of the same dtype whose shape broadcasts with `a`'s.
    fn partner(&self, a: NodeId, t: u8) -> Option<(NodeId, f64)> {
        let sa = self.g.shape(a).to_vec();
        let ok: Vec<_> = self.pool.iter().copied().filter(|&(b, _)| broadcast(&sa, self.g.shape(b)).is_some()).collect();
        (!ok.is_empty()).then(|| ok[t as usize % ok.len()])
    }

    /// Makes `id` available to later steps unless its values or size could grow too large.
    fn add(&mut self, id: NodeId, bound: f64) {
        if bound <= LIMIT && self.g.ty(id).numel() <= MAX_ELEMENTS {
            self.pool.push((id, bound));
        }
    }

    /// A shape that broadcasts to `shape`, chosen by `t`.
    fn smaller(shape: &[usize], t: u8) -> Vec<usize> {
        let last = *shape.last().unwrap_or(&1);
        match t % 5 {
            0 => vec![],
            1 => vec![last],
            2 => vec![1; shape.len()],
            3 => shape.iter().enumerate().map(|(i, &d)| if i == 0 { 1 } else { d }).collect(),
            _ => shape.to_vec(),
        }
    }

    fn step(&mut self, (kind, t1, t2, t3): (u8, u8, u8, u8)) {
        let (a, ba) = self.pick(t1);
        let shape = self.g.shape(a).to_vec();
        if kind >= SIBLING_KINDS {
            return self.siblings(a, ba, &shape, t2, t3);
        }
        if kind >= JUNCTION_KINDS {
            // Above every kind the saved regressions use, so their graphs stay as they were.
            return self.junction(a, ba, &shape, t2, t3);
        }
        match kind % 13 {
            0 => {
                let (op, f) = UNARY[t2 as usize % UNARY.len()];
                let y = self.g.unary(op, a).unwrap();
                self.add(y, f(ba));
            }
            1 => {
                let Some((b, bb)) = self.partner(a, t2) else { return };
                let (op, f) = BINARY[t3 as usize % BINARY.len()];
                let (l, r) = if t3 & 0x80 != 0 { (b, a) } else { (a, b) };
                let y = self.g.binary(op, l, r).unwrap();
                self.add(y, f(ba, bb));
            }
            2 => {
                let leaf = self.leaf(t3, &Gen::smaller(&shape, t2), 1.0);
                let (op, f) = BINARY[(t3 / 3) as usize % BINARY.len()];
                let y = self.g.binary(op, a, leaf).unwrap();
                self.add(y, f(ba, 2.0));
            }
            3 => {
                // Constants only: folding must give the interpreter's value.
                let c = self.leaf(1, &Gen::smaller(&shape, t2), 1.0);
                let (op, f) = UNARY[t3 as usize % UNARY.len()];
                let u = self.g.unary(op, c).unwrap();
                let y = self.g.binary(BinaryOp::Mul, a, u).unwrap();
                self.add(y, ba * f(2.0));
            }
            4 => self.linear(a, ba, &shape, t2, t3),
            5 => {
                let numel: usize = shape.iter().product();
                let last = *shape.last().unwrap_or(&1);
                let to = match t2 % 3 {
                    0 => vec![numel],
                    1 => vec![numel / last, last],
                    _ => shape.iter().rev().copied().collect(),
                };
                let y = self.g.reshape(a, &to).unwrap();
                self.add(y, ba);
            }
            6 if !shape.is_empty() => {
                let axis = shape.len() - 1;
                let ops = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min];
                let op = ops[t2 as usize % 4];
                let y = self.g.reduce(op, a, &[axis], t3 % 2 == 0).unwrap();
                self.add(y, if op == ReduceOp::Sum { ba * shape[axis] as f64 } else { ba });
            }
            7 if !shape.is_empty() => {
                let y = self.g.softmax(a, shape.len() - 1).unwrap();
                self.add(y, 1.0);
            }
            8 => {
                let Some((b, bb)) = self.partner(a, t2) else { return };
                let cmp = [BinaryOp::Gt, BinaryOp::Lt, BinaryOp::Ge][t3 as usize % 3];
                let c = self.g.binary(cmp, a, b).unwrap();
                let (other, bo) = if t3 & 0x80 != 0 { (self.leaf(1, &[], 1.0), 2.0) } else { (b, bb) };
                let y = self.g.push(Op::Select, &[c, a, other]).unwrap();
                self.add(y, ba.max(bo));
            }
            9 => {
                let mut to = shape.clone();
                to.insert(0, 1 + t2 as usize % 3);
                let y = self.g.push(Op::Broadcast { shape: to }, &[a]).unwrap();
                let y = if t3 % 2 == 0 { self.g.unary(UnaryOp::Neg, y).unwrap() } else { y };
                self.add(y, ba);
            }
            10 if !shape.is_empty() => {
                // Integer detour: an i32 iota or input, an integer add, a cast, then a multiply.
                let last = *shape.last().unwrap_or(&1);
                let ity = TensorType::new(DType::I32, [last]);
                let i = if t2 % 2 == 0 {
                    self.g.push_source(Op::Iota { axis: 0, start: 0.0, step: 1.0 }, ity).unwrap()
                } else {
                    let name = format!("i{}", self.inputs.len());
                    let data = (0..last).map(|_| (self.rng.next() % 3) as f64).collect();
                    self.inputs.insert(name.clone(), Value::new(ity, data).unwrap());
                    self.g.input(&name, DType::I32, &[last]).unwrap()
                };
                let one = self.g.scalar(DType::I32, 1.0).unwrap();
                let j = self.g.add(i, one).unwrap();
                let f = self.g.push(Op::Cast { to: DType::F32 }, &[j]).unwrap();
                let y = self.g.mul(a, f).unwrap();
                self.add(y, ba * (last + 2) as f64);
            }
            11 => {
                // An exact copy of an earlier computed node, for CSE.
                let (p, bp) = self.pick(t2);
                let node = self.g.node(p).clone();
                if !node.op.is_source() {
                    let y = self.g.push(node.op, &node.inputs).unwrap();
                    self.add(y, bp);
                }
            }
            12 if shape.last().is_some_and(|&d| d >= 2 && d % 2 == 0) => {
                // RoPE's rotate_half with either half negated (or both), then an elementwise
                // reader: negation_through_concat's pattern.
                let (axis, d) = (shape.len() - 1, shape[shape.len() - 1]);
                let lo = self.g.slice(a, axis, 0, d / 2).unwrap();
                let hi = self.g.slice(a, axis, d / 2, d).unwrap();
                let neg = |g: &mut Graph, x: NodeId, on: bool| if on { g.unary(UnaryOp::Neg, x).unwrap() } else { x };
                let (hi, lo) = (neg(&mut self.g, hi, t2 % 3 != 1), neg(&mut self.g, lo, t2 % 3 != 0));
                let parts = if t3 % 2 == 0 { [hi, lo] } else { [lo, hi] };
                let rot = self.g.concat(&parts, axis).unwrap();
                let y = self.g.mul(rot, a).unwrap();
                self.add(y, ba * ba);
            }
            _ => {}
        }
    }

    /// `rms_norm(a + o)` with `o` a fresh leaf of `a`'s shape, maybe normalised itself, the sum
    /// also kept for later steps: the `residual_rms_norm` pass's pattern.
    fn junction(&mut self, a: NodeId, ba: f64, shape: &[usize], t2: u8, t3: u8) {
        let Some(&d) = shape.last() else { return };
        let norm = |g: &mut Graph, x: NodeId, w: NodeId| g.push(Op::RmsNorm { eps: 1e-6, add_one: t3 & 4 != 0 }, &[x, w]).unwrap();
        // |rms_norm(x)| <= sqrt(d) * max |w or 1 + w|.
        let nb = (d as f64).sqrt() * 2.0;
        let mut o = self.leaf(t2, shape, 1.0);
        let mut bo = 1.0;
        if t3.is_multiple_of(2) {
            let w = self.leaf(t2 / 3, &[d], 1.0);
            o = norm(&mut self.g, o, w);
            bo = nb;
        }
        let h = if t3 & 2 != 0 { self.g.add(o, a).unwrap() } else { self.g.add(a, o).unwrap() };
        let w = self.leaf(t3 / 8, &[d], 1.0);
        let n = norm(&mut self.g, h, w);
        self.add(h, ba + bo);
        self.add(n, nb);
    }

    /// Two or three products of `a` with weights of one shape, each maybe `+ bias`, with `N`
    /// chosen so that each product fills whole 256-byte blocks: the `stack_projections` pass's
    /// pattern (Q/K/V, gate/up).
    fn siblings(&mut self, a: NodeId, ba: f64, shape: &[usize], t2: u8, t3: u8) {
        let Some(&k) = shape.last() else { return };
        if shape.len() < 2 {
            return;
        }
        let rows = shape.iter().product::<usize>() / k;
        let n = 64 / gcd(rows, 64);
        let transpose = t3 & 1 != 0;
        let w_shape = if transpose { [n, k] } else { [k, n] };
        for i in 0..2 + t2 as usize % 2 {
            let w = self.leaf(0, &w_shape, 1.0 / k as f64);
            let mut y = self.g.matmul(a, w, transpose).unwrap();
            let mut b = ba;
            // Every product with a bias, or only some.
            if t3 & 2 != 0 || (t3 & 4 != 0 && i == 0) {
                let bias = self.leaf(0, &[n], 1.0);
                y = self.g.add(y, bias).unwrap();
                b += 1.0;
            }
            self.add(y, b);
        }
    }

    /// `a @ W (^T)`, then maybe `+ bias`, an activation, a residual `+ a`.
    fn linear(&mut self, a: NodeId, ba: f64, shape: &[usize], t2: u8, t3: u8) {
        if shape.len() < 2 {
            return;
        }
        let k = shape[shape.len() - 1];
        let n = if t3 & 0x40 != 0 { k } else { 1 + t2 as usize % 4 };
        let transpose = t2 & 0x80 != 0;
        let w_shape = if transpose { [n, k] } else { [k, n] };
        let w = self.leaf(0, &w_shape, 1.0 / k as f64);
        let mut y = self.g.matmul(a, w, transpose).unwrap();
        let mut b = ba;
        if t3 & 1 != 0 {
            let bias = self.leaf(0, &[n], 1.0);
            y = self.g.add(y, bias).unwrap();
            b += 1.0;
        }
        if t3 & 2 != 0 {
            let act = [UnaryOp::GeluTanh, UnaryOp::Relu, UnaryOp::Tanh, UnaryOp::Silu][(t3 >> 2) as usize % 4];
            y = self.g.unary(act, y).unwrap();
        }
        if t3 & 0x20 != 0 && n == k {
            y = self.g.add(y, a).unwrap();
            b += ba;
        }
        self.add(y, b);
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    kiln_graph::dtype::broadcast_shapes(a, b)
}

/// The graph a case decodes to, with its input and weight values.
fn decode(shape: &[usize], steps: &[(u8, u8, u8, u8)], seed: u64, outs: u8) -> Gen {
    let mut gen = Gen::new(shape, seed);
    for &s in steps {
        gen.step(s);
    }
    let n = gen.pool.len();
    let mut chosen = vec![n - 1];
    if outs & 1 != 0 {
        chosen.push(outs as usize % n);
    }
    if outs & 2 != 0 {
        chosen.push((outs as usize / 4) % n);
    }
    for (k, i) in chosen.into_iter().enumerate() {
        let id = gen.pool[i].0;
        gen.g.output(format!("out{k}"), id);
    }
    gen
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

fn check(gen: &Gen, pipeline: &Pipeline) -> Result<(), TestCaseError> {
    let want = interp::run(&gen.g, &gen.inputs, &gen.weights).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let names: Vec<_> = pipeline.passes.iter().map(|p| p.name).collect();
    let out = pipeline.run(&gen.g, None).map_err(|e| TestCaseError::fail(format!("{names:?}: {e}")))?;
    prop_assert!(verify(&out).is_ok());
    let got = interp::run(&out, &gen.inputs, &gen.weights).map_err(|e| TestCaseError::fail(format!("{names:?}: {e}")))?;
    for (name, w) in &want {
        let g = &got[name];
        prop_assert_eq!(&g.ty, &w.ty);
        for (i, (x, y)) in g.data.iter().zip(&w.data).enumerate() {
            prop_assert!(close(*x, *y), "{:?}: output {}[{}] is {} after, {} before", names, name, i, x, y);
        }
    }
    Ok(())
}

fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop::sample::select(vec![vec![4], vec![3, 4], vec![2, 3, 4], vec![1, 2, 4], vec![2, 1, 3], vec![2, 2, 2, 2]])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn passes_keep_interpreter_results(
        shape in shapes(),
        steps in prop::collection::vec(any::<(u8, u8, u8, u8)>(), 1..32),
        seed in any::<u64>(),
        outs in any::<u8>(),
    ) {
        let gen = decode(&shape, &steps, seed, outs);
        prop_assert!(verify(&gen.g).is_ok());
        for pass in Pass::ALL {
            check(&gen, &Pipeline::new(vec![pass]))?;
        }
        check(&gen, &Pipeline::standard())?;
    }

    #[test]
    fn the_standard_pipeline_is_idempotent(
        shape in shapes(),
        steps in prop::collection::vec(any::<(u8, u8, u8, u8)>(), 1..32),
        seed in any::<u64>(),
        outs in any::<u8>(),
    ) {
        let gen = decode(&shape, &steps, seed, outs);
        let once = Pipeline::standard().run(&gen.g, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let twice = Pipeline::standard().run(&once, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(kiln_graph::print::print(&twice), kiln_graph::print::print(&once));
    }
}

/// A case proptest found: a fused region computed `exp` in f64 while the same value outside
/// the region was stored in f32 (kept as a regression test).
#[test]
fn regression_fuse_elementwise_case_1() {
    let gen = decode(
        &[4],
        &[(43, 0, 0, 0), (7, 0, 0, 0), (12, 0, 30, 0), (59, 0, 6, 0), (20, 1, 154, 128), (101, 133, 0, 0)],
        4383956758958618707,
        78,
    );
    // ge(exp(x), exp(x)) with one side inside the region: true only if the region rounds
    // its intermediates to f32 as the unfused ops store them.
    check(&gen, &Pipeline::parse("fuse_elementwise").unwrap()).unwrap();
}
