//! The next token chosen by the last step of the generation entries (`Op::SampleToken`,
//! `kiln::select`) on the Gemma 2 and PaliGemma 2 fixtures: each step's ids equal what the
//! host's sampler picks from the same logits (greedy and sampled, several seeds, temperature,
//! top-k and top-p, several rows per input), the log-probabilities are within 1e-5 of the host's
//! log-softmax, and a default program's entries output only ids and log-probabilities, which
//! is all the host downloads.

mod common;

use common::{gemma_batch as batch, gemma_case};
use kiln::generate::{Generator, Prompt};
use kiln::io;
use kiln::sampling::HfSampling;
use kiln_graph::DType;
use kiln_runtime::Tensor;

const NEW: usize = 6;
const CASES: [&str; 2] = ["gemma2_gqa", "paligemma2"];

/// Greedy, then sampling settings that exercise each filter and their combinations, with
/// seeds whose high 32 bits are set too (the seed travels as two halves).
fn settings() -> Vec<Option<HfSampling>> {
    let s = |temperature, top_k, top_p, seed| Some(HfSampling { temperature, top_k, top_p, seed });
    vec![
        None,
        s(1.0, 0, 1.0, 1),
        s(1.7, 0, 1.0, 2),
        s(0.7, 5, 1.0, 3),
        s(1.3, 0, 0.8, 4),
        s(1.1, 8, 0.7, (1 << 40) + 5),
        s(2.5, 0, 1.0, u64::MAX),
        s(1.0, 1, 1.0, 6),
    ]
}

/// On `backend`, a program that chooses its tokens and also outputs the logits it chose them
/// from: every step's id is the host sampler's pick from those logits (same seed, stream and
/// step), and its log-probability is the host's log-softmax within 1e-5.
fn ids_equal_host(backend: &str, per: usize) {
    for case in CASES {
        let dir = gemma_case(case);
        let (ids, mask, px, b, l) = batch(case);
        let mut g = Generator::with_outputs(&dir, (b, per), l + 1, NEW, backend, DType::F32, true).expect("compile");
        assert!(g.selects && g.has_logits, "{case} {backend}: the program should choose its tokens and keep the logits");
        let prompt = Prompt { input_ids: &ids, attention_mask: &mask, token_type_ids: None, len: l };
        let mut sampled_differently = 0;
        let mut greedy = Vec::new();
        for s in settings() {
            g.sampling = s;
            let a = g.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("generate");
            let (rows, n, w) = (b * per, a.new_tokens, l + a.new_tokens);
            let v = a.step_logits.len() / (rows * n);
            for r in 0..rows {
                let stream = (r / per + (r % per) * b) as u64;
                for t in 0..n {
                    let done = a.sequences[r * w + l..r * w + l + t].iter().any(|x| g.meta.eos.contains(x));
                    if done {
                        continue;
                    }
                    let row = &a.step_logits[(r * n + t) * v..][..v];
                    let want = match &s {
                        Some(sp) => sp.pick(row, kiln::encdec::uniform(sp.seed, stream, t as u64)),
                        None => kiln::generate::argmax(row),
                    };
                    let got = a.sequences[r * w + l + t];
                    assert_eq!(got, want as i64, "{case} {backend} x{per} {s:?}: row {r} step {t}");
                    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    let (lp, want_lp) = (a.logprobs[r * n + t] as f64, row[want] as f64 - lse);
                    assert!((lp - want_lp).abs() < 1e-5, "{case} {backend} {s:?}: row {r} step {t}: logprob {lp} vs {want_lp}");
                }
            }
            match s {
                None => greedy = a.sequences,
                Some(_) if a.sequences != greedy => sampled_differently += 1,
                Some(_) => {}
            }
        }
        assert!(sampled_differently >= 4, "{case} {backend}: only {sampled_differently} sampling settings left the greedy path");
    }
}

#[test]
fn device_ids_equal_host_sampler() {
    ids_equal_host("cpu", 1);
}

#[test]
fn device_ids_equal_host_sampler_several_rows_per_input() {
    ids_equal_host("cpu", 3);
}

