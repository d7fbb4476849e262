//! Graph-to-graph rewrites and the pipeline that runs them.
//!
//! Every pass is a named function `fn(&Graph) -> Result<Graph>`. Nodes are stored in
//! topological order, so a pass walks the old graph once, decides an [`Action`] for each
//! node, and [`rebuild`] makes the new graph, remapping ids in one place. The pipeline
//! verifies after every pass and can record the IR between passes.

mod cast;
mod concat_mul;
mod conv;
mod cse;
mod dce;
mod epilogue;
mod fold;
mod fuse;
mod gated;
mod gather_scale;
mod generator;
mod negate;
mod recompute;
mod residual;
mod rotate;
mod stack;

pub use cast::casts_past_reshapes;
pub use concat_mul::concat_of_products;
pub use conv::{lower_conv, tap_source};
pub use cse::cse;
pub use dce::dead_code;
pub use epilogue::fuse_matmul_epilogue;
pub use fold::{constant_fold, MAX_FOLD_ELEMENTS};
pub use fuse::fuse_elementwise;
pub use gated::{gated_matmul, gated_matmul_everywhere, Accept};
pub use gather_scale::gather_scale;
pub use generator::{recompute_generators, MAX_GENERATOR_INSTRS};
pub use negate::negation_through_concat;
pub use recompute::recompute_shared_products;
pub use residual::{padded_rows, residual_rms_norm};
pub use rotate::{rotation_as_matmul, MAX_ROTATION_DIM};
pub use stack::{stack_projections, stack_projections_rows};

use crate::error::{GraphError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::{Expr, Instr, Op};
use crate::print::{expr_to_string, print};
use crate::verify::verify;

/// A named graph-to-graph rewrite.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    /// The name traces, errors and `Pipeline::parse` use.
    pub name: &'static str,
    /// The rewrite itself.
    pub run: fn(&Graph) -> Result<Graph>,
}

impl Pass {
    /// Removes nodes no output depends on (inputs always stay).
    pub const DEAD_CODE: Pass = Pass { name: "dead_code", run: dead_code };
    /// Evaluates small all-constant subgraphs and drops `x*1`, `x+0`.
    pub const CONSTANT_FOLD: Pass = Pass { name: "constant_fold", run: constant_fold };
    /// Merges nodes with the same op, inputs and type.
    pub const CSE: Pass = Pass { name: "cse", run: cse };
    /// Folds single-use elementwise consumers of a matmul into its epilogue.
    pub const FUSE_MATMUL_EPILOGUE: Pass = Pass { name: "fuse_matmul_epilogue", run: fuse_matmul_epilogue };
    /// Turns maximal elementwise regions into fused nodes.
    pub const FUSE_ELEMENTWISE: Pass = Pass { name: "fuse_elementwise", run: fuse_elementwise };
    /// Rewrites convolutions as a gather and a matmul (for backends without a conv kernel).
    pub const LOWER_CONV: Pass = Pass { name: "lower_conv", run: lower_conv };
    /// Moves a negation read only by a concat past it as a constant ±1 multiply.
    pub const NEGATION_THROUGH_CONCAT: Pass = Pass { name: "negation_through_concat", run: negation_through_concat };
    /// Rewrites a signed permutation of the last axis (slices, negations, concat) as `x @ P`.
    pub const ROTATION_AS_MATMUL: Pass = Pass { name: "rotation_as_matmul", run: rotation_as_matmul };
    /// Rewrites `concat(x * c1, x * c2)` (x broadcast along the axis) as `x * concat(c1, c2)`.
    pub const CONCAT_OF_PRODUCTS: Pass = Pass { name: "concat_of_products", run: concat_of_products };
    /// Gives each unary reader of a product by a constant its own copy, to fuse with it.
    pub const RECOMPUTE_SHARED_PRODUCTS: Pass = Pass { name: "recompute_shared_products", run: recompute_shared_products };
    /// Makes `rms_norm(x + rms_norm(o))` (or of `x + o`) one step holding the sum and its norm.
    pub const RESIDUAL_RMS_NORM: Pass = Pass { name: "residual_rms_norm", run: residual_rms_norm };
    /// Makes sibling projections of one input (Q/K/V, gate/up) one GEMM over stacked weights.
    pub const STACK_PROJECTIONS: Pass = Pass { name: "stack_projections", run: stack_projections };
    /// [`Pass::STACK_PROJECTIONS`] that also stacks projections of different widths over many
    /// rows, a wide one read through a permute (for backends that read such a permute for free).
    pub const STACK_PROJECTIONS_ROWS: Pass = Pass { name: "stack_projections_rows", run: stack_projections_rows };
    /// Makes `gather(table, ids) * c` (an embedding's scale) one gather with the scale.
    pub const GATHER_SCALE: Pass = Pass { name: "gather_scale", run: gather_scale };
    /// Moves a cast past reshapes, next to the matmul or elementwise node it can fuse with.
    pub const CASTS_PAST_RESHAPES: Pass = Pass { name: "casts_past_reshapes", run: casts_past_reshapes };
    /// Computes a region made from much smaller inputs (RoPE's angles) inside each region or epilogue reading it.
    pub const RECOMPUTE_GENERATORS: Pass = Pass { name: "recompute_generators", run: recompute_generators };

