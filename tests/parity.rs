//! One test row per op: a small graph per case, run by every backend of this build (after the
//! standard passes, scheduling and planning) and by the reference interpreter (on the graph as
//! built), compared by normalised error. Written once over `Backend`: each backend runs every
//! row, except the cases it is listed as lacking (where its compile must fail with a message),
//! so a missing kernel is never a silent skip.

use kiln_graph::interp::{run, Value};
use kiln_graph::passes::Pipeline;
use kiln_graph::program::Program;
use kiln_graph::{Attention, BinaryOp, Conv, DType, Graph, MaskKind, NodeId, Op, ReduceOp, ResizeMode, TensorType, UnaryOp};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

#[path = "parity/rows.rs"]
mod rows;
use rows::*;

/// A deterministic input in [-1, 1] (integers: in [0, modulo)).
fn values(ty: &TensorType, seed: u64, modulo: usize) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..ty.numel())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if ty.dtype.is_float() {
                (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            } else {
                ((x >> 11) % modulo as u64) as f64
            }
        })
        .collect()
}

/// Runs `g` both ways and compares every output. `modulo` bounds integer inputs (indices).
///
/// With `KILN_PARITY_KEEP_GOING=1` (the device scripts) a failing case prints `PARITY FAIL`
/// and the test goes on to its next case, so one run on a lent GPU reports every failure;
/// the scripts count those lines. Without it the first failure fails the test.
fn check(name: &str, g: Graph, modulo: usize) {
    if std::env::var("KILN_PARITY_KEEP_GOING").is_ok_and(|v| v == "1") {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_case(name, g, modulo))) {
            Ok(()) => println!("PARITY OK {name}"),
            Err(e) => {
                let msg =
                    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                println!("PARITY FAIL {name}: {msg}");
            }
        }
    } else {
        check_case(name, g, modulo);
    }
}

fn check_case(name: &str, g: Graph, modulo: usize) {
    kiln_graph::verify::verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut ivals = HashMap::new();
    let mut tensors = Vec::new();
    for (i, (_, n, ty)) in g.inputs().enumerate() {
        let v = values(ty, i as u64 + 1, modulo);
        tensors.push((n.to_string(), Tensor { ty: ty.clone(), bytes: kiln_runtime::tensor::from_f64(ty.dtype, &v) }));
        ivals.insert(n.to_string(), Value::new(ty.clone(), v).unwrap());
    }
    let want = run(&g, &ivals, &HashMap::new()).unwrap_or_else(|e| panic!("{name}: interpreter: {e}"));
    let opt = Pipeline::standard().run(&g, None).unwrap_or_else(|e| panic!("{name}: passes: {e}"));
    // The device script runs only the backends it names (a GPU machine may lack Vulkan).
    let only = std::env::var("KILN_PARITY_BACKENDS").ok();
    // Half-precision rows: the interpreter rounds every op to the dtype, kernels accumulate in f32.
    let half = HALF.iter().any(|p| name.starts_with(p));
    for &(bname, tol, lacks) in BACKENDS {
        let tol = if half { tol.max(2e-2) } else { tol };
        if only.as_deref().is_some_and(|o| !o.split(',').any(|b| b == bname)) {
            continue;
        }
        if !device_present(bname) {
            continue;
        }
        let backend = kiln_runtime::by_name(bname).unwrap();
        let mut program = Program::new(name, bname, "");
        let refused = std::cell::RefCell::new(None);
        let namer = |op: &Op, ins: &[TensorType], out: &TensorType| match backend.kernel_for(op, ins, out) {
            Ok(k) => k,
            Err(e) => {
                refused.borrow_mut().get_or_insert(e);
                "unsupported".into()
            }
        };
        // A backend without a conv kernel gets the compiler's rewrite (gather + matmul), as
        // `kiln::compile` does.
        let lowered;
        let opt = if opt.nodes.iter().any(|n| matches!(n.op, Op::Conv(_)) && backend.kernel_for(&n.op, &tys(&opt, n), &n.ty).is_err()) {
            let p = Pipeline::new([vec![kiln_graph::passes::Pass::LOWER_CONV], Pipeline::standard().passes].concat());
            lowered = p.run(&g, None).unwrap_or_else(|e| panic!("{name}: passes: {e}"));
            &lowered
        } else {
            &opt
        };
        let (entry, _, _) = kiln_graph::lower::compile_entry(opt, "forward", &mut program, &namer).unwrap();
        let lacked = lacks.iter().any(|l| name.starts_with(l));
        match (refused.into_inner(), lacked) {
            (Some(e), false) => panic!("{name}: backend {bname} refuses it: {e}"),
            (Some(e), true) => {
                assert!(!e.is_empty(), "{name}: {bname} refused without saying why");
                eprintln!("{name}: {bname} lacks it: {e}");
                continue;
            }
            (None, true) => panic!("{name}: backend {bname} compiles it now; remove it from its list of lacking cases"),
            (None, false) => {}
        }
        program.entries.push(entry);
        let mut s = Session::new(program, Arc::new(WeightStore::empty())).unwrap_or_else(|e| panic!("{name}: {bname}: {e}"));
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let got = s.run("forward", &refs).unwrap_or_else(|e| panic!("{name}: {bname}: run: {e}"));
        perf(name, bname, &mut s, &refs);
        assert_eq!(got.len(), want.len(), "{name}: outputs");
        for (oname, t) in &got {
            let w = &want[oname];
            assert_eq!(t.ty, w.ty, "{name}/{oname}: type");
            let g = t.to_f64();
            let scale = w.data.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
            let err = g.iter().zip(&w.data).fold(0f64, |m, (a, b)| if a.is_nan() && b.is_nan() { m } else { m.max((a - b).abs()) }) / scale;
            assert!(
                err < tol,
                "{name}/{oname}: {bname}: normalised error {err:.3e}: got {:?} want {:?}",
                &g[..g.len().min(8)],
                &w.data[..w.data.len().min(8)]
            );
        }
    }
}

