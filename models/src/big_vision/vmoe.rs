//! V-MoE: "Scaling Vision with Sparse Mixture of Experts" (arXiv 2106.05974), as
//! `google-research/vmoe` computes it at inference (`vmoe/nn/vit_moe.py`
//! `VisionTransformerMoe`, `vmoe/nn/routing.py` `NoisyTopExpertsPerItemRouter`, `vmoe/moe.py`
//! einsum dispatcher): a ViT whose MLP is replaced, in some blocks, by E expert MLPs that
//! each token reaches through a router.
//!
//! Routing, per group of S consecutive tokens (whole images): gates = softmax(x W_r); the
//! top-K experts per token; with batch-prioritized routing tokens are ordered by their top-1
//! gate (a stable descending sort); every first choice comes before any second choice; an
//! expert's buffer slot is the running count of assignments to it, and an assignment whose
//! slot reaches the capacity `ceil(S*K*C/E)` (rounded up to a multiple of 4) is dropped.
//! Combine weights are the raw gates, so a token every expert dropped contributes zero.
//! The routing is plain IR (softmax, top-k, take-along-axis, cumsum, scatter-add, compare,
//! select), so the interpreter checks it; the buffers have static capacity, so the memory
//! plan treats them like any dense tensor, and the experts run as one batched matmul over
//! `[E, G*Cap, D]`.

use super::{grid, pair, patch_embed};
use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::Builder;
use crate::registry::{Family, Kind, SynthRecipe, SynthRow, WeightFormat};
use crate::{Checkpoint, MoeOutputs, Profile};
use kiln_graph::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};

/// How the encoder's output becomes the image representation (`classifier`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classifier {
    /// A class token prepended before the position embedding; its output is taken.
    Token,
    /// The mean over tokens (no class token).
    Gap,
}

/// The MoE part of the encoder config (`encoder.moe` with its router and dispatcher).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Blocks whose MLP is a mixture of experts.
    pub layers: Vec<usize>,
    pub num_experts: usize,
    /// Tokens per routing group (S).
    pub group_size: usize,
    /// Experts per token (K).
    pub num_selected: usize,
    /// Capacity ratio C.
    pub capacity_factor: f64,
    /// Batch-prioritized routing.
    pub batch_priority: bool,
    /// `capacity_ceil_or_round == "ceil"`.
    pub capacity_ceil: bool,
    pub capacity_multiple_of: usize,
}

impl MoeConfig {
    /// Per-expert, per-group buffer size: `ceil(S*K*C/E)` (or rounded), then up to a multiple.
    pub fn capacity(&self) -> usize {
        let raw = (self.group_size * self.num_selected) as f64 * self.capacity_factor / self.num_experts as f64;
        let mut cap = if self.capacity_ceil { raw.ceil() } else { raw.round_ties_even() } as usize;
        if self.capacity_multiple_of > 0 {
            cap += (self.capacity_multiple_of - cap % self.capacity_multiple_of) % self.capacity_multiple_of;
        }
        cap.max(1)
    }
}

/// The keyword arguments of vmoe's `VisionTransformerMoe`, all honoured or refused.
#[derive(Clone, Debug, PartialEq)]
pub struct VmoeConfig {
    pub num_classes: Option<usize>,
    pub patch: (usize, usize),
    pub hidden: usize,
    pub classifier: Classifier,
    pub representation_size: Option<usize>,
    pub num_layers: usize,
    pub mlp_dim: usize,
    pub num_heads: usize,
    pub moe: Option<MoeConfig>,
}

