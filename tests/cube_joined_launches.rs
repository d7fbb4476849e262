//! Issue 16 on cube: independent launches of one kernel run as one launch
//! (`runtime/src/cube/lower/merge.rs`): q's and k's RoPE matmuls, the Q and K/V projections
//! (where Q is not stacked with them); K's and V's cache writes (decode's row, prefill's prompt
//! rows) stored by the matmuls computing their rows (`lower/absorb.rs`: k's rotation, the K/V
//! projection); and the MLP's `cube.gated_matmul`.
//! The tiny Gemma 2 (4 layers, grouped-query attention) on two rows, the second left-padded:
//! prefill and three decode steps on cube (lavapipe here) against the interpreter on the
//! model's graphs, every output and every layer's K and V cache, within the f32 bound. A joined
//! launch that ran one part only, or a matmul that skipped its absorbed write, leaves a cache
//! (or q, or k) unwritten.

mod common;

use common::rel_err;
use kiln::{compile_with_states, CompileOptions};
use kiln_graph::interp::{self, Value};
use kiln_graph::program::{Program, StateSpec};
use kiln_graph::Op;
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

fn value(t: &Tensor) -> Value {
    Value::new(t.ty.clone(), t.to_f64()).unwrap()
}

/// Each layer of each entry has these joined pairs: the rotations (two matmuls with RoPE's
/// epilogue) and the Q and stacked K/V projections (two plain matmuls of ranks 2 and 3, batch
/// counts 1 and 2; at two rows decode too keeps Q apart from K and V). K's and V's cache
/// writes make no launch, in prefill as in decode: k's rotation and the K/V projection store
/// them.
fn check_pairs(p: &Program, layers: usize) {
    let cube = kiln_runtime::by_name("cube").unwrap();
    for (i, e) in p.entries.iter().enumerate() {
        let pairs = cube.merged_launches(p, i).unwrap();
        let kind = |s: usize| match &e.steps[s].op {
            Op::MatMul { epilogue: Some(_), .. } => "rotation",
            Op::MatMul { epilogue: None, .. } => "projection",
            Op::Concat { .. } | Op::WriteSlice { .. } => "cache write",
            other => panic!("{}: step {s} ({}) joined", e.name, other.name()),
        };
        let count = |k: &str| pairs.iter().filter(|&&(a, b)| kind(a) == k && kind(b) == k).count();
        let got = (count("rotation"), count("cache write"), count("projection"), pairs.len());
        assert_eq!(got, (layers, 0, layers, 2 * layers), "{}: {pairs:?}", e.name);
        let launches = cube.launches(p, i).unwrap();
        let absorbed = cube.absorbed_steps(p, i).unwrap();
        assert_eq!(absorbed.len(), 2 * layers, "{}: {absorbed:?}", e.name);
        for &(w, h) in &absorbed {
            assert!(matches!(e.steps[w].op, Op::WriteSlice { .. }) && kind(h) != "cache write", "{}: ({w}, {h})", e.name);
            assert_eq!(launches[w], 0, "{}: the write at {w} makes no launch", e.name);
        }
        for &(a, b) in &pairs {
            assert_eq!((launches[a], launches[b]), (0, 1), "{}: pair ({a}, {b})", e.name);
        }
        for (s, step) in e.steps.iter().enumerate() {
            if matches!(step.op, Op::Concat { .. }) {
                assert!(launches[s] <= 1, "{}: step {s}'s copies are one launch", e.name);
            }
        }
    }
}

