//! The memory planner: every intermediate of a scheduled graph gets a byte range in one arena.
//!
//! Liveness comes from the order: an input is live from step 0, a node from the step that
//! computes it, each until the last step that reads it; graph outputs stay live to the end.
//! A reshape is a view: it shares its input's buffer (whose liveness then covers the reshape's
//! readers), and a reshape of a weight or constant is a view of that and needs no arena bytes.
//! So is a slice of a step's value that selects one contiguous range at an aligned offset
//! ([`slice_view_offset`]): its slot is a part of its input's.
//! Offsets are assigned greedily by size with best fit among the gaps left by buffers whose
//! lifetimes overlap (Pisarchyk & Lee, "Efficient Memory Management for Deep Neural Net
//! Inference", 2020); a few orderings are tried and the smallest arena kept.

use crate::error::{GraphError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::Op;
use crate::program::PlanStats;
use std::fmt::Write;

pub use crate::program::ALIGN;

/// `bytes` rounded up to a multiple of [`ALIGN`].
pub fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN).saturating_mul(ALIGN)
}

/// Where a slice that is a view starts in its input's buffer, in bytes: a slice whose elements
/// are one contiguous range (step 1 or one index, every axis before the sliced one of size 1)
/// starting at a multiple of [`ALIGN`], of a value computed by a step (sources' slots carry
/// no offset). `None` for every other node.
pub fn slice_view_offset(g: &Graph, id: NodeId) -> Option<usize> {
    let n = g.nodes.get(id.index())?;
    let Op::Slice { axis, start, end, step } = n.op else { return None };
    let x = *n.inputs.first()?;
    let shape = &g.nodes.get(x.index())?.ty.shape;
    let contiguous = (step == 1 || end - start == 1) && end > start && shape.get(..axis)?.iter().all(|&s| s == 1);
    let offset = start * shape.get(axis + 1..)?.iter().product::<usize>() * n.ty.dtype.size();
    let computed = !g.nodes.get(view_root(g, x).index())?.op.is_source();
    (contiguous && offset % ALIGN == 0 && computed).then_some(offset)
}

/// Whether node `id` is a view of another node's buffer (no step computes it): a reshape, or a
/// slice at [`slice_view_offset`].
pub fn is_view(g: &Graph, id: NodeId) -> bool {
    g.nodes.get(id.index()).is_some_and(|n| matches!(n.op, Op::Reshape { .. })) || slice_view_offset(g, id).is_some()
}

/// The node whose buffer `id` reads: `id` itself, or the source of a chain of views.
pub fn view_root(g: &Graph, id: NodeId) -> NodeId {
    let mut id = id;
    while is_view(g, id) {
        match g.nodes[id.index()].inputs.first() {
            Some(&x) => id = x,
            None => break,
        }
    }
    id
}

/// Where `id`'s bytes start in its [`view_root`]'s buffer (0 unless a slice view is on the way).
pub fn view_offset(g: &Graph, id: NodeId) -> usize {
    let (mut id, mut offset) = (id, 0);
    while is_view(g, id) {
        offset += slice_view_offset(g, id).unwrap_or(0);
        match g.nodes[id.index()].inputs.first() {
            Some(&x) => id = x,
            None => break,
        }
    }
    offset
}

/// Whether a slice view lies between `id` and its [`view_root`] (its bytes are a part of the
/// root's, possibly at an offset).
pub fn is_slice_view(g: &Graph, id: NodeId) -> bool {
    let mut id = id;
    while is_view(g, id) {
        if slice_view_offset(g, id).is_some() {
            return true;
        }
        match g.nodes[id.index()].inputs.first() {
            Some(&x) => id = x,
            None => break,
        }
    }
    false
}

/// Whether a node's buffer lives in the arena (weights and constants live elsewhere).
pub fn in_arena(op: &Op) -> bool {
    !matches!(op, Op::Weight { .. } | Op::Constant { .. })
}

