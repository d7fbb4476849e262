//! One kernel on given shapes: a one-op graph built with kiln_graph's builder, compiled
//! through the normal passes and lowering, its weights random and written to a temporary
//! safetensors file so they load (and are packed) as a model's would.

use crate::{compile_graph, CompileOptions, Error, Result};
use kiln_graph::{Attention, DType, Graph, MaskKind, Op, TensorType, UnaryOp};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::sync::Arc;

/// A kernel `--kernel` accepts: its name, its `--shape` syntax, and the shape used when none
/// is given (SigLIP So400m/14 at 224 px, or Gemma 2 2B for RMS norm).
pub struct KernelKind {
    pub name: &'static str,
    pub syntax: &'static str,
    pub default_shape: &'static str,
    pub what: &'static str,
}

/// The kernels single-kernel mode can build, on the cpu backend.
pub const KINDS: [KernelKind; 8] = [
    KernelKind {
        name: "cpu.gemm",
        syntax: "MxKxN",
        default_shape: "256x1152x1152",
        what: "activations [M,K] times a PyTorch-layout weight [N,K]",
    },
    KernelKind {
        name: "cpu.gemm+epilogue",
        syntax: "MxKxN",
        default_shape: "256x1152x4304",
        what: "the same plus a bias [N] and GELU-tanh fused into the GEMM",
    },
    KernelKind {
        name: "cpu.flash_attention",
        syntax: "BxSxHxD or BxSqxSkxHxD",
        default_shape: "1x256x16x72",
        what: "q [B,Sq,H,D], k and v [B,Sk,H,D], no mask",
    },
    KernelKind { name: "cpu.layer_norm", syntax: "RxD", default_shape: "256x1152", what: "R rows of D, scale and bias [D]" },
    KernelKind { name: "cpu.rms_norm", syntax: "RxD", default_shape: "256x2304", what: "R rows of D, weight [D] (Gemma's 1 + w)" },
    KernelKind { name: "cpu.softmax", syntax: "RxN", default_shape: "4096x256", what: "softmax over rows of N" },
    KernelKind { name: "cpu.fused", syntax: "AxBx..", default_shape: "256x4304", what: "gelu_tanh(x + y), one fused region" },
    KernelKind { name: "cpu.permute", syntax: "AxBxC", default_shape: "256x16x72", what: "[A,B,C] -> [B,A,C]" },
];

/// The `--shape` syntax of every kernel, for `--help` and error messages.
pub fn syntax_help() -> String {
    KINDS.iter().map(|k| format!("{}: {} ({}; default {})", k.name, k.syntax, k.what, k.default_shape)).collect::<Vec<_>>().join("\n")
}

/// Parses `AxBxC` into dimensions (each at least 1).
pub fn parse_dims(s: &str) -> Result<Vec<usize>> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse::<usize>().ok().filter(|&v| v > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| Error::Usage(format!("--shape {s}: expected positive integers joined by 'x', like 256x1152x4304")))?;
    Ok(dims)
}

/// A shape in `--shape` syntax for the kernel that runs `op` on these types.
pub fn shape_label(op: &Op, inputs: &[TensorType], out: &TensorType) -> String {
    let last = out.shape.last().copied().unwrap_or(1);
    let rows = out.numel() / last.max(1);
    let join = |d: &[usize]| d.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("x");
    match op {
        Op::MatMul { .. } => {
            let k = inputs.first().and_then(|a| a.shape.last()).copied().unwrap_or(0);
            format!("{rows}x{k}x{last}")
        }
        Op::Attention(_) => match (inputs.first(), inputs.get(1)) {
            (Some(q), Some(k)) if q.rank() == 4 && k.rank() == 4 => {
                let (b, sq, h, d, sk) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3], k.shape[1]);
                if sq == sk {
                    format!("{b}x{sq}x{h}x{d}")
                } else {
                    format!("{b}x{sq}x{sk}x{h}x{d}")
                }
            }
            _ => join(&out.shape),
        },
        Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::Softmax { .. } => format!("{rows}x{last}"),
        Op::Permute { .. } => inputs.first().map_or_else(|| join(&out.shape), |t| join(&t.shape)),
        _ => join(&out.shape),
    }
}

