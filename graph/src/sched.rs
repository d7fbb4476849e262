//! The scheduler: an order of the steps that keeps every dependency and a low peak of live
//! memory.
//!
//! List scheduling: among the ready nodes, run the one that grows live memory least (bytes
//! it allocates minus bytes it frees, sizes rounded up to [`ALIGN`]), ties to the lower node
//! index. A reshape is a view and costs nothing, so it runs as soon as it is ready. Costs
//! only fall as other readers of a buffer finish, so a heap with stale entries skipped on
//! pop keeps it O(n log n).
//!
//! [`schedule_with`] takes extra ordering edges and nodes that live outside the arena: the
//! lowering of persistent state asks that every reader of a state's old value run before the
//! step that overwrites the state in place, and such values cost no arena bytes.

use crate::graph::{Graph, NodeId};
use crate::op::Op;
use crate::plan::{aligned, in_arena, view_root};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Which nodes some output depends on.
pub fn needed(g: &Graph) -> Vec<bool> {
    let mut need = vec![false; g.nodes.len()];
    let mut stack: Vec<usize> = g.outputs.iter().map(|(_, id)| id.index()).collect();
    while let Some(i) = stack.pop() {
        if i >= need.len() || need[i] {
            continue;
        }
        need[i] = true;
        stack.extend(g.nodes[i].inputs.iter().map(|x| x.index()));
    }
    need
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Ready,
    Done,
}

struct Scheduler<'g> {
    g: &'g Graph,
    /// Per node: whether its buffer lives outside the arena (persistent state: no cost).
    outside: Vec<bool>,
    /// The buffer each node reads (its view root).
    root: Vec<usize>,
    /// Per step: the distinct arena buffers it reads.
    reads: Vec<Vec<usize>>,
    /// Per buffer: the steps that read it.
    readers: Vec<Vec<usize>>,
    /// Per buffer: readers not yet run.
    remaining: Vec<usize>,
    /// Buffers that are (views of) graph outputs: never freed.
    kept: Vec<bool>,
    /// Per node: scheduled nodes that read it (once per input edge).
    consumers: Vec<Vec<usize>>,
    /// Per node: input edges from nodes not yet run.
    pending: Vec<usize>,
    state: Vec<State>,
    cost: Vec<i128>,
    heap: BinaryHeap<Reverse<(i128, usize)>>,
    views: Vec<usize>,
    order: Vec<NodeId>,
}

impl Scheduler<'_> {
    fn size(&self, i: usize) -> i128 {
        if self.outside[i] {
            return 0;
        }
        aligned(self.g.nodes[i].ty.bytes()) as i128
    }

    fn is_view(&self, i: usize) -> bool {
        crate::plan::is_view(self.g, NodeId(i as u32))
    }

    /// Bytes `i` allocates minus the bytes it frees if it runs now.
    fn cost_of(&self, i: usize) -> i128 {
        let freed: i128 = self.reads[i].iter().filter(|&&b| !self.kept[b] && self.remaining[b] == 1).map(|&b| self.size(b)).sum();
        self.size(i) - freed
    }

    fn make_ready(&mut self, i: usize) {
        if self.is_view(i) {
            self.views.push(i);
        } else {
            self.state[i] = State::Ready;
            self.cost[i] = self.cost_of(i);
            self.heap.push(Reverse((self.cost[i], i)));
        }
    }

    fn emit(&mut self, i: usize) {
        self.state[i] = State::Done;
        self.order.push(NodeId(i as u32));
        for k in 0..self.reads[i].len() {
            let b = self.reads[i][k];
            self.remaining[b] -= 1;
            if self.remaining[b] == 1 && !self.kept[b] {
                // The last reader now frees `b`: its cost drops.
                let last = self.readers[b].iter().copied().find(|&r| self.state[r] != State::Done);
                if let Some(r) = last.filter(|&r| self.state[r] == State::Ready) {
                    self.cost[r] = self.cost_of(r);
                    self.heap.push(Reverse((self.cost[r], r)));
                }
            }
        }
        for k in 0..self.consumers[i].len() {
            let c = self.consumers[i][k];
            self.pending[c] -= 1;
            if self.pending[c] == 0 {
                self.make_ready(c);
            }
        }
    }
}

/// Ordering edges that run sibling projections before any reader of theirs: where several
/// matmuls read the same left operand and a weight or constant (a layer's Q projection and its
/// stacked K/V projection of one normalised activation), each runs before every reader of the
/// others' outputs. The greedy order would otherwise run Q's RoPE between the two GEMMs and the
/// memory plan give the second GEMM the bytes that RoPE read, which keeps q's and k's RoPE and
/// the cache writes apart: backends run them as one launch only when nothing between them
/// writes what they read (the cpu's groups, cuda's `_x2` merges). The siblings' outputs live a
/// little longer: a projection's output while its sibling runs.
pub fn sibling_edges(g: &Graph) -> Vec<(NodeId, NodeId)> {
    let need = needed(g);
    let n = g.nodes.len();
    let fixed = |x: NodeId| x.index() < n && matches!(g.nodes[view_root(g, x).index()].op, Op::Weight { .. } | Op::Constant { .. });
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut by_left: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, node) in g.nodes.iter().enumerate().filter(|&(i, _)| need[i]) {
        for x in &node.inputs {
            if x.index() < n && !readers[x.index()].contains(&i) {
                readers[x.index()].push(i);
            }
        }
        if let (Op::MatMul { .. }, [a, b]) = (&node.op, node.inputs.as_slice()) {
            if a.index() < n && !fixed(*a) && fixed(*b) {
                by_left.entry(view_root(g, *a).index()).or_default().push(i);
            }
        }
    }
    let mut edges = Vec::new();
    for group in by_left.values().filter(|g| g.len() > 1) {
        for &a in group {
            for &b in group.iter().filter(|&&b| b != a) {
                edges.extend(readers[a].iter().filter(|&&c| !group.contains(&c)).map(|&c| (NodeId(b as u32), NodeId(c as u32))));
            }
        }
    }
    edges
}