/// One arena buffer: the value of a runtime input or of a step, with its live steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// The node that owns the buffer (reshapes of it are views).
    pub node: NodeId,
    /// Byte offset in the arena (a multiple of [`ALIGN`]).
    pub offset: usize,
    /// The value's size in bytes.
    pub bytes: usize,
    /// The space it takes: `bytes` rounded up to [`ALIGN`].
    pub size: usize,
    /// The first step at which it is live (0 for inputs).
    pub first: usize,
    /// The last step at which it is live (inclusive).
    pub last: usize,
}

/// Where every intermediate lives, with the plan's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Per node: `(offset, bytes)` in the arena, for inputs, steps and views of them.
    pub slots: Vec<Option<(usize, usize)>>,
    /// The buffers, inputs first, then in step order.
    pub buffers: Vec<Buffer>,
    /// Number of steps (the order without its views).
    pub steps: usize,
    /// Size of the arena: the planned peak.
    pub arena_bytes: usize,
    /// Peak, lower bound and no-reuse figures.
    pub stats: PlanStats,
}

impl MemoryPlan {
    /// The arena range `(offset, bytes)` of a node, if it lives in the arena.
    pub fn slot(&self, id: NodeId) -> Option<(usize, usize)> {
        self.slots.get(id.index()).copied().flatten()
    }
}

fn invalid(msg: String) -> GraphError {
    GraphError::Pass { pass: "plan", msg }
}

/// Checks an order against the graph; gives which nodes it holds, each node's step (`None`
/// for views and nodes outside the order) and the number of steps.
fn steps_of(g: &Graph, order: &[NodeId]) -> Result<(Vec<bool>, Vec<Option<usize>>, usize)> {
    let n = g.nodes.len();
    let mut scheduled = vec![false; n];
    let mut step = vec![None; n];
    let mut steps = 0;
    for &id in order {
        let node = g.nodes.get(id.index()).ok_or_else(|| invalid(format!("order names {id} of {n} nodes")))?;
        if node.op.is_source() {
            return Err(invalid(format!("order names {id}, a {} (sources are not steps)", node.op.name())));
        }
        if scheduled[id.index()] {
            return Err(invalid(format!("order names {id} twice")));
        }
        for &x in &node.inputs {
            let ready = g.nodes.get(x.index()).is_some_and(|m| m.op.is_source()) || scheduled.get(x.index()) == Some(&true);
            if !ready {
                return Err(invalid(format!("{id} ({}) reads {x}, which the order does not compute before it", node.op.name())));
            }
        }
        scheduled[id.index()] = true;
        if !is_view(g, id) {
            step[id.index()] = Some(steps);
            steps += 1;
        }
    }
    for (name, id) in &g.outputs {
        let ok = g.nodes.get(id.index()).is_some_and(|m| m.op.is_source()) || scheduled.get(id.index()) == Some(&true);
        if !ok {
            return Err(invalid(format!("output '{name}' ({id}) is not computed by the order")));
        }
    }
    Ok((scheduled, step, steps))
}

/// Plans the arena for a graph run in `order` (as made by [`crate::sched::schedule`]).
pub fn plan(g: &Graph, order: &[NodeId]) -> Result<MemoryPlan> {
    plan_with(g, order, &[])
}