    /// Makes a GLU's gate and up products and their epilogue one gated matmul wherever the
    /// pattern is found (the compile runs [`gated_matmul`] where the backend takes the node).
    pub const GATED_MATMUL: Pass = Pass { name: "gated_matmul", run: gated_matmul_everywhere };

    /// Every pass, for lookup by name.
    pub const ALL: [Pass; 17] = [
        Pass::DEAD_CODE,
        Pass::CONSTANT_FOLD,
        Pass::CSE,
        Pass::FUSE_MATMUL_EPILOGUE,
        Pass::FUSE_ELEMENTWISE,
        Pass::LOWER_CONV,
        Pass::NEGATION_THROUGH_CONCAT,
        Pass::ROTATION_AS_MATMUL,
        Pass::RESIDUAL_RMS_NORM,
        Pass::STACK_PROJECTIONS,
        Pass::STACK_PROJECTIONS_ROWS,
        Pass::CONCAT_OF_PRODUCTS,
        Pass::RECOMPUTE_SHARED_PRODUCTS,
        Pass::GATHER_SCALE,
        Pass::CASTS_PAST_RESHAPES,
        Pass::RECOMPUTE_GENERATORS,
        Pass::GATED_MATMUL,
    ];

    /// The pass with this name.
    pub fn by_name(name: &str) -> Option<Pass> {
        Pass::ALL.into_iter().find(|p| p.name == name)
    }
}

/// An ordered list of passes: the compiler's optimisation pipeline as a value.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The passes, run in order.
    pub passes: Vec<Pass>,
}

impl Pipeline {
    /// A pipeline running `passes` in order.
    pub fn new(passes: Vec<Pass>) -> Self {
        Pipeline { passes }
    }

