//! The CapPa captioner (LocCa / LiT-decoder's encoder-decoder) against big_vision's
//! `cappa.Model` (`tests/fixtures/big_vision/cappa_captioner`, copied by
//! `scripts/copy_big_vision_fixtures.py` from the shared fixtures made with the official JAX
//! code): teacher-forced logits, the encoder's tokens and the decoder's intermediates within
//! 1e-4 relative, through the interpreter, the cpu and cube backends and the CLI. The fixture's decoder
//! is narrower than its encoder (16 vs 24) and its embedding has the mask token's extra row.

mod common;

use common::{rel_err, tensor, BACKENDS};
use kiln::{compile, io, CompileOptions};
use kiln_graph::interp::{self, Value};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn fixture() -> PathBuf {
    common::big_vision_case("cappa_captioner")
}

const OUTPUTS: [&str; 6] = ["encoded", "decoder/embedded", "decoder/block0", "decoder/block1", "decoder/final_norm", "logits"];

#[test]
fn teacher_forced_logits_match_big_vision() {
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let (images, text) = (tensor(&reference, "images"), tensor(&reference, "text"));
    let (s, l) = (&images.ty.shape, text.ty.shape[1]);
    let profile = Profile { batch: s[0], image_hw: Some((s[1], s[2])), seq_len: Some(l), ..Profile::default() };
    let store = Arc::new(WeightStore::open(&dir).expect("weights"));

    let built = kiln_models::build(&dir, &profile).unwrap_or_else(|e| panic!("build: {e}"));
    let g = built.graph("forward").expect("forward");
    let mut weights = HashMap::new();
    for (_, name, ty) in g.weights() {
        let (wt, bytes) = store.get(name, ty).unwrap_or_else(|e| panic!("{e}"));
        weights.insert(name.to_string(), Value::new(wt.clone(), kiln_runtime::tensor::to_f64(wt.dtype, bytes)).unwrap());
    }
    let value = |t: &Tensor| Value::new(t.ty.clone(), t.to_f64()).unwrap();
    let inputs = HashMap::from([("images".to_string(), value(images)), ("text".to_string(), value(text))]);
    let interp: HashMap<String, Vec<f32>> =
        interp::run(g, &inputs, &weights).expect("interpreter").into_iter().map(|(n, v)| (n, v.to_f32())).collect();

    let mut runs = vec![("interpreter", interp)];
    for &backend in BACKENDS {
        let c = compile(&dir, &CompileOptions { profile: profile.clone(), backend: backend.into(), trace: false }).expect("compile");
        let mut session = Session::new(c.program, store.clone()).expect("session");
        let outs = session.run("forward", &[("images", images), ("text", text)]).expect("run");
        runs.push((backend, outs.into_iter().map(|(n, t)| (n, t.to_f32())).collect()));
    }
    for name in OUTPUTS {
        let want = tensor(&reference, name).to_f32();
        for (who, got) in &runs {
            let e = rel_err(&got[name], &want);
            eprintln!("{who}: {name} relative error {e:.3e}");
            assert!(e < 1e-4, "{who}: {name}: relative error {e:.3e}");
        }
    }
}