impl VmoeConfig {
    /// Reads `VisionTransformerMoe` kwargs strictly (nested `encoder`, `moe`, `router`,
    /// `dispatcher` as in vmoe's configs); training-only fields are accepted and unused.
    pub fn read(mut r: ConfigReader) -> Result<Self> {
        let num_classes = if r.has("num_classes") { Some(r.usize_or("num_classes", None)?) } else { None };
        let patch = pair(&mut r, "patch_size", (16, 16))?;
        let hidden = r.usize_or("hidden_size", None)?;
        let classifier = match r.str_or("classifier", Some("token"))?.as_str() {
            "token" => Classifier::Token,
            "gap" => Classifier::Gap,
            other => return Err(r.unsupported("classifier", format!("'{other}' is not supported (token, gap)"))),
        };
        let representation_size = if r.has("representation_size") { Some(r.usize_or("representation_size", None)?) } else { None };
        if !r.bool_or("deterministic", true)? {
            return Err(r.unsupported("deterministic", "kiln runs the deterministic (inference) router: set it to true"));
        }
        r.skip(&["head_bias_init", "head_kernel_zero_init"]);
        let mut e = r.object("encoder")?.ok_or_else(|| r.unsupported("encoder", "missing"))?;
        let num_layers = e.usize_or("num_layers", None)?;
        let mlp_dim = e.usize_or("mlp_dim", None)?;
        let num_heads = e.usize_or("num_heads", None)?;
        if e.bool_or("attention_qk_norm", false)? {
            return Err(e.unsupported("attention_qk_norm", "query/key normalisation is not supported"));
        }
        e.skip(&["dropout_rate", "attention_dropout_rate"]);
        let moe = match e.object("moe")? {
            Some(mr) => Some(read_moe(mr, num_layers)?),
            None => None,
        };
        e.finish()?;
        if num_heads == 0 || !hidden.is_multiple_of(num_heads) {
            return Err(r.unsupported("encoder.num_heads", format!("hidden_size {hidden} is not divisible into {num_heads} heads")));
        }
        r.finish()?;
        Ok(VmoeConfig { num_classes, patch, hidden, classifier, representation_size, num_layers, mlp_dim, num_heads, moe })
    }
}

fn read_moe(mut r: ConfigReader, num_layers: usize) -> Result<MoeConfig> {
    let layers: Vec<usize> = match r.value("layers") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| r.unsupported("layers", "expected a list of block indices"))?,
        None => vec![],
        Some(v) => return Err(r.unsupported("layers", format!("expected a list of block indices, found {v}"))),
    };
    if let Some(l) = layers.iter().find(|&&l| l >= num_layers) {
        return Err(r.unsupported("layers", format!("block {l} does not exist (num_layers {num_layers})")));
    }
    let num_experts = r.usize_or("num_experts", None)?;
    let group_size = r.usize_or("group_size", None)?;
    r.skip(&["dropout_rate", "split_rngs"]);
    let mut ro = r.object("router")?.ok_or_else(|| r.unsupported("router", "missing"))?;
    let router = ro.str_or("name", Some("NoisyTopExpertsPerItemRouter"))?;
    if router != "NoisyTopExpertsPerItemRouter" {
        return Err(ro.unsupported("name", format!("unknown router '{router}' (kiln supports NoisyTopExpertsPerItemRouter)")));
    }
    let num_selected = ro.usize_or("num_selected_experts", Some(1))?;
    // Noise is drawn only in training; the loss weights only shape training.
    ro.skip(&["noise_std", "gshard_loss_weight", "importance_loss_weight", "load_loss_weight", "deterministic", "dtype"]);
    let mut dr = ro.object("dispatcher")?.ok_or_else(|| ro.unsupported("dispatcher", "missing"))?;
    let dispatcher = dr.str_or("name", Some("einsum"))?;
    if dispatcher != "einsum" && dispatcher != "indices" {
        return Err(
            dr.unsupported("name", format!("unknown dispatcher '{dispatcher}' (kiln supports einsum and indices, which compute the same)"))
        );
    }
    if dr.bool_or("bfloat16", false)? {
        return Err(dr.unsupported("bfloat16", "bfloat16 dispatch/combine is not supported; kiln dispatches in float32 (set it to false)"));
    }
    let capacity_factor = dr.f64_or("capacity_factor", None)?;
    let batch_priority = dr.bool_or("batch_priority", false)?;
    let capacity_ceil = match dr.str_or("capacity_ceil_or_round", Some("ceil"))?.as_str() {
        "ceil" => true,
        "round" => false,
        other => return Err(dr.unsupported("capacity_ceil_or_round", format!("'{other}' (expected ceil or round)"))),
    };
    let capacity_multiple_of = dr.usize_or("capacity_multiple_of", Some(4))?;
    dr.finish()?;
    ro.finish()?;
    if num_experts == 0 || num_selected == 0 || num_selected > num_experts {
        return Err(r.unsupported("router.num_selected_experts", format!("{num_selected} of {num_experts} experts")));
    }
    if group_size == 0 || capacity_factor.is_nan() || capacity_factor <= 0.0 {
        return Err(r.unsupported("group_size", format!("group_size {group_size} and capacity_factor {capacity_factor} must be positive")));
    }
    r.finish()?;
    Ok(MoeConfig { layers, num_experts, group_size, num_selected, capacity_factor, batch_priority, capacity_ceil, capacity_multiple_of })
}

