//! JetFormer (`proj.jetformer.jetformer`) against the official code: the fixture
//! `tests/fixtures/big_vision/jetformer` (copied by `scripts/copy_big_vision_fixtures.py` from the
//! shared fixtures made with big_vision at 0127fb6; no BOI, tied text head over 2 vocabulary
//! repeats, bidirectional prefix, per-modality norms, 2 kv heads) passes every entry within
//! 1e-4 · max(1, max |ref|) on every backend. The branches the fixture does not take (BOI, an
//! untied head, a causal prefix, a shared final norm, one kv head, one vocabulary, a bfloat16
//! head) are built from rewritten weights and checked interpreter against cpu, and for
//! self-consistency: the sampler-order scoring equals teacher forcing where no text is padded.

mod common;

use common::{tensor, BACKENDS};
use kiln::{compile, io, CompileOptions};
use kiln_graph::interp::Value;
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Named = Vec<(String, Tensor)>;

/// max |a - b| / max(1, max |b|): the fixtures' bound.
fn err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(1f64, |m, &x| m.max((x as f64).abs()));
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs())) / scale
}

fn fixture() -> PathBuf {
    common::big_vision_case("jetformer")
}

fn profile(t: usize) -> Profile {
    Profile { batch: 2, image_hw: Some((8, 8)), seq_len: Some(t), ..Profile::default() }
}

fn session(dir: &Path, backend: &str, t: usize) -> Session {
    let c = compile(dir, &CompileOptions { profile: profile(t), backend: backend.into(), trace: false })
        .unwrap_or_else(|e| panic!("{backend}: compile: {e}"));
    Session::new(c.program, Arc::new(WeightStore::open(dir).expect("weights"))).expect("session")
}

fn scalar(v: f32) -> Tensor {
    Tensor::from_f32(&[1], &[v])
}

fn u8s(shape: &[usize], v: &[u8]) -> Tensor {
    Tensor { ty: kiln_graph::TensorType::new(kiln_graph::DType::U8, shape.to_vec()), bytes: v.to_vec() }
}

/// Each entry's inputs, from the reference file (`drop` picks the forward's drop_prefix).
fn inputs(r: &Named, entry: &str, drop: bool) -> Named {
    let get = |n: &str| tensor(r, n).clone();
    let named = |v: Vec<(&str, Tensor)>| v.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    let no_drop = u8s(&[2], &[0, 0]);
    match entry {
        "encode" => named(vec![("images", get("images"))]),
        "forward" => named(vec![
            ("text", get("text")),
            ("text_mask", get("text_mask")),
            ("text_first", get("text_first")),
            ("image_tokens", get("image_tokens")),
            ("drop_prefix", if drop { get("drop_prefix") } else { no_drop }),
        ]),
        "nll" => named(vec![
            ("images", get("images")),
            ("text", get("text")),
            ("text_mask", get("text_mask")),
            ("text_loss", get("text_loss")),
            ("text_first", get("text_first")),
        ]),
        "decode" => named(vec![("image_tokens", get("image_tokens")), ("noise", get("noise"))]),
        "score_image_samples" => named(vec![
            ("text", get("text")),
            ("text_mask", get("text_mask")),
            ("image_tokens", get("t2i_tokens")),
            ("temperature", scalar(0.8)),
            ("temperature_probs", scalar(1.2)),
        ]),
        "score_text_samples" => named(vec![("image_tokens", get("image_tokens")), ("text", get("text"))]),
        other => panic!("no entry {other}"),
    }
}

fn run(s: &mut Session, entry: &str, ins: &Named) -> Named {
    let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
    s.run(entry, &refs).unwrap_or_else(|e| panic!("{entry}: {e}"))
}

fn check(what: &str, outs: &Named, r: &Named, pairs: &[(&str, &str)]) {
    for (out, want) in pairs {
        let e = err(&tensor(outs, out).to_f32(), &tensor(r, want).to_f32());
        eprintln!("{what}: {out} vs {want}: error {e:.3e}");
        assert!(e <= 1e-4, "{what}: {out} vs {want}: error {e:.3e}");
    }
}

