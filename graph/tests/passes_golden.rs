//! Golden tests of the passes, Cranelift style: each `tests/golden/*.txt` file holds IR in
//! the printer's text form, the passes to run, and under `check:` the exact text the
//! printer must give afterwards. Any change to a pass's output or to the printer fails
//! here; update the file after reading the new text. Each file is also run through the
//! interpreter before and after, on fixed pseudo-random inputs and weights.
//!
//! File format (lines starting with `;` are comments, blank lines are ignored):
//!
//! ```text
//! passes: cse, dead_code          (names, or `standard`)
//! build: pre_ln_block             (optional: the graph comes from a builder function,
//!                                  and `input:` must be its printed form)
//! input:
//! %0 = input["x"]() : f32[2,3]
//! ...
//! check:
//! ...
//! ```

use kiln_graph::interp::{self, Value};
use kiln_graph::passes::Pipeline;
use kiln_graph::print::print;
use kiln_graph::{Attention, BinaryOp, DType, Graph, MaskKind, NodeId, Op, ReduceOp, TensorType, UnaryOp};
use std::collections::HashMap;

const UNARY: [UnaryOp; 20] = [
    UnaryOp::Neg,
    UnaryOp::Abs,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Recip,
    UnaryOp::Square,
    UnaryOp::Tanh,
    UnaryOp::Sigmoid,
    UnaryOp::Erf,
    UnaryOp::Sin,
    UnaryOp::Cos,
    UnaryOp::Floor,
    UnaryOp::Relu,
    UnaryOp::GeluTanh,
    UnaryOp::GeluErf,
    UnaryOp::Silu,
    UnaryOp::Softplus,
    UnaryOp::Not,
];

const BINARY: [BinaryOp; 15] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Max,
    BinaryOp::Min,
    BinaryOp::Pow,
    BinaryOp::Eq,
    BinaryOp::Ne,
    BinaryOp::Lt,
    BinaryOp::Le,
    BinaryOp::Gt,
    BinaryOp::Ge,
    BinaryOp::And,
    BinaryOp::Or,
];

fn lower<T: std::fmt::Debug>(x: &T) -> String {
    format!("{x:?}").to_lowercase()
}

/// Splits `a=1, b=[1, 2], c` at top-level commas.
fn split_attrs(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if !s[start..].trim().is_empty() {
        parts.push(s[start..].trim());
    }
    parts
}

/// The value of `key=value` among the attributes.
fn attr<'a>(attrs: &[&'a str], key: &str) -> &'a str {
    attrs
        .iter()
        .find_map(|a| a.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("attribute {key} missing from {attrs:?}"))
}

fn list<T: std::str::FromStr>(s: &str) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    inner.split(',').map(str::trim).filter(|x| !x.is_empty()).map(|x| x.parse().unwrap()).collect()
}

fn parse_type(s: &str) -> TensorType {
    let (d, rest) = s.trim().split_once('[').unwrap();
    TensorType::new(DType::parse(d).unwrap(), list::<usize>(&format!("[{rest}")))
}

fn parse_op(name: &str, a: &str) -> Op {
    let attrs = split_attrs(a);
    match name {
        "input" => Op::Input { name: a.trim_matches('"').to_string() },
        "weight" => Op::Weight { name: a.trim_matches('"').to_string() },
        "constant" => Op::Constant { values: list(a) },
        "iota" => Op::Iota {
            axis: attr(&attrs, "axis").parse().unwrap(),
            start: attr(&attrs, "start").parse().unwrap(),
            step: attr(&attrs, "step").parse().unwrap(),
        },
        "unary" => Op::Unary(*UNARY.iter().find(|u| lower(*u) == a).unwrap()),
        "binary" => Op::Binary(*BINARY.iter().find(|b| lower(*b) == a).unwrap()),
        "select" => Op::Select,
        "cast" => Op::Cast { to: DType::parse(a).unwrap() },
        "reduce" => Op::Reduce {
            op: *[ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min].iter().find(|r| lower(*r) == attrs[0]).unwrap(),
            axes: list(attr(&attrs, "axes")),
            keep_dims: attr(&attrs, "keep_dims").parse().unwrap(),
        },
        "matmul" => {
            assert!(a.is_empty() || a == "b^T", "matmul attributes '{a}' are not parsed here");
            Op::MatMul { transpose_b: a == "b^T", epilogue: None }
        }
        "reshape" => Op::Reshape { shape: list(a) },
        "permute" => Op::Permute { perm: list(a) },
        "broadcast" => Op::Broadcast { shape: list(a) },
        "softmax" => Op::Softmax { axis: attr(&attrs, "axis").parse().unwrap() },
        "layer_norm" => Op::LayerNorm { eps: attr(&attrs, "eps").parse().unwrap() },
        "attention" => {
            assert_eq!(attr(&attrs, "mask"), "none", "only mask=none is parsed here");
            let softcap = attrs.iter().find_map(|x| x.strip_prefix("softcap=")).map(|c| c.parse().unwrap());
            Op::Attention(Attention { scale: attr(&attrs, "scale").parse().unwrap(), softcap, mask: MaskKind::None })
        }
        other => panic!("op '{other}' is not parsed by the golden tests"),
    }
}

