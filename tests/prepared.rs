//! The prepared weight file (`<artifact>.weights`, `kiln_runtime::cpu::prepared`): a load
//! from it gives the same outputs, bit for bit, as the ordinary load from the checkpoint on
//! every model family's fixture; a truncated, bit-flipped, stale or foreign file is refused
//! with an error naming the file and the reason; the CLI writes, reports and uses it.

mod common;

use common::{big_vision_case, gemma_case, siglip_case};
use kiln::{compile, CompileOptions};
use kiln_graph::program::{Program, Slot};
use kiln_graph::DType;
use kiln_models::Profile;
use kiln_runtime::cpu::prepared::{self, LoadOptions};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-prepared-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Deterministic inputs of every non-state input of `entry`: small positive integers (valid
/// token ids, positions and mask values) and smooth floats in [-1, 1].
fn inputs(p: &Program, entry: &str) -> Vec<(String, Tensor)> {
    let e = p.entry(entry).expect("entry");
    e.inputs
        .iter()
        .filter(|io| p.state_index(&io.name).is_none())
        .map(|io| {
            let ty = io.operand.ty.clone();
            let n = ty.numel();
            let vals: Vec<f64> = match ty.dtype {
                DType::F32 | DType::F16 | DType::BF16 => (0..n).map(|i| ((i as f64) * 0.37).sin()).collect(),
                _ => (0..n).map(|i| (i % 3 + 1) as f64).collect(),
            };
            (io.name.clone(), Tensor { bytes: kiln_runtime::tensor::from_f64(ty.dtype, &vals), ty })
        })
        .collect()
}

fn run(s: &mut Session, entry: &str, ins: &[(String, Tensor)]) -> Vec<(String, Vec<u8>)> {
    let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
    s.run(entry, &refs).expect("run").into_iter().map(|(n, t)| (n, t.bytes)).collect()
}

/// Saves `program` as `<dir>/<name>.kiln` with its prepared file; gives the artifact's path.
fn save(program: &Program, dir: &Path, name: &str) -> PathBuf {
    let art = dir.join(format!("{name}.kiln"));
    kiln_graph::artifact::save_file(&art, program).expect("save artifact");
    let store = WeightStore::for_program(program, None).expect("weights");
    let w = prepared::write(program, Arc::new(store), &prepared::path_for(&art)).expect("write prepared");
    assert!(w.bytes > 0 && w.packed + w.raw > 0, "{name}: empty prepared file");
    art
}

/// The case's program loaded from the checkpoint and from its prepared file: the same
/// outputs of every entry, bit for bit, and the load says it mapped the prepared file.
fn same_outputs(name: &str, program: Program, entries: &[&str]) {
    let dir = scratch(name);
    let art = save(&program, &dir, name);
    let store = WeightStore::for_program(&program, None).expect("weights");
    let mut plain = Session::new(program.clone(), Arc::new(store)).expect("session from the checkpoint");
    let (mut fast, report) = Session::load_with(&art, None, LoadOptions::default()).expect("session from the prepared file");
    assert!(report.starts_with("prepared "), "{name}: {report}");
    for entry in entries {
        let ins = inputs(&program, entry);
        let (a, b) = (run(&mut plain, entry, &ins), run(&mut fast, entry, &ins));
        assert_eq!(a.len(), b.len());
        for ((n, x), (_, y)) in a.iter().zip(&b) {
            assert!(x == y, "{name}: {entry}: output {n} differs between the checkpoint and the prepared file");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn forward(dir: &Path, profile: Profile) -> Program {
    compile(dir, &CompileOptions { profile, backend: "cpu".into(), trace: false })
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .program
}

fn text(seq: usize) -> Profile {
    Profile { seq_len: Some(seq), ..Profile::default() }
}

#[test]
fn siglip_loads_bit_identically() {
    for case in ["vision_bf16", "vision_map", "paligemma_tower"] {
        same_outputs(case, forward(&siglip_case(case), Profile::default()), &["forward"]);
    }
    same_outputs("siglip_full", forward(&siglip_case("siglip_full"), text(8)), &["forward"]);
}

#[test]
fn gemma_and_paligemma_load_bit_identically() {
    for case in ["gemma2_gqa", "gemma2_untied", "gemma_mqa", "paligemma", "paligemma2"] {
        same_outputs(case, forward(&gemma_case(case), text(6)), &["forward"]);
    }
    // A generation program: prefill and decode share each packed weight.
    let g = kiln::generate::generation_program(&gemma_case("gemma2_gqa"), 1, 6, 3, "cpu", DType::F32).expect("generation program");
    same_outputs("gemma2_gqa_generate", g.program, &["prefill", "decode"]);
}

#[test]
fn big_vision_loads_bit_identically() {
    for case in ["vit_map_learn", "vit_map_learn_scan", "vit_tok_sincos2d", "vmoe"] {
        let dir = big_vision_case(case);
        // The fixture's own image size where it has inputs (V-MoE's is not its config's).
        let images = dir.join("inputs.safetensors");
        let images = images.exists().then(|| kiln::io::read(&images).expect("inputs").remove(0).1.ty.shape);
        let profile = match images {
            Some(s) => Profile { batch: s[0], image_hw: Some((s[1], s[2])), ..Profile::default() },
            None => Profile::default(),
        };
        same_outputs(case, forward(&dir, profile), &["forward"]);
    }
}

/// The small case the refusal tests use, its artifact and prepared file in a scratch folder
/// with a copy of its checkpoint (so the tests may change it).
fn small(name: &str) -> (PathBuf, PathBuf, Program) {
    let dir = scratch(name);
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    for f in std::fs::read_dir(gemma_case("gemma2_gqa")).expect("fixture") {
        let f = f.expect("entry").path();
        std::fs::copy(&f, ckpt.join(f.file_name().expect("name"))).expect("copy");
    }
    let program = forward(&ckpt, text(6));
    let art = save(&program, &dir, "small");
    (dir, art, program)
}

fn refusal(art: &Path) -> String {
    match Session::load_with(art, None, LoadOptions::default()) {
        Ok(_) => panic!("{}: a bad prepared file was accepted", art.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_prepared_files_are_refused_by_name() {
    let (dir, art, program) = small("refused");
    let pp = prepared::path_for(&art);
    let good = std::fs::read(&pp).expect("prepared");
    let name = pp.display().to_string();
    let check = |bytes: &[u8], why: &str| {
        std::fs::write(&pp, bytes).expect("write");
        let e = refusal(&art);
        assert!(e.contains(&name) && e.contains(why), "want '{why}' naming {name}, got: {e}");
    };
    check(&good[..good.len() - 100], "truncated");
    let mut flipped = good.clone();
    *flipped.last_mut().expect("bytes") ^= 0x10; // the last tensor's last byte
    check(&flipped, "checksum mismatch in tensor");
    let mut head = good.clone();
    head[60] ^= 1;
    check(&head, "header checksum mismatch");
    check(&std::fs::read(&art).expect("artifact"), "not a kiln prepared weight file");
    // Stale: the prepared file of another program (another batch) beside this artifact.
    let mut other = program.clone();
    other.source.push_str("/.");
    let other_art = save(&other, &dir, "other");
    check(&std::fs::read(prepared::path_for(&other_art)).expect("other"), "stale: written for another artifact");
    // Asked to read other weights explicitly: the prepared file is left unused, and said so.
    std::fs::write(&pp, &good).expect("restore");
    let (_, report) = Session::load_with(&art, Some(&gemma_case("gemma2_gqa")), LoadOptions::default()).expect("other weights");
    assert!(report.starts_with("checkpoint ") && report.contains("not used"), "{report}");
    // Stale: the checkpoint rewritten with other values since the file was written.
    assert!(Session::load_with(&art, None, LoadOptions::default()).is_ok());
    let st = dir.join("ckpt/model.safetensors");
    let mut w = std::fs::read(&st).expect("checkpoint");
    let last = w.len() - 3;
    w[last] ^= 0x40;
    std::fs::write(&st, &w).expect("rewrite checkpoint");
    let e = refusal(&art);
    assert!(e.contains(&name) && e.contains("stale: the checkpoint") && e.contains("model.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The file holds one packed matrix per matrix of a matmul weight (on an AVX-512 machine; a
/// stacked `[G, N, K]` weight of sibling projections, or a gated matmul's gate and up, has `G`) and the weights other steps read
/// as they are (norms, embeddings), and its checksums verify.
#[test]
fn prepared_file_holds_only_what_a_load_reads() {
    let (dir, art, program) = small("holds");
    let f = prepared::PreparedFile::open(&prepared::path_for(&art), &program, true).expect("open");
    let (bytes, packed, raw) = f.summary();
    let matmul_weights: std::collections::HashSet<u32> = program
        .entries
        .iter()
        .flat_map(|e| &e.steps)
        .filter(|s| matches!(s.op, kiln_graph::Op::MatMul { .. } | kiln_graph::Op::GatedMatMul { .. }))
        .filter_map(|s| match s.inputs[1].slot {
            Slot::Weight(i) => Some(i),
            _ => None,
        })
        .collect();
    let matrices: usize = matmul_weights
        .iter()
        .map(|&i| {
            let s = &program.weights[i as usize].ty.shape;
            s[..s.len() - 2].iter().product::<usize>()
        })
        .sum();
    assert!(matrices > matmul_weights.len(), "the program has a stacked weight");
    if kiln_kernels::cpu::sgemm512::available() {
        assert_eq!(packed, matrices, "one packed matrix per matrix of a matmul weight");
    }
    assert!(raw > 0 && bytes > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `kiln compile` writes the prepared file, `inspect` says a load maps it, `run` uses it (and
/// `--no-prepared` does not), with the same outputs; a corrupt one fails `run` with exit 1.
#[test]
fn cli_writes_reports_and_uses_it() {
    let dir = scratch("cli");
    let case = gemma_case("gemma2_gqa");
    let art = dir.join("g.kiln");
    let (a, i) = (art.to_str().expect("utf-8"), case.join("inputs.safetensors"));
    let (ok, out, err) = kiln(&["compile", case.to_str().expect("utf-8"), "--seq-len", "20", "--batch", "2", "-o", a]);
    assert!(ok, "{err}");
    assert!(out.contains("prepared weights:") && prepared::path_for(&art).is_file(), "{out}");
    let (ok, out, err) = kiln(&["inspect", a]);
    assert!(ok, "{err}");
    assert!(out.contains("== load\nprepared ") && out.contains("pack none, compile none"), "{out}");
    let (ok, out, _) = kiln(&["inspect", a, "--no-prepared"]);
    assert!(ok && out.contains("== load\nfrom the checkpoint") && out.contains("matmul weights at load"), "{out}");
    let fixture_inputs = i.to_str().expect("utf-8");
    let outs = [dir.join("a.safetensors"), dir.join("b.safetensors")];
    let (ok, _, err) = kiln(&["run", a, "--inputs", fixture_inputs, "--out", outs[0].to_str().expect("utf-8")]);
    assert!(ok && err.contains("load: prepared "), "{err}");
    let (ok, _, err) = kiln(&["run", a, "--no-prepared", "--inputs", fixture_inputs, "--out", outs[1].to_str().expect("utf-8")]);
    assert!(ok && err.contains("load: checkpoint "), "{err}");
    assert!(std::fs::read(&outs[0]).expect("a") == std::fs::read(&outs[1]).expect("b"), "outputs differ");
    let pp = prepared::path_for(&art);
    let mut bytes = std::fs::read(&pp).expect("prepared");
    *bytes.last_mut().expect("bytes") ^= 1;
    std::fs::write(&pp, &bytes).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", a, "--inputs", fixture_inputs, "--out", outs[0].to_str().expect("utf-8")])
        .output()
        .expect("run kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("error: ") && err.contains(&pp.display().to_string()) && err.contains("checksum mismatch"), "{err}");
    // --no-prepared at compile writes none (and removes the stale one).
    let (ok, out, err) = kiln(&["compile", case.to_str().expect("utf-8"), "--seq-len", "20", "--batch", "2", "--no-prepared", "-o", a]);
    assert!(ok && !out.contains("prepared weights:") && !pp.exists(), "{out}{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of the checkpoint folder `src` in `out` with every float tensor of its
/// `model.safetensors` converted to `dtype` (to bf16: rounded; back to f32: exactly).
fn converted_copy(src: &Path, out: &Path, dtype: DType) -> PathBuf {
    std::fs::create_dir_all(out).expect("mkdir");
    for f in std::fs::read_dir(src).expect("checkpoint") {
        let f = f.expect("entry").path();
        if f.file_name().is_some_and(|n| n != "model.safetensors") {
            std::fs::copy(&f, out.join(f.file_name().expect("name"))).expect("copy");
        }
    }
    let mut ts = kiln::io::read(&src.join("model.safetensors")).expect("read checkpoint");
    for (_, t) in &mut ts {
        if t.ty.dtype.is_float() {
            t.bytes = kiln_runtime::tensor::convert(t.ty.dtype, dtype, &t.bytes);
            t.ty.dtype = dtype;
        }
    }
    kiln::io::write(&out.join("model.safetensors"), &ts).expect("write checkpoint");
    out.to_path_buf()
}

/// A bf16 checkpoint's gathered embedding is never held in f32: untied, the prepared file keeps
/// the table as bf16 bits (half the f32 size) and the gather widens the rows; tied to the LM
/// head, the gather reads the rows from the head's packed panels and the file holds no table at
/// all. Every load gives, bit for bit, what the same values stored as f32 give, and agrees with
/// the interpreter.
#[test]
fn bf16_gathered_embedding_is_never_f32() {
    for (case, tied) in [("gemma2_untied", false), ("gemma2_gqa", true)] {
        bf16_embedding(case, tied);
    }
}

fn bf16_embedding(case: &str, tied: bool) {
    let dir = scratch(&format!("bf16-gather-{case}"));
    let bf16 = converted_copy(&gemma_case(case), &dir.join("bf16"), DType::BF16);
    let wide = converted_copy(&bf16, &dir.join("f32"), DType::F32);
    let (pb, pw) = (forward(&bf16, text(6)), forward(&wide, text(6)));
    same_outputs(&format!("{case}_bf16"), pb.clone(), &["forward"]);
    let ins = inputs(&pb, "forward");
    let session = |p: &Program| Session::new(p.clone(), Arc::new(WeightStore::for_program(p, None).expect("weights"))).expect("session");
    let (b, w) = (run(&mut session(&pb), "forward", &ins), run(&mut session(&pw), "forward", &ins));
    let art = save(&pb, &dir, "bf16");
    let (mut fast, _) = Session::load_with(&art, None, LoadOptions::default()).expect("prepared load");
    let f = run(&mut fast, "forward", &ins);
    for (((n, x), (_, y)), (_, z)) in b.iter().zip(&w).zip(&f) {
        assert!(x == y && x == z, "{case}: output {n}: the bf16 checkpoint's load differs from its values stored as f32");
    }
    // The interpreter (the oracle) on the bf16 checkpoint's values.
    let built = kiln_models::build(&bf16, &text(6)).expect("build");
    let vals: std::collections::HashMap<String, kiln_graph::interp::Value> = ins
        .iter()
        .map(|(n, t)| {
            (n.clone(), kiln_graph::interp::Value::new(t.ty.clone(), kiln_runtime::tensor::to_f64(t.ty.dtype, &t.bytes)).expect("value"))
        })
        .collect();
    let weights = common::read_values(&bf16.join("model.safetensors"));
    let oracle = kiln_graph::interp::run(built.graph("forward").expect("forward"), &vals, &weights).expect("interpret");
    let (n, got) = b.iter().find(|(n, _)| n == "logits").expect("logits");
    let got: Vec<f32> = kiln_runtime::tensor::to_f64(DType::F32, got).into_iter().map(|v| v as f32).collect();
    let e = common::rel_err(&got, &oracle[n].to_f32());
    assert!(e < 1e-4, "{case}: logits against the interpreter: relative error {e:.3e}");
    // What the file holds of the embedding: bf16 bits of the table (untied), or only the LM
    // head's packed panels (tied; on a machine that packs).
    let embed = pb.weights.iter().position(|w| w.name == "model.embed_tokens.weight").expect("embedding") as u32;
    let spec = &pb.weights[embed as usize];
    assert_eq!(spec.ty.dtype, DType::F32, "{case}: the program reads the embedding as f32");
    let pf = prepared::PreparedFile::open(&prepared::path_for(&art), &pb, true).expect("open");
    let (raw, packed): (Vec<_>, Vec<_>) = pf.tensors().into_iter().filter(|t| t.weight == embed).partition(|t| !t.packed);
    let packs = kiln_kernels::cpu::sgemm512::available();
    if tied && packs {
        assert!(raw.is_empty() && packed.len() == 1 && packed[0].bf16, "{case}: {raw:?} {packed:?}");
    } else {
        assert_eq!(raw.len(), 1, "{case}: one gather table of the embedding");
        assert!(raw[0].bf16 && raw[0].bytes == spec.ty.numel() as u64 * 2, "{case}: {:?}", raw[0]);
    }
    // The same program from the f32 checkpoint stores f32: the bf16 file is smaller by at
    // least half the table's f32 bytes.
    let art_w = save(&pw, &dir, "f32");
    let size = |a: &Path| std::fs::metadata(prepared::path_for(a)).expect("prepared").len();
    assert!(size(&art) + spec.ty.numel() as u64 * 2 <= size(&art_w), "{case}: {} vs {}", size(&art), size(&art_w));
    let _ = std::fs::remove_dir_all(&dir);
}
