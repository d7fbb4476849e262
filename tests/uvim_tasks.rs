//! UViM's panoptic and colorization tasks (and depth's head) as big_vision computes them:
//! `predict_outputs` of `trainers/proj/uvim/{panoptic,colorization,depth}_task.py` run with JAX
//! on seeded random logits (`tests/fixtures/uvim_tasks`, from
//! `scripts/gen_uvim_task_fixtures.py`), then whole task folders (the VTT fixture and a
//! synthesized VQ-VAE with the task's outputs) through `UvimTask` and `kiln generate`.

mod common;

use common::tensor;
use kiln::io;
use kiln::uvim::{Output, Task, UvimTask};
use kiln::uvim_heads::{color_map, depth_map, panoptic_map};
use kiln_runtime::Tensor;
use std::path::{Path, PathBuf};

fn reference() -> Vec<(String, Tensor)> {
    io::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/uvim_tasks/reference.safetensors")).unwrap()
}

/// Image `b` of a `[B, ...]` tensor, as f32.
fn image(t: &Tensor, b: usize) -> Vec<f32> {
    let v = t.to_f32();
    let n = v.len() / t.ty.shape[0];
    v[b * n..(b + 1) * n].to_vec()
}

/// 2 images of 8x12 pixels in 2x3 patches.
const HW: (usize, usize) = (8, 12);
const PATCH: (usize, usize) = (2, 3);

#[test]
fn panoptic_maps_equal_big_vision() {
    let r = reference();
    for case in ["panoptic", "panoptic_min"] {
        let min_fraction = tensor(&r, &format!("{case}/min_fraction")).to_f32()[0] as f64;
        let (sem, ins) = (tensor(&r, &format!("{case}/logits/semantics")), tensor(&r, &format!("{case}/logits/instances")));
        let want = tensor(&r, &format!("{case}/panoptic"));
        let mut dropped = 0;
        for b in 0..2 {
            let got = panoptic_map(&image(sem, b), &image(ins, b), HW, PATCH, (5, 6), min_fraction);
            let want: Vec<i64> = image(want, b).iter().map(|&v| v as i64).collect();
            assert_eq!(got, want, "{case}: image {b}");
            dropped += got.chunks(2).filter(|p| p == &[0, 0]).count();
        }
        if min_fraction > 0.0 {
            assert!(dropped > 20, "{case}: the filter dropped only {dropped} pixels");
        }
    }
}

#[test]
fn colorization_and_depth_heads_equal_big_vision() {
    let r = reference();
    let (logits, want) = (tensor(&r, "colorization/logits/color"), tensor(&r, "colorization/color"));
    for b in 0..2 {
        let got = color_map(&image(logits, b), HW, PATCH);
        assert_eq!(got, image(want, b), "color: image {b}");
        assert!(got.contains(&1.0) && got.contains(&-1.0), "the clip is not exercised");
    }
    let (logits, want) = (tensor(&r, "depth/logits/depth"), tensor(&r, "depth/depth"));
    for b in 0..2 {
        let got = depth_map(&image(logits, b), HW, PATCH, 7, (0.001, 10.0));
        for (g, w) in got.iter().zip(image(want, b)) {
            assert!((g - w).abs() <= 1e-6 * w.abs(), "depth: image {b}: {g} vs {w}");
        }
    }
}

