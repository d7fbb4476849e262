//! Lowering: a scheduled, planned graph becomes an [`Entry`] of a [`Program`].
//!
//! Each node of the order becomes one [`Step`], except views (reshapes, and slices that select
//! an aligned contiguous range: [`crate::plan::slice_view_offset`]): their readers get the
//! root's slot (at the slice's offset) with the view's type. Weights are shared by every entry of
//! a program (deduplicated by name); constants are deduplicated by type and value.
//!
//! Persistent state ([`Program::states`]) is bound by [`bind_states`]: an entry input named
//! like a state reads [`Slot::State`] directly, and the step computing an entry output named
//! like a state writes its result straight into the state when that is provably safe: the
//! step is not a view or a source, it does not read the state's old value (except a
//! [`Op::WriteSlice`] through its destination, which then updates only its new rows in
//! place), and every other reader of the old value can run before it (the scheduler is given
//! those edges; a reader that depends on the new value makes it impossible). Otherwise the
//! value stays in the arena and a last copy step (an identity permute) stores it, and
//! [`StateBinding::copies`] says why. Passes need no special care: a state output is a graph
//! output, so dead-code elimination keeps it, and the aliasing is decided after them.

use crate::dtype::TensorType;
use crate::error::{GraphError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::Op;
use crate::plan::{is_slice_view, is_view, plan_with, view_root, MemoryPlan};
use crate::program::{ConstData, Entry, Io, Operand, Program, Slot, StateSpec, Step, WeightSpec};
use crate::sched::{needed, schedule_with, sibling_edges};
use std::collections::HashMap;

/// Picks a kernel name for an op given its input and output types (the backend's choice).
pub type KernelNamer<'a> = &'a dyn Fn(&Op, &[TensorType], &TensorType) -> String;

fn invalid(msg: String) -> GraphError {
    GraphError::Pass { pass: "lower", msg }
}

/// The program's weight and constant tables, with indices for lookups.
struct Tables<'p> {
    program: &'p mut Program,
    weights: HashMap<String, u32>,
    constants: HashMap<(TensorType, Vec<u64>), u32>,
}

impl<'p> Tables<'p> {
    fn new(program: &'p mut Program) -> Self {
        let weights = program.weights.iter().enumerate().map(|(i, w)| (w.name.clone(), i as u32)).collect();
        let constants = program.constants.iter().enumerate().map(|(i, c)| ((c.ty.clone(), bits(&c.values)), i as u32)).collect();
        Tables { program, weights, constants }
    }

    fn weight(&mut self, name: &str, ty: &TensorType, entry: &str) -> Result<u32> {
        if let Some(&i) = self.weights.get(name) {
            let have = &self.program.weights[i as usize].ty;
            if have != ty {
                return Err(invalid(format!(
                    "entry '{entry}': weight '{name}' is {ty} here but {have} in an earlier entry of this program"
                )));
            }
            return Ok(i);
        }
        let i = self.program.weights.len() as u32;
        self.program.weights.push(WeightSpec { name: name.to_string(), ty: ty.clone() });
        self.weights.insert(name.to_string(), i);
        Ok(i)
    }

    fn constant(&mut self, values: &[f64], ty: &TensorType) -> u32 {
        let key = (ty.clone(), bits(values));
        if let Some(&i) = self.constants.get(&key) {
            return i;
        }
        let i = self.program.constants.len() as u32;
        self.program.constants.push(ConstData { ty: ty.clone(), values: values.to_vec() });
        self.constants.insert(key, i);
        i
    }
}

fn bits(values: &[f64]) -> Vec<u64> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// How an entry uses the program's persistent state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateBinding {
    /// Per node: the state whose buffer holds its value (state inputs, and the steps that
    /// write a state in place; reshape views follow their root).
    pub slot: Vec<Option<u32>>,
    /// `(reader, writer)`: a step reading a state's old value runs before the step that
    /// overwrites that state in place.
    pub before: Vec<(NodeId, NodeId)>,
    /// States stored by a final copy instead of in place: (state, the value's node, why).
    pub copies: Vec<(u32, NodeId, String)>,
}

