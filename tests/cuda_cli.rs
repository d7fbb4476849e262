//! The cuda backend's command line on a machine without a GPU: `kiln kernels check` compiles
//! every kernel with NVRTC, `kiln compile --backend cuda` stores CUBINs in the artifact (and
//! `kiln inspect` shows the kernel of each step), and running needs a driver, which a machine
//! without one reports clearly.
#![cfg(feature = "cuda")]

mod common;

use common::nvrtc;
use std::process::Command;

fn kiln(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn no_gpu() -> bool {
    kiln_runtime::cuda::driver_check().is_err()
}

const FIXTURE: &str = "tests/fixtures/siglip/vision_map";

#[test]
fn kernels_check_compiles_everything_for_sm_90a() {
    if !nvrtc() {
        return;
    }
    let (ok, out) = kiln(&["kernels", "check", "--arch", "sm_90a", "--model", FIXTURE]);
    assert!(ok, "{out}");
    // The prefill's variants (issue 15) are checked too: hot, so a spill in one fails.
    for k in [
        "attn_mma_bf16_d72",
        "attn_mma_bf16_d72_q128_s3_np_vs",
        "attn_mma_f16_d72_q128_k32",
        "attn_rows_f32",
        "layer_norm_bf16",
        "copy_b2",
        "fused_",
    ] {
        assert!(out.contains(k), "{k} missing from\n{out}");
    }
    assert!(out.contains("0 compile errors; 0 hot kernels spill"), "{out}");
}

#[test]
fn compile_stores_cubins_and_inspect_shows_the_lowering() {
    if !nvrtc() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-cuda-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let art = dir.join("m.kiln");
    let (ok, out) = kiln(&["compile", FIXTURE, "--backend", "cuda", "--arch", "sm_90a", "-o", art.to_str().unwrap()]);
    assert!(ok, "{out}");
    let p = kiln_graph::artifact::load_file(&art).unwrap();
    assert_eq!(p.backend, "cuda");
    assert!(
        p.binaries.iter().any(|b| b.name == "attention" && b.arch == "sm_90a" && b.code.len() > 1000),
        "{:?}",
        p.binaries.iter().map(|b| &b.name).collect::<Vec<_>>()
    );
    assert!(p.binaries.iter().any(|b| b.name.starts_with("fused_")));
    let kernels: Vec<&str> = p.entries[0].steps.iter().map(|s| s.kernel.as_str()).collect();
    assert!(kernels.iter().any(|k| k.starts_with("cublaslt.gemm_f32")), "{kernels:?}");
    assert!(kernels.contains(&"attn_rows_f32"), "{kernels:?}");
    let (ok, out) = kiln(&["inspect", FIXTURE, "--backend", "cuda", "--dtype", "bf16"]);
    assert!(ok, "{out}");
    assert!(out.contains("attn_mma_bf16_d") || out.contains("attn_rows_bf16"), "{out}");
    assert!(out.contains("cublaslt.gemm_bf16"), "{out}");
    if no_gpu() {
        let inputs = format!("{FIXTURE}/inputs.safetensors");
        let res = dir.join("out.safetensors");
        let (ok, out) = kiln(&["run", art.to_str().unwrap(), "--weights", FIXTURE, "--inputs", &inputs, "--out", res.to_str().unwrap()]);
        assert!(!ok);
        assert!(out.contains("backend cuda: no NVIDIA driver"), "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kiln compile --backend cuda` reads the tuning table (the built-in one, a file, or none),
/// validates it before any NVRTC work and stores its entries in the artifact (format 5); a
/// malformed table is a clear error naming the file and entry, and `--tuning` where it
/// cannot apply is refused.
#[test]
fn compile_reads_validates_and_stores_the_tuning_table() {
    if !nvrtc() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-cuda-tuning-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let art = dir.join("m.kiln");
    let table = dir.join("table.json");
    let entry = r#"{"card": "NVIDIA H200", "kernel": "gemm", "shape": "4x1152x1152 F32 tb", "choice": "cublaslt:2", "us": 3.5}"#;
    std::fs::write(&table, format!(r#"{{"format": "kiln-tuning", "version": 1, "entries": [{entry}]}}"#)).unwrap();
    let (a, t) = (art.to_str().unwrap(), table.to_str().unwrap());
    let (ok, out) = kiln(&["compile", FIXTURE, "--backend", "cuda", "--tuning", t, "-o", a]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("tuning table {t}: 1 entries for NVIDIA H200")), "{out}");
    let p = kiln_graph::artifact::load_file(&art).unwrap();
    assert_eq!(p.tuning.len(), 1);
    assert_eq!((p.tuning[0].choice.as_str(), p.tuning[0].us), ("cublaslt:2", Some(3.5)));
    assert_eq!(std::fs::read(&art).unwrap()[8..12], 5u32.to_le_bytes());
    // The built-in table (tuning/cuda.json) is valid; empty until a device run fills it.
    let (ok, out) = kiln(&["compile", FIXTURE, "--backend", "cuda", "-o", a]);
    assert!(ok, "{out}");
    assert!(out.contains("built-in tuning table"), "{out}");
    let builtin = kiln_graph::tuning::TuningTable::parse(include_str!("../tuning/cuda.json"), "cuda.json").unwrap();
    assert_eq!(kiln_graph::artifact::load_file(&art).unwrap().tuning, builtin.entries);
    // A malformed table fails the compile and leaves no artifact.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, format!(r#"{{"format": "kiln-tuning", "version": 1, "entries": [{entry}, {entry}]}}"#)).unwrap();
    let fresh = dir.join("never.kiln");
    let (ok, out) = kiln(&["compile", FIXTURE, "--backend", "cuda", "--tuning", bad.to_str().unwrap(), "-o", fresh.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("bad.json: entry 1: a second entry for card \"NVIDIA H200\""), "{out}");
    assert!(!fresh.exists());
    // An attention entry naming a variant this build lacks for the shape is refused by entry.
    let attn = |choice: &str| {
        format!(r#"{{"card": "NVIDIA H200", "kernel": "attention", "shape": "32x256x16x72 kv 256x16 BF16 none", "choice": "{choice}"}}"#)
    };
    std::fs::write(&bad, format!(r#"{{"format": "kiln-tuning", "version": 1, "entries": [{entry}, {}]}}"#, attn("q128"))).unwrap();
    let (ok, out) = kiln(&["compile", FIXTURE, "--backend", "cuda", "--tuning", bad.to_str().unwrap(), "-o", fresh.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("bad.json: entry 1: attention variant \"q128\" does not exist for BF16 head dim 72"), "{out}");
    assert!(!fresh.exists());
    std::fs::write(&bad, format!(r#"{{"format": "kiln-tuning", "version": 1, "entries": [{}]}}"#, attn("q128_s3"))).unwrap();
    let with_attn = dir.join("attn.kiln");
    let (ok, out) = kiln(&["compile", FIXTURE, "--backend", "cuda", "--tuning", bad.to_str().unwrap(), "-o", with_attn.to_str().unwrap()]);
    assert!(ok, "{out}");
    let p = kiln_graph::artifact::load_file(&with_attn).unwrap();
    assert_eq!(p.tuning[0].choice, "q128_s3");
    // This fixture has no head dim 72: no variant module is compiled into the artifact.
    assert!(
        !p.binaries.iter().any(|b| b.name.starts_with("attention_var")),
        "{:?}",
        p.binaries.iter().map(|b| &b.name).collect::<Vec<_>>()
    );
    let (ok, out) = kiln(&["compile", FIXTURE, "--tuning", t, "-o", fresh.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("--tuning applies to the cuda backend, not cpu"), "{out}");
    let (ok, out) = kiln(&["inspect", a, "--tuning", t]);
    assert!(!ok);
    assert!(out.contains("--tuning"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kiln compile --generate --backend cuda` stores a CUBIN of every module the prefill and the
/// decode launch, as a forward compile does, so a load on that architecture compiles nothing
/// (the load plan, from the lowering of every step, says so, and `kiln inspect` prints it); an
/// artifact lacking one is reported with the module that NVRTC would compile at load.
#[test]
fn generation_artifacts_hold_every_cubin() {
    if !nvrtc() {
        return;
    }
    use kiln_runtime::cuda::plan::kernel_plan;
    let dir = std::env::temp_dir().join(format!("kiln-cuda-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (art, fwd) = (dir.join("g.kiln"), dir.join("f.kiln"));
    let case = "tests/fixtures/gemma/gemma2_gqa";
    let args = ["--backend", "cuda", "--arch", "sm_90a", "--seq-len", "6"];
    let (ok, out) = kiln(&[&["compile", case, "--generate", "--max-new-tokens", "4", "-o", art.to_str().unwrap()][..], &args].concat());
    assert!(ok, "{out}");
    let (ok, out) = kiln(&[&["compile", case, "-o", fwd.to_str().unwrap()][..], &args].concat());
    assert!(ok, "{out}");
    let p = kiln_graph::artifact::load_file(&art).unwrap();
    assert_eq!(p.entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["prefill", "decode"]);
    // Each entry alone launches fused regions, and every one is stored.
    for e in &p.entries {
        let mut one = p.clone();
        one.entries.retain(|x| x.name == e.name);
        let regions = kiln_runtime::cuda::lower::regions(&one).unwrap();
        assert!(!regions.is_empty(), "{}: no fused region", e.name);
        for r in regions {
            assert!(p.binaries.iter().any(|b| b.name == r.name && b.arch == "sm_90a"), "{}: no CUBIN of {}", e.name, r.name);
            // Each region's module holds the entry that runs two steps as one launch.
            assert!(r.source.contains(&format!("{}_x2(const FusedParams2 p)", r.name)), "{}", r.source);
        }
    }
    // K's and V's cache writes run inside decode's attention launch (`lower::kv_write`), and
    // inspect says so; prefill's (its prompt rows, written in place) are one `_x2` launch.
    let (ok, out) = kiln(&["inspect", art.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (prefill, decode) = out.split_once("entry decode:").unwrap_or_else(|| panic!("no decode entry:\n{out}"));
    let absorbed = decode.lines().filter(|l| l.contains("write_rows_b") && l.contains("_i64") && l.contains("runs in step")).count();
    let hosts = decode.lines().filter(|l| l.contains("attn_rows_") && l.contains("[computes steps")).count();
    assert_eq!((absorbed, hosts), (8, 4), "two writes in one attention per layer of the fixture's four:\n{out}");
    let pairs = prefill.lines().filter(|l| l.contains("write_rows_b") && l.contains("_i64 x2: with step")).count();
    assert_eq!(pairs, 4, "prefill: K's and V's writes as one launch per layer:\n{out}");
    for (path, program) in [(&art, p.clone()), (&fwd, kiln_graph::artifact::load_file(&fwd).unwrap())] {
        let plan = kernel_plan(&program, "sm_90a").unwrap();
        // The hand-written modules the entries launch, and fused regions of their own.
        let fixed = ["attention", "data", "index", "norm"].iter().all(|m| plan.needed.contains(*m));
        let fused = plan.needed.iter().any(|m| m.starts_with("fused_"));
        assert!(plan.compiles_none() && fixed && fused, "{}: {plan:?}", path.display());
        assert!(!kernel_plan(&program, "sm_100a").unwrap().compiles_none(), "no CUBIN for sm_100a was stored");
        let (ok, out) = kiln(&["inspect", path.to_str().unwrap()]);
        assert!(ok, "{out}");
        let want = format!("kernels on sm_90a: load {} modules as stored CUBINs; compile none", plan.needed.len());
        // `kiln compile` wrote the cuda prepared file: a load maps it and converts nothing.
        let mapped = format!("== load\nmap {}.weights, upload ", path.display());
        assert!(out.contains(&mapped) && out.contains("convert none, compile none (on sm_90a)") && out.contains(&want), "{out}");
    }
    // One decode region's CUBIN removed: the plan names it, and inspect says NVRTC compiles it.
    let mut decode = p.clone();
    decode.entries.retain(|e| e.name == "decode");
    let gone = kiln_runtime::cuda::lower::regions(&decode).unwrap().remove(0).name;
    let mut lacking = p.clone();
    lacking.binaries.retain(|b| b.name != gone);
    let plan = kernel_plan(&lacking, "sm_90a").unwrap();
    assert_eq!(plan.missing.iter().collect::<Vec<_>>(), [&gone]);
    let short = dir.join("short.kiln");
    kiln_graph::artifact::save_file(&short, &lacking).unwrap();
    let (ok, out) = kiln(&["inspect", short.to_str().unwrap()]);
    assert!(ok && out.contains(&format!("compile 1 with NVRTC at load ({gone})")), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kiln inspect` of a cuda artifact whose tuning table names a prefill variant for So400m's
/// attention shape (head dim 72) prints, per card, the kernel that shape runs there; a load on
/// that card needs the variant module (the load plan counts it among the modules to compile,
/// the artifact holding no CUBIN).
#[test]
fn inspect_shows_the_tabled_attention_variant() {
    use kiln_graph::program::{Entry, Operand, Program, Slot, Step};
    use kiln_graph::tuning::TuningEntry;
    use kiln_graph::{Attention, DType, MaskKind, Op, TensorType};
    let x = [32, 256, 16, 72];
    let ty = TensorType::new(DType::BF16, x.to_vec());
    let operand = |at: usize| Operand { slot: Slot::Arena { offset: at * ty.bytes(), bytes: ty.bytes() }, ty: ty.clone() };
    let op = Op::Attention(Attention { scale: 72f32.powf(-0.5), softcap: None, mask: MaskKind::None });
    let kernel = kiln_runtime::cuda::lower::kernel_for(&op, &[ty.clone(), ty.clone(), ty.clone()], &ty).unwrap();
    let step = Step { node: 0, op, kernel, inputs: vec![operand(0), operand(1), operand(2)], output: operand(3) };
    let entry = Entry {
        name: "forward".into(),
        inputs: vec![],
        outputs: vec![],
        steps: vec![step],
        arena_bytes: 4 * ty.bytes(),
        plan: Default::default(),
    };
    let mut p = Program::new("so400m attention", "cuda", "");
    p.entries.push(entry);
    let shape = "32x256x16x72 kv 256x16 BF16 none";
    p.tuning = vec![TuningEntry {
        card: "NVIDIA H200".into(),
        kernel: "attention".into(),
        shape: shape.into(),
        choice: "q128_s3".into(),
        us: Some(60.0),
    }];
    let dir = std::env::temp_dir().join(format!("kiln-cuda-attn-variant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let art = dir.join("a.kiln");
    kiln_graph::artifact::save_file(&art, &p).unwrap();
    let (ok, out) = kiln(&["inspect", art.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("attn_mma_bf16_d72 "), "the step stores the default kernel:\n{out}");
    assert!(out.contains(&format!("attention on NVIDIA H200: 1 step of {shape} run attn_mma_bf16_d72_q128_s3 (tuning table)")), "{out}");
    assert!(out.contains("attention_var_bf16"), "the load compiles the variant module:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
