//! Every CUDA kernel compiles for sm_90a with NVRTC, and no hot kernel spills.
//!
//! Needs libnvrtc (the `nvidia-cuda-nvrtc==13.0.88` wheel, found through LD_LIBRARY_PATH).
//! Without it the test passes with a note, unless `KILN_REQUIRE_NVRTC=1` (set by
//! scripts/test.sh), where a missing library is a failure.
#![cfg(feature = "cuda")]

use kiln_graph::{BinaryOp, DType, Expr, Instr, UnaryOp};
use kiln_kernels::cuda::{fused, modules, nvrtc};

fn nvrtc_or_skip() -> bool {
    if nvrtc::available() {
        return true;
    }
    let required = std::env::var("KILN_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(!required, "KILN_REQUIRE_NVRTC=1 but {}", nvrtc::INSTALL_HINT);
    eprintln!("skipped: {}", nvrtc::INSTALL_HINT);
    false
}

#[test]
fn every_module_compiles_for_sm_90a_without_hot_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    for m in modules() {
        let c = nvrtc::compile(&m.name, &m.source, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.cubin.len() > 1000, "{}: empty CUBIN", m.name);
        for k in &m.kernels {
            let (_, r) =
                c.kernels.iter().find(|(n, _)| *n == k.name).unwrap_or_else(|| panic!("{}: no ptxas report in\n{}", k.name, c.log));
            assert!(r.registers > 0, "{}: {r:?}", k.name);
            if k.hot {
                assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "hot kernel {} spills: {r:?}", k.name);
            }
        }
    }
}

#[test]
fn generated_regions_compile_for_every_dtype() {
    if !nvrtc_or_skip() {
        return;
    }
    // RoPE-like: x * cos + rotate * sin; a comparison and a select; a cast to i32.
    let rope = Expr {
        instrs: vec![
            Instr::Input(0),
            Instr::Input(1),
            Instr::Binary(BinaryOp::Mul, 0, 1),
            Instr::Input(2),
            Instr::Input(3),
            Instr::Binary(BinaryOp::Mul, 3, 4),
            Instr::Binary(BinaryOp::Add, 2, 5),
        ],
    };
    let select = Expr {
        instrs: vec![
            Instr::Input(0),
            Instr::Const(0.0),
            Instr::Binary(BinaryOp::Gt, 0, 1),
            Instr::Unary(UnaryOp::GeluTanh, 0),
            Instr::Const(f32::NEG_INFINITY),
            Instr::Select(2, 3, 4),
        ],
    };
    for d in [DType::F32, DType::BF16, DType::F16] {
        for (e, n, out) in [(&rope, 4, d), (&select, 1, d), (&select, 1, DType::Bool)] {
            let (name, src) = fused::source(e, &vec![d; n], out).unwrap();
            let c = nvrtc::compile(&name, &src, "sm_90a").unwrap_or_else(|e| panic!("{e}\n{src}"));
            assert!(c.kernels.iter().any(|(k, r)| *k == name && r.spill_stores == 0), "{:?}", c.kernels);
        }
    }
    let ids = Expr { instrs: vec![Instr::Input(0), Instr::Const(1.0), Instr::Binary(BinaryOp::Add, 0, 1)] };
    let (name, src) = fused::source(&ids, &[DType::I64], DType::I32).unwrap();
    nvrtc::compile(&name, &src, "sm_90a").unwrap_or_else(|e| panic!("{e}\n{src}"));
}