/// The default program (no logits kept) gives the same ids and log-probabilities as one that
/// keeps them, and its entries output only `ids [R]` and `logprobs [R]`: a step downloads
/// 12 bytes per row, not 4 V.
#[test]
fn default_program_downloads_only_ids() {
    for case in CASES {
        let dir = gemma_case(case);
        let (ids, mask, px, b, l) = batch(case);
        let per = 2;
        let prompt = Prompt { input_ids: &ids, attention_mask: &mask, token_type_ids: None, len: l };
        let mut plain = Generator::with_rows(&dir, (b, per), l + 1, NEW, "cpu", DType::F32).expect("compile");
        let mut full = Generator::with_outputs(&dir, (b, per), l + 1, NEW, "cpu", DType::F32, true).expect("compile");
        assert!(plain.selects && !plain.has_logits);
        for entry in ["prefill", "decode"] {
            let e = plain.session.program().entry(entry).expect(entry);
            let outs: Vec<String> = e
                .outputs
                .iter()
                .filter(|io| plain.session.program().state_index(&io.name).is_none())
                .map(|io| format!("{} {}", io.name, io.operand.ty))
                .collect();
            let r = b * per;
            assert_eq!(outs, [format!("ids i64[{r}]"), format!("logprobs f32[{r}]")], "{case}: {entry}'s outputs");
        }
        for s in settings().into_iter().take(5) {
            plain.sampling = s;
            full.sampling = s;
            let a = plain.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("generate");
            let f = full.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("generate");
            assert_eq!(a.sequences, f.sequences, "{case} {s:?}");
            assert_eq!(a.logprobs, f.logprobs, "{case} {s:?}");
            assert!(a.step_logits.is_empty());
        }
        // What one decode call returns to the host.
        let r = b * per;
        let c = plain.meta.capacity;
        let sel = kiln::select::inputs(None, 1);
        let (i, m, p, at) = (
            Tensor::from_i64(&[r, 1], &vec![2; r]),
            Tensor::from_i64(&[r, c], &vec![1; r * c]),
            Tensor::from_i64(&[r, 1], &vec![3; r]),
            Tensor::from_i64(&[1], &[l as i64]),
        );
        let mut ins: Vec<(&str, &Tensor)> = vec![("input_ids", &i), ("attention_mask", &m), ("position_ids", &p), ("cache_position", &at)];
        ins.extend(sel.iter().map(|(n, t)| (*n, t)));
        let outs = plain.session.run("decode", &ins).expect("decode");
        let bytes: usize = outs.iter().map(|(_, t)| t.bytes.len()).sum();
        assert_eq!(bytes, 12 * r, "{case}: bytes a decode step returns");
    }
}

/// Bad sampling inputs given straight to the entry are errors naming the step, not panics.
#[test]
fn bad_runtime_sampling_inputs_are_errors() {
    let dir = gemma_case("gemma2_gqa");
    let (_, _, _, b, l) = batch("gemma2_gqa");
    let mut g = Generator::with_rows(&dir, (b, 1), l, 2, "cpu", DType::F32).expect("compile");
    let c = g.meta.capacity;
    let (i, m, p, at) = (
        Tensor::from_i64(&[b, 1], &vec![2; b]),
        Tensor::from_i64(&[b, c], &vec![1; b * c]),
        Tensor::from_i64(&[b, 1], &vec![3; b]),
        Tensor::from_i64(&[1], &[0]),
    );
    let bad = Tensor::from_f32(&[2], &[1.0, 0.0]);
    let counters = Tensor::from_i64(&[4], &[0, 0, 1, 0]);
    let ins: Vec<(&str, &Tensor)> = vec![
        ("input_ids", &i),
        ("attention_mask", &m),
        ("position_ids", &p),
        ("cache_position", &at),
        ("sampling", &bad),
        ("sampling_counters", &counters),
    ];
    let Err(e) = g.session.run("decode", &ins) else { panic!("top_p 0 is refused") };
    let e = e.to_string();
    assert!(e.contains("top_p"), "{e}");
}

/// `kiln generate --inputs` from a folder: greedy ids equal the fixture's transformers ids, the
/// output has no step logits unless `--step-logits` asks (then they match a host-side
/// argmax), and sampling with a seed repeats.
#[test]
fn cli_generate_reads_ids() {
    let dir = gemma_case("gemma2_gqa");
    let tmp = std::env::temp_dir().join(format!("kiln-device-select-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let run = |extra: &[&str], out: &str| {
        let mut args = vec!["generate".to_string(), dir.display().to_string(), "--inputs".into()];
        args.push(dir.join("inputs.safetensors").display().to_string());
        args.extend(["--out".to_string(), tmp.join(out).display().to_string(), "--max-new-tokens".into(), NEW.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).output().unwrap();
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        io::read(&tmp.join(out)).unwrap()
    };
    let get = |ts: &[(String, Tensor)], n: &str| ts.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone());
    let want = io::read(&dir.join("reference.safetensors")).unwrap();
    let a = run(&[], "a.safetensors");
    let mut names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["logprobs", "sequences"], "no step_logits unless asked");
    assert_eq!(get(&a, "sequences").unwrap().to_f64(), get(&want, "sequences").unwrap().to_f64(), "transformers' greedy ids");
    let f = run(&["--step-logits"], "f.safetensors");
    assert_eq!(get(&f, "sequences").unwrap().to_f64(), get(&a, "sequences").unwrap().to_f64());
    let e = common::rel_err(&get(&f, "step_logits").unwrap().to_f32(), &get(&want, "step_logits").unwrap().to_f32());
    assert!(e < 1e-4, "step logits relative error {e:.3e}");
    let s1 = run(&["--temperature", "1.4", "--top-k", "6", "--top-p", "0.9", "--seed", "77"], "s1.safetensors");
    let s2 = run(&["--temperature", "1.4", "--top-k", "6", "--top-p", "0.9", "--seed", "77"], "s2.safetensors");
    assert_eq!(get(&s1, "sequences").unwrap().to_f64(), get(&s2, "sequences").unwrap().to_f64(), "a seed repeats");
    std::fs::remove_dir_all(&tmp).ok();
}

