//! Fused regions and matmul epilogues that hold casts (`Instr::Cast`: every value rounded to
//! its own dtype), on each backend of this build that runs here, against the interpreter bit
//! for bit: an i64 position read as f32, bf16 and f16 values inside f32 regions (the cpu and
//! cube backends keep activations in f32, so a narrower value lives only inside a region),
//! comparisons and selects on them, and a GEMM whose epilogue rounds the product to bf16 and
//! ends converting to f32. Inputs span many magnitudes, with f16 subnormals and overflow,
//! infinities, NaN and signed zeros; the operations are those whose f32 result rounds to the
//! narrower type exactly as the interpreter's f64 result does (+, -, *, /, max, comparisons,
//! select). The standard pipeline must form such regions from unfused nodes too.

use kiln_graph::interp::{run as interpret, Value};
use kiln_graph::passes::Pipeline;
use kiln_graph::program::Program;
use kiln_graph::{BinaryOp, DType, Expr, Graph, Instr, NodeId, Op, TensorType};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A value of magnitude 10^-9 .. 10^5, either sign, as f32 (integers for i64 inputs).
    fn value(&mut self, d: DType) -> f64 {
        if d == DType::I64 {
            return (self.next() * 70000.0).floor();
        }
        // Specials: infinities, NaN, zeros, the f16 overflow edge, f16 and f32 subnormals.
        const SPECIAL: [f64; 10] = [f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 0.0, -0.0, 65504.0, 65520.0, -65519.0, 3e-8, 1e-40];
        if self.next() < 0.05 {
            return d.round(SPECIAL[(self.next() * SPECIAL.len() as f64) as usize % SPECIAL.len()]);
        }
        let mag = 10f64.powf(self.next() * 14.0 - 9.0);
        let v = if self.next() < 0.5 { -mag } else { mag };
        // Some exact halfway cases between neighbouring bf16 and f16 values.
        if self.next() < 0.1 {
            let h = half::bf16::from_f64(v).to_f64();
            return (h + half::bf16::from_bits(half::bf16::from_f64(v).to_bits() + 1).to_f64()) / 2.0;
        }
        d.round(v)
    }
}

fn e(instrs: Vec<Instr>) -> Expr {
    Expr { instrs }
}

/// The regions: (name, expression, input dtypes).
fn regions() -> Vec<(&'static str, Expr, Vec<DType>)> {
    use BinaryOp::*;
    use Instr::*;
    let narrow = |d: DType| {
        // cast[f32](add(cast[d](mul(cast[f32](pos), $1)), div(cast[d]($2), cast[d]($1))))
        e(vec![
            Input(0),
            Cast(DType::F32, 0),
            Input(1),
            Binary(Mul, 1, 2),
            Cast(d, 3),
            Input(2),
            Cast(d, 5),
            Cast(d, 2),
            Binary(Div, 6, 7),
            Binary(Add, 4, 8),
            Const(0.3),
            Binary(Sub, 9, 10),
            Cast(DType::F32, 11),
        ])
    };
    let select = |d: DType| {
        // cast[f32](select(gt(a, b), mul(a, b), max(sub(a, b), -1.5))) with a, b in d.
        e(vec![
            Input(0),
            Cast(d, 0),
            Input(1),
            Cast(d, 2),
            Binary(Gt, 1, 3),
            Binary(Mul, 1, 3),
            Binary(Sub, 1, 3),
            Const(-1.5),
            Binary(Max, 6, 7),
            Select(4, 5, 8),
            Cast(DType::F32, 9),
        ])
    };
    vec![
        ("positions f32", e(vec![Input(0), Cast(DType::F32, 0), Input(1), Binary(Mul, 1, 2)]), vec![DType::I64, DType::F32]),
        ("bf16 inside", narrow(DType::BF16), vec![DType::I64, DType::F32, DType::F32]),
        ("f16 inside", narrow(DType::F16), vec![DType::I64, DType::F32, DType::F32]),
        ("bf16 select", select(DType::BF16), vec![DType::F32, DType::F32]),
        ("f16 select", select(DType::F16), vec![DType::F32, DType::F32]),
    ]
}