/// The one-op graph that runs `kernel` on `shape`.
pub fn kernel_graph(kernel: &str, shape: &str) -> Result<Graph> {
    let kind = KINDS
        .iter()
        .find(|k| k.name == kernel)
        .ok_or_else(|| Error::Usage(format!("--kernel {kernel}: not one kiln can build alone; choose one of:\n{}", syntax_help())))?;
    let d = parse_dims(shape)?;
    let want = |n: &[usize]| -> Result<()> {
        if n.contains(&d.len()) {
            Ok(())
        } else {
            Err(Error::Usage(format!("--shape {shape} for {kernel}: expected {}", kind.syntax)))
        }
    };
    let mut g = Graph::new();
    let f = DType::F32;
    let y = match kernel {
        "cpu.gemm" | "cpu.gemm+epilogue" => {
            want(&[3])?;
            let (m, k, n) = (d[0], d[1], d[2]);
            let x = g.input("x", f, &[m, k])?;
            let w = g.weight("w", f, &[n, k])?;
            let y = g.matmul(x, w, true)?;
            if kernel == "cpu.gemm" {
                y
            } else {
                let b = g.weight("b", f, &[n])?;
                let y = g.add(y, b)?;
                g.unary(UnaryOp::GeluTanh, y)?
            }
        }
        "cpu.flash_attention" => {
            want(&[4, 5])?;
            let (b, sq, sk, h, hd) = if d.len() == 4 { (d[0], d[1], d[1], d[2], d[3]) } else { (d[0], d[1], d[2], d[3], d[4]) };
            let q = g.input("q", f, &[b, sq, h, hd])?;
            let k = g.input("k", f, &[b, sk, h, hd])?;
            let v = g.input("v", f, &[b, sk, h, hd])?;
            let a = Attention { scale: 1.0 / (hd as f32).sqrt(), softcap: None, mask: MaskKind::None };
            g.attention(q, k, v, a)?
        }
        "cpu.layer_norm" => {
            want(&[2])?;
            let x = g.input("x", f, &d)?;
            let (s, b) = (g.weight("scale", f, &[d[1]])?, g.weight("bias", f, &[d[1]])?);
            g.layer_norm(x, s, b, 1e-6)?
        }
        "cpu.rms_norm" => {
            want(&[2])?;
            let x = g.input("x", f, &d)?;
            let w = g.weight("w", f, &[d[1]])?;
            g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[x, w])?
        }
        "cpu.softmax" => {
            want(&[2])?;
            let x = g.input("x", f, &d)?;
            g.softmax(x, 1)?
        }
        "cpu.fused" => {
            let (x, y) = (g.input("x", f, &d)?, g.input("y", f, &d)?);
            let s = g.add(x, y)?;
            g.unary(UnaryOp::GeluTanh, s)?
        }
        _ => {
            // cpu.permute, the last entry of KINDS.
            want(&[3])?;
            let x = g.input("x", f, &d)?;
            g.permute(x, &[1, 0, 2])?
        }
    };
    g.output("y", y);
    Ok(g)
}

/// Deterministic values in [-0.5, 0.5) for weights.
fn values(n: usize, seed: usize) -> Vec<f64> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f64 * 1e-3 - 0.5).collect()
}

/// A session running `kernel` alone on `shape`, compiled for `backend`; fails if the
/// compiled program does not use that kernel.
pub fn session(kernel: &str, shape: &str, backend: &str) -> Result<Session> {
    let g = kernel_graph(kernel, shape)?;
    let weights: Vec<(String, Tensor)> = g
        .weights()
        .enumerate()
        .map(|(i, (_, name, ty))| {
            (name.to_string(), Tensor { ty: ty.clone(), bytes: kiln_runtime::tensor::from_f64(ty.dtype, &values(ty.numel(), i)) })
        })
        .collect();
    let opts = CompileOptions { profile: Default::default(), backend: backend.to_string(), trace: false };
    let path = std::env::temp_dir().join(format!("kiln-bench-{}-{}.safetensors", std::process::id(), kernel.replace(['.', '+'], "_")));
    let c = compile_graph(&[("forward".to_string(), g)], &format!("{kernel} {shape}"), &path.display().to_string(), &opts)?;
    let used: Vec<&str> = c.program.entries[0].steps.iter().map(|s| s.kernel.as_str()).collect();
    if !used.contains(&kernel) {
        return Err(Error::Usage(format!("{kernel} on {shape} compiled to [{}] on backend {backend}", used.join(", "))));
    }
    let store = if weights.is_empty() {
        WeightStore::empty()
    } else {
        crate::io::write(&path, &weights)?;
        let store = WeightStore::open(&path);
        // The store keeps its memory map; the file's name is no longer needed (best effort:
        // some systems refuse to remove a mapped file, and it is in the temporary folder).
        let _ = std::fs::remove_file(&path);
        store?
    };
    Ok(Session::new(c.program, Arc::new(store))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_at_its_default_shape_and_labels_round_trip() {
        for k in &KINDS {
            let g = kernel_graph(k.name, k.default_shape).unwrap_or_else(|e| panic!("{}: {e}", k.name));
            let n = g.nodes.iter().find(|n| !n.op.is_source()).unwrap_or_else(|| panic!("{}: no op", k.name));
            let tys: Vec<TensorType> = n.inputs.iter().map(|i| g.ty(*i).clone()).collect();
            assert_eq!(shape_label(&n.op, &tys, &n.ty), k.default_shape, "{}", k.name);
        }
    }

    #[test]
    fn bad_shapes_and_kernels_are_refused_with_the_syntax() {
        let e = kernel_graph("cpu.gemm", "2x3").unwrap_err().to_string();
        assert_eq!(e, "--shape 2x3 for cpu.gemm: expected MxKxN");
        let e = kernel_graph("cpu.gemm", "2xAx3").unwrap_err().to_string();
        assert!(e.contains("positive integers"), "{e}");
        let e = kernel_graph("cpu.nothing", "2").unwrap_err().to_string();
        assert!(e.contains("cpu.layer_norm: RxD"), "{e}");
    }
}
