//! The cuda backend's programs run on the CPU (`KILN_CUDA_EMULATE=1`,
//! `kiln_runtime::cuda::emulate`): the same lowering, fusions and launches as on a GPU, with
//! kiln's CUDA C kernels and generated regions compiled by the host's C++ compiler against
//! `kiln_kernels::cuda::host`'s shim, and cuBLASLt's GEMMs computed on the host. What a GPU
//! run checks first (scripts/device_cuda.sh) is checked here: the tiny Gemma 2's generation
//! program (prefill and decode on two rows, one left-padded) against the interpreter, every
//! output and every cache; the kernels of sessions without a GPU among them (the joined
//! `write_rows_*_x2`, the decode attention storing the new K/V rows, the token chosen with its
//! log-probability in one launch). Skipped, with a message, where no C++ compiler is found
//! (`KILN_REQUIRE_CXX=1` makes that a failure).
#![cfg(feature = "cuda")]

mod common;

use kiln_graph::program::Program;

/// Whether the host can build kernels; every test here loads through the emulator.
fn emulated() -> bool {
    std::env::set_var(kiln_runtime::cuda::emulate::ENV, "1");
    if kiln_kernels::cuda::host::available() {
        return true;
    }
    assert!(std::env::var("KILN_REQUIRE_CXX").map_or(true, |v| v != "1"), "KILN_REQUIRE_CXX=1 but no C++ compiler was found");
    eprintln!("skipped: no C++ compiler for the host emulation of the cuda kernels");
    false
}

/// The steps of entry `name` whose kernel starts with `prefix`.
fn steps_with(p: &Program, name: &str, prefix: &str) -> usize {
    let e = p.entries.iter().find(|e| e.name == name).unwrap();
    e.steps.iter().filter(|s| s.kernel.starts_with(prefix)).count()
}

#[test]
fn gemma2_two_rows_on_emulated_cuda_match_the_interpreter() {
    if !emulated() {
        return;
    }
    common::gemma2_two_rows::gemma2_two_rows_match_the_interpreter("cuda", |p| {
        // The program is the cuda lowering's: cache writes, rotations and the GLU GEMV in it.
        assert!(steps_with(p, "decode", "write_rows_") >= 2, "decode writes its cache rows");
        assert!(steps_with(p, "decode", "fused_rot_") >= 2, "RoPE as one elementwise kernel");
        assert!(steps_with(p, "prefill", "write_rows_") >= 2, "prefill writes its rows in place");
    });
}

/// The same in bf16, the dtype kiln compiles real Gemma checkpoints in: the GLU GEMV
/// (`gemv_glu_bf16`) and the bf16 GEMVs take the MLP and projections. The interpreter rounds
/// every op's result to bf16 where the fused kernels round once, hence the wider bound.
#[test]
fn gemma2_two_rows_in_bf16_on_emulated_cuda_match_the_interpreter() {
    if !emulated() {
        return;
    }
    common::gemma2_two_rows::gemma2_two_rows_in("cuda", kiln_graph::DType::BF16, 3e-2, |p| {
        assert!(steps_with(p, "decode", "gemv_glu_") >= 2, "the MLP as one GLU GEMV");
    });
}

/// A random-weight Gemma 2 (bf16) at sizes that take the paths of the real model the tiny
/// fixture cannot: head dim 64 (the tensor-core prefill, `attn_mma_*`), and K/V rows of whole
/// arena blocks (128 bf16 columns: decode's Q, K and V as one GEMM and its cache writes inside
/// the split attention).
fn gemma2_mid(tag: &str) -> std::path::PathBuf {
    use kiln_models::gemma::{gemma2_config, Gemma2Sizes};
    let sizes = Gemma2Sizes {
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
    };
    let mut config = gemma2_config(&sizes);
    config["dtype"] = serde_json::json!("bfloat16");
    config["query_pre_attn_scalar"] = 64.into();
    let recipe = kiln_models::registry::SynthRecipe {
        config,
        dtype: kiln_graph::DType::BF16,
        format: kiln_models::registry::WeightFormat::Safetensors,
        roots: &[""],
        given: Vec::new(),
        batch: 1,
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda_emulated_gemma2_mid_{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    kiln::synth::synth_folder(&kiln_models::gemma::FAMILY, &recipe, &dir, 7, false).unwrap();
    dir
}

/// The mid-size Gemma 2 in bf16: a 64-token prompt bucket (one tensor-core query tile) on two
/// rows, one left-padded, and three decode steps, against the interpreter.
#[test]
fn gemma2_mid_in_bf16_on_emulated_cuda_match_the_interpreter() {
    if !emulated() {
        return;
    }
    let dir = gemma2_mid("bf16");
    let ids = common::gemma2_two_rows::prompt_ids(64, 512);
    common::gemma2_two_rows::gemma2_two_rows_of(&dir, &ids, "cuda", kiln_graph::DType::BF16, 3e-2, |p| {
        assert!(steps_with(p, "prefill", "attn_mma_") >= 2, "the tensor-core prefill");
        // Its launches store the prompt's K/V rows (`lower::kv_prefill`), and Q's planes are
        // read through strides by q's rotation (`lower::permute`): steps absorbed into others.
        let absorbed = absorbed(p, "prefill");
        assert!(kinds(p, "prefill", &absorbed).contains(&"write_slice".to_string()), "{absorbed:?}");
        assert!(kinds(p, "prefill", &absorbed).contains(&"permute".to_string()), "{absorbed:?}");
    });
}

/// (absorbed step, the step whose launch does it) of entry `name` as a load lowers it.
fn absorbed(p: &Program, name: &str) -> Vec<(usize, usize)> {
    let i = p.entries.iter().position(|e| e.name == name).unwrap();
    kiln_runtime::by_name("cuda").unwrap().absorbed_steps(p, i).unwrap()
}

/// The ops of the absorbed steps.
fn kinds(p: &Program, name: &str, absorbed: &[(usize, usize)]) -> Vec<String> {
    let e = p.entries.iter().find(|e| e.name == name).unwrap();
    absorbed.iter().map(|&(s, _)| e.steps[s].op.name().to_string()).collect()
}

/// Batch 1, the real model's decode: Q, K and V as one GEMM (each slice whole arena blocks),
/// and the split attention as one launch that stores the new K/V rows (`attn_rows1_new_*`)
/// over a cache of 128 + 3 rows (three splits).
#[test]
fn gemma2_mid_one_row_on_emulated_cuda_matches_the_interpreter() {
    if !emulated() {
        return;
    }
    let dir = gemma2_mid("one_row");
    let ids = common::gemma2_two_rows::prompt_ids(128, 512);
    common::gemma2_two_rows::gemma2_rows_of(&dir, 1, &ids[..128], "cuda", kiln_graph::DType::BF16, 3e-2, |p| {
        let e = p.entries.iter().find(|e| e.name == "decode").unwrap();
        let qkv = e.steps.iter().filter(|s| s.output.ty.shape.len() == 3 && s.output.ty.shape[0] == 4).count();
        assert!(qkv >= 2, "decode's Q, K and V as one [4, 1, 128] product per layer");
        let absorbed = absorbed(p, "decode");
        assert!(kinds(p, "decode", &absorbed).iter().filter(|k| *k == "write_slice").count() >= 4, "{absorbed:?}");
    });
}