    /// The default pipeline. Epilogue fusion runs before elementwise fusion so that a
    /// matmul's bias, activation and residual go into its epilogue rather than into a
    /// separate fused region that would need the raw product in memory. It runs once more
    /// after: a product read by several nodes of one region (`select(x > 0, x, 0)`) is
    /// read once by the fused node, which can then join the epilogue. A signed permutation of
    /// the last axis (RoPE's rotate_half) becomes a matmul first, so that epilogue fusion
    /// takes its reader; other negations move past concats before CSE (which merges their
    /// equal sign and permutation constants), so that the sign joins the reader's region. A
    /// residual add between two RMS norms becomes one step before either fusion could take
    /// the add (into a region or a matmul's epilogue). Sibling projections stack into one GEMM
    /// while the products are still plain matmuls, so that their stacked bias joins its epilogue.
    /// A concat of products of one tensor by constants (RoPE's frequencies, `concat(f, f)`)
    /// becomes one product first; such a product read by several unary functions (cos and sin)
    /// is copied to each before elementwise fusion, so that each function and its product are
    /// one region. An embedding's scale joins its gather before elementwise fusion could take
    /// the product into a region that reads it. Casts move past reshapes first, next to the
    /// matmul or elementwise node they fuse with (an epilogue or region may hold casts: a bf16
    /// head's logits cast to f32, an i64 position cast to f32 inside RoPE's angle regions).
    /// Last, a region made from much smaller inputs (those angle regions: cos or sin of
    /// positions times frequencies) is computed inside each region or epilogue reading it (q's
    /// and k's RoPE), for a few transcendental operations more per element of those readers.
    pub fn standard() -> Self {
        Pipeline::new(vec![
            Pass::DEAD_CODE,
            Pass::CONSTANT_FOLD,
            Pass::CONCAT_OF_PRODUCTS,
            Pass::ROTATION_AS_MATMUL,
            Pass::NEGATION_THROUGH_CONCAT,
            Pass::CSE,
            Pass::DEAD_CODE,
            Pass::RESIDUAL_RMS_NORM,
            Pass::STACK_PROJECTIONS,
            Pass::CASTS_PAST_RESHAPES,
            Pass::FUSE_MATMUL_EPILOGUE,
            Pass::RECOMPUTE_SHARED_PRODUCTS,
            Pass::GATHER_SCALE,
            Pass::FUSE_ELEMENTWISE,
            Pass::FUSE_MATMUL_EPILOGUE,
            Pass::RECOMPUTE_GENERATORS,
            Pass::DEAD_CODE,
        ])
    }

    /// A pipeline from comma-separated pass names (`standard` expands to the default).
    pub fn parse(names: &str) -> Result<Self> {
        let mut passes = Vec::new();
        for name in names.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "standard" {
                passes.extend(Pipeline::standard().passes);
                continue;
            }
            let known: Vec<&str> = Pass::ALL.iter().map(|p| p.name).collect();
            let pass = Pass::by_name(name)
                .ok_or_else(|| GraphError::Invalid(format!("unknown pass '{name}'; known: standard, {}", known.join(", "))))?;
            passes.push(pass);
        }
        Ok(Pipeline::new(passes))
    }

    /// Runs the passes in order, verifying the graph before the first and after each one.
    /// With `trace`, appends `(pass name, printed IR)` after each pass.
    pub fn run(&self, g: &Graph, mut trace: Option<&mut Vec<(String, String)>>) -> Result<Graph> {
        verify(g).map_err(|e| GraphError::Pass { pass: "input", msg: format!("the graph given to the pipeline is invalid: {e}") })?;
        let mut cur = g.clone();
        for pass in &self.passes {
            cur = (pass.run)(&cur)?;
            verify(&cur).map_err(|e| GraphError::Pass { pass: pass.name, msg: format!("result fails verification: {e}") })?;
            if let Some(t) = trace.as_mut() {
                t.push((pass.name.to_string(), print(&cur)));
            }
        }
        Ok(cur)
    }
}

/// The fused regions and matmul epilogues of a graph with their expressions, in node order.
pub fn fusion_groups(g: &Graph) -> Vec<(NodeId, String)> {
    let mut groups = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let expr = match &n.op {
            Op::Fused(e) | Op::MatMul { epilogue: Some(e), .. } | Op::GatedMatMul { epilogue: e, .. } => e,
            _ => continue,
        };
        groups.push((NodeId(i as u32), expr_to_string(expr)));
    }
    groups
}

// ---- shared machinery ----

/// What a pass does with one node of the old graph.
#[derive(Clone, Debug)]
pub(crate) enum Action {
    /// Copy the node, remapping its inputs.
    Keep,
    /// Leave the node out; nothing kept may read it.
    Drop,
    /// Put another op (over old-graph inputs) in its place; the type must not change.
    Replace { op: Op, inputs: Vec<NodeId> },
    /// Readers of the node read this earlier node (of the same type) instead.
    Alias(NodeId),
}