#[test]
fn every_entry_matches_big_vision_on_every_backend() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    for &backend in BACKENDS {
        let mut s = session(&fixture(), backend, 2);
        let outs = run(&mut s, "encode", &inputs(&r, "encode", false));
        let same = ["patches", "latents", "logdet", "image_tokens", "noise"].map(|n| (n, n));
        check(&format!("{backend} encode"), &outs, &r, &same);
        let heads = ["text_logits", "image_logits", "gmm_mix_logits", "gmm_means", "gmm_scales", "pre_logits", "encoded"];
        let outs = run(&mut s, "forward", &inputs(&r, "forward", false));
        check(&format!("{backend} forward"), &outs, &r, &heads.map(|n| (n, n)));
        let uncond: Vec<String> = heads.iter().map(|n| format!("uncond_{n}")).collect();
        let pairs: Vec<(&str, &str)> = heads.iter().zip(&uncond).map(|(a, b)| (*a, b.as_str())).collect();
        let outs = run(&mut s, "forward", &inputs(&r, "forward", true));
        check(&format!("{backend} forward drop_prefix"), &outs, &r, &pairs);
        let nll = ["text_token_nll", "nll_text", "image_token_nll", "noise_nll", "nll_image_tokens_bpd", "logdet_bpd", "nll_image_bpd"];
        let outs = run(&mut s, "nll", &inputs(&r, "nll", false));
        check(&format!("{backend} nll"), &outs, &r, &nll.map(|n| (n, n)));
        let outs = run(&mut s, "decode", &inputs(&r, "decode", false));
        check(&format!("{backend} decode"), &outs, &r, &[("images", "decoded_images")]);
        let t2i: Named = vec![("image_tokens".into(), tensor(&r, "t2i_tokens").clone()), ("noise".into(), tensor(&r, "t2i_noise").clone())];
        let outs = run(&mut s, "decode", &t2i);
        check(&format!("{backend} decode t2i"), &outs, &r, &[("images", "t2i_images")]);
        let outs = run(&mut s, "score_image_samples", &inputs(&r, "score_image_samples", false));
        check(&format!("{backend} score_image_samples"), &outs, &r, &[("prelogits", "t2i_prelogits"), ("logp", "t2i_logp")]);
    }
}

/// The fixture's arrays.
fn read_npz(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let name = f.name().strip_suffix(".npy").unwrap().to_string();
            let mut bytes = vec![];
            f.read_to_end(&mut bytes).unwrap();
            let (ty, head) = kiln_graph::npz::parse_npy_header(&bytes).unwrap();
            let v = bytes[head..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (name, ty.shape.clone(), v)
        })
        .collect()
}

/// One branch set: config edits and the weights they need.
struct Variant {
    name: &'static str,
    model: serde_json::Value,
    /// One vocabulary (EmbedText cut to its first V rows).
    one_vocab: bool,
    /// `LogitsText` added.
    untied: bool,
    /// One kv head: `q_einsum` + `kv_einsum` from `qkv_einsum` (kv head 0).
    mqa: bool,
}

fn variants() -> Vec<Variant> {
    use serde_json::json;
    vec![
        Variant {
            name: "boi_untied_causal_shared_norm_mqa",
            model: json!({"boi_id": 11, "untie_output_vocab": true, "num_vocab_repeats": 1, "causal_mask_on_prefix": true,
                          "per_modality_final_norm": false, "num_kv_heads": 1}),
            one_vocab: true,
            untied: true,
            mqa: true,
        },
        Variant {
            name: "boi_tied_repeats_bidirectional_bf16_head",
            model: json!({"boi_id": 11, "head_dtype": "bfloat16", "num_kv_heads": 1}),
            one_vocab: false,
            untied: false,
            mqa: true,
        },
        Variant {
            name: "no_boi_one_vocab_causal",
            model: json!({"num_vocab_repeats": 1, "causal_mask_on_prefix": true}),
            one_vocab: true,
            untied: false,
            mqa: false,
        },
        Variant {
            name: "no_adaptor_per_layer",
            model: json!({"adaptor_name": "", "boi_id": 11, "scan": false}),
            one_vocab: false,
            untied: false,
            mqa: false,
        },
    ]
}

