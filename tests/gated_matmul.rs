//! `Op::GatedMatMul` (the `gated_matmul` pass, issue 16): a GLU's gate and up products and
//! `gelu_tanh(gate) * up` as one step. On cpu (`cpu.gemm_gated`) the fused step must give the
//! unfused steps' bits (the same graph compiled without the pass, run on the same inputs and
//! weights), f32 and bf16 checkpoints (the kernel reads bf16 panels), in both forms the
//! standard pipeline leaves (two matmuls; one stacked matmul and a region), and agree with the
//! interpreter (the oracle; its products are accumulated in f64); the same on cube
//! (`cube.gated_matmul`, any number of rows). On cuda (no GPU here): the
//! pass applies to decode's rows (kiln's GEMV computes both products) and not to prefill's.

use kiln::io;
use kiln_graph::interp::Value;
use kiln_graph::passes::Pipeline;
use kiln_graph::program::Program;
use kiln_graph::{DType, Graph, Op, TensorType, UnaryOp};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::collections::HashMap;
use std::sync::Arc;

/// `down(gelu_tanh(x @ gate^T) * (x @ up^T))` for `x` of `shape` (last axis `k`), gate and up
/// `[f, k]`, down `[k, f]`, as Gemma's MLP.
fn mlp(shape: &[usize], f: usize, dt: DType) -> Graph {
    let k = *shape.last().unwrap();
    let mut g = Graph::new();
    let x = g.input("x", dt, shape).unwrap();
    let wg = g.weight("mlp/gate_proj", dt, &[f, k]).unwrap();
    let wu = g.weight("mlp/up_proj", dt, &[f, k]).unwrap();
    let wd = g.weight("mlp/down_proj", dt, &[k, f]).unwrap();
    let gate = g.matmul(x, wg, true).unwrap();
    let up = g.matmul(x, wu, true).unwrap();
    let act = g.push(Op::Unary(UnaryOp::GeluTanh), &[gate]).unwrap();
    let h = g.mul(act, up).unwrap();
    let y = g.matmul(h, wd, true).unwrap();
    g.output("y", y);
    g.output("h", h);
    g
}

fn vals(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) * 0.013).collect()
}

fn bf16_tensor(shape: &[usize], v: &[f32]) -> Tensor {
    let bytes = v.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect();
    Tensor { ty: TensorType::new(DType::BF16, shape), bytes }
}

/// A checkpoint with the three weights (bf16 when `bf16`), and their values as f64.
fn store(k: usize, f: usize, bf16: bool, tag: &str) -> (Arc<WeightStore>, HashMap<String, Value>) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gated_matmul_{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let (mut ts, mut ws) = (Vec::new(), HashMap::new());
    for (i, (name, shape)) in [("mlp/gate_proj", [f, k]), ("mlp/up_proj", [f, k]), ("mlp/down_proj", [k, f])].into_iter().enumerate() {
        let mut v = vals(f * k, i + 1);
        if bf16 {
            v.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        }
        let t = if bf16 { bf16_tensor(&shape, &v) } else { Tensor::from_f32(&shape, &v) };
        ts.push((name.to_string(), t));
        let ty = TensorType::new(DType::F32, shape);
        ws.insert(name.to_string(), Value::new(ty, v.iter().map(|&x| x as f64).collect()).unwrap());
    }
    io::write(&path, &ts).unwrap();
    (Arc::new(WeightStore::open(&path).unwrap()), ws)
}

