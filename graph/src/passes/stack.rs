//! Sibling projections as one GEMM: matmuls that read the same `x` against weights of one
//! shape and dtype (Q, K and V; K and V alone under grouped-query attention; an MLP's gate and
//! up) become one batched matmul of `x` (as `[1, M, K]`, broadcast over the batch) against
//! their weights stacked at load (`~stack(wq|wk|wv)`, read as `[G, N, K]`; see
//! [`crate::safetensors::STACK_MARK`]), and each old product is slice `i` of the `[G, M, N]`
//! result along its first axis. Per-projection biases of shape `[N]` stack likewise (`[G, 1, N]`), one add that epilogue fusion then takes. The rewrite is
//! made only where every slice is a view (each `M * N` block starts on an arena boundary, see
//! [`crate::plan::slice_view_offset`]): otherwise the slices would be copies and cost launches.
//!
//! With one row (`M = 1`: decode at batch 1) projections of different widths stack too, when
//! each width is a multiple of the narrowest `n` and each weight is stored transposed
//! (`[N_i, K]`, transformers' layout): grouped-query attention's Q (`[H * hd, K]`) fills
//! `H / G` slices of `n = G * hd` beside K and V, so Q, K and V are one `[S, 1, n]` product
//! whose slices `s..s + m` are each projection's `[1, N_i]` (one row, so the slices' order is
//! the columns' order). The parts' bytes join in order at load
//! ([`crate::safetensors::stack_slots`]). Biases are not stacked in this form (the group is
//! only made when no member has one).
//!
//! [`stack_projections_rows`] (the compile picks it for backends that read a permute for free:
//! cuda, where an elementwise or RoPE launch reads the permute's source through strides) also
//! stacks projections of different widths over `M > 1` rows (prefill's Q beside K and V): one
//! `[S, M, n]` product over the same load-time join of the weights. Its slices are planes of
//! `M * n` elements (each whole arena blocks), so a member of `m > 1` slices is not a view: it
//! is `reshape(permute(slice(planes, s..s + m), [1, 0, 2]), its shape)` (the planes `[m, M, n]`
//! read as rows `[M, m * n]`); a member of one slice is its plane. Other backends keep the
//! first two forms (a permute there is a copy).

