//! Bad input to the Gemma models gets an error naming what was wrong: never a panic.

mod common;

use kiln::generate::Generator;
use kiln::{compile, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::PathBuf;
use std::sync::Arc;

/// A scratch copy of a Gemma fixture folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn of(case: &str, tag: &str) -> Scratch {
        let dst = std::env::temp_dir().join(format!("kiln-gerr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(&dst).unwrap();
        for f in ["config.json", "model.safetensors", "generation_config.json"] {
            std::fs::copy(common::gemma_case(case).join(f), dst.join(f)).unwrap();
        }
        Scratch(dst)
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let p = self.0.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(&p, v.to_string()).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts(seq: usize) -> CompileOptions {
    CompileOptions { profile: Profile { batch: 1, seq_len: Some(seq), ..Profile::default() }, backend: "cpu".into(), trace: false }
}

fn compile_err(dir: &std::path::Path) -> String {
    match compile(dir, &opts(4)) {
        Ok(_) => panic!("{}: compiled, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn token_id_out_of_range_in_forward() {
    let dir = common::gemma_case("gemma2_gqa");
    let c = compile(&dir, &opts(4)).unwrap();
    let mut s = Session::new(c.program, Arc::new(WeightStore::open(&dir).unwrap())).unwrap();
    let ids = Tensor::from_i64(&[1, 4], &[5, 6, 300, 7]);
    let mask = Tensor::from_i64(&[1, 4], &[1; 4]);
    let pos = Tensor::from_i64(&[1, 4], &[0, 1, 2, 3]);
    let e = s.run("forward", &[("input_ids", &ids), ("attention_mask", &mask), ("position_ids", &pos)]).unwrap_err().to_string();
    assert!(e.contains("index 300") && e.contains("out of range 0..300"), "{e}");
}

#[test]
fn token_id_out_of_range_in_generate() {
    let dir = common::gemma_case("gemma_mqa");
    let mut g = Generator::new(&dir, 1, 4, 2, "cpu").unwrap();
    let e = g.generate(&[5, -1, 7, 8], &[1; 4], 4, 2, None).err().expect("an error").to_string();
    assert!(e.contains("input_ids[0, 1] = -1") && e.contains("vocabulary of 300"), "{e}");
}

#[test]
fn prompt_longer_than_compiled_bucket() {
    let dir = common::gemma_case("gemma_mqa");
    let mut g = Generator::new(&dir, 1, 4, 2, "cpu").unwrap();
    let e = g.generate(&[5; 6], &[1; 6], 6, 2, None).err().expect("an error").to_string();
    assert!(e.contains("6 tokens") && e.contains("holds 4"), "{e}");
    let e = g.generate(&[5; 4], &[1; 4], 4, 3, None).err().expect("an error").to_string();
    assert!(e.contains("3 new tokens do not fit"), "{e}");
}

#[test]
fn unknown_config_field() {
    let s = Scratch::of("gemma2_gqa", "unk");
    s.edit_config(|c| {
        c.insert("attention_chunk_size".into(), 8.into());
    });
    let e = compile_err(&s.0);
    assert!(e.contains("field 'attention_chunk_size'") && e.contains("does not know"), "{e}");
}

#[test]
fn rope_scaling_refused() {
    let s = Scratch::of("gemma_mqa", "rope");
    s.edit_config(|c| {
        c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}));
    });
    let e = compile_err(&s.0);
    assert!(e.contains("rope_type") && e.contains("'linear'"), "{e}");
}

#[test]
fn bad_layer_type_refused() {
    let s = Scratch::of("gemma2_gqa", "lt");
    s.edit_config(|c| {
        c.insert("layer_types".into(), serde_json::json!(["sliding_attention", "chunked_attention", "full_attention", "full_attention"]));
    });
    let e = compile_err(&s.0);
    assert!(e.contains("layer_types") && e.contains("chunked_attention"), "{e}");
}

#[test]
fn missing_layer_weight() {
    let s = Scratch::of("gemma2_gqa", "miss");
    let p = s.0.join("model.safetensors");
    let mut t = kiln::io::read(&p).unwrap();
    t.retain(|(n, _)| n != "model.layers.1.post_feedforward_layernorm.weight");
    kiln::io::write(&p, &t).unwrap();
    let e = compile_err(&s.0);
    assert!(e.contains("model.layers.1.post_feedforward_layernorm.weight") && e.contains("[64]"), "{e}");
}

#[test]
fn untied_without_lm_head() {
    let s = Scratch::of("gemma2_untied", "head");
    let p = s.0.join("model.safetensors");
    let mut t = kiln::io::read(&p).unwrap();
    t.retain(|(n, _)| n != "lm_head.weight");
    kiln::io::write(&p, &t).unwrap();
    let e = compile_err(&s.0);
    assert!(e.contains("lm_head.weight"), "{e}");
}

#[test]
fn paligemma_needs_its_image_and_its_image_tokens() {
    let dir = common::gemma_case("paligemma");
    let mut g = Generator::new(&dir, 1, 20, 2, "cpu").unwrap();
    let mut ids = vec![299i64; 16];
    ids.extend([2, 5, 6, 10]);
    let px = Tensor::from_f32(&[1, 3, 32, 32], &[0.1; 3 * 32 * 32]);
    let e = g.generate(&ids, &[1; 20], 20, 2, None).err().expect("an error").to_string();
    assert!(e.contains("pixel_values"), "{e}");
    let bad = Tensor::from_f32(&[1, 3, 16, 16], &[0.1; 3 * 16 * 16]);
    let e = g.generate(&ids, &[1; 20], 20, 2, Some(&bad)).err().expect("an error").to_string();
    assert!(e.contains("f32[1,3,16,16]") && e.contains("f32[1,3,32,32]"), "{e}");
    ids[16] = 299;
    let e = g.generate(&ids, &[1; 20], 20, 2, Some(&px)).err().expect("an error").to_string();
    assert!(e.contains("17 image tokens") && e.contains("gives 16"), "{e}");
    ids[16] = 2;
    assert!(g.generate(&ids, &[1; 20], 20, 2, Some(&px)).is_ok());
}

/// Runs the kiln binary: (exit success, stdout, stderr).
fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `kiln compile --generate` writes prefill, decode and the KV cache states as an artifact,
/// and says clearly when the model is not a text model or the bucket is missing.
#[test]
fn compile_generate_writes_an_artifact_and_names_bad_arguments() {
    let dir = common::gemma_case("gemma2_gqa");
    let out = std::env::temp_dir().join(format!("kiln-gerr-generate-{}.kiln", std::process::id()));
    let (d, o) = (dir.to_str().unwrap(), out.to_str().unwrap());
    let args = ["compile", d, "--generate", "--seq-len", "8", "--max-new-tokens", "3", "--batch", "2", "-o", o];
    let (ok, stdout, stderr) = kiln(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("entry prefill") && stdout.contains("entry decode") && stdout.contains("cache.0.key"), "{stdout}");
    let p = kiln_graph::artifact::load_file(&out).expect("the artifact loads");
    let _ = std::fs::remove_file(&out);
    let names: Vec<&str> = p.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["prefill", "decode"]);
    assert_eq!(p.states.len(), 8, "two per layer");
    assert_eq!(p.states[0].ty.shape.to_vec(), [2, 11, 2, 32], "[batch, bucket + new tokens, kv heads, head dim]");

    let (ok, _, stderr) = kiln(&["compile", d, "--generate", "--max-new-tokens", "3", "-o", o]);
    assert!(!ok && stderr.contains("--generate needs --seq-len"), "{stderr}");
    let (ok, _, stderr) = kiln(&["compile", d, "--generate", "--seq-len", "8", "-o", o]);
    assert!(!ok && stderr.contains("--generate needs --max-new-tokens"), "{stderr}");
    let vit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big_vision/vit_map_learn");
    let (ok, _, stderr) = kiln(&["compile", vit.to_str().unwrap(), "--generate", "--seq-len", "8", "--max-new-tokens", "3", "-o", o]);
    assert!(!ok && stderr.contains("a vit model does not generate text (generation: gemma, paligemma, paligemma-bv)"), "{stderr}");
    assert!(!out.exists(), "no artifact written on an error");
}
