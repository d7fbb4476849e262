//! Ensembles: greedy selection against the NumPy reference of `scripts/gen_ensemble_fixtures.py`
//! (a tie included), and `kiln compile --ensemble`: `probs` equal to the members run separately
//! and averaged (members at three resolutions, resized inside the program and by NumPy), one
//! arena, the artifact through `kiln run` and `Session::load` (the C API's path), members refused
//! by name, bad logits and labels.

mod common;

use kiln::ensemble::{compile, parse_member, read_labels, read_logits, select, Logits};
use kiln::CompileOptions;
use kiln_models::ensemble::Member;
use kiln_models::registry::{SynthRecipe, WeightFormat};
use kiln_models::Profile;
use kiln_runtime::{Session, WeightStore};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ensemble").join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn candidates() -> Vec<Logits> {
    (0..5).map(|j| read_logits(&fixture(&format!("logits_{j}.safetensors"))).unwrap()).collect()
}

#[test]
fn select_matches_numpy_including_a_tie() {
    let cands = candidates();
    // Candidate 3 repeats candidate 1: every step that adds 1 is a tie, which 1 must win.
    assert_eq!(cands[1].values, cands[3].values);
    let labels = read_labels(&fixture("labels.safetensors")).unwrap();
    let want = &expected()["select"];
    let sel = select(&cands, &labels, 7).unwrap();
    let steps = want["steps"].as_array().unwrap();
    assert_eq!(sel.steps.len(), steps.len());
    for (t, (got, w)) in sel.steps.iter().zip(steps).enumerate() {
        assert_eq!(got.chosen as u64, w["chosen"].as_u64().unwrap(), "step {}", t + 1);
        let wl = w["loss"].as_f64().unwrap();
        assert!((got.loss - wl).abs() <= 1e-12 * wl.abs(), "step {}: loss {} vs NumPy {wl}", t + 1, got.loss);
    }
    assert!(sel.steps.iter().any(|s| s.chosen == 1) && sel.counts[3] == 0, "the tie goes to the first candidate");
    let counts: Vec<usize> = want["counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap() as usize).collect();
    assert_eq!(sel.counts, counts);
    let ww: Vec<f64> = want["weights"].as_array().unwrap().iter().map(|c| c.as_f64().unwrap()).collect();
    assert_eq!(sel.weights(), ww);
}

#[test]
fn select_cli_prints_steps_and_json() {
    let mut args: Vec<String> = vec!["ensemble".into(), "select".into(), "--logits".into()];
    args.extend((0..5).map(|j| fixture(&format!("logits_{j}.safetensors")).display().to_string()));
    args.extend(["--labels".into(), fixture("labels.safetensors").display().to_string(), "--size".into(), "7".into()]);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["weights"], expected()["select"]["weights"]);
    let text = Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("step   7: + [1]") && text.contains("x5  weight 0.7143"), "{text}");
}

