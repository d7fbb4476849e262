//! Decoding strategies on the Gemma fixtures (`scripts/gen_gemma_fixtures.py`): beam search
//! against transformers' `generate(num_beams=4, ...)` (sequences exactly, sequences_scores
//! within 1e-4), scored on the host from the logits and on the device (its candidates, equal
//! to the host's bit for bit), several samples per input from one prefill (its KV cache copied to the
//! sample rows by `Session::gather_state_rows`), and the chosen tokens' log-probabilities.

mod common;

use common::{gemma_batch as batch, gemma_case};
use kiln::beam::{BeamOptions, EarlyStopping};
use kiln::generate::{Generator, Prompt};
use kiln::io;
use kiln::sampling::HfSampling;
use kiln_runtime::Tensor;

const NEW: usize = 6;

fn beam_on(backend: &str, cases: &[&str]) {
    for case in cases {
        let dir = gemma_case(case);
        let reference = io::read(&dir.join("beam_reference.safetensors")).expect("beam reference");
        let get = |n: &str| reference.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("{case}: no {n}")).1.clone();
        let (ids, mask, px, b, l) = batch(case);
        let mut g = Generator::with_outputs(&dir, (b, 4), l + 1, NEW, backend, kiln_graph::DType::F32, true).expect("compile");
        assert!(g.beam_candidates.is_none() && g.has_logits, "{case} {backend}: the host-logits program");
        // The candidates scored on the device where the backend can (not cube: no f64).
        let mut dev = Generator::for_beams(&dir, (b, 4), l + 1, NEW, backend, kiln_graph::DType::F32, false).expect("compile beams");
        if backend != "cube" {
            let n = kiln::beam::candidates_per_row(4, &dev.meta.eos, dev.meta.vocab);
            assert_eq!(dev.beam_candidates, Some(n), "{case} {backend}: candidates per row");
            assert!(!dev.has_logits, "{case} {backend}: the beam program outputs no logits");
        }
        let prompt = Prompt { input_ids: &ids, attention_mask: &mask, token_type_ids: None, len: l };
        let settings = [
            (
                "fixed",
                BeamOptions {
                    num_beams: 4,
                    num_return_sequences: 2,
                    length_penalty: 1.0,
                    early_stopping: EarlyStopping::False,
                    min_new_tokens: NEW,
                },
            ),
            (
                "eos",
                BeamOptions {
                    num_beams: 4,
                    num_return_sequences: 3,
                    length_penalty: 0.5,
                    early_stopping: EarlyStopping::True,
                    min_new_tokens: 0,
                },
            ),
        ];
        for (name, o) in settings {
            let out = g.beam_search(&prompt, NEW, px.as_ref(), &o).unwrap_or_else(|e| panic!("{case} {name}: {e}"));
            let (want, want_scores) = (get(&format!("{name}/sequences")), get(&format!("{name}/sequences_scores")));
            let want_ids: Vec<i64> = want.to_f64().iter().map(|&x| x as i64).collect();
            assert_eq!(out.sequences.len(), want_ids.len(), "{case} {name} {backend}: shape (want {:?})", want.ty.shape);
            assert_eq!(out.sequences, want_ids, "{case} {name} {backend}: sequences");
            let err = out.sequences_scores.iter().zip(want_scores.to_f32()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            eprintln!("{case} {name} {backend}: sequences_scores max error {err:.2e} ({:?})", out.sequences_scores);
            assert!(err <= 1e-4, "{case} {name} {backend}: sequences_scores {:?} vs {:?}", out.sequences_scores, want_scores.to_f32());
            let d = dev.beam_search(&prompt, NEW, px.as_ref(), &o).unwrap_or_else(|e| panic!("{case} {name} device: {e}"));
            assert_eq!(d.sequences, out.sequences, "{case} {name} {backend}: device candidates vs host logits, sequences");
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&d.sequences_scores), bits(&out.sequences_scores), "{case} {name} {backend}: scores, bit for bit");
            assert_eq!(d.decode_steps, out.decode_steps, "{case} {name} {backend}: decode steps");
        }
    }
}

/// Beam search equals transformers 5.24's on every Gemma fixture: 4 beams, 2 returned, EOS
/// masked to the last token (`min_new_tokens = max_new_tokens`); and 4 beams, 3 returned,
/// rows finishing at EOS, early stopping, length penalty 0.5.
#[test]
fn beam_search_matches_transformers() {
    beam_on("cpu", &["gemma_mqa", "gemma2_gqa", "gemma2_untied", "paligemma", "paligemma2"]);
}

#[cfg(feature = "cube")]
#[test]
fn beam_search_matches_transformers_cube() {
    beam_on("cube", &["gemma2_gqa", "paligemma2"]);
}