/// Every variant's folder, written once per test process (the tests run in parallel).
fn variant_dirs() -> &'static [PathBuf] {
    static DIRS: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();
    DIRS.get_or_init(|| variants().iter().map(write_variant).collect())
}

/// Writes the variant's folder under the target directory.
fn write_variant(v: &Variant) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("jetformer_{}", v.name));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    for (k, x) in v.model.as_object().unwrap() {
        // `adaptor_name` is a top-level key (the trainer config's), the rest Model kwargs.
        if k == "adaptor_name" {
            cfg[k] = x.clone();
            cfg.as_object_mut().unwrap().remove("adaptor");
        } else {
            cfg["model"][k] = x.clone();
        }
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let (w, hd, depth, heads, vocab) = (24, 12, 2, 2, 13);
    let mut arrays = vec![];
    for (name, shape, vals) in read_npz(&fixture().join("params.npz")) {
        match name.as_str() {
            "EmbedText/embedding" if v.one_vocab => arrays.push((name, vec![vocab, w], vals[..vocab * w].to_vec())),
            "decoder/layers/attn/qkv_einsum/w" if v.mqa => {
                // (depth, 3, heads, W, hd): q all heads; k and v of head 0.
                let per = heads * w * hd;
                let (mut q, mut kv) = (vec![], vec![]);
                for l in 0..depth {
                    let base = l * 3 * per;
                    q.extend_from_slice(&vals[base..base + per]);
                    kv.extend_from_slice(&vals[base + per..base + per + w * hd]);
                    kv.extend_from_slice(&vals[base + 2 * per..base + 2 * per + w * hd]);
                }
                arrays.push(("decoder/layers/attn/q_einsum/w".into(), vec![depth, heads, w, hd], q));
                arrays.push(("decoder/layers/attn/kv_einsum/w".into(), vec![depth, 2, 1, w, hd], kv));
            }
            _ => arrays.push((name, shape, vals)),
        }
    }
    if v.untied {
        let k: Vec<f32> = (0..w * vocab).map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.4).collect();
        let b: Vec<f32> = (0..vocab).map(|i| (i as f32 - 6.0) * 0.05).collect();
        arrays.push(("LogitsText/kernel".into(), vec![w, vocab], k));
        arrays.push(("LogitsText/bias".into(), vec![vocab], b));
    }
    if v.model.get("scan") == Some(&serde_json::json!(false)) {
        // The per-layer layout: `decoder/layers/<i>/...` without the depth axis.
        let mut split = vec![];
        for (name, shape, vals) in arrays {
            match name.strip_prefix("decoder/layers/") {
                Some(rest) => {
                    let n = vals.len() / shape[0];
                    for l in 0..shape[0] {
                        split.push((format!("decoder/layers/{l}/{rest}"), shape[1..].to_vec(), vals[l * n..(l + 1) * n].to_vec()));
                    }
                }
                None => split.push((name, shape, vals)),
            }
        }
        arrays = split;
    }
    arrays.sort_by(|a, b| a.0.cmp(&b.0));
    kiln::npz_write::write(&dir.join("params.npz"), &arrays).unwrap();
    dir
}

/// Every entry of `dir` on the interpreter.
fn interpret(dir: &Path, entry: &str, ins: &Named, t: usize) -> HashMap<String, Value> {
    let built = kiln_models::build(dir, &profile(t)).expect("build");
    let g = built.graph(entry).expect("entry");
    kiln_graph::verify::verify(g).expect("verify");
    let store = WeightStore::open(dir).expect("weights");
    let weights: HashMap<String, Value> = g
        .weights()
        .map(|(_, name, ty)| {
            let (sty, bytes) = store.get(name, ty).expect("weight");
            (name.to_string(), Value::new(sty.clone(), kiln_runtime::tensor::to_f64(sty.dtype, bytes)).expect("value"))
        })
        .collect();
    let values: HashMap<String, Value> = ins.iter().map(|(n, t)| (n.clone(), Value::new(t.ty.clone(), t.to_f64()).unwrap())).collect();
    kiln_graph::interp::run(g, &values, &weights).expect("interpret")
}

