//! A table of bad inputs a user can give the CLI, each with the error they get. Every row must
//! fail cleanly: exit status 1 with `error: ...` naming the fault (no panic, no abort, no
//! exit 0), and no input file overwritten. (Issue 20's table; more rows join as faults are
//! fixed.)

use kiln::io;
use kiln_runtime::Tensor;
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// A scratch folder with the files the rows need, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> Scratch {
    let d = std::env::temp_dir().join(format!("kiln-bad-inputs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cappa = io::read(&fixture("big_vision/cappa_captioner/reference.safetensors")).unwrap();
    let t = |n: &str| cappa.iter().find(|(k, _)| k == n).unwrap().1.clone();
    io::write(&d.join("images.safetensors"), &[("images".into(), t("images"))]).unwrap();
    io::write(
        &d.join("bad_prompts.safetensors"),
        &[("images".into(), t("images")), ("prompts".into(), Tensor::from_i64(&[3, 2], &[0; 6]))],
    )
    .unwrap();
    io::write(&d.join("bad_eos.safetensors"), &[("images".into(), t("images")), ("eos_token".into(), Tensor::from_i64(&[2], &[1, 1]))])
        .unwrap();
    io::write(&d.join("nothing.safetensors"), &[("x".into(), Tensor::from_f32(&[1], &[0.0]))]).unwrap();
    std::fs::write(d.join("junk.safetensors"), b"not a safetensors file at all").unwrap();
    std::fs::write(d.join("x.png"), kiln::png::encode(4, 4, 3, &[9; 48]).unwrap()).unwrap();
    // A ViT folder whose config gives width: null, and one with an unknown kwarg.
    let cfg = std::fs::read_to_string(fixture("big_vision/vit_map_learn/config.json")).unwrap();
    assert!(cfg.contains("\"width\": 48"), "the fixture's width");
    for (name, text) in [
        ("null_width", cfg.replace("\"width\": 48", "\"width\": null")),
        ("unknown_kwarg", cfg.replace("\"width\": 48", "\"width\": 48,\n  \"not_a_kwarg\": 3")),
    ] {
        let dst = d.join(name);
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::copy(fixture("big_vision/vit_map_learn/params.npz"), dst.join("params.npz")).unwrap();
        std::fs::write(dst.join("config.json"), text).unwrap();
    }
    std::fs::create_dir_all(d.join("empty")).unwrap();
    Scratch(d)
}

#[test]
fn every_bad_input_fails_cleanly() {
    let s = scratch();
    let d = s.0.to_str().unwrap().to_string();
    let p = |rel: &str| format!("{d}/{rel}");
    let vit = fixture("big_vision/vit_map_learn").to_str().unwrap().to_string();
    let cappa = fixture("big_vision/cappa_captioner").to_str().unwrap().to_string();
    let gemma = fixture("gemma/gemma2_gqa").to_str().unwrap().to_string();
    let jet = fixture("jet").to_str().unwrap().to_string();
    let vit_inputs = fixture("big_vision/vit_map_learn/reference.safetensors").to_str().unwrap().to_string();
    let gemma_inputs = fixture("gemma/gemma2_gqa/inputs.safetensors").to_str().unwrap().to_string();
    let images = p("images.safetensors");
    let rows: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "run: --out is the --inputs file",
            vec!["run".into(), vit.clone(), "--inputs".into(), images.clone(), "--out".into(), images.clone()],
            "would be overwritten",
        ),
        (
            "run: --out in a missing folder",
            vec!["run".into(), vit.clone(), "--inputs".into(), vit_inputs.clone(), "--out".into(), p("no/such/dir/o.safetensors")],
            "does not exist",
        ),
        (
            "run: --out is a folder",
            vec!["run".into(), vit.clone(), "--inputs".into(), vit_inputs.clone(), "--out".into(), p("empty")],
            "is a folder",
        ),
        (
            "run: no such model",
            vec!["run".into(), p("missing"), "--inputs".into(), vit_inputs.clone(), "--out".into(), p("o.safetensors")],
            "config.json",
        ),
        (
            "run: inputs missing",
            vec!["run".into(), vit.clone(), "--inputs".into(), p("none.safetensors"), "--out".into(), p("o.safetensors")],
            "none.safetensors",
        ),
        (
            "run: inputs not safetensors",
            vec!["run".into(), vit.clone(), "--inputs".into(), p("junk.safetensors"), "--out".into(), p("o.safetensors")],
            "junk.safetensors",
        ),
        (
            "run: unknown entry",
            vec![
                "run".into(),
                vit.clone(),
                "--inputs".into(),
                vit_inputs.clone(),
                "--out".into(),
                p("o.safetensors"),
                "--entry".into(),
                "nope".into(),
            ],
            "nope",
        ),
        (
            "run: --dtype f64",
            vec![
                "run".into(),
                vit.clone(),
                "--inputs".into(),
                vit_inputs.clone(),
                "--out".into(),
                p("o.safetensors"),
                "--dtype".into(),
                "f64".into(),
            ],
            "expected f32 or bf16",
        ),
        (
            "run: --batch 0",
            vec![
                "run".into(),
                vit.clone(),
                "--inputs".into(),
                vit_inputs.clone(),
                "--out".into(),
                p("o.safetensors"),
                "--batch".into(),
                "0".into(),
            ],
            "--batch must be at least 1",
        ),
        (
            "run: --device on cpu",
            vec![
                "run".into(),
                vit.clone(),
                "--inputs".into(),
                vit_inputs.clone(),
                "--out".into(),
                p("o.safetensors"),
                "--device".into(),
                "cuda".into(),
            ],
            "--device applies to --backend cube",
        ),
        (
            "run: --cuda-gemv bogus",
            vec![
                "run".into(),
                vit.clone(),
                "--inputs".into(),
                vit_inputs.clone(),
                "--out".into(),
                p("o.safetensors"),
                "--cuda-gemv".into(),
                "maybe".into(),
            ],
            "expected auto, on or off",
        ),
        (
            "run: --cuda-gemv on the cpu backend",
            vec![
                "run".into(),
                vit.clone(),
                "--inputs".into(),
                vit_inputs.clone(),
                "--out".into(),
                p("o.safetensors"),
                "--cuda-gemv".into(),
                "on".into(),
            ],
            "applies to the cuda backend",
        ),
        (
            "run: width null",
            vec!["run".into(), p("null_width"), "--inputs".into(), vit_inputs.clone(), "--out".into(), p("o.safetensors")],
            "null (Python None)",
        ),
        (
            "run: unknown kwarg",
            vec!["run".into(), p("unknown_kwarg"), "--inputs".into(), vit_inputs.clone(), "--out".into(), p("o.safetensors")],
            "not_a_kwarg",
        ),
        ("inspect: a folder without config.json", vec!["inspect".into(), p("empty")], "no config.json"),
        (
            "compile: an unknown backend",
            vec!["compile".into(), vit.clone(), "--backend".into(), "tpu".into(), "-o".into(), p("a.kiln")],
            "unknown backend",
        ),
        (
            "sample: NaN temperature",
            vec!["sample".into(), jet.clone(), "--temperature".into(), "NaN".into(), "-o".into(), p("s.png")],
            "finite",
        ),
        (
            "sample: infinite temperature",
            vec!["sample".into(), jet.clone(), "--temperature".into(), "inf".into(), "-o".into(), p("s.png")],
            "finite",
        ),
        (
            "sample: --count 0",
            vec!["sample".into(), jet.clone(), "--count".into(), "0".into(), "-o".into(), p("s.png")],
            "--count must be at least 1",
        ),
        ("sample: -o in a missing folder", vec!["sample".into(), jet.clone(), "-o".into(), p("no/dir/s.png")], "does not exist"),
        (
            "generate: --out is the --inputs file",
            vec!["generate".into(), cappa.clone(), "--inputs".into(), images.clone(), "--out".into(), images.clone()],
            "would be overwritten",
        ),
        (
            "generate: --device with cpu",
            vec![
                "generate".into(),
                gemma.clone(),
                "--inputs".into(),
                gemma_inputs.clone(),
                "--out".into(),
                p("g.safetensors"),
                "--device".into(),
                "wgpu".into(),
            ],
            "--device applies",
        ),
        (
            "generate: a bogus cube device",
            vec![
                "generate".into(),
                gemma.clone(),
                "--inputs".into(),
                gemma_inputs.clone(),
                "--out".into(),
                p("g.safetensors"),
                "--backend".into(),
                "cube".into(),
                "--device".into(),
                "tpu".into(),
            ],
            "expected wgpu or cuda",
        ),
        (
            "generate: top-p 0",
            vec![
                "generate".into(),
                gemma.clone(),
                "--inputs".into(),
                gemma_inputs.clone(),
                "--out".into(),
                p("g.safetensors"),
                "--temperature".into(),
                "1".into(),
                "--top-p".into(),
                "0".into(),
            ],
            "top_p",
        ),
        (
            "generate: negative temperature",
            vec![
                "generate".into(),
                gemma.clone(),
                "--inputs".into(),
                gemma_inputs.clone(),
                "--out".into(),
                p("g.safetensors"),
                "--temperature=-1".into(),
            ],
            "temperature",
        ),
        (
            "generate: top-k and top-p on an encoder-decoder",
            vec![
                "generate".into(),
                cappa.clone(),
                "--inputs".into(),
                images.clone(),
                "--out".into(),
                p("g.safetensors"),
                "--max-new-tokens".into(),
                "4".into(),
                "--temperature".into(),
                "1".into(),
                "--top-k".into(),
                "2".into(),
                "--top-p".into(),
                "0.5".into(),
            ],
            "together",
        ),
        (
            "generate: more steps than the decoder has",
            vec![
                "generate".into(),
                cappa.clone(),
                "--inputs".into(),
                images.clone(),
                "--out".into(),
                p("g.safetensors"),
                "--max-new-tokens".into(),
                "99".into(),
            ],
            "positions",
        ),
        (
            "generate: prompts of another batch",
            vec!["generate".into(), cappa.clone(), "--inputs".into(), p("bad_prompts.safetensors"), "--out".into(), p("g.safetensors")],
            "prompts",
        ),
        (
            "generate: two eos tokens",
            vec!["generate".into(), cappa.clone(), "--inputs".into(), p("bad_eos.safetensors"), "--out".into(), p("g.safetensors")],
            "eos_token",
        ),
        (
            "generate: --image without --prompt on a non-UViM folder",
            vec!["generate".into(), vit.clone(), "--image".into(), p("x.png"), "-o".into(), p("o.png")],
            "uvim.json",
        ),
        (
            "generate: --draw into a missing folder",
            vec![
                "generate".into(),
                gemma.clone(),
                "--prompt".into(),
                "hi".into(),
                "--image".into(),
                p("x.png"),
                "--draw".into(),
                p("no/dir/d.png"),
            ],
            "does not exist",
        ),
        (
            "score: --out is the --inputs file",
            vec!["score".into(), gemma.clone(), "--inputs".into(), images.clone(), "--out".into(), images.clone()],
            "would be overwritten",
        ),
        (
            "score: nothing to score",
            vec!["score".into(), vit.clone(), "--inputs".into(), vit_inputs.clone(), "--out".into(), p("sc.safetensors")],
            "no input_ids",
        ),
        ("synth: an unknown model", vec!["synth".into(), "siglip-xxl".into(), "-o".into(), p("syn")], "unknown synth model"),
        ("compare: a missing file", vec!["compare".into(), p("none.safetensors"), images.clone()], "none.safetensors"),
    ];
    let before = std::fs::read(&images).unwrap();
    for (name, args, want) in &rows {
        let r = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{name}: exit {:?}, stderr: {err}", r.status.code());
        assert!(!err.contains("panicked") && err.contains("error"), "{name}: {err}");
        assert!(err.contains(want), "{name}: expected '{want}' in: {err}");
    }
    assert_eq!(std::fs::read(&images).unwrap(), before, "an input file was changed");
    assert!(rows.len() >= 35, "{} rows", rows.len());
}