fn tys(g: &Graph, n: &kiln_graph::graph::Node) -> Vec<TensorType> {
    n.inputs.iter().map(|i| g.ty(*i).clone()).collect()
}

/// The perf mode: with `KILN_PARITY_PERF=N`, each row is also run N times per backend and its
/// median wall time printed (`PARITY PERF <backend> <median us> <row>`), so one harness both
/// checks and times every op on every backend.
fn perf(name: &str, bname: &str, s: &mut Session, refs: &[(&str, &Tensor)]) {
    let Some(runs) = std::env::var("KILN_PARITY_PERF").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0) else {
        return;
    };
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = std::time::Instant::now();
            s.run("forward", refs).unwrap_or_else(|e| panic!("{name}: {bname}: run: {e}"));
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!("PARITY PERF {bname} {:.1} {name}", times[runs / 2]);
}

/// Every backend of this build: name, tolerance (normalised error), and the cases it lacks
/// (by name prefix). The cube backend's tolerance allows for wgpu's polyfilled `erf`/`tanh`.
const BACKENDS: &[(&str, f64, &[&str])] = &[
    ("cpu", 1e-5, HALF),
    #[cfg(feature = "cube")]
    ("cube", 1e-4, CUBE_LACKS),
    #[cfg(feature = "cuda")]
    ("cuda", 1e-4, CUDA_LACKS),
    #[cfg(feature = "cube-cuda")]
    ("cube-cuda", 1e-4, CUBE_LACKS),
];

/// Whether backend `bname` has its device here. The cuda row runs only on a machine with an
/// NVIDIA driver (scripts/device_cuda.sh sets KILN_REQUIRE_GPU=1, making a missing one fatal).
fn device_present(bname: &str) -> bool {
    if bname != "cuda" {
        return true;
    }
    #[cfg(feature = "cuda")]
    if kiln_runtime::cuda::emulate::requested() {
        return true; // on the CPU (KILN_CUDA_EMULATE=1)
    }
    #[cfg(feature = "cuda")]
    if let Err(e) = kiln_runtime::cuda::driver_check() {
        assert!(std::env::var("KILN_REQUIRE_GPU").map_or(true, |v| v != "1"), "KILN_REQUIRE_GPU=1: {e}");
        return false;
    }
    true
}

/// The half-precision rows: the cpu and cube backends compute in f32 and refuse them.
const HALF: &[&str] = &["bf16 ", "f16 "];