/// Builds the new graph from one action per old node, remapping ids and outputs.
/// Every new node's type is re-inferred and must equal the old node's.
pub(crate) fn rebuild(pass: &'static str, g: &Graph, actions: Vec<Action>) -> Result<Graph> {
    let err = |msg: String| GraphError::Pass { pass, msg };
    if actions.len() != g.nodes.len() {
        return Err(err(format!("{} actions for {} nodes", actions.len(), g.nodes.len())));
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; g.nodes.len()];
    let lookup = |map: &[Option<NodeId>], old: NodeId, reader: &str| {
        map.get(old.index())
            .copied()
            .flatten()
            .ok_or_else(|| GraphError::Pass { pass, msg: format!("{reader} reads {old}, which the pass removed") })
    };
    for (i, (node, action)) in g.nodes.iter().zip(actions).enumerate() {
        let (op, inputs) = match action {
            Action::Keep => (node.op.clone(), node.inputs.clone()),
            Action::Drop => continue,
            Action::Alias(target) => {
                if target.index() >= i || g.ty(target) != &node.ty {
                    return Err(err(format!("%{i} ({}) cannot be replaced by {target} ({})", node.ty, g.ty(target))));
                }
                map[i] = Some(lookup(&map, target, &format!("%{i}"))?);
                continue;
            }
            Action::Replace { op, inputs } => (op, inputs),
        };
        let ins = inputs.iter().map(|&p| lookup(&map, p, &format!("%{i}"))).collect::<Result<Vec<_>>>()?;
        let pushed = if op.is_source() || matches!(op, Op::Iota { .. }) {
            if !ins.is_empty() {
                return Err(err(format!("%{i} becomes a {} with inputs", op.name())));
            }
            out.push_source(op, node.ty.clone())
        } else {
            out.push(op, &ins)
        };
        let id = pushed.map_err(|e| err(format!("rebuilding %{i}: {e}")))?;
        same_type(pass, &out, i, node, id)?;
        map[i] = Some(id);
    }
    for (name, id) in &g.outputs {
        let new = lookup(&map, *id, &format!("output '{name}'"))?;
        out.output(name.clone(), new);
    }
    Ok(out)
}

/// Copies old node `node` into `out` with its inputs remapped to `ins` (a source or iota keeps
/// its type): what a pass emits for a node it does not rewrite.
pub(crate) fn copy_node(out: &mut Graph, node: &crate::graph::Node, ins: &[NodeId]) -> Result<NodeId> {
    if node.op.is_source() || matches!(node.op, Op::Iota { .. }) {
        out.push_source(node.op.clone(), node.ty.clone())
    } else {
        out.push(node.op.clone(), ins)
    }
}

/// Copies old node `i` into `out` with its inputs looked up in `map` (an input the pass
/// removed is an error naming it): what a pass that builds its graph node by node emits for a
/// node it keeps.
pub(crate) fn copy_mapped(
    pass: &'static str,
    out: &mut Graph,
    i: usize,
    node: &crate::graph::Node,
    map: &[Option<NodeId>],
) -> Result<NodeId> {
    let ins = node
        .inputs
        .iter()
        .map(|p| map[p.index()].ok_or_else(|| GraphError::Pass { pass, msg: format!("%{i} reads {p}, which the pass removed") }))
        .collect::<Result<Vec<_>>>()?;
    copy_node(out, node, &ins)
}

/// Names `g`'s outputs in `out` through `map` (an output the pass removed is an error).
pub(crate) fn map_outputs(pass: &'static str, g: &Graph, out: &mut Graph, map: &[Option<NodeId>]) -> Result<()> {
    for (name, id) in &g.outputs {
        let new =
            map[id.index()].ok_or_else(|| GraphError::Pass { pass, msg: format!("output '{name}' names {id}, which the pass removed") })?;
        out.output(name.clone(), new);
    }
    Ok(())
}