/// Like [`plan`], leaving out of the arena the nodes marked in `outside` (indexed by node;
/// shorter means false): values held in persistent state, and reshape views of them.
pub fn plan_with(g: &Graph, order: &[NodeId], outside: &[bool]) -> Result<MemoryPlan> {
    let n = g.nodes.len();
    let outside = |id: NodeId| outside.get(id.index()).copied().unwrap_or(false);
    let (scheduled, step, steps) = steps_of(g, order)?;
    let end = steps.max(1) - 1;

    // Buffers: every input, then every step; `owner[node]` is the buffer's index.
    let mut owner = vec![None; n];
    let mut bufs: Vec<Buffer> = Vec::new();
    let mut add = |id: NodeId, first: usize, bufs: &mut Vec<Buffer>| {
        let bytes = g.nodes[id.index()].ty.bytes();
        owner[id.index()] = Some(bufs.len());
        bufs.push(Buffer { node: id, offset: 0, bytes, size: aligned(bytes), first, last: first });
    };
    for (id, _, _) in g.inputs() {
        if !outside(id) {
            add(id, 0, &mut bufs);
        }
    }
    for &id in order {
        if let (Some(s), false) = (step[id.index()], outside(id)) {
            add(id, s, &mut bufs);
        }
    }
    for &id in order {
        let Some(s) = step[id.index()] else { continue };
        for &x in &g.nodes[id.index()].inputs {
            if let Some(b) = owner[view_root(g, x).index()] {
                bufs[b].last = bufs[b].last.max(s);
            }
        }
    }
    // A buffer whose last reader is a light step lives to the end of that run of light steps,
    // so that no step of the run writes over what another reads: backends may then run the run
    // as one launch (cpu's groups of rotations and cache writes, cuda's `_x2` pairs).
    let mut light = vec![false; steps];
    for &id in order {
        if let Some(s) = step[id.index()] {
            light[s] = is_light(g, id);
        }
    }
    for b in bufs.iter_mut().filter(|b| light.get(b.last) == Some(&true)) {
        while b.last < end && light[b.last + 1] {
            b.last += 1;
        }
    }
    // The rows a slice write stores live until the first step that reads what it wrote, so a
    // backend may read them there instead of the destination (cuda's decode attention takes K's
    // and V's new rows itself and stores them: `runtime/src/cuda/lower/kv_write.rs`).
    let mut first_reader: Vec<Option<usize>> = vec![None; n];
    for &id in order {
        if let Some(s) = step[id.index()] {
            for &x in &g.nodes[id.index()].inputs {
                first_reader[view_root(g, x).index()].get_or_insert(s);
            }
        }
    }
    for &id in order {
        let (Some(s), Op::WriteSlice { .. }) = (step[id.index()], &g.nodes[id.index()].op) else { continue };
        let rows = g.nodes[id.index()].inputs.get(1).and_then(|&x| owner[view_root(g, x).index()]);
        if let (Some(b), Some(r)) = (rows, first_reader[id.index()]) {
            if bufs[b].last >= s {
                bufs[b].last = bufs[b].last.max(r);
            }
        }
    }
    // The source of a permute read only by elementwise steps (RoPE rotations included) lives as
    // long as the permute's output, so a backend may have those readers read the source through
    // strides instead (cuda: `runtime/src/cuda/lower/permute.rs`).
    for &id in order {
        let (Some(_), Op::Permute { .. }) = (step[id.index()], &g.nodes[id.index()].op) else { continue };
        let (Some(pb), Some(sb)) = (owner[id.index()], owner[view_root(g, g.nodes[id.index()].inputs[0]).index()]) else { continue };
        let elementwise = order.iter().filter(|r| step[r.index()].is_some()).all(|&r| {
            let node = &g.nodes[r.index()];
            let reads = node.inputs.iter().any(|&x| view_root(g, x) == id);
            !reads || node.op.elementwise_expr().is_some() || is_light(g, r) && matches!(node.op, Op::MatMul { .. })
        });
        if elementwise {
            bufs[sb].last = bufs[sb].last.max(bufs[pb].last);
        }
    }
    for (_, id) in &g.outputs {
        if let Some(b) = owner[view_root(g, *id).index()] {
            bufs[b].last = end;
        }
    }

    let stats_lb = lower_bound(&bufs, end);
    let no_reuse = bufs.iter().map(|b| b.size).sum();
    let (offsets, peak) = best_assignment(&bufs, stats_lb);
    for (b, off) in bufs.iter_mut().zip(offsets) {
        b.offset = off;
    }

    let mut slots = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let b = match (owner[i], scheduled[i]) {
            (Some(b), _) => Some(b),
            // A scheduled node without a buffer of its own is a view (a reshape, an aligned
            // contiguous slice) into its root's.
            (None, true) => owner[view_root(g, NodeId(i as u32)).index()],
            (None, false) => None,
        };
        slots[i] = b.map(|b| (bufs[b].offset + view_offset(g, NodeId(i as u32)), node.ty.bytes()));
    }
    Ok(MemoryPlan { slots, buffers: bufs, steps, arena_bytes: peak, stats: PlanStats { peak, lower_bound: stats_lb, no_reuse } })
}

