//! Bad input gets an error that names the file, the tensor, what was expected and what was
//! found: never a panic. One test per case.

mod common;

use kiln::{compile, io, CompileOptions, Error};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A scratch copy of a fixture folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn of(case: &str, tag: &str) -> Scratch {
        let dst = std::env::temp_dir().join(format!("kiln-err-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(&dst).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(common::siglip_case(case).join(f), dst.join(f)).unwrap();
        }
        Scratch(dst)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts() -> CompileOptions {
    CompileOptions { profile: Profile { batch: 2, ..Profile::default() }, backend: "cpu".into(), trace: false }
}

fn compile_err(dir: &Path) -> String {
    match compile(dir, &opts()) {
        Ok(_) => panic!("{}: compiled, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn rewrite(dir: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = dir.join("model.safetensors");
    let mut t = io::read(&p).unwrap();
    f(&mut t);
    io::write(&p, &t).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn missing_safetensors() {
    let s = Scratch::of("vision_map", "nost");
    std::fs::remove_file(s.0.join("model.safetensors")).unwrap();
    let e = compile_err(&s.0);
    assert!(e.contains("no weight file"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let s = Scratch::of("vision_map", "trunc");
    let p = s.0.join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    let e = compile_err(&s.0);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn missing_tensor() {
    let s = Scratch::of("vision_map", "miss");
    rewrite(&s.0, |t| t.retain(|(n, _)| n != "encoder.layers.1.mlp.fc2.bias"));
    let e = compile_err(&s.0);
    assert!(e.contains("encoder.layers.1.mlp.fc2.bias") && e.contains("[48]"), "{e}");
}

#[test]
fn wrong_shape() {
    let s = Scratch::of("vision_map", "shape");
    rewrite(&s.0, |t| {
        let (_, x) = t.iter_mut().find(|(n, _)| n == "post_layernorm.weight").unwrap();
        *x = Tensor::from_f32(&[47], &[1.0; 47]);
    });
    let e = compile_err(&s.0);
    assert!(e.contains("post_layernorm.weight") && e.contains("[48]") && e.contains("f32[47]"), "{e}");
}

#[test]
fn wrong_dtype() {
    let s = Scratch::of("vision_map", "dtype");
    rewrite(&s.0, |t| {
        let (_, x) = t.iter_mut().find(|(n, _)| n == "post_layernorm.bias").unwrap();
        *x = Tensor::from_i64(&[48], &[0; 48]);
    });
    let e = compile_err(&s.0);
    assert!(e.contains("post_layernorm.bias") && e.contains("i64[48]"), "{e}");
}

#[test]
fn unknown_config_value() {
    let s = Scratch::of("vision_map", "act");
    edit_config(&s.0, |c| {
        c.insert("hidden_act".into(), "swiglu_xl".into());
    });
    let e = compile_err(&s.0);
    assert!(e.contains("config.json") && e.contains("hidden_act") && e.contains("swiglu_xl"), "{e}");
}

#[test]
fn unknown_config_field() {
    let s = Scratch::of("vision_map", "field");
    edit_config(&s.0, |c| {
        c.insert("use_rotary_embeddings".into(), true.into());
    });
    let e = compile_err(&s.0);
    assert!(e.contains("use_rotary_embeddings") && e.contains("refused"), "{e}");
}

#[test]
fn config_not_json() {
    let s = Scratch::of("vision_map", "json");
    std::fs::write(s.0.join("config.json"), "{ not json").unwrap();
    let e = compile_err(&s.0);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

fn session() -> Session {
    let dir = common::siglip_case("vision_map");
    let c = compile(&dir, &opts()).unwrap();
    Session::new(c.program, Arc::new(WeightStore::open(&dir).unwrap())).unwrap()
}

#[test]
fn input_with_wrong_name() {
    let mut s = session();
    let t = Tensor::from_f32(&[2, 3, 32, 32], &vec![0.0; 2 * 3 * 32 * 32]);
    let e = s.run("forward", &[("pixels", &t)]).unwrap_err().to_string();
    assert!(e.contains("pixels") && e.contains("pixel_values"), "{e}");
}

#[test]
fn input_with_wrong_shape() {
    let mut s = session();
    let t = Tensor::from_f32(&[2, 3, 32, 31], &vec![0.0; 2 * 3 * 32 * 31]);
    let e = s.run("forward", &[("pixel_values", &t)]).unwrap_err().to_string();
    assert!(e.contains("pixel_values") && e.contains("f32[2,3,32,32]") && e.contains("f32[2,3,32,31]"), "{e}");
}

#[test]
fn unknown_entry() {
    let mut s = session();
    let e = s.run("inverse", &[]).unwrap_err().to_string();
    assert!(e.contains("inverse") && e.contains("forward"), "{e}");
}

#[test]
fn weights_that_do_not_match_the_artifact() {
    let c = compile(&common::siglip_case("vision_map"), &opts()).unwrap();
    let other = WeightStore::open(&common::siglip_case("vision_nohead")).unwrap();
    let e = match Session::new(c.program, Arc::new(other)) {
        Ok(_) => panic!("loaded weights of another model"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("expects shape") || e.contains("not found"), "{e}");
}

#[test]
fn corrupt_and_foreign_artifacts() {
    let dir = std::env::temp_dir().join(format!("kiln-art-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = compile(&common::siglip_case("vision_map"), &opts()).unwrap();
    let good = dir.join("m.kiln");
    kiln_graph::artifact::save_file(&good, &c.program).unwrap();
    let mut bytes = std::fs::read(&good).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    let bad = dir.join("corrupt.kiln");
    std::fs::write(&bad, &bytes).unwrap();
    let e = Session::load(&bad, &common::siglip_case("vision_map")).err().expect("corrupt loaded").to_string();
    assert!(e.contains("corrupt.kiln"), "{e}");
    let foreign = common::siglip_case("vision_map").join("model.safetensors");
    let e = Session::load(&foreign, &common::siglip_case("vision_map")).err().expect("safetensors loaded as artifact").to_string();
    assert!(e.contains("model.safetensors") && e.contains("not a kiln artifact"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let _: Option<Error> = None;
}

#[test]
fn bf16_compute_on_cpu_is_a_clear_error() {
    let mut o = opts();
    o.profile.dtype = kiln_graph::DType::BF16;
    let e = compile(&common::siglip_case("vision_map"), &o).err().expect("bf16 on cpu compiled").to_string();
    assert!(e.contains("cpu") && e.contains("f32"), "{e}");
}

/// A program whose checksum is right but whose steps are not what any compile makes (a step
/// missing an input, an output type its inputs do not give, a slot out of range, a size that
/// overflows, a kernel of another backend, a kernel that cannot run the op) is refused
/// at load with the step named, on every backend of the build, instead of panicking in a kernel.
#[test]
fn inconsistent_steps_are_refused_at_load() {
    let weights = || Arc::new(WeightStore::open(&common::siglip_case("vision_map")).unwrap());
    let c = compile(&common::siglip_case("vision_map"), &opts()).unwrap();
    let steps = &c.program.entries[0].steps;
    let mm = steps.iter().position(|s| s.kernel.starts_with("cpu.gemm")).expect("a gemm step");
    let ln = steps.iter().position(|s| s.kernel == "cpu.layer_norm").expect("a layer norm step");
    type Break = Box<dyn Fn(&mut kiln_graph::program::Program)>;
    let cases: Vec<(&str, Break)> = vec![
        // Program::validate: re-inferred types, slots in range, sizes without overflow.
        ("matmul", Box::new(move |p| drop(p.entries[0].steps[mm].inputs.pop()))),
        ("declares", Box::new(move |p| p.entries[0].steps[ln].output.ty.shape.reverse())),
        ("outside the", Box::new(move |p| p.entries[0].arena_bytes = 64)),
        ("weight 9999 does not exist", Box::new(move |p| p.entries[0].steps[mm].inputs[1].slot = kiln_graph::program::Slot::Weight(9999))),
        ("overflows", Box::new(move |p| p.weights[0].ty.shape = vec![1 << 40, 1 << 40])),
        ("not a cpu kernel", Box::new(move |p| p.entries[0].steps[ln].kernel = "cublaslt.gemm_f32".into())),
        ("cannot run this step", Box::new(move |p| p.entries[0].steps[ln].kernel = "cpu.gemm".into())),
    ];
    for (want, break_it) in cases {
        let mut p = c.program.clone();
        break_it(&mut p);
        // Through the artifact's bytes, as a hand-made file would arrive.
        // Program::validate runs there; the backends' own checks run at load.
        let e = match kiln_graph::artifact::load(&kiln_graph::artifact::save(&p), "hand-made") {
            Err(e) => e.to_string(),
            Ok(p) => match Session::new(p, weights()) {
                Ok(_) => panic!("{want}: loaded"),
                Err(e) => e.to_string(),
            },
        };
        assert!(e.contains(want), "{want}: {e}");
    }
    // A program built in memory (never through an artifact) is validated by the session.
    let mut p = c.program.clone();
    p.entries[0].steps[ln].output.ty.shape.reverse();
    let e = Session::new(p, weights()).err().expect("an inconsistent program loaded").to_string();
    assert!(e.contains("invalid program") && e.contains("declares"), "{e}");
}
