//! The tiny Gemma 2 (4 layers, grouped-query attention) on two rows, the second left-padded:
//! prefill and three decode steps on a backend against the interpreter on the model's graphs,
//! every output and every layer's K and V cache within the f32 bound.

use super::rel_err;
use kiln::{compile_with_states, CompileOptions};
use kiln_graph::interp::{self, Value};
use kiln_graph::program::{Program, StateSpec};
use kiln_graph::DType;
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

/// An interpreter value holding `t`.
pub fn value(t: &Tensor) -> Value {
    Value::new(t.ty.clone(), t.to_f64()).unwrap()
}

/// Compiles the generation program for `backend`, passes it to `check_program` (what the
/// caller asserts about its steps), then runs prefill and three decode steps against the
/// interpreter.
pub fn gemma2_two_rows_match_the_interpreter(backend: &str, check_program: impl Fn(&Program)) {
    gemma2_two_rows_in(backend, DType::F32, 1e-4, check_program);
}

/// [`gemma2_two_rows_match_the_interpreter`] computing in `dtype` (the model's graphs too, so
/// the interpreter rounds each op's result to it), each output and cache within `tol`.
pub fn gemma2_two_rows_in(backend: &str, dtype: DType, tol: f64, check_program: impl Fn(&Program)) {
    let ids: Vec<i64> = vec![5, 17, 45, 99, 120, 3, 8, 200, 0, 0, 0, 2, 17, 45, 99, 120];
    gemma2_two_rows_of(&super::gemma_case("gemma2_gqa"), &ids, backend, dtype, tol, check_program);
}

/// The two rows' prompt ids for a model folder other than the fixture: `bucket` tokens each
/// below `vocab`, the second row left-padded by three.
pub fn prompt_ids(bucket: usize, vocab: usize) -> Vec<i64> {
    let first = (0..bucket).map(|j| ((5 + 17 * j) % (vocab - 3) + 2) as i64);
    let second = (0..bucket).map(|j| if j < 3 { 0 } else { ((11 + 29 * j) % (vocab - 3) + 2) as i64 });
    first.chain(second).collect()
}

/// The check on Gemma 2 folder `dir`, the prompts `ids` (`[rows, bucket]`; with two rows the
/// second row's first three tokens are padding; one row is the first alone, batch 1).
pub fn gemma2_two_rows_of(dir: &std::path::Path, ids: &[i64], backend: &str, dtype: DType, tol: f64, check_program: impl Fn(&Program)) {
    gemma2_rows_of(dir, 2, ids, backend, dtype, tol, check_program);
}

/// [`gemma2_two_rows_of`] on `rows` rows (1 or 2).
pub fn gemma2_rows_of(
    dir: &std::path::Path,
    rows: usize,
    ids: &[i64],
    backend: &str,
    dtype: DType,
    tol: f64,
    check_program: impl Fn(&Program),
) {
    let (bucket, new) = (ids.len() / rows, 3);
    let profile = Profile { batch: rows, seq_len: Some(bucket), dtype, ..Profile::default() };
    let g = kiln_models::build_generation(dir, &profile, bucket + new).unwrap();
    let states: Vec<StateSpec> = g.states.iter().map(|(name, ty)| StateSpec { name: name.clone(), ty: ty.clone() }).collect();
    let built = vec![("prefill".to_string(), g.prefill.clone()), ("decode".to_string(), g.decode.clone())];
    let opts = CompileOptions { profile: profile.clone(), backend: backend.into(), trace: false };
    let p = compile_with_states(&built, &g.description, &dir.display().to_string(), states.clone(), &opts).unwrap().program;
    check_program(&p);
    let store = Arc::new(WeightStore::open(dir).unwrap());
    let mut weights = HashMap::new();
    for (_, name, ty) in g.prefill.weights().chain(g.decode.weights()) {
        let (wt, bytes) = store.get(name, ty).unwrap();
        weights.insert(name.to_string(), Value::new(wt.clone(), kiln_runtime::tensor::to_f64(wt.dtype, bytes)).unwrap());
    }
    let mut s = Session::new(p, store).unwrap();
    let mask: Vec<i64> = (0..rows * bucket).map(|i| i64::from(i < bucket || i >= bucket + 3)).collect();
    let pos: Vec<i64> = (0..rows * bucket).map(|i| if i < bucket { i as i64 } else { (i - bucket).saturating_sub(3) as i64 }).collect();
    let ins = [
        ("input_ids", Tensor::from_i64(&[rows, bucket], ids)),
        ("attention_mask", Tensor::from_i64(&[rows, bucket], &mask)),
        ("position_ids", Tensor::from_i64(&[rows, bucket], &pos)),
    ];
    let check = |s: &mut Session, outs: &[(String, Tensor)], want: &HashMap<String, Value>, what: &str| {
        for (name, got) in outs {
            let e = rel_err(&got.to_f32(), &want[name].to_f32());
            assert!(e < tol, "{what}: {name} relative error {e:.3e}");
        }
        for StateSpec { name, .. } in &states {
            let got = s.state(name).unwrap().unwrap().to_f32();
            let e = rel_err(&got, &want[name].to_f32());
            assert!(e < tol, "{what}: {name} relative error {e:.3e}");
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
    full_mask.truncate(rows * (bucket + new));
    for t in 0..new {
        let at = bucket + t;
        full_mask[at] = 1;
        if rows == 2 {
            full_mask[bucket + new + at] = 1;
        }
        let ins = [
            ("input_ids", Tensor::from_i64(&[rows, 1], &[7 + t as i64, 30 + t as i64][..rows])),
            ("attention_mask", Tensor::from_i64(&[rows, bucket + new], &full_mask)),
            ("position_ids", Tensor::from_i64(&[rows, 1], &[at as i64, at as i64 - 3][..rows])),
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
