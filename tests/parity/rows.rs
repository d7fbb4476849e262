//! The parity rows of the index ops, norms, attention, cache writes and half precision (split
//! from `tests/parity.rs` to keep each file short).

use super::*;

pub(super) fn index_ops_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mut g = Graph::new();
    let t = f32in(&mut g, "table", &[10, 6]);
    let ids = g.input("ids", DType::I64, &[2, 3]).unwrap();
    let y = g.push(Op::Gather { axis: 0 }, &[t, ids]).unwrap();
    g.output("y", y);
    rows.push(row("gather", g, 10));

    // An embedding's scale (`gather_scale` makes it one `gather_scaled` step).
    let mut g = Graph::new();
    let t = f32in(&mut g, "table", &[10, 6]);
    let ids = g.input("ids", DType::I64, &[2, 3]).unwrap();
    let y = g.push(Op::Gather { axis: 0 }, &[t, ids]).unwrap();
    let y = g.mul_scalar(y, 48f64.sqrt()).unwrap();
    g.output("y", y);
    rows.push(row("gather scaled", g, 10));

    let mut g = Graph::new();
    let x = f32in(&mut g, "x", &[3, 8]);
    let k = g.push(Op::TopK { k: 3 }, &[x]).unwrap();
    let v = g.push(Op::TakeAlongAxis { axis: 1 }, &[x, k]).unwrap();
    g.output("idx", k);
    g.output("vals", v);
    rows.push(row("topk + take_along_axis", g, 1));

    let mut g = Graph::new();
    let base = f32in(&mut g, "base", &[3, 5]);
    let idx = g.input("idx", DType::I64, &[3, 4]).unwrap();
    let src = f32in(&mut g, "src", &[3, 4]);
    let y = g.push(Op::ScatterAdd { axis: 1 }, &[base, idx, src]).unwrap();
    g.output("y", y);
    rows.push(row("scatter_add", g, 5));

    rows.push(one("cumsum", &[3, 7], |g, x| g.push(Op::CumSum { axis: 1, exclusive: false }, &[x]).unwrap()));
    rows.push(one("cumsum of a one-hot count", &[2, 9, 4], |g, x| {
        let zero = g.scalar(DType::F32, 0.0).unwrap();
        let hit = g.binary(BinaryOp::Gt, x, zero).unwrap();
        let one = g.scalar(DType::F32, 1.0).unwrap();
        let onehot = g.push(Op::Select, &[hit, one, zero]).unwrap();
        g.push(Op::CumSum { axis: 1, exclusive: true }, &[onehot]).unwrap()
    }));

    let mut g = Graph::new();
    let x = f32in(&mut g, "x", &[2, 5, 4]);
    let top1 = g_slice(&mut g, x);
    let k = g.push(Op::TopK { k: 5 }, &[top1]).unwrap();
    let kf = g.push(Op::Cast { to: DType::F32 }, &[k]).unwrap();
    let back = g.push(Op::Cast { to: DType::I64 }, &[kf]).unwrap();
    g.output("argsort", back);
    rows.push(row("topk as argsort + casts", g, 1));

    // The next token (`kiln_graph::sample`): greedy, and sampled with temperature, top-k and
    // top-p from a seed split in two halves, 4 rows on 3 streams.
    for (name, opts, counters) in
        [("sample_token greedy", [0.0, 1.0], [0.0, 0.0, 9.0, 0.0]), ("sample_token sampled", [0.8, 0.9], [6.0, 1.0, 7.0, 3.0])]
    {
        let mut g = Graph::new();
        let x = f32in(&mut g, "logits", &[4, 50]);
        let o = g.constant(DType::F32, &[2], opts.to_vec()).unwrap();
        let c = g.constant(DType::I64, &[4], counters.to_vec()).unwrap();
        let s = g.constant(DType::I64, &[4], vec![0.0, 2.0, 1.0, 0.0]).unwrap();
        let ids = g.push(Op::SampleToken, &[x, o, c, s]).unwrap();
        g.output("ids", ids);
        rows.push(row(name, g, 1));
    }

    // Beam search's candidates (`kiln::select`): the log-softmax plus each row's score, the
    // best 6 per row and their values.
    let mut g = Graph::new();
    let x = f32in(&mut g, "logits", &[4, 300]);
    let scores = f32in(&mut g, "scores", &[4, 1]);
    let lp = g.push(Op::LogSoftmax, &[x]).unwrap();
    let acc = g.binary(BinaryOp::Add, lp, scores).unwrap();
    let k = g.push(Op::TopK { k: 6 }, &[acc]).unwrap();
    let v = g.push(Op::TakeAlongAxis { axis: 1 }, &[acc, k]).unwrap();
    g.output("log_softmax", lp);
    g.output("ids", k);
    g.output("vals", v);
    rows.push(row("log_softmax beam candidates", g, 1));

    // The chosen tokens' log-probabilities (`kiln::select`), ids `[R]` and `[R, 1]`.
    for (name, ids_shape) in [("token_log_prob", &[4][..]), ("token_log_prob ids [R, 1]", &[4, 1][..])] {
        let mut g = Graph::new();
        let x = f32in(&mut g, "logits", &[4, 300]);
        let ids = g.input("ids", DType::I64, ids_shape).unwrap();
        let lp = g.push(Op::TokenLogProb, &[x, ids]).unwrap();
        g.output("logprobs", lp);
        rows.push(row(name, g, 300));
    }

    let mut g = Graph::new();
    let idx = g.input("idx", DType::I64, &[3, 4]).unwrap();
    let y = g.push(Op::ScatterAdd { axis: 1 }, &[idx, idx, idx]).unwrap();
    g.output("y", y);
    rows.push(row("scatter_add i64", g, 4));
    rows.push(one("cumsum exclusive", &[4, 3], |g, x| g.push(Op::CumSum { axis: 0, exclusive: true }, &[x]).unwrap()));

    let mut g = Graph::new();
    let ids = g.input("ids", DType::I64, &[4, 6]).unwrap();
    let c = g.push(Op::Cast { to: DType::F32 }, &[ids]).unwrap();
    let io = g.push_source(Op::Iota { axis: 1, start: 0.5, step: 2.0 }, TensorType::new(DType::F32, [4, 6])).unwrap();
    let y = g.add(c, io).unwrap();
    g.output("y", y);
    rows.push(row("cast + iota", g, 9));
    rows
}