/// Whether node `id` is a light step: a concat, a slice write, or a product by a constant (a
/// RoPE rotation, `x @ P`): data movement that backends may run beside its neighbours.
fn is_light(g: &Graph, id: NodeId) -> bool {
    let node = &g.nodes[id.index()];
    match node.op {
        Op::Concat { .. } | Op::WriteSlice { .. } => true,
        Op::MatMul { .. } => node.inputs.get(1).is_some_and(|&p| matches!(g.nodes[view_root(g, p).index()].op, Op::Constant { .. })),
        _ => false,
    }
}

/// The largest sum of sizes live at one step: no placement can use less.
fn lower_bound(bufs: &[Buffer], end: usize) -> usize {
    let mut delta = vec![0i128; end + 2];
    for b in bufs {
        delta[b.first] += b.size as i128;
        delta[b.last + 1] -= b.size as i128;
    }
    let (mut live, mut best) = (0i128, 0i128);
    for d in delta {
        live += d;
        best = best.max(live);
    }
    best as usize
}

/// Tries a few placement orders, each with best and with first fit, and keeps the smallest
/// arena (stopping early at the lower bound). Greedy by size alone misses the bound by ~10%
/// on a ViT whose attention is decomposed (many equal-sized buffers); ties broken by start
/// time reach it there.
fn best_assignment(bufs: &[Buffer], lower_bound: usize) -> (Vec<usize>, usize) {
    let len = |i: usize| (bufs[i].last - bufs[i].first) as u128;
    let size = |i: usize| bufs[i].size as u128;
    let start = |i: usize| bufs[i].first as u128;
    let sorted = |key: &dyn Fn(usize) -> (u128, u128, u128)| {
        let mut v: Vec<usize> = (0..bufs.len()).collect();
        v.sort_by_key(|&i| (key(i), i));
        v
    };
    let orders = [
        sorted(&|i| (u128::MAX - size(i), start(i), 0)),
        sorted(&|i| (u128::MAX - size(i), u128::MAX - len(i), start(i))),
        sorted(&|i| (u128::MAX - size(i) * (len(i) + 1), start(i), 0)),
        sorted(&|i| (u128::MAX - len(i), u128::MAX - size(i), start(i))),
        sorted(&|i| (start(i), u128::MAX - size(i), 0)),
    ];
    let mut best: Option<(Vec<usize>, usize)> = None;
    for order in &orders {
        for first_fit in [false, true] {
            let (offs, peak) = assign(bufs, order, first_fit);
            if best.as_ref().is_none_or(|(_, p)| peak < *p) {
                best = Some((offs, peak));
            }
            if peak <= lower_bound {
                return best.unwrap_or_default();
            }
        }
    }
    best.unwrap_or_default()
}

/// Places buffers in the given order, each in the smallest gap (or with `first_fit` the
/// lowest gap) between already placed buffers whose lifetimes overlap its own, or above them
/// all when no gap fits.
fn assign(bufs: &[Buffer], order: &[usize], first_fit: bool) -> (Vec<usize>, usize) {
    let mut offs = vec![0; bufs.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(bufs.len());
    let mut near: Vec<(usize, usize)> = Vec::new();
    let mut peak = 0;
    for &i in order {
        let b = &bufs[i];
        near.clear();
        near.extend(
            placed
                .iter()
                .filter(|&&j| bufs[j].first <= b.last && b.first <= bufs[j].last && bufs[j].size > 0)
                .map(|&j| (offs[j], offs[j] + bufs[j].size)),
        );
        near.sort_unstable();
        let mut fit: Option<(usize, usize)> = None; // (gap, offset)
        let mut top = 0;
        for &(start, stop) in &near {
            if start > top {
                let gap = start - top;
                if gap >= b.size && fit.is_none_or(|(g, _)| gap < g && !first_fit) {
                    fit = Some((gap, top));
                }
            }
            top = top.max(stop);
        }
        offs[i] = fit.map_or(top, |(_, o)| o);
        peak = peak.max(offs[i] + b.size);
        placed.push(i);
    }
    (offs, peak)
}

fn mib(bytes: usize) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ratio(a: usize, b: usize) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.3}x", a as f64 / b as f64)
    }
}