impl StateBinding {
    /// Per node: whether its buffer is a state's (for the scheduler and the planner).
    pub fn outside(&self) -> Vec<bool> {
        self.slot.iter().map(Option::is_some).collect()
    }

    /// Turns every in-place write that `order` runs before one of its old value's readers
    /// into a copy (the order was made without this binding's edges).
    fn demote_unordered(&mut self, order: &[NodeId], states: &[StateSpec]) {
        let mut at = vec![usize::MAX; self.slot.len()];
        for (k, id) in order.iter().enumerate() {
            if let Some(a) = at.get_mut(id.index()) {
                *a = k;
            }
        }
        let late: Vec<(NodeId, NodeId)> = self.before.iter().copied().filter(|(r, w)| at.get(r.index()) >= at.get(w.index())).collect();
        for (r, w) in late {
            if let Some(i) = self.slot.get(w.index()).copied().flatten() {
                self.slot[w.index()] = None;
                self.before.retain(|&(_, x)| x != w);
                let name = states.get(i as usize).map_or("?", |s| s.name.as_str());
                self.copies.push((i, w, format!("the given order runs {r}, a reader of the old '{name}', after {w} writes it")));
            }
        }
    }
}

/// Decides where `g`'s state values live (see the module docs); `states` are the program's.
pub fn bind_states(g: &Graph, states: &[StateSpec], entry: &str) -> Result<StateBinding> {
    let n = g.nodes.len();
    let index = |name: &str| states.iter().position(|s| s.name == name).map(|i| i as u32);
    let mut b = StateBinding { slot: vec![None; n], before: vec![], copies: vec![] };
    if states.is_empty() {
        return Ok(b);
    }
    // State inputs read the state itself.
    let mut input_of: Vec<Option<NodeId>> = vec![None; states.len()];
    for (id, name, ty) in g.inputs() {
        if let Some(i) = index(name) {
            let want = &states[i as usize].ty;
            if ty != want {
                return Err(invalid(format!("entry '{entry}': input '{name}' is {ty} but the state of that name is {want}")));
            }
            b.slot[id.index()] = Some(i);
            input_of[i as usize] = Some(id);
        }
    }
    // The steps reading each state input's old value (through views).
    let need = needed(g);
    let mut readers: Vec<Vec<NodeId>> = vec![vec![]; states.len()];
    for (j, node) in g.nodes.iter().enumerate() {
        if !need[j] || node.op.is_source() || is_view(g, NodeId(j as u32)) {
            continue;
        }
        for &x in &node.inputs {
            if let Some(i) = b.slot.get(view_root(g, x).index()).copied().flatten() {
                let r = &mut readers[i as usize];
                if r.last() != Some(&NodeId(j as u32)) {
                    r.push(NodeId(j as u32));
                }
            }
        }
    }
    // Nodes some slice view reads a part of.
    let mut sliced = vec![false; n];
    for j in 0..n {
        if is_slice_view(g, NodeId(j as u32)) {
            sliced[view_root(g, NodeId(j as u32)).index()] = true;
        }
    }
    let written: Vec<bool> = (0..states.len())
        .map(|i| g.outputs.iter().any(|(name, id)| index(name) == Some(i as u32) && input_of[i] != Some(view_root(g, *id))))
        .collect();
    for (name, id) in &g.outputs {
        if let Some(i) = b.slot.get(view_root(g, *id).index()).copied().flatten() {
            if written[i as usize] && index(name) != Some(i) {
                return Err(invalid(format!(
                    "entry '{entry}': output '{name}' returns the old value of state '{}', which the entry overwrites",
                    states[i as usize].name
                )));
            }
        }
    }
    for (name, id) in &g.outputs {
        let Some(i) = index(name) else { continue };
        let st = &states[i as usize];
        if g.ty(*id) != &st.ty {
            return Err(invalid(format!("entry '{entry}': output '{name}' is {} but the state of that name is {}", g.ty(*id), st.ty)));
        }
        let w = view_root(g, *id);
        let old = input_of[i as usize];
        if old == Some(w) {
            continue; // Handed back unchanged: nothing to store.
        }
        if is_slice_view(g, *id) {
            // A part of another step's value: copied from where the view reads it.
            b.copies.push((i, *id, format!("its value is a slice of {w} ({})", g.node(w).op.name())));
            continue;
        }
        let wn = g.node(w);
        let reads_old = |k: usize| old.is_some_and(|p| view_root(g, wn.inputs[k]) == p);
        let why = if wn.op.is_source() {
            if let Some(j) = b.slot[w.index()].filter(|&j| written[j as usize]) {
                return Err(invalid(format!(
                    "entry '{entry}': output '{name}' is the old value of state '{}', which the entry overwrites",
                    states[j as usize].name
                )));
            }
            Some(format!("its value is a {} (no step computes it)", wn.op.name()))
        } else if let Some(j) = b.slot[w.index()] {
            Some(format!("{w} already writes state '{}'", states[j as usize].name))
        } else if sliced[w.index()] {
            Some(format!("{w} ({}) is read through a slice view, which a state's slot cannot offset", wn.op.name()))
        } else if (0..wn.inputs.len()).any(|k| reads_old(k) && !(k == 0 && matches!(wn.op, Op::WriteSlice { .. }))) {
            Some(format!("{w} ({}) reads the old value while computing the new one", wn.op.name()))
        } else {
            // Readers of the old value that depend on the new one cannot run before it.
            let mut after = vec![false; n];
            after[w.index()] = true;
            for j in w.index() + 1..n {
                after[j] = g.nodes[j].inputs.iter().any(|x| after[x.index()]);
            }
            readers[i as usize]
                .iter()
                .find(|r| **r != w && after[r.index()])
                .map(|r| format!("{r} ({}) reads the old value but depends on the new one", g.node(*r).op.name()))
        };
        match why {
            Some(why) => b.copies.push((i, w, why)),
            None => {
                b.slot[w.index()] = Some(i);
                b.before.extend(readers[i as usize].iter().filter(|&&r| r != w).map(|&r| (r, w)));
            }
        }
    }
    Ok(b)
}