pub(super) fn norms_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mut g = Graph::new();
    let x = f32in(&mut g, "x", &[5, 40]);
    let s = f32in(&mut g, "s", &[40]);
    let b = f32in(&mut g, "b", &[40]);
    let y = g.layer_norm(x, s, b, 1e-6).unwrap();
    let z = g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[x, s]).unwrap();
    g.output("ln", y);
    g.output("rms", z);
    rows.push(row("norms", g, 1));
    rows.extend(residual_norm_rows(DType::F32));
    rows
}

/// `rms_norm(x + rms_norm(o))` and `rms_norm(x + o)` with the sum also an output: the
/// `residual_rms_norm` pass makes each one step. 5 rows of 40: in f32 and bf16 the halves are
/// padded to 8 and 32 rows (zeros written there).
pub(super) fn residual_norm_rows(dt: DType) -> Vec<Row> {
    let mut rows = Vec::new();
    for post in [true, false] {
        let mut g = Graph::new();
        let x = g.input("x", dt, &[5, 40]).unwrap();
        let o = g.input("o", dt, &[5, 40]).unwrap();
        let (wp, w) = (g.input("wp", dt, &[40]).unwrap(), g.input("w", dt, &[40]).unwrap());
        let o = if post { g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[o, wp]).unwrap() } else { g.mul(o, wp).unwrap() };
        let h = g.add(x, o).unwrap();
        let n = g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[h, w]).unwrap();
        let t = g.unary(UnaryOp::Tanh, h).unwrap();
        g.output("n", n);
        g.output("h", h);
        g.output("t", t);
        let what = if post { "post-norm" } else { "plain" };
        rows.push(row(format!("{}residual rms norm {what}", if dt == DType::F32 { String::new() } else { format!("{dt} ") }), g, 1));
    }
    rows
}

