//! UViM's stage II VTT against big_vision's `uvim.vtt.Model` and its `uvim/decode.py` predict
//! loop (`tests/fixtures/big_vision/uvim_vtt`, copied by `scripts/copy_big_vision_fixtures.py`
//! from the shared fixtures made with the official JAX code): teacher-forced logits and the
//! encoder's tokens within 1e-4, and greedy code generation (prompts of zeros, no EOS, as
//! `trainers/proj/uvim/train.py` predicts) with exact ids, on the cpu and cube backends.

mod common;

use common::rel_err;
use kiln::{compile, io, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big_vision/uvim_vtt")
}

fn tensor<'a>(ts: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &ts.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor {name}")).1
}

/// The backends of this build (cube: wgpu, on lavapipe without a GPU).
const BACKENDS: &[&str] = &[
    "cpu",
    #[cfg(feature = "cube")]
    "cube",
];

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
