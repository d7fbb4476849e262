//! The graph: nodes in topological order, each an op with its inputs and its inferred type.

use crate::dtype::{DType, TensorType};
use crate::error::{GraphError, Result};
use crate::infer::infer;
use crate::op::{Attention, BinaryOp, Op, ReduceOp, UnaryOp};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Index of a node in its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The index as a usize.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One node: an op applied to earlier nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub ty: TensorType,
}

/// A dataflow graph in topological order with named outputs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub outputs: Vec<(String, NodeId)>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Graph::default()
    }

    /// The node behind an id.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// The type of a node.
    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.nodes[id.index()].ty
    }

    /// The shape of a node.
    pub fn shape(&self, id: NodeId) -> &[usize] {
        &self.nodes[id.index()].ty.shape
    }

    /// Appends a node whose type its rule infers.
    pub fn push(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let node = self.nodes.len();
        for &i in inputs {
            if i.index() >= node {
                return Err(GraphError::Order { node, input: i.index() });
            }
        }
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| &self.nodes[i.index()].ty).collect();
        let ty = infer(&op, &tys, None).map_err(|msg| GraphError::Type { node, op: op.name(), msg })?;
        self.nodes.push(Node { op, inputs: inputs.to_vec(), ty });
        Ok(NodeId(node as u32))
    }

    /// Appends a source node of a given type (input, weight, constant, iota).
    pub fn push_source(&mut self, op: Op, ty: TensorType) -> Result<NodeId> {
        let node = self.nodes.len();
        // Every other type derives from sources: one whose size overflows is refused here.
        if ty.shape.iter().try_fold(ty.dtype.size(), |a, &d| a.checked_mul(d)).is_none() {
            return Err(GraphError::Type { node, op: op.name(), msg: format!("{ty} has more bytes than a usize holds") });
        }
        let ty = infer(&op, &[], Some(&ty)).map_err(|msg| GraphError::Type { node, op: op.name(), msg })?;
        self.nodes.push(Node { op, inputs: vec![], ty });
        Ok(NodeId(node as u32))
    }

    /// Names a node as an output.
    pub fn output(&mut self, name: impl Into<String>, id: NodeId) {
        self.outputs.push((name.into(), id));
    }

    /// The runtime inputs, in node order.
    pub fn inputs(&self) -> impl Iterator<Item = (NodeId, &str, &TensorType)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| match &n.op {
            Op::Input { name } => Some((NodeId(i as u32), name.as_str(), &n.ty)),
            _ => None,
        })
    }

    /// The weights, in node order.
    pub fn weights(&self) -> impl Iterator<Item = (NodeId, &str, &TensorType)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| match &n.op {
            Op::Weight { name } => Some((NodeId(i as u32), name.as_str(), &n.ty)),
            _ => None,
        })
    }

    /// How many nodes read each node (outputs count as readers).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.nodes.len()];
        for n in &self.nodes {
            for i in &n.inputs {
                uses[i.index()] += 1;
            }
        }
        for (_, o) in &self.outputs {
            uses[o.index()] += 1;
        }
        uses
    }

    // ---- builder conveniences: composite layers live in kiln-models ----

    /// A runtime input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<NodeId> {
        self.push_source(Op::Input { name: name.into() }, TensorType::new(dtype, shape))
    }

    /// A checkpoint weight.
    pub fn weight(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<NodeId> {
        self.push_source(Op::Weight { name: name.into() }, TensorType::new(dtype, shape))
    }

    /// A constant tensor.
    pub fn constant(&mut self, dtype: DType, shape: &[usize], values: Vec<f64>) -> Result<NodeId> {
        self.push_source(Op::Constant { values }, TensorType::new(dtype, shape))
    }

    /// A scalar constant (shape `[]`).
    pub fn scalar(&mut self, dtype: DType, v: f64) -> Result<NodeId> {
        self.constant(dtype, &[], vec![v])
    }

    /// `f(x)`.
    pub fn unary(&mut self, op: UnaryOp, x: NodeId) -> Result<NodeId> {
        self.push(Op::Unary(op), &[x])
    }

    /// `a op b`.
    pub fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.push(Op::Binary(op), &[a, b])
    }

    /// `a + b`.
    pub fn add(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Add, a, b)
    }

    /// `a * b`.
    pub fn mul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Mul, a, b)
    }

    /// `x * c` for a scalar constant of x's dtype.
    pub fn mul_scalar(&mut self, x: NodeId, c: f64) -> Result<NodeId> {
        let s = self.scalar(self.ty(x).dtype, c)?;
        self.mul(x, s)
    }

    /// `a @ b` (with `b` transposed when `transpose_b`).
    pub fn matmul(&mut self, a: NodeId, b: NodeId, transpose_b: bool) -> Result<NodeId> {
        self.push(Op::MatMul { transpose_b, epilogue: None }, &[a, b])
    }

    /// New shape, same elements.
    pub fn reshape(&mut self, x: NodeId, shape: &[usize]) -> Result<NodeId> {
        self.push(Op::Reshape { shape: shape.to_vec() }, &[x])
    }

    /// Axis permutation.
    pub fn permute(&mut self, x: NodeId, perm: &[usize]) -> Result<NodeId> {
        self.push(Op::Permute { perm: perm.to_vec() }, &[x])
    }

    /// Contiguous slice along an axis.
    pub fn slice(&mut self, x: NodeId, axis: usize, start: usize, end: usize) -> Result<NodeId> {
        self.push(Op::Slice { axis, start, end, step: 1 }, &[x])
    }

    /// Concatenation along an axis.
    pub fn concat(&mut self, xs: &[NodeId], axis: usize) -> Result<NodeId> {
        self.push(Op::Concat { axis }, xs)
    }

    /// `dst` with `rows` written along `axis` from position `at` (i64 `[1]`) on.
    pub fn write_slice(&mut self, dst: NodeId, rows: NodeId, at: NodeId, axis: usize) -> Result<NodeId> {
        self.push(Op::WriteSlice { axis }, &[dst, rows, at])
    }

    /// Reduction over axes.
    pub fn reduce(&mut self, op: ReduceOp, x: NodeId, axes: &[usize], keep_dims: bool) -> Result<NodeId> {
        self.push(Op::Reduce { op, axes: axes.to_vec(), keep_dims }, &[x])
    }

    /// Softmax over an axis.
    pub fn softmax(&mut self, x: NodeId, axis: usize) -> Result<NodeId> {
        self.push(Op::Softmax { axis }, &[x])
    }

    /// Layer norm over the last axis.
    pub fn layer_norm(&mut self, x: NodeId, scale: NodeId, bias: NodeId, eps: f32) -> Result<NodeId> {
        self.push(Op::LayerNorm { eps }, &[x, scale, bias])
    }

    /// Attention on `[B,S,H,D]` tensors.
    pub fn attention(&mut self, q: NodeId, k: NodeId, v: NodeId, attrs: Attention) -> Result<NodeId> {
        self.push(Op::Attention(attrs), &[q, k, v])
    }
}
