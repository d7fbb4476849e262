//! Convolutions as a gather and a matmul (im2col), for backends without a convolution kernel.
//!
//! For each output pixel `p` and kernel tap `t = (kh, kw)`, at most one input pixel meets it
//! (see [`crate::op::Conv`]): `(i s + kh - pad, j s + kw - pad)` for a direct convolution, and
//! for a transposed one the `a` with `a s + kh - pad = i` when `s` divides it. A constant table
//! holds that pixel's index for every `(p, t)`, or the index of an extra zero row when there is
//! none (padding, or a transposed convolution's holes). Then:
//!
//! ```text
//! x [B, H, W, Ci] -> [B, H*W, Ci] ++ zeros [B, 1, Ci] -> gather(axis 1, table [OH*OW*T])
//!   -> [B*OH*OW, T*Ci] @ w [KH*KW*Ci, Co] -> [B, OH, OW, Co]
//! ```
//!
//! The sums run in the matmul's order (taps, then channels), not the cpu kernel's; results agree
//! to rounding.

use crate::dtype::{DType, TensorType};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::{Conv, Op};

/// The input pixel (row-major over `[H, W]`) that output pixel `(i, j)` reads at tap `(kh, kw)`,
/// or `None`.
pub fn tap_source(c: &Conv, hw: [usize; 2], (i, j): (usize, usize), (kh, kw): (usize, usize)) -> Option<usize> {
    let along = |o: usize, k: usize, a: usize| -> Option<usize> {
        let (s, p, n) = (c.stride[a], c.pad[a], hw[a]);
        let v = if c.transposed {
            let t = (o + p).checked_sub(k)?;
            if t % s != 0 {
                return None;
            }
            t / s
        } else {
            (o * s + k).checked_sub(p)?
        };
        (v < n).then_some(v)
    };
    Some(along(i, kh, 0)? * hw[1] + along(j, kw, 1)?)
}

/// Rewrites every [`Op::Conv`] into the gather and matmul above; other nodes are copied.
pub fn lower_conv(g: &Graph) -> Result<Graph> {
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    for node in &g.nodes {
        let inputs: Vec<NodeId> = node.inputs.iter().map(|i| map[i.index()]).collect();
        let id = match &node.op {
            Op::Conv(c) => im2col(&mut out, c, inputs[0], inputs[1])?,
            // Sources (and iota) carry their type; everything else is re-inferred.
            op if node.inputs.is_empty() => out.push_source(op.clone(), node.ty.clone())?,
            op => out.push(op.clone(), &inputs)?,
        };
        map.push(id);
    }
    for (name, id) in &g.outputs {
        out.output(name.clone(), map[id.index()]);
    }
    Ok(out)
}

fn im2col(g: &mut Graph, c: &Conv, x: NodeId, w: NodeId) -> Result<NodeId> {
    let (xs, ws) = (g.shape(x).to_vec(), g.shape(w).to_vec());
    let dtype = g.ty(x).dtype;
    let (b, h, wd, ci) = (xs[0], xs[1], xs[2], xs[3]);
    let (kh, kw, co) = (ws[0], ws[1], ws[3]);
    let [oh, ow] = c.out_hw([h, wd], [kh, kw]).map_err(crate::error::GraphError::Invalid)?;
    let taps = kh * kw;
    let zero_row = h * wd;
    let mut table = Vec::with_capacity(oh * ow * taps);
    for i in 0..oh {
        for j in 0..ow {
            for a in 0..kh {
                for bb in 0..kw {
                    table.push(tap_source(c, [h, wd], (i, j), (a, bb)).unwrap_or(zero_row) as f64);
                }
            }
        }
    }
    let flat = g.reshape(x, &[b, h * wd, ci])?;
    let zeros = g.push_source(Op::Constant { values: vec![0.0; b * ci] }, TensorType::new(dtype, [b, 1, ci]))?;
    let padded = g.concat(&[flat, zeros], 1)?;
    let idx = g.push_source(Op::Constant { values: table }, TensorType::new(DType::I64, [oh * ow * taps]))?;
    let cols = g.push(Op::Gather { axis: 1 }, &[padded, idx])?;
    let cols = g.reshape(cols, &[b * oh * ow, taps * ci])?;
    let w2 = g.reshape(w, &[taps * ci, co])?;
    let y = g.matmul(cols, w2, false)?;
    g.reshape(y, &[b, oh, ow, co])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{run, Value};
    use crate::passes::Pipeline;
    use std::collections::HashMap;

    fn conv_graph(c: Conv, x: [usize; 4], w: [usize; 4]) -> Graph {
        let mut g = Graph::new();
        let xi = g.input("x", DType::F32, &x).unwrap();
        let wi = g.input("w", DType::F32, &w).unwrap();
        let y = g.push(Op::Conv(c), &[xi, wi]).unwrap();
        g.output("y", y);
        g
    }

    /// The lowered graph gives the interpreter's convolution, direct and transposed, strided
    /// and padded, on random values.
    #[test]
    fn lowered_convolutions_equal_the_op() {
        let cases = [
            (Conv { stride: [1, 1], pad: [1, 1], transposed: false }, [2, 5, 4, 3], [3, 3, 3, 4]),
            (Conv { stride: [2, 1], pad: [0, 1], transposed: false }, [1, 7, 6, 2], [3, 2, 2, 3]),
            (Conv { stride: [1, 1], pad: [0, 0], transposed: false }, [2, 4, 4, 5], [1, 1, 5, 2]),
            (Conv { stride: [2, 2], pad: [1, 1], transposed: true }, [2, 4, 3, 3], [4, 4, 3, 2]),
            (Conv { stride: [3, 2], pad: [0, 1], transposed: true }, [1, 3, 3, 2], [3, 4, 2, 2]),
        ];
        let mut seed = 7u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        };
        for (c, xs, ws) in cases {
            let g = conv_graph(c, xs, ws);
            let lowered = lower_conv(&g).unwrap();
            assert!(!lowered.nodes.iter().any(|n| matches!(n.op, Op::Conv(_))));
            let lowered = Pipeline::standard().run(&lowered, None).unwrap();
            let x = Value::from_f32(&xs, &rnd(xs.iter().product())).unwrap();
            let w = Value::from_f32(&ws, &rnd(ws.iter().product())).unwrap();
            let ins: HashMap<String, Value> = [("x".to_string(), x), ("w".to_string(), w)].into();
            let (want, got) = (run(&g, &ins, &HashMap::new()).unwrap(), run(&lowered, &ins, &HashMap::new()).unwrap());
            assert_eq!(want["y"].ty, got["y"].ty, "{c:?}");
            let (a, b) = (want["y"].to_f32(), got["y"].to_f32());
            let err = a.iter().zip(&b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(err < 1e-5, "{c:?}: max |diff| {err}");
            assert!(a.iter().any(|v| v.abs() > 0.1), "{c:?}: a trivial output");
        }
    }
}