/// `kiln run` takes the text length from `text` and the image size from `images`.
#[test]
fn the_cli_runs_the_captioner() {
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let tmp = std::env::temp_dir().join(format!("kiln-cappa-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let inputs = tmp.join("in.safetensors");
    let pick = |n: &str| (n.to_string(), tensor(&reference, n).clone());
    io::write(&inputs, &[pick("images"), pick("text")]).unwrap();
    let out = tmp.join("out.safetensors");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let got = io::read(&out);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let e = rel_err(&tensor(&got.unwrap(), "logits").to_f32(), &tensor(&reference, "logits").to_f32());
    assert!(e < 1e-4, "logits via the CLI: {e:.3e}");
}

/// Greedy decoding as big_vision's `uvim/decode.py` runs it on the captioner (`argmax_sampling`):
/// with an EOS that stops one row early, without EOS, and with forced prompt prefixes. Ids
/// exactly; log-probs (where `greedy/valid` says they are not loop artifacts) and scores within
/// 1e-4; through the encode / decode entries, with the cross-attention keys cached and (cpu)
/// recomputed every step as the official loop does.
#[test]
fn greedy_decoding_matches_big_vision() {
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let images = tensor(&reference, "images");
    let s = &images.ty.shape;
    let ids = |n: &str| tensor(&reference, n).to_f64().into_iter().map(|x| x as i64).collect::<Vec<_>>();
    let n = tensor(&reference, "greedy/prompts").ty.shape[1];
    use kiln::encdec::CrossKv;
    let runs = BACKENDS.iter().map(|&b| (b, CrossKv::Cached)).chain([("cpu", CrossKv::Recomputed)]);
    for (backend, cross) in runs {
        let mut g = kiln::encdec::EncDecGenerator::with_cross(&dir, s[0], (s[1], s[2]), n, backend, kiln_graph::DType::F32, cross)
            .expect("compile");
        for case in ["greedy", "greedy_noeos", "prompted"] {
            let prompts = if case == "greedy_noeos" { ids("greedy/prompts") } else { ids(&format!("{case}/prompts")) };
            let eos = match case {
                "greedy" => ids("greedy/eos_token")[0],
                _ => -1,
            };
            let r = g.generate(images, &prompts, eos).expect("generate");
            assert_eq!(r.sequences, ids(&format!("{case}/sequences")), "{backend}: {case}: sequences");
            if case == "greedy_noeos" {
                continue;
            }
            let want = tensor(&reference, &format!("{case}/logprobs")).to_f32();
            let valid: Vec<f64> = match case {
                "greedy" => tensor(&reference, "greedy/valid").to_f64(),
                _ => vec![1.0; want.len()],
            };
            for (i, ((a, b), ok)) in r.logprobs.iter().zip(&want).zip(&valid).enumerate() {
                if *ok != 0.0 {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{backend}: {case}: logprob {i}: {a} vs {b}");
                }
            }
            let scores = tensor(&reference, &format!("{case}/scores")).to_f32();
            for (a, b) in r.scores.iter().zip(&scores) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{backend}: {case}: score {a} vs {b}");
            }
            eprintln!("{backend} ({cross:?}): {case}: {:?} in {} steps", r.sequences, r.steps);
        }
    }
}

/// `kiln generate <captioner> --inputs (images, prompts, eos_token) --out` writes the greedy
/// `sequences`, `logprobs` and `scores`.
#[test]
fn the_cli_generates_captions() {
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let tmp = std::env::temp_dir().join(format!("kiln-cappa-gen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (inputs, out) = (tmp.join("in.safetensors"), tmp.join("out.safetensors"));
    let pick = |n: &str, as_: &str| (as_.to_string(), tensor(&reference, n).clone());
    io::write(&inputs, &[pick("images", "images"), pick("greedy/prompts", "prompts"), pick("greedy/eos_token", "eos_token")]).unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let got = io::read(&out);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = got.unwrap();
    assert_eq!(tensor(&got, "sequences").to_f64(), tensor(&reference, "greedy/sequences").to_f64());
    let (a, b) = (tensor(&got, "scores").to_f32(), tensor(&reference, "greedy/scores").to_f32());
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4 * y.abs().max(1.0)), "{a:?} vs {b:?}");
}

/// Sampling (kiln's seeded generator over decode.py's filters): top-k 1 is the greedy
/// caption; a seed gives the same tokens on every backend of the build and on a second run;
/// another seed gives other tokens; forced prompt tokens stay.
#[test]
fn seeded_sampling_is_reproducible() {
    use kiln::encdec::Sampling;
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let images = tensor(&reference, "images");
    let s = &images.ty.shape;
    let ids = |n: &str| tensor(&reference, n).to_f64().into_iter().map(|x| x as i64).collect::<Vec<_>>();
    let n = tensor(&reference, "greedy/prompts").ty.shape[1];
    let free = vec![0i64; s[0] * n];
    let mut runs = Vec::new();
    for &backend in BACKENDS {
        let mut g = kiln::encdec::EncDecGenerator::new(&dir, s[0], (s[1], s[2]), n, backend, kiln_graph::DType::F32).expect("compile");
        let top1 = Sampling { temperature: 1.0, top_k: 1, top_p: 0.0, seed: 9 };
        assert_eq!(g.generate_with(images, &free, -1, &top1).unwrap().sequences, ids("greedy_noeos/sequences"), "{backend}: top-k 1");
        let warm = Sampling { temperature: 1.5, top_k: 0, top_p: 0.0, seed: 3 };
        let a = g.generate_with(images, &free, -1, &warm).unwrap();
        assert_eq!(g.generate_with(images, &free, -1, &warm).unwrap(), a, "{backend}: the same seed twice");
        let other = g.generate_with(images, &free, -1, &Sampling { seed: 4, ..warm }).unwrap();
        assert_ne!(other.sequences, a.sequences, "{backend}: another seed");
        let prompted = g.generate_with(images, &ids("prompted/prompts"), -1, &warm).unwrap();
        for (got, forced) in prompted.sequences.iter().zip(ids("prompted/prompts")) {
            assert!(forced == 0 || *got == forced, "{backend}: a forced token was replaced");
        }
        runs.push((backend, a.sequences));
    }
    assert!(runs.windows(2).all(|w| w[0].1 == w[1].1), "backends disagree: {runs:?}");
}

/// The scan layout (`scan: true`: the encoder's blocks stacked on axis 0 under
/// `encoder/Transformer/encoderblock/`, the decoder's on axis 1 under `decoder/EncDecBlock/`, as
/// `nn.scan` stores them) made from the fixture's per-layer arrays gives the same logits bit for
/// bit and the same greedy captions; a scan config over per-layer arrays is refused by name.
#[test]
fn the_scan_layout_reads_the_same_weights() {
    let dir = fixture();
    let ck = kiln_models::Checkpoint::open(&dir).expect("index");
    let store = WeightStore::open(&dir).expect("weights");
    let (enc_layers, dec_layers) = (1, 2);
    let mut arrays: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    // Stacked array -> (axis, each layer's values, one layer's shape).
    type Stack = (usize, Vec<Vec<f32>>, Vec<usize>);
    let mut stacks: std::collections::BTreeMap<String, Stack> = Default::default();
    for (name, info) in &ck.tensors {
        let (ty, bytes) = store.get(name, &info.ty).unwrap();
        let v = Tensor { ty: ty.clone(), bytes: bytes.to_vec() }.to_f32();
        let layer = |pre: &str, sep: &str| -> Option<(usize, String)> {
            let rest = name.strip_prefix(pre)?;
            let (i, tail) = rest.split_once('/')?;
            Some((i.parse().ok()?, format!("{}{sep}{tail}", pre.trim_end_matches('_'))))
        };
        if let Some((i, base)) = layer("encoder/Transformer/encoderblock_", "/") {
            stacks.entry(base).or_insert((0, vec![vec![]; enc_layers], ty.shape.clone())).1[i] = v;
        } else if let Some((i, base)) = layer("decoder/EncDecBlock", "/") {
            stacks.entry(base).or_insert((1, vec![vec![]; dec_layers], ty.shape.clone())).1[i] = v;
        } else {
            arrays.push((name.clone(), ty.shape.clone(), v));
        }
    }
    for (base, (axis, layers, shape)) in stacks {
        // Stack on `axis`: numpy's `np.stack(layers, axis)`.
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis..].iter().product();
        let mut data = Vec::with_capacity(outer * inner * layers.len());
        for o in 0..outer {
            for l in &layers {
                data.extend_from_slice(&l[o * inner..(o + 1) * inner]);
            }
        }
        let mut stacked = shape.clone();
        stacked.insert(axis, layers.len());
        arrays.push((base, stacked, data));
    }
    let scan = std::env::temp_dir().join(format!("kiln-cappa-scan-{}", std::process::id()));
    std::fs::create_dir_all(&scan).unwrap();
    kiln::npz_write::write(&scan.join("params.npz"), &arrays).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["model"]["scan"] = serde_json::Value::Bool(true);
    std::fs::write(scan.join("config.json"), cfg.to_string()).unwrap();

    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let (images, text) = (tensor(&reference, "images"), tensor(&reference, "text"));
    let (s, l) = (&images.ty.shape, text.ty.shape[1]);
    let profile = Profile { batch: s[0], image_hw: Some((s[1], s[2])), seq_len: Some(l), ..Profile::default() };
    let logits = |d: &PathBuf| {
        let c = compile(d, &CompileOptions { profile: profile.clone(), backend: "cpu".into(), trace: false }).expect("compile");
        let mut session = Session::new(c.program, Arc::new(WeightStore::open(d).unwrap())).expect("session");
        session.run("forward", &[("images", images), ("text", text)]).expect("run")
    };
    let (a, b) = (logits(&dir), logits(&scan));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!((na, &ta.bytes), (nb, &tb.bytes), "{na}: the scan layout differs");
    }
    let n = tensor(&reference, "greedy/prompts").ty.shape[1];
    let prompts: Vec<i64> = tensor(&reference, "greedy/prompts").to_f64().into_iter().map(|x| x as i64).collect();
    let caption = |d: &PathBuf| {
        let mut g = kiln::encdec::EncDecGenerator::with_cross(
            d,
            s[0],
            (s[1], s[2]),
            n,
            "cpu",
            kiln_graph::DType::F32,
            kiln::encdec::CrossKv::Cached,
        )
        .expect("compile");
        g.generate(images, &prompts, -1).expect("generate").sequences
    };
    assert_eq!(caption(&dir), caption(&scan));

    // scan: true over the per-layer arrays is refused, naming what is missing.
    std::fs::copy(dir.join("params.npz"), scan.join("params.npz")).unwrap();
    let e = kiln_models::build(&scan, &profile).err().expect("refused").to_string();
    assert!(e.contains("decoder/EncDecBlock/") && e.contains("scan: false"), "{e}");
    let _ = std::fs::remove_dir_all(&scan);
}