/// Where node `id` lives: its state, its weight, its constant, or its arena range.
fn operand(g: &Graph, id: NodeId, plan: &MemoryPlan, states: &StateBinding, t: &mut Tables, entry: &str) -> Result<Operand> {
    let node = g.nodes.get(id.index()).ok_or_else(|| invalid(format!("entry '{entry}' reads {id}, which is not in the graph")))?;
    let ty = node.ty.clone();
    let root = view_root(g, id);
    if let Some(i) = states.slot.get(root.index()).copied().flatten() {
        if is_slice_view(g, id) {
            return Err(invalid(format!("entry '{entry}': {id} is a slice view of {root}, which lives in a state")));
        }
        return Ok(Operand { slot: Slot::State(i), ty });
    }
    let slot = match &g.node(root).op {
        Op::Weight { name } => Slot::Weight(t.weight(name, &g.node(root).ty, entry)?),
        Op::Constant { values } => Slot::Const(t.constant(values, &g.node(root).ty)),
        _ => {
            let (offset, bytes) = plan
                .slot(id)
                .ok_or_else(|| invalid(format!("entry '{entry}': {id} ({}) has no arena slot in the plan", node.op.name())))?;
            Slot::Arena { offset, bytes }
        }
    };
    Ok(Operand { slot, ty })
}

/// Lowers a graph, in `order` and with `plan` (both made for this graph), to an entry named
/// `entry_name`; adds the weights and constants it reads to `program` (the entry itself is
/// returned, not added). States are bound by [`bind_states`]; an in-place write that `order`
/// runs before a reader of the old value becomes a copy (the plan must then hold the value:
/// [`compile_entry`] makes order and plan to match the binding). On error the program is left
/// as it was.
pub fn lower_entry(
    g: &Graph,
    entry_name: &str,
    order: &[NodeId],
    plan: &MemoryPlan,
    program: &mut Program,
    kernel_name: KernelNamer,
) -> Result<Entry> {
    let mut states = bind_states(g, &program.states, entry_name)?;
    states.demote_unordered(order, &program.states);
    lower_with(g, entry_name, order, plan, &states, program, kernel_name)
}