/// Builds the V-MoE. Input `images [B, H, W, 3]` (NHWC in [-1, 1]); outputs `logits` (with a
/// head), `pre_logits`, `encoded`, and per MoE block the routing tensors the profile asks for.
pub fn build(cfg: &VmoeConfig, ck: &Checkpoint, profile: &Profile) -> Result<(Graph, String)> {
    let mut moe = cfg.moe.clone();
    if let Some(mc) = moe.as_mut() {
        if let Some(c) = profile.moe.capacity_factor {
            if c.is_nan() || c <= 0.0 {
                return Err(ModelError::Unsupported(format!("--moe-capacity {c}: the capacity ratio must be positive")));
            }
            mc.capacity_factor = c;
        }
        if let Some(b) = profile.moe.batch_priority {
            mc.batch_priority = b;
        }
    }
    let (b, d) = (profile.batch, cfg.hidden);
    let (h, w) = match profile.image_hw {
        Some(hw) => hw,
        None => default_hw(cfg, ck),
    };
    let (gh, gw) = grid((h, w), cfg.patch)?;
    let n = gh * gw;
    let mut m = Builder::new(ck, profile.dtype);
    let images = m.g.input("images", profile.dtype, &[b, h, w, 3])?;
    let x = patch_embed(&mut m, images, "embedding", cfg.patch, d)?;
    let mut x = m.g.reshape(x, &[b, n, d])?;
    let mut tokens = n;
    if cfg.classifier == Classifier::Token {
        // Unlike big_vision's ViT, the class token comes first and gets a position embedding.
        let cls = m.weight("cls", &[1, 1, d])?;
        let cls = m.g.push(Op::Broadcast { shape: vec![b, 1, d] }, &[cls])?;
        x = m.g.concat(&[cls, x], 1)?;
        tokens += 1;
    }
    let name = "Encoder/posembed_input/pos_embedding";
    if let Some(found) = m.ck.get(name).and_then(|t| t.ty.shape.get(1).copied()).filter(|&f| f != tokens) {
        let cls = tokens - n;
        return Err(super::vit::posemb_mismatch(name, found.saturating_sub(cls), cfg.patch, (h, w)));
    }
    let pos = m.weight(name, &[1, tokens, d])?;
    let x = m.g.add(x, pos)?;
    let mut x = m.g.reshape(x, &[b * tokens, d])?;
    let mut notes = Vec::new();
    for i in 0..cfg.num_layers {
        let p = format!("Encoder/encoderblock_{i}");
        let y = m.flax_layer_norm(x, &format!("{p}/LayerNorm_0"), d)?;
        let y = m.flax_mha(y, y, &format!("{p}/SelfAttention"), b, tokens, tokens, d, cfg.num_heads)?;
        x = m.add(x, y)?;
        let y = m.flax_layer_norm(x, &format!("{p}/LayerNorm_1"), d)?;
        let y = match moe.as_ref().filter(|mc| mc.layers.contains(&i)) {
            Some(mc) => {
                let layer = MoeLayer::new(mc, b * tokens, tokens, &p)?;
                notes.push(layer.describe(&format!("encoderblock_{i}")));
                layer.build(&mut m, y, d, cfg.mlp_dim, profile.moe.outputs, &format!("moe/encoderblock_{i}"))?
            }
            None => m.mlp_block(y, &format!("{p}/Mlp"), d, cfg.mlp_dim)?,
        };
        x = m.add(x, y)?;
    }
    let x = m.flax_layer_norm(x, "Encoder/encoder_norm", d)?;
    let encoded = m.g.reshape(x, &[b, tokens, d])?;
    m.g.output("encoded", encoded);
    let pooled = match cfg.classifier {
        Classifier::Token => {
            let t = m.g.slice(encoded, 1, 0, 1)?;
            m.g.reshape(t, &[b, d])?
        }
        Classifier::Gap => m.g.reduce(ReduceOp::Mean, encoded, &[1], false)?,
    };
    let mut x = pooled;
    let mut width = d;
    if let Some(rep) = cfg.representation_size {
        x = m.dense(x, "pre_logits", d, rep)?;
        x = m.g.unary(UnaryOp::Tanh, x)?;
        width = rep;
    }
    m.g.output("pre_logits", x);
    if let Some(c) = cfg.num_classes {
        let y = m.dense(x, "head", width, c)?;
        m.g.output("logits", y);
    }
    let mut description = format!(
        "V-MoE hidden {d} layers {} heads {} mlp {} patch {}x{} classifier {:?} at {h}x{w}, batch {b}, {}",
        cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.patch.0, cfg.patch.1, cfg.classifier, profile.dtype
    );
    for note in notes {
        description.push_str("\n  ");
        description.push_str(&note);
    }
    Ok((m.g, description))
}

