//! PaliGemma's `<seg>` mask decoder against big_vision's evaluator
//! (`tests/fixtures/big_vision/paligemma_seg_decoder`, copied by
//! `scripts/copy_big_vision_fixtures.py` from the shared fixtures made with the official JAX
//! code): the weights in the released `vae-oid.npz` layout, codes in, masks and every
//! intermediate the reference captured out, within 1e-4 relative, through the interpreter, the
//! cpu backend (its conv kernel) and the cube backend (convolutions rewritten as gather +
//! matmul); the cuda lowering compiles.

mod common;

use common::{rel_err, tensor};
use kiln::{compile, io, CompileOptions};
use kiln_graph::interp::{self, Value};
use kiln_models::Profile;
use kiln_runtime::{Session, WeightStore};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn fixture() -> PathBuf {
    common::big_vision_case("paligemma_seg_decoder")
}

/// The outputs compared: ours and the reference's (the same names).
const OUTPUTS: [&str; 8] =
    ["quantized", "Conv_0", "ResBlock_0", "ResBlock_1", "ConvTranspose_0", "ConvTranspose_1", "ConvTranspose_3", "masks"];

#[test]
fn masks_and_intermediates_match_big_vision() {
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let codes = tensor(&reference, "codes");
    let profile = Profile { batch: codes.ty.shape[0], ..Profile::default() };
    let store = Arc::new(WeightStore::open(&dir).expect("weights"));

    let built = kiln_models::build(&dir, &profile).unwrap_or_else(|e| panic!("build: {e}"));
    let g = built.graph("forward").expect("forward");
    let mut weights = HashMap::new();
    for (_, name, ty) in g.weights() {
        let (wt, bytes) = store.get(name, ty).unwrap_or_else(|e| panic!("{e}"));
        weights.insert(name.to_string(), Value::new(wt.clone(), kiln_runtime::tensor::to_f64(wt.dtype, bytes)).unwrap());
    }
    let inputs = HashMap::from([("codes".to_string(), Value::new(codes.ty.clone(), codes.to_f64()).unwrap())]);
    let interp: HashMap<String, Vec<f32>> =
        interp::run(g, &inputs, &weights).expect("interpreter").into_iter().map(|(n, v)| (n, v.to_f32())).collect();

    // cpu runs its conv kernel; cube has none, and runs the compiler's gather + matmul rewrite.
    let on = |backend: &str| -> HashMap<String, Vec<f32>> {
        let c = compile(&dir, &CompileOptions { profile: profile.clone(), backend: backend.into(), trace: false }).expect("compile");
        let lowered = !c.program.entries[0].steps.iter().any(|s| s.op.name() == "conv");
        assert_eq!(lowered, backend != "cpu", "{backend}: convolutions lowered");
        let mut s = Session::new(c.program, store.clone()).expect("session");
        s.run("forward", &[("codes", codes)]).expect("run").into_iter().map(|(n, t)| (n, t.to_f32())).collect()
    };
    let cpu = on("cpu");
    let cube = on("cube");

    for name in OUTPUTS {
        // The reference captured ConvTranspose_0 and _1 only; ConvTranspose_3 is checked
        // through the masks it feeds.
        let Some((_, want)) = reference.iter().find(|(n, _)| n == name) else { continue };
        let want = want.to_f32();
        for (who, got) in [("interpreter", &interp), ("cpu", &cpu), ("cube", &cube)] {
            let e = rel_err(&got[name], &want);
            eprintln!("{who}: {name} relative error {e:.3e}");
            assert!(e < 1e-4, "{who}: {name}: relative error {e:.3e}");
        }
    }
    assert_eq!(cpu["masks"].len(), 2 * 64 * 64);
    // How far the two ways of convolving (cpu kernel, gather + matmul) are apart, for the log.
    let d = cpu["masks"].iter().zip(&cube["masks"]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("cpu vs cube masks: max |diff| {d:.3e}");
}

/// The cuda lowering (convolutions rewritten as gather + matmul) picks a kernel for every step,
/// and NVRTC builds them for sm_90a (no GPU needed).
#[cfg(feature = "cuda")]
#[test]
fn the_cuda_lowering_compiles() {
    let dir = fixture();
    let c = compile(&dir, &CompileOptions { profile: Profile { batch: 2, ..Profile::default() }, backend: "cuda".into(), trace: false })
        .unwrap_or_else(|e| panic!("cuda: {e}"));
    assert!(!c.program.entries[0].steps.iter().any(|s| s.op.name() == "conv"));
    if !kiln_kernels::cuda::nvrtc::available() {
        assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "KILN_REQUIRE_NVRTC=1 but NVRTC is missing");
        return;
    }
    let art = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("seg_cuda.kiln");
    let args = ["compile", dir.to_str().unwrap(), "--backend", "cuda", "--arch", "sm_90a", "--batch", "2", "-o", art.to_str().unwrap()];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!kiln_graph::artifact::load_file(&art).unwrap().binaries.is_empty());
}

