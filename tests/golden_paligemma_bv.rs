//! PaliGemma 1 and 2 from big_vision's own checkpoints (`proj.paligemma.paligemma`) against the
//! official code (`tests/fixtures/big_vision/paligemma{,2}_bv`, copied by
//! `scripts/copy_big_vision_fixtures.py` from the shared fixtures made with big_vision at
//! 0127fb6): `Model.__call__`'s text logits and `zimg` within 1e-4 · max(1, max |ref|) on every
//! backend, greedy decoding's tokens exactly and its log-probabilities within the same bound;
//! the same outputs from the npz rewritten without the `params/` root, per layer, deflated
//! (`np.savez_compressed`), and in bfloat16 (`|V2`), and clear refusals of what kiln does not
//! build.

mod common;

use common::{tensor, BACKENDS};
use kiln::{compile, io, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CASES: [&str; 2] = ["paligemma_bv", "paligemma2_bv"];

/// max |a - b| / max(1, max |b|): the fixtures' bound.
fn err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(1f64, |m, &x| m.max((x as f64).abs()));
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs())) / scale
}

fn forward(dir: &Path, backend: &str, reference: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let images = tensor(reference, "images");
    let s = &images.ty.shape;
    let text = tensor(reference, "text");
    let profile = Profile { batch: s[0], image_hw: Some((s[1], s[2])), seq_len: Some(text.ty.shape[1]), ..Profile::default() };
    let c = compile(dir, &CompileOptions { profile, backend: backend.into(), trace: false }).unwrap_or_else(|e| panic!("compile: {e}"));
    let mut session = Session::new(c.program, Arc::new(WeightStore::open(dir).expect("weights"))).expect("session");
    let ones = Tensor::from_i64(&text.ty.shape, &vec![1; text.ty.numel()]);
    let ins = [("images", images), ("text", text), ("mask_ar", tensor(reference, "mask_ar")), ("mask_input", &ones)];
    session.run("forward", &ins).unwrap_or_else(|e| panic!("run: {e}"))
}

fn generate(dir: &Path, reference: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let ins: Vec<(String, Tensor)> = ["text", "mask_ar", "mask_input"]
        .iter()
        .map(|n| (n.to_string(), tensor(reference, &format!("prompt/{n}")).clone()))
        .chain(["images", "eos_token"].iter().map(|n| (n.to_string(), tensor(reference, n).clone())))
        .collect();
    let n = tensor(reference, "greedy/sequences").ty.shape[1];
    kiln::paligemma_bv::generate(dir, &ins, n, "cpu", kiln_graph::DType::F32).unwrap_or_else(|e| panic!("generate: {e}"))
}

#[test]
fn forward_matches_big_vision_on_every_backend() {
    for case in CASES {
        let dir = common::big_vision_case(case);
        let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
        for &backend in BACKENDS {
            let outs = forward(&dir, backend, &reference);
            for name in ["logits", "zimg"] {
                let e = err(&tensor(&outs, name).to_f32(), &tensor(&reference, name).to_f32());
                eprintln!("{case} {backend}: {name} error {e:.3e}");
                assert!(e <= 1e-4, "{case} {backend}: {name}: error {e:.3e}");
            }
            // P1: the official teacher-forced logits are not soft-capped; the capped ones differ.
            let capped = err(&tensor(&outs, "logits").to_f32(), &tensor(&reference, "llm_logits_softcapped_text").to_f32());
            if case == "paligemma2_bv" {
                assert!(capped > 1e-2, "{case}: the logits look soft-capped ({capped:.3e} from the capped reference)");
            }
        }
    }
}

#[test]
fn greedy_decoding_matches_big_vision() {
    for case in CASES {
        let dir = common::big_vision_case(case);
        let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
        let outs = generate(&dir, &reference);
        let (got, want) = (tensor(&outs, "sequences").to_f64(), tensor(&reference, "greedy/sequences").to_f64());
        assert_eq!(got, want, "{case}: greedy tokens");
        let e = err(&tensor(&outs, "logprobs").to_f32(), &tensor(&reference, "greedy/logprobs").to_f32());
        eprintln!("{case}: logprobs error {e:.3e}");
        assert!(e <= 1e-4, "{case}: logprobs error {e:.3e}");
    }
}