/// Ops the cuda backend has no kernel for yet (its compile names them); convolutions run as the
/// compiler's gather + matmul rewrite.
#[cfg(feature = "cuda")]
const CUDA_LACKS: &[&str] = &["f32 gated_matmul"];

/// Ops the cube backend has no kernel for yet (its compile names them).
#[cfg(feature = "cube")]
const CUBE_LACKS: &[&str] = &["bf16 ", "f16 ", "sample_token", "log_softmax"];

fn f32in(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.input(name, DType::F32, shape).unwrap()
}

/// A case: a graph, its name, and the bound on its integer inputs.
struct Row {
    name: String,
    graph: Graph,
    modulo: usize,
}

fn row(name: impl Into<String>, graph: Graph, modulo: usize) -> Row {
    Row { name: name.into(), graph, modulo }
}

fn check_rows(rows: Vec<Row>) {
    for r in rows {
        check(&r.name, r.graph, r.modulo);
    }
}

fn one(name: &str, shape: &[usize], f: impl FnOnce(&mut Graph, NodeId) -> NodeId) -> Row {
    let mut g = Graph::new();
    let x = f32in(&mut g, "x", shape);
    let y = f(&mut g, x);
    g.output("y", y);
    row(name, g, 1)
}

fn unary_ops_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    use UnaryOp::*;
    for op in [Neg, Abs, Exp, Tanh, Sigmoid, Erf, Sin, Cos, Floor, Relu, GeluTanh, GeluErf, Silu, Softplus, Square] {
        rows.push(one(&format!("{op:?}"), &[3, 37], |g, x| g.unary(op, x).unwrap()));
    }
    // Ops with a restricted domain get a positive input.
    for op in [Log, Sqrt, Rsqrt, Recip] {
        rows.push(one(&format!("{op:?}"), &[3, 37], |g, x| {
            let a = g.unary(Abs, x).unwrap();
            let c = g.scalar(DType::F32, 0.5).unwrap();
            let p = g.add(a, c).unwrap();
            g.unary(op, p).unwrap()
        }));
    }
    rows
}

fn binary_ops_broadcast_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    use BinaryOp::*;
    for op in [Add, Sub, Mul, Div, Max, Min] {
        let mut g = Graph::new();
        let a = f32in(&mut g, "a", &[2, 3, 17]);
        let b = f32in(&mut g, "b", &[3, 1]);
        let y = g.binary(op, a, b).unwrap();
        g.output("y", y);
        rows.push(row(format!("{op:?}"), g, 1));
    }
    rows
}

fn select_with_comparison_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mut g = Graph::new();
    let a = f32in(&mut g, "a", &[4, 9]);
    let b = f32in(&mut g, "b", &[9]);
    let m = g.binary(BinaryOp::Gt, a, b).unwrap();
    let y = g.push(Op::Select, &[m, a, b]).unwrap();
    g.output("y", y);
    rows.push(row("select", g, 1));

    // A bool output of 3 elements (one byte each, packed four to a word on cube) and a u8 cast.
    let mut g = Graph::new();
    let a = f32in(&mut g, "a", &[3]);
    let zero = g.scalar(DType::F32, 0.0).unwrap();
    let m = g.binary(BinaryOp::Gt, a, zero).unwrap();
    g.output("mask", m);
    let s = g.push(Op::Cast { to: DType::U8 }, &[m]).unwrap();
    g.output("bytes", s);
    rows.push(row("bool and u8 outputs", g, 1));
    rows
}

fn reductions_and_softmax_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (op, axes) in [
        (ReduceOp::Sum, vec![2]),
        (ReduceOp::Mean, vec![1]),
        (ReduceOp::Max, vec![0, 2]),
        (ReduceOp::Min, vec![1, 2]),
        (ReduceOp::Sum, vec![1, 2]),
    ] {
        rows.push(one(&format!("reduce {op:?} {axes:?}"), &[2, 5, 7], |g, x| g.reduce(op, x, &axes, false).unwrap()));
    }
    rows.push(one("softmax last", &[3, 4, 50], |g, x| g.softmax(x, 2).unwrap()));
    rows.push(one("softmax middle", &[3, 4, 5], |g, x| g.softmax(x, 1).unwrap()));
    rows
}