fn lower_with(
    g: &Graph,
    entry_name: &str,
    order: &[NodeId],
    plan: &MemoryPlan,
    states: &StateBinding,
    program: &mut Program,
    kernel_name: KernelNamer,
) -> Result<Entry> {
    let (weights, constants) = (program.weights.len(), program.constants.len());
    let entry = lower(g, entry_name, order, plan, states, program, kernel_name);
    if entry.is_err() {
        program.weights.truncate(weights);
        program.constants.truncate(constants);
    }
    entry
}

fn lower(
    g: &Graph,
    entry_name: &str,
    order: &[NodeId],
    plan: &MemoryPlan,
    states: &StateBinding,
    program: &mut Program,
    kernel_name: KernelNamer,
) -> Result<Entry> {
    if program.entry(entry_name).is_some() {
        return Err(invalid(format!("the program already has an entry '{entry_name}'")));
    }
    if plan.slots.len() != g.nodes.len() {
        return Err(invalid(format!(
            "entry '{entry_name}': the plan covers {} nodes but the graph has {}",
            plan.slots.len(),
            g.nodes.len()
        )));
    }
    let mut t = Tables::new(program);
    let mut steps = Vec::with_capacity(order.len() + states.copies.len());
    for &id in order {
        let node = g.nodes.get(id.index()).ok_or_else(|| invalid(format!("order names {id}, not in the graph")))?;
        if is_view(g, id) {
            continue;
        }
        let inputs = node.inputs.iter().map(|&x| operand(g, x, plan, states, &mut t, entry_name)).collect::<Result<Vec<_>>>()?;
        let output = operand(g, id, plan, states, &mut t, entry_name)?;
        let types: Vec<TensorType> = inputs.iter().map(|o| o.ty.clone()).collect();
        let kernel = kernel_name(&node.op, &types, &output.ty);
        steps.push(Step { node: id.0, op: node.op.clone(), kernel, inputs, output });
    }
    // State values that could not be computed in place: copied in after every other step.
    for (i, w, _) in &states.copies {
        let ty = t.program.states[*i as usize].ty.clone();
        let mut from = operand(g, *w, plan, states, &mut t, entry_name)?;
        from.ty = ty.clone();
        let op = Op::Permute { perm: (0..ty.rank()).collect() };
        let kernel = kernel_name(&op, std::slice::from_ref(&ty), &ty);
        steps.push(Step { node: w.0, op, kernel, inputs: vec![from], output: Operand { slot: Slot::State(*i), ty } });
    }
    let inputs = g
        .inputs()
        .map(|(id, name, _)| Ok(Io { name: name.to_string(), operand: operand(g, id, plan, states, &mut t, entry_name)? }))
        .collect::<Result<Vec<_>>>()?;
    let outputs = g
        .outputs
        .iter()
        .map(|(name, id)| {
            let mut operand = operand(g, *id, plan, states, &mut t, entry_name)?;
            if let Some(i) = t.program.state_index(name) {
                operand.slot = Slot::State(i as u32);
            }
            Ok(Io { name: name.clone(), operand })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Entry { name: entry_name.to_string(), inputs, outputs, steps, arena_bytes: plan.arena_bytes, plan: plan.stats })
}

/// Binds states, schedules, plans and lowers a graph: the entry, the order and the plan (for
/// reports). Readers of a state's old value are ordered before its in-place write, and state
/// values take no arena bytes.
pub fn compile_entry(
    g: &Graph,
    entry_name: &str,
    program: &mut Program,
    kernel_name: KernelNamer,
) -> Result<(Entry, Vec<NodeId>, MemoryPlan)> {
    let states = bind_states(g, &program.states, entry_name)?;
    let outside = states.outside();
    let mut before = states.before.clone();
    before.extend(sibling_edges(g));
    let order = schedule_with(g, &outside, &before);
    let memory = plan_with(g, &order, &outside)?;
    let entry = lower_with(g, entry_name, &order, &memory, &states, program, kernel_name)?;
    Ok((entry, order, memory))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::UnaryOp;

    fn program() -> Program {
        Program::new("test", "cpu", "")
    }

    fn namer(op: &Op, ins: &[TensorType], out: &TensorType) -> String {
        format!("{}/{}/{out}", op.name(), ins.len())
    }

    /// `y = exp(reshape(x @ w^T + c))`, with the input, the weight and a view of the weight
    /// also named as outputs.
    fn graph(w_shape: &[usize]) -> (Graph, [NodeId; 6]) {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]).unwrap();
        let w = g.weight("w", DType::F32, w_shape).unwrap();
        let c = g.scalar(DType::F32, 0.5).unwrap();
        let y = g.matmul(x, w, true).unwrap();
        let y = g.add(y, c).unwrap();
        let r = g.reshape(y, &[8]).unwrap();
        let e = g.unary(UnaryOp::Exp, r).unwrap();
        let wv = g.reshape(w, &[12]).unwrap();
        g.output("y", e);
        g.output("x", x);
        g.output("w", wv);
        (g, [x, w, y, r, e, wv])
    }

    #[test]
    fn reshapes_are_views_and_sources_can_be_outputs() {
        let (g, [x, _, y, r, e, _]) = graph(&[4, 3]);
        let mut p = program();
        let (entry, order, plan) = compile_entry(&g, "forward", &mut p, &namer).unwrap();
        assert!(order.contains(&r));
        let ops: Vec<&str> = entry.steps.iter().map(|s| s.op.name()).collect();
        assert_eq!(ops, ["matmul", "binary", "unary"]);
        assert_eq!(entry.steps[0].kernel, "matmul/2/f32[2,4]");
        let (off, bytes) = plan.slot(y).unwrap();
        let exp = &entry.steps[2];
        assert_eq!(exp.inputs[0].slot, Slot::Arena { offset: off, bytes });
        assert_eq!(exp.inputs[0].ty, TensorType::new(DType::F32, [8]));
        assert_eq!(exp.output.slot, Slot::Arena { offset: plan.slot(e).unwrap().0, bytes: 32 });
        assert_eq!(entry.steps[1].inputs[1].slot, Slot::Const(0));
        assert_eq!(p.constants[0].values, [0.5]);
        let (xo, xb) = plan.slot(x).unwrap();
        assert_eq!(entry.inputs[0].operand.slot, Slot::Arena { offset: xo, bytes: xb });
        assert_eq!(entry.outputs[1].operand, entry.inputs[0].operand);
        assert_eq!(entry.outputs[2].operand, Operand { slot: Slot::Weight(0), ty: TensorType::new(DType::F32, [12]) });
        assert_eq!(entry.arena_bytes, plan.arena_bytes);
    }

    #[test]
    fn entries_share_weights_and_constants() {
        let (g, _) = graph(&[4, 3]);
        let mut p = program();
        let (a, _, _) = compile_entry(&g, "a", &mut p, &namer).unwrap();
        p.entries.push(a);
        let (b, _, _) = compile_entry(&g, "b", &mut p, &namer).unwrap();
        assert_eq!((p.weights.len(), p.constants.len()), (1, 1));
        assert_eq!(b.steps, p.entries[0].steps);
        p.entries.push(b);
        let e = compile_entry(&g, "a", &mut p, &namer).unwrap_err();
        assert_eq!(e.to_string(), "pass lower: the program already has an entry 'a'");
    }

    #[test]
    fn a_weight_with_another_type_is_refused_and_the_program_kept() {
        let mut p = program();
        let (g, _) = graph(&[4, 3]);
        let (a, _, _) = compile_entry(&g, "a", &mut p, &namer).unwrap();
        p.entries.push(a);
        let mut g2 = Graph::new();
        let k = g2.scalar(DType::F32, 7.0).unwrap();
        let w = g2.weight("w", DType::F32, &[3, 4]).unwrap();
        let y = g2.mul(w, k).unwrap();
        g2.output("y", y);
        let before = p.clone();
        let e = compile_entry(&g2, "b", &mut p, &namer).unwrap_err();
        assert_eq!(e.to_string(), "pass lower: entry 'b': weight 'w' is f32[3,4] here but f32[4,3] in an earlier entry of this program");
        assert_eq!(p, before);
    }

    fn stateful(states: &[(&str, TensorType)]) -> Program {
        let mut p = program();
        p.states = states.iter().map(|(n, ty)| StateSpec { name: n.to_string(), ty: ty.clone() }).collect();
        p
    }

    fn step_of(e: &Entry, node: NodeId) -> (usize, &Step) {
        e.steps.iter().enumerate().find(|(_, s)| s.node == node.0 && !matches!(s.op, Op::Permute { .. })).unwrap()
    }

    /// A decode-like step: `c` is written in place one row at `at`, a reader of the old
    /// value runs first, and readers of the new value read the state.
    #[test]
    fn a_write_slice_on_a_state_is_in_place_after_the_old_values_readers() {
        let cty = TensorType::new(DType::F32, [4, 2]);
        let mut g = Graph::new();
        let c = g.input("c", DType::F32, &[4, 2]).unwrap();
        let new = g.input("new", DType::F32, &[1, 2]).unwrap();
        let at = g.input("at", DType::I64, &[1]).unwrap();
        let old_twice = g.mul_scalar(c, 2.0).unwrap();
        let w = g.write_slice(c, new, at, 0).unwrap();
        let sum = g.reduce(crate::op::ReduceOp::Sum, w, &[0], false).unwrap();
        let o = g.reduce(crate::op::ReduceOp::Sum, old_twice, &[0], false).unwrap();
        let y = g.add(sum, o).unwrap();
        g.output("c", w);
        g.output("y", y);
        // Passes see a pure graph; the aliasing is decided after them.
        let g = crate::passes::Pipeline::standard().run(&g, None).unwrap();
        let mut p = stateful(&[("c", cty.clone())]);
        let (e, _, plan) = compile_entry(&g, "decode", &mut p, &namer).unwrap();
        let ws = e.steps.iter().position(|s| matches!(s.op, Op::WriteSlice { .. })).unwrap();
        let write = &e.steps[ws];
        assert_eq!(write.output.slot, Slot::State(0));
        assert_eq!(write.inputs[0].slot, Slot::State(0));
        assert!(!e.steps.iter().any(|s| matches!(s.op, Op::Permute { .. })), "no copy");
        // The old value's reader (the doubling, fused or not) runs before the write.
        let reader =
            e.steps.iter().position(|s| s.inputs.iter().any(|o| o.slot == Slot::State(0)) && !matches!(s.op, Op::WriteSlice { .. }));
        let new_reader = e.steps.iter().skip(ws + 1).any(|s| s.inputs.iter().any(|o| o.slot == Slot::State(0)));
        assert!(reader.is_some_and(|r| r < ws) && new_reader, "{:#?}", e.steps);
        assert_eq!(e.inputs.iter().find(|io| io.name == "c").unwrap().operand.slot, Slot::State(0));
        assert_eq!(e.outputs.iter().find(|io| io.name == "c").unwrap().operand.slot, Slot::State(0));
        // The state takes no arena bytes.
        let in_arena: Vec<&str> = plan.buffers.iter().map(|b| g.node(b.node).op.name()).collect();
        assert!(!in_arena.contains(&"write_slice") && in_arena.iter().filter(|n| **n == "input").count() == 2, "{in_arena:?}");
    }

    #[test]
    fn a_state_computed_from_its_old_value_is_copied_with_a_reason() {
        let ty = TensorType::new(DType::F32, [3]);
        let mut g = Graph::new();
        let acc = g.input("acc", DType::F32, &[3]).unwrap();
        let x = g.input("x", DType::F32, &[3]).unwrap();
        let y = g.add(acc, x).unwrap();
        g.output("acc", y);
        g.output("sum", y);
        let mut p = stateful(&[("acc", ty.clone())]);
        let b = bind_states(&g, &p.states, "add").unwrap();
        assert_eq!(b.copies, vec![(0, y, format!("{y} (binary) reads the old value while computing the new one"))]);
        let (e, _, plan) = compile_entry(&g, "add", &mut p, &namer).unwrap();
        let last = e.steps.last().unwrap();
        assert!(matches!(last.op, Op::Permute { .. }));
        assert_eq!(last.output.slot, Slot::State(0));
        assert_eq!(last.inputs[0].slot, Slot::Arena { offset: plan.slot(y).unwrap().0, bytes: 12 });
        assert_eq!(step_of(&e, y).1.inputs[0].slot, Slot::State(0));
    }

    #[test]
    fn a_reader_of_the_old_value_that_needs_the_new_one_forces_a_copy() {
        let ty = TensorType::new(DType::F32, [4, 2]);
        let mut g = Graph::new();
        let c = g.input("c", DType::F32, &[4, 2]).unwrap();
        let new = g.input("new", DType::F32, &[1, 2]).unwrap();
        let at = g.input("at", DType::I64, &[1]).unwrap();
        let w = g.write_slice(c, new, at, 0).unwrap();
        let both = g.add(w, c).unwrap();
        g.output("c", w);
        g.output("both", both);
        let mut p = stateful(&[("c", ty)]);
        let b = bind_states(&g, &p.states, "d").unwrap();
        assert_eq!(b.copies, vec![(0, w, format!("{both} (binary) reads the old value but depends on the new one"))]);
        let (e, _, _) = compile_entry(&g, "d", &mut p, &namer).unwrap();
        assert!(matches!(e.steps.last().unwrap().op, Op::Permute { .. }));
    }

    #[test]
    fn prefill_computes_a_state_in_place_and_cse_merged_writes_are_copied() {
        let ty = TensorType::new(DType::F32, [2, 3]);
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]).unwrap();
        let a = g.mul_scalar(x, 3.0).unwrap();
        let b = g.mul_scalar(x, 3.0).unwrap();
        g.output("k", a);
        g.output("v", b);
        let g = crate::passes::Pipeline::standard().run(&g, None).unwrap();
        let mut p = stateful(&[("k", ty.clone()), ("v", ty)]);
        let bind = bind_states(&g, &p.states, "prefill").unwrap();
        assert_eq!(bind.copies.len(), 1, "CSE merged the two values: {bind:?}");
        assert!(bind.copies[0].2.contains("already writes state 'k'"));
        let (e, _, _) = compile_entry(&g, "prefill", &mut p, &namer).unwrap();
        assert_eq!(e.steps[0].output.slot, Slot::State(0));
        assert_eq!(e.steps[1].output.slot, Slot::State(1));
        assert_eq!(e.steps[1].inputs[0].slot, Slot::State(0));
    }

    #[test]
    fn a_given_order_that_breaks_the_write_demotes_it_to_a_copy() {
        let ty = TensorType::new(DType::F32, [4, 2]);
        let mut g = Graph::new();
        let c = g.input("c", DType::F32, &[4, 2]).unwrap();
        let new = g.input("new", DType::F32, &[1, 2]).unwrap();
        let at = g.input("at", DType::I64, &[1]).unwrap();
        let w = g.write_slice(c, new, at, 0).unwrap();
        let old = g.mul_scalar(c, 2.0).unwrap();
        g.output("c", w);
        g.output("old", old);
        let mut p = stateful(&[("c", ty)]);
        let order = vec![w, old];
        let mem = crate::plan::plan(&g, &order).unwrap();
        let e = lower_entry(&g, "d", &order, &mem, &mut p, &namer).unwrap();
        assert!(e.steps[0].output.slot != Slot::State(0));
        assert_eq!(e.steps[1].inputs[0].slot, Slot::State(0));
        assert_eq!(e.steps[2].output.slot, Slot::State(0));
    }

    #[test]
    fn returning_an_overwritten_state_under_another_name_is_refused() {
        let ty = TensorType::new(DType::F32, [3]);
        let mut g = Graph::new();
        let acc = g.input("acc", DType::F32, &[3]).unwrap();
        let y = g.mul_scalar(acc, 2.0).unwrap();
        g.output("acc", y);
        g.output("before", acc);
        let mut p = stateful(&[("acc", ty)]);
        let e = compile_entry(&g, "f", &mut p, &namer).unwrap_err();
        assert!(e.to_string().contains("returns the old value of state 'acc'"), "{e}");
    }

    #[test]
    fn aligned_contiguous_slices_of_steps_are_views_and_others_steps() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4, 64]).unwrap();
        let y = g.mul_scalar(x, 2.0).unwrap();
        let rows = g.slice(y, 0, 2, 4).unwrap(); // byte 512: a view
        let odd = g.slice(y, 0, 1, 3).unwrap(); // byte 256: a view
        let cols = g.slice(y, 1, 0, 32).unwrap(); // not contiguous: a step
        let of_input = g.slice(x, 0, 2, 4).unwrap(); // a source's slot has no offset: a step
        let e = g.unary(UnaryOp::Exp, rows).unwrap();
        for (name, id) in [("e", e), ("odd", odd), ("cols", cols), ("in", of_input)] {
            g.output(name, id);
        }
        let mut p = program();
        let (entry, _, plan) = compile_entry(&g, "f", &mut p, &namer).unwrap();
        let ops: Vec<&str> = entry.steps.iter().map(|s| s.op.name()).collect();
        assert_eq!(ops.iter().filter(|o| **o == "slice").count(), 2, "{ops:?}");
        let base = plan.slot(y).unwrap().0;
        assert_eq!(plan.slot(rows), Some((base + 512, 512)));
        assert_eq!(plan.slot(odd), Some((base + 256, 512)));
        let exp = entry.steps.iter().find(|s| s.op.name() == "unary").unwrap();
        assert_eq!(exp.inputs[0].slot, Slot::Arena { offset: base + 512, bytes: 512 });
        let out = |n: &str| entry.outputs.iter().find(|o| o.name == n).unwrap().operand.slot;
        assert_eq!(out("odd"), Slot::Arena { offset: base + 256, bytes: 512 });
        // The root stays live while a view of it is read.
        let b = plan.buffers.iter().find(|b| b.node == y).unwrap();
        assert_eq!(b.last, plan.steps - 1);
    }

    #[test]
    fn states_and_slice_views_go_through_copies() {
        let ty = TensorType::new(DType::F32, [2, 64]);
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4, 64]).unwrap();
        let y = g.mul_scalar(x, 2.0).unwrap();
        let top = g.slice(y, 0, 2, 4).unwrap();
        let z = g.mul_scalar(x, 3.0).unwrap();
        let z = g.reshape(z, &[2, 128]).unwrap();
        let z = g.reshape(z, &[4, 64]).unwrap();
        let part = g.slice(z, 0, 0, 2).unwrap();
        let w = g.unary(UnaryOp::Exp, part).unwrap();
        g.output("a", top); // A state whose value is a view into y.
        g.output("b", z); // A state whose value some slice view reads.
        g.output("w", w);
        let mut p = stateful(&[("a", ty), ("b", TensorType::new(DType::F32, [4, 64]))]);
        let b = bind_states(&g, &p.states, "f").unwrap();
        let why: Vec<&str> = b.copies.iter().map(|c| c.2.as_str()).collect();
        assert!(why[0].contains("is a slice of"), "{why:?}");
        assert!(why[1].contains("read through a slice view"), "{why:?}");
        let (e, _, plan) = compile_entry(&g, "f", &mut p, &namer).unwrap();
        let copies: Vec<&Step> = e.steps.iter().filter(|s| matches!(s.op, Op::Permute { .. })).collect();
        assert_eq!(copies.len(), 2);
        let base = plan.slot(y).unwrap().0;
        assert_eq!(copies[0].inputs[0].slot, Slot::Arena { offset: base + 512, bytes: 512 });
        assert_eq!(copies[0].output.slot, Slot::State(0));
    }

    #[test]
    fn write_slice_runs_functionally_in_the_interpreter() {
        use crate::interp::{eval_op, Value};
        let dst = Value::from_f32(&[2, 3, 1], &[0.0; 6]).unwrap();
        let rows = Value::from_f32(&[2, 1, 1], &[7.0, 8.0]).unwrap();
        let at = Value::new(TensorType::new(DType::I64, [1]), vec![2.0]).unwrap();
        let out = eval_op(&Op::WriteSlice { axis: 1 }, &[&dst, &rows, &at], &dst.ty).unwrap();
        assert_eq!(out.to_f32(), [0.0, 0.0, 7.0, 0.0, 0.0, 8.0]);
        let far = Value::new(TensorType::new(DType::I64, [1]), vec![3.0]).unwrap();
        let e = eval_op(&Op::WriteSlice { axis: 1 }, &[&dst, &rows, &far], &dst.ty).unwrap_err();
        assert_eq!(e, "write_slice of 1 rows at 3 does not fit 3 along axis 1");
    }
}
