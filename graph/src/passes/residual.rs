//! A residual add between two RMS norms as one step: `n = rms_norm(h, w_pre)` with
//! `h = x + rms_norm(o, w_post)` (Gemma 2's post-norms) or `h = x + o` (Gemma 1) becomes one
//! [`Op::ResidualRmsNorm`] whose output holds `h` and `n` in two halves; `h` and `n` become
//! slices of it that the planner makes views (each half starts on an arena boundary), so the
//! readers of `h` (the next residual add) and of `n` read its buffer in place. Three launches
//! (norm, add, norm) become one per junction: two per Gemma 2 layer, and the final norm.

use super::{copy_mapped, copy_node, map_outputs, same_type, Uses};
use crate::error::{GraphError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::{BinaryOp, Op, ResidualRmsNorm};
use crate::plan::ALIGN;

/// One junction found in the old graph.
struct Junction {
    /// The norm of the sum (its value becomes the second half).
    norm: usize,
    x: NodeId,
    o: NodeId,
    /// The norm of `o` and its weight, when `o` is normalised.
    post: Option<(NodeId, NodeId)>,
    w_pre: NodeId,
    attrs: ResidualRmsNorm,
}

/// The fewest rows, at least `rows`, whose `d` elements of `size` bytes fill whole [`ALIGN`]
/// blocks.
pub fn padded_rows(rows: usize, d: usize, size: usize) -> usize {
    let row = d * size;
    if row == 0 {
        return rows;
    }
    let step = ALIGN / gcd(ALIGN, row);
    rows.div_ceil(step) * step
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The junction whose sum is node `h`, if `h` is an add read by an RMS norm as its input.
fn junction(g: &Graph, uses: &Uses, absorbed: &[bool], h: usize, norm: usize) -> Option<Junction> {
    let (hn, nn) = (&g.nodes[h], &g.nodes[norm]);
    let Op::RmsNorm { eps, add_one } = nn.op else { return None };
    if nn.inputs[0].index() != h || !matches!(hn.op, Op::Binary(BinaryOp::Add)) || !hn.ty.dtype.is_float() || hn.ty.rank() == 0 {
        return None;
    }
    let (a, b) = (hn.inputs[0], hn.inputs[1]);
    if g.ty(a) != &hn.ty || g.ty(b) != &hn.ty || a == b {
        return None;
    }
    // The normalised operand: a norm with the same attributes that only the add reads (and
    // that no other junction takes).
    let post_norm = |p: NodeId| match g.node(p).op {
        Op::RmsNorm { eps: e, add_one: one }
            if e == eps && one == add_one && uses.sole_reader(p.index()) == Some(h) && !absorbed[p.index()] =>
        {
            Some((p, g.node(p).inputs[1]))
        }
        _ => None,
    };
    let (x, o, post) = match (post_norm(a), post_norm(b)) {
        (_, Some(p)) => (a, g.node(p.0).inputs[0], Some(p)),
        (Some(p), None) => (b, g.node(p.0).inputs[0], Some(p)),
        (None, None) => (a, b, None),
    };
    let w_pre = nn.inputs[1];
    // Everything but a source must be computed before the sum, where the fused node goes.
    if !g.node(w_pre).op.is_source() && w_pre.index() > h {
        return None;
    }
    let d = *hn.ty.shape.last()?;
    let rows = hn.ty.numel() / d.max(1);
    let rows_pad = padded_rows(rows, d, hn.ty.dtype.size());
    Some(Junction { norm, x, o, post, w_pre, attrs: ResidualRmsNorm { eps, add_one, post: post.is_some(), rows_pad } })
}

/// `r`'s rows `start..start + rows` in `like`'s shape.
fn half(out: &mut Graph, r: NodeId, start: usize, like: &crate::dtype::TensorType) -> Result<NodeId> {
    let d = *like.shape.last().unwrap_or(&1);
    let rows = like.numel() / d.max(1);
    let s = out.slice(r, 0, start, start + rows)?;
    if like.shape.as_slice() == [rows, d] {
        Ok(s)
    } else {
        out.reshape(s, &like.shape)
    }
}

/// Rewrites every such junction (see the module doc).
pub fn residual_rms_norm(g: &Graph) -> Result<Graph> {
    let uses = Uses::of(g);
    let n = g.nodes.len();
    // Per sum node: its junction (the first norm reading it); per norm: whether it goes.
    let mut at: Vec<Option<Junction>> = (0..n).map(|_| None).collect();
    let mut absorbed = vec![false; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let Some(&h) = node.inputs.first() else { continue };
        if at[h.index()].is_some() || !matches!(node.op, Op::RmsNorm { .. }) {
            continue;
        }
        if let Some(j) = junction(g, &uses, &absorbed, h.index(), i) {
            absorbed[i] = true;
            if let Some((p, _)) = j.post {
                // The post-norm's only reader is the sum: it is computed inside the new node.
                absorbed[p.index()] = true;
            }
            at[h.index()] = Some(j);
        }
    }
    let err = |msg: String| GraphError::Pass { pass: "residual_rms_norm", msg };
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; n];
    let mut second: Vec<Option<(NodeId, usize)>> = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        if map[i].is_some() {
            continue; // A source taken early by a fused node.
        }
        if let Some((r, rows_pad)) = second[i] {
            let id = half(&mut out, r, rows_pad, &node.ty)?;
            same_type("residual_rms_norm", &out, i, node, id)?;
            map[i] = Some(id);
            continue;
        }
        if absorbed[i] {
            continue;
        }
        let id = match &at[i] {
            Some(j) => {
                let mut ins = vec![j.x, j.o];
                ins.extend(j.post.map(|(_, w)| w));
                ins.push(j.w_pre);
                let mut new_ins = Vec::with_capacity(ins.len());
                for p in ins {
                    if map[p.index()].is_none() && g.node(p).op.is_source() {
                        map[p.index()] = Some(copy_node(&mut out, g.node(p), &[])?);
                    }
                    new_ins.push(map[p.index()].ok_or_else(|| err(format!("%{i} reads {p}, not yet built")))?);
                }
                let r = out.push(Op::ResidualRmsNorm(j.attrs), &new_ins)?;
                second[j.norm] = Some((r, j.attrs.rows_pad));
                half(&mut out, r, 0, &node.ty)?
            }
            None => copy_mapped("residual_rms_norm", &mut out, i, node, &map)?,
        };
        same_type("residual_rms_norm", &out, i, node, id)?;
        map[i] = Some(id);
    }
    // An absorbed post-norm is never an output (its only reader is the sum).
    map_outputs("residual_rms_norm", g, &mut out, &map)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::interp::{run, Value};
    use std::collections::HashMap;

    /// Two Gemma-like junctions on `[rows, d]` rows (`post`: Gemma 2's post-norms), the last
    /// norm and the second sum outputs; the first sum is also read by a tanh (another reader).
    fn layers(dtype: DType, rows: usize, d: usize, post: bool) -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", dtype, &[rows, d]).unwrap();
        let mut h = x;
        let mut n = x;
        for l in 0..2 {
            let w = g.weight(&format!("m{l}"), dtype, &[d, d]).unwrap();
            let mut o = g.matmul(n, w, true).unwrap();
            if post {
                let wp = g.weight(&format!("post{l}"), dtype, &[d]).unwrap();
                o = g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[o, wp]).unwrap();
            }
            h = g.add(h, o).unwrap();
            let wn = g.weight(&format!("pre{l}"), dtype, &[d]).unwrap();
            n = g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[h, wn]).unwrap();
            if l == 0 {
                let t = g.unary(crate::op::UnaryOp::Tanh, h).unwrap();
                g.output("t", t);
            }
        }
        g.output("n", n);
        g.output("h", h);
        g
    }

    fn values(g: &Graph) -> (HashMap<String, Value>, HashMap<String, Value>) {
        let mut ins = HashMap::new();
        let mut ws = HashMap::new();
        for (k, node) in g.nodes.iter().enumerate() {
            let data: Vec<f64> = (0..node.ty.numel()).map(|i| (((i * 37 + k * 11) % 23) as f64 - 11.0) / 7.0).collect();
            match &node.op {
                Op::Input { name } => drop(ins.insert(name.clone(), Value::new(node.ty.clone(), data).unwrap())),
                Op::Weight { name } => drop(ws.insert(name.clone(), Value::new(node.ty.clone(), data).unwrap())),
                _ => {}
            }
        }
        (ins, ws)
    }

    fn count(g: &Graph, name: &str) -> usize {
        g.nodes.iter().filter(|n| n.op.name() == name).count()
    }

    #[test]
    fn junctions_become_one_node_with_the_interpreters_values() {
        for (dtype, rows, d, post) in
            [(DType::F32, 3, 8, true), (DType::BF16, 3, 8, true), (DType::F32, 5, 64, false), (DType::BF16, 1, 24, true)]
        {
            let g = layers(dtype, rows, d, post);
            let out = residual_rms_norm(&g).unwrap();
            crate::verify::verify(&out).unwrap();
            assert_eq!(count(&out, "residual_rms_norm"), 2, "{dtype} {post}");
            assert_eq!(count(&out, "rms_norm"), 0, "{dtype} {post}");
            assert_eq!(count(&out, "binary"), 0, "{dtype} {post}");
            let (ins, ws) = values(&g);
            let (a, b) = (run(&g, &ins, &ws).unwrap(), run(&out, &ins, &ws).unwrap());
            for k in ["n", "h", "t"] {
                assert_eq!(a[k].data, b[k].data, "{k}: {dtype} {rows}x{d} post={post}");
            }
        }
    }

    #[test]
    fn halves_start_on_arena_boundaries_and_are_views() {
        assert_eq!(padded_rows(3, 8, 2), 16);
        assert_eq!(padded_rows(3, 64, 4), 3);
        assert_eq!(padded_rows(1, 2304, 2), 1);
        assert_eq!(padded_rows(5, 96, 2), 8);
        let g = crate::passes::Pipeline::standard().run(&layers(DType::BF16, 3, 8, true), None).unwrap();
        let order = crate::sched::schedule(&g);
        let plan = crate::plan::plan(&g, &order).unwrap();
        for (i, node) in g.nodes.iter().enumerate() {
            let Op::ResidualRmsNorm(r) = node.op else { continue };
            assert_eq!(r.rows_pad, 16);
            let (base, _) = plan.slot(NodeId(i as u32)).unwrap();
            let halves: Vec<usize> = (0..g.nodes.len())
                .filter(|&k| matches!(g.nodes[k].op, Op::Slice { .. }) && g.nodes[k].inputs[0].index() == i)
                .map(|k| {
                    assert!(crate::plan::is_view(&g, NodeId(k as u32)));
                    plan.slot(NodeId(k as u32)).unwrap().0 - base
                })
                .collect();
            assert!(halves.contains(&0) && halves.iter().all(|&o| o == 0 || o == 16 * 8 * 2), "{halves:?}");
        }
    }

    #[test]
    fn other_norms_stay() {
        // A norm of something else than a sum, a sum with a broadcast operand, norms with other eps.
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 4]).unwrap();
        let b = g.input("b", DType::F32, &[4]).unwrap();
        let w = g.weight("w", DType::F32, &[4]).unwrap();
        let n0 = g.push(Op::RmsNorm { eps: 1e-6, add_one: false }, &[x, w]).unwrap();
        let s = g.add(n0, b).unwrap();
        let n1 = g.push(Op::RmsNorm { eps: 1e-6, add_one: false }, &[s, w]).unwrap();
        let p = g.push(Op::RmsNorm { eps: 1e-5, add_one: false }, &[n1, w]).unwrap();
        let s2 = g.add(x, p).unwrap();
        let n2 = g.push(Op::RmsNorm { eps: 1e-6, add_one: false }, &[s2, w]).unwrap();
        g.output("y", n2);
        let out = residual_rms_norm(&g).unwrap();
        // Only the last junction, and without its differently-configured post-norm.
        let fused: Vec<_> = out.nodes.iter().filter_map(|n| if let Op::ResidualRmsNorm(r) = n.op { Some(r.post) } else { None }).collect();
        assert_eq!(fused, [false]);
        let (ins, ws) = values(&g);
        assert_eq!(run(&g, &ins, &ws).unwrap()["y"].data, run(&out, &ins, &ws).unwrap()["y"].data);
    }
}