#[test]
fn select_refuses_bad_logits_and_labels() {
    let c = |name: &str, n: usize, k: usize| Logits { name: name.into(), n, c: k, values: vec![0.5; n * k] };
    let msg = |r: kiln::Result<kiln::ensemble::Selection>| r.unwrap_err().to_string();
    let m = msg(select(&[c("a", 4, 3), c("b", 4, 2)], &[0, 1, 2, 0], 2));
    assert!(m.contains("b: logits are [4, 2], a has [4, 3]"), "{m}");
    let m = msg(select(&[c("a", 4, 3)], &[0, 1, 3, 0], 2));
    assert!(m.contains("label 3 of example 2 is out of range"), "{m}");
    let m = msg(select(&[c("a", 4, 3)], &[0, 1, -1, 0], 2));
    assert!(m.contains("label -1 of example 2"), "{m}");
    let m = msg(select(&[c("a", 4, 3)], &[0, 1, 2], 2));
    assert!(m.contains("3 labels for 4 examples"), "{m}");
    let m = msg(select(&[], &[0], 2));
    assert!(m.contains("at least one --logits"), "{m}");
    let m = msg(select(&[c("a", 4, 3)], &[0, 1, 2, 0], 0));
    assert!(m.contains("--size must be at least 1"), "{m}");
    let mut nan = c("a", 2, 2);
    nan.values[3] = f64::NAN;
    assert!(msg(select(&[nan], &[0, 1], 1)).contains("a: logit 3 (example 1) is NaN"));
    // A logits file of the wrong rank, a labels file of floats.
    let m = read_logits(&fixture("labels.safetensors")).unwrap_err().to_string();
    assert!(m.contains("expected [examples, classes]"), "{m}");
    let m = read_labels(&fixture("logits_0.safetensors")).unwrap_err().to_string();
    assert!(m.contains("expected an integer vector"), "{m}");
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kiln-ens-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny big_vision ViT classifier (sincos position embedding, so any resolution; 5 classes)
/// with `pool` pooling, random weights from `seed`.
fn tiny_vit(dir: &Path, pool: &str, seed: u64) {
    let model = json!({"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": [8, 8], "num_classes": 5,
        "posemb": "sincos2d", "pool_type": pool, "rep_size": pool == "tok"});
    let recipe = SynthRecipe {
        config: json!({"model_name": "vit", "model": model}),
        dtype: kiln_graph::DType::F32,
        format: WeightFormat::Npz,
        roots: &[""],
        given: Vec::new(),
        batch: 1,
    };
    kiln::synth::synth_folder(&kiln_models::big_vision::vit::FAMILY, &recipe, dir, seed, false).unwrap();
}

/// Three members at 32, 24 and 16 px (gap, tok and MAP pooling) under `root`.
fn members(root: &Path) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| root.join(n)).collect();
    for (i, (d, pool)) in dirs.iter().zip(["gap", "tok", "map"]).enumerate() {
        tiny_vit(d, pool, 11 + i as u64);
    }
    dirs
}

fn opts(batch: usize, hw: Option<(usize, usize)>) -> CompileOptions {
    CompileOptions { profile: Profile { batch, image_hw: hw, ..Profile::default() }, backend: "cpu".into(), trace: false }
}

fn softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// The members compiled alone at their resolutions, run on the NumPy-resized images.
fn members_alone(dirs: &[PathBuf]) -> (Vec<Vec<f32>>, usize) {
    let ins = kiln::io::read(&fixture("ensemble_inputs.safetensors")).unwrap();
    let (mut logits, mut arenas) = (Vec::new(), 0);
    for (d, (res, input)) in dirs.iter().zip([(32, "images"), (24, "images_24"), (16, "images_16")]) {
        let c = kiln::compile(d, &opts(2, Some((res, res)))).unwrap();
        arenas += c.program.entries[0].arena_bytes;
        let mut s = Session::new(c.program, Arc::new(WeightStore::open(d).unwrap())).unwrap();
        let out = s.run("forward", &[("images", common::tensor(&ins, input))]).unwrap();
        logits.push(common::tensor(&out, "logits").to_f32());
    }
    (logits, arenas)
}

