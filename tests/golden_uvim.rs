//! UViM's stage II VTT against big_vision's `uvim.vtt.Model` and its `uvim/decode.py` predict
//! loop (`tests/fixtures/big_vision/uvim_vtt`, copied by `scripts/copy_big_vision_fixtures.py`
//! from the shared fixtures made with the official JAX code): teacher-forced logits and the
//! encoder's tokens within 1e-4, and greedy code generation (prompts of zeros, no EOS, as
//! `trainers/proj/uvim/train.py` predicts) with exact ids, on the cpu and cube backends.

mod common;

use common::{rel_err, tensor, BACKENDS};
use kiln::{compile, io, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::PathBuf;
use std::sync::Arc;

fn fixture() -> PathBuf {
    common::big_vision_case("uvim_vtt")
}

#[test]
fn teacher_forced_logits_and_greedy_codes_match_big_vision() {
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let (images, text) = (tensor(&reference, "images"), tensor(&reference, "text"));
    let s = &images.ty.shape;
    let ids = |n: &str| tensor(&reference, n).to_f64().into_iter().map(|x| x as i64).collect::<Vec<_>>();
    let store = Arc::new(WeightStore::open(&dir).expect("weights"));
    for &backend in BACKENDS {
        // The image size comes from the config's input_size.
        let profile = Profile { batch: s[0], seq_len: Some(text.ty.shape[1]), ..Profile::default() };
        let c = compile(&dir, &CompileOptions { profile, backend: backend.into(), trace: false }).expect("compile");
        let mut session = Session::new(c.program, store.clone()).expect("session");
        let outs = session.run("forward", &[("images", images), ("text", text)]).expect("run");
        for name in ["encoded", "logits"] {
            let got = &outs.iter().find(|(n, _)| n == name).expect("output").1;
            let e = rel_err(&got.to_f32(), &tensor(&reference, name).to_f32());
            eprintln!("{backend}: {name} relative error {e:.3e}");
            assert!(e < 1e-4, "{backend}: {name}: {e:.3e}");
        }

        let n = tensor(&reference, "greedy/prompts").ty.shape[1];
        let mut g = kiln::encdec::EncDecGenerator::new(&dir, s[0], (s[1], s[2]), n, backend, kiln_graph::DType::F32).expect("compile");
        let r = g.generate(images, &ids("greedy/prompts"), ids("greedy/eos_token")[0]).expect("generate");
        assert_eq!(r.sequences, ids("greedy/sequences"), "{backend}: sequences");
        let codes: Vec<i64> = r.sequences.iter().map(|t| t - 1).collect();
        assert_eq!(codes, ids("greedy/codes"), "{backend}: codes = sequences - 1");
        let want = tensor(&reference, "greedy/logprobs").to_f32();
        for (i, (a, b)) in r.logprobs.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{backend}: logprob {i}: {a} vs {b}");
        }
        let scores = tensor(&reference, "greedy/scores").to_f32();
        for (a, b) in r.scores.iter().zip(&scores) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{backend}: score {a} vs {b}");
        }
    }
}

/// The VQ-VAE (`proj.uvim.vit`, the stage I npz layout) against big_vision: encode (`x/depth`
/// and the context image to the stem, the standardised bottleneck, the code exactly, the
/// quantised bottleneck and the reconstruction's logits) and decode (the codes back to logits;
/// the VTT's predicted codes, -1 included, as UViM's inference decodes them), on the interpreter
/// check's backends.
#[test]
fn vqvae_encode_and_decode_match_big_vision() {
    let dir = common::big_vision_case("uvim_vqvae");
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let (x, ctx) = (tensor(&reference, "x/depth"), tensor(&reference, "ctx"));
    let b = ctx.ty.shape[0];
    let store = Arc::new(WeightStore::open(&dir).expect("weights"));
    for &backend in BACKENDS {
        let profile = Profile { batch: b, ..Profile::default() };
        let c = compile(&dir, &CompileOptions { profile, backend: backend.into(), trace: false }).expect("compile");
        let mut s = Session::new(c.program, store.clone()).expect("session");
        let outs = s.run("forward", &[("x/depth", x), ("ctx", ctx)]).expect("forward");
        let out = |n: &str| &outs.iter().find(|(name, _)| name == n).unwrap_or_else(|| panic!("no output {n}")).1;
        assert_eq!(out("code").to_f64(), tensor(&reference, "code").to_f64(), "{backend}: code");
        // The full call decodes stop_gradient(e[idx] - x) + x, 2e-6 from e[idx].
        for (ours, theirs) in
            [("stem/depth", "stem/depth"), ("bottleneck", "bottleneck"), ("bottleneck_q", "bottleneck_q"), ("logits/depth", "logits/depth")]
        {
            let e = rel_err(&out(ours).to_f32(), &tensor(&reference, theirs).to_f32());
            eprintln!("{backend}: {ours} relative error {e:.3e}");
            assert!(e < 1e-4, "{backend}: {ours}: {e:.3e}");
        }
        for (codes, want) in [("code", "decode_logits/depth"), ("pred/codes", "pred/logits/depth")] {
            let outs = s.run("decode", &[("codes", tensor(&reference, codes)), ("ctx", ctx)]).expect("decode");
            let got = &outs.iter().find(|(n, _)| n == "logits/depth").expect("logits").1;
            let e = rel_err(&got.to_f32(), &tensor(&reference, want).to_f32());
            eprintln!("{backend}: decode({codes}) relative error {e:.3e}");
            assert!(e < 1e-4, "{backend}: decode({codes}): {e:.3e}");
        }
    }
    let pred = tensor(&reference, "pred/codes").to_f64();
    assert!(pred.contains(&-1.0), "the predicted codes exercise -1 (the last codeword)");
}

