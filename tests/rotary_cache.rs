//! Issue 16: RoPE's rotation of K computed inside the KV-cache write that stores it, one launch
//! where there were two (the cpu backend's `cpu/rotary.rs`). A small graph (RoPE on k, then a
//! prefill's `concat` into the cache or a decode's `write_slice` at a runtime row) checks the
//! fused launch against the interpreter bit for bit, on two rows; the tiny Gemma 2 fixture's
//! prefill and decode (two rows, one left-padded) check it against the interpreter on the
//! model's graphs within the f32 bound, with every layer's K write absorbed.

mod common;

use common::gemma2_two_rows::value;
use kiln::{compile_with_states, CompileOptions};
use kiln_graph::interp::{self, Value};
use kiln_graph::program::{Program, StateSpec};
use kiln_graph::{DType, Graph, TensorType, UnaryOp};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

const B: usize = 2;
const S: usize = 5;
const C: usize = 9;
const H: usize = 3;
const D: usize = 16;

/// `x * cos + rotate_half(x) * sin` (cos and sin inputs `[B, rows, 1, D]`, broadcast over the
/// heads).
fn rope(g: &mut Graph, x: kiln_graph::NodeId, (cos, sin): (kiln_graph::NodeId, kiln_graph::NodeId)) -> kiln_graph::NodeId {
    let hi = g.slice(x, 3, D / 2, D).unwrap();
    let lo = g.slice(x, 3, 0, D / 2).unwrap();
    let n = g.unary(UnaryOp::Neg, hi).unwrap();
    let rot = g.concat(&[n, lo], 3).unwrap();
    let (a, b) = (g.mul(x, cos).unwrap(), g.mul(rot, sin).unwrap());
    g.add(a, b).unwrap()
}

fn angles(g: &mut Graph, rows: usize) -> (kiln_graph::NodeId, kiln_graph::NodeId) {
    (g.input("cos", DType::F32, &[B, rows, 1, D]).unwrap(), g.input("sin", DType::F32, &[B, rows, 1, D]).unwrap())
}

/// `prefill`: the rotated k concatenated with zeros into the cache (and output: another reader),
/// and a rotated q that feeds no cache; `decode`: one rotated row per batch row written at
/// `cache_position`.
fn graphs() -> Vec<(String, Graph)> {
    let mut p = Graph::new();
    let k = p.input("k", DType::F32, &[B, S, H, D]).unwrap();
    let q = p.input("q", DType::F32, &[B, S, H, D]).unwrap();
    let cs = angles(&mut p, S);
    let r = rope(&mut p, k, cs);
    let rq = rope(&mut p, q, cs);
    p.output("q_rot", rq);
    let zeros = p.constant(DType::F32, &[B, C - S, H, D], vec![0.0; B * (C - S) * H * D]).unwrap();
    let cache = p.concat(&[r, zeros], 1).unwrap();
    p.output("cache", cache);
    p.output("k_rot", r);
    let mut d = Graph::new();
    let cache = d.input("cache", DType::F32, &[B, C, H, D]).unwrap();
    let k = d.input("k", DType::F32, &[B, 1, H, D]).unwrap();
    let at = d.input("cache_position", DType::I64, &[1]).unwrap();
    let cs = angles(&mut d, 1);
    let r = rope(&mut d, k, cs);
    let w = d.write_slice(cache, r, at, 1).unwrap();
    d.output("cache", w);
    vec![("prefill".into(), p), ("decode".into(), d)]
}

fn program() -> Program {
    let states = vec![StateSpec { name: "cache".into(), ty: TensorType::new(DType::F32, [B, C, H, D]) }];
    let opts = CompileOptions { profile: Profile::default(), backend: "cpu".into(), trace: false };
    compile_with_states(&graphs(), "rope cache", "", states, &opts).unwrap().program
}

