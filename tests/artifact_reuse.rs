//! Artifacts reused away from where they were made (issue 20): the source folder is recorded
//! absolute, a missing one is named with `--weights`, compile-time flags given with an artifact
//! are refused by name, `kiln generate` runs what `kiln compile --generate` writes, and
//! `-o <folder>` leaves nothing behind. Also `--resolution HxW` and its position-table hint.

use kiln::io;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("kiln-reuse-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// Runs kiln in `cwd`: (exit code, stdout, stderr).
fn kiln_in(cwd: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kiln")).current_dir(cwd).args(args).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Compiled from a relative path, the artifact runs from another directory and gives what the
/// folder gives; moved away from its folder, it runs from its prepared weight file, and without
/// that file it names the artifact, the folder and --weights.
#[test]
fn an_artifact_loads_from_anywhere_and_names_missing_weights() {
    let s = scratch("anywhere");
    let d = &s.0;
    copy_dir(&fixture("big_vision/vit_map_learn"), &d.join("vit"));
    let ins = fixture("big_vision/vit_map_learn/reference.safetensors");
    let images = io::read(&ins).unwrap().into_iter().filter(|(n, _)| n == "images").collect::<Vec<_>>();
    io::write(&d.join("in.safetensors"), &images).unwrap();
    let b = images[0].1.ty.shape[0].to_string();
    let (code, out, err) = kiln_in(d, &["compile", "vit", "--batch", &b, "-o", "vit.kiln"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let source = kiln_graph::artifact::load_file(&d.join("vit.kiln")).unwrap().source;
    assert!(Path::new(&source).is_absolute(), "recorded source {source}");

    let other = d.join("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    let (code, out, err) = kiln_in(&other, &["run", "../vit.kiln", "--inputs", "../in.safetensors", "--out", "a.safetensors"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = kiln_in(d, &["run", "vit", "--inputs", "in.safetensors", "--out", "f.safetensors"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(std::fs::read(other.join("a.safetensors")).unwrap(), std::fs::read(d.join("f.safetensors")).unwrap());

    std::fs::rename(d.join("vit"), d.join("moved")).unwrap();
    // The prepared weight file beside it carries the weights: the folder is not needed.
    let (code, out, err) = kiln_in(&other, &["run", "../vit.kiln", "--inputs", "../in.safetensors", "--out", "p.safetensors"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("load: prepared"), "{err}");
    assert_eq!(std::fs::read(other.join("p.safetensors")).unwrap(), std::fs::read(d.join("f.safetensors")).unwrap());
    // Without it, the missing folder is named with --weights.
    std::fs::remove_file(d.join("vit.kiln.weights")).unwrap();
    let (code, _, err) = kiln_in(&other, &["run", "../vit.kiln", "--inputs", "../in.safetensors", "--out", "b.safetensors"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("error: ../vit.kiln: its weights are read from") && err.contains(&source) && err.contains("--weights"), "{err}");
    assert!(!other.join("b.safetensors").exists());
    let (code, out, err) =
        kiln_in(&other, &["run", "../vit.kiln", "--weights", "../moved", "--inputs", "../in.safetensors", "--out", "b.safetensors"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(std::fs::read(other.join("b.safetensors")).unwrap(), std::fs::read(d.join("f.safetensors")).unwrap());
}

/// Each flag that fixes a compile, given with an artifact, is refused by name (it used to be
/// ignored); `-o` naming a folder is refused before compiling and leaves no `.tmp` behind.
#[test]
fn compile_flags_with_an_artifact_are_refused_by_name() {
    let s = scratch("flags");
    let d = &s.0;
    let vit = fixture("big_vision/vit_map_learn");
    let vit = vit.to_str().unwrap();
    let (code, out, err) = kiln_in(d, &["compile", vit, "-o", "a.kiln"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let ins = fixture("big_vision/vit_map_learn/reference.safetensors");
    let ins = ins.to_str().unwrap();
    for (flag, value) in
        [("--batch", "2"), ("--resolution", "32"), ("--dtype", "bf16"), ("--seq-len", "4"), ("--moe-capacity", "2"), ("--backend", "cube")]
    {
        for cmd in [
            vec!["run", "a.kiln", "--inputs", ins, "--out", "o.safetensors"],
            vec!["bench", "a.kiln", "--runs", "1"],
            vec!["inspect", "a.kiln"],
        ] {
            let mut args = cmd.clone();
            args.extend([flag, value]);
            let (code, _, err) = kiln_in(d, &args);
            assert_eq!(code, Some(1), "{args:?}: {err}");
            assert!(err.contains("error: a.kiln is an artifact") && err.contains(flag), "{args:?}: {err}");
        }
    }
    let (code, _, err) = kiln_in(d, &["inspect", "a.kiln", "--ir"]);
    assert!(code == Some(1) && err.contains("--ir"), "{err}");
    // The artifact's own backend, named again, is no change.
    let (code, out, err) = kiln_in(d, &["inspect", "a.kiln", "--backend", "cpu"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!d.join("o.safetensors").exists());

    std::fs::create_dir_all(d.join("outdir")).unwrap();
    let (code, _, err) = kiln_in(d, &["compile", vit, "-o", "outdir"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("error: outdir: is a folder"), "{err}");
    let left: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(left.iter().all(|n| !n.ends_with(".tmp")), "{left:?}");
    assert_eq!(std::fs::read_dir(d.join("outdir")).unwrap().count(), 0);
    // The library's writer refuses a folder too, and leaves no temporary file.
    let p = kiln_graph::artifact::load_file(&d.join("a.kiln")).unwrap();
    let e = kiln_graph::artifact::save_file(&d.join("outdir"), &p).unwrap_err().to_string();
    assert!(e.contains("is a folder"), "{e}");
    assert!(!d.join("outdir.tmp").exists());
}

/// `kiln generate` on the artifact `kiln compile --generate` wrote gives the tokens and logits
/// that generating from the folder gives.
#[test]
fn generate_runs_a_compiled_generation_artifact() {
    let s = scratch("generate");
    let d = &s.0;
    let gemma = fixture("gemma/gemma2_gqa");
    let ins = gemma.join("inputs.safetensors");
    let ids = io::read(&ins).unwrap().into_iter().find(|(n, _)| n == "input_ids").unwrap().1;
    let (b, l) = (ids.ty.shape[0].to_string(), ids.ty.shape[1].to_string());
    let (g, i) = (gemma.to_str().unwrap(), ins.to_str().unwrap());
    let args = ["compile", g, "--generate", "--seq-len", &l, "--max-new-tokens", "3", "--batch", &b, "-o", "gen.kiln"];
    let (code, out, err) = kiln_in(d, &args);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = kiln_in(d, &["generate", "gen.kiln", "--inputs", i, "--out", "a.safetensors"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 new tokens per row"), "the cache's room is the default: {out}");
    let (code, out, err) = kiln_in(d, &["generate", g, "--inputs", i, "--out", "f.safetensors", "--max-new-tokens", "3"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (a, f) = (io::read(&d.join("a.safetensors")).unwrap(), io::read(&d.join("f.safetensors")).unwrap());
    assert_eq!(a.len(), 2, "sequences, logprobs");
    for (na, ta) in &a {
        let tf = &f.iter().find(|(n, _)| n == na).unwrap_or_else(|| panic!("{na} from the folder")).1;
        assert_eq!(ta.ty, tf.ty, "{na}");
        assert_eq!(ta.to_f64(), tf.to_f64(), "{na}: the artifact and the folder generate alike");
    }
    // The prompt path: the folder's tokenizer, read through the artifact's recorded folder.
    let tok = fixture("tokenizer/gemma");
    let t = tok.to_str().unwrap();
    let args = ["compile", t, "--generate", "--seq-len", "16", "--max-new-tokens", "4", "-o", "tok.kiln"];
    assert_eq!(kiln_in(d, &args).0, Some(0));
    let new_ids =
        |err: &str| err.lines().find(|l| l.contains("\"new_ids\"")).map(|l| l.split("\"new_ids\":").nth(1).unwrap_or("").to_string());
    let (code, out, err) = kiln_in(d, &["generate", "tok.kiln", "--prompt", "The capital of France"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code2, out2, err2) = kiln_in(d, &["generate", t, "--prompt", "The capital of France", "--bucket", "16", "--max-new-tokens", "4"]);
    assert_eq!(code2, Some(0), "{out2}{err2}");
    assert!(new_ids(&err).is_some() && new_ids(&err) == new_ids(&err2), "{err}\n{err2}");
    assert_eq!(out, out2, "the same answer");

    let (code, _, err) = kiln_in(d, &["generate", "gen.kiln", "--inputs", i, "--out", "b.safetensors", "--bucket", "9"]);
    assert!(code == Some(1) && err.contains("--bucket"), "{err}");
    let (code, _, err) = kiln_in(d, &["generate", "gen.kiln", "--inputs", i, "--out", "b.safetensors", "--max-new-tokens", "4"]);
    assert!(code == Some(1) && err.contains("do not fit the cache"), "{err}");
    let vit = fixture("big_vision/vit_map_learn");
    let (code, _, _) = kiln_in(d, &["compile", vit.to_str().unwrap(), "-o", "vit.kiln"]);
    assert_eq!(code, Some(0));
    let (code, _, err) = kiln_in(d, &["generate", "vit.kiln", "--inputs", i, "--out", "b.safetensors"]);
    assert!(code == Some(1) && err.contains("not a generation program"), "{err}");
    assert!(!d.join("b.safetensors").exists());
}

/// `--resolution HxW`: a learned table of 9 positions (a 3x3 grid of 8px patches) also fits a
/// 1x9 grid, so 8x72 images compile, run and give a [B, 1, 9, C] patch grid; a size whose grid
/// holds another count is refused with the checkpoint's grid and the sizes that fit.
#[test]
fn non_square_resolutions_and_the_position_table_hint() {
    let s = scratch("hw");
    let d = &s.0;
    let vit = fixture("big_vision/vit_map_learn");
    let vit = vit.to_str().unwrap();
    let (code, out, err) = kiln_in(d, &["compile", vit, "--resolution", "8x72", "-o", "wide.kiln"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let p = kiln_graph::artifact::load_file(&d.join("wide.kiln")).unwrap();
    let e = p.entry("forward").unwrap();
    let images = e.inputs.iter().find(|io| io.name == "images").unwrap();
    assert_eq!(images.operand.ty.shape.to_vec(), [1, 8, 72, 3]);
    let px: Vec<f32> = (0..8 * 72 * 3).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    io::write(&d.join("in.safetensors"), &[("images".into(), kiln_runtime::Tensor::from_f32(&[1, 8, 72, 3], &px))]).unwrap();
    let (code, out, err) = kiln_in(d, &["run", "wide.kiln", "--inputs", "in.safetensors", "--out", "o.safetensors"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let outs = io::read(&d.join("o.safetensors")).unwrap();
    let l2d = &outs.iter().find(|(n, _)| n == "logits_2d").unwrap().1;
    assert_eq!(l2d.ty.shape.to_vec(), [1, 1, 9, 7]);
    assert!(l2d.to_f64().iter().all(|v| v.is_finite()));
    // The square form still works, and the same folder runs the inputs' own shape.
    let (code, out, err) = kiln_in(d, &["inspect", vit, "--resolution", "24"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = kiln_in(d, &["run", vit, "--inputs", "in.safetensors", "--out", "p.safetensors"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let again = io::read(&d.join("p.safetensors")).unwrap();
    assert_eq!(again.iter().find(|(n, _)| n == "logits_2d").unwrap().1.to_f64(), l2d.to_f64());

    // Against big_vision: a sincos2d ViT compiled for 24x32 gives the official code's logits.
    let sincos = fixture("big_vision/vit_tok_sincos2d");
    let r = io::read(&sincos.join("reference_24x32.safetensors")).unwrap();
    let b = r.iter().find(|(n, _)| n == "images").unwrap().1.ty.shape[0].to_string();
    let (code, out, err) = kiln_in(d, &["compile", sincos.to_str().unwrap(), "--resolution", "24x32", "--batch", &b, "-o", "s.kiln"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let get = |ts: &[(String, kiln_runtime::Tensor)], n: &str| ts.iter().find(|(k, _)| k == n).unwrap().1.to_f32();
    let imgs = r.iter().find(|(n, _)| n == "images").unwrap().1.clone();
    io::write(&d.join("s_in.safetensors"), &[("images".into(), imgs)]).unwrap();
    let (code, out, err) = kiln_in(d, &["run", "s.kiln", "--inputs", "s_in.safetensors", "--out", "s_out.safetensors"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (got, want) = (get(&io::read(&d.join("s_out.safetensors")).unwrap(), "logits"), get(&r, "logits"));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(got.len() == want.len() && err < 1e-4, "24x32 logits: relative error {err:.3e}");

    for bad in ["16x24", "32"] {
        let (code, _, err) = kiln_in(d, &["compile", vit, "--resolution", bad, "-o", "bad.kiln"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("'pos_embedding' holds 9 positions") && err.contains("--resolution HxW") && err.contains("24x24"), "{err}");
    }
    for bad in ["0", "8x", "x8", "8x0", "big"] {
        let (code, _, err) = kiln_in(d, &["inspect", vit, "--resolution", bad]);
        assert_eq!(code, Some(2), "clap's usage error: {err}");
        assert!(err.contains("expected N (a square) or HxW"), "{err}");
    }
    assert!(!d.join("bad.kiln").exists());
}