/// A graph of one fused node over inputs `[rows, 24]` (the second input broadcast from `[24]`).
fn region_graph(expr: &Expr, dtypes: &[DType]) -> Graph {
    let mut g = Graph::new();
    let ins: Vec<NodeId> = dtypes
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let shape: &[usize] = if i == 1 { &[24] } else { &[37, 24] };
            g.input(&format!("in{i}"), d, shape).unwrap()
        })
        .collect();
    let y = g.push(Op::Fused(expr.clone()), &ins).unwrap();
    g.output("y", y);
    g
}

/// A bf16-valued head in an f32 program: `x @ w^T` (small integers: every order of the
/// additions gives the exact product), rounded to bf16, soft-capped in bf16, then f32.
fn head_graph() -> Graph {
    use Instr::*;
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[5, 8]).unwrap();
    let w = g.input("w", DType::F32, &[12, 8]).unwrap();
    let epilogue = e(vec![
        Input(0),
        Cast(DType::BF16, 0),
        Const(0.37),
        Binary(BinaryOp::Mul, 1, 2),
        Input(1),
        Cast(DType::BF16, 4),
        Binary(BinaryOp::Add, 3, 5),
        Cast(DType::F32, 6),
    ]);
    let b = g.input("b", DType::F32, &[12]).unwrap();
    let y = g.push(Op::MatMul { transpose_b: true, epilogue: Some(epilogue) }, &[x, w, b]).unwrap();
    g.output("y", y);
    g
}

/// RoPE's angle computed inside a GEMM's epilogue (what `recompute_generators` makes): an
/// i64 position `[5, 1]` cast to f32, times a per-column frequency, rounded to bf16, beside the
/// product rounded to bf16; the epilogue reads the integer input as it is stored.
fn position_epilogue_graph() -> Graph {
    use Instr::*;
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[5, 8]).unwrap();
    let w = g.input("w", DType::F32, &[12, 8]).unwrap();
    let pos = g.input("pos", DType::I64, &[5, 1]).unwrap();
    let f = g.input("b", DType::F32, &[12]).unwrap();
    let epilogue = e(vec![
        Input(0),
        Cast(DType::BF16, 0),
        Input(1),
        Cast(DType::F32, 2),
        Input(2),
        Binary(BinaryOp::Mul, 3, 4),
        Cast(DType::BF16, 5),
        Binary(BinaryOp::Add, 1, 6),
        Cast(DType::F32, 7),
    ]);
    let y = g.push(Op::MatMul { transpose_b: true, epilogue: Some(epilogue) }, &[x, w, pos, f]).unwrap();
    g.output("y", y);
    g
}

/// Bits of the interpreter's and of `backend`'s outputs, on one set of random inputs.
fn both(g: &Graph, backend: &str, seed: u64, integers: bool) -> (Vec<u32>, Vec<u32>) {
    let mut r = Rng(seed | 1);
    let mut vals = HashMap::new();
    let mut tensors = Vec::new();
    for (_, name, ty) in g.inputs() {
        let v: Vec<f64> =
            (0..ty.numel()).map(|_| if integers && name != "b" { (r.next() * 5.0).floor() - 2.0 } else { r.value(ty.dtype) }).collect();
        tensors.push((name.to_string(), Tensor { ty: ty.clone(), bytes: kiln_runtime::tensor::from_f64(ty.dtype, &v) }));
        vals.insert(name.to_string(), Value::new(ty.clone(), v).unwrap());
    }
    let want: Vec<u32> = interpret(g, &vals, &HashMap::new()).unwrap()["y"].data.iter().map(|&v| (v as f32).to_bits()).collect();
    let b = kiln_runtime::by_name(backend).unwrap();
    let mut program = Program::new("casts", backend, "");
    let namer = |op: &Op, i: &[TensorType], o: &TensorType| b.kernel_for(op, i, o).unwrap();
    let (entry, _, _) = kiln_graph::lower::compile_entry(g, "forward", &mut program, &namer).unwrap();
    // Each kernel runs as itself, not through the interpreter.
    for step in &entry.steps {
        assert!(!step.kernel.contains("reference"), "{backend}: {} runs {}", step.op.name(), step.kernel);
    }
    program.entries.push(entry);
    let mut s = Session::new(program, Arc::new(WeightStore::empty())).unwrap();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let out = s.run("forward", &refs).unwrap();
    let y = &out.iter().find(|(n, _)| n == "y").expect("output y").1;
    let got = bytemuck::cast_slice::<u8, f32>(&y.bytes).iter().map(|v| v.to_bits()).collect();
    (want, got)
}