/// The cube backend chooses greedily on the device (`Op::TopK { k: 1 }`; a decode step returns
/// 12 bytes a row) and samples on the host from the logits it keeps in a state (its kernels
/// have no f64 or u64): the same seeds and settings give the cpu program's device-chosen tokens.
#[cfg(feature = "cube")]
#[test]
fn cube_host_choice_equals_cpu_device_choice() {
    for case in CASES {
        let dir = gemma_case(case);
        let (ids, mask, px, b, l) = batch(case);
        let prompt = Prompt { input_ids: &ids, attention_mask: &mask, token_type_ids: None, len: l };
        let mut cpu = Generator::with_rows(&dir, (b, 2), l + 1, NEW, "cpu", DType::F32).expect("compile");
        let mut cube = Generator::with_rows(&dir, (b, 2), l + 1, NEW, "cube", DType::F32).expect("compile");
        assert!(cpu.selects && cpu.samples_on_device && cube.selects && !cube.samples_on_device && !cube.has_logits);
        for s in settings() {
            cpu.sampling = s;
            cube.sampling = s;
            let a = cpu.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("cpu");
            let c = cube.generate_prompt(&prompt, NEW, px.as_ref(), &mut |_| Ok(())).expect("cube");
            assert_eq!(a.sequences, c.sequences, "{case} {s:?}: cube (host) vs cpu (device)");
            let e = a.logprobs.iter().zip(&c.logprobs).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(e < 1e-4, "{case} {s:?}: logprobs differ by {e}");
        }
        // What one greedy decode call returns to the host: the ids and their log-probabilities.
        let (r, c) = (b * 2, cube.meta.capacity);
        let (i, m, p, at) = (
            Tensor::from_i64(&[r, 1], &vec![2; r]),
            Tensor::from_i64(&[r, c], &vec![1; r * c]),
            Tensor::from_i64(&[r, 1], &vec![3; r]),
            Tensor::from_i64(&[1], &[l as i64]),
        );
        let ins: Vec<(&str, &Tensor)> = vec![("input_ids", &i), ("attention_mask", &m), ("position_ids", &p), ("cache_position", &at)];
        let outs = cube.session.run("decode", &ins).expect("decode");
        let bytes: usize = outs.iter().map(|(_, t)| t.bytes.len()).sum();
        assert_eq!(bytes, 12 * r, "{case}: bytes a cube decode step returns");
    }
}

/// The cuda lowering (no GPU needed): the Gemma 2 generation program's entries end with the
/// `sample_token_f32` kernel and output ids and logprobs, and NVRTC compiles that kernel with
/// the program's fused regions for sm_90a.
#[cfg(feature = "cuda")]
#[test]
fn cuda_generation_program_selects_and_compiles() {
    if !kiln_kernels::cuda::nvrtc::available() {
        assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "KILN_REQUIRE_NVRTC=1: no NVRTC");
        return;
    }
    let dir = gemma_case("gemma2_gqa");
    let (_, _, _, b, l) = batch("gemma2_gqa");
    assert!(kiln::generate::selects_on_device("cuda").unwrap() && !kiln::generate::selects_on_device("cube").unwrap());
    let g = kiln::generate::generation_program_rows(&dir, (b, 2), l, 3, "cuda", DType::F32).expect("compile for cuda");
    for name in ["prefill", "decode"] {
        let e = g.program.entry(name).expect(name);
        assert!(e.steps.iter().any(|s| s.kernel == "sample_token_f32"), "{name}: no sample_token_f32 step");
        assert!(e.outputs.iter().any(|o| o.name == "ids") && e.outputs.iter().all(|o| o.name != "logits"), "{name}'s outputs");
    }
    let r = kiln::cuda_tools::check("sm_90a", Some(&g.program)).expect("nvrtc");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.rows.iter().any(|row| row.kernel == "sample_token_f32"), "sample_token_f32 was not compiled");
    // Beam search's candidates: the log-softmax and the top-k on the device, no logits out.
    assert!(kiln::generate::beams_on_device("cuda").unwrap() && !kiln::generate::beams_on_device("cube").unwrap());
    let ending = kiln::generate::Ending { step_logits: false, beams: true };
    let g = kiln::generate::generation_program_for(&dir, (b, 4), l, 3, ("cuda", DType::F32), ending).expect("compile beams for cuda");
    for name in ["prefill", "decode"] {
        let e = g.program.entry(name).expect(name);
        for k in ["log_softmax_f32", "topk_f32"] {
            assert!(e.steps.iter().any(|s| s.kernel == k), "{name}: no {k} step");
        }
        let outs: Vec<&str> = e.outputs.iter().map(|o| o.name.as_str()).filter(|n| !n.starts_with("cache.")).collect();
        assert_eq!(outs, ["beam_ids", "beam_logprobs"], "{name}'s outputs");
    }
    let r = kiln::cuda_tools::check("sm_90a", Some(&g.program)).expect("nvrtc");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.rows.iter().any(|row| row.kernel == "log_softmax_f32"), "log_softmax_f32 was not compiled");
}