#[test]
fn ensemble_probs_equal_the_members_run_separately() {
    let root = TempDir::new("probs");
    let dirs = members(&root.0);
    let specs = [format!("{}@32", dirs[0].display()), format!("{}@24", dirs[1].display()), format!("{}@16", dirs[2].display())];
    let mut ms: Vec<Member> = specs.iter().enumerate().map(|(i, s)| parse_member(s, i).unwrap()).collect();
    let weights = [0.5, 0.3, 0.2];
    for (m, w) in ms.iter_mut().zip(weights) {
        m.weight = w;
    }
    let c = compile(&ms, &opts(2, None)).unwrap();
    let e = &c.program.entries[0];
    let outs: Vec<&str> = e.outputs.iter().map(|io| io.name.as_str()).collect();
    assert_eq!(outs, ["probs", "logits_0", "logits_1", "logits_2"]);
    assert_eq!(e.inputs[0].operand.ty.shape.to_vec(), [2, 32, 32, 3], "the input is at the largest member's resolution");
    assert!(c.program.weights.iter().all(|w| ["m0/", "m1/", "m2/"].iter().any(|p| w.name.starts_with(p))));
    let bytes = kiln_graph::artifact::save(&c.program);
    assert_eq!(bytes[8..12], 3u32.to_le_bytes(), "weight sets are format version 3");

    let arena = e.arena_bytes;
    let (alone, arenas) = members_alone(&dirs);
    assert!(arena < arenas, "one plan reuses the arena across members: {arena} B vs {arenas} B for three plans");
    let ins = kiln::io::read(&fixture("ensemble_inputs.safetensors")).unwrap();
    // The ensemble on every backend of the build (cpu; cube on lavapipe) against the members
    // run alone on cpu.
    for backend in common::BACKENDS {
        let c = compile(&ms, &CompileOptions { backend: backend.to_string(), ..opts(2, None) }).unwrap();
        let store = WeightStore::for_program(&c.program, None).unwrap();
        let mut s = Session::new(c.program, Arc::new(store)).unwrap();
        let got = s.run("forward", &[("images", common::tensor(&ins, "images"))]).unwrap();
        let probs = common::tensor(&got, "probs").to_f32();
        let mut worst = 0f64;
        for row in 0..2 {
            let mut want = [0f64; 5];
            for (l, w) in alone.iter().zip(weights) {
                for (k, p) in softmax(&l[row * 5..row * 5 + 5]).into_iter().enumerate() {
                    want[k] += w * p;
                }
            }
            for k in 0..5 {
                worst = worst.max((probs[row * 5 + k] as f64 - want[k]).abs());
            }
        }
        eprintln!("{backend}: probs within {worst:e} of the members run alone and averaged");
        assert!(worst <= 1e-6, "{backend}: probs differ from the members' average by {worst:e}");
        for (i, l) in alone.iter().enumerate() {
            let err = common::rel_err(&common::tensor(&got, &format!("logits_{i}")).to_f32(), l);
            assert!(err < 1e-5, "{backend}: logits_{i}: {err:e}");
        }
    }
    // The members disagree, so the average is not any one member's answer.
    assert!(common::rel_err(&alone[0], &alone[1]) > 1e-2);
}

/// `kiln compile --ensemble` with relative member paths, `--weights-from`, then `kiln run` and
/// `Session::load` (what `kiln_session_open` calls) with the folder the paths are read against.
#[test]
fn ensemble_artifact_runs_through_kiln_run_and_session_load() {
    let root = TempDir::new("cli");
    members(&root.0);
    let kiln = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln")).current_dir(&root.0).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    std::fs::write(root.0.join("sel.json"), r#"{"weights": [0.75, 0.0, 0.25]}"#).unwrap();
    let (ok, text) =
        kiln(&["compile", "--ensemble", "a@32", "b@24", "c@16", "--weights-from", "sel.json", "--batch", "2", "-o", "ens.kiln"]);
    assert!(ok, "{text}");
    assert!(text.contains("member 1 (b) has weight 0: left out"), "{text}");
    let ins = kiln::io::read(&fixture("ensemble_inputs.safetensors")).unwrap();
    let images = vec![("images".to_string(), common::tensor(&ins, "images").clone())];
    kiln::io::write(&root.0.join("in.safetensors"), &images).unwrap();
    let (ok, text) = kiln(&["run", "ens.kiln", "--inputs", "in.safetensors", "--out", "out.safetensors"]);
    assert!(ok, "{text}");
    let out = kiln::io::read(&root.0.join("out.safetensors")).unwrap();
    let mut names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["logits_0", "logits_2", "probs"]);

    let (alone, _) = members_alone(&[root.0.join("a"), root.0.join("b"), root.0.join("c")]);
    let probs = common::tensor(&out, "probs").to_f32();
    for row in 0..2 {
        let (p0, p2) = (softmax(&alone[0][row * 5..row * 5 + 5]), softmax(&alone[2][row * 5..row * 5 + 5]));
        for k in 0..5 {
            let want = 0.75 * p0[k] + 0.25 * p2[k];
            assert!((probs[row * 5 + k] as f64 - want).abs() <= 1e-6, "row {row} class {k}");
        }
    }
    let mut s = Session::load(&root.0.join("ens.kiln"), &root.0).unwrap();
    let again = s.run("forward", &[("images", &images[0].1)]).unwrap();
    assert_eq!(common::tensor(&again, "probs").bytes, common::tensor(&out, "probs").bytes);
    // Read against another folder, the members are not there, and the error says which.
    let msg = Session::load(&root.0.join("ens.kiln"), &root.0.join("c")).err().unwrap().to_string();
    assert!(msg.contains("c/a"), "{msg}");
}