/// The plan as text for `kiln inspect`: one line per buffer, then the figures.
pub fn report(plan: &MemoryPlan, g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "memory plan: {} buffers over {} steps, arena {} bytes ({})",
        plan.buffers.len(),
        plan.steps,
        plan.arena_bytes,
        mib(plan.arena_bytes)
    );
    let _ = writeln!(s, "  {:>7}  {:<14} {:>12} {:>12}  live", "node", "op", "offset", "bytes");
    for b in &plan.buffers {
        let op = g.nodes.get(b.node.index()).map_or("?", |n| n.op.name());
        let _ = writeln!(s, "  {:>7}  {:<14} {:>12} {:>12}  [{}, {}]", b.node.to_string(), op, b.offset, b.bytes, b.first, b.last);
    }
    let st = &plan.stats;
    let _ = writeln!(s, "peak        {:>14} bytes ({}), {} the lower bound", st.peak, mib(st.peak), ratio(st.peak, st.lower_bound));
    let _ = writeln!(s, "lower bound {:>14} bytes ({})", st.lower_bound, mib(st.lower_bound));
    let _ = writeln!(s, "no reuse    {:>14} bytes ({}), {} the peak", st.no_reuse, mib(st.no_reuse), ratio(st.no_reuse, st.peak));
    s
}

#[cfg(test)]
mod light_tests {
    use super::*;
    use crate::DType;

    #[test]
    fn a_buffer_read_by_a_light_step_lives_through_the_run_of_light_steps() {
        // x @ P (a rotation by a constant) then two concats, all light; then an exp.
        let mut g = Graph::default();
        let x = g.input("x", DType::F32, &[4, 8]).unwrap();
        let p = g.constant(DType::F32, &[8, 8], vec![0.0; 64]).unwrap();
        let w = g.weight("w", DType::F32, &[8, 8]).unwrap();
        let y = g.matmul(x, w, false).unwrap();
        let r = g.matmul(y, p, false).unwrap();
        let c1 = g.concat(&[x, x], 0).unwrap();
        let c2 = g.concat(&[c1, c1], 0).unwrap();
        let e = g.unary(crate::UnaryOp::Exp, c2).unwrap();
        g.output("r", r);
        g.output("e", e);
        let order = [y, r, c1, c2, e];
        let m = plan_with(&g, &order, &[]).unwrap();
        let buf = |id: NodeId| m.buffers.iter().find(|b| b.node == id).unwrap();
        // y's last reader is the rotation (step 1): it lives through the concats (steps 2, 3),
        // which are light, not through the exp (step 4).
        assert_eq!((buf(y).first, buf(y).last), (0, 3));
        // c1's last reader, c2, is light, and the exp after it is not.
        assert_eq!(buf(c1).last, 3);
        assert!(is_light(&g, r) && is_light(&g, c1) && !is_light(&g, y) && !is_light(&g, e));
    }

    #[test]
    fn a_slice_writes_rows_live_until_the_first_reader_of_what_it_wrote() {
        // rows = exp(x); cache' = write_slice(cache, rows, at); an exp between; then a reader.
        let mut g = Graph::default();
        let cache = g.input("cache", DType::F32, &[1, 8, 4]).unwrap();
        let x = g.input("x", DType::F32, &[1, 1, 4]).unwrap();
        let at = g.input("at", DType::I64, &[1]).unwrap();
        let rows = g.unary(crate::UnaryOp::Exp, x).unwrap();
        let w = g.write_slice(cache, rows, at, 1).unwrap();
        let other = g.unary(crate::UnaryOp::Neg, x).unwrap();
        let read = g.unary(crate::UnaryOp::Abs, w).unwrap();
        g.output("read", read);
        g.output("other", other);
        let m = plan_with(&g, &[rows, w, other, read], &[]).unwrap();
        let buf = |id: NodeId| m.buffers.iter().find(|b| b.node == id).unwrap();
        // The write is step 1 (rows' last reader); the reader of its value is step 3.
        assert_eq!(buf(rows).last, 3);
    }
}