#[test]
fn every_branch_agrees_between_interpreter_and_cpu() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    for (v, dir) in variants().iter().zip(variant_dirs()) {
        let mut s = session(dir, "cpu", 2);
        for entry in kiln_models::big_vision::jetformer::ENTRIES {
            let ins = inputs(&r, entry, true);
            let got = run(&mut s, entry, &ins);
            let want = interpret(dir, entry, &ins, 2);
            for (name, t) in &got {
                let e = err(&t.to_f32(), &want[name].to_f32());
                eprintln!("{} {entry}: {name} cpu vs interpreter {e:.3e}", v.name);
                assert!(e <= 1e-4, "{} {entry}: {name}: cpu vs interpreter {e:.3e}", v.name);
            }
        }
    }
}

/// Where no text is padded, scoring in the sampler's order (the prompt right-aligned) is teacher
/// forcing: `score_image_samples` at temperature 1 gives `nll`'s image NLL (negated) for text-first
/// rows, and its prelogits are `forward`'s head inputs at the image rows; `score_text_samples`
/// gives `nll`'s text NLL for image-first rows.
#[test]
fn sampler_order_scoring_equals_teacher_forcing() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    let mut dirs = vec![(fixture(), false, 2usize)];
    for (v, dir) in variants().iter().zip(variant_dirs()) {
        let boi = v.model.get("boi_id").is_some();
        let reps = v.model.get("num_vocab_repeats").and_then(|x| x.as_u64()).unwrap_or(2) as usize;
        dirs.push((dir.clone(), boi, reps));
    }
    for (dir, boi, reps) in dirs {
        let mut s = session(&dir, "cpu", 2);
        let full = u8s(&[2, 2], &[1, 1, 1, 1]);
        let enc = run(&mut s, "encode", &inputs(&r, "encode", false));
        let tokens = tensor(&enc, "image_tokens").clone();
        for tf in [1u8, 0] {
            let mut nll_in = inputs(&r, "nll", false);
            for (n, t) in nll_in.iter_mut() {
                match n.as_str() {
                    "text_mask" | "text_loss" => *t = full.clone(),
                    "text_first" => *t = u8s(&[2], &[tf, tf]),
                    _ => {}
                }
            }
            let nll = run(&mut s, "nll", &nll_in);
            if tf == 1 {
                let mut ins = inputs(&r, "score_image_samples", false);
                for (n, t) in ins.iter_mut() {
                    match n.as_str() {
                        "text_mask" => *t = full.clone(),
                        "image_tokens" => *t = tokens.clone(),
                        "temperature" | "temperature_probs" => *t = scalar(1.0),
                        _ => {}
                    }
                }
                let sc = run(&mut s, "score_image_samples", &ins);
                let neg: Vec<f32> = tensor(&sc, "logp").to_f32().iter().map(|x| -x).collect();
                let e = err(&neg, &tensor(&nll, "image_token_nll").to_f32());
                eprintln!("{}: score_image_samples vs nll {e:.3e}", dir.display());
                assert!(e <= 1e-4, "{}: score_image_samples vs nll {e:.3e}", dir.display());
                // forward's head inputs at the image rows [T R + boi, ..).
                let mut f_in = inputs(&r, "forward", false);
                for (n, t) in f_in.iter_mut() {
                    match n.as_str() {
                        "text_mask" => *t = full.clone(),
                        "text_first" => *t = u8s(&[2], &[1, 1]),
                        "image_tokens" => *t = tokens.clone(),
                        _ => {}
                    }
                }
                let f = run(&mut s, "forward", &f_in);
                let h = tensor(&f, "pre_logits");
                let (l, w) = (h.ty.shape[1], h.ty.shape[2]);
                let start = 2 * reps + usize::from(boi);
                let hv = h.to_f32();
                let rows: Vec<f32> = (0..2).flat_map(|b| hv[(b * l + start) * w..(b * l + start + 16) * w].to_vec()).collect();
                let e = err(&tensor(&sc, "prelogits").to_f32(), &rows);
                assert!(e <= 1e-4, "{}: score_image_samples prelogits vs forward {e:.3e}", dir.display());
            } else {
                let ins: Named = vec![("image_tokens".into(), tokens.clone()), ("text".into(), tensor(&r, "text").clone())];
                let sc = run(&mut s, "score_text_samples", &ins);
                let neg: Vec<f32> = tensor(&sc, "logp").to_f32().iter().map(|x| -x).collect();
                let e = err(&neg, &tensor(&nll, "text_token_nll").to_f32());
                eprintln!("{}: score_text_samples vs nll {e:.3e}", dir.display());
                assert!(e <= 1e-4, "{}: score_text_samples vs nll {e:.3e}", dir.display());
            }
        }
    }
}

