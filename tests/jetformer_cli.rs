//! JetFormer from the command line and from `kiln synth`: `kiln run` on each entry with only the
//! inputs the official call needs (ids as int32, flags as int64: converted; `text_mask`,
//! `drop_prefix`, `text_loss` defaulted) gives the fixture's reference, `--bpd` prints bits per
//! dimension, `kiln sample --prompt` writes a PNG grid; a tiny synthesized JetFormer (the same
//! recipe code as `jetformer-350m-256`) builds, runs, samples and captions a PNG.

mod common;

use kiln::io;
use kiln_runtime::Tensor;
use std::path::{Path, PathBuf};
use std::process::Command;

fn err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1f64, |m, &x| m.max((x as f64).abs()));
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs())) / scale
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-jetformer-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn kiln(args: &[&str]) -> String {
    let r = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    assert!(r.status.success(), "kiln {args:?}: {}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).into_owned()
}

fn retyped(t: &Tensor, as_i32: bool) -> Tensor {
    let v = t.to_f64();
    if as_i32 {
        let bytes = v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect();
        Tensor { ty: kiln_graph::TensorType::new(kiln_graph::DType::I32, t.ty.shape.clone()), bytes }
    } else {
        Tensor::from_i64(&t.ty.shape, &v.iter().map(|&x| x as i64).collect::<Vec<_>>())
    }
}

#[test]
fn kiln_run_fills_defaults_and_prints_bits_per_dim() {
    let dir = common::big_vision_case("jetformer");
    let r = io::read(&dir.join("reference.safetensors")).unwrap();
    let get = |n: &str| common::tensor(&r, n).clone();
    let t = tmp("run");
    // forward without drop_prefix (the conditional call), ids as int32, the flag as int64.
    let ins = vec![
        ("text".to_string(), retyped(&get("text"), true)),
        ("text_mask".to_string(), get("text_mask")),
        ("text_first".to_string(), retyped(&get("text_first"), false)),
        ("image_tokens".to_string(), get("image_tokens")),
    ];
    let (i, o) = (t.join("in.safetensors"), t.join("out.safetensors"));
    io::write(&i, &ins).unwrap();
    kiln(&["run", dir.to_str().unwrap(), "--inputs", i.to_str().unwrap(), "--out", o.to_str().unwrap(), "--entry", "forward"]);
    let outs = io::read(&o).unwrap();
    for name in ["text_logits", "gmm_means", "pre_logits"] {
        let e = err(&common::tensor(&outs, name).to_f32(), &get(name).to_f32());
        assert!(e <= 1e-4, "forward {name}: {e:.3e}");
    }
    // nll without text_loss (defaults to text_mask, which the fixture's text_loss equals).
    let ins = vec![
        ("images".to_string(), get("images")),
        ("text".to_string(), get("text")),
        ("text_mask".to_string(), get("text_mask")),
        ("text_first".to_string(), get("text_first")),
    ];
    io::write(&i, &ins).unwrap();
    let out =
        kiln(&["run", dir.to_str().unwrap(), "--inputs", i.to_str().unwrap(), "--out", o.to_str().unwrap(), "--entry", "nll", "--bpd"]);
    let bpd = get("nll_image_bpd").to_f32();
    let line = out.lines().find(|l| l.starts_with("bits per dim: [")).unwrap_or_else(|| panic!("no bits per dim line: {out}"));
    let shown: Vec<f32> = line["bits per dim: [".len()..line.find(']').unwrap()].split(", ").map(|x| x.parse().unwrap()).collect();
    assert!(err(&shown, &bpd) <= 1e-4, "{line} vs {bpd:?}");
    let outs = io::read(&o).unwrap();
    let e = err(&common::tensor(&outs, "nll_image_bpd").to_f32(), &bpd);
    assert!(e <= 1e-4, "nll_image_bpd {e:.3e}");
    let _ = std::fs::remove_dir_all(&t);
}

/// `score_image_samples` through `kiln run` with scalar (`[]`) temperatures and no `text_mask`
/// (every token real: the fixture's row 0) gives the official sampler's row-0 `logp`.
#[test]
fn kiln_run_scores_samples_with_scalar_temperatures() {
    let dir = common::big_vision_case("jetformer");
    let r = io::read(&dir.join("reference.safetensors")).unwrap();
    let get = |n: &str| common::tensor(&r, n).clone();
    let scalar = |v: f32| Tensor { ty: kiln_graph::TensorType::new(kiln_graph::DType::F32, vec![]), bytes: v.to_le_bytes().to_vec() };
    let t = tmp("score");
    let ins = vec![
        ("text".to_string(), get("text")),
        ("image_tokens".to_string(), get("t2i_tokens")),
        ("temperature".to_string(), scalar(0.8)),
        ("temperature_probs".to_string(), scalar(1.2)),
    ];
    let (i, o) = (t.join("in.safetensors"), t.join("out.safetensors"));
    io::write(&i, &ins).unwrap();
    kiln(&["run", dir.to_str().unwrap(), "--inputs", i.to_str().unwrap(), "--out", o.to_str().unwrap(), "--entry", "score_image_samples"]);
    let outs = io::read(&o).unwrap();
    let (got, want) = (common::tensor(&outs, "logp").to_f32(), get("t2i_logp").to_f32());
    assert!(err(&got[..16], &want[..16]) <= 1e-4, "row 0 logp");
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn kiln_sample_writes_a_grid() {
    let dir = common::big_vision_case("jetformer");
    let t = tmp("sample");
    let png = t.join("grid.png");
    let out = kiln(&[
        "sample",
        dir.to_str().unwrap(),
        "--prompt",
        "1,9",
        "--count",
        "3",
        "--cfg-weight",
        "2",
        "--seed",
        "5",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(out.contains("3 images in a 2x2 grid"), "{out}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let _ = std::fs::remove_dir_all(&t);
}

/// A tiny JetFormer through `kiln synth`'s machinery (schema build, declared einsum stacks and
/// bfloat16 head, the Jet's permutations under `params_adaptor/`): every entry compiles and runs,
/// finite.
#[test]
fn a_synthesized_jetformer_runs() {
    use kiln_models::registry::{Given, SynthRecipe, WeightFormat};
    let jet = kiln_models::jet::synth_kwargs(2, 1, 16, 2, 1, &["channels"], &["checkerboard"]);
    let jr = kiln_models::jet::synth_recipe(jet.clone(), 4, 12, 3).unwrap();
    let given = jr.given.into_iter().map(|g| Given { name: format!("params_adaptor/{}", g.name), ..g }).collect();
    let model = serde_json::json!({"width": 16, "depth": 2, "mlp_dim": 32, "num_heads": 4, "num_kv_heads": 1, "head_dim": 4,
        "vocab_size": 20, "bos_id": 17, "boi_id": 18, "nolabel_id": 19, "num_mixtures": 3, "out_dim": 4, "untie_output_vocab": true,
        "head_dtype": "bfloat16"});
    let patch_pca = serde_json::json!({"model_name": "proj.jetformer.patch_pca", "model": {"input_size": [8, 8], "patch_size": [2, 2], "skip_pca": true}});
    let config = serde_json::json!({"model_name": "proj.jetformer.jetformer", "model": model, "patch_pca": patch_pca,
        "adaptor_name": "proj.jet.jet", "adaptor": {"model": jet}, "latent_noise_dim": 8});
    let recipe = SynthRecipe { config, dtype: kiln_graph::DType::F32, format: WeightFormat::Npz, roots: &[""], given, batch: 1 };
    let out = tmp("synth");
    kiln::synth::synth_folder(&kiln_models::big_vision::jetformer::FAMILY, &recipe, &out, 1, false).unwrap();
    let png = out.join("g.png");
    let said = kiln(&["sample", out.to_str().unwrap(), "--prompt", "3 4 5", "--count", "2", "-o", png.to_str().unwrap()]);
    assert!(said.contains("2 images"), "{said}");
    let images = Tensor::from_f32(&[2, 8, 8, 3], &vec![0.25; 2 * 8 * 8 * 3]);
    let text = Tensor::from_i64(&[2, 3], &[3, 4, 5, 6, 7, 8]);
    let first = Tensor { ty: kiln_graph::TensorType::new(kiln_graph::DType::U8, vec![2]), bytes: vec![1, 0] };
    let (i, o) = (out.join("in.safetensors"), out.join("out.safetensors"));
    io::write(&i, &[("images".into(), images), ("text".into(), text), ("text_first".into(), first)]).unwrap();
    kiln(&["run", out.to_str().unwrap(), "--inputs", i.to_str().unwrap(), "--out", o.to_str().unwrap(), "--entry", "nll"]);
    let outs = io::read(&o).unwrap();
    for (name, t) in &outs {
        assert!(t.to_f32().iter().all(|x| x.is_finite()), "{name} is not finite");
    }
    // Captioning from a PNG (resized to 8x8 as big_vision's resize does; 4 token ids).
    let img = out.join("x.png");
    let px: Vec<u8> = (0..12 * 10 * 3).map(|i| (i * 7 % 256) as u8).collect();
    kiln::png::write(&img, 12, 10, 3, &px).unwrap();
    let said = kiln(&["generate", out.to_str().unwrap(), "--image", img.to_str().unwrap(), "--max-new-tokens", "4"]);
    let ids = said.lines().find(|l| l.starts_with("tokens [")).unwrap_or_else(|| panic!("{said}"));
    assert_eq!(ids.matches(',').count(), 3, "{ids}");
    let _ = std::fs::remove_dir_all(Path::new(&out));
}

/// What kiln does not build is refused naming the field: an unknown kwarg, PCA, the
/// full-covariance head, a bfloat16 KV cache, a noise split that does not add up, an adaptor
/// kiln does not know, an untied head over repeated vocabularies.
#[test]
fn bad_configs_are_refused_by_name() {
    let src = common::big_vision_case("jetformer");
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("model.frobnicate", Box::new(|c| c["model"]["frobnicate"] = 1.into())),
        ("patch_pca.model.skip_pca", Box::new(|c| c["patch_pca"]["model"]["skip_pca"] = false.into())),
        ("model.multivariate", Box::new(|c| c["model"]["multivariate"] = true.into())),
        ("model.cache_dtype", Box::new(|c| c["model"]["cache_dtype"] = "bfloat16".into())),
        ("latent_noise_dim", Box::new(|c| c["latent_noise_dim"] = 5.into())),
        ("adaptor_name", Box::new(|c| c["adaptor_name"] = "proj.givt.vae".into())),
        ("model.num_vocab_repeats", Box::new(|c| c["model"]["untie_output_vocab"] = true.into())),
        ("model.bos_id", Box::new(|c| c["model"]["bos_id"] = serde_json::Value::Null)),
        ("model.head_dtype", Box::new(|c| c["model"]["head_dtype"] = "float16".into())),
    ];
    for (field, edit) in cases {
        let d = tmp(&format!("bad-{}", field.replace('.', "-")));
        let mut c = base.clone();
        edit(&mut c);
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        std::fs::copy(src.join("params.npz"), d.join("params.npz")).unwrap();
        let e = match kiln_models::build(&d, &kiln_models::Profile::default()) {
            Ok(_) => panic!("{field}: built"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(field), "{field}: {e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// `kiln sample --prompt TEXT` on a folder holding a SentencePiece model (here a `c4_en`-like
/// UNIGRAM model): the text is lowercased (ASCII), tokenized, ended with EOS 1 and padded with 1
/// to the config's `text_len`, and samples exactly as the same ids given as numbers to the
/// folder without its tokenizer; `kiln generate --image` then prints the caption as text.
#[test]
fn text_prompts_go_through_the_folders_sentencepiece_model() {
    use kiln_models::registry::{Given, SynthRecipe, WeightFormat};
    let jet = kiln_models::jet::synth_kwargs(2, 1, 16, 2, 1, &["channels"], &["checkerboard"]);
    let jr = kiln_models::jet::synth_recipe(jet.clone(), 4, 12, 3).unwrap();
    let given = jr.given.into_iter().map(|g| Given { name: format!("params_adaptor/{}", g.name), ..g }).collect();
    let model = serde_json::json!({"width": 16, "depth": 2, "mlp_dim": 32, "num_heads": 4, "num_kv_heads": 1, "head_dim": 4,
        "vocab_size": 803, "bos_id": 800, "boi_id": 801, "nolabel_id": 802, "num_mixtures": 3, "out_dim": 4});
    let patch_pca = serde_json::json!({"model_name": "proj.jetformer.patch_pca", "model": {"input_size": [8, 8], "patch_size": [2, 2], "skip_pca": true}});
    let config = serde_json::json!({"model_name": "proj.jetformer.jetformer", "model": model, "patch_pca": patch_pca,
        "adaptor_name": "proj.jet.jet", "adaptor": {"model": jet}, "latent_noise_dim": 8, "text_len": 12});
    let recipe = SynthRecipe { config, dtype: kiln_graph::DType::F32, format: WeightFormat::Npz, roots: &[""], given, batch: 1 };
    let with = tmp("text-with");
    kiln::synth::synth_folder(&kiln_models::big_vision::jetformer::FAMILY, &recipe, &with, 1, false).unwrap();
    let without = tmp("text-without");
    for f in ["config.json", "params.npz"] {
        std::fs::copy(with.join(f), without.join(f)).unwrap();
    }
    let spm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm_unigram/t5like/sentencepiece.model");
    std::fs::copy(spm, with.join("sentencepiece.model")).unwrap();

    let prompt = "A Photo of a CAT near the Water";
    let tok = kiln::tokenizer::TextTokenizer::open(&with).unwrap();
    let ids = tok.encode(&prompt.to_ascii_lowercase()).unwrap();
    assert!(ids.len() < 11 && ids.iter().all(|&i| i > 2), "{ids:?}");
    let want = kiln::jetformer::prompt_tokens(&with, prompt).unwrap();
    let mut padded = ids.clone();
    padded.push(1);
    padded.resize(12, 1);
    assert_eq!(want.text, padded);
    assert_eq!(want.mask, vec![1; 12]);

    let (a, b) = (with.join("a.png"), without.join("b.png"));
    let ids_arg = padded.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    for (dir, p, png) in [(&with, prompt.to_string(), &a), (&without, ids_arg, &b)] {
        let said = kiln(&["sample", dir.to_str().unwrap(), "--prompt", &p, "--count", "2", "--seed", "7", "-o", png.to_str().unwrap()]);
        assert!(said.contains("2 images"), "{said}");
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "the text prompt and its ids sample differently");
    // Without a tokenizer, text is refused by name.
    let r = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["sample", without.to_str().unwrap(), "--prompt", prompt, "-o", without.join("c.png").to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.code() == Some(1) && e.contains("has no tokenizer (sentencepiece.model or tokenizer.model)"), "{e}");

    // Captions come back as text (the ids past the tokenizer's 800 pieces left out) and ids.
    let img = with.join("x.png");
    kiln::png::write(&img, 8, 8, 3, &[100; 8 * 8 * 3]).unwrap();
    let said = kiln(&["generate", with.to_str().unwrap(), "--image", img.to_str().unwrap(), "--max-new-tokens", "5"]);
    let lines: Vec<&str> = said.lines().collect();
    let at = lines.iter().position(|l| l.starts_with("tokens [")).unwrap_or_else(|| panic!("{said}"));
    assert!(at >= 1, "no text line before the ids: {said}");
    let toks: Vec<i64> = lines[at]["tokens [".len()..lines[at].find(']').unwrap()].split(", ").map(|s| s.parse().unwrap()).collect();
    let end = toks.iter().position(|&t| t == 1).unwrap_or(toks.len());
    let known: Vec<i64> = toks[..end].iter().copied().filter(|&t| t < 800).collect();
    assert_eq!(lines[at - 1], tok.decode(&known, true).unwrap());
    let _ = std::fs::remove_dir_all(&with);
    let _ = std::fs::remove_dir_all(&without);
}

#[test]
fn prompts_are_cut_and_padded_as_tolen_does() {
    use kiln::jetformer::tokenize_prompt;
    let p = tokenize_prompt(&[5, 6, 7], 6, false);
    assert_eq!((p.text, p.mask), (vec![5, 6, 7, 1, 1, 1], vec![1; 6]));
    let p = tokenize_prompt(&[5, 6, 7], 6, true);
    assert_eq!((p.text, p.mask), (vec![5, 6, 7, 1, 0, 0], vec![1, 1, 1, 0, 0, 0]));
    // Longer than text_len: cut, the EOS with it.
    let p = tokenize_prompt(&[5, 6, 7, 8], 3, false);
    assert_eq!((p.text, p.mask), (vec![5, 6, 7], vec![1, 1, 1]));
}