fn matmuls_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (sa, sb, tb) in [
        (vec![5, 7], vec![7, 3], false),
        (vec![2, 5, 7], vec![3, 7], true),
        (vec![2, 5, 7], vec![2, 7, 3], false),
        (vec![2, 1, 5, 7], vec![3, 7, 4], false),
        // A shared left operand (Jet's token permutation applied to every image).
        (vec![6, 6], vec![2, 6, 5], false),
    ] {
        let mut g = Graph::new();
        let a = f32in(&mut g, "a", &sa);
        let b = f32in(&mut g, "b", &sb);
        let y = g.matmul(a, b, tb).unwrap();
        g.output("y", y);
        rows.push(row(format!("matmul {sa:?} x {sb:?} t={tb}"), g, 1));
    }
    // Bias, GELU and residual: fused into the epilogue by the passes.
    let mut g = Graph::new();
    let x = f32in(&mut g, "x", &[33, 16]);
    let w = f32in(&mut g, "w", &[24, 16]);
    let bias = f32in(&mut g, "bias", &[24]);
    let r = f32in(&mut g, "r", &[33, 24]);
    let y = g.matmul(x, w, true).unwrap();
    let y = g.add(y, bias).unwrap();
    let y = g.unary(UnaryOp::GeluTanh, y).unwrap();
    let y = g.add(y, r).unwrap();
    g.output("y", y);
    rows.push(row("matmul epilogue", g, 1));
    rows.push(gated_matmul_row(DType::F32));
    rows
}

fn movement_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    rows.push(one("permute", &[2, 3, 4, 5], |g, x| g.permute(x, &[0, 2, 3, 1]).unwrap()));
    rows.push(one("permute inner", &[6, 10, 12], |g, x| g.permute(x, &[2, 0, 1]).unwrap()));
    rows.push(one("slice step 2", &[4, 9, 3], |g, x| g.push(Op::Slice { axis: 1, start: 1, end: 8, step: 2 }, &[x]).unwrap()));
    rows.push(one("reshape+broadcast", &[6], |g, x| {
        let r = g.reshape(x, &[2, 1, 3]).unwrap();
        g.push(Op::Broadcast { shape: vec![2, 4, 3] }, &[r]).unwrap()
    }));
    let mut g = Graph::new();
    let a = f32in(&mut g, "a", &[2, 3, 4]);
    let b = f32in(&mut g, "b", &[2, 5, 4]);
    let y = g.concat(&[a, b], 1).unwrap();
    g.output("y", y);
    rows.push(row("concat", g, 1));
    rows.push(one("resize bicubic", &[2, 5, 6], |g, x| g.push(Op::Resize { size: [9, 4], mode: ResizeMode::Bicubic }, &[x]).unwrap()));
    rows.push(one("resize bilinear", &[2, 5, 6], |g, x| g.push(Op::Resize { size: [3, 11], mode: ResizeMode::Bilinear }, &[x]).unwrap()));
    rows
}

/// `x[:, :, 0]` of a `[G, S, K]` tensor as `[G, S]` (the top-1 gate row BPR sorts).
fn g_slice(g: &mut Graph, x: NodeId) -> NodeId {
    let s = g.shape(x).to_vec();
    let y = g.slice(x, 2, 0, 1).unwrap();
    g.reshape(y, &[s[0], s[1]]).unwrap()
}

fn moe_dispatch_and_combine_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    // 5 tokens, K = 2, 6 buffer rows; -1 is a dropped assignment, token 3 is dropped twice.
    let slots = vec![0.0, 4.0, 2.0, -1.0, 5.0, 1.0, -1.0, -1.0, 3.0, -1.0];
    let mut g = Graph::new();
    let x = f32in(&mut g, "x", &[5, 7]);
    let slot = g.constant(DType::I64, &[5, 2], slots.clone()).unwrap();
    let buf = g.push(Op::MoeDispatch { rows: 6 }, &[x, slot]).unwrap();
    g.output("buffers", buf);
    rows.push(row("moe_dispatch", g, 1));

    let mut g = Graph::new();
    let y = f32in(&mut g, "y", &[6, 7]);
    let w = f32in(&mut g, "w", &[5, 2]);
    let slot = g.constant(DType::I64, &[5, 2], slots).unwrap();
    let out = g.push(Op::MoeCombine, &[y, slot, w]).unwrap();
    g.output("combined", out);
    rows.push(row("moe_combine", g, 1));
    rows
}