fn sampled(dir: &Path, backend: &str, guided: bool, seed: u64, r: &Named) -> kiln::jetformer::T2iSamples {
    let text: Vec<i64> = tensor(r, "text").to_f64().iter().map(|&x| x as i64).collect();
    let mask: Vec<u8> = tensor(r, "text_mask").to_f64().iter().map(|&x| x as u8).collect();
    let o = kiln::jetformer::T2iOptions { temperature: 0.8, temperature_probs: 1.2, cfg_weight: if guided { 3.0 } else { 0.0 }, seed };
    let mut s = kiln::jetformer::T2iSampler::new(dir, 2, 2, guided, backend).unwrap_or_else(|e| panic!("sampler: {e}"));
    s.sample(&text, &mask, &o).unwrap_or_else(|e| panic!("sample: {e}"))
}

/// The sampler (prefill + one cached step per token, the prompt's padding in row 1) reports the
/// log-probabilities and head inputs that teacher-forced `score_image_samples` gives its tokens;
/// under guidance the head inputs of the conditional rows still agree.
#[test]
fn rescoring_samples_gives_the_sampler_logp() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    let mut dirs = vec![fixture()];
    dirs.extend(variant_dirs().iter().cloned());
    for dir in dirs {
        for guided in [false, true] {
            let smp = sampled(&dir, "cpu", guided, 7, &r);
            let mut ins = inputs(&r, "score_image_samples", false);
            for (n, t) in ins.iter_mut() {
                if n == "image_tokens" {
                    *t = Tensor::from_f32(&[2, 16, 8], &smp.tokens);
                }
            }
            let mut s = session(&dir, "cpu", 2);
            let sc = run(&mut s, "score_image_samples", &ins);
            let e = err(&tensor(&sc, "prelogits").to_f32(), &smp.prelogits);
            eprintln!("{} guided {guided}: prelogits {e:.3e}", dir.display());
            assert!(e <= 1e-4, "{}: sampler prelogits vs rescoring {e:.3e}", dir.display());
            if !guided {
                let e = err(&tensor(&sc, "logp").to_f32(), &smp.logp);
                eprintln!("{}: logp {e:.3e}", dir.display());
                assert!(e <= 1e-4, "{}: sampler logp vs rescoring {e:.3e}", dir.display());
            }
            assert!(smp.logp.iter().all(|x| x.is_finite()) && smp.images.to_f32().iter().all(|x| (-1.0..=1.0).contains(x)));
        }
    }
}

/// One seed gives one image: twice on cpu bit for bit, on cpu and cube within float noise; another
/// seed gives another image.
#[test]
fn same_seed_same_image_on_every_backend() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    let a = sampled(&fixture(), "cpu", true, 11, &r).images.to_f32();
    assert_eq!(a, sampled(&fixture(), "cpu", true, 11, &r).images.to_f32(), "cpu twice");
    let other = sampled(&fixture(), "cpu", true, 12, &r).images.to_f32();
    assert!(err(&a, &other) > 1e-2, "seeds 11 and 12 gave the same image");
    for &backend in BACKENDS {
        let b = sampled(&fixture(), backend, true, 11, &r).images.to_f32();
        let e = err(&b, &a);
        eprintln!("{backend} vs cpu: {e:.3e}");
        assert!(e <= 1e-3, "{backend}: seed 11 image differs from cpu's by {e:.3e}");
    }
}

