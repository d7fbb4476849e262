//! The `residual_rms_norm` step against the unfused steps it replaces, on each f32 backend of
//! this build: the same graph compiled with the standard pipeline and with the pipeline
//! without the pass, run on the same inputs. The cpu kernel does the unfused kernels'
//! arithmetic in their order, so its outputs must be the same bits; the cube kernel must be
//! within f32 rounding (its shader compiler may contract the add with the norm's product; on
//! lavapipe it gave the same bits too).
//! Gemma 2's layer shape: two junctions, the first sum also read by the second add.

use kiln_graph::passes::{Pass, Pipeline};
use kiln_graph::program::Program;
use kiln_graph::{DType, Graph, Op, TensorType};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::sync::Arc;

/// Two Gemma 2 junctions on `[rows, d]` (inputs for the layer's projections' outputs).
fn layer(rows: usize, d: usize) -> Graph {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[rows, d]).unwrap();
    let rms = |g: &mut Graph, v, name: &str| {
        let w = g.input(name, DType::F32, &[d]).unwrap();
        g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[v, w]).unwrap()
    };
    let a = g.input("attn", DType::F32, &[rows, d]).unwrap();
    let a = rms(&mut g, a, "post_attn");
    let h = g.add(x, a).unwrap();
    let f = rms(&mut g, h, "pre_ffw");
    let f = g.unary(kiln_graph::UnaryOp::GeluTanh, f).unwrap();
    let f = rms(&mut g, f, "post_ffw");
    let h2 = g.add(h, f).unwrap();
    let n = rms(&mut g, h2, "final");
    g.output("n", n);
    g.output("h2", h2);
    g
}

fn inputs(g: &Graph) -> Vec<(String, Tensor)> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    g.inputs()
        .map(|(_, name, ty)| {
            let v: Vec<f64> = (0..ty.numel())
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * 3.0
                })
                .collect();
            (name.to_string(), Tensor { ty: ty.clone(), bytes: kiln_runtime::tensor::from_f64(ty.dtype, &v) })
        })
        .collect()
}

/// Outputs of `g` after `pipeline` on `backend`, by name, and the steps' ops.
fn run(g: &Graph, pipeline: &Pipeline, backend: &str, ins: &[(String, Tensor)]) -> (Vec<(String, Vec<f32>)>, Vec<String>) {
    let opt = pipeline.run(g, None).unwrap();
    let b = kiln_runtime::by_name(backend).unwrap();
    let mut program = Program::new("residual", backend, "");
    let namer = |op: &Op, i: &[TensorType], o: &TensorType| b.kernel_for(op, i, o).unwrap();
    let (entry, _, _) = kiln_graph::lower::compile_entry(&opt, "forward", &mut program, &namer).unwrap();
    let kernels = entry.steps.iter().map(|s| s.op.name().to_string()).collect();
    program.entries.push(entry);
    let mut s = Session::new(program, Arc::new(WeightStore::empty())).unwrap();
    let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out: Vec<(String, Vec<f32>)> =
        s.run("forward", &refs).unwrap().into_iter().map(|(n, t)| (n, bytemuck::cast_slice::<u8, f32>(&t.bytes).to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (out, kernels)
}

fn check(backend: &str, bitwise: bool) {
    let unfused = Pipeline::new(Pipeline::standard().passes.into_iter().filter(|p| p.name != Pass::RESIDUAL_RMS_NORM.name).collect());
    // d = 40 pads the halves (160-byte rows); 2304 is Gemma 2 2B's width.
    for (rows, d) in [(5, 40), (1, 2304), (7, 2304), (3, 256)] {
        let g = layer(rows, d);
        let ins = inputs(&g);
        let (fused, kernels) = run(&g, &Pipeline::standard(), backend, &ins);
        let (want, before) = run(&g, &unfused, backend, &ins);
        let junctions = kernels.iter().filter(|k| *k == "residual_rms_norm").count();
        assert_eq!(junctions, 2, "{backend} {rows}x{d}: {kernels:?}");
        assert_eq!(before.len() - kernels.len(), 4, "{backend} {rows}x{d}: {before:?} -> {kernels:?}");
        for ((name, got), (_, w)) in fused.iter().zip(&want) {
            if bitwise {
                let same = got.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same && got.len() == w.len(), "{backend} {rows}x{d} {name}: not the unfused bits");
            } else {
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = got.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                assert!(err < 1e-6, "{backend} {rows}x{d} {name}: error {err}");
            }
        }
    }
}

#[test]
fn cpu_gives_the_unfused_bits() {
    check("cpu", true);
}

#[cfg(feature = "cube")]
#[test]
fn cube_matches_the_unfused_launches() {
    check("cube", false);
}