/// An order of every non-source node some output depends on: each after its inputs, chosen
/// to keep the peak of live memory low.
pub fn schedule(g: &Graph) -> Vec<NodeId> {
    schedule_with(g, &[], &[])
}

/// Like [`schedule`], with the buffers of nodes marked in `outside` (indexed by node; shorter
/// means false) costing nothing, and each `(a, b)` of `before` run in that order (both must be
/// steps some output needs, and `b` must not feed `a`, or the edge would close a cycle and
/// the nodes it blocks would be left out of the order).
pub fn schedule_with(g: &Graph, outside: &[bool], before: &[(NodeId, NodeId)]) -> Vec<NodeId> {
    let n = g.nodes.len();
    let need = needed(g);
    let is_step = |i: usize| need[i] && !g.nodes[i].op.is_source();
    let root: Vec<usize> = (0..n).map(|i| view_root(g, NodeId(i as u32)).index()).collect();
    let mut s = Scheduler {
        g,
        outside: (0..n).map(|i| outside.get(i).copied().unwrap_or(false)).collect(),
        reads: vec![Vec::new(); n],
        readers: vec![Vec::new(); n],
        remaining: Vec::new(),
        kept: vec![false; n],
        consumers: vec![Vec::new(); n],
        pending: vec![0; n],
        state: vec![State::Waiting; n],
        cost: vec![0; n],
        heap: BinaryHeap::new(),
        views: Vec::new(),
        order: Vec::with_capacity(n),
        root,
    };
    for i in (0..n).filter(|&i| is_step(i)) {
        for x in &g.nodes[i].inputs {
            let x = x.index();
            if x >= n {
                continue;
            }
            if !g.nodes[x].op.is_source() {
                s.pending[i] += 1;
                s.consumers[x].push(i);
            }
            let b = s.root[x];
            if !s.is_view(i) && in_arena(&g.nodes[b].op) && !s.reads[i].contains(&b) {
                s.reads[i].push(b);
                s.readers[b].push(i);
            }
        }
    }
    for &(a, b) in before {
        let (a, b) = (a.index(), b.index());
        if a < n && b < n && is_step(a) && is_step(b) {
            s.pending[b] += 1;
            s.consumers[a].push(b);
        }
    }
    s.remaining = s.readers.iter().map(Vec::len).collect();
    for (_, id) in &g.outputs {
        if let Some(&b) = s.root.get(id.index()) {
            s.kept[b] = true;
        }
    }
    for i in 0..n {
        if is_step(i) && s.pending[i] == 0 {
            s.make_ready(i);
        }
    }
    loop {
        if let Some(v) = s.views.pop() {
            s.emit(v);
            continue;
        }
        let Some(Reverse((cost, i))) = s.heap.pop() else { break };
        if s.state[i] == State::Ready && s.cost[i] == cost {
            s.emit(i);
        }
    }
    s.order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use crate::{DType, UnaryOp};

    /// x feeds a wide projection and a narrow one, each read by its own elementwise step; the
    /// narrow product is what the greedy order runs last (it frees the least).
    fn projections() -> (Graph, [NodeId; 4]) {
        let mut g = Graph::default();
        let x = g.input("x", DType::F32, &[4, 8]).unwrap();
        let wq = g.weight("wq", DType::F32, &[8, 64]).unwrap();
        let wk = g.weight("wk", DType::F32, &[8, 8]).unwrap();
        let q = g.matmul(x, wq, false).unwrap();
        let k = g.matmul(x, wk, false).unwrap();
        let rq = g.unary(UnaryOp::Neg, q).unwrap();
        let rk = g.unary(UnaryOp::Exp, k).unwrap();
        g.output("q", rq);
        g.output("k", rk);
        (g, [q, k, rq, rk])
    }

    #[test]
    fn sibling_projections_run_before_their_readers() {
        let (g, [q, k, rq, rk]) = projections();
        // The greedy order alone runs one projection's reader between the two products.
        let plain = schedule(&g);
        let at = |id: NodeId| plain.iter().position(|&o| o == id).unwrap();
        assert!(at(q).max(at(k)) > at(rq).min(at(rk)), "{plain:?}");
        let edges = sibling_edges(&g);
        assert!(edges.contains(&(k, rq)) && edges.contains(&(q, rk)), "{edges:?}");
        let order = schedule_with(&g, &[], &edges);
        let at = |id: NodeId| order.iter().position(|&o| o == id).unwrap();
        assert!(at(q).max(at(k)) < at(rq).min(at(rk)), "{order:?}");
        // The order still plans (each step after its inputs).
        plan(&g, &order).unwrap();
        // A matmul of two activations (attention's scores) is no projection.
        let mut h = Graph::default();
        let a = h.input("a", DType::F32, &[4, 8]).unwrap();
        let b = h.input("b", DType::F32, &[8, 8]).unwrap();
        let c = h.input("c", DType::F32, &[8, 8]).unwrap();
        let (ab, ac) = (h.matmul(a, b, false).unwrap(), h.matmul(a, c, false).unwrap());
        let (nb, nc) = (h.unary(UnaryOp::Neg, ab).unwrap(), h.unary(UnaryOp::Neg, ac).unwrap());
        h.output("b", nb);
        h.output("c", nc);
        assert_eq!(sibling_edges(&h), []);
    }
}