/// The captioner (prefill `[boi, image, bos]` / `[bos, image]`, one cached step per token)
/// reports the log-probabilities and head inputs `score_text_samples` gives its tokens; a
/// model with repeated vocabularies is refused by name.
#[test]
fn rescoring_captions_gives_the_captioner_logp() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    let tokens = tensor(&r, "image_tokens").clone();
    for (v, dir) in variants().iter().zip(variant_dirs()) {
        if v.model.get("num_vocab_repeats").and_then(|x| x.as_u64()) != Some(1) {
            let e = kiln::jetformer::Captioner::new(dir, 2, 3, "cpu").err().expect("repeated vocabularies refused");
            assert!(e.to_string().contains("num_vocab_repeats"), "{e}");
            continue;
        }
        for (temperature, top_k, top_p, seed) in [(0.0, 0, 1.0, 0), (0.7, 0, 1.0, 3), (1.0, 3, 0.9, 4)] {
            let mut c = kiln::jetformer::Captioner::new(dir, 2, 3, "cpu").unwrap_or_else(|e| panic!("captioner: {e}"));
            let sampling = kiln::sampling::HfSampling { temperature, top_k, top_p, seed };
            let caps = c.caption_tokens(&tokens, &sampling).unwrap();
            let mut s = session(dir, "cpu", 3);
            let ins: Named = vec![("image_tokens".into(), tokens.clone()), ("text".into(), Tensor::from_i64(&[2, 3], &caps.tokens))];
            let sc = run(&mut s, "score_text_samples", &ins);
            let e = err(&tensor(&sc, "logp").to_f32(), &caps.logp).max(err(&tensor(&sc, "prelogits").to_f32(), &caps.prelogits));
            eprintln!("{} T {temperature}: {:?} error {e:.3e}", v.name, caps.tokens);
            assert!(e <= 1e-4, "{}: captioner vs score_text_samples {e:.3e}", v.name);
        }
    }
}

/// The cuda lowering of every program (the entries, the sampler's and the captioner's) picks a
/// kernel for every step; `kiln compile --backend cuda --arch sm_90a` builds the entries' CUBINs
/// with NVRTC (no GPU needed).
#[cfg(feature = "cuda")]
#[test]
fn the_cuda_lowering_compiles() {
    let opts = |batch: usize| CompileOptions { profile: Profile { batch, ..profile(2) }, backend: "cuda".into(), trace: false };
    let mut dirs = vec![fixture()];
    dirs.extend(variant_dirs().iter().cloned());
    for dir in &dirs {
        compile(dir, &opts(2)).unwrap_or_else(|e| panic!("{}: entries: {e}", dir.display()));
        let s = kiln_models::big_vision::jetformer::build_sampler(dir, 4, 2, 2, Some((8, 8))).expect("sampler graphs");
        let states = s.states.iter().map(|(n, ty)| kiln_graph::program::StateSpec { name: n.clone(), ty: ty.clone() }).collect();
        kiln::compile_with_states(&s.entries, "t2i", "test", states, &opts(4))
            .unwrap_or_else(|e| panic!("{}: sampler: {e}", dir.display()));
        if let Ok((entries, states, _, _)) = kiln_models::big_vision::jetformer::build_captioner(dir, 2, 3) {
            let states = states.iter().map(|(n, ty)| kiln_graph::program::StateSpec { name: n.clone(), ty: ty.clone() }).collect();
            kiln::compile_with_states(&entries, "i2t", "test", states, &opts(2))
                .unwrap_or_else(|e| panic!("{}: captioner: {e}", dir.display()));
        }
    }
    if !kiln_kernels::cuda::nvrtc::available() {
        assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "KILN_REQUIRE_NVRTC=1 but NVRTC is missing");
        return;
    }
    let art = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jetformer_cuda.kiln");
    let f = fixture();
    let args = [
        "compile",
        f.to_str().unwrap(),
        "--backend",
        "cuda",
        "--arch",
        "sm_90a",
        "--batch",
        "2",
        "--seq-len",
        "2",
        "-o",
        art.to_str().unwrap(),
    ];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = kiln_graph::artifact::load_file(&art).unwrap();
    let names: Vec<&str> = p.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, kiln_models::big_vision::jetformer::ENTRIES);
    assert!(!p.binaries.is_empty());
}

