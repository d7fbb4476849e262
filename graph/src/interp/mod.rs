//! The reference interpreter: the oracle every backend is checked against.
//!
//! Values are held as f64 and rounded to their dtype after every op, so an f32 graph is
//! evaluated with f32 storage but without accumulated rounding inside an op. It is written
//! for clarity, not speed.

mod ops;

use crate::dtype::TensorType;
use crate::error::{GraphError, Result};
use crate::graph::Graph;
use crate::op::Op;
use std::collections::HashMap;

/// A tensor value held by the interpreter.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub ty: TensorType,
    pub data: Vec<f64>,
}

impl Value {
    /// A value from a type and data (rounded to the dtype); the length must match.
    pub fn new(ty: TensorType, data: Vec<f64>) -> Result<Self> {
        if data.len() != ty.numel() {
            return Err(GraphError::Invalid(format!("{} values for {ty}", data.len())));
        }
        let data = data.into_iter().map(|x| ty.dtype.round(x)).collect();
        Ok(Value { ty, data })
    }

    /// An f32 value.
    pub fn from_f32(shape: &[usize], data: &[f32]) -> Result<Self> {
        Value::new(TensorType::new(crate::DType::F32, shape), data.iter().map(|&x| x as f64).collect())
    }

    /// The data as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }
}

/// Evaluates `graph` on named inputs and weights; returns the named outputs.
pub fn run(graph: &Graph, inputs: &HashMap<String, Value>, weights: &HashMap<String, Value>) -> Result<HashMap<String, Value>> {
    let mut uses = graph.use_counts();
    let mut vals: Vec<Option<Value>> = vec![None; graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        let v = match &node.op {
            Op::Input { name } => source(inputs, name, &node.ty)?,
            Op::Weight { name } => match crate::safetensors::stack_parts(name) {
                Some(parts) if !weights.contains_key(name.as_str()) => stacked(weights, name, &parts, &node.ty)?,
                _ => source(weights, name, &node.ty)?,
            },
            _ => {
                let args: Vec<&Value> = node
                    .inputs
                    .iter()
                    .map(|id| vals[id.index()].as_ref().ok_or_else(|| GraphError::Order { node: i, input: id.index() }))
                    .collect::<Result<_>>()?;
                let data = ops::eval(&node.op, &args, &node.ty).map_err(|msg| GraphError::Eval { node: i, op: node.op.name(), msg })?;
                Value { data: data.into_iter().map(|x| node.ty.dtype.round(x)).collect(), ty: node.ty.clone() }
            }
        };
        vals[i] = Some(v);
        for id in &node.inputs {
            uses[id.index()] -= 1;
            if uses[id.index()] == 0 {
                vals[id.index()] = None;
            }
        }
    }
    let mut out = HashMap::new();
    for (name, id) in &graph.outputs {
        let v = vals[id.index()].clone().ok_or_else(|| GraphError::Invalid(format!("output {name} was not computed")))?;
        out.insert(name.clone(), v);
    }
    Ok(out)
}

fn source(map: &HashMap<String, Value>, name: &str, ty: &TensorType) -> Result<Value> {
    let v = map.get(name).ok_or_else(|| GraphError::Input { name: name.into(), msg: format!("missing; expected {ty}") })?;
    if v.ty.shape != ty.shape {
        return Err(GraphError::Input { name: name.into(), msg: format!("expected {ty}, found {}", v.ty) });
    }
    // A source of another dtype is converted (bf16 weights into an f32 graph, say).
    Ok(Value { ty: ty.clone(), data: v.data.iter().map(|&x| ty.dtype.round(x)).collect() })
}

/// A stacked weight (`p/~stack(a|b)`) from its parts, each of one slice's shape of `ty` or
/// several slices joined ([`crate::safetensors::stack_slots`]), filling its leading axis.
fn stacked(map: &HashMap<String, Value>, name: &str, parts: &[String], ty: &TensorType) -> Result<Value> {
    let slice = TensorType::new(ty.dtype, ty.shape.get(1..).unwrap_or(&[]).to_vec());
    let mut data = Vec::with_capacity(ty.numel());
    let mut slots = 0;
    for p in parts {
        let stored = map.get(p).map(|v| v.ty.shape.clone());
        let m = stored.as_deref().and_then(|s| crate::safetensors::stack_slots(s, &slice.shape)).unwrap_or(1);
        let mut want = slice.shape.clone();
        if let Some(w0) = want.first_mut() {
            *w0 *= m;
        }
        data.extend(source(map, p, &TensorType::new(ty.dtype, want))?.data);
        slots += m;
    }
    if ty.shape.first() != Some(&slots) {
        return Err(GraphError::Input { name: name.into(), msg: format!("stacks {slots} slices of {slice}, expected {ty}") });
    }
    Ok(Value { ty: ty.clone(), data })
}

/// Evaluates one op on values, rounding the result to the output dtype: the per-op oracle
/// (constant folding and backends' reference fallbacks use it).
pub fn eval_op(op: &Op, args: &[&Value], out: &TensorType) -> std::result::Result<Value, String> {
    let data = ops::eval(op, args, out)?;
    Ok(Value { data: data.into_iter().map(|x| out.dtype.round(x)).collect(), ty: out.clone() })
}
