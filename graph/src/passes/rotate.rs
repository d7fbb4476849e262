//! Signed permutations of the last axis as a matmul: a concat along the last axis whose parts
//! are slices of one tensor `x` along that axis, each maybe negated (RoPE's
//! `rotate_half(x) = concat(-x[.., h:], x[.., :h])`), becomes `x @ P` with `P` a constant
//! `[D, D]` matrix of 0 and ±1. Three or four launches (slices, negation, concat) become one
//! GEMM whose epilogue then takes the reader's elementwise work (`x * cos + rot * sin`). The
//! product is exact: each output element is one input element times ±1 plus zeros. It costs
//! `2 D` flops per element, which is why `D` is bounded.

use super::{copy_node, copy_outputs, same_type, Uses};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::{Op, UnaryOp};

/// Largest last axis rewritten (`P` holds `D * D` values; Gemma's head_dim is 256).
pub const MAX_ROTATION_DIM: usize = 512;

/// For a concat node: its source `x` and the signed source index of every output index.
fn permutation(g: &Graph, uses: &Uses, c: usize) -> Option<(NodeId, Vec<(usize, f64)>)> {
    let node = &g.nodes[c];
    let Op::Concat { axis } = node.op else { return None };
    let rank = node.ty.rank();
    let d = *node.ty.shape.last()?;
    if axis + 1 != rank || rank < 2 || !node.ty.dtype.is_float() || d > MAX_ROTATION_DIM {
        return None;
    }
    let mut src: Option<NodeId> = None;
    let mut map = Vec::with_capacity(d);
    for &p in &node.inputs {
        // A negation counts only where the concat alone reads it (else it is computed anyway).
        let (sign, s) = match g.node(p).op {
            Op::Unary(UnaryOp::Neg) if uses.sole_reader(p.index()) == Some(c) => (-1.0, g.node(p).inputs[0]),
            _ => (1.0, p),
        };
        let Op::Slice { axis: sa, start, end, step: 1 } = g.node(s).op else { return None };
        let x = g.node(s).inputs[0];
        if sa != axis || *src.get_or_insert(x) != x || g.ty(x).shape != node.ty.shape {
            return None;
        }
        map.extend((start..end).map(|i| (i, sign)));
    }
    Some((src?, map))
}

/// Rewrites every such concat as `x @ P` (see the module doc).
pub fn rotation_as_matmul(g: &Graph) -> Result<Graph> {
    let uses = Uses::of(g);
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    for (i, node) in g.nodes.iter().enumerate() {
        let ins: Vec<NodeId> = node.inputs.iter().map(|p| map[p.index()]).collect();
        let id = match permutation(g, &uses, i) {
            Some((x, perm)) => {
                let d = perm.len();
                // P[src, dst] = sign: out[.., dst] = sign * x[.., src].
                let mut values = vec![0.0; d * d];
                for (dst, &(src, sign)) in perm.iter().enumerate() {
                    values[src * d + dst] = sign;
                }
                let p = out.constant(node.ty.dtype, &[d, d], values)?;
                out.push(Op::MatMul { transpose_b: false, epilogue: None }, &[map[x.index()], p])?
            }
            None => copy_node(&mut out, node, &ins)?,
        };
        same_type("rotation_as_matmul", &out, i, node, id)?;
        map.push(id);
    }
    copy_outputs(g, &mut out, &map);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// `concat(-x[.., h:], x[.., :h])` on the given axis of `x` (of `shape`), the concat an output.
    fn rotate_half(shape: &[usize], axis: usize, other: bool) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, shape).unwrap();
        let y = g.input("y", DType::F32, shape).unwrap();
        let d = shape[axis];
        let hi = g.slice(if other { y } else { x }, axis, d / 2, d).unwrap();
        let lo = g.slice(x, axis, 0, d / 2).unwrap();
        let n = g.unary(UnaryOp::Neg, hi).unwrap();
        let c = g.concat(&[n, lo], axis).unwrap();
        g.output("r", c);
        g
    }

    fn matmuls(g: &Graph) -> usize {
        g.nodes.iter().filter(|n| matches!(n.op, Op::MatMul { .. })).count()
    }

    #[test]
    fn rotate_half_becomes_one_matmul_with_the_interpreters_values() {
        let g = rotate_half(&[2, 3, 4], 2, false);
        let out = rotation_as_matmul(&g).unwrap();
        assert_eq!(matmuls(&out), 1);
        let x = crate::interp::Value::new(g.ty(NodeId(0)).clone(), (0..24).map(|i| i as f64 - 7.5).collect()).unwrap();
        let y = crate::interp::Value::new(g.ty(NodeId(1)).clone(), vec![0.0; 24]).unwrap();
        let ins: std::collections::HashMap<_, _> = [("x".to_string(), x), ("y".to_string(), y)].into();
        let none = std::collections::HashMap::new();
        let (a, b) = (crate::interp::run(&g, &ins, &none).unwrap(), crate::interp::run(&out, &ins, &none).unwrap());
        assert_eq!(a["r"].data, b["r"].data);
    }

    #[test]
    fn other_concats_stay() {
        // Parts from two tensors; a concat on another axis than the last; too wide a last axis.
        for g in [rotate_half(&[2, 4], 1, true), rotate_half(&[4, 2], 0, false), rotate_half(&[1, 2 * MAX_ROTATION_DIM], 1, false)] {
            assert_eq!(matmuls(&rotation_as_matmul(&g).unwrap()), 0);
        }
    }
}