/// The per-layer parameter layout (`scan: false`, `decoder/layers/<i>/...`) reads the same
/// weights as the scan layout: the same outputs bit for bit.
#[test]
fn per_layer_layout_equals_scan_layout() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    let (v, per_layer) =
        variants().into_iter().zip(variant_dirs()).find(|(v, _)| v.model.get("scan").is_some()).expect("a per-layer variant");
    let mut model = v.model.clone();
    model.as_object_mut().unwrap().remove("scan");
    let twin = write_variant(&Variant { name: "scan_twin", model, ..v });
    let (mut a, mut b) = (session(per_layer, "cpu", 2), session(&twin, "cpu", 2));
    let ins = inputs(&r, "forward", true);
    let (x, y) = (run(&mut a, "forward", &ins), run(&mut b, "forward", &ins));
    for (name, t) in &x {
        assert_eq!(t.bytes, tensor(&y, name).bytes, "{name}");
    }
}

/// `head_dtype: bfloat16`: the image head's outputs are bfloat16 values (Flax's
/// `Dense(dtype=bfloat16)` rounds its product and sum), on cpu and cube, and differ from the
/// float32 head's by bfloat16's rounding, not more.
#[test]
fn a_bfloat16_head_gives_bfloat16_logits() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    let (_, dir) = variants().into_iter().zip(variant_dirs()).find(|(v, _)| v.model.get("head_dtype").is_some()).expect("a bf16 variant");
    let mut f32_head: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    f32_head["model"]["head_dtype"] = "float32".into();
    let twin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jetformer_bf16_twin");
    std::fs::create_dir_all(&twin).unwrap();
    std::fs::write(twin.join("config.json"), f32_head.to_string()).unwrap();
    std::fs::copy(dir.join("params.npz"), twin.join("params.npz")).unwrap();
    let ins = inputs(&r, "forward", false);
    let want = run(&mut session(&twin, "cpu", 2), "forward", &ins);
    for &backend in BACKENDS {
        let got = run(&mut session(dir, backend, 2), "forward", &ins);
        let logits = tensor(&got, "image_logits").to_f32();
        assert!(logits.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x), "{backend}: a logit is not a bfloat16 value");
        let e = err(&logits, &tensor(&want, "image_logits").to_f32());
        eprintln!("{backend}: bf16 head vs f32 head {e:.3e}");
        assert!(e > 0.0 && e < 2e-2, "{backend}: bf16 head vs f32 head {e:.3e}");
    }
}

/// The captioner gives the same greedy tokens on every backend, log-probabilities within 1e-4.
#[test]
fn captions_agree_across_backends() {
    let r = io::read(&fixture().join("reference.safetensors")).expect("reference");
    let tokens = tensor(&r, "image_tokens").clone();
    let (_, dir) = variants().into_iter().zip(variant_dirs()).find(|(v, _)| v.untied).expect("an untied variant");
    let greedy = kiln::sampling::HfSampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
    let caption = |backend: &str| kiln::jetformer::Captioner::new(dir, 2, 4, backend).unwrap().caption_tokens(&tokens, &greedy).unwrap();
    let want = caption("cpu");
    for &backend in BACKENDS {
        let got = caption(backend);
        assert_eq!(got.tokens, want.tokens, "{backend}");
        assert!(err(&got.logp, &want.logp) <= 1e-4, "{backend}: logp");
    }
}