/// Which op a node is, as an index below [`OP_KINDS`]: matching every op by name makes a new
/// op a compile error here, and [`every_op_has_a_row`] then fails until a row exercises it.
/// Sources (inputs, weights, constants) run no step and need no row.
fn op_kind(op: &Op) -> Option<usize> {
    Some(match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => return None,
        Op::Iota { .. } => 0,
        Op::Unary(_) => 1,
        Op::Binary(_) => 2,
        Op::Select => 3,
        Op::Cast { .. } => 4,
        Op::Reduce { .. } => 5,
        Op::MatMul { .. } => 6,
        Op::Reshape { .. } => 7,
        Op::Permute { .. } => 8,
        Op::Slice { .. } => 9,
        Op::Concat { .. } => 10,
        Op::Broadcast { .. } => 11,
        Op::Gather { .. } => 12,
        Op::TakeAlongAxis { .. } => 13,
        Op::ScatterAdd { .. } => 14,
        Op::TopK { .. } => 15,
        Op::CumSum { .. } => 16,
        Op::Resize { .. } => 17,
        Op::Softmax { .. } => 18,
        Op::LayerNorm { .. } => 19,
        Op::RmsNorm { .. } => 20,
        Op::Attention(_) => 21,
        Op::MoeDispatch { .. } => 22,
        Op::MoeCombine => 23,
        Op::WriteSlice { .. } => 24,
        Op::Fused(_) => 25,
        Op::Conv(_) => 26,
        Op::SampleToken => 27,
        Op::LogSoftmax => 28,
        Op::ResidualRmsNorm(_) => 29,
        Op::TokenLogProb => 30,
        Op::GatherScaled { .. } => 31,
        Op::GatedMatMul { .. } => 32,
    })
}
const OP_KINDS: usize = 33;

fn all_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for f in [
        unary_ops_rows,
        binary_ops_broadcast_rows,
        select_with_comparison_rows,
        reductions_and_softmax_rows,
        matmuls_rows,
        movement_rows,
        moe_dispatch_and_combine_rows,
        index_ops_rows,
        norms_rows,
        attention_variants_rows,
        write_slice_rows,
        half_rows,
        conv_rows,
    ] {
        rows.extend(f());
    }
    rows
}

/// Rows in which the cpu backend runs some step through the reference interpreter (there the
/// row compares the interpreter with itself for that step). Each is named here on purpose;
/// a row that gains or loses a fallback fails [`every_op_has_a_row`] until this list says so.
const CPU_INTERPRETED: &[&str] = &["bool and u8 outputs", "reduce Mean [1]", "reduce Max [0, 2]", "softmax middle", "cast + iota"];

#[test]
fn every_op_has_a_row() {
    let mut seen = [false; OP_KINDS];
    let cpu = kiln_runtime::by_name("cpu").unwrap();
    let mut interpreted = Vec::new();
    for r in all_rows() {
        let opt = Pipeline::standard().run(&r.graph, None).unwrap_or_else(|e| panic!("{}: passes: {e}", r.name));
        for n in r.graph.nodes.iter().chain(&opt.nodes) {
            if let Some(k) = op_kind(&n.op) {
                seen[k] = true;
            }
        }
        let mut program = Program::new(&r.name, "cpu", "");
        let namer =
            |op: &Op, ins: &[TensorType], out: &TensorType| cpu.kernel_for(op, ins, out).unwrap_or_else(|e| format!("unsupported: {e}"));
        let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
        if entry.steps.iter().any(|s| cpu.interpreted(&s.kernel)) {
            interpreted.push(r.name.clone());
        }
    }
    let missing: Vec<usize> = (0..OP_KINDS).filter(|&k| !seen[k]).collect();
    assert!(missing.is_empty(), "op kinds {missing:?} of `op_kind` have no parity row");
    assert_eq!(interpreted, CPU_INTERPRETED, "rows the cpu backend runs partly through the interpreter");
}

