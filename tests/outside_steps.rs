//! The steps of a generation program outside the layers that issue 16 made one step each,
//! against what they replace, on each backend of this build:
//! - `gather_scaled` (the `gather_scale` pass: an embedding's `gather(E, ids) * sqrt(hidden)`):
//!   the same graph compiled with the standard pipeline and without the pass, run on the same
//!   inputs, with the table a weight that an LM head also reads transposed (the cpu backend
//!   then gathers from the head's packed panels). The values must be the same bits.
//! - `token_log_prob`: the element of `log_softmax` at the id, bit for bit on cpu (the host's
//!   f64 log-sum-exp); on cube (f32 arithmetic) within f32 rounding of the interpreter.
//! - cuda (no GPU here): each is one launch, the kernels compile with NVRTC, and the gather's
//!   arithmetic (`T(f32(x) * scale)`) gives the interpreter's bits in every float dtype.

use kiln::io;
use kiln_graph::interp::Value;
use kiln_graph::passes::{Pass, Pipeline};
use kiln_graph::program::Program;
use kiln_graph::{DType, Graph, Op, TensorType};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

const V: usize = 40;
const D: usize = 64;
/// sqrt(48): not a power of two, so the product rounds.
fn scale() -> f64 {
    48f64.sqrt()
}

/// `x = E[ids] * sqrt(48)` and `logits = x @ E^T` (a tied head), `E` the weight `embed [V, D]`.
fn embedding(dt: DType) -> Graph {
    let mut g = Graph::new();
    let e = g.weight("embed", dt, &[V, D]).unwrap();
    let ids = g.input("ids", DType::I64, &[1, 5]).unwrap();
    let x = g.push(Op::Gather { axis: 0 }, &[e, ids]).unwrap();
    let x = g.mul_scalar(x, scale()).unwrap();
    let h = g.reshape(x, &[5, D]).unwrap();
    let logits = g.matmul(h, e, true).unwrap();
    g.output("x", x);
    g.output("logits", logits);
    g
}

fn table() -> Vec<f32> {
    (0..V * D).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.0137).collect()
}

fn store() -> Arc<WeightStore> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("outside_steps");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    io::write(&path, &[("embed".to_string(), Tensor::from_f32(&[V, D], &table()))]).unwrap();
    Arc::new(WeightStore::open(&path).unwrap())
}

