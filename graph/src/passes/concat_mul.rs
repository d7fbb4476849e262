//! Concatenations of products by constants: `concat(x * c1, x * c2, ..)` along an axis over
//! which `x` broadcasts (its size there is 1) becomes `x * concat(c1, c2, ..)`, the constants
//! joined at compile time. RoPE's frequency table `concat(f, f)` with `f = position * inv_freq`
//! is one: its concat (a launch per part on cuda) disappears and the product is computed
//! once at the full width. Each element is the same product as before, so the result is exact.

use super::{copy_node, copy_outputs, same_type};
use crate::dtype::broadcast_shapes;
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::{BinaryOp, Op};

/// `(x, c)` when node `p` is `x * c` or `c * x` with `c` a constant (values) of `p`'s dtype.
fn product_by_constant(g: &Graph, p: NodeId) -> Option<(NodeId, &[f64], NodeId)> {
    let node = g.node(p);
    let Op::Binary(BinaryOp::Mul) = node.op else { return None };
    let [a, b] = node.inputs[..] else { return None };
    let constant = |id: NodeId| match &g.node(id).op {
        Op::Constant { values } if g.ty(id).dtype == node.ty.dtype => Some(values.as_slice()),
        _ => None,
    };
    match (constant(a), constant(b)) {
        (None, Some(v)) => Some((a, v, b)),
        (Some(v), None) => Some((b, v, a)),
        _ => None,
    }
}

/// `shape` with leading 1s up to `rank`.
fn padded(shape: &[usize], rank: usize) -> Vec<usize> {
    let mut s = vec![1; rank.saturating_sub(shape.len())];
    s.extend_from_slice(shape);
    s
}

/// For a concat node: the common `x` and the joined constant (shape and values), when every
/// part is `x * c_k` as the module doc says.
fn joined(g: &Graph, c: usize) -> Option<(NodeId, Vec<usize>, Vec<f64>)> {
    let node = &g.nodes[c];
    let Op::Concat { axis } = node.op else { return None };
    let rank = node.ty.rank();
    if !node.ty.dtype.is_float() || node.inputs.len() < 2 {
        return None;
    }
    let mut x: Option<NodeId> = None;
    let mut parts: Vec<(Vec<usize>, &[f64])> = Vec::new();
    for &p in &node.inputs {
        let (px, values, cid) = product_by_constant(g, p)?;
        let cshape = padded(&g.ty(cid).shape, rank);
        if *x.get_or_insert(px) != px || g.ty(cid).rank() > rank || cshape[axis] != g.ty(p).shape[axis] {
            return None;
        }
        parts.push((cshape, values));
    }
    let x = x?;
    let xshape = padded(&g.ty(x).shape, rank);
    // The constants differ only along the axis; x broadcasts along it.
    let first = &parts[0].0;
    if g.ty(x).rank() > rank || xshape[axis] != 1 || parts.iter().any(|(s, _)| (0..rank).any(|a| a != axis && s[a] != first[a])) {
        return None;
    }
    let mut shape = first.clone();
    shape[axis] = parts.iter().map(|(s, _)| s[axis]).sum();
    if broadcast_shapes(&xshape, &shape).as_deref() != Some(node.ty.shape.as_slice()) {
        return None;
    }
    // Row-major: for each index before the axis, every part's block in turn.
    let (outer, inner): (usize, usize) = (shape[..axis].iter().product(), shape[axis + 1..].iter().product());
    let mut values = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for (s, v) in &parts {
            let block = s[axis] * inner;
            values.extend_from_slice(&v[o * block..(o + 1) * block]);
        }
    }
    Some((x, shape, values))
}

