//! Layers shared by the model files: weights checked against the checkpoint, linear maps,
//! activations, multi-head attention. Composite ops are builder functions over the IR.

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use kiln_graph::{Attention, BinaryOp, DType, Graph, MaskKind, NodeId, UnaryOp};

/// A graph under construction together with the checkpoint it reads.
pub struct Builder<'a> {
    pub g: Graph,
    pub ck: &'a Checkpoint,
    /// The compute dtype: weights are converted to it when loaded.
    pub dtype: DType,
    /// Appended to every weight name while set (`[i]`: layer i of a scan-stacked array).
    pub weight_suffix: Option<String>,
    /// Put before every weight name while set (`params_adaptor/`: JetFormer's Jet subtree).
    pub weight_prefix: Option<String>,
}

/// An activation function named by a config's `hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    GeluTanh,
    GeluErf,
    QuickGelu,
    Relu,
    Silu,
}

impl Activation {
    /// Parses a Hugging Face `hidden_act` value (`ACT2FN` names with the same formula).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_accurate" | "gelu_python_tanh" => Activation::GeluTanh,
            "gelu" | "gelu_python" => Activation::GeluErf,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }
}

impl<'a> Builder<'a> {
    /// A fresh graph over a checkpoint.
    pub fn new(ck: &'a Checkpoint, dtype: DType) -> Self {
        Builder { g: Graph::new(), ck, dtype, weight_suffix: None, weight_prefix: None }
    }

    /// A weight node, checked against the checkpoint's shape.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<NodeId> {
        let name = match &self.weight_suffix {
            Some(s) => format!("{name}{s}"),
            None => name.to_string(),
        };
        let name = match &self.weight_prefix {
            Some(p) => format!("{p}{name}"),
            None => name,
        };
        let stored = self.ck.expect(&name, shape)?.name;
        Ok(self.g.weight(&stored, self.dtype, shape)?)
    }

    /// `x @ W^T + b` for a PyTorch `Linear` stored as `{prefix}.weight [out, in]`, `{prefix}.bias [out]`.
    pub fn linear(&mut self, x: NodeId, prefix: &str, d_in: usize, d_out: usize) -> Result<NodeId> {
        let w = self.weight(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let b = self.weight(&format!("{prefix}.bias"), &[d_out])?;
        let y = self.g.matmul(x, w, true)?;
        Ok(self.g.add(y, b)?)
    }

    /// `LayerNorm` stored as `{prefix}.weight`, `{prefix}.bias`.
    pub fn layer_norm(&mut self, x: NodeId, prefix: &str, d: usize, eps: f32) -> Result<NodeId> {
        let s = self.weight(&format!("{prefix}.weight"), &[d])?;
        let b = self.weight(&format!("{prefix}.bias"), &[d])?;
        Ok(self.g.layer_norm(x, s, b, eps)?)
    }

    /// Applies an activation.
    pub fn act(&mut self, x: NodeId, a: Activation) -> Result<NodeId> {
        Ok(match a {
            Activation::GeluTanh => self.g.unary(UnaryOp::GeluTanh, x)?,
            Activation::GeluErf => self.g.unary(UnaryOp::GeluErf, x)?,
            Activation::Relu => self.g.unary(UnaryOp::Relu, x)?,
            Activation::Silu => self.g.unary(UnaryOp::Silu, x)?,
            Activation::QuickGelu => {
                let s = self.g.mul_scalar(x, 1.702)?;
                let s = self.g.unary(UnaryOp::Sigmoid, s)?;
                self.g.mul(x, s)?
            }
        })
    }

    /// Multi-head attention without a mask over `[B, S, D]`-shaped projections given as
    /// `[B*S, D]` rows: splits heads, attends with scale `1/sqrt(head_dim)`, merges heads.
    #[allow(clippy::too_many_arguments)]
    pub fn mha(&mut self, q: NodeId, k: NodeId, v: NodeId, b: usize, sq: usize, sk: usize, heads: usize, hd: usize) -> Result<NodeId> {
        let q = self.g.reshape(q, &[b, sq, heads, hd])?;
        let k = self.g.reshape(k, &[b, sk, heads, hd])?;
        let v = self.g.reshape(v, &[b, sk, heads, hd])?;
        let attrs = Attention { scale: (hd as f32).powf(-0.5), softcap: None, mask: MaskKind::None };
        let o = self.g.attention(q, k, v, attrs)?;
        Ok(self.g.reshape(o, &[b * sq, heads * hd])?)
    }

    /// `a + b`.
    pub fn add(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        Ok(self.g.binary(BinaryOp::Add, a, b)?)
    }
}

/// An error for a checkpoint layout kiln cannot find.
pub fn not_found(ck: &Checkpoint, what: &str) -> ModelError {
    ModelError::Unsupported(format!("{}: {what}", ck.dir.display()))
}
