//! Lowering: a scheduled, planned graph becomes an [`Entry`] of a [`Program`].
//!
//! Each node of the order becomes one [`Step`], except reshapes: a reshape is a view, so its
//! readers get its input's slot with the reshaped type. Weights are shared by every entry of
//! a program (deduplicated by name); constants are deduplicated by type and value.

use crate::dtype::TensorType;
use crate::error::{GraphError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::Op;
use crate::plan::{plan, view_root, MemoryPlan};
use crate::program::{ConstData, Entry, Io, Operand, Program, Slot, Step, WeightSpec};
use crate::sched::schedule;
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

/// Where node `id` lives: its weight, its constant, or its arena range.
fn operand(g: &Graph, id: NodeId, plan: &MemoryPlan, t: &mut Tables, entry: &str) -> Result<Operand> {
    let node = g.nodes.get(id.index()).ok_or_else(|| invalid(format!("entry '{entry}' reads {id}, which is not in the graph")))?;
    let ty = node.ty.clone();
    let root = view_root(g, id);
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
/// returned, not added). On error the program is left as it was.
pub fn lower_entry(
    g: &Graph,
    entry_name: &str,
    order: &[NodeId],
    plan: &MemoryPlan,
    program: &mut Program,
    kernel_name: KernelNamer,
) -> Result<Entry> {
    let (weights, constants) = (program.weights.len(), program.constants.len());
    let entry = lower(g, entry_name, order, plan, program, kernel_name);
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
    let mut steps = Vec::with_capacity(order.len());
    for &id in order {
        let node = g.nodes.get(id.index()).ok_or_else(|| invalid(format!("order names {id}, not in the graph")))?;
        if matches!(node.op, Op::Reshape { .. }) {
            continue;
        }
        let inputs = node.inputs.iter().map(|&x| operand(g, x, plan, &mut t, entry_name)).collect::<Result<Vec<_>>>()?;
        let output = operand(g, id, plan, &mut t, entry_name)?;
        let types: Vec<TensorType> = inputs.iter().map(|o| o.ty.clone()).collect();
        let kernel = kernel_name(&node.op, &types, &output.ty);
        steps.push(Step { node: id.0, op: node.op.clone(), kernel, inputs, output });
    }
    let inputs = g
        .inputs()
        .map(|(id, name, _)| Ok(Io { name: name.to_string(), operand: operand(g, id, plan, &mut t, entry_name)? }))
        .collect::<Result<Vec<_>>>()?;
    let outputs = g
        .outputs
        .iter()
        .map(|(name, id)| Ok(Io { name: name.clone(), operand: operand(g, *id, plan, &mut t, entry_name)? }))
        .collect::<Result<Vec<_>>>()?;
    Ok(Entry { name: entry_name.to_string(), inputs, outputs, steps, arena_bytes: plan.arena_bytes, plan: plan.stats })
}

/// Schedules, plans and lowers a graph: the entry, the order and the plan (for reports).
pub fn compile_entry(
    g: &Graph,
    entry_name: &str,
    program: &mut Program,
    kernel_name: KernelNamer,
) -> Result<(Entry, Vec<NodeId>, MemoryPlan)> {
    let order = schedule(g);
    let memory = plan(g, &order)?;
    let entry = lower_entry(g, entry_name, &order, &memory, program, kernel_name)?;
    Ok((entry, order, memory))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::UnaryOp;

    fn program() -> Program {
        Program {
            model: "test".into(),
            backend: "cpu".into(),
            source: String::new(),
            weights: vec![],
            constants: vec![],
            entries: vec![],
            states: vec![],
            binaries: vec![],
        }
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
}