/// Every pass's invariant: new node `id` has the type old node `i` had.
pub(crate) fn same_type(pass: &'static str, out: &Graph, i: usize, node: &crate::graph::Node, id: NodeId) -> Result<()> {
    if out.ty(id) != &node.ty {
        return Err(GraphError::Pass { pass, msg: format!("%{i} changes type from {} to {}", node.ty, out.ty(id)) });
    }
    Ok(())
}

/// `g`'s outputs named in `out`, through `map` (old node index to new id).
pub(crate) fn copy_outputs(g: &Graph, out: &mut Graph, map: &[NodeId]) {
    for (name, id) in &g.outputs {
        out.output(name.clone(), map[id.index()]);
    }
}

/// Who reads each node: reader node indices (once per input slot) and whether it is an output.
pub(crate) struct Uses {
    pub readers: Vec<Vec<usize>>,
    pub is_output: Vec<bool>,
}

impl Uses {
    /// The readers of every node of `g`.
    pub fn of(g: &Graph) -> Self {
        let mut readers = vec![Vec::new(); g.nodes.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for p in &n.inputs {
                readers[p.index()].push(i);
            }
        }
        let mut is_output = vec![false; g.nodes.len()];
        for (_, o) in &g.outputs {
            is_output[o.index()] = true;
        }
        Uses { readers, is_output }
    }

    /// The one node that reads `i` (possibly in several slots), when `i` is not an output.
    pub fn sole_reader(&self, i: usize) -> Option<usize> {
        if self.is_output[i] {
            return None;
        }
        let first = *self.readers[i].first()?;
        self.readers[i].iter().all(|&r| r == first).then_some(first)
    }
}

/// The value of a one-element constant (shape `[]` or all ones), which an expression can
/// hold as an [`Instr::Const`].
pub(crate) fn scalar_constant(g: &Graph, id: NodeId) -> Option<f32> {
    match (&g.node(id).op, g.ty(id).numel()) {
        (Op::Constant { values }, 1) => values.first().map(|&v| v as f32),
        _ => None,
    }
}

/// Appends instructions to a fused expression; every method returns `None` once the
/// expression outgrows `u16` indices (the caller then leaves the nodes unfused).
#[derive(Default)]
pub(crate) struct ExprBuilder {
    pub instrs: Vec<Instr>,
}

impl ExprBuilder {
    /// Appends one instruction; its index.
    pub fn push(&mut self, ins: Instr) -> Option<u16> {
        let i = u16::try_from(self.instrs.len()).ok()?;
        self.instrs.push(ins);
        Some(i)
    }

    /// Appends `e` with its `Input(k)` reading instruction `args[k]`; the index of its result.
    pub fn inline(&mut self, e: &Expr, args: &[u16]) -> Option<u16> {
        let mut at: Vec<u16> = Vec::with_capacity(e.instrs.len());
        for ins in &e.instrs {
            let get = |k: u16| at.get(k as usize).copied();
            let r = match *ins {
                Instr::Input(k) => *args.get(k as usize)?,
                Instr::Const(c) => self.push(Instr::Const(c))?,
                Instr::Unary(op, a) => self.push(Instr::Unary(op, get(a)?))?,
                Instr::Binary(op, a, b) => self.push(Instr::Binary(op, get(a)?, get(b)?))?,
                Instr::Select(c, a, b) => self.push(Instr::Select(get(c)?, get(a)?, get(b)?))?,
                Instr::Cast(d, a) => self.push(Instr::Cast(d, get(a)?))?,
            };
            at.push(r);
        }
        at.last().copied()
    }

