//! Gemma and Gemma 2 against transformers (fixtures from `scripts/gen_gemma_fixtures.py`):
//! forward logits through the interpreter and the cpu backend, greedy generation through the
//! KV cache on a left-padded batch.

mod common;

use common::{gemma_case, read_values, rel_err};
use kiln::{compile, io, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::sync::Arc;

const CASES: [&str; 3] = ["gemma_mqa", "gemma2_gqa", "gemma2_untied"];
/// PaliGemma (Gemma decoder) and PaliGemma 2 (Gemma 2 decoder with a window of 6).
const PALI: [&str; 2] = ["paligemma", "paligemma2"];

/// Rows `[b, s, ..]` of a `[B, S, V]` tensor where `mask[b, s] != 0`, flattened.
fn valid_rows(x: &[f32], mask: &[f64], v: usize) -> Vec<f32> {
    mask.iter().enumerate().filter(|(_, &m)| m != 0.0).flat_map(|(i, _)| x[i * v..(i + 1) * v].iter().copied()).collect()
}

fn profile(batch: usize, seq: usize) -> Profile {
    Profile { batch, seq_len: Some(seq), ..Profile::default() }
}

#[test]
fn forward_interpreter() {
    for case in CASES.iter().chain(&PALI) {
        let dir = gemma_case(case);
        let inputs = read_values(&dir.join("inputs.safetensors"));
        let reference = read_values(&dir.join("reference.safetensors"));
        let weights = read_values(&dir.join("model.safetensors"));
        let shape = inputs["input_ids"].ty.shape.clone();
        let built = kiln_models::build(&dir, &profile(shape[0], shape[1])).expect("build");
        kiln_graph::verify::verify(built.graph("forward").expect("forward")).expect("verify");
        let out = kiln_graph::interp::run(built.graph("forward").expect("forward"), &inputs, &weights).expect("interpret");
        let (got, want) = (&out["logits"], &reference["logits"]);
        assert_eq!(got.ty.shape, want.ty.shape, "{case}");
        let v = want.ty.shape[2];
        let mask = &inputs["attention_mask"].data;
        let e = rel_err(&valid_rows(&got.to_f32(), mask, v), &valid_rows(&want.to_f32(), mask, v));
        assert!(e < 1e-4, "{case}: interpreter logits relative error {e:.3e}");
    }
}

#[test]
fn forward_cpu() {
    forward_on("cpu");
}

/// The cube backend on wgpu (lavapipe on the CPU machines): the same fixtures, the same bound.
#[cfg(feature = "cube")]
#[test]
fn forward_cube() {
    forward_on("cube");
}

fn forward_on(backend: &str) {
    for case in CASES.iter().chain(&PALI) {
        let dir = gemma_case(case);
        let inputs = io::read(&dir.join("inputs.safetensors")).expect("inputs");
        let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
        let ids = &inputs.iter().find(|(n, _)| n == "input_ids").expect("input_ids").1;
        let opts = CompileOptions { profile: profile(ids.ty.shape[0], ids.ty.shape[1]), backend: backend.into(), trace: false };
        let c = compile(&dir, &opts).unwrap_or_else(|e| panic!("{case}: {backend}: compile: {e}"));
        let mut s = Session::new(c.program, Arc::new(WeightStore::open(&dir).expect("weights"))).expect("session");
        let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let outs = s.run("forward", &refs).expect("run");
        let got = &outs.iter().find(|(n, _)| n == "logits").expect("logits").1;
        let want = &reference.iter().find(|(n, _)| n == "logits").expect("reference logits").1;
        assert_eq!(got.ty.shape, want.ty.shape, "{case}");
        let v = want.ty.shape[2];
        let mask = inputs.iter().find(|(n, _)| n == "attention_mask").expect("mask").1.to_f64();
        let e = rel_err(&valid_rows(&got.to_f32(), &mask, v), &valid_rows(&want.to_f32(), &mask, v));
        eprintln!("{case}: {backend} logits relative error {e:.3e}");
        assert!(e < 1e-4, "{case}: {backend} logits relative error {e:.3e}");
    }
}

/// Greedy generation through the KV cache (prefill + decode entries) against transformers'
/// `generate(do_sample=False)`: the same tokens, EOS stops row 0 early and pads it, logits of
/// every step close. The bucket is longer than the prompt, so kiln adds left padding of its own.
#[test]
fn generate_left_padded_batch() {
    generate_on("cpu");
}

/// The same generation on the cube backend (wgpu; lavapipe here): the KV cache lives in its
/// arena and decode writes each new row in place (`cube.write_rows`).
#[cfg(feature = "cube")]
#[test]
fn generate_left_padded_batch_cube() {
    generate_on("cube");
}

fn generate_on(backend: &str) {
    for case in CASES {
        let dir = gemma_case(case);
        let inputs = io::read(&dir.join("inputs.safetensors")).expect("inputs");
        let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
        let get = |ts: &[(String, Tensor)], n: &str| ts.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("{case}: no {n}")).1.clone();
        let (ids, mask) = (get(&inputs, "input_ids"), get(&inputs, "attention_mask"));
        let (want_seq, want_logits) = (get(&reference, "sequences"), get(&reference, "step_logits"));
        let (b, l) = (ids.ty.shape[0], ids.ty.shape[1]);
        let max_new = 6;
        let f32 = kiln_graph::DType::F32;
        let mut g = kiln::generate::Generator::with_outputs(&dir, (b, 1), l + 3, max_new, backend, f32, true).expect("compile");
        let to_i64 = |t: &Tensor| t.to_f64().iter().map(|&x| x as i64).collect::<Vec<_>>();
        let out = g.generate(&to_i64(&ids), &to_i64(&mask), l, max_new, None).expect("generate");
        assert_eq!([b, l + out.new_tokens], [want_seq.ty.shape[0], want_seq.ty.shape[1]], "{case}: sequence shape");
        assert_eq!(out.sequences, to_i64(&want_seq), "{case}: {backend}: generated ids");
        // The default program outputs no logits; where the backend chooses the tokens, the host
        // reads only ids and logprobs, and the ids are still transformers'.
        let mut d = kiln::generate::Generator::new(&dir, b, l + 3, max_new, backend).expect("compile");
        assert_eq!(d.has_logits, !d.selects, "{case}: {backend}: logits output only where the host chooses");
        let plain = d.generate(&to_i64(&ids), &to_i64(&mask), l, max_new, None).expect("generate");
        assert_eq!(plain.sequences, to_i64(&want_seq), "{case}: {backend}: generated ids without logits");
        assert_eq!(plain.step_logits.is_empty(), d.selects, "{case}: {backend}: step logits read without asking");
        let e = rel_err(&out.step_logits, &want_logits.to_f32());
        eprintln!("{case}: {backend} step logits relative error {e:.3e}");
        assert!(e < 1e-4, "{case}: {backend}: step logits relative error {e:.3e}");
        // Each row alone, unpadded, at batch 1: decode's one-row program (Q, K and V one
        // stacked GEMM where the slices align) gives the row's ids and logits.
        let (ids, mask, seq, logits) = (to_i64(&ids), to_i64(&mask), to_i64(&want_seq), want_logits.to_f32());
        let n = out.new_tokens;
        let v = logits.len() / (b * n);
        for r in 0..b {
            let row: Vec<i64> = (0..l).filter(|&j| mask[r * l + j] == 1).map(|j| ids[r * l + j]).collect();
            let mut one = kiln::generate::Generator::with_outputs(&dir, (1, 1), l + 3, max_new, backend, f32, true).expect("compile");
            let got = one.generate(&row, &vec![1; row.len()], row.len(), max_new, None).expect("generate");
            // The batch ran on after this row's EOS, padding it; alone it stops there.
            let want_new = &seq[r * (l + n) + l..(r + 1) * (l + n)];
            let k = got.new_tokens;
            assert_eq!(&got.sequences[row.len()..], &want_new[..k], "{case}: {backend}: row {r} alone: generated ids");
            assert!(want_new[k..].iter().all(|&t| t == want_new[k..].first().copied().unwrap_or(0)), "{case}: row {r} ran on");
            let e = rel_err(&got.step_logits, &logits[r * n * v..r * n * v + k * v]);
            assert!(e < 1e-4, "{case}: {backend}: row {r} alone: step logits relative error {e:.3e}");
        }
    }
}

