//! The cuda profile of the prepared weight file (`kiln_runtime::prepared::cuda`), with no GPU:
//! the upload itself needs one, so these tests check its host side. For the tiny Gemma 2 and
//! SigLIP fixtures compiled for cuda in bf16 and f32, the file holds every weight exactly as
//! the upload sends it (bit for bit what the in-memory path makes from the checkpoint, and what
//! the checkpoint's tensors give converted and stacked independently here); a truncated,
//! bit-flipped, stale or foreign file is refused by name; the CLI writes it, `kiln inspect`
//! says a load maps it and converts and compiles nothing, and `kiln run` reads it.
#![cfg(feature = "cuda")]

mod common;

use common::{gemma_case, nvrtc, siglip_case};
use kiln::{compile, CompileOptions};
use kiln_graph::program::Program;
use kiln_graph::DType;
use kiln_models::Profile;
use kiln_runtime::prepared::{self, cuda, LoadOptions};
use kiln_runtime::{Tensor, WeightStore};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-prepared-cuda-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn program(dir: &Path, backend: &str, dtype: DType, seq: Option<usize>) -> Program {
    let profile = Profile { dtype, seq_len: seq, ..Profile::default() };
    compile(dir, &CompileOptions { profile, backend: backend.into(), trace: false })
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .program
}

/// Saves `program` as `<dir>/<name>.kiln` with its cuda prepared file.
fn save(program: &Program, dir: &Path, name: &str) -> PathBuf {
    let art = dir.join(format!("{name}.kiln"));
    kiln_graph::artifact::save_file(&art, program).expect("save artifact");
    let store = WeightStore::for_program(program, None).expect("weights");
    let w = cuda::write(program, &store, &prepared::path_for(&art)).expect("write prepared");
    assert_eq!((w.raw, w.packed), (program.weights.len(), 0));
    art
}

/// What the upload sends for each weight, worked out from the checkpoint's tensors here (not
/// through the weight store): the tensor, or a stack's parts concatenated, in the program's
/// dtype. `None` for a name this does not know (a view).
fn expected(program: &Program, ckpt: &HashMap<String, Tensor>) -> Vec<Option<Vec<u8>>> {
    let convert = |t: &Tensor, to: DType| kiln_runtime::tensor::convert(t.ty.dtype, to, &t.bytes);
    program
        .weights
        .iter()
        .map(|w| match kiln_graph::safetensors::stack_parts(&w.name) {
            Some(parts) => {
                let ts: Option<Vec<&Tensor>> = parts.iter().map(|p| ckpt.get(p)).collect();
                ts.map(|ts| ts.iter().flat_map(|t| convert(t, w.ty.dtype)).collect())
            }
            None => ckpt.get(&w.name).map(|t| convert(t, w.ty.dtype)),
        })
        .collect()
}

/// The case compiled for cuda in `dtype`: the prepared file's bytes equal, weight by weight,
/// what the in-memory path uploads and what the checkpoint gives converted and stacked here.
/// Returns (weights stacked, weights converted) so the caller can see both paths were taken.
fn same_bytes(name: &str, dir: &Path, dtype: DType, seq: Option<usize>) -> (usize, usize) {
    let tmp = scratch(name);
    let p = program(dir, "cuda", dtype, seq);
    let art = save(&p, &tmp, name);
    let (mapped, report) = prepared::store_for_artifact(&art, &p, None, LoadOptions::default()).expect("load store");
    assert!(report.starts_with("prepared ") && report.contains("convert none"), "{name}: {report}");
    assert!(mapped.prepared().is_some(), "{name}: the load does not map the prepared file");
    let plain = WeightStore::for_program(&p, None).expect("checkpoint");
    let ckpt: HashMap<String, Tensor> = kiln::io::read(&dir.join("model.safetensors")).expect("checkpoint").into_iter().collect();
    let want = expected(&p, &ckpt);
    let (mut stacked, mut converted, mut independent) = (0, 0, 0);
    for (i, w) in p.weights.iter().enumerate() {
        let from_file = cuda::upload_bytes(&p, &mapped, i).expect("from the prepared file");
        let in_memory = cuda::upload_bytes(&p, &plain, i).expect("from the checkpoint");
        assert!(matches!(from_file, std::borrow::Cow::Borrowed(_)), "{name}: {} was copied out of the mapping", w.name);
        assert_eq!(from_file.len(), w.ty.bytes(), "{name}: {}", w.name);
        assert!(from_file == in_memory, "{name} {dtype}: weight {} differs between the prepared file and the checkpoint", w.name);
        if let Some(b) = &want[i] {
            assert!(*b == *from_file, "{name} {dtype}: weight {} is not its checkpoint tensors converted and stacked", w.name);
            independent += 1;
        }
        stacked += kiln_graph::safetensors::stack_parts(&w.name).is_some() as usize;
        converted += plain.resolve(&w.name).is_some_and(|r| r.ty.dtype != w.ty.dtype) as usize;
    }
    assert!(independent * 10 >= p.weights.len() * 9, "{name}: only {independent} of {} weights checked independently", p.weights.len());
    let _ = std::fs::remove_dir_all(&tmp);
    (stacked, converted)
}