/// Parses the printer's text form back into a graph (the ops the golden files use).
fn parse(text: &str) -> Graph {
    let mut g = Graph::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("output ") {
            let (name, id) = rest.split_once(" = ").unwrap();
            g.output(name.trim_matches('"'), NodeId(id.trim_start_matches('%').parse().unwrap()));
            continue;
        }
        let (lhs, rhs) = line.split_once(" = ").unwrap_or_else(|| panic!("bad line: {line}"));
        assert_eq!(lhs, format!("%{}", g.nodes.len()), "nodes must be numbered in order: {line}");
        let (body, ty) = rhs.rsplit_once(" : ").unwrap();
        let ty = parse_type(ty);
        let open = body.find(['[', '(']).unwrap();
        let name = &body[..open];
        let (attrs, rest) = if body[open..].starts_with('[') {
            let mut depth = 0;
            let close = body[open..]
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '[' => 1,
                        ']' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .unwrap()
                .0;
            (&body[open + 1..open + close], &body[open + close + 1..])
        } else {
            ("", &body[open..])
        };
        let ins: Vec<NodeId> = rest
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| NodeId(x.trim_start_matches('%').parse().unwrap()))
            .collect();
        let op = parse_op(name, attrs);
        let id = if op.is_source() || matches!(op, Op::Iota { .. }) {
            g.push_source(op, ty.clone()).unwrap()
        } else {
            g.push(op, &ins).unwrap_or_else(|e| panic!("{line}: {e}"))
        };
        assert_eq!(g.ty(id), &ty, "{line}: the rule gives {}", g.ty(id));
    }
    g
}

/// The sections of a golden file.
struct Golden {
    passes: String,
    build: Option<String>,
    input: String,
    check: String,
}

fn read_golden(name: &str) -> Golden {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (mut passes, mut build, mut input, mut check) = (None, None, String::new(), String::new());
    let mut section: Option<&str> = None;
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        if let Some(p) = line.strip_prefix("passes:") {
            passes = Some(p.trim().to_string());
        } else if let Some(b) = line.strip_prefix("build:") {
            build = Some(b.trim().to_string());
        } else if line == "input:" || line == "check:" {
            section = Some(line);
        } else {
            let dst = match section {
                Some("input:") => &mut input,
                Some("check:") => &mut check,
                _ => panic!("{path}: line outside a section: {line}"),
            };
            dst.push_str(line);
            dst.push('\n');
        }
    }
    Golden { passes: passes.unwrap_or_else(|| panic!("{path}: no passes: line")), build, input, check }
}

/// Deterministic values in [-1, 1) for a tensor (splitmix64 of the name and index).
fn values(name: &str, ty: &TensorType) -> Value {
    let seed = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let data = (0..ty.numel() as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Value::new(ty.clone(), data).unwrap()
}

fn assert_same_results(before: &Graph, after: &Graph) {
    let inputs: HashMap<_, _> = before.inputs().map(|(_, n, t)| (n.to_string(), values(n, t))).collect();
    let weights: HashMap<_, _> = before.weights().map(|(_, n, t)| (n.to_string(), values(n, t))).collect();
    let want = interp::run(before, &inputs, &weights).unwrap();
    let got = interp::run(after, &inputs, &weights).unwrap();
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!(g.ty, w.ty, "output {name}");
        for (i, (a, b)) in g.data.iter().zip(&w.data).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "output {name}[{i}]: {a} after the passes, {b} before");
        }
    }
}