/// A UViM depth task folder (`uvim.json` beside the fixtures' VTT and VQ-VAE as `vtt/` and
/// `vqvae/`), removed on drop.
struct Task(PathBuf);

impl Task {
    fn new(tag: &str, task: &str) -> Task {
        let root = common::big_vision_case("");
        let dir = std::env::temp_dir().join(format!("kiln-uvim-{tag}-{}", std::process::id()));
        for (from, to) in [("uvim_vtt", "vtt"), ("uvim_vqvae", "vqvae")] {
            std::fs::create_dir_all(dir.join(to)).unwrap();
            for f in ["config.json", "params.npz"] {
                std::fs::copy(root.join(from).join(f), dir.join(to).join(f)).unwrap();
            }
        }
        std::fs::write(dir.join("uvim.json"), format!(r#"{{"task": "{task}", "min_depth": 0.001, "max_depth": 10.0}}"#)).unwrap();
        Task(dir)
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The whole UViM inference on the first fixture image: the VTT's greedy code (as the VTT
/// fixture has it) decoded by the VQ-VAE with the image as context, then big_vision's
/// `depth_task.predict_outputs` (argmax bin, its centre over the depth range) of the logits the
/// official VQ-VAE gave for that code.
#[test]
fn the_depth_task_predicts_as_big_vision() {
    let task = Task::new("predict", "depth");
    let root = common::big_vision_case("");
    let vtt = io::read(&root.join("uvim_vtt/reference.safetensors")).unwrap();
    let vq = io::read(&root.join("uvim_vqvae/reference.safetensors")).unwrap();
    let first = |t: &Tensor| {
        let n = t.ty.numel() / t.ty.shape[0];
        let mut shape = t.ty.shape.to_vec();
        shape[0] = 1;
        Tensor::from_f32(&shape, &t.to_f32()[..n])
    };
    let images = first(tensor(&vtt, "images"));
    let ctx = first(tensor(&vq, "ctx"));
    let mut t = kiln::uvim::UvimTask::open(&task.0, "cpu").expect("open");
    let p = t.predict(&images, &ctx).expect("predict");
    let want_code: Vec<i64> = tensor(&vq, "pred/codes").to_f64()[..16].iter().map(|&x| x as i64).collect();
    assert_eq!(p.code, want_code);
    let logits = tensor(&vq, "pred/logits/depth").to_f32();
    let want = kiln::uvim::depth_map(&logits[..logits.len() / 2], (16, 16), (2, 2), 7, (0.001, 10.0));
    assert_eq!((p.height, p.width), (16, 16));
    let kiln::uvim::Output::Depth(depth) = &p.output else { panic!("not a depth map: {:?}", p.output) };
    assert_eq!(depth, &want);
    // Every depth is a bin centre.
    assert!(depth.iter().all(|&d| (0..7).any(|b| (d as f64 - ((b as f64 + 0.5) / 7.0 * (10.0 - 0.001) + 0.001)).abs() < 1e-5)));
}

/// `kiln generate <task> --image x.png -o out.png | out.safetensors`; a folder without
/// `uvim.json` and an unknown task are refused by name.
#[test]
fn the_cli_runs_a_task_folder() {
    let task = Task::new("cli", "depth");
    let png = task.0.join("x.png");
    let px: Vec<u8> = (0..16 * 16 * 3).map(|i| (i * 37 % 256) as u8).collect();
    kiln::png::write(&png, 16, 16, 3, &px).unwrap();
    let kiln = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    let (dir, png_s) = (task.0.to_str().unwrap(), png.to_str().unwrap());
    let out = task.0.join("out.png");
    let r = kiln(&["generate", dir, "--image", png_s, "-o", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let img = kiln::preprocess::load_image(&out, true).expect("a PNG");
    assert_eq!((img.width, img.height), (16, 16));
    let raw = task.0.join("out.safetensors");
    let r = kiln(&["generate", dir, "--image", png_s, "-o", raw.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = io::read(&raw).unwrap();
    let depth = tensor(&got, "depth");
    assert_eq!(depth.ty.shape.to_vec(), [16, 16]);
    assert!(depth.to_f32().iter().all(|&d| (0.001..=10.0).contains(&d)));

    let plain = common::big_vision_case("uvim_vtt");
    let r = kiln(&["generate", plain.to_str().unwrap(), "--image", png_s, "-o", out.to_str().unwrap()]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("uvim.json"));
    let other = Task::new("other", "segment");
    let r = kiln(&["generate", other.0.to_str().unwrap(), "--image", png_s, "-o", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("task 'segment': kiln does depth, panoptic and colorization"), "{e}");
    // A panoptic task over a depth VQ-VAE names the output it lacks.
    let other = Task::new("panoptic", "panoptic");
    let r = kiln(&["generate", other.0.to_str().unwrap(), "--image", png_s, "-o", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("outputs.semantics"), "{e}");
}