    /// The expression computing instruction `result`: instructions it does not depend on
    /// are dropped, so the result is the last one.
    pub fn finish(self, result: u16) -> Option<Expr> {
        let r = result as usize;
        let instrs = self.instrs.get(..=r)?;
        let mut live = vec![false; r + 1];
        live[r] = true;
        for i in (0..=r).rev() {
            if live[i] {
                for d in instrs[i].operands() {
                    live[d as usize] = true;
                }
            }
        }
        let mut new_index = vec![0u16; r + 1];
        let mut out = Vec::new();
        for (i, ins) in instrs.iter().enumerate().filter(|(i, _)| live[*i]) {
            let m = |a: u16| new_index[a as usize];
            let renamed = ins.map_operands(m);
            new_index[i] = u16::try_from(out.len()).ok()?;
            out.push(renamed);
        }
        Some(Expr { instrs: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::{BinaryOp, UnaryOp};

    #[test]
    fn pipeline_traces_every_pass_and_verifies() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]).unwrap();
        let y = g.unary(UnaryOp::Exp, x).unwrap();
        let z = g.unary(UnaryOp::Tanh, y).unwrap();
        g.output("z", z);
        let mut trace = Vec::new();
        let p = Pipeline::standard();
        let out = p.run(&g, Some(&mut trace)).unwrap();
        assert_eq!(trace.len(), p.passes.len());
        assert_eq!(trace.last().unwrap().1, print(&out));
        assert_eq!(fusion_groups(&out), vec![(NodeId(1), "tanh(exp($0))".to_string())]);
    }

    #[test]
    fn a_region_reading_the_product_twice_joins_the_epilogue() {
        // relu written as select(h > 0, h, 0): h is read twice, so only after elementwise
        // fusion (one reader) can the second epilogue pass take it.
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 4]).unwrap();
        let w = g.weight("w", DType::F32, &[4, 4]).unwrap();
        let h = g.matmul(x, w, true).unwrap();
        let zero = g.scalar(DType::F32, 0.0).unwrap();
        let pos = g.binary(BinaryOp::Gt, h, zero).unwrap();
        let y = g.push(Op::Select, &[pos, h, zero]).unwrap();
        g.output("y", y);
        let out = Pipeline::standard().run(&g, None).unwrap();
        assert_eq!(
            print(&out),
            "%0 = input[\"x\"]() : f32[2,4]\n%1 = weight[\"w\"]() : f32[4,4]\n\
             %2 = matmul[b^T, epilogue=select(gt($0, 0.0), $0, 0.0)](%0, %1) : f32[2,4]\noutput \"y\" = %2\n"
        );
    }

    #[test]
    fn pipeline_parses_names() {
        let p = Pipeline::parse("cse, dead_code").unwrap();
        assert_eq!(p.passes.iter().map(|p| p.name).collect::<Vec<_>>(), ["cse", "dead_code"]);
        assert_eq!(Pipeline::parse("standard").unwrap().passes.len(), Pipeline::standard().passes.len());
        assert!(Pipeline::parse("nope").is_err());
    }

    #[test]
    fn rebuild_refuses_to_read_a_dropped_node() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2]).unwrap();
        let y = g.unary(UnaryOp::Neg, x).unwrap();
        let z = g.binary(BinaryOp::Add, y, x).unwrap();
        g.output("z", z);
        let err = rebuild("test", &g, vec![Action::Keep, Action::Drop, Action::Keep]).unwrap_err();
        assert!(err.to_string().contains("%2 reads %1"), "{err}");
    }

    #[test]
    fn expr_finish_drops_dead_instructions() {
        let mut b = ExprBuilder::default();
        let a = b.push(Instr::Input(0)).unwrap();
        b.push(Instr::Const(2.0)).unwrap();
        let n = b.push(Instr::Unary(UnaryOp::Neg, a)).unwrap();
        b.push(Instr::Input(1)).unwrap();
        let e = b.finish(n).unwrap();
        assert_eq!(e.instrs, vec![Instr::Input(0), Instr::Unary(UnaryOp::Neg, 0)]);
    }
}