/// The image size when the profile gives none: the square grid of the position table.
fn default_hw(cfg: &VmoeConfig, ck: &Checkpoint) -> (usize, usize) {
    let cls = usize::from(cfg.classifier == Classifier::Token);
    let n = ck.get("Encoder/posembed_input/pos_embedding").and_then(|t| t.ty.shape.get(1).copied()).unwrap_or(0).saturating_sub(cls);
    let g = (n as f64).sqrt().round() as usize;
    if g * g == n && g > 0 {
        (g * cfg.patch.0, g * cfg.patch.1)
    } else {
        (224, 224)
    }
}

/// One MoE block's static routing geometry.
pub struct MoeLayer<'c> {
    pub cfg: &'c MoeConfig,
    /// Groups G and tokens per group S.
    pub groups: usize,
    pub group_size: usize,
    pub capacity: usize,
    /// Parameter prefix `Encoder/encoderblock_i`.
    pub prefix: String,
}

impl<'c> MoeLayer<'c> {
    /// Checks that groups of whole images tile the batch's `total` tokens.
    pub fn new(cfg: &'c MoeConfig, total: usize, per_image: usize, prefix: &str) -> Result<Self> {
        let s = cfg.group_size;
        if !total.is_multiple_of(s) {
            return Err(ModelError::Unsupported(format!(
                "{prefix}: encoder.moe.group_size {s} does not divide the batch's {total} tokens ({} images x {per_image} tokens); \
                 choose a batch whose tokens split into whole groups",
                total / per_image.max(1)
            )));
        }
        Ok(MoeLayer { cfg, groups: total / s, group_size: s, capacity: cfg.capacity(), prefix: prefix.to_string() })
    }

    /// One line for `kiln inspect`: the block, its groups and its capacity.
    pub fn describe(&self, block: &str) -> String {
        let c = self.cfg;
        format!(
            "MoE {block}: E={} K={} groups {}x{} tokens, capacity {} per expert and group (C={}, BPR {}), buffers [{}, {}, D]",
            c.num_experts,
            c.num_selected,
            self.groups,
            self.group_size,
            self.capacity,
            c.capacity_factor,
            if c.batch_priority { "on" } else { "off" },
            c.num_experts,
            self.groups * self.capacity
        )
    }