fn check(backend: &str) {
    let mut cases: Vec<(String, Graph, bool)> =
        regions().into_iter().map(|(name, expr, dtypes)| (name.to_string(), region_graph(&expr, &dtypes), false)).collect();
    cases.push(("bf16 head epilogue".into(), head_graph(), true));
    cases.push(("position epilogue".into(), position_epilogue_graph(), true));
    for (name, g, integers) in cases {
        for seed in 1..=8u64 {
            let (want, got) = both(&g, backend, seed * 0x9E37_79B9, integers);
            let same = |a: &u32, b: &u32| a == b || (f32::from_bits(*a).is_nan() && f32::from_bits(*b).is_nan());
            let bad = want.iter().zip(&got).position(|(a, b)| !same(a, b));
            if let Some(i) = bad {
                panic!("{backend} {name} seed {seed}: element {i}: {} (interpreter {})", f32::from_bits(got[i]), f32::from_bits(want[i]));
            }
            assert_eq!(want.len(), got.len());
        }
    }
}

#[test]
fn cpu_regions_with_casts_give_the_interpreters_bits() {
    check("cpu");
}

#[cfg(feature = "cube")]
#[test]
fn cube_regions_with_casts_give_the_interpreters_bits() {
    check("cube");
}

/// RoPE's angles in a bf16 program from unfused nodes: i64 positions cast to f32, reshaped,
/// times the frequencies, cos and sin, each cast to bf16. The standard pipeline makes each of
/// cos and sin one region holding both casts, with no cast step left.
#[test]
fn the_pipeline_fuses_the_position_and_angle_casts() {
    let mut g = Graph::new();
    let pos = g.input("pos", DType::I64, &[1, 16]).unwrap();
    let f = g.push(Op::Cast { to: DType::F32 }, &[pos]).unwrap();
    let f = g.reshape(f, &[1, 16, 1]).unwrap();
    let inv = g.constant(DType::F32, &[1, 1, 8], (0..8).map(|i| 1.0 / (i as f64 + 1.0)).collect()).unwrap();
    let a = g.mul(f, inv).unwrap();
    let c = g.unary(kiln_graph::UnaryOp::Cos, a).unwrap();
    let s = g.unary(kiln_graph::UnaryOp::Sin, a).unwrap();
    let c = g.push(Op::Cast { to: DType::BF16 }, &[c]).unwrap();
    let s = g.push(Op::Cast { to: DType::BF16 }, &[s]).unwrap();
    g.output("cos", c);
    g.output("sin", s);
    let opt = Pipeline::standard().run(&g, None).unwrap();
    let ops: Vec<String> = opt.nodes.iter().filter(|n| !n.op.is_source()).map(|n| n.op.name().to_string()).collect();
    assert_eq!(ops, ["reshape", "fused", "fused"], "{}", kiln_graph::print::print(&opt));
    let mut vals = HashMap::new();
    vals.insert(
        "pos".to_string(),
        Value::new(TensorType::new(DType::I64, vec![1, 16]), (0..16).map(|i| (i * 977) as f64).collect()).unwrap(),
    );
    let none = HashMap::new();
    assert_eq!(interpret(&g, &vals, &none).unwrap(), interpret(&opt, &vals, &none).unwrap());
}