/// A task folder: the VTT fixture as `vtt/`, a VQ-VAE synthesized (random weights) from the
/// depth fixture's config with the task's inputs and outputs as `vqvae/`; removed on drop.
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kiln(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

fn folder(task: &str, outputs: serde_json::Value, extra: &str) -> Folder {
    let dir = std::env::temp_dir().join(format!("kiln-uvim-task-{task}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let vtt = common::big_vision_case("uvim_vtt");
    std::fs::create_dir_all(dir.join("vtt")).unwrap();
    for f in ["config.json", "params.npz"] {
        std::fs::copy(vtt.join(f), dir.join("vtt").join(f)).unwrap();
    }
    let depth = common::big_vision_case("uvim_vqvae");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(depth.join("config.json")).unwrap()).unwrap();
    cfg["model"]["inputs"] = outputs.clone();
    cfg["model"]["outputs"] = outputs;
    let cfg_path = dir.join("vqvae.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let r = kiln(&["synth", cfg_path.to_str().unwrap(), "-o", dir.join("vqvae").to_str().unwrap()]);
    assert!(r.status.success(), "synth: {}", String::from_utf8_lossy(&r.stderr));
    std::fs::write(dir.join("uvim.json"), format!(r#"{{"task": "{task}"{extra}}}"#)).unwrap();
    Folder(dir)
}

/// An image with structure: a gradient and a bright square.
fn photo(dir: &Path) -> PathBuf {
    let (w, h) = (20, 14);
    let px: Vec<u8> = (0..h * w)
        .flat_map(|i| {
            let (y, x) = (i / w, i % w);
            let square = (4..9).contains(&y) && (6..13).contains(&x);
            if square {
                [250, 240, 30]
            } else {
                [(x * 12) as u8, (y * 17) as u8, 90]
            }
        })
        .collect();
    let p = dir.join("photo.png");
    kiln::png::write(&p, w, h, 3, &px).unwrap();
    p
}

/// Whole tasks: the prediction is the head applied to the VQ-VAE's decode of the VTT's code (the
/// plumbing), and `kiln generate` writes it as PNG and safetensors.
#[test]
fn panoptic_and_colorization_folders_run_end_to_end() {
    let pp = serde_json::json!([5, 4]);
    let panoptic = folder("panoptic", serde_json::json!({"semantics": pp, "instances": [6, 4]}), r#", "min_fraction": 0.02"#);
    let color = folder("colorization", serde_json::json!({"color": [3, 4]}), "");
    for (f, name) in [(&panoptic, "panoptic"), (&color, "color")] {
        let img = kiln::preprocess::load_image(&photo(&f.0), true).unwrap();
        let mut t = UvimTask::open(&f.0, "cpu").expect("open");
        let (images, ctx) = t.inputs(&img);
        let p = t.predict(&images, &ctx).expect("predict");
        assert_eq!((p.height, p.width, p.code.len()), (16, 16, 16));
        // The same decode by hand.
        let c =
            kiln::compile(&f.0.join("vqvae"), &kiln::CompileOptions { profile: Default::default(), backend: "cpu".into(), trace: false })
                .unwrap();
        let mut s =
            kiln_runtime::Session::new(c.program, std::sync::Arc::new(kiln_runtime::WeightStore::open(&f.0.join("vqvae")).unwrap()))
                .unwrap();
        let outs = s.run("decode", &[("codes", &Tensor::from_i64(&[1, 16], &p.code)), ("ctx", &ctx)]).unwrap();
        let logits = |n: &str| tensor(&outs, &format!("logits/{n}")).to_f32();
        match (&p.output, t.task()) {
            (Output::Panoptic(m), &Task::Panoptic { min_fraction, .. }) => {
                assert_eq!(m, &panoptic_map(&logits("semantics"), &logits("instances"), (16, 16), (2, 2), (5, 6), min_fraction));
                assert!(m.chunks(2).all(|p| p[0] < 5 && p[1] < 6));
            }
            (Output::Color(c), Task::Colorization) => {
                assert_eq!(c, &color_map(&logits("color"), (16, 16), (2, 2)));
                // The VTT saw the image in grey: its three channels are equal.
                let v = images.to_f32();
                assert!(v.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
            }
            other => panic!("{name}: {other:?}"),
        }
        let (png, raw) = (f.0.join("out.png"), f.0.join("out.safetensors"));
        let photo = photo(&f.0);
        for out in [&png, &raw] {
            let r = kiln(&["generate", f.0.to_str().unwrap(), "--image", photo.to_str().unwrap(), "-o", out.to_str().unwrap()]);
            assert!(r.status.success(), "{name}: {}", String::from_utf8_lossy(&r.stderr));
        }
        let written = kiln::preprocess::load_image(&png, true).unwrap();
        assert_eq!((written.width, written.height), (16, 16));
        let got = io::read(&raw).unwrap();
        let want_shape: &[usize] = if name == "color" { &[16, 16, 3] } else { &[16, 16, 2] };
        assert_eq!(tensor(&got, name).ty.shape.as_slice(), want_shape);
        assert_eq!(tensor(&got, "code").to_f64().iter().map(|&x| x as i64).collect::<Vec<_>>(), p.code);
    }
    // A bad min_fraction is refused by name.
    std::fs::write(panoptic.0.join("uvim.json"), r#"{"task": "panoptic", "min_fraction": 2}"#).unwrap();
    let e = UvimTask::open(&panoptic.0, "cpu").err().expect("refused").to_string();
    assert!(e.contains("min_fraction 2: expected a number in [0, 1)"), "{e}");
}