pub(super) fn attention_variants_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let cases = [
        ("plain", 1, 9, 9, 4, 4, 8, MaskKind::None, None),
        ("gqa causal", 2, 7, 7, 4, 2, 16, MaskKind::Causal { q_offset: 0 }, None),
        ("decode window softcap", 2, 1, 70, 4, 1, 8, MaskKind::SlidingWindow { q_offset: 69, window: 20 }, Some(5.0)),
        ("long keys", 1, 3, 1100, 2, 2, 8, MaskKind::None, None),
        ("additive", 2, 5, 6, 2, 2, 8, MaskKind::Additive, None),
    ];
    for (name, b, sq, sk, hq, hkv, d, mask, softcap) in cases {
        let mut g = Graph::new();
        let q = f32in(&mut g, "q", &[b, sq, hq, d]);
        let k = f32in(&mut g, "k", &[b, sk, hkv, d]);
        let v = f32in(&mut g, "v", &[b, sk, hkv, d]);
        let mut ins = vec![q, k, v];
        if mask == MaskKind::Additive {
            ins.push(f32in(&mut g, "mask", &[b, sq, sk]));
        }
        let y = g.push(Op::Attention(Attention { scale: 0.3, softcap, mask }), &ins).unwrap();
        g.output("y", y);
        rows.push(row(format!("attention {name}"), g, 1));
    }
    // Masks computed from run-time positions (`PosMask`): the start, key padding and prefix
    // lengths are i64 inputs in 0..modulo (a key is padding where its value is 0).
    let pos = |window, padding, prefix| MaskKind::Positions(kiln_graph::PosMask { window, padding, prefix });
    let cases = [
        ("positions prefill padding", 2, 9, 9, 4, 2, pos(None, true, false), None, 3),
        ("positions window prefix softcap", 2, 6, 6, 2, 2, pos(Some(3), true, true), Some(5.0), 4),
        ("positions decode long cache", 2, 1, 70, 4, 1, pos(Some(20), true, false), None, 50),
        ("positions decode prefix no padding", 1, 2, 40, 2, 1, pos(None, false, true), None, 30),
    ];
    for (name, b, sq, sk, hq, hkv, mask, softcap, modulo) in cases {
        let MaskKind::Positions(pm) = mask else { unreachable!() };
        let mut g = Graph::new();
        let q = f32in(&mut g, "q", &[b, sq, hq, 8]);
        let k = f32in(&mut g, "k", &[b, sk, hkv, 8]);
        let v = f32in(&mut g, "v", &[b, sk, hkv, 8]);
        let mut ins = vec![q, k, v, g.input("start", DType::I64, &[1]).unwrap()];
        if pm.padding {
            ins.push(g.input("keep", DType::I64, &[b, sk]).unwrap());
        }
        if pm.prefix {
            ins.push(g.input("prefix", DType::I64, &[b]).unwrap());
        }
        let y = g.push(Op::Attention(Attention { scale: 0.3, softcap, mask }), &ins).unwrap();
        g.output("y", y);
        rows.push(row(format!("attention {name}"), g, modulo));
    }
    rows
}

pub(super) fn write_slice_rows() -> Vec<Row> {
    // Two new rows written at position 2 of a [2, 5, 3] cache (the KV cache's update).
    let mut g = Graph::new();
    let dst = f32in(&mut g, "dst", &[2, 5, 3]);
    let new = f32in(&mut g, "rows", &[2, 2, 3]);
    let at = g.constant(DType::I64, &[1], vec![2.0]).unwrap();
    let y = g.push(Op::WriteSlice { axis: 1 }, &[dst, new, at]).unwrap();
    g.output("y", y);
    vec![row("write_slice", g, 1)]
}