use super::{copy_mapped, map_outputs, same_type, Uses};
use crate::error::{GraphError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::{BinaryOp, Op};
use crate::plan::ALIGN;
use crate::safetensors::stack_name;

/// One set of sibling projections found in the old graph.
struct Group {
    /// The matmul nodes, in node order.
    members: Vec<usize>,
    /// Each member's bias add and bias weight, when every member has one.
    biases: Option<Vec<(usize, NodeId)>>,
    /// Columns per slice of the stacked product when the members' widths differ (one row;
    /// each member fills `N_i / n` slices); `None` when every member is one slice.
    narrow: Option<usize>,
}

/// The weight node `id` reads through a chain of reshapes (big_vision's `[D, H, hd]` kernels
/// are read as `[D, H*hd]`), if it is one.
pub(super) fn weight_of(g: &Graph, id: NodeId) -> Option<NodeId> {
    let mut id = id;
    loop {
        match g.node(id).op {
            Op::Weight { .. } => return Some(id),
            Op::Reshape { .. } => id = *g.node(id).inputs.first()?,
            _ => return None,
        }
    }
}

/// What sibling projections share: the input, whether the weight is transposed, the shape the
/// product reads the weight in, its dtype, and the shape it is stored in.
type Key = (NodeId, bool, Vec<usize>, crate::dtype::DType, Vec<usize>);

/// The grouping key of a matmul node that may join a stack: a plain product (no epilogue) of a
/// float `x` of rank >= 2 with a 2-D weight (or a reshape of one).
fn candidate(g: &Graph, i: usize) -> Option<Key> {
    let n = &g.nodes[i];
    let Op::MatMul { transpose_b, epilogue: None } = n.op else { return None };
    let (&a, &w) = (n.inputs.first()?, n.inputs.get(1)?);
    let (wt, src) = (g.ty(w), weight_of(g, w)?);
    if n.inputs.len() != 2 || wt.rank() != 2 || g.ty(a).rank() < 2 {
        return None;
    }
    n.ty.dtype.is_float().then(|| (a, transpose_b, wt.shape.clone(), wt.dtype, g.ty(src).shape.clone()))
}

/// The add and `[N]` bias (a weight, or a reshape of one) that alone read matmul `m`'s
/// product, keeping its type: the add and the bias's weight node.
fn bias(g: &Graph, uses: &Uses, m: usize) -> Option<(usize, NodeId)> {
    let r = uses.sole_reader(m)?;
    let node = &g.nodes[r];
    if !matches!(node.op, Op::Binary(BinaryOp::Add)) || node.ty != g.nodes[m].ty {
        return None;
    }
    let b = *node.inputs.iter().find(|p| p.index() != m)?;
    let n = *node.ty.shape.last()?;
    let src = weight_of(g, b)?;
    let is_bias = g.ty(b).shape == [n] && g.ty(src).dtype == node.ty.dtype;
    (is_bias && node.inputs.iter().filter(|p| p.index() == m).count() == 1).then_some((r, src))
}

fn weight_name(g: &Graph, w: NodeId) -> &str {
    match &g.node(w).op {
        Op::Weight { name } => name,
        _ => "",
    }
}

/// The grouping key of a transposed product that may join a stack of projections of different
/// widths (one row, or any rows where `rows`): the input, the weight's dtype and its inner size
/// `K`.
fn wide_candidate(g: &Graph, uses: &Uses, i: usize, rows: bool) -> Option<(NodeId, crate::dtype::DType, usize)> {
    let (a, transpose_b, wshape, dtype, stored) = candidate(g, i)?;
    let k = *g.ty(a).shape.last()?;
    let one_row = g.ty(a).numel() == k;
    let shaped = transpose_b && (one_row || rows) && wshape == stored && wshape[1] == k;
    (shaped && bias(g, uses, i).is_none()).then_some((a, dtype, k))
}

/// Groups of projections of different widths (one row, or any rows where `rows`), each width a
/// multiple of the narrowest `n` and each `[M, n]` plane whole arena blocks (the module doc's
/// second and third forms).
fn wide_groups(g: &Graph, uses: &Uses, rows: bool) -> Vec<Group> {
    let mut found: Vec<((NodeId, crate::dtype::DType, usize), Vec<usize>)> = Vec::new();
    for i in 0..g.nodes.len() {
        let Some(key) = wide_candidate(g, uses, i, rows) else { continue };
        match found.iter_mut().find(|(k, _)| *k == key) {
            Some((_, m)) => m.push(i),
            None => found.push((key, vec![i])),
        }
    }
    let mut out = Vec::new();
    for ((a, dtype, k), members) in found {
        let m = g.ty(a).numel() / k.max(1);
        let width = |m: usize| *g.nodes[m].ty.shape.last().unwrap_or(&0);
        let n = members.iter().map(|&m| width(m)).min().unwrap_or(0);
        let names: Vec<&str> = members.iter().filter_map(|&m| weight_of(g, g.nodes[m].inputs[1])).map(|w| weight_name(g, w)).collect();
        let distinct = names.iter().enumerate().all(|(i, a)| !names[..i].contains(a));
        let differ = members.iter().any(|&m| width(m) != n);
        if members.len() < 2 || n == 0 || !differ || !distinct || !(m * n * dtype.size()).is_multiple_of(ALIGN) {
            continue;
        }
        if members.iter().all(|&m| width(m) % n == 0) {
            out.push(Group { members, biases: None, narrow: Some(n) });
        }
    }
    out
}

/// The groups of sibling projections whose stacked product's slices are all views (or, where
/// `rows`, planes that a permute reads as a member's rows).
fn groups(g: &Graph, uses: &Uses, rows: bool) -> Vec<Group> {
    let mut out = wide_groups(g, uses, rows);
    let taken: Vec<usize> = out.iter().flat_map(|grp| grp.members.iter().copied()).collect();
    let mut found: Vec<(Key, Vec<usize>)> = Vec::new();
    for i in 0..g.nodes.len() {
        if taken.contains(&i) {
            continue;
        }
        let Some(key) = candidate(g, i) else { continue };
        match found.iter_mut().find(|(k, _)| *k == key) {
            Some((_, m)) => m.push(i),
            None => found.push((key, vec![i])),
        }
    }
    for (_, mut members) in found {
        // The same weight twice is one product (CSE's work), not a stack.
        let mut seen = Vec::new();
        members.retain(|&m| {
            let name = weight_of(g, g.nodes[m].inputs[1]).map_or("", |w| weight_name(g, w));
            !seen.contains(&name) && {
                seen.push(name);
                true
            }
        });
        let t = &g.nodes[members[0]].ty;
        let block = t.numel() * t.dtype.size();
        if members.len() < 2 || block == 0 || !block.is_multiple_of(ALIGN) {
            continue;
        }
        // Biases stack when every member has one, all stored in one shape.
        let biases = members
            .iter()
            .map(|&m| bias(g, uses, m))
            .collect::<Option<Vec<_>>>()
            .filter(|b| b.iter().all(|&(_, w)| g.ty(w).shape == g.ty(b[0].1).shape));
        out.push(Group { members, biases, narrow: None });
    }
    out
}

/// Rewrites each set of sibling projections as one stacked GEMM (see the module doc): the
/// first two forms.
pub fn stack_projections(g: &Graph) -> Result<Graph> {
    stack(g, false)
}

/// [`stack_projections`] with the module doc's third form too: projections of different widths
/// over `M > 1` rows, a wide member read through a permute of its planes.
pub fn stack_projections_rows(g: &Graph) -> Result<Graph> {
    stack(g, true)
}

fn stack(g: &Graph, rows: bool) -> Result<Graph> {
    let uses = Uses::of(g);
    let groups = groups(g, &uses, rows);
    if groups.is_empty() {
        return Ok(g.clone());
    }
    let n = g.nodes.len();
    // Per node: the group emitted in its place (at its first member), and whether it goes.
    let mut starts: Vec<Option<usize>> = vec![None; n];
    let mut gone = vec![false; n];
    for (k, grp) in groups.iter().enumerate() {
        starts[grp.members[0]] = Some(k);
        for (j, &m) in grp.members.iter().enumerate() {
            gone[m] = true;
            if let Some(b) = &grp.biases {
                gone[b[j].0] = true;
            }
        }
    }
    // Weights (and their reshapes) only the rewritten nodes read go too: the stacks replace
    // them. Readers come later in node order, so a reshape is decided before its weight.
    // A group's shared input stays (the stacked product reads it).
    let shared: Vec<usize> = groups.iter().map(|grp| g.nodes[grp.members[0]].inputs[0].index()).collect();
    for (i, node) in g.nodes.iter().enumerate().rev() {
        let source = matches!(node.op, Op::Weight { .. } | Op::Reshape { .. });
        if source && !uses.is_output[i] && !uses.readers[i].is_empty() && !shared.contains(&i) {
            gone[i] = gone[i] || uses.readers[i].iter().all(|&r| gone[r]);
        }
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        if let Some(k) = starts[i] {
            emit(g, &mut out, &groups[k], &mut map)?;
        }
        if gone[i] {
            continue;
        }
        let id = copy_mapped("stack_projections", &mut out, i, node, &map)?;
        same_type("stack_projections", &out, i, node, id)?;
        map[i] = Some(id);
    }
    map_outputs("stack_projections", g, &mut out, &map)?;
    Ok(out)
}

/// The stack of weight nodes `sources` (of one stored shape and dtype), read as `[G, ..shape]`.
fn stacked(g: &Graph, out: &mut Graph, sources: &[NodeId], shape: &[usize]) -> Result<NodeId> {
    let names: Vec<&str> = sources.iter().map(|&w| weight_name(g, w)).collect();
    let t = g.ty(sources[0]);
    let mut stored = vec![sources.len()];
    stored.extend_from_slice(&t.shape);
    let w = out.weight(&stack_name(&names), t.dtype, &stored)?;
    let mut read = vec![sources.len()];
    read.extend_from_slice(shape);
    if read == stored {
        Ok(w)
    } else {
        out.reshape(w, &read)
    }
}

/// Emits one group's stacked product and the views standing for each member's result.
fn emit(g: &Graph, out: &mut Graph, grp: &Group, map: &mut [Option<NodeId>]) -> Result<()> {
    let first = &g.nodes[grp.members[0]];
    let (a, w0) = (first.inputs[0], first.inputs[1]);
    let Op::MatMul { transpose_b, .. } = first.op else { return Ok(()) };
    let na = map[a.index()].ok_or_else(|| GraphError::Pass { pass: "stack_projections", msg: format!("{a} not yet built") })?;
    let at = g.ty(a);
    let k = at.shape[at.rank() - 1];
    let m = at.numel() / k.max(1);
    let sources: Vec<NodeId> = grp.members.iter().filter_map(|&mm| weight_of(g, g.nodes[mm].inputs[1])).collect();
    if let Some(n) = grp.narrow {
        return emit_wide(g, out, grp, &sources, (na, m, k, n), map);
    }
    let w = stacked(g, out, &sources, &g.ty(w0).shape)?;
    let x = if at.shape.len() == 3 && at.shape[0] == 1 { na } else { out.reshape(na, &[1, m, k])? };
    let mut y = out.matmul(x, w, transpose_b)?;
    let cols = *first.ty.shape.last().unwrap_or(&0);
    if let Some(b) = &grp.biases {
        let sources: Vec<NodeId> = b.iter().map(|&(_, w)| w).collect();
        let bw = stacked(g, out, &sources, &[1, cols])?;
        y = out.add(y, bw)?;
    }
    for (j, &mm) in grp.members.iter().enumerate() {
        let s = out.slice(y, 0, j, j + 1)?;
        let id = out.reshape(s, &g.nodes[mm].ty.shape)?;
        let old = grp.biases.as_ref().map_or(mm, |b| b[j].0);
        same_type("stack_projections", out, old, &g.nodes[old], id)?;
        map[old] = Some(id);
    }
    Ok(())
}

/// Emits a group of projections of different widths (the module doc's second and third
/// forms): `x [1, M, K]` times the stack `[S, n, K]` (transposed), member `j` the slices
/// `s..s + m_j` read as its `[.., N_j]` (with `M > 1` and `m_j > 1`, through a permute of
/// those planes to `[M, m_j, n]`).
fn emit_wide(
    g: &Graph,
    out: &mut Graph,
    grp: &Group,
    sources: &[NodeId],
    (x, rows, k, n): (NodeId, usize, usize, usize),
    map: &mut [Option<NodeId>],
) -> Result<()> {
    let names: Vec<&str> = sources.iter().map(|&w| weight_name(g, w)).collect();
    let widths: Vec<usize> = grp.members.iter().map(|&m| *g.nodes[m].ty.shape.last().unwrap_or(&0)).collect();
    let slices: usize = widths.iter().map(|w| w / n).sum();
    let w = out.weight(&stack_name(&names), g.ty(sources[0]).dtype, &[slices, n, k])?;
    let x = out.reshape(x, &[1, rows, k])?;
    let y = out.matmul(x, w, true)?;
    let mut s = 0;
    for (&mm, width) in grp.members.iter().zip(widths) {
        let mut part = out.slice(y, 0, s, s + width / n)?;
        if rows > 1 && width > n {
            part = out.permute(part, &[1, 0, 2])?;
        }
        s += width / n;
        let id = out.reshape(part, &g.nodes[mm].ty.shape)?;
        same_type("stack_projections", out, mm, &g.nodes[mm], id)?;
        map[mm] = Some(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::interp::{run, Value};
    use std::collections::HashMap;

    /// `x [2, rows/2, k]` projected by weights named `w{i}` of `[n_i, k]` (each with bias `b{i}`
    /// when `bias`), every projection an output.
    fn projections(rows: usize, k: usize, ns: &[usize], bias: &[bool]) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, rows / 2, k]).unwrap();
        for (i, &n) in ns.iter().enumerate() {
            let w = g.weight(&format!("w{i}"), DType::F32, &[n, k]).unwrap();
            let mut y = g.matmul(x, w, true).unwrap();
            if bias[i] {
                let b = g.weight(&format!("b{i}"), DType::F32, &[n]).unwrap();
                y = g.add(y, b).unwrap();
            }
            g.output(format!("y{i}"), y);
        }
        g
    }

    fn values(ty: &crate::dtype::TensorType, seed: usize) -> Value {
        let data = (0..ty.numel()).map(|i| (((i * 7 + seed * 13) % 23) as f64 - 11.0) / 8.0).collect();
        Value::new(ty.clone(), data).unwrap()
    }

    /// The outputs of `g` and `out` in the interpreter on the same inputs and weights.
    fn both_outputs(g: &Graph, out: &Graph) -> (HashMap<String, Value>, HashMap<String, Value>) {
        let (mut ins, mut ws) = (HashMap::new(), HashMap::new());
        for (i, n) in g.nodes.iter().enumerate() {
            match &n.op {
                Op::Input { name } => drop(ins.insert(name.clone(), values(&n.ty, i))),
                Op::Weight { name } => drop(ws.insert(name.clone(), values(&n.ty, i))),
                _ => {}
            }
        }
        let (a, b) = (run(g, &ins, &ws).unwrap(), run(out, &ins, &ws).unwrap());
        assert_eq!(a.len(), b.len());
        (a, b)
    }

    /// Runs `g` and `out` in the interpreter on the same inputs and weights; every output equal.
    fn same_outputs(g: &Graph, out: &Graph) {
        let (a, b) = both_outputs(g, out);
        for (name, v) in &a {
            assert_eq!(v.ty, b[name].ty, "{name}");
            for (x, y) in v.data.iter().zip(&b[name].data) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{name}: {x} vs {y}");
            }
        }
    }

    fn count(g: &Graph, f: impl Fn(&Op) -> bool) -> usize {
        g.nodes.iter().filter(|n| f(&n.op)).count()
    }

    fn matmuls(g: &Graph) -> usize {
        count(g, |op| matches!(op, Op::MatMul { .. }))
    }

    #[test]
    fn qkv_with_biases_become_one_stacked_product() {
        // 4 rows of 16 f32 columns: each projection's block is 256 bytes.
        let g = projections(4, 8, &[16, 16, 16], &[true, true, true]);
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 1);
        assert_eq!(count(&out, |op| matches!(op, Op::Binary(BinaryOp::Add))), 1);
        let names: Vec<&str> = out.weights().map(|(_, n, _)| n).collect();
        assert_eq!(names, ["~stack(w0|w1|w2)", "~stack(b0|b1|b2)"]);
        let mm = out.nodes.iter().find(|n| matches!(n.op, Op::MatMul { .. })).unwrap();
        assert_eq!(mm.ty.shape, [3, 4, 16]);
        // Every slice of the product is a view: no step computes it.
        for n in out.nodes.iter().enumerate().filter(|(_, n)| matches!(n.op, Op::Slice { .. })) {
            assert!(crate::plan::slice_view_offset(&out, NodeId(n.0 as u32)).is_some());
        }
        same_outputs(&g, &out);
        crate::verify::verify(&out).unwrap();
    }

    #[test]
    fn grouped_query_projections_stack_the_ones_of_one_shape() {
        // q has twice k's and v's columns: k and v stack, q stays its own product.
        let g = projections(4, 8, &[32, 16, 16], &[false, false, false]);
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 2);
        assert!(out.weights().any(|(_, n, t)| n == "~stack(w1|w2)" && t.shape == [2, 16, 8]));
        assert!(out.weights().any(|(_, n, _)| n == "w0"));
        same_outputs(&g, &out);
    }

    /// `x [1, k]` (one row) projected by transposed weights `w{i}` of `[n_i, k]`.
    fn one_row(k: usize, ns: &[usize]) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[1, k]).unwrap();
        for (i, &n) in ns.iter().enumerate() {
            let w = g.weight(&format!("w{i}"), DType::F32, &[n, k]).unwrap();
            let y = g.matmul(x, w, true).unwrap();
            g.output(format!("y{i}"), y);
        }
        g
    }

    #[test]
    fn one_row_projections_of_different_widths_become_one_product() {
        // Decode's Q (128 columns) beside K and V (64 each): a [4, 1, 64] product, Q its
        // first two slices. Each slice is 256 bytes: every member a view.
        let g = one_row(8, &[128, 64, 64]);
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 1);
        assert!(out.weights().any(|(_, n, t)| n == "~stack(w0|w1|w2)" && t.shape == [4, 64, 8]), "{}", crate::print::print(&out));
        let mm = out.nodes.iter().find(|n| matches!(n.op, Op::MatMul { .. })).unwrap();
        assert_eq!(mm.ty.shape, [4, 1, 64]);
        let slices: Vec<(usize, usize)> = out
            .nodes
            .iter()
            .filter_map(|n| match n.op {
                Op::Slice { start, end, .. } => Some((start, end)),
                _ => None,
            })
            .collect();
        assert_eq!(slices, [(0, 2), (2, 3), (3, 4)]);
        for (i, n) in out.nodes.iter().enumerate() {
            if matches!(n.op, Op::Slice { .. }) {
                assert!(crate::plan::slice_view_offset(&out, NodeId(i as u32)).is_some());
            }
        }
        same_outputs(&g, &out);
        crate::verify::verify(&out).unwrap();
        // Order in the stack follows the members': the wide one may come last.
        let g = one_row(8, &[64, 64, 192]);
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 1);
        same_outputs(&g, &out);
    }

    #[test]
    fn different_widths_stack_only_with_one_row_and_whole_multiples() {
        // Two rows: the slices would interleave Q's columns with rows; K and V stack alone.
        let g = projections(2, 8, &[128, 64, 64], &[false, false, false]);
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 2);
        same_outputs(&g, &out);
        // 96 is no multiple of 64: the equal pair stacks, the other stays.
        let out = stack_projections(&one_row(8, &[96, 64, 64])).unwrap();
        assert_eq!(matmuls(&out), 2);
        // The narrowest block (32 f32 = 128 bytes) is less than an arena block: unchanged.
        let g = one_row(8, &[64, 32, 32]);
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 3);
    }

    /// Runs `g` and `out` in the interpreter on the same inputs and weights (values of `dtype`'s
    /// precision); every output equal bit for bit.
    fn identical_outputs(g: &Graph, out: &Graph) {
        let (a, b) = both_outputs(g, out);
        for (name, v) in &a {
            assert_eq!(v.ty, b[name].ty, "{name}");
            let same = v.data.iter().zip(&b[name].data).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name} differs");
        }
    }

    /// `x [rows, k]` of `dtype` projected by transposed weights `w{i}` of `[n_i, k]`, each
    /// product read as `[1, rows, n_i / hd, hd]` (heads) and an output.
    fn heads(dtype: DType, rows: usize, k: usize, ns: &[usize], hd: usize) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", dtype, &[rows, k]).unwrap();
        for (i, &n) in ns.iter().enumerate() {
            let w = g.weight(&format!("w{i}"), dtype, &[n, k]).unwrap();
            let y = g.matmul(x, w, true).unwrap();
            let y = g.reshape(y, &[1, rows, n / hd, hd]).unwrap();
            g.output(format!("y{i}"), y);
        }
        g
    }

    #[test]
    fn rows_of_different_widths_stack_with_the_wide_one_read_through_a_permute() {
        // Prefill's Q (4 heads of 16) beside K and V (2 heads each) over 4 rows: a [4, 4, 32]
        // product; each f32 plane is 512 bytes, bf16 256.
        for dtype in [DType::F32, DType::BF16] {
            let g = heads(dtype, 4, 8, &[64, 32, 32], 16);
            // Without the third form, K and V stack alone (Q keeps its own product).
            assert_eq!(matmuls(&stack_projections(&g).unwrap()), 2);
            let out = stack_projections_rows(&g).unwrap();
            assert_eq!(matmuls(&out), 1);
            assert!(out.weights().any(|(_, n, t)| n == "~stack(w0|w1|w2)" && t.shape == [4, 32, 8]));
            let mm = out.nodes.iter().find(|n| matches!(n.op, Op::MatMul { .. })).unwrap();
            assert_eq!(mm.ty.shape, [4, 4, 32]);
            let perms: Vec<&[usize]> = out
                .nodes
                .iter()
                .filter_map(|n| match &n.op {
                    Op::Permute { perm } => Some(perm.as_slice()),
                    _ => None,
                })
                .collect();
            assert_eq!(perms, [[1, 0, 2]], "{}", crate::print::print(&out));
            // Every slice is a view: only Q's permute reorders bytes.
            for (i, n) in out.nodes.iter().enumerate() {
                if matches!(n.op, Op::Slice { .. }) {
                    assert!(crate::plan::slice_view_offset(&out, NodeId(i as u32)).is_some());
                }
            }
            identical_outputs(&g, &out);
            crate::verify::verify(&out).unwrap();
        }
        // The wide member last, and three slices wide: still the interpreter's values.
        let g = heads(DType::F32, 4, 8, &[32, 32, 96], 16);
        let out = stack_projections_rows(&g).unwrap();
        assert_eq!(matmuls(&out), 1);
        identical_outputs(&g, &out);
        // One row: the second form, no permute.
        let out = stack_projections_rows(&one_row(8, &[128, 64, 64])).unwrap();
        assert_eq!((matmuls(&out), count(&out, |op| matches!(op, Op::Permute { .. }))), (1, 0));
    }

    #[test]
    fn rows_stack_only_where_each_plane_is_whole_arena_blocks() {
        // 2 rows of 16 f32 columns: 128-byte planes, not a block: K and V do not stack either.
        let g = heads(DType::F32, 2, 8, &[32, 16, 16], 16);
        let out = stack_projections_rows(&g).unwrap();
        assert_eq!(matmuls(&out), 3);
        // 48 is no multiple of 32: the equal pair stacks in the first form.
        let g = heads(DType::F32, 4, 8, &[48, 32, 32], 16);
        let out = stack_projections_rows(&g).unwrap();
        assert_eq!((matmuls(&out), count(&out, |op| matches!(op, Op::Permute { .. }))), (2, 0));
        identical_outputs(&g, &out);
    }

    #[test]
    fn biases_stack_only_when_every_projection_has_one() {
        let g = projections(4, 8, &[16, 16], &[true, false]);
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 1);
        assert!(out.weights().any(|(_, n, _)| n == "b0"));
        same_outputs(&g, &out);
    }

    #[test]
    fn weights_read_through_reshapes_stack_in_their_stored_shape() {
        // big_vision's layout: kernels `[K, H, hd]` read as `[K, H*hd]` (not transposed),
        // biases `[H, hd]` read as `[H*hd]`.
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4, 8]).unwrap();
        for i in 0..3 {
            let w = g.weight(&format!("w{i}"), DType::F32, &[8, 2, 8]).unwrap();
            let w = g.reshape(w, &[8, 16]).unwrap();
            let b = g.weight(&format!("b{i}"), DType::F32, &[2, 8]).unwrap();
            let b = g.reshape(b, &[16]).unwrap();
            let y = g.matmul(x, w, false).unwrap();
            let y = g.add(y, b).unwrap();
            g.output(format!("y{i}"), y);
        }
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 1);
        let ws: Vec<(String, Vec<usize>)> = out.weights().map(|(_, n, t)| (n.to_string(), t.shape.clone())).collect();
        assert_eq!(ws, [("~stack(w0|w1|w2)".to_string(), vec![3, 8, 2, 8]), ("~stack(b0|b1|b2)".to_string(), vec![3, 2, 8])]);
        same_outputs(&g, &out);
    }

    #[test]
    fn a_shared_input_that_is_a_weight_stays() {
        // `x` is read only by the products the pass removes, yet the stack reads it.
        let mut g = Graph::new();
        let x = g.weight("x", DType::F32, &[4, 8]).unwrap();
        for i in 0..2 {
            let w = g.weight(&format!("w{i}"), DType::F32, &[16, 8]).unwrap();
            let y = g.matmul(x, w, true).unwrap();
            g.output(format!("y{i}"), y);
        }
        let out = stack_projections(&g).unwrap();
        assert_eq!(matmuls(&out), 1);
        same_outputs(&g, &out);
    }

    #[test]
    fn unaligned_blocks_leave_the_graph_unchanged() {
        // 4 rows of 12 f32 columns: 192 bytes per block, so slices 1 and 2 would be copies.
        let g = projections(4, 8, &[12, 12, 12], &[true, true, true]);
        let out = stack_projections(&g).unwrap();
        assert_eq!(crate::print::print(&out), crate::print::print(&g));
    }

    #[test]
    fn a_lone_or_repeated_weight_is_not_a_stack() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4, 8]).unwrap();
        let w = g.weight("w", DType::F32, &[16, 8]).unwrap();
        let a = g.matmul(x, w, true).unwrap();
        let b = g.matmul(x, w, true).unwrap();
        g.output("a", a);
        g.output("b", b);
        let out = stack_projections(&g).unwrap();
        assert_eq!(crate::print::print(&out), crate::print::print(&g));
    }

    #[test]
    fn a_stack_of_parts_with_the_wrong_shape_is_an_interpreter_error() {
        let mut g = Graph::new();
        let w = g.weight("~stack(a|b)", DType::F32, &[2, 4]).unwrap();
        g.output("w", w);
        let ws: HashMap<String, Value> = [
            ("a".to_string(), values(&crate::dtype::TensorType::new(DType::F32, [4]), 0)),
            ("b".to_string(), values(&crate::dtype::TensorType::new(DType::F32, [3]), 0)),
        ]
        .into();
        let e = run(&g, &HashMap::new(), &ws).unwrap_err().to_string();
        assert!(e.contains("expected f32[4]"), "{e}");
    }
}
