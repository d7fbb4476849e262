//! The cuda backend's command line on a machine without a GPU: `kiln kernels check` compiles
//! every kernel with NVRTC, `kiln compile --backend cuda` stores CUBINs in the artifact (and
//! `kiln inspect` shows the kernel of each step), and running needs a driver, which a machine
//! without one reports clearly.
#![cfg(feature = "cuda")]

use std::process::Command;

fn kiln(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn nvrtc() -> bool {
    if kiln_kernels::cuda::nvrtc::available() {
        return true;
    }
    assert!(
        std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"),
        "KILN_REQUIRE_NVRTC=1: {}",
        kiln_kernels::cuda::nvrtc::INSTALL_HINT
    );
    false
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
    for k in ["attn_mma_bf16_d72", "attn_rows_f32", "layer_norm_bf16", "copy_b2", "fused_"] {
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