/// The ops a half-precision model runs, in bf16 and f16 (named by dtype first, so a backend
/// that computes in f32 only lists them by prefix). The interpreter rounds each op's result
/// to the dtype; kernels accumulate in f32, so these rows are compared within 2e-2.
pub(super) fn half_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for dt in [DType::BF16, DType::F16] {
        let input = |g: &mut Graph, name: &str, shape: &[usize]| g.input(name, dt, shape).unwrap();
        let mut g = Graph::new();
        let x = input(&mut g, "x", &[33, 16]);
        let w = input(&mut g, "w", &[24, 16]);
        let bias = input(&mut g, "bias", &[24]);
        let y = g.matmul(x, w, true).unwrap();
        let y = g.add(y, bias).unwrap();
        let y = g.unary(UnaryOp::GeluTanh, y).unwrap();
        g.output("y", y);
        rows.push(row(format!("{dt} matmul epilogue"), g, 1));
        rows.push(gated_matmul_row(dt));

        let mut g = Graph::new();
        let x = input(&mut g, "x", &[5, 40]);
        let s = input(&mut g, "s", &[40]);
        let b = input(&mut g, "b", &[40]);
        let ln = g.layer_norm(x, s, b, 1e-6).unwrap();
        let rms = g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[x, s]).unwrap();
        let sm = g.softmax(x, 1).unwrap();
        g.output("ln", ln);
        g.output("rms", rms);
        g.output("softmax", sm);
        rows.push(row(format!("{dt} norms and softmax"), g, 1));
        rows.extend(residual_norm_rows(dt));

        let mut g = Graph::new();
        let t = input(&mut g, "table", &[10, 64]);
        let ids = g.input("ids", DType::I64, &[1, 3]).unwrap();
        let y = g.push(Op::Gather { axis: 0 }, &[t, ids]).unwrap();
        let y = g.mul_scalar(y, 64f64.sqrt()).unwrap();
        g.output("y", y);
        rows.push(row(format!("{dt} gather scaled"), g, 10));

        let mut g = Graph::new();
        let q = input(&mut g, "q", &[1, 20, 4, 64]);
        let k = input(&mut g, "k", &[1, 20, 2, 64]);
        let v = input(&mut g, "v", &[1, 20, 2, 64]);
        let att = Attention { scale: 0.125, softcap: Some(5.0), mask: MaskKind::Causal { q_offset: 0 } };
        let y = g.push(Op::Attention(att), &[q, k, v]).unwrap();
        g.output("y", y);
        rows.push(row(format!("{dt} attention gqa causal softcap"), g, 1));
    }
    rows
}

/// `Op::GatedMatMul` (made by the `gated_matmul` pass where a backend takes it): 3 rows, the
/// stacked weights `[2, 48, 32]` an input, `gelu_tanh(gate) * up`. The cpu runs f32 (here the
/// unpacked path: the weights are no weight), cuda the half dtypes (its GLU GEMV), cube neither.
pub(super) fn gated_matmul_row(dt: DType) -> Row {
    use kiln_graph::{Expr, Instr};
    let mut g = Graph::new();
    let x = g.input("x", dt, &[3, 32]).unwrap();
    let w = g.input("w", dt, &[2, 48, 32]).unwrap();
    let epilogue =
        Expr { instrs: vec![Instr::Input(0), Instr::Unary(UnaryOp::GeluTanh, 0), Instr::Input(1), Instr::Binary(BinaryOp::Mul, 1, 2)] };
    let y = g.push(Op::GatedMatMul { transpose_b: true, epilogue }, &[x, w]).unwrap();
    g.output("y", y);
    row(format!("{dt} gated_matmul"), g, 1)
}