fn values(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (((i * 37 + seed * 11) % 97) as f32 - 48.0) / 13.0).collect();
    Tensor::from_f32(shape, &v)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn rope_inside_the_cache_write_equals_the_interpreter_bit_for_bit() {
    let p = program();
    let cpu = kiln_runtime::by_name("cpu").unwrap();
    for (i, e) in p.entries.iter().enumerate() {
        let absorbed = cpu.absorbed_steps(&p, i).unwrap();
        assert_eq!(absorbed.len(), 1, "{}: {absorbed:?}", e.name);
        let (w, host) = absorbed[0];
        assert!(matches!(e.steps[host].op, kiln_graph::Op::MatMul { .. }), "{}: host {:?}", e.name, e.steps[host].op);
        assert!(matches!(e.steps[w].op, kiln_graph::Op::Concat { .. } | kiln_graph::Op::WriteSlice { .. }), "{}", e.name);
        let runs: usize = cpu.launches(&p, i).unwrap().iter().sum();
        let steps = e.steps.iter().filter(|s| !matches!(s.kernel.as_str(), "source" | "view")).count();
        // Steps running in another's group dispatch (`cpu::group`: q's rotation beside k's).
        let grouped = cpu.merged_launches(&p, i).unwrap().len();
        assert_eq!(runs, steps - 1 - grouped, "{}: the write makes no launch", e.name);
    }
    let gs = graphs();
    let mut s = Session::new(p, Arc::new(WeightStore::empty())).unwrap();
    let (k, cos, sin) = (values(&[B, S, H, D], 1), values(&[B, S, 1, D], 2), values(&[B, S, 1, D], 3));
    let q = values(&[B, S, H, D], 5);
    let ins = [("k", &k), ("q", &q), ("cos", &cos), ("sin", &sin)];
    let outs = s.run("prefill", &ins).unwrap();
    let vals: HashMap<String, Value> = ins.iter().map(|(n, t)| (n.to_string(), value(t))).collect();
    let want = interp::run(&gs[0].1, &vals, &HashMap::new()).unwrap();
    let mut cache = s.state("cache").unwrap().unwrap().to_f32();
    assert_eq!(bits(&cache), bits(&want["cache"].to_f32()), "prefill's cache");
    let kept = &outs.iter().find(|(n, _)| n == "k_rot").unwrap().1;
    assert_eq!(bits(&kept.to_f32()), bits(&want["k_rot"].to_f32()), "prefill's rotated k, also read as an output");
    let q_rot = &outs.iter().find(|(n, _)| n == "q_rot").unwrap().1;
    assert_eq!(bits(&q_rot.to_f32()), bits(&want["q_rot"].to_f32()), "prefill's rotated q (no cache write)");
    for (step, at) in [5i64, 8, 6].into_iter().enumerate() {
        let (k, cos, sin) = (values(&[B, 1, H, D], 4 + step), values(&[B, 1, 1, D], 7 + step), values(&[B, 1, 1, D], 9 + step));
        let pos = Tensor::from_i64(&[1], &[at]);
        let ins = [("k", &k), ("cos", &cos), ("sin", &sin), ("cache_position", &pos)];
        s.run("decode", &ins).unwrap();
        let mut vals: HashMap<String, Value> = ins.iter().map(|(n, t)| (n.to_string(), value(t))).collect();
        vals.insert("cache".into(), value(&Tensor::from_f32(&[B, C, H, D], &cache)));
        let want = interp::run(&gs[1].1, &vals, &HashMap::new()).unwrap()["cache"].to_f32();
        cache = s.state("cache").unwrap().unwrap().to_f32();
        assert_eq!(bits(&cache), bits(&want), "decode at row {at}");
    }
    // A row past the cache is refused by the fused launch as by the write alone.
    let (k, cos, sin) = (values(&[B, 1, H, D], 1), values(&[B, 1, 1, D], 2), values(&[B, 1, 1, D], 3));
    let pos = Tensor::from_i64(&[1], &[C as i64]);
    let err = s.run("decode", &[("k", &k), ("cos", &cos), ("sin", &sin), ("cache_position", &pos)]).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
}

/// The tiny Gemma 2 (4 layers, grouped-query attention) on two rows, the second left-padded:
/// prefill and three decode steps on the cpu backend against the interpreter on the model's
/// graphs (logits and every cache), each layer's K cache write inside its rotation's launch.
#[test]
fn gemma2_prefill_and_decode_with_fused_k_writes_match_the_interpreter() {
    common::gemma2_two_rows::gemma2_two_rows_match_the_interpreter("cpu", |p| {
        let cpu = kiln_runtime::by_name("cpu").unwrap();
        for i in 0..p.entries.len() {
            assert_eq!(cpu.absorbed_steps(p, i).unwrap().len(), 4, "{}: one K write per layer", p.entries[i].name);
        }
    });
}