#[test]
fn gemma2_on_cube_with_joined_launches_matches_the_interpreter() {
    let dir = common::gemma_case("gemma2_gqa");
    let (bucket, new) = (8, 3);
    let profile = Profile { batch: 2, seq_len: Some(bucket), ..Profile::default() };
    let g = kiln_models::build_generation(&dir, &profile, bucket + new).unwrap();
    let states: Vec<StateSpec> = g.states.iter().map(|(name, ty)| StateSpec { name: name.clone(), ty: ty.clone() }).collect();
    let built = vec![("prefill".to_string(), g.prefill.clone()), ("decode".to_string(), g.decode.clone())];
    let opts = CompileOptions { profile: profile.clone(), backend: "cube".into(), trace: false };
    let p = compile_with_states(&built, &g.description, &dir.display().to_string(), states.clone(), &opts).unwrap().program;
    check_pairs(&p, 4);
    for e in &p.entries {
        assert_eq!(e.steps.iter().filter(|s| s.kernel == "cube.gated_matmul").count(), 4, "{}: one gated step per layer", e.name);
    }
    let store = Arc::new(WeightStore::open(&dir).unwrap());
    let mut weights = HashMap::new();
    for (_, name, ty) in g.prefill.weights().chain(g.decode.weights()) {
        let (wt, bytes) = store.get(name, ty).unwrap();
        weights.insert(name.to_string(), Value::new(wt.clone(), kiln_runtime::tensor::to_f64(wt.dtype, bytes)).unwrap());
    }
    let mut s = Session::new(p, store).unwrap();
    let ids: Vec<i64> = vec![5, 17, 45, 99, 120, 3, 8, 200, 0, 0, 0, 2, 17, 45, 99, 120];
    let mask: Vec<i64> = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1];
    let pos: Vec<i64> = vec![0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 1, 2, 3, 4];
    let ins = [
        ("input_ids", Tensor::from_i64(&[2, bucket], &ids)),
        ("attention_mask", Tensor::from_i64(&[2, bucket], &mask)),
        ("position_ids", Tensor::from_i64(&[2, bucket], &pos)),
    ];
    let check = |s: &mut Session, outs: &[(String, Tensor)], want: &HashMap<String, Value>, what: &str| {
        for (name, got) in outs {
            let e = rel_err(&got.to_f32(), &want[name].to_f32());
            assert!(e < 1e-4, "{what}: {name} relative error {e:.3e}");
        }
        for StateSpec { name, .. } in &states {
            let got = s.state(name).unwrap().unwrap().to_f32();
            let e = rel_err(&got, &want[name].to_f32());
            assert!(e < 1e-4, "{what}: {name} relative error {e:.3e}");
        }
    };
    let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (*n, t)).collect();
    let outs = s.run("prefill", &refs).unwrap();
    let mut vals: HashMap<String, Value> = ins.iter().map(|(n, t)| (n.to_string(), value(t))).collect();
    // The prefill reads the cache it writes into: zeros after load.
    for StateSpec { name, ty } in &states {
        vals.insert(name.clone(), Value::new(ty.clone(), vec![0.0; ty.numel()]).unwrap());
    }
    let mut want = interp::run(&g.prefill, &vals, &weights).unwrap();
    check(&mut s, &outs, &want, "prefill");
    let mut full_mask: Vec<i64> = [&mask[..bucket], &[0; 3], &mask[bucket..], &[0; 3]].concat();
    for t in 0..new {
        let at = bucket + t;
        full_mask[at] = 1;
        full_mask[bucket + new + at] = 1;
        let ins = [
            ("input_ids", Tensor::from_i64(&[2, 1], &[7 + t as i64, 30 + t as i64])),
            ("attention_mask", Tensor::from_i64(&[2, bucket + new], &full_mask)),
            ("position_ids", Tensor::from_i64(&[2, 1], &[at as i64, at as i64 - 3])),
            ("cache_position", Tensor::from_i64(&[1], &[at as i64])),
        ];
        let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (*n, t)).collect();
        let outs = s.run("decode", &refs).unwrap();
        vals = ins.iter().map(|(n, t)| (n.to_string(), value(t))).collect();
        for StateSpec { name, .. } in &states {
            vals.insert(name.clone(), want[name].clone());
        }
        want = interp::run(&g.decode, &vals, &weights).unwrap();
        check(&mut s, &outs, &want, &format!("decode step {t}"));
    }
}