#[test]
fn prepared_file_holds_what_the_upload_sends() {
    for dtype in [DType::BF16, DType::F32] {
        let (s, c) = same_bytes("gemma2", &gemma_case("gemma2_gqa"), dtype, Some(6));
        assert!(s > 0, "gemma2 {dtype}: no stacked weight (the stack pass should make some)");
        let (_, c2) = same_bytes("siglip", &siglip_case("vision_map"), dtype, None);
        let (_, c3) = same_bytes("siglip_bf16", &siglip_case("vision_bf16"), dtype, None);
        assert!(c + c2 + c3 > 0, "{dtype}: no weight converted, so the conversion path was not compared");
    }
}

fn refusal(art: &Path, p: &Program) -> String {
    match prepared::store_for_artifact(art, p, None, LoadOptions::default()) {
        Ok(_) => panic!("{}: a bad prepared file was accepted", art.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_cuda_prepared_files_are_refused_by_name() {
    let dir = scratch("refused");
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    for f in std::fs::read_dir(gemma_case("gemma2_gqa")).expect("fixture") {
        let f = f.expect("entry").path();
        std::fs::copy(&f, ckpt.join(f.file_name().expect("name"))).expect("copy");
    }
    let p = program(&ckpt, "cuda", DType::BF16, Some(6));
    let art = save(&p, &dir, "small");
    let pp = prepared::path_for(&art);
    let good = std::fs::read(&pp).expect("prepared");
    let name = pp.display().to_string();
    let check = |bytes: &[u8], why: &str| {
        std::fs::write(&pp, bytes).expect("write");
        let e = refusal(&art, &p);
        assert!(e.contains(&name) && e.contains(why), "want '{why}' naming {name}, got: {e}");
    };
    check(&good[..good.len() - 100], "truncated");
    let mut flipped = good.clone();
    *flipped.last_mut().expect("bytes") ^= 0x10;
    check(&flipped, "checksum mismatch in tensor");
    // `Session::load_with` (the C API's `kiln_session_open` and `kiln run` load through it)
    // reads the file before it needs a GPU.
    std::fs::write(&pp, &flipped).expect("write");
    let e = kiln_runtime::Session::load_with(&art, None, LoadOptions::default()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains(&name) && e.contains("checksum mismatch"), "{e}");
    let mut head = good.clone();
    head[60] ^= 1;
    check(&head, "header checksum mismatch");
    // Stale: the file of a recompiled artifact (another sequence length).
    let other = program(&ckpt, "cuda", DType::BF16, Some(7));
    let other_art = save(&other, &dir, "other");
    check(&std::fs::read(prepared::path_for(&other_art)).expect("other"), "stale: written for another artifact");
    // Foreign: a cpu file beside a cuda artifact, and a cuda file beside a cpu artifact.
    let cpu = program(&ckpt, "cpu", DType::F32, Some(6));
    let cpu_art = dir.join("cpu.kiln");
    kiln_graph::artifact::save_file(&cpu_art, &cpu).expect("save");
    let store = WeightStore::for_program(&cpu, None).expect("weights");
    kiln_runtime::cpu::prepared::write(&cpu, std::sync::Arc::new(store), &prepared::path_for(&cpu_art)).expect("cpu file");
    let cpu_file = std::fs::read(prepared::path_for(&cpu_art)).expect("cpu file");
    check(&cpu_file, "written for profile 'backend cpu");
    std::fs::write(prepared::path_for(&cpu_art), &good).expect("write");
    let e = refusal(&cpu_art, &cpu);
    assert!(e.contains("written for profile 'backend cuda; upload layout") && e.contains("cpu.kiln.weights"), "{e}");
    // Stale: the checkpoint rewritten with other values since the file was written.
    std::fs::write(&pp, &good).expect("restore");
    assert!(prepared::store_for_artifact(&art, &p, None, LoadOptions::default()).is_ok());
    let st = ckpt.join("model.safetensors");
    let mut w = std::fs::read(&st).expect("checkpoint");
    let last = w.len() - 3;
    w[last] ^= 0x40;
    std::fs::write(&st, &w).expect("rewrite checkpoint");
    let e = refusal(&art, &p);
    assert!(e.contains(&name) && e.contains("stale: the checkpoint") && e.contains("model.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn kiln(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `kiln compile --backend cuda` writes the file (not with `--no-prepared`); `inspect` says a
/// load maps it, uploads, converts none and compiles none; `run` reads it (a corrupt one fails
/// the run by name before any GPU is needed).
#[test]
fn cli_writes_reports_and_reads_it() {
    if !nvrtc() {
        return;
    }
    let dir = scratch("cli");
    let case = gemma_case("gemma2_gqa");
    let art = dir.join("g.kiln");
    let a = art.to_str().expect("utf-8");
    let compile = ["compile", case.to_str().expect("utf-8"), "--backend", "cuda", "--dtype", "bf16", "--seq-len", "6", "-o", a];
    let (ok, out) = kiln(&compile);
    assert!(ok, "{out}");
    let pp = prepared::path_for(&art);
    assert!(out.contains("prepared weights: ") && out.contains("weights as the upload sends them") && pp.is_file(), "{out}");
    let p = kiln_graph::artifact::load_file(&art).expect("artifact");
    let bytes: usize = p.weights.iter().map(|w| w.ty.bytes()).sum();
    let (ok, out) = kiln(&["inspect", a]);
    assert!(ok, "{out}");
    let want = format!("== load\nmap {}, upload {bytes} bytes, convert none, compile none (on sm_90a)", pp.display());
    assert!(out.contains(&want), "want '{want}' in\n{out}");
    let (ok, out) = kiln(&["inspect", a, "--no-prepared"]);
    assert!(ok && out.contains("weights: map the checkpoint") && !out.contains("convert none, compile none"), "{out}");
    let inputs = case.join("inputs.safetensors");
    let res = dir.join("out.safetensors");
    let mut corrupt = std::fs::read(&pp).expect("prepared");
    *corrupt.last_mut().expect("bytes") ^= 1;
    std::fs::write(&pp, &corrupt).expect("write");
    let run = ["run", a, "--inputs", inputs.to_str().expect("utf-8"), "--out", res.to_str().expect("utf-8")];
    let (ok, out) = kiln(&run);
    assert!(!ok && out.contains(&pp.display().to_string()) && out.contains("checksum mismatch"), "{out}");
    let (ok, out) = kiln(&["inspect", a]);
    assert!(ok && out.contains("weights: a load fails: ") && out.contains("checksum mismatch"), "{out}");
    let no = ["compile", case.to_str().expect("utf-8"), "--backend", "cuda", "--seq-len", "6", "--no-prepared", "-o", a];
    let (ok, out) = kiln(&no);
    assert!(ok && !out.contains("prepared weights:") && !pp.exists(), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The host side of a cuda load, timed (not a test: `--ignored`, prints only): the weights'
/// upload bytes made and copied into one 32 MiB staging buffer (as the pinned ring's host
/// copies do, here sequential), from the checkpoint (stacks concatenated, conversion where the
/// dtype differs) against from the prepared file (mapped, every checksum verified). No GPU:
/// the copy to the device is not in it. `KILN_BENCH_MODEL` names the checkpoint folder,
/// `KILN_BENCH_DTYPE` the program's dtype (bf16, default, or f32).
#[test]
#[ignore]
fn host_side_load_time() {
    let Some(model) = std::env::var_os("KILN_BENCH_MODEL").map(PathBuf::from) else {
        eprintln!("KILN_BENCH_MODEL not set");
        return;
    };
    let dtype = match std::env::var("KILN_BENCH_DTYPE").as_deref() {
        Ok("f32") => DType::F32,
        _ => DType::BF16,
    };
    let dir = scratch("bench");
    let p = program(&model, "cuda", dtype, Some(128));
    let t = std::time::Instant::now();
    let art = save(&p, &dir, "bench");
    let size = std::fs::metadata(prepared::path_for(&art)).expect("prepared").len();
    println!("prepared file: {size} bytes written in {:.2} s", t.elapsed().as_secs_f64());
    let stage = |store: &WeightStore| {
        let mut buf = vec![0u8; 32 << 20];
        for i in 0..p.weights.len() {
            let b = cuda::upload_bytes(&p, store, i).expect("bytes");
            for c in b.chunks(buf.len()) {
                buf[..c.len()].copy_from_slice(c);
            }
        }
        std::hint::black_box(&buf);
    };
    let from_checkpoint = || {
        let t = std::time::Instant::now();
        let store = WeightStore::for_program(&p, None).expect("checkpoint");
        stage(&store);
        t.elapsed().as_secs_f64()
    };
    let from_prepared = || {
        let t = std::time::Instant::now();
        let (store, _) = prepared::store_for_artifact(&art, &p, None, LoadOptions::default()).expect("prepared");
        let verified = t.elapsed().as_secs_f64();
        stage(&store);
        (t.elapsed().as_secs_f64(), verified)
    };
    // The sides alternate which goes first.
    for round in 0..4 {
        let (plain, (mapped, verified)) = if round % 2 == 0 {
            (from_checkpoint(), from_prepared())
        } else {
            let m = from_prepared();
            (from_checkpoint(), m)
        };
        let first = if round % 2 == 0 { "checkpoint" } else { "prepared" };
        println!(
            "round {round} ({dtype}, {first} first): checkpoint path {plain:.2} s; prepared path {mapped:.2} s (open + checksums {verified:.2} s); ratio {:.2}",
            plain / mapped
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
