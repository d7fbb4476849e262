//! An ensemble artifact (`kiln compile --ensemble`: format version 3, weights from two member
//! folders) through the C ABI: opened with the folder its member paths are read against, run on
//! caller-owned buffers, bit-exact against the Rust API; opened against a folder without the
//! members, refused as a weights error naming the missing member.

use crate::common::*;
use kiln_capi::*;
use kiln_runtime::Session;
use std::path::{Path, PathBuf};

/// A tiny big_vision ViT classifier (sincos position embedding, 4 classes) in `dir`.
fn tiny_vit(dir: &Path, seed: u64) {
    let model = serde_json::json!({"width": 16, "depth": 1, "mlp_dim": 32, "num_heads": 2, "patch_size": [8, 8],
        "num_classes": 4, "posemb": "sincos2d", "pool_type": "gap"});
    let recipe = kiln::models::registry::SynthRecipe {
        config: serde_json::json!({"model_name": "vit", "model": model}),
        dtype: kiln_graph::DType::F32,
        format: kiln::models::registry::WeightFormat::Npz,
        roots: &[""],
        given: Vec::new(),
        batch: 1,
    };
    kiln::synth::synth_folder(&kiln::models::big_vision::vit::FAMILY, &recipe, dir, seed, false).expect("synth");
}

#[test]
fn ensemble_artifact_runs_through_the_c_abi() {
    let root: PathBuf = std::env::temp_dir().join(format!("kiln-capi-ensemble-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    tiny_vit(&root.join("a"), 1);
    tiny_vit(&root.join("b"), 2);
    // Relative member paths, read against the folder given to kiln_session_open.
    let members = ["a@24", "b@16"].iter().enumerate().map(|(i, s)| {
        let mut m = kiln::ensemble::parse_member(s, i).expect("member");
        m.dir = PathBuf::from(if i == 0 { "a" } else { "b" });
        m
    });
    let members: Vec<_> = members.collect();
    let opts =
        kiln::CompileOptions { profile: kiln::models::Profile { batch: 2, ..Default::default() }, backend: "cpu".into(), trace: false };
    // Compiling reads the member folders: from the root.
    let abs: Vec<_> = members.iter().map(|m| kiln::models::ensemble::Member { dir: root.join(&m.dir), ..m.clone() }).collect();
    let mut compiled = kiln::ensemble::compile(&abs, &opts).expect("compile");
    for (s, m) in compiled.program.weight_sets.iter_mut().zip(&members) {
        s.path = m.dir.display().to_string();
    }
    let artifact = root.join("ens.kiln");
    kiln_graph::artifact::save_file(&artifact, &compiled.program).expect("save");

    let x: Vec<u8> = (0..2 * 24 * 24 * 3).flat_map(|i| ((i % 97) as f32 / 48.0 - 1.0).to_le_bytes()).collect();
    let inputs = vec![("images".to_string(), x)];
    let mut rust = Session::load(&artifact, &root).expect("Rust session");
    let t = kiln_runtime::Tensor { ty: rust.program().entries[0].inputs[0].operand.ty.clone(), bytes: inputs[0].1.clone() };
    let want: Vec<(String, Vec<u8>)> =
        rust.run("forward", &[("images", &t)]).expect("run").into_iter().map(|(n, t)| (n, t.bytes)).collect();
    assert_eq!(want.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["probs", "logits_0", "logits_1"]);

    let h = open(&artifact, &root).unwrap_or_else(|(st, m)| panic!("open: {st:?}: {m}"));
    let names = vec![c("images")];
    let ins = input_bufs(&inputs, &names);
    let mut storage: Vec<Vec<u8>> = want.iter().map(|(_, b)| vec![0u8; b.len()]).collect();
    let outs = output_bufs(&mut storage);
    assert_eq!(run_raw(&h, "forward", &ins, &outs), KilnStatus::Ok, "{}", last_error());
    for ((name, w), got) in want.iter().zip(&storage) {
        assert_eq!(w, got, "{name} differs between the C ABI and the Rust API");
    }
    drop(h);

    let (st, msg) = open(&artifact, &root.join("a")).err().expect("members are not under a/");
    assert_eq!(st, KilnStatus::Weights, "{msg}");
    assert!(msg.contains("a/a"), "{msg}");
    let _ = std::fs::remove_dir_all(&root);
}