/// The fixture's npz rewritten: keys without `params/`, the decoder's layers one array per layer
/// (`llm/layers/<i>/...`) when `per_layer`, floats as bfloat16 (`|V2`) when `bf16`, deflated when
/// `deflate`; and, with `bf16`, an f32 twin holding the same rounded values.
fn rewrite(case: &str, to: &Path, per_layer: bool, bf16: bool, deflate: bool) {
    let src = common::big_vision_case(case);
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(src.join("config.json"), to.join("config.json")).unwrap();
    let mut z = zip::ZipArchive::new(std::fs::File::open(src.join("params.npz")).unwrap()).unwrap();
    let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    let mut w = zip::ZipWriter::new(std::fs::File::create(to.join("params.npz")).unwrap());
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let name = f.name().strip_prefix("params/").unwrap().strip_suffix(".npy").unwrap().to_string();
        let mut bytes = vec![];
        f.read_to_end(&mut bytes).unwrap();
        let (ty, head) = kiln_graph::npz::parse_npy_header(&bytes).unwrap();
        let values: Vec<f32> = bytes[head..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let layers: Vec<(String, Vec<usize>, &[f32])> = match name.strip_prefix("llm/layers/") {
            Some(rest) if per_layer => {
                let n = ty.numel() / ty.shape[0];
                (0..ty.shape[0]).map(|l| (format!("llm/layers/{l}/{rest}"), ty.shape[1..].to_vec(), &values[l * n..(l + 1) * n])).collect()
            }
            _ => vec![(name, ty.shape.clone(), &values[..])],
        };
        for (key, shape, v) in layers {
            w.start_file(format!("{key}.npy"), opts).unwrap();
            w.write_all(&npy(&shape, v, bf16)).unwrap();
        }
    }
    w.finish().unwrap();
}