    /// `x + Moe(y)`'s `Moe(y)` on `[G*S, D]` rows.
    pub fn build(&self, m: &mut Builder, y: NodeId, d: usize, f: usize, outputs: MoeOutputs, out_prefix: &str) -> Result<NodeId> {
        let (g, s, e, k, cap) = (self.groups, self.group_size, self.cfg.num_experts, self.cfg.num_selected, self.capacity);
        let p = &self.prefix;
        let f32c = |m: &mut Builder, v: f64| m.g.scalar(DType::F32, v);

        // Gates: softmax over experts of a bias-free dense layer, per group.
        let wr = m.weight(&format!("{p}/Moe/Router/dense/kernel"), &[d, e])?;
        let logits = m.g.matmul(y, wr, false)?;
        let logits = m.g.reshape(logits, &[g, s, e])?;
        let gates = m.g.softmax(logits, 2)?;
        let top = m.g.push(Op::TopK { k }, &[gates])?; // [G, S, K] expert ids
        let top_w = m.g.push(Op::TakeAlongAxis { axis: 2 }, &[gates, top])?; // raw gates

        // Priority order: token order, or descending top-1 gate (TopK over all S is a stable
        // descending argsort, ties to the earlier token).
        let perm = if self.cfg.batch_priority {
            let w0 = m.g.slice(top_w, 2, 0, 1)?;
            let w0 = m.g.reshape(w0, &[g, s])?;
            Some(m.g.push(Op::TopK { k: s }, &[w0])?)
        } else {
            None
        };
        let ep = match perm {
            Some(pm) => {
                let pk = repeat(m, pm, &[g, s, 1], 2, k)?;
                m.g.push(Op::TakeAlongAxis { axis: 1 }, &[top, pk])?
            }
            None => top,
        };
        // Choice-major: every first choice, then every second choice.
        let ecm = m.g.permute(ep, &[0, 2, 1])?;
        let ecm = m.g.reshape(ecm, &[g, k * s, 1])?;
        let ecm_f = m.g.push(Op::Cast { to: DType::F32 }, &[ecm])?;
        let experts = m.g.push_source(Op::Iota { axis: 2, start: 0.0, step: 1.0 }, kiln_graph::TensorType::new(DType::F32, [1, 1, e]))?;
        let hit = m.g.binary(BinaryOp::Eq, ecm_f, experts)?;
        let (one, zero) = (f32c(m, 1.0)?, f32c(m, 0.0)?);
        let onehot = m.g.push(Op::Select, &[hit, one, zero])?; // [G, K*S, E]
                                                               // An assignment's slot: how many earlier assignments went to its expert.
        let count = m.g.push(Op::CumSum { axis: 1, exclusive: true }, &[onehot])?;
        let slot = m.g.push(Op::TakeAlongAxis { axis: 2 }, &[count, ecm])?; // [G, K*S, 1]
        let slot = m.g.reshape(slot, &[g, k, s])?;
        let slot = match perm {
            // Back to token order: slot_tok[perm[p]] = slot[p].
            Some(pm) => {
                let pk = repeat(m, pm, &[g, 1, s], 1, k)?;
                let zeros = m.g.push(Op::Broadcast { shape: vec![g, k, s] }, &[zero])?;
                m.g.push(Op::ScatterAdd { axis: 2 }, &[zeros, pk, slot])?
            }
            None => slot,
        };
        let slot = m.g.permute(slot, &[0, 2, 1])?; // [G, S, K]
        let capn = f32c(m, cap as f64)?;
        let kept = m.g.binary(BinaryOp::Lt, slot, capn)?;
        let ef = m.g.push(Op::Cast { to: DType::F32 }, &[top])?;
        // Buffer row: expert e's block of G*Cap rows, group g's Cap rows in it, then the slot.
        let gbase =
            m.g.push_source(Op::Iota { axis: 0, start: 0.0, step: cap as f64 }, kiln_graph::TensorType::new(DType::F32, [g, 1, 1]))?;
        let stride = f32c(m, (g * cap) as f64)?;
        let row = m.g.mul(ef, stride)?;
        let row = m.g.add(row, gbase)?;
        let row = m.g.add(row, slot)?;
        let minus1 = f32c(m, -1.0)?;
        let row = m.g.push(Op::Select, &[kept, row, minus1])?;
        let rows = m.g.push(Op::Cast { to: DType::I64 }, &[row])?;
        let rows = m.g.reshape(rows, &[g * s, k])?;
        let wts = m.g.reshape(top_w, &[g * s, k])?;

        // Dispatch, the experts as one batched matmul over [E, G*Cap, D], combine.
        let buf = m.g.push(Op::MoeDispatch { rows: e * g * cap }, &[y, rows])?;
        let buf = m.g.reshape(buf, &[e, g * cap, d])?;
        let hid = expert_dense(m, buf, &format!("{p}/Moe/Mlp/Dense_0"), e, d, f)?;
        let hid = m.g.unary(UnaryOp::GeluTanh, hid)?;
        let out = expert_dense(m, hid, &format!("{p}/Moe/Mlp/Dense_1"), e, f, d)?;
        let out = m.g.reshape(out, &[e * g * cap, d])?;
        let combined = m.g.push(Op::MoeCombine, &[out, rows, wts])?;

        if outputs != MoeOutputs::None {
            let expert = m.g.push(Op::Select, &[kept, ef, minus1])?;
            m.g.output(format!("{out_prefix}/expert"), expert);
            // Tokens each expert took (over every group): what `kiln run --moe-stats` prints.
            let e4 = m.g.reshape(expert, &[g, s, k, 1])?;
            let ids = m.g.reshape(experts, &[1, 1, 1, e])?;
            let took = m.g.binary(BinaryOp::Eq, e4, ids)?;
            let took = m.g.push(Op::Select, &[took, one, zero])?;
            let load = m.g.reduce(ReduceOp::Sum, took, &[0, 1, 2], false)?;
            m.g.output(format!("{out_prefix}/expert_load"), load);
        }
        if outputs == MoeOutputs::Debug {
            m.g.output(format!("{out_prefix}/gates_softmax"), gates);
            // dispatch[g, s, e, c] = sum_k [row(g, s, k) == e*G*Cap + g*Cap + c].
            let target: Vec<f64> =
                (0..g).flat_map(|gi| (0..e).flat_map(move |ei| (0..cap).map(move |c| (ei * g * cap + gi * cap + c) as f64))).collect();
            let target = m.g.constant(DType::F32, &[g, 1, 1, e, cap], target)?;
            let r5 = m.g.reshape(row, &[g, s, k, 1, 1])?;
            let hit = m.g.binary(BinaryOp::Eq, r5, target)?;
            let hit = m.g.push(Op::Select, &[hit, one, zero])?;
            let dispatch = m.g.reduce(ReduceOp::Sum, hit, &[2], false)?;
            m.g.output(format!("{out_prefix}/dispatch_weights"), dispatch);
            let g4 = m.g.reshape(gates, &[g, s, e, 1])?;
            let combine = m.g.mul(dispatch, g4)?;
            m.g.output(format!("{out_prefix}/combine_weights"), combine);
        }
        Ok(combined)
    }
}