fn run_golden(name: &str, build: Option<fn() -> Graph>) {
    let golden = read_golden(name);
    let graph = match (build, &golden.build) {
        (Some(f), Some(_)) => {
            let g = f();
            assert_eq!(print(&g), golden.input, "{name}: the builder's graph differs from the file's input: section");
            g
        }
        (None, None) => {
            let g = parse(&golden.input);
            assert_eq!(print(&g), golden.input, "{name}: the input does not print back as written");
            g
        }
        _ => panic!("{name}: build: line and builder function must go together"),
    };
    let pipeline = Pipeline::parse(&golden.passes).unwrap();
    let out = pipeline.run(&graph, None).unwrap();
    let actual = print(&out);
    assert!(actual == golden.check, "{name}: the passes' output changed.\n--- expected\n{}--- actual\n{actual}", golden.check);
    assert_same_results(&graph, &out);
}

#[test]
fn dead_code() {
    run_golden("dce.txt", None);
}

#[test]
fn constant_fold() {
    run_golden("constfold.txt", None);
}

#[test]
fn cse() {
    run_golden("cse.txt", None);
}

#[test]
fn epilogue_fusion() {
    run_golden("epilogue.txt", None);
}

#[test]
fn stacked_projections() {
    run_golden("stack.txt", None);
}

#[test]
fn elementwise_fusion() {
    run_golden("fuse_elementwise.txt", None);
}

/// A pre-LN transformer block (ViT encoder layer): attention and MLP sublayers, each
/// `x + f(layer_norm(x))`, with `x @ W^T + b` projections against weight nodes.
fn pre_ln_block() -> Graph {
    const B: usize = 1;
    const S: usize = 4;
    const D: usize = 8;
    const H: usize = 2;
    const MLP: usize = 16;
    let mut g = Graph::new();
    let f32 = DType::F32;
    let x = g.input("x", f32, &[B, S, D]).unwrap();
    let linear = |g: &mut Graph, x: NodeId, name: &str, d_in: usize, d_out: usize| {
        let w = g.weight(&format!("{name}.w"), f32, &[d_out, d_in]).unwrap();
        let b = g.weight(&format!("{name}.b"), f32, &[d_out]).unwrap();
        let y = g.matmul(x, w, true).unwrap();
        g.add(y, b).unwrap()
    };
    let norm = |g: &mut Graph, x: NodeId, name: &str| {
        let s = g.weight(&format!("{name}.scale"), f32, &[D]).unwrap();
        let b = g.weight(&format!("{name}.bias"), f32, &[D]).unwrap();
        g.layer_norm(x, s, b, 1e-6).unwrap()
    };
    // Attention sublayer.
    let h = norm(&mut g, x, "ln1");
    let heads = |g: &mut Graph, t: NodeId| g.reshape(t, &[B, S, H, D / H]).unwrap();
    let q = linear(&mut g, h, "q", D, D);
    let q = heads(&mut g, q);
    let k = linear(&mut g, h, "k", D, D);
    let k = heads(&mut g, k);
    let v = linear(&mut g, h, "v", D, D);
    let v = heads(&mut g, v);
    let scale = 1.0 / ((D / H) as f32).sqrt();
    let a = g.attention(q, k, v, Attention { scale, softcap: None, mask: MaskKind::None }).unwrap();
    let a = g.reshape(a, &[B, S, D]).unwrap();
    let o = linear(&mut g, a, "out", D, D);
    let x = g.add(x, o).unwrap();
    // MLP sublayer.
    let h = norm(&mut g, x, "ln2");
    let m = linear(&mut g, h, "fc1", D, MLP);
    let m = g.unary(UnaryOp::GeluTanh, m).unwrap();
    let m = linear(&mut g, m, "fc2", MLP, D);
    let y = g.add(x, m).unwrap();
    g.output("y", y);
    g
}

#[test]
fn standard_pipeline_on_a_pre_ln_block() {
    run_golden("pre_ln_block.txt", Some(pre_ln_block));
}