/// PaliGemma generation from an image and a prefix (bidirectional over image + prompt) against
/// transformers' `generate(pixel_values=..., token_type_ids=zeros)`.
#[test]
fn paligemma_generate_left_padded_batch() {
    paligemma_generate_on("cpu");
}

#[cfg(feature = "cube")]
#[test]
fn paligemma_generate_left_padded_batch_cube() {
    paligemma_generate_on("cube");
}

fn paligemma_generate_on(backend: &str) {
    for case in PALI {
        let dir = gemma_case(case);
        let inputs = io::read(&dir.join("generate_inputs.safetensors")).expect("inputs");
        let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
        let get = |ts: &[(String, Tensor)], n: &str| ts.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("{case}: no {n}")).1.clone();
        let (ids, mask, px) = (get(&inputs, "input_ids"), get(&inputs, "attention_mask"), get(&inputs, "pixel_values"));
        let (want_seq, want_logits) = (get(&reference, "sequences"), get(&reference, "step_logits"));
        let (b, l) = (ids.ty.shape[0], ids.ty.shape[1]);
        let max_new = 6;
        let f32 = kiln_graph::DType::F32;
        let mut g = kiln::generate::Generator::with_outputs(&dir, (b, 1), l + 2, max_new, backend, f32, true).expect("compile");
        let to_i64 = |t: &Tensor| t.to_f64().iter().map(|&x| x as i64).collect::<Vec<_>>();
        let out = g.generate(&to_i64(&ids), &to_i64(&mask), l, max_new, Some(&px)).expect("generate");
        assert_eq!([b, l + out.new_tokens], [want_seq.ty.shape[0], want_seq.ty.shape[1]], "{case}: sequence shape");
        assert_eq!(out.sequences, to_i64(&want_seq), "{case}: {backend}: generated ids");
        let e = rel_err(&out.step_logits, &want_logits.to_f32());
        eprintln!("{case}: {backend} step logits relative error {e:.3e}");
        assert!(e < 1e-4, "{case}: {backend}: step logits relative error {e:.3e}");
        let e = g.generate(&to_i64(&ids), &to_i64(&mask), l, max_new, None).err().expect("no image").to_string();
        assert!(e.contains("pixel_values"), "{e}");
    }
}

