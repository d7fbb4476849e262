//! The cuda backend's half-precision kernels against the interpreter: tensor-core attention
//! for every head dim and mask kind, split-K decode, norms, and cuBLASLt GEMMs with fused
//! epilogues, in bf16 and f16 (tests/parity.rs covers every op in f32); the index and
//! axis ops at sizes that use every path of their kernels (scans of several chunks, ties
//! in top-k, repeated scatter indices), with partially broadcast batched matmuls; the
//! small-M GEMV (forced on, so its correctness does not depend on a timing) and residual
//! epilogues in bf16, f16 and f32; every variant of the tensor-core prefill (forced through a
//! tuning table for this card) at head dim 72 with every mask kind.
//!
//! Runs only where an NVIDIA driver is present (scripts/device_cuda.sh, which sets
//! KILN_REQUIRE_GPU=1 so that a missing driver fails instead of skipping).
#![cfg(feature = "cuda")]

use kiln_graph::interp::{run, Value};
use kiln_graph::passes::Pipeline;
use kiln_graph::program::Program;
use kiln_graph::tuning::{AttentionShape, TuningEntry};
use kiln_graph::{Attention, BinaryOp, DType, Graph, MaskKind, NodeId, Op, ResizeMode, TensorType, UnaryOp};
use kiln_kernels::cuda::attn::AttnVariant;
use kiln_runtime::cuda::{attn_tune, tune::GemvMode, CudaBackend};
use kiln_runtime::{Backend, Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

fn gpu() -> bool {
    if kiln_runtime::cuda::emulate::requested() {
        return true; // on the CPU (KILN_CUDA_EMULATE=1: scripts/test.sh runs this file so too)
    }
    match kiln_runtime::cuda::driver_check() {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var("KILN_REQUIRE_GPU").map_or(true, |v| v != "1"), "KILN_REQUIRE_GPU=1: {e}");
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// Runs `g` on the cuda backend and the interpreter; returns the normalised error.
fn error(name: &str, g: Graph) -> f64 {
    error_with(name, g, GemvMode::Auto)
}

/// [`error`] with the GEMV forced `on` or `off`, or chosen by measurement (`Auto`).
fn error_with(name: &str, g: Graph, gemv: GemvMode) -> f64 {
    error_tuned(name, g, gemv, vec![])
}

/// [`error_with`] with a tuning table stored in the program (its choices apply at load).
fn error_tuned(name: &str, g: Graph, gemv: GemvMode, tuning: Vec<TuningEntry>) -> f64 {
    let mut ivals = HashMap::new();
    let mut tensors = Vec::new();
    for (i, (_, n, ty)) in g.inputs().enumerate() {
        let v: Vec<f64> = values(ty.numel(), i as u64 + 1).into_iter().map(|x| ty.dtype.round(x)).collect();
        tensors.push((n.to_string(), Tensor { ty: ty.clone(), bytes: kiln_runtime::tensor::from_f64(ty.dtype, &v) }));
        ivals.insert(n.to_string(), Value::new(ty.clone(), v).unwrap());
    }
    let want = run(&g, &ivals, &HashMap::new()).unwrap_or_else(|e| panic!("{name}: interpreter: {e}"));
    let opt = Pipeline::standard().run(&g, None).unwrap();
    let backend = CudaBackend { gemv, ..Default::default() };
    let mut program = Program::new(name, "cuda", "");
    let namer = |op: &Op, ins: &[TensorType], out: &TensorType| backend.kernel_for(op, ins, out).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
    let mut kernels: Vec<String> = entry.steps.iter().map(|s| s.kernel.clone()).collect();
    // A prefill step the table names a variant for shows it; an attention entry that applies
    // to no step would test the default kernel in its place: a failure.
    for (k, s) in kernels.iter_mut().zip(&entry.steps) {
        let named = tuning.iter().find_map(|e| attn_tune::tabled(s, &tuning, &e.card));
        if let (Some(v), Some((t, d, _))) = (named, AttnVariant::of_kernel(&s.kernel)) {
            *k = v.kernel(t, d);
        }
    }
    if tuning.iter().any(|e| e.kernel == "attention")
        && !kernels.iter().any(|k| AttnVariant::of_kernel(k).is_some_and(|x| !x.2.is_default()))
    {
        println!("{name:<48} VARIANT NOT APPLIED: no step matches {tuning:?}  kernels {kernels:?}");
        return f64::INFINITY;
    }
    program.entries.push(entry);
    program.tuning = tuning;
    // A failure is reported and counted, not a panic: the test goes on to the next case, so
    // one run on a lent GPU shows every failing case.
    let mut s = match Session::with_backend(program, Arc::new(WeightStore::empty()), &backend) {
        Ok(s) => s,
        Err(e) => {
            println!("{name:<48} LOAD FAILED: {e}");
            return f64::INFINITY;
        }
    };
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let got = match s.run("forward", &refs) {
        Ok(g) => g,
        Err(e) => {
            println!("{name:<48} RUN FAILED: {e}  kernels {kernels:?}");
            return f64::INFINITY;
        }
    };
    let mut worst = 0f64;
    let mut each = Vec::new();
    for (oname, t) in &got {
        let w = &want[oname];
        let scale = w.data.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
        let err = t.to_f64().iter().zip(&w.data).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale;
        worst = worst.max(err);
        each.push(format!("{oname} {err:.1e}"));
    }
    let each = if got.len() > 1 { format!("  [{}]", each.join(", ")) } else { String::new() };
    println!("{name:<48} err {worst:.2e}{each}  kernels {kernels:?}");
    worst
}

fn input(g: &mut Graph, name: &str, d: DType, shape: &[usize]) -> NodeId {
    g.input(name, d, shape).unwrap()
}

#[test]
fn half_attention_matches_the_interpreter() {
    if !gpu() {
        return;
    }
    let mut failures = Vec::new();
    for dt in [DType::BF16, DType::F16] {
        for d in [64, 72, 128, 256] {
            let cases = [
                ("none", 2, 100, 100, 4, 4, MaskKind::None, None),
                ("causal gqa softcap", 1, 130, 130, 8, 4, MaskKind::Causal { q_offset: 0 }, Some(50.0)),
                ("window", 1, 200, 200, 2, 1, MaskKind::SlidingWindow { q_offset: 0, window: 48 }, None),
                ("prefix additive", 2, 70, 70, 2, 2, MaskKind::Additive, None),
                ("decode split-k", 1, 1, 1500, 8, 4, MaskKind::Causal { q_offset: 1400 }, Some(50.0)),
            ];
            for (what, b, sq, sk, hq, hkv, mask, softcap) in cases {
                let mut g = Graph::new();
                let q = input(&mut g, "q", dt, &[b, sq, hq, d]);
                let k = input(&mut g, "k", dt, &[b, sk, hkv, d]);
                let v = input(&mut g, "v", dt, &[b, sk, hkv, d]);
                let mut ins = vec![q, k, v];
                if mask == MaskKind::Additive {
                    ins.push(input(&mut g, "mask", dt, &[b, sq, sk]));
                }
                let y = g.push(Op::Attention(Attention { scale: 1.0 / (d as f32).sqrt(), softcap, mask }), &ins).unwrap();
                g.output("y", y);
                let name = format!("attention {dt} d{d} {what}");
                if error(&name, g) > 2e-2 {
                    failures.push(name);
                }
            }
            // Position masks (the start, key padding and prefix lengths as i64 constants): a
            // prefill with a window, left padding in row 1 and a prefix in row 0 (the tensor-core
            // kernel), and a decode step at slot 900 of a 1,500-slot cache (split-K over the
            // filled keys only).
            let pos = |window, prefix| MaskKind::Positions(kiln_graph::PosMask { window, padding: true, prefix });
            let cases = [
                ("positions prefill window prefix", 2, 70, 70, 2, 2, pos(Some(16), true), 0, Some(50.0)),
                ("positions decode split-k", 1, 1, 1500, 8, 4, pos(None, false), 900, Some(50.0)),
            ];
            for (what, b, sq, sk, hq, hkv, mask, start, softcap) in cases {
                let MaskKind::Positions(pm) = mask else { continue };
                let mut g = Graph::new();
                let q = input(&mut g, "q", dt, &[b, sq, hq, d]);
                let k = input(&mut g, "k", dt, &[b, sk, hkv, d]);
                let v = input(&mut g, "v", dt, &[b, sk, hkv, d]);
                let keep: Vec<f64> = (0..b * sk).map(|x| f64::from(u8::from(x < sk || x % sk >= 5))).collect();
                let mut ins = vec![
                    q,
                    k,
                    v,
                    g.constant(DType::I64, &[1], vec![start as f64]).unwrap(),
                    g.constant(DType::I64, &[b, sk], keep).unwrap(),
                ];
                if pm.prefix {
                    ins.push(g.constant(DType::I64, &[b], (0..b).map(|r| if r == 0 { 20.0 } else { 0.0 }).collect()).unwrap());
                }
                let y = g.push(Op::Attention(Attention { scale: 1.0 / (d as f32).sqrt(), softcap, mask }), &ins).unwrap();
                g.output("y", y);
                let name = format!("attention {dt} d{d} {what}");
                if error(&name, g) > 2e-2 {
                    failures.push(name);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn half_gemms_norms_and_regions_match_the_interpreter() {
    if !gpu() {
        return;
    }
    let mut failures = Vec::new();
    for dt in [DType::BF16, DType::F16] {
        // x @ w^T + b, GELU-tanh: the MLP of SigLIP (cuBLASLt's GELU_BIAS epilogue).
        let mut g = Graph::new();
        let x = input(&mut g, "x", dt, &[3, 64, 96]);
        let w = input(&mut g, "w", dt, &[160, 96]);
        let b = input(&mut g, "b", dt, &[160]);
        let y = g.matmul(x, w, true).unwrap();
        let y = g.add(y, b).unwrap();
        let y = g.unary(UnaryOp::GeluTanh, y).unwrap();
        g.output("y", y);
        if error(&format!("matmul+bias+gelu {dt}"), g) > 2e-2 {
            failures.push(format!("matmul {dt}"));
        }
        // Layer norm, RMS norm (1 + w), softmax, and a RoPE-like region.
        let mut g = Graph::new();
        let x = input(&mut g, "x", dt, &[37, 1152]);
        let s = input(&mut g, "s", dt, &[1152]);
        let bb = input(&mut g, "b", dt, &[1152]);
        let ln = g.layer_norm(x, s, bb, 1e-6).unwrap();
        let rms = g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[x, s]).unwrap();
        let sm = g.push(Op::Softmax { axis: 1 }, &[x]).unwrap();
        let c = input(&mut g, "cos", dt, &[1152]);
        let r = g.binary(BinaryOp::Mul, x, c).unwrap();
        let r = g.binary(BinaryOp::Add, r, s).unwrap();
        g.output("ln", ln);
        g.output("rms", rms);
        g.output("softmax", sm);
        g.output("region", r);
        if error(&format!("norms + region {dt}"), g) > 2e-2 {
            failures.push(format!("norms {dt}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// `floor((x + 1) / 2 * len)` as i64: indices in `[0, len)` from inputs in `[-1, 1)`.
fn indices(g: &mut Graph, x: NodeId, len: usize) -> NodeId {
    let one = g.scalar(DType::F32, 1.0).unwrap();
    let half = g.scalar(DType::F32, (len as f64 - 0.01) / 2.0).unwrap();
    let y = g.add(x, one).unwrap();
    let y = g.mul(y, half).unwrap();
    let y = g.unary(UnaryOp::Floor, y).unwrap();
    g.push(Op::Cast { to: DType::I64 }, &[y]).unwrap()
}

#[test]
fn index_ops_and_broadcast_matmuls_match_the_interpreter() {
    if !gpu() {
        return;
    }
    // (name, graph, tolerance): index outputs must match exactly.
    let mut cases: Vec<(String, Graph, f64)> = Vec::new();
    for dt in [DType::F32, DType::BF16] {
        let tol = if dt == DType::F32 { 1e-4 } else { 2e-2 };
        // Scans of 1000 and 3000 elements: several per thread, with inner strides.
        let mut g = Graph::new();
        let x = input(&mut g, "x", dt, &[3, 1000, 5]);
        let y = g.push(Op::CumSum { axis: 1, exclusive: true }, &[x]).unwrap();
        g.output("y", y);
        let x2 = input(&mut g, "x2", dt, &[2, 3000]);
        let y2 = g.push(Op::CumSum { axis: 1, exclusive: false }, &[x2]).unwrap();
        g.output("y2", y2);
        cases.push((format!("cumsum {dt}"), g, tol));
        // Softmax over the first and a middle axis.
        let mut g = Graph::new();
        let x = input(&mut g, "x", dt, &[4, 300, 33]);
        let a = g.softmax(x, 1).unwrap();
        let b = g.softmax(x, 0).unwrap();
        g.output("a", a);
        g.output("b", b);
        cases.push((format!("softmax middle {dt}"), g, tol));
        // Top-k of long rows and the values it picks.
        let mut g = Graph::new();
        let x = input(&mut g, "x", dt, &[4, 1000]);
        let k = g.push(Op::TopK { k: 7 }, &[x]).unwrap();
        let v = g.push(Op::TakeAlongAxis { axis: 1 }, &[x, k]).unwrap();
        g.output("idx", k);
        g.output("vals", v);
        cases.push((format!("topk 7 of 1000 {dt}"), g, 0.0));
        // Resize: SigLIP's position-embedding upsampling (bicubic) and a bilinear downsampling.
        let mut g = Graph::new();
        let x = input(&mut g, "x", dt, &[2, 3, 16, 16]);
        let up = g.push(Op::Resize { size: [37, 23], mode: ResizeMode::Bicubic }, &[x]).unwrap();
        let down = g.push(Op::Resize { size: [7, 9], mode: ResizeMode::Bilinear }, &[x]).unwrap();
        g.output("up", up);
        g.output("down", down);
        cases.push((format!("resize {dt}"), g, tol));
        // Batch axes that broadcast partially, with cuBLASLt's bias + GELU epilogue.
        let mut g = Graph::new();
        let a = input(&mut g, "a", dt, &[4, 1, 64, 96]);
        let w = input(&mut g, "w", dt, &[3, 80, 96]);
        let b = input(&mut g, "b", dt, &[80]);
        let y = g.matmul(a, w, true).unwrap();
        let y = g.add(y, b).unwrap();
        let y = g.unary(UnaryOp::GeluTanh, y).unwrap();
        g.output("y", y);
        cases.push((format!("matmul [4, 1, 64, 96] x [3, 80, 96]^T +bias gelu {dt}"), g, tol));
    }
    // Argsort of rows full of ties: the order must be the stable one.
    let mut g = Graph::new();
    let x = input(&mut g, "x", DType::F32, &[3, 300]);
    let four = g.scalar(DType::F32, 4.0).unwrap();
    let t = g.mul(x, four).unwrap();
    let t = g.unary(UnaryOp::Floor, t).unwrap();
    let k = g.push(Op::TopK { k: 300 }, &[t]).unwrap();
    g.output("idx", k);
    cases.push(("argsort with ties".into(), g, 0.0));
    // Scatter-add with each target hit many times (sums in index order), f32 and i64.
    let mut g = Graph::new();
    let base = input(&mut g, "base", DType::F32, &[2, 50, 3]);
    let r = input(&mut g, "r", DType::F32, &[2, 400, 3]);
    let src = input(&mut g, "src", DType::F32, &[2, 400, 3]);
    let idx = indices(&mut g, r, 50);
    let y = g.push(Op::ScatterAdd { axis: 1 }, &[base, idx, src]).unwrap();
    let yi = g.push(Op::ScatterAdd { axis: 1 }, &[idx, idx, idx]).unwrap();
    let c = g.push(Op::CumSum { axis: 1, exclusive: false }, &[idx]).unwrap();
    let taken = g.push(Op::TakeAlongAxis { axis: 1 }, &[src, idx]).unwrap();
    g.output("y", y);
    g.output("yi", yi);
    g.output("cumsum_i64", c);
    g.output("taken", taken);
    cases.push(("scatter_add with repeats, i64 cumsum, take".into(), g, 1e-5));
    let mut g = Graph::new();
    let a = input(&mut g, "a", DType::F32, &[3, 1, 1, 33]);
    let b = input(&mut g, "b", DType::F32, &[3, 33, 3]);
    let y = g.matmul(a, b, false).unwrap();
    g.output("y", y);
    cases.push(("matmul [3, 1, 1, 33] x [3, 33, 3]".into(), g, 1e-4));

    let mut failures = Vec::new();
    for (name, g, tol) in cases {
        let e = error(&name, g);
        if e > tol {
            failures.push(format!("{name}: {e:.2e}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// `x @ w_i^T` with each epilogue the GEMV and cuBLASLt apply: none, bias, GELU-tanh, bias +
/// GELU-tanh, residual (`r + y`) and bias + residual (`y + r`), each its own weight (so no
/// product is shared); x is `rows... x k`.
fn epilogue_graph(dt: DType, rows: &[usize], n: usize, k: usize) -> Graph {
    let mut g = Graph::new();
    let (mut xs, mut ys) = (rows.to_vec(), rows.to_vec());
    xs.push(k);
    ys.push(n);
    let x = input(&mut g, "x", dt, &xs);
    let b = input(&mut g, "b", dt, &[n]);
    let r = input(&mut g, "r", dt, &ys);
    for (i, what) in ["plain", "bias", "gelu", "bias_gelu", "residual", "bias_residual"].into_iter().enumerate() {
        let w = input(&mut g, &format!("w{i}"), dt, &[n, k]);
        let mut y = g.matmul(x, w, true).unwrap();
        if what.starts_with("bias") {
            y = g.add(y, b).unwrap();
        }
        if what.ends_with("gelu") {
            y = g.unary(UnaryOp::GeluTanh, y).unwrap();
        }
        if what.ends_with("residual") {
            y = if what == "residual" { g.add(r, y).unwrap() } else { g.add(y, r).unwrap() };
        }
        g.output(what, y);
    }
    g
}

#[test]
fn gemv_and_residual_epilogues_match_the_interpreter() {
    if !gpu() {
        return;
    }
    let mut failures = Vec::new();
    // K: 72 (one partial chunk), 1000 (a tail of 40), 4136 (many warps, a tail), 100 (rows of
    // 200 bytes in half types: cuBLASLt; f32 rows of 400 bytes: the GEMV).
    let shapes = [(100, 72), (257, 1000), (130, 4136), (64, 100)];
    let rows: [&[usize]; 8] = [&[1], &[2], &[3], &[4], &[5], &[8], &[1, 1], &[2, 3]];
    for dt in [DType::BF16, DType::F16, DType::F32] {
        let tol = if dt == DType::F32 { 1e-4 } else { 2e-2 };
        for &(n, k) in &shapes {
            for r in rows {
                for mode in [GemvMode::On, GemvMode::Off] {
                    let name = format!("gemv {dt} {r:?}x{n}x{k} {mode:?}");
                    if error_with(&name, epilogue_graph(dt, r, n, k), mode) > tol {
                        failures.push(name);
                    }
                }
            }
            // Chosen by timing.
            let name = format!("gemv {dt} [1]x{n}x{k} Auto");
            if error_with(&name, epilogue_graph(dt, &[1], n, k), GemvMode::Auto) > tol {
                failures.push(name);
            }
        }
        // Large M: cuBLASLt with the residual as C (beta = 1), batch folded into M.
        let name = format!("residual epilogues {dt} [3, 64]x160x96");
        if error_with(&name, epilogue_graph(dt, &[3, 64], 160, 96), GemvMode::Auto) > tol {
            failures.push(name);
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// `KILN_GEMV_BENCH=1` (with `KILN_CUDA_VERBOSE=1` to see them): loads Gemma 2 2B's decode
/// GEMMs (M = 1, and M = 8 for gate / up) in bf16, so that the load-time tuning prints
/// cuBLASLt's and the GEMV's times for each shape. Loads only; nothing is compared. Needs
/// about 4 GB of GPU memory.
#[test]
fn gemv_decode_shapes_timed_at_load() {
    if std::env::var("KILN_GEMV_BENCH").map_or(true, |v| v != "1") || !gpu() {
        return;
    }
    let dt = DType::BF16;
    let mut g = Graph::new();
    let x = input(&mut g, "x", dt, &[1, 2304]);
    let x8 = input(&mut g, "x8", dt, &[8, 2304]);
    let h = input(&mut g, "h", dt, &[1, 9216]);
    let a = input(&mut g, "a", dt, &[1, 2048]);
    let r = input(&mut g, "r", dt, &[1, 2304]);
    // Eight layers' worth of each per-layer shape: the tuning rotates through them, so the
    // weights stream from memory as in the model (one matrix alone would sit in L2).
    let shapes: [(&str, NodeId, usize, usize); 6] = [
        ("q", x, 2048, 2304),
        ("kv", x, 1024, 2304),
        ("o", a, 2304, 2048),
        ("up", x, 9216, 2304),
        ("up8", x8, 9216, 2304),
        ("down", h, 2304, 9216),
    ];
    for layer in 0..8 {
        for (name, xin, n, k) in shapes {
            let w = input(&mut g, &format!("w_{name}{layer}"), dt, &[n, k]);
            let y = g.matmul(xin, w, true).unwrap();
            g.output(format!("{name}{layer}"), y);
        }
        // The down projection again with a residual (SigLIP-like; Gemma 2 norms first).
        let w = input(&mut g, &format!("w_down_res{layer}"), dt, &[2304, 9216]);
        let y = g.matmul(h, w, true).unwrap();
        let y = g.add(r, y).unwrap();
        g.output(format!("down_res{layer}"), y);
    }
    let w = input(&mut g, "w_logits", dt, &[256_000, 2304]);
    let y = g.matmul(x, w, true).unwrap();
    g.output("logits", y);
    let opt = Pipeline::standard().run(&g, None).unwrap();
    let backend = CudaBackend::default();
    let mut program = Program::new("gemv bench", "cuda", "");
    let namer = |op: &Op, ins: &[TensorType], out: &TensorType| backend.kernel_for(op, ins, out).unwrap();
    let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
    program.entries.push(entry);
    let t = std::time::Instant::now();
    Session::with_backend(program, Arc::new(WeightStore::empty()), &backend).unwrap();
    println!("loaded (tuning included) in {:.2} s", t.elapsed().as_secs_f64());
}

/// The prefill cases every variant runs (name, graph, shape key): every mask kind, query and
/// key counts that are no multiple of the tiles, and enough keys for the stage ring to wrap.
fn variant_cases(dt: DType, d: usize) -> Vec<(&'static str, Graph, AttentionShape)> {
    let pos = MaskKind::Positions(kiln_graph::PosMask { window: Some(16), padding: true, prefix: true });
    let cases = [
        ("none", 2, 100, 100, 4, 4, MaskKind::None, None, "none"),
        ("none long", 1, 300, 520, 2, 2, MaskKind::None, None, "none"),
        ("causal gqa softcap", 1, 130, 130, 8, 4, MaskKind::Causal { q_offset: 0 }, Some(50.0), "causal"),
        ("window", 1, 200, 200, 2, 1, MaskKind::SlidingWindow { q_offset: 0, window: 48 }, None, "sliding"),
        ("prefix additive", 2, 70, 70, 2, 2, MaskKind::Additive, None, "additive"),
        ("positions prefill window prefix", 2, 70, 70, 2, 2, pos, Some(50.0), "positions"),
    ];
    let mut out = Vec::new();
    for (what, b, sq, sk, hq, hkv, mask, softcap, mask_name) in cases {
        let mut g = Graph::new();
        let q = input(&mut g, "q", dt, &[b, sq, hq, d]);
        let k = input(&mut g, "k", dt, &[b, sk, hkv, d]);
        let v = input(&mut g, "v", dt, &[b, sk, hkv, d]);
        let mut ins = vec![q, k, v];
        if mask == MaskKind::Additive {
            ins.push(input(&mut g, "mask", dt, &[b, sq, sk]));
        }
        if let MaskKind::Positions(_) = mask {
            let keep: Vec<f64> = (0..b * sk).map(|x| f64::from(u8::from(x < sk || x % sk >= 5))).collect();
            ins.push(g.constant(DType::I64, &[1], vec![0.0]).unwrap());
            ins.push(g.constant(DType::I64, &[b, sk], keep).unwrap());
            ins.push(g.constant(DType::I64, &[b], (0..b).map(|r| if r == 0 { 20.0 } else { 0.0 }).collect()).unwrap());
        }
        let y = g.push(Op::Attention(Attention { scale: 1.0 / (d as f32).sqrt(), softcap, mask }), &ins).unwrap();
        g.output("y", y);
        let shape = AttentionShape { batch: b, sq, hq, d, sk, hkv, dtype: dt, mask: mask_name.into(), softcap: softcap.is_some() };
        out.push((what, g, shape));
    }
    out
}

fn variant_entry(card: &str, shape: &AttentionShape, tag: &str) -> TuningEntry {
    TuningEntry { card: card.into(), kernel: "attention".into(), shape: shape.key(), choice: tag.into(), us: None }
}

/// Without a GPU: each case's tuning entry names its prefill step (else the device test would
/// run the default kernel in the variant's place).
#[test]
fn the_variant_cases_name_their_steps() {
    let backend = CudaBackend::default();
    for dt in [DType::BF16, DType::F16] {
        for (what, g, shape) in variant_cases(dt, 72) {
            let opt = Pipeline::standard().run(&g, None).unwrap();
            let mut program = Program::new(what, "cuda", "");
            let namer = |op: &Op, ins: &[TensorType], out: &TensorType| backend.kernel_for(op, ins, out).unwrap();
            let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
            let tuning = [variant_entry("some card", &shape, "q128_s3")];
            let named: Vec<_> = entry.steps.iter().filter_map(|s| attn_tune::tabled(s, &tuning, "some card")).collect();
            assert_eq!(named, [AttnVariant::parse("q128_s3").unwrap()], "{dt} {what}: {}", shape.key());
        }
    }
}

/// Every variant of the tensor-core prefill (kiln-kernels' `ATTN_VARIANTS`), forced through a
/// tuning table entry for this card, against the interpreter on [`variant_cases`].
#[test]
fn attention_variants_match_the_interpreter() {
    if !gpu() {
        return;
    }
    let card = kiln_runtime::cuda::device_name().unwrap();
    let mut failures = Vec::new();
    for dt in [DType::BF16, DType::F16] {
        for &(d, tag) in kiln_kernels::cuda::attn::ATTN_VARIANTS {
            for (what, g, shape) in variant_cases(dt, d) {
                let name = format!("attention {dt} d{d} {tag} {what}");
                if error_tuned(&name, g, GemvMode::Auto, vec![variant_entry(&card, &shape, tag)]) > 2e-2 {
                    failures.push(name);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