/// A `.npy` of `v`: f32, or bfloat16 stored as big_vision writes it (`|V2`, round to nearest even).
fn npy(shape: &[usize], v: &[f32], bf16: bool) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| format!("{d},")).collect();
    let descr = if bf16 { "|V2" } else { "<f4" };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}), }}", dims.join(" "));
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    for &x in v {
        match bf16 {
            true => out.extend(half::bf16::from_f32(x).to_le_bytes()),
            false => out.extend(x.to_le_bytes()),
        }
    }
    out
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-pgbv-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn every_npz_layout_gives_the_same_outputs() {
    let case = "paligemma2_bv";
    let reference = io::read(&common::big_vision_case(case).join("reference.safetensors")).expect("reference");
    let base = forward(&common::big_vision_case(case), "cpu", &reference);
    let same = |dir: &Path, what: &str| {
        let outs = forward(dir, "cpu", &reference);
        for name in ["logits", "zimg"] {
            assert_eq!(tensor(&outs, name).to_f32(), tensor(&base, name).to_f32(), "{what}: {name} differs from the stored npz's");
        }
        assert_eq!(tensor(&generate(dir, &reference), "sequences").to_f64(), tensor(&reference, "greedy/sequences").to_f64(), "{what}");
    };
    let plain = tmp("plain");
    rewrite(case, &plain, true, false, false);
    same(&plain, "no params/ root, per-layer decoder");
    let deflated = tmp("deflated");
    rewrite(case, &deflated, false, false, true);
    same(&deflated, "np.savez_compressed");
    // bfloat16: equal to an f32 file of the same rounded values, and near the f32 reference.
    let (bf, rounded) = (tmp("bf16"), tmp("rounded"));
    rewrite(case, &bf, false, true, false);
    let outs = forward(&bf, "cpu", &reference);
    let mut values = vec![];
    {
        let mut z = zip::ZipArchive::new(std::fs::File::open(bf.join("params.npz")).unwrap()).unwrap();
        for i in 0..z.len() {
            let mut f = z.by_index(i).unwrap();
            let mut b = vec![];
            f.read_to_end(&mut b).unwrap();
            let (ty, head) = kiln_graph::npz::parse_npy_header(&b).unwrap();
            assert_eq!(ty.dtype, kiln_graph::DType::BF16);
            let v: Vec<f32> = b[head..].chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
            values.push((f.name().trim_end_matches(".npy").to_string(), ty.shape.clone(), v));
        }
    }
    std::fs::create_dir_all(&rounded).unwrap();
    std::fs::copy(bf.join("config.json"), rounded.join("config.json")).unwrap();
    kiln::npz_write::write(&rounded.join("params.npz"), &values).unwrap();
    let twin = forward(&rounded, "cpu", &reference);
    for name in ["logits", "zimg"] {
        assert_eq!(tensor(&outs, name).to_f32(), tensor(&twin, name).to_f32(), "bf16: {name} differs from its f32 twin");
        let e = err(&tensor(&outs, name).to_f32(), &tensor(&reference, name).to_f32());
        eprintln!("bf16 weights: {name} error {e:.3e} from the f32 reference");
        assert!(e < 2e-2, "bf16: {name} is {e:.3e} from the f32 reference");
    }
    for d in [plain, deflated, bf, rounded] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn refuses_what_it_does_not_build() {
    let case = "paligemma_bv";
    let src = common::big_vision_case(case);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("llm.flash", Box::new(|c| c["model"]["llm"]["flash"] = true.into())),
        ("gating", Box::new(|c| c["model"]["llm"]["query_pre_attn_norm"] = "gating".into())),
        ("pool_type", Box::new(|c| c["model"]["img"]["pool_type"] = "gap".into())),
        (
            "width",
            Box::new(|c| {
                c["model"]["llm"].as_object_mut().unwrap().remove("width");
            }),
        ),
        ("llm_model", Box::new(|c| c["model"]["llm_model"] = "proj.paligemma.gemma".into())),
        ("vocab_size", Box::new(|c| c["model"]["llm"]["vocab_size"] = 301.into())),
        ("cache_dtype", Box::new(|c| c["model"]["llm"]["cache_dtype"] = "float16".into())),
    ];
    let dir = tmp("refusals");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("params.npz"), dir.join("params.npz")).unwrap();
    for (want, edit) in cases {
        let mut c = cfg.clone();
        edit(&mut c);
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let profile = Profile { batch: 1, image_hw: Some((24, 24)), seq_len: Some(4), ..Profile::default() };
        let e = kiln_models::build(&dir, &profile).err().unwrap_or_else(|| panic!("{want}: built")).to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn loading_reports_progress() {
    use std::sync::Mutex;
    static SEEN: Mutex<Vec<(String, u64, u64)>> = Mutex::new(Vec::new());
    kiln_runtime::progress::set_hook(Some(Box::new(|stage, done, total| SEEN.lock().unwrap().push((stage.to_string(), done, total)))));
    let dir = common::big_vision_case("paligemma_bv");
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    forward(&dir, "cpu", &reference);
    kiln_runtime::progress::set_hook(None);
    let seen = SEEN.lock().unwrap();
    // The hook is global to the process: other tests of this binary, loading at the same
    // time, report too. Each load reports its own total; this program's (from its artifact's
    // forward entry) must count up to its last step.
    let fwd: Vec<_> = seen.iter().filter(|(s, _, _)| s == "preparing 'forward'").collect();
    assert!(!fwd.is_empty(), "no progress reported for the forward entry");
    assert!(fwd.iter().all(|r| r.1 < r.2), "{fwd:?}");
    let totals: std::collections::BTreeSet<u64> = fwd.iter().map(|r| r.2).collect();
    let complete = |t: u64| (0..t).all(|d| fwd.iter().any(|r| r.2 == t && r.1 == d));
    assert!(totals.iter().any(|&t| t > 10 && complete(t)), "no load reported every one of its steps: {fwd:?}");
}

/// `kiln generate --prompt --image` on a big_vision folder (the fixture's weights with a
/// 300-piece SentencePiece model, `tests/fixtures/spm/tiny`): the tokens equal those of the
/// official-inputs path given the same example prepared by hand (a 28x28 image needs no resize:
/// pixels to [-1, 1]; text `[BOS] + tok(prompt) + tok("\n")`, all prefix).
#[test]
fn prompt_and_image_give_the_official_inputs_tokens() {
    let dir = tmp("prompt");
    let src = common::big_vision_case("paligemma2_bv");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "params.npz"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let spm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm/tiny/tokenizer.model");
    std::fs::copy(spm, dir.join("paligemma_tokenizer.model")).unwrap();
    let px: Vec<u8> = (0..28 * 28 * 3).map(|i| ((i * 37) % 251) as u8).collect();
    kiln::png::write(&dir.join("x.png"), 28, 28, 3, &px).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", dir.to_str().unwrap(), "--prompt", "a cat", "--image", dir.join("x.png").to_str().unwrap()])
        .args(["--max-new-tokens", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = err.lines().find(|l| l.contains("new_ids")).unwrap_or_else(|| panic!("no JSON line: {err}"));
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let got: Vec<i64> = v["new_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();

    let tok = kiln::tokenizer::TextTokenizer::open(&dir).unwrap();
    let mut text = vec![2];
    text.extend(tok.encode("a cat").unwrap());
    text.extend(tok.encode("\n").unwrap());
    let t = text.len();
    let images: Vec<f32> = px.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    let ins = vec![
        ("images".to_string(), Tensor::from_f32(&[1, 28, 28, 3], &images)),
        ("text".to_string(), Tensor::from_i64(&[1, t], &text)),
        ("mask_ar".to_string(), Tensor::from_i64(&[1, t], &vec![0; t])),
        ("mask_input".to_string(), Tensor::from_i64(&[1, t], &vec![1; t])),
    ];
    let want = kiln::paligemma_bv::generate(&dir, &ins, 5, "cpu", kiln_graph::DType::F32).unwrap();
    let want = tensor(&want, "sequences").to_f64();
    assert!(!got.is_empty());
    assert_eq!(got, want[..got.len()].iter().map(|&x| x as i64).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(dir);
}