/// RoPE as Gemma builds it (`x * cos + rotate_half(x) * sin`, rotate_half as two slices, a
/// negation and a concat) on `[B, S, H, D]`; `x` is also read by another op.
fn rope() -> Graph {
    let mut g = Graph::new();
    let f32 = DType::F32;
    let x = g.input("x", f32, &[1, 2, 2, 4]).unwrap();
    let cos = g.input("cos", f32, &[1, 2, 1, 4]).unwrap();
    let sin = g.input("sin", f32, &[1, 2, 1, 4]).unwrap();
    let x1 = g.slice(x, 3, 0, 2).unwrap();
    let x2 = g.slice(x, 3, 2, 4).unwrap();
    let n2 = g.unary(UnaryOp::Neg, x2).unwrap();
    let rot = g.concat(&[n2, x1], 3).unwrap();
    let a = g.mul(x, cos).unwrap();
    let r = g.mul(rot, sin).unwrap();
    let y = g.add(a, r).unwrap();
    g.output("y", y);
    let e = g.unary(UnaryOp::Exp, x).unwrap();
    g.output("e", e);
    g
}

#[test]
fn rope_negation_through_concat() {
    run_golden("rope.txt", Some(rope));
}

#[test]
fn rope_standard_pipeline() {
    run_golden("rope_standard.txt", Some(rope));
}

/// PaliGemma's token embeddings: `E[ids] * sqrt(hidden)` (hidden 4 here: a scale of 2.5 is
/// used, not a power of two) merged with image features by a select, as its builder does.
fn embedding_merge() -> Graph {
    let mut g = Graph::new();
    let e = g.weight("embed", DType::F32, &[6, 4]).unwrap();
    let ids = g.constant(DType::I64, &[1, 3], vec![5.0, 0.0, 2.0]).unwrap();
    let img = g.input("img", DType::F32, &[1, 3, 4]).unwrap();
    let is_img = g.constant(DType::Bool, &[1, 3, 1], vec![1.0, 0.0, 0.0]).unwrap();
    let text = g.push(Op::Gather { axis: 0 }, &[e, ids]).unwrap();
    let text = g.mul_scalar(text, 2.5).unwrap();
    let x = g.push(Op::Select, &[is_img, img, text]).unwrap();
    g.output("x", x);
    g
}

#[test]
fn embedding_scale_in_the_gather() {
    run_golden("gather_scale.txt", Some(embedding_merge));
}

#[test]
fn casts_join_regions_and_epilogues() {
    run_golden("casts.txt", None);
}

/// RoPE in bf16 with its angles from i64 positions: `cos(cast(pos) * f)` and `sin(..)`, each
/// cast to bf16, then `x * cos + rotate_half(x) * sin`.
fn rope_positions() -> Graph {
    let mut g = Graph::new();
    let pos = g.input("pos", DType::I64, &[1, 2]).unwrap();
    let f = g.constant(DType::F32, &[1, 1, 1, 4], vec![1.0, 0.5, 1.0, 0.5]).unwrap();
    let x = g.input("x", DType::BF16, &[1, 2, 2, 4]).unwrap();
    let p = g.push(Op::Cast { to: DType::F32 }, &[pos]).unwrap();
    let p = g.reshape(p, &[1, 2, 1, 1]).unwrap();
    let a = g.mul(p, f).unwrap();
    let (cos, sin) = (g.unary(UnaryOp::Cos, a).unwrap(), g.unary(UnaryOp::Sin, a).unwrap());
    let cos = g.push(Op::Cast { to: DType::BF16 }, &[cos]).unwrap();
    let sin = g.push(Op::Cast { to: DType::BF16 }, &[sin]).unwrap();
    let x1 = g.slice(x, 3, 0, 2).unwrap();
    let x2 = g.slice(x, 3, 2, 4).unwrap();
    let n2 = g.unary(UnaryOp::Neg, x2).unwrap();
    let rot = g.concat(&[n2, x1], 3).unwrap();
    let (a, r) = (g.mul(x, cos).unwrap(), g.mul(rot, sin).unwrap());
    let y = g.add(a, r).unwrap();
    g.output("y", y);
    g
}

#[test]
fn rope_angles_inside_their_readers() {
    run_golden("generators.txt", Some(rope_positions));
}

#[test]
fn every_golden_file_has_a_test() {
    let dir = format!("{}/tests/golden", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".txt"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "casts.txt",
            "constfold.txt",
            "cse.txt",
            "dce.txt",
            "epilogue.txt",
            "fuse_elementwise.txt",
            "gather_scale.txt",
            "generators.txt",
            "pre_ln_block.txt",
            "rope.txt",
            "rope_standard.txt",
            "stack.txt"
        ]
    );
}