#[test]
fn members_that_are_not_comparable_classifiers_are_refused_by_name() {
    let m = |specs: &[PathBuf]| -> String {
        let ms: Vec<Member> = specs.iter().enumerate().map(|(i, s)| parse_member(s.to_str().unwrap(), i).unwrap()).collect();
        compile(&ms, &opts(1, None)).err().unwrap().to_string()
    };
    let vit = common::big_vision_case("vit_map_learn");
    let siglip = common::siglip_case("vision_map");
    let msg = m(&[vit.clone(), siglip.clone()]);
    assert!(msg.contains(&format!("ensemble member 1 ({})", siglip.display())) && msg.contains("not a classifier"), "{msg}");
    let msg = m(&[vit, common::big_vision_case("vit_tok_sincos2d")]);
    assert!(msg.contains("member 1") && msg.contains("it has 5 classes, member 0 has 7"), "{msg}");
    let msg = parse_member("no/such/folder@x", 0).unwrap_err().to_string();
    assert!(msg.contains("'x' after @ is not a resolution"), "{msg}");
}

/// `kiln ensemble select --models ... --data DIR` runs each model over the folder for its
/// logits; the selection equals `--logits` files holding those logits with the folder's labels.
#[test]
fn select_from_models_and_a_folder_equals_select_from_their_logits() {
    let data = fixture("data");
    let models: Vec<String> = [common::big_vision_case("vit_map_learn"), common::big_vision_case("vit_map_learn_scan")]
        .iter()
        .chain([common::big_vision_case("vit_map_learn")].iter())
        .map(|p| p.display().to_string())
        .collect();
    let o = kiln::rank::RankOptions { k: 1, output: None, batch: 4, compile: opts(4, None), progress: false, save_embeddings: None };
    let (cands, labels) = kiln::ensemble::folder_logits(&models, &data, &o).unwrap();
    assert_eq!(labels, kiln::rank::scan(&data).unwrap().labels().iter().map(|&l| l as i64).collect::<Vec<_>>());
    assert!(cands.iter().all(|c| (c.n, c.c) == (15, 7)));
    assert_eq!(cands[0].values, cands[2].values, "the same model twice gives the same logits");

    let root = TempDir::new("select-models");
    let mut args: Vec<String> = vec!["ensemble".into(), "select".into(), "--size".into(), "4".into(), "--json".into()];
    for (j, c) in cands.iter().enumerate() {
        let f = root.0.join(format!("l{j}.safetensors"));
        let t = kiln_runtime::Tensor::from_f32(&[c.n, c.c], &c.values.iter().map(|&v| v as f32).collect::<Vec<_>>());
        kiln::io::write(&f, &[("logits".to_string(), t)]).unwrap();
        args.extend(["--logits".into(), f.display().to_string()]);
    }
    let lf = root.0.join("labels.safetensors");
    kiln::io::write(&lf, &[("labels".to_string(), kiln_runtime::Tensor::from_i64(&[15], &labels))]).unwrap();
    args.extend(["--labels".into(), lf.display().to_string()]);
    let run = |a: &[String]| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(a).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let from_files = run(&args);
    let mut by_models: Vec<String> =
        vec!["ensemble".into(), "select".into(), "--size".into(), "4".into(), "--json".into(), "--models".into()];
    by_models.extend(models.iter().cloned());
    by_models.extend(["--data".into(), data.display().to_string(), "--batch".into(), "4".into()]);
    let from_models = run(&by_models);
    assert_eq!(from_models["weights"], from_files["weights"]);
    let chosen = |v: &Value| v["steps"].as_array().unwrap().iter().map(|s| s["chosen"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(chosen(&from_models), chosen(&from_files));
    assert_eq!(from_models["counts"][2], 0, "the repeated model loses every tie to its first copy");
}