/// Outputs of `g` (standard pipeline, then the gated pass where `gated`) on `backend`, and
/// the steps' op names; `None` for the outputs with `run` false (lowering only).
fn compile_run(
    g: &Graph,
    backend: &str,
    gated: bool,
    weights: Option<Arc<WeightStore>>,
    x: &Tensor,
) -> (Option<HashMap<String, Vec<f32>>>, Vec<String>) {
    let b = kiln_runtime::by_name(backend).unwrap();
    let mut opt = Pipeline::standard().run(g, None).unwrap();
    if gated {
        let accept = |op: &Op, i: &[TensorType], o: &TensorType| b.kernel_for(op, i, o).is_ok_and(|k| !b.interpreted(&k));
        opt = kiln_graph::passes::gated_matmul(&opt, &accept).unwrap();
    }
    let mut program = Program::new("gated", backend, "");
    let namer = |op: &Op, i: &[TensorType], o: &TensorType| b.kernel_for(op, i, o).unwrap();
    let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
    let ops = entry.steps.iter().map(|s| format!("{} {}", s.op.name(), s.kernel)).collect();
    program.entries.push(entry);
    let Some(weights) = weights else { return (None, ops) };
    let mut s = Session::new(program, weights).unwrap();
    let out = s.run("forward", &[("x", x)]).unwrap().into_iter().map(|(n, t)| (n, t.to_f32())).collect();
    (Some(out), ops)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// (x's shape, f, whether stack_projections stacks gate and up): one row (decode), a few rows,
/// whole arena blocks (prefill), a partial panel of columns, K above the kernel's K block.
const CASES: &[(&[usize], usize, bool)] = &[
    (&[1, 64], 96, false),
    (&[1, 1, 64], 96, false),
    (&[5, 48], 96, false),
    (&[64, 64], 96, true),
    (&[40, 80], 200, true),
    (&[3, 1300], 64, true),
];

/// On `backend`, for every case: one gated step of `kernel` in place of the unfused steps
/// (one step fewer), the unfused steps' bits, and the interpreter's values.
fn gated_step_gives_the_unfused_bits(backend: &str, kernel: &str) {
    for bf16 in [false, true] {
        for (i, &(shape, f, stacked)) in CASES.iter().enumerate() {
            let k = *shape.last().unwrap();
            let tag = format!("{backend}_{i}_{bf16}");
            let (weights, ws) = store(k, f, bf16, &tag);
            let g = mlp(shape, f, DType::F32);
            let xv = vals(shape.iter().product(), 7);
            let x = Tensor::from_f32(shape, &xv);
            let (fused, ops) = compile_run(&g, backend, true, Some(weights.clone()), &x);
            let (plain, plain_ops) = compile_run(&g, backend, false, Some(weights), &x);
            let gated: Vec<&String> = ops.iter().filter(|o| o.starts_with("gated_matmul")).collect();
            assert_eq!(gated, [&format!("gated_matmul {kernel}")], "{tag}: {ops:?}");
            assert_eq!(ops.len() + 1, plain_ops.len(), "{tag}: {ops:?} vs {plain_ops:?}");
            assert_eq!(plain_ops.iter().any(|o| o.starts_with("fused")), stacked, "{tag}: {plain_ops:?}");
            let (fused, plain) = (fused.unwrap(), plain.unwrap());
            for name in ["h", "y"] {
                assert_eq!(bits(&fused[name]), bits(&plain[name]), "{tag}: {name}");
            }
            // The oracle: the interpreter on the same values.
            let xi = Value::new(TensorType::new(DType::F32, shape), xv.iter().map(|&v| v as f64).collect()).unwrap();
            let want = kiln_graph::interp::run(&g, &HashMap::from([("x".to_string(), xi)]), &ws).unwrap();
            // f32 against f64 sums: within 1e-4 of the tensor's largest magnitude (the down
            // projection's sums cancel).
            for name in ["h", "y"] {
                let scale = want[name].data.iter().fold(1f64, |m, v| m.max(v.abs()));
                for (j, (&a, &b)) in fused[name].iter().zip(&want[name].data).enumerate() {
                    assert!((a as f64 - b).abs() <= 1e-4 * scale, "{tag}: {name}[{j}] {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn cpu_gated_step_gives_the_unfused_bits() {
    gated_step_gives_the_unfused_bits("cpu", "cpu.gemm_gated");
}

/// On cube (lavapipe here): one `cube.gated_matmul` launch for any number of rows, decode's two
/// matmuls and prefill's stacked matmul and region alike.
#[cfg(feature = "cube")]
#[test]
fn cube_gated_step_gives_the_unfused_bits() {
    gated_step_gives_the_unfused_bits("cube", "cube.gated_matmul");
}

/// The cuda lowering (no GPU needed): one GEMV launch for decode's gate, up and GLU; prefill's
/// rows (more than the GEMV's 8) keep the stacked GEMM and the region.
#[cfg(feature = "cuda")]
#[test]
fn cuda_takes_the_gated_node_for_few_rows() {
    let x = Tensor::from_f32(&[1], &[0.0]);
    let (_, ops) = compile_run(&mlp(&[1, 64], 96, DType::BF16), "cuda", true, None, &x);
    let gated: Vec<&String> = ops.iter().filter(|o| o.starts_with("gated_matmul")).collect();
    assert_eq!(gated, ["gated_matmul gemv_glu_bf16"], "{ops:?}");
    let (_, ops) = compile_run(&mlp(&[64, 64], 96, DType::BF16), "cuda", true, None, &x);
    assert!(!ops.iter().any(|o| o.starts_with("gated_matmul")), "{ops:?}");
    // f32 (no GLU GEMV) keeps the two GEMMs.
    let (_, ops) = compile_run(&mlp(&[1, 64], 96, DType::F32), "cuda", true, None, &x);
    assert!(!ops.iter().any(|o| o.starts_with("gated_matmul")), "{ops:?}");
}

/// The decode MLP's launches on cuda: the gated step is one launch (no load option makes it
/// more), and the GLU GEMVs compile with NVRTC for sm_90a without spilling.
#[cfg(feature = "cuda")]
#[test]
fn cuda_gated_step_is_one_launch_and_compiles_without_spills() {
    let cuda = kiln_runtime::by_name("cuda").unwrap();
    let g = mlp(&[1, 64], 96, DType::BF16);
    let accept = |op: &Op, i: &[TensorType], o: &TensorType| cuda.kernel_for(op, i, o).is_ok();
    let opt = kiln_graph::passes::gated_matmul(&Pipeline::standard().run(&g, None).unwrap(), &accept).unwrap();
    let mut program = Program::new("gated", "cuda", "");
    let namer = |op: &Op, i: &[TensorType], o: &TensorType| cuda.kernel_for(op, i, o).unwrap();
    let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
    program.entries.push(entry);
    let launches = cuda.launches(&program, 0).unwrap();
    let at = program.entries[0].steps.iter().position(|s| s.op.name() == "gated_matmul").unwrap();
    assert_eq!(launches[at], 1);
    // The gated step and the down projection.
    assert_eq!(launches.iter().sum::<usize>(), 2, "{launches:?}");
    if !kiln_kernels::cuda::nvrtc::available() {
        assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "KILN_REQUIRE_NVRTC=1 but NVRTC is missing");
        return;
    }
    let m = kiln_kernels::cuda::gemv::gemv_module();
    let c = kiln_kernels::cuda::nvrtc::compile(&m.name, &m.source, "sm_90a").unwrap();
    for k in ["gemv_glu_bf16", "gemv_glu_f16"] {
        let (_, r) = c.kernels.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("{k} missing: {:?}", c.kernels));
        assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{k}: {r:?}");
    }
    assert!(!kiln_runtime::cuda::compile_binaries(&program, "sm_90a").unwrap().is_empty());
}

/// A program holding the op is artifact format version 7 (older kilns refuse it by version);
/// the same program without the pass stays at the version it had.
#[test]
fn a_gated_program_is_format_version_7() {
    let cpu = kiln_runtime::by_name("cpu").unwrap();
    let version = |gated: bool| {
        let mut opt = Pipeline::standard().run(&mlp(&[1, 64], 96, DType::F32), None).unwrap();
        if gated {
            opt = kiln_graph::passes::gated_matmul_everywhere(&opt).unwrap();
        }
        let mut program = Program::new("gated", "cpu", "");
        let namer = |op: &Op, i: &[TensorType], o: &TensorType| cpu.kernel_for(op, i, o).unwrap();
        let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
        program.entries.push(entry);
        kiln_graph::artifact::version_for(&program)
    };
    assert_eq!(version(true), 7);
    assert!(version(false) < 7);
}