/// Rewrites every such concat as one product by the joined constant (see the module doc).
pub fn concat_of_products(g: &Graph) -> Result<Graph> {
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    for (i, node) in g.nodes.iter().enumerate() {
        let ins: Vec<NodeId> = node.inputs.iter().map(|p| map[p.index()]).collect();
        let id = match joined(g, i) {
            Some((x, shape, values)) => {
                let c = out.constant(node.ty.dtype, &shape, values)?;
                out.push(Op::Binary(BinaryOp::Mul), &[map[x.index()], c])?
            }
            None => copy_node(&mut out, node, &ins)?,
        };
        same_type("concat_of_products", &out, i, node, id)?;
        map.push(id);
    }
    copy_outputs(g, &mut out, &map);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::interp::{run, Value};
    use std::collections::HashMap;

    /// `concat(x * c1, x * c2)` on `axis`, x `[2, 3, 1]` (or `x_shape`), constants of `c_shape`
    /// with `c1_len` / `c2_len` along the axis; `same`: both parts one product.
    fn graph(x_shape: &[usize], c_shape: &[usize], axis: usize, lens: (usize, usize), same: bool) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, x_shape).unwrap();
        let mut part = |len: usize, k: usize| {
            let mut s = c_shape.to_vec();
            s[axis - (x_shape.len() - c_shape.len())] = len;
            let n: usize = s.iter().product();
            let c = g.constant(DType::F32, &s, (0..n).map(|i| 0.37 * (i + 3 * k) as f64 - 1.1).collect()).unwrap();
            g.mul(x, c).unwrap()
        };
        let a = part(lens.0, 0);
        let b = if same { a } else { part(lens.1, 1) };
        let y = g.concat(&[a, b], axis).unwrap();
        g.output("y", y);
        g
    }

    fn concats(g: &Graph) -> usize {
        g.nodes.iter().filter(|n| matches!(n.op, Op::Concat { .. })).count()
    }

    fn same_values(a: &Graph, b: &Graph) {
        let ty = a.ty(NodeId(0)).clone();
        let x = Value::new(ty.clone(), (0..ty.numel()).map(|i| i as f64 * 0.913 - 2.0).collect()).unwrap();
        let ins: HashMap<_, _> = [("x".to_string(), x)].into();
        let none = HashMap::new();
        assert_eq!(run(a, &ins, &none).unwrap()["y"].data, run(b, &ins, &none).unwrap()["y"].data);
    }

    #[test]
    fn rope_frequencies_become_one_product_with_the_interpreters_values() {
        // RoPE's concat(f, f), f = pos [2, 3, 1] * inv_freq [1, 1, 4]; two different products;
        // a constant of lower rank ([4] against x [2, 3, 1]).
        for g in [
            graph(&[2, 3, 1], &[1, 1, 4], 2, (4, 4), true),
            graph(&[2, 3, 1], &[1, 3, 4], 2, (4, 2), false),
            graph(&[2, 3, 1], &[4], 2, (4, 3), false),
        ] {
            let out = concat_of_products(&g).unwrap();
            assert_eq!(concats(&crate::passes::dead_code(&out).unwrap()), 0);
            same_values(&g, &out);
        }
    }

    #[test]
    fn other_concats_stay() {
        // x not broadcast along the axis ([2, 3, 2]); constants that differ off the axis.
        let mut differ = Graph::new();
        let x = differ.input("x", DType::F32, &[2, 3, 1]).unwrap();
        let c1 = differ.constant(DType::F32, &[1, 1, 4], vec![0.5, 1.5, -2.0, 3.0]).unwrap();
        let c2 = differ.constant(DType::F32, &[1, 3, 4], (0..12).map(|i| i as f64).collect()).unwrap();
        let (a, b) = (differ.mul(x, c1).unwrap(), differ.mul(x, c2).unwrap());
        let cat = differ.concat(&[a, b], 2).unwrap();
        differ.output("y", cat);
        for g in [graph(&[2, 3, 4], &[1, 1, 4], 2, (4, 4), true), differ] {
            let out = concat_of_products(&g).unwrap();
            assert_eq!(concats(&out), concats(&g));
            same_values(&g, &out);
        }
    }
}