/// Several rows per input from one prefill: greedy gives transformers' greedy sequence on every
/// copy (the KV cache was copied whole); sampled, a seed repeats its samples, sample 0 of each
/// input is what one sample per input gives, and the samples of an input differ.
fn samples_on(backend: &str) {
    for case in ["gemma2_gqa", "paligemma2"] {
        let dir = gemma_case(case);
        let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
        let want: Vec<i64> = reference.iter().find(|(k, _)| k == "sequences").unwrap().1.to_f64().iter().map(|&x| x as i64).collect();
        let (ids, mask, px, b, l) = batch(case);
        let n = 3;
        let prompt = Prompt { input_ids: &ids, attention_mask: &mask, token_type_ids: None, len: l };
        let mut g = Generator::with_outputs(&dir, (b, n), l + 1, NEW, backend, kiln_graph::DType::F32, true).expect("compile");
        let greedy = g.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("generate");
        let w = want.len() / b;
        for r in 0..b * n {
            assert_eq!(&greedy.sequences[r * w..(r + 1) * w], &want[(r / n) * w..(r / n + 1) * w], "{case} {backend}: greedy row {r}");
        }
        let s = HfSampling { temperature: 1.5, top_k: 0, top_p: 1.0, seed: 21 };
        g.sampling = Some(s);
        let a = g.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("sample");
        let again = g.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("sample");
        assert_eq!(a.sequences, again.sequences, "{case} {backend}: the same seed");
        let wa = a.sequences.len() / (b * n);
        for i in 0..b {
            let rows: Vec<&[i64]> = (0..n).map(|j| &a.sequences[(i * n + j) * wa..(i * n + j + 1) * wa]).collect();
            assert!(rows.iter().any(|r| *r != rows[0]), "{case} {backend}: the {n} samples of input {i} are all equal");
        }
        let mut one = Generator::with_rows(&dir, (b, 1), l + 1, NEW, backend, kiln_graph::DType::F32).expect("compile");
        one.sampling = Some(s);
        let single = one.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("sample");
        let ws = single.sequences.len() / b;
        for i in 0..b {
            let first = &a.sequences[i * n * wa..i * n * wa + wa];
            let alone = &single.sequences[i * ws..(i + 1) * ws];
            let k = first.len().min(alone.len());
            assert_eq!(&first[..k], &alone[..k], "{case} {backend}: sample 0 of input {i} is not the single sample");
        }
        // The log-probabilities are the log-softmax of each step's logits at the chosen token.
        let v = a.step_logits.len() / (b * n * a.new_tokens);
        for r in 0..b * n {
            for t in 0..a.new_tokens {
                let row = &a.step_logits[(r * a.new_tokens + t) * v..][..v];
                let tok = a.sequences[r * wa + l + t] as usize;
                let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                let lp = a.logprobs[r * a.new_tokens + t] as f64;
                let done = a.sequences[r * wa + l..r * wa + l + t].iter().any(|x| g.meta.eos.contains(x));
                let want = if done { 0.0 } else { row[tok] as f64 - lse };
                assert!((lp - want).abs() < 1e-5, "{case} {backend}: row {r} step {t}: logprob {lp} vs {want}");
            }
        }
    }
}

#[test]
fn samples_share_one_prefill() {
    samples_on("cpu");
}

#[cfg(feature = "cube")]
#[test]
fn samples_share_one_prefill_cube() {
    samples_on("cube");
}

/// `kiln generate --num-beams 4 --num-return-sequences 2 --min-new-tokens 6` writes
/// transformers' sequences and sequences_scores; `--num-samples 3` writes 3 rows per input with
/// their logprobs; mixtures are refused with `error: ...`.
#[test]
fn cli_beams_and_samples() {
    let dir = gemma_case("gemma2_gqa");
    let tmp = std::env::temp_dir().join(format!("kiln-decode-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let run = |extra: &[&str], out: &str| {
        let mut args = vec!["generate".to_string(), dir.display().to_string(), "--inputs".into()];
        args.push(dir.join("inputs.safetensors").display().to_string());
        args.extend(["--out".to_string(), tmp.join(out).display().to_string(), "--max-new-tokens".into(), "6".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).output().unwrap()
    };
    let o = run(&["--num-beams", "4", "--num-return-sequences", "2", "--min-new-tokens", "6"], "beams.safetensors");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = io::read(&tmp.join("beams.safetensors")).unwrap();
    let want = io::read(&dir.join("beam_reference.safetensors")).unwrap();
    let get = |ts: &[(String, Tensor)], n: &str| ts.iter().find(|(k, _)| k == n).unwrap().1.clone();
    assert_eq!(get(&got, "sequences").to_f64(), get(&want, "fixed/sequences").to_f64());
    let (a, b) = (get(&got, "sequences_scores").to_f32(), get(&want, "fixed/sequences_scores").to_f32());
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4), "{a:?} vs {b:?}");
    // The beam program outputs each row's candidates, not the logits: 12 bytes a candidate.
    let json = String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).next_back();
    let read = json.and_then(|j| j["host_read_bytes_per_step"].as_u64()).expect("host_read_bytes_per_step in the JSON line");
    let (_, _, _, b, l) = batch("gemma2_gqa");
    let g = Generator::for_beams(&dir, (b, 4), l, 6, "cpu", kiln_graph::DType::F32, false).expect("compile");
    let n = kiln::beam::candidates_per_row(4, &g.meta.eos, g.meta.vocab);
    assert_eq!(read as usize, b * 4 * n * 12, "bytes read a step ({n} candidates a row, vocabulary {})", g.meta.vocab);
    let o = run(&["--num-samples", "3", "--temperature", "1.2", "--seed", "4"], "samples.safetensors");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = io::read(&tmp.join("samples.safetensors")).unwrap();
    assert_eq!(get(&got, "sequences").ty.shape[0], 6);
    assert_eq!(get(&got, "logprobs").ty.shape[0], 6);
    assert!(get(&got, "logprobs").to_f32().iter().all(|&x| x <= 0.0));
    for (extra, msg) in [
        (&["--num-beams", "2", "--temperature", "1"][..], "no --num-samples or --temperature"),
        (&["--num-beams", "2", "--num-return-sequences", "3"][..], "--num-return-sequences 3"),
        (&["--num-samples", "0"][..], "--num-samples must be at least 1"),
        (&["--num-beams", "2", "--early-stopping", "maybe"][..], "expected true, false or never"),
    ] {
        let o = run(extra, "bad.safetensors");
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {e}");
        assert!(e.contains("error: ") && e.contains(msg), "{extra:?}: {e}");
        assert!(!tmp.join("bad.safetensors").exists(), "{extra:?} wrote a file");
    }
    std::fs::remove_dir_all(&tmp).ok();
}