/// Sampling as transformers filters (kiln's seeded generator): top-k 1 generates what greedy
/// does; a seed repeats its tokens; every sampled token is one the filters keep (with top-k 2,
/// one of the step's two largest logits).
#[test]
fn seeded_sampling_keeps_to_the_filters() {
    use kiln::sampling::HfSampling;
    let dir = gemma_case("gemma2_gqa");
    let inputs = io::read(&dir.join("inputs.safetensors")).expect("inputs");
    let get = |n: &str| inputs.iter().find(|(k, _)| k == n).unwrap().1.to_f64().iter().map(|&x| x as i64).collect::<Vec<_>>();
    let (ids, mask) = (get("input_ids"), get("attention_mask"));
    let shape = &inputs.iter().find(|(k, _)| k == "input_ids").unwrap().1.ty.shape;
    let (b, l, n) = (shape[0], shape[1], 6);
    let mut g = kiln::generate::Generator::with_outputs(&dir, (b, 1), l, n, "cpu", kiln_graph::DType::F32, true).expect("compile");
    let greedy = g.generate(&ids, &mask, l, n, None).unwrap().sequences;
    g.sampling = Some(HfSampling { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 5 });
    assert_eq!(g.generate(&ids, &mask, l, n, None).unwrap().sequences, greedy, "top-k 1");
    let s = HfSampling { temperature: 2.0, top_k: 2, top_p: 1.0, seed: 6 };
    g.sampling = Some(s);
    let a = g.generate(&ids, &mask, l, n, None).unwrap();
    assert_eq!(g.generate(&ids, &mask, l, n, None).unwrap().sequences, a.sequences, "the same seed");
    let v = a.step_logits.len() / (b * a.new_tokens);
    for r in 0..b {
        for t in 0..a.new_tokens {
            let row = &a.step_logits[(r * a.new_tokens + t) * v..][..v];
            let tok = a.sequences[r * (l + a.new_tokens) + l + t] as usize;
            let above = row.iter().filter(|&&x| x > row[tok]).count();
            assert!(above < 2, "row {r} step {t}: token {tok} is not among the two largest logits");
        }
    }
}