/// Convolutions as the PaliGemma mask decoder has them: a 3x3 conv with padding 1 and bias,
/// and a k4 s2 p1 transposed conv doubling the side.
fn conv_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (name, c, x, w) in [
        ("conv 3x3 pad 1", Conv { stride: [1, 1], pad: [1, 1], transposed: false }, [2, 6, 5, 8], [3, 3, 8, 4]),
        ("conv transposed k4 s2 p1", Conv { stride: [2, 2], pad: [1, 1], transposed: true }, [1, 4, 4, 8], [4, 4, 8, 6]),
    ] {
        let mut g = Graph::new();
        let xi = f32in(&mut g, "x", &x);
        let wi = f32in(&mut g, "w", &w);
        let bi = f32in(&mut g, "b", &[w[3]]);
        let y = g.push(Op::Conv(c), &[xi, wi]).unwrap();
        let y = g.binary(BinaryOp::Add, y, bi).unwrap();
        g.output("y", y);
        rows.push(row(name, g, 1));
    }
    rows
}

#[test]
fn convolutions() {
    check_rows(conv_rows());
}

#[test]
fn unary_ops() {
    check_rows(unary_ops_rows());
}

#[test]
fn binary_ops_broadcast() {
    check_rows(binary_ops_broadcast_rows());
}

#[test]
fn select_with_comparison() {
    check_rows(select_with_comparison_rows());
}

#[test]
fn reductions_and_softmax() {
    check_rows(reductions_and_softmax_rows());
}

#[test]
fn matmuls() {
    check_rows(matmuls_rows());
}

#[test]
fn movement() {
    check_rows(movement_rows());
}

#[test]
fn moe_dispatch_and_combine() {
    check_rows(moe_dispatch_and_combine_rows());
}

#[test]
fn index_ops() {
    check_rows(index_ops_rows());
}

#[test]
fn norms() {
    check_rows(norms_rows());
}

#[test]
fn attention_variants() {
    check_rows(attention_variants_rows());
}

#[test]
fn write_slice() {
    check_rows(write_slice_rows());
}

#[test]
fn half_precision() {
    check_rows(half_rows());
}

// Random shapes and axes for the ops whose kernels index by shape (proptest).
proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 6, ..Default::default() })]
    #[test]
    fn random_shapes(d0 in 1usize..4, d1 in 1usize..9, d2 in 1usize..40, axis in 0usize..3, k in 1usize..4) {
        let shape = [d0, d1, d2];
        let other = (axis + 1) % 3;
        let axes = if axis < other { vec![axis, other] } else { vec![other, axis] };
        check_rows(vec![one(&format!("prop reduce sum {shape:?} {axis}"), &shape, |g, x| g.reduce(ReduceOp::Sum, x, &[axis], false).unwrap())]);
        check_rows(vec![one(&format!("prop reduce max {shape:?} {axes:?}"), &shape, |g, x| g.reduce(ReduceOp::Max, x, &axes, true).unwrap())]);
        check_rows(vec![one(&format!("prop softmax {shape:?} {axis}"), &shape, |g, x| g.softmax(x, axis).unwrap())]);
        check_rows(vec![one(&format!("prop cumsum {shape:?} {axis}"), &shape, |g, x| g.push(Op::CumSum { axis, exclusive: k == 2 }, &[x]).unwrap())]);
        let kk = k.min(d2);
        check_rows(vec![one(&format!("prop topk {shape:?} {kk}"), &shape, |g, x| {
            let i = g.push(Op::TopK { k: kk }, &[x]).unwrap();
            g.push(Op::TakeAlongAxis { axis: 2 }, &[x, i]).unwrap()
        })]);

        let mut g = Graph::new();
        let t = f32in(&mut g, "table", &[d2 + 1, d1]);
        let ids = g.input("ids", DType::I64, &[d0, k]).unwrap();
        let y = g.push(Op::Gather { axis: 0 }, &[t, ids]).unwrap();
        g.output("y", y);
        check(&format!("prop gather {d2} {d1} {d0}x{k}"), g, d2 + 1);

        let mut g = Graph::new();
        let a = f32in(&mut g, "a", &[d0, 1, d1, d2]);
        let b = f32in(&mut g, "b", &[k, d2, 3]);
        let y = g.matmul(a, b, false).unwrap();
        g.output("y", y);
        check(&format!("prop matmul [{d0}, 1, {d1}, {d2}] x [{k}, {d2}, 3]"), g, 1);
    }
}