#[test]
fn the_cli_runs_the_folder_and_a_bad_kwarg_is_refused_by_name() {
    let dir = fixture();
    let tmp = std::env::temp_dir().join(format!("kiln-seg-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let inputs = tmp.join("codes.safetensors");
    io::write(&inputs, &[("codes".to_string(), tensor(&reference, "codes").clone())]).unwrap();
    let out = tmp.join("out.safetensors");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let run = std::process::Command::new(kiln)
        .args(["run", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = io::read(&out).unwrap();
    let e = rel_err(&tensor(&got, "masks").to_f32(), &tensor(&reference, "masks").to_f32());
    assert!(e < 1e-4, "masks via the CLI: {e:.3e}");

    // A kwarg the official Decoder does not take.
    let bad = tmp.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(dir.join("params.npz"), bad.join("params.npz")).unwrap();
    std::fs::write(bad.join("config.json"), r#"{"model_name": "proj.paligemma.segmentation", "model": {"dim": 64}}"#).unwrap();
    let e = kiln_models::build(&bad, &Profile::default()).err().map(|e| e.to_string()).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(e.contains("dim"), "{e}");
}

/// Pasting follows big_vision's evaluator: the decoder's reference masks resized to box sizes
/// (up, down, mixed, tiny) as PIL's bilinear resize of a float image does it
/// (`pil_resize.safetensors`, made with Pillow by `scripts/make_seg_resize_fixture.py`).
#[test]
fn masks_resize_to_their_boxes_as_pil_does() {
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let masks = tensor(&reference, "masks").to_f32();
    let pil = io::read(&dir.join("pil_resize.safetensors")).expect("pil_resize.safetensors");
    assert_eq!(pil.len(), 12);
    for (name, want) in &pil {
        let parts: Vec<&str> = name.split('/').collect();
        let i: usize = parts[1].parse().unwrap();
        let (w, h) = parts[2].split_once('x').map(|(w, h)| (w.parse().unwrap(), h.parse().unwrap())).unwrap();
        let got = kiln::seg::pil_resize_bilinear(&masks[i * 4096..(i + 1) * 4096], 64, 64, w, h);
        let want = want.to_f32();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5 * want.iter().fold(1f32, |m, v| m.max(v.abs())), "{name}: max abs diff {worst:e}");
    }
    // The box the evaluator cuts (int() of the normalised corners times the image size).
    let d = kiln_models::locations::parse("<loc0256><loc0100><loc0767><loc0900><seg001><seg002><seg003><seg004><seg005><seg006><seg007><seg008><seg009><seg010><seg011><seg012><seg013><seg014><seg015><seg016> cat");
    let m = kiln::seg::paste(&masks[..4096], &d[0], 640, 480).expect("a box");
    assert_eq!((m.x0, m.y0, m.x1, m.y1), (62, 120, 563, 359));
    assert_eq!(m.inside.len(), (563 - 62) * (359 - 120));
}

/// `--seg-decoder` takes the released `vae-oid.npz` itself as well as a folder: the same masks,
/// no scratch folder left behind; another file is refused by name.
#[test]
fn the_released_npz_is_a_decoder_by_itself() {
    let dir = fixture();
    let reference = io::read(&dir.join("reference.safetensors")).expect("reference");
    let codes: Vec<u8> = tensor(&reference, "codes").to_f64().iter().map(|&c| c as u8).collect();
    let first: [u8; 16] = codes[..16].try_into().unwrap();
    let mut folder = kiln::seg::SegDecoder::open(&dir).expect("folder");
    let mut file = kiln::seg::SegDecoder::open(&dir.join("params.npz")).expect("npz");
    assert_eq!(folder.decode(&first).unwrap(), file.decode(&first).unwrap());
    let left = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(&format!("kiln-segdec-{}-", std::process::id())));
    assert!(!left, "a scratch folder was left behind");
    let e = kiln::seg::SegDecoder::open(&dir.join("config.json")).err().expect("refused").to_string();
    assert!(e.contains("expected vae-oid.npz or a mask decoder folder"), "{e}");
}