/// `[E, rows, d_in] @ kernel [E, d_in, d_out] + bias [E, 1, d_out]`: every expert at once.
fn expert_dense(m: &mut Builder, x: NodeId, p: &str, e: usize, d_in: usize, d_out: usize) -> Result<NodeId> {
    let w = m.weight(&format!("{p}/kernel"), &[e, d_in, d_out])?;
    let b = m.weight(&format!("{p}/bias"), &[e, d_out])?;
    let b = m.g.reshape(b, &[e, 1, d_out])?;
    let y = m.g.matmul(x, w, false)?;
    Ok(m.g.add(y, b)?)
}

/// `x` reshaped to `shape` (one axis of size 1 at `axis`) and repeated `times` along it.
fn repeat(m: &mut Builder, x: NodeId, shape: &[usize], axis: usize, times: usize) -> Result<NodeId> {
    let x = m.g.reshape(x, shape)?;
    if times == 1 {
        return Ok(x);
    }
    Ok(m.g.concat(&vec![x; times], axis)?)
}

/// The V-MoE family (`model_name: vmoe`), and the dense ViT it is built on.
pub static FAMILY: Family = Family {
    name: "vmoe",
    about: "vmoe VisionTransformerMoe (model_name vmoe; params.npz), dense or with experts",
    claims: |k| k == Kind::BigVision("vmoe"),
    build: super::build,
    generation: None,
    synth: &[
        SynthRow {
            name: "vmoe-b16-dense",
            about: "vmoe VisionTransformerMoe B/16 without experts: the dense ViT V-MoE-B/16 is built on",
            recipe: |_| Ok(synth_recipe(None)),
        },
        SynthRow {
            name: "vmoe-b16-e8",
            about: "V-MoE-B/16, E=8 K=2 every other block, groups of 8 images, C=1.05 (~293M params)",
            recipe: |_| Ok(synth_recipe(Some(8))),
        },
    ],
    init: super::synth_init,
};

/// V-MoE-B/16 at 224 px, class token, 1000 classes; `experts` experts (K=2, blocks 1, 3, ..,
/// 11, groups of 8 images, C=1.05) or dense (`None`).
fn synth_recipe(experts: Option<usize>) -> SynthRecipe {
    let (layers, tokens) = (12, 196 + 1);
    let mut encoder =
        serde_json::json!({"num_layers": layers, "mlp_dim": 3072, "num_heads": 12, "dropout_rate": 0.0, "attention_dropout_rate": 0.0});
    if let Some(e) = experts {
        encoder["moe"] = serde_json::json!({
            "layers": (1..layers).step_by(2).collect::<Vec<_>>(), "num_experts": e, "group_size": 8 * tokens,
            "router": {"num_selected_experts": 2, "noise_std": 1.0, "importance_loss_weight": 0.005, "load_loss_weight": 0.005,
                "dispatcher": {"name": "einsum", "bfloat16": false, "capacity_factor": 1.05, "batch_priority": false,
                    "capacity_ceil_or_round": "ceil", "capacity_multiple_of": 4}}
        });
    }
    let config = serde_json::json!({"model_name": "vmoe", "model": {"num_classes": 1000, "patch_size": [16, 16], "hidden_size": 768,
        "classifier": "token", "deterministic": true, "encoder": encoder}});
    SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Npz, roots: &[""], given: Vec::new(), batch: 8 }
}