/// Outputs of `g` after `pipeline` on `backend`, by name, and the steps' op names.
fn run(
    g: &Graph,
    pipeline: &Pipeline,
    backend: &str,
    weights: Arc<WeightStore>,
    ins: &[(&str, &Tensor)],
) -> (Vec<(String, Vec<f32>)>, Vec<String>) {
    let opt = pipeline.run(g, None).unwrap();
    let b = kiln_runtime::by_name(backend).unwrap();
    let mut program = Program::new("outside", backend, "");
    let namer = |op: &Op, i: &[TensorType], o: &TensorType| b.kernel_for(op, i, o).unwrap();
    let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
    let ops = entry.steps.iter().map(|s| s.op.name().to_string()).collect();
    program.entries.push(entry);
    let mut s = Session::new(program, weights).unwrap();
    let mut out: Vec<(String, Vec<f32>)> =
        s.run("forward", ins).unwrap().into_iter().map(|(n, t)| (n, bytemuck::cast_slice::<u8, f32>(&t.bytes).to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (out, ops)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn gather_scaled_is_the_unfused_product(backend: &str) {
    let without = Pipeline::new(Pipeline::standard().passes.into_iter().filter(|p| p.name != Pass::GATHER_SCALE.name).collect());
    let g = embedding(DType::F32);
    let ids = Tensor::from_i64(&[1, 5], &[3, 0, 39, 3, 17]);
    let ins = [("ids", &ids)];
    let (got, ops) = run(&g, &Pipeline::standard(), backend, store(), &ins);
    let (want, before) = run(&g, &without, backend, store(), &ins);
    assert!(ops.contains(&"gather_scaled".to_string()) && !ops.contains(&"gather".to_string()), "{backend}: {ops:?}");
    assert_eq!(before.len(), ops.len() + 1, "{backend}: {before:?} -> {ops:?}");
    for ((name, a), (_, b)) in got.iter().zip(&want) {
        assert_eq!(bits(a), bits(b), "{backend} {name}: not the unfused bits");
    }
    // And the values are the table's rows times the scale (in f32).
    let t = table();
    let x = &got.iter().find(|(n, _)| n == "x").unwrap().1;
    for (k, &id) in [3usize, 0, 39, 3, 17].iter().enumerate() {
        for c in 0..D {
            assert_eq!(x[k * D + c], t[id * D + c] * scale() as f32, "{backend} row {k} column {c}");
        }
    }
}

#[test]
fn gather_scaled_cpu_gives_the_unfused_bits() {
    gather_scaled_is_the_unfused_product("cpu");
}

#[cfg(feature = "cube")]
#[test]
fn gather_scaled_cube_gives_the_unfused_bits() {
    gather_scaled_is_the_unfused_product("cube");
}

/// Logits `[3, 1000]` with a wide range, ids `[3]`: the one step and, where the backend has it,
/// the log-softmax's element at the id.
fn token_graph(with_log_softmax: bool) -> Graph {
    let mut g = Graph::new();
    let x = g.input("logits", DType::F32, &[3, 1000]).unwrap();
    let ids = g.input("ids", DType::I64, &[3]).unwrap();
    let lp = g.push(Op::TokenLogProb, &[x, ids]).unwrap();
    g.output("a_token", lp);
    if with_log_softmax {
        let all = g.push(Op::LogSoftmax, &[x]).unwrap();
        let at = g.reshape(ids, &[3, 1]).unwrap();
        let picked = g.push(Op::TakeAlongAxis { axis: 1 }, &[all, at]).unwrap();
        let picked = g.reshape(picked, &[3]).unwrap();
        g.output("b_log_softmax", picked);
    }
    g
}

fn token_inputs() -> (Tensor, Tensor) {
    let x: Vec<f32> = (0..3000).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.031).collect();
    (Tensor::from_f32(&[3, 1000], &x), Tensor::from_i64(&[3], &[0, 517, 999]))
}

#[test]
fn token_log_prob_cpu_is_the_log_softmax_element() {
    let (x, ids) = token_inputs();
    let (out, ops) =
        run(&token_graph(true), &Pipeline::standard(), "cpu", Arc::new(WeightStore::empty()), &[("logits", &x), ("ids", &ids)]);
    assert!(ops.contains(&"token_log_prob".to_string()), "{ops:?}");
    assert_eq!(bits(&out[0].1), bits(&out[1].1), "token_log_prob vs log_softmax + take_along_axis");
    // An id outside the vocabulary is an error naming it, not a read past the row.
    let bad = Tensor::from_i64(&[3], &[0, 1000, 2]);
    let g = Pipeline::standard().run(&token_graph(false), None).unwrap();
    let b = kiln_runtime::by_name("cpu").unwrap();
    let mut program = Program::new("outside", "cpu", "");
    let namer = |op: &Op, i: &[TensorType], o: &TensorType| b.kernel_for(op, i, o).unwrap();
    let (entry, _, _) = kiln_graph::lower::compile_entry(&g, "forward", &mut program, &namer).unwrap();
    program.entries.push(entry);
    let mut s = Session::new(program, Arc::new(WeightStore::empty())).unwrap();
    let e = s.run("forward", &[("logits", &x), ("ids", &bad)]).unwrap_err().to_string();
    assert!(e.contains("1000"), "{e}");
}

#[cfg(feature = "cube")]
#[test]
fn token_log_prob_cube_is_within_f32_rounding() {
    let (x, ids) = token_inputs();
    let (out, _) =
        run(&token_graph(false), &Pipeline::standard(), "cube", Arc::new(WeightStore::empty()), &[("logits", &x), ("ids", &ids)]);
    let ins: HashMap<String, Value> = [
        ("logits".to_string(), Value::new(x.ty.clone(), x.to_f64()).unwrap()),
        ("ids".to_string(), Value::new(ids.ty.clone(), ids.to_f64()).unwrap()),
    ]
    .into();
    let want = kiln_graph::interp::run(&token_graph(false), &ins, &HashMap::new()).unwrap();
    for (g, w) in out[0].1.iter().zip(&want["a_token"].data) {
        // About 1e-6 * log(V) relative: f32 sums of 1000 exponentials and their log.
        assert!((*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "cube {g} vs interpreter {w}");
    }
}

/// cuda without a GPU: one launch each, the kernels compile, and the gather kernel's arithmetic
/// (each value widened to f32, times the f32 scale, rounded to the dtype once) is the
/// interpreter's unfused product in bf16, f16 and f32.
#[cfg(feature = "cuda")]
#[test]
fn cuda_lowers_each_to_one_launch_with_the_unfused_arithmetic() {
    let cuda = kiln_runtime::by_name("cuda").unwrap();
    for (g, op) in [(embedding(DType::BF16), "gather_scaled"), (token_graph(false), "token_log_prob")] {
        let opt = Pipeline::standard().run(&g, None).unwrap();
        let mut program = Program::new("outside", "cuda", "");
        let namer = |op: &Op, i: &[TensorType], o: &TensorType| cuda.kernel_for(op, i, o).unwrap();
        let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
        program.entries.push(entry);
        let launches = cuda.launches(&program, 0).unwrap();
        let at = program.entries[0].steps.iter().position(|s| s.op.name() == op).unwrap_or_else(|| panic!("no {op} step"));
        assert_eq!(launches[at], 1, "{op}: {}", program.entries[0].steps[at].kernel);
        if kiln_kernels::cuda::nvrtc::available() {
            assert!(!kiln_runtime::cuda::compile_binaries(&program, "sm_90a").unwrap_or_else(|e| panic!("{e}")).is_empty());
        } else {
            assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "KILN_REQUIRE_NVRTC=1 but NVRTC is missing");
        }
    }
    for dt in [DType::BF16, DType::F16, DType::F32] {
        let c = dt.round(scale());
        let mut g = Graph::new();
        let t = g.input("t", dt, &[V * D]).unwrap();
        let s = g.scalar(dt, scale()).unwrap();
        let y = g.mul(t, s).unwrap();
        g.output("y", y);
        let vals: Vec<f64> = table().iter().map(|&v| dt.round(v as f64 * 37.0)).collect();
        let ins: HashMap<String, Value> = [("t".to_string(), Value::new(TensorType::new(dt, [V * D]), vals.clone()).unwrap())].into();
        let want = kiln_graph::interp::run(&g, &ins, &HashMap::new()).unwrap();
        for (v, w) in vals.iter().zip(&want["y"].data) {
            let kernel = dt.round(((*v as f32) * (c as f32)) as f64);
            assert_eq!(kernel.to_bits(), w.to_bits(), "{dt}: {v} * {c}");
        }
    }
}
