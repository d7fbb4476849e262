//! Gemma and Gemma 2 decoders: "Gemma: Open Models Based on Gemini Research and Technology"
//! (arXiv 2403.08295) and "Gemma 2: Improving Open Language Models at a Practical Size"
//! (arXiv 2408.00118). Matches transformers' `GemmaForCausalLM` and `Gemma2ForCausalLM`
//! (`modeling_gemma.py`, `modeling_gemma2.py`, eager attention) and the text half of
//! `PaliGemmaForConditionalGeneration`.
//!
//! Three graphs share one builder: `forward` (logits for every position), `prefill` (logits
//! for the last position, writing the prompt's K/V at row 0 of the cache) and `decode` (one
//! token per row over the cache, writing its K/V at `cache_position`). Both write in place;
//! rows past the ones written keep what they held (zeros after load, or an earlier
//! generation's rows), and attention reads only the rows written so far. The cache is carried as
//! entry inputs and outputs named `cache.{layer}.key` / `cache.{layer}.value`, which the
//! runtime binds to the program's persistent state.

use crate::checkpoint::Checkpoint;
use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::{Activation, Builder};
use crate::registry::{self, torch_fan_in, Init, Kind, SynthRecipe, SynthRow, WeightFormat};
use kiln_graph::{Attention, BinaryOp, DType, MaskKind, NodeId, Op, PosMask, TensorType, UnaryOp};

/// Gemma (v1) or Gemma 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Gemma,
    Gemma2,
}

/// The fields of `GemmaConfig` / `Gemma2Config`, all honoured.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmaConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub act: Activation,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub attention_bias: bool,
    /// Queries are scaled by `query_pre_attn_scalar^-0.5` (Gemma: `head_dim^-0.5`).
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f32>,
    pub final_logit_softcapping: Option<f32>,
    /// Per layer: the sliding window, or `None` for full attention.
    pub windows: Vec<Option<usize>>,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub bos_token_id: Option<i64>,
}

impl GemmaConfig {
    /// Reads a text config object strictly (unknown fields are errors).
    pub fn read(r: ConfigReader) -> Result<Self> {
        GemmaConfig::read_text(r, false)
    }

    /// Reads a text config; inside PaliGemma, whose model builds the attention mask itself
    /// (prefix-LM), `use_bidirectional_attention` and `num_image_tokens` are allowed.
    pub fn read_text(mut r: ConfigReader, in_paligemma: bool) -> Result<Self> {
        let mt = r.str_or("model_type", None)?;
        let family = match mt.as_str() {
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            other => return Err(r.unsupported("model_type", format!("'{other}' is not gemma or gemma2"))),
        };
        let hidden_size = r.usize_or("hidden_size", Some(if family == Family::Gemma { 3072 } else { 2304 }))?;
        let num_attention_heads = r.usize_or("num_attention_heads", Some(if family == Family::Gemma { 16 } else { 8 }))?;
        if num_attention_heads == 0 {
            return Err(r.unsupported("num_attention_heads", "must be at least 1"));
        }
        let head_dim = r.usize_or("head_dim", Some(hidden_size / num_attention_heads))?;
        let num_key_value_heads = r.usize_or("num_key_value_heads", Some(num_attention_heads))?;
        if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(r.unsupported(
                "num_key_value_heads",
                format!("{num_attention_heads} query heads cannot share {num_key_value_heads} kv heads"),
            ));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(r.unsupported("head_dim", format!("{head_dim}: rotary embeddings need an even head size")));
        }
        let act_field = if family == Family::Gemma { "hidden_act" } else { "hidden_activation" };
        let mut act_name = r.str_or(act_field, Some("gelu_pytorch_tanh"))?;
        if family == Family::Gemma && act_name == "gelu" {
            // transformers' GemmaConfig rewrites this legacy value to the tanh form it meant.
            act_name = "gelu_pytorch_tanh".into();
        }
        let act =
            Activation::parse(&act_name).ok_or_else(|| r.unsupported(act_field, format!("activation '{act_name}' is not supported")))?;
        // Legacy Gemma configs carry `hidden_activation`; GemmaMLP reads only `hidden_act`.
        if family == Family::Gemma {
            r.skip(&["hidden_activation"]);
        }
        let rope_theta = match r.object("rope_parameters")? {
            Some(mut rp) => {
                let ty = rp.str_or("rope_type", Some("default"))?;
                if ty != "default" {
                    return Err(rp.unsupported("rope_type", format!("'{ty}' rotary scaling is not supported (only 'default')")));
                }
                let t = rp.f64_or("rope_theta", Some(10000.0))?;
                rp.finish()?;
                t
            }
            None => r.f64_or("rope_theta", Some(10000.0))?,
        };
        if r.has("rope_scaling") {
            return Err(r.unsupported("rope_scaling", "rotary scaling is not supported"));
        }
        r.skip(&["rope_scaling", "rope_theta"]);
        if in_paligemma {
            r.skip(&["use_bidirectional_attention", "num_image_tokens"]);
        } else if r.bool_or("use_bidirectional_attention", false)? {
            return Err(r.unsupported("use_bidirectional_attention", "bidirectional text attention is not supported"));
        }
        let num_hidden_layers = r.usize_or("num_hidden_layers", Some(if family == Family::Gemma { 28 } else { 26 }))?;
        let (query_pre_attn_scalar, attn_cap, final_cap, windows) = match family {
            Family::Gemma => (head_dim as f64, None, None, vec![None; num_hidden_layers]),
            Family::Gemma2 => {
                let q = r.f64_or("query_pre_attn_scalar", Some(256.0))?;
                let cap = |r: &mut ConfigReader, f: &str, d: f64| -> Result<Option<f32>> {
                    if r.has(f) {
                        let c = r.f64_or(f, None)?;
                        if c <= 0.0 {
                            return Err(r.unsupported(f, format!("soft-cap {c} must be positive")));
                        }
                        Ok(Some(c as f32))
                    } else if r.is_null(f) {
                        r.skip(&[f]);
                        Ok(None) // explicitly null: no soft-cap
                    } else {
                        Ok(Some(d as f32))
                    }
                };
                let attn = cap(&mut r, "attn_logit_softcapping", 50.0)?;
                let fin = cap(&mut r, "final_logit_softcapping", 30.0)?;
                let window = r.usize_or("sliding_window", Some(4096))?;
                if window == 0 {
                    return Err(r.unsupported("sliding_window", "must be at least 1"));
                }
                let types = r.str_list("layer_types")?.unwrap_or_else(|| {
                    (0..num_hidden_layers)
                        .map(|i| if (i + 1) % 2 == 1 { "sliding_attention" } else { "full_attention" }.to_string())
                        .collect()
                });
                if types.len() != num_hidden_layers {
                    return Err(r.unsupported("layer_types", format!("{} entries for {num_hidden_layers} layers", types.len())));
                }
                let windows = types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(Some(window)),
                        "full_attention" => Ok(None),
                        other => Err(r.unsupported("layer_types", format!("layer type '{other}' is not supported"))),
                    })
                    .collect::<Result<Vec<_>>>()?;
                (q, attn, fin, windows)
            }
        };
        let c = GemmaConfig {
            family,
            vocab_size: r.usize_or("vocab_size", Some(256000))?,
            hidden_size,
            intermediate_size: r.usize_or("intermediate_size", Some(if family == Family::Gemma { 24576 } else { 9216 }))?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            act,
            rms_norm_eps: r.f64_or("rms_norm_eps", Some(1e-6))? as f32,
            rope_theta,
            attention_bias: r.bool_or("attention_bias", false)?,
            query_pre_attn_scalar,
            attn_logit_softcapping: attn_cap,
            final_logit_softcapping: final_cap,
            windows,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", true)?,
            pad_token_id: r.has("pad_token_id").then(|| r.usize_or("pad_token_id", None)).transpose()?.map(|x| x as i64),
            eos_token_ids: r.usize_list("eos_token_id")?.into_iter().map(|x| x as i64).collect(),
            bos_token_id: r.has("bos_token_id").then(|| r.usize_or("bos_token_id", None)).transpose()?.map(|x| x as i64),
        };
        // Limits of the position table of learned-position models; RoPE needs none.
        r.skip(&["max_position_embeddings", "cache_implementation", "final_logit_softcapping", "attn_logit_softcapping"]);
        r.finish()?;
        Ok(c)
    }
}

/// Which graph to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `logits [B, S, V]` for every position.
    Forward,
    /// `logits [B, 1, V]` for the last position; the prompt's K/V rows written in place at
    /// row 0 of a cache of `capacity` slots (the rows past them keep what they held).
    Prefill { capacity: usize },
    /// One token per row over a cache of `capacity` slots.
    Decode { capacity: usize },
}

/// Finds the tensor-name prefix of the text model (`model.`, `model.language_model.`, ...).
pub fn prefix(ck: &Checkpoint) -> Result<String> {
    for p in ["model.", "model.language_model.", "language_model.model.", ""] {
        if ck.has(&format!("{p}embed_tokens.weight")) {
            return Ok(p.to_string());
        }
    }
    Err(ModelError::MissingTensor {
        dir: ck.dir.clone(),
        name: "model.embed_tokens.weight".into(),
        hint: "no Gemma embedding under any known prefix".into(),
    })
}

/// The cache state names and type of a program built for `capacity` slots.
pub fn cache_states(cfg: &GemmaConfig, batch: usize, capacity: usize, dtype: DType) -> Vec<(String, TensorType)> {
    let ty = TensorType::new(dtype, [batch, capacity, cfg.num_key_value_heads, cfg.head_dim]);
    (0..cfg.num_hidden_layers).flat_map(|l| [(format!("cache.{l}.key"), ty.clone()), (format!("cache.{l}.value"), ty.clone())]).collect()
}

/// Per-call geometry and the shared tensors every layer reads.
struct Ctx {
    b: usize,
    /// Query length (1 for decode).
    s: usize,
    /// Key length (the query length, or the cache capacity for decode).
    kv: usize,
    cos: NodeId,
    sin: NodeId,
    masks: Masks,
    /// Prefill and decode: the cache slot their first row is written at (i64 `[1]`).
    write_at: Option<NodeId>,
    mode: Mode,
}

/// What a query attends to beyond causal attention over the keys `attention_mask` keeps.
#[derive(Clone, Copy, Debug)]
pub enum Extra {
    /// Causal only.
    None,
    /// Prefix-LM: queries and keys below `prefix [B]` (i64) see each other (a bidirectional
    /// prefix; later queries see it causally).
    Prefix(NodeId),
    /// An arbitrary `allowed [B|1, S|1, KV]` (bool) OR'ed with causal: built as an additive
    /// `[B, S, KV]` mask (big_vision's `mask_ar` blocks); the others need no such tensor.
    Allowed(NodeId),
}

/// The attention masks every layer reads: the attention op computes them from positions
/// (no `[S, KV]` tensor), or additive tensors for an [`Extra::Allowed`] mask.
enum Masks {
    Positions {
        start: NodeId,
        keep: NodeId,
        prefix: Option<NodeId>,
    },
    /// `[B, S, KV]`: full attention, and per window size.
    Additive {
        full: NodeId,
        windowed: Vec<(usize, NodeId)>,
    },
}

/// `prefix [B]` (i64) holding `len` in every row: a prefix-LM's constant prefix length.
pub fn prefix_len(m: &mut Builder, b: usize, len: usize) -> Result<NodeId> {
    Ok(m.g.constant(DType::I64, &[b], vec![len as f64; b])?)
}

/// Builds the text decoder over token embeddings `x [B, S, D]` already scaled and merged;
/// `start` (i64 `[1]`) is query 0's cache index (0 for a forward or prefill, `cache_position`
/// for decode), `attention_mask [B, KV]` (i64 or f32, 0 = padding) the keys that count;
/// decode also takes `write_at`, the cache slot of the new token (i64 `[1]`); a prefill writes
/// its K/V rows in place from `write_at`, or `start` without one.
/// Returns the final hidden states `[B, S, D]` after the last norm.
#[allow(clippy::too_many_arguments)]
pub fn decoder(
    m: &mut Builder,
    cfg: &GemmaConfig,
    p: &str,
    x: NodeId,
    position_ids: NodeId,
    attention_mask: NodeId,
    start: NodeId,
    mode: Mode,
    extra: Extra,
    write_at: Option<NodeId>,
) -> Result<NodeId> {
    let (b, s, d) = (m.g.shape(x)[0], m.g.shape(x)[1], cfg.hidden_size);
    let x = blocks(m, cfg, p, x, position_ids, attention_mask, start, mode, extra, write_at)?;
    let x = rms(m, &format!("{p}norm"), x, cfg)?;
    Ok(m.g.reshape(x, &[b, s, d])?)
}

/// The decoder's layers without the final norm (as [`decoder`] takes them): the last layer's
/// output as `[B*S, D]` rows (big_vision's `encoded`, which JetFormer's per-modality norms read).
#[allow(clippy::too_many_arguments)]
pub fn blocks(
    m: &mut Builder,
    cfg: &GemmaConfig,
    p: &str,
    x: NodeId,
    position_ids: NodeId,
    attention_mask: NodeId,
    start: NodeId,
    mode: Mode,
    extra: Extra,
    write_at: Option<NodeId>,
) -> Result<NodeId> {
    let (b, s, d) = (m.g.shape(x)[0], m.g.shape(x)[1], cfg.hidden_size);
    let kv = m.g.shape(attention_mask)[1];
    let (cos, sin) = rope_tables(m, cfg, position_ids)?;
    let masks = match extra {
        Extra::None | Extra::Prefix(_) => {
            let keep = match m.g.ty(attention_mask).dtype {
                DType::I64 => attention_mask,
                _ => m.g.push(Op::Cast { to: DType::I64 }, &[attention_mask])?,
            };
            let prefix = if let Extra::Prefix(p) = extra { Some(p) } else { None };
            Masks::Positions { start, keep, prefix }
        }
        Extra::Allowed(allowed) => {
            // Query i's cache index: start + i.
            let st = m.g.push(Op::Cast { to: DType::F32 }, &[start])?;
            let st = m.g.reshape(st, &[1, 1, 1])?;
            let iota = m.g.push_source(Op::Iota { axis: 1, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, [1, s, 1]))?;
            let q_index = m.g.add(iota, st)?;
            let full = mask(m, q_index, attention_mask, None, Some(allowed))?;
            let mut windowed = vec![];
            for w in cfg.windows.iter().flatten() {
                if !windowed.iter().any(|(x, _)| x == w) {
                    let mk = mask(m, q_index, attention_mask, Some(*w), Some(allowed))?;
                    windowed.push((*w, mk));
                }
            }
            Masks::Additive { full, windowed }
        }
    };
    let write_at = match mode {
        Mode::Prefill { .. } => write_at.or(Some(start)),
        Mode::Forward | Mode::Decode { .. } => write_at,
    };
    let ctx = Ctx { b, s, kv, cos, sin, masks, write_at, mode };
    let mut x = m.g.reshape(x, &[b * s, d])?;
    for l in 0..cfg.num_hidden_layers {
        x = layer(m, cfg, &format!("{p}layers.{l}"), l, x, &ctx)?;
    }
    Ok(x)
}

/// `E[ids] * sqrt(hidden)`, the constant rounded to the compute dtype as transformers does.
pub fn embed(m: &mut Builder, cfg: &GemmaConfig, p: &str, ids: NodeId) -> Result<NodeId> {
    let e = m.weight(&format!("{p}embed_tokens.weight"), &[cfg.vocab_size, cfg.hidden_size])?;
    let x = m.g.push(Op::Gather { axis: 0 }, &[e, ids])?;
    Ok(m.g.mul_scalar(x, (cfg.hidden_size as f64).sqrt())?)
}

/// `RMSNorm_final(h) . E^T` (or `lm_head`), then the final soft-cap: `[B, S, D]` to `[B, S, V]`.
pub fn lm_head(m: &mut Builder, cfg: &GemmaConfig, p: &str, h: NodeId) -> Result<NodeId> {
    let (b, s) = (m.g.shape(h)[0], m.g.shape(h)[1]);
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let w =
        if cfg.tie_word_embeddings { m.weight(&format!("{p}embed_tokens.weight"), &[v, d])? } else { m.weight("lm_head.weight", &[v, d])? };
    let h = m.g.reshape(h, &[b * s, d])?;
    let mut logits = m.g.matmul(h, w, true)?;
    if let Some(cap) = cfg.final_logit_softcapping {
        logits = softcap(m, logits, cap)?;
    }
    Ok(m.g.reshape(logits, &[b, s, v])?)
}

/// `c * tanh(x / c)`.
fn softcap(m: &mut Builder, x: NodeId, cap: f32) -> Result<NodeId> {
    let c = m.g.scalar(m.g.ty(x).dtype, cap as f64)?;
    let y = m.g.binary(BinaryOp::Div, x, c)?;
    let y = m.g.unary(UnaryOp::Tanh, y)?;
    Ok(m.g.mul(y, c)?)
}

/// Builds a whole causal LM graph for `mode` (inputs named like transformers' forward).
pub fn build(m: &mut Builder, cfg: &GemmaConfig, batch: usize, seq: usize, mode: Mode) -> Result<()> {
    let p = prefix(m.ck)?;
    let (s, kv) = match mode {
        Mode::Forward | Mode::Prefill { .. } => (seq, seq),
        Mode::Decode { capacity } => (1, capacity),
    };
    if let Mode::Prefill { capacity } | Mode::Decode { capacity } = mode {
        if capacity < seq {
            return Err(ModelError::Unsupported(format!("a cache of {capacity} slots cannot hold a prompt of {seq} tokens")));
        }
    }
    let ids = m.g.input("input_ids", DType::I64, &[batch, s])?;
    let am = m.g.input("attention_mask", DType::I64, &[batch, kv])?;
    let pos = m.g.input("position_ids", DType::I64, &[batch, s])?;
    let (start, write_at) = match mode {
        Mode::Decode { .. } => {
            let cp = m.g.input("cache_position", DType::I64, &[1])?;
            (cp, Some(cp))
        }
        Mode::Forward | Mode::Prefill { .. } => (start_zero(m)?, None),
    };
    let x = embed(m, cfg, &p, ids)?;
    let h = decoder(m, cfg, &p, x, pos, am, start, mode, Extra::None, write_at)?;
    let h = match mode {
        Mode::Prefill { .. } => m.g.slice(h, 1, s - 1, s)?,
        Mode::Forward | Mode::Decode { .. } => h,
    };
    let logits = lm_head(m, cfg, &p, h)?;
    m.g.output("logits", logits);
    Ok(())
}

/// Query 0's cache index for a forward or prefill: 0 (i64 `[1]`).
pub fn start_zero(m: &mut Builder) -> Result<NodeId> {
    Ok(m.g.constant(DType::I64, &[1], vec![0.0])?)
}

/// The cos and sin tables `[B, S, 1, hd]` for `position_ids [B, S]`: the half-split layout,
/// `inv_freq_i = theta^(-2i/hd)` computed in f32 as transformers does.
fn rope_tables(m: &mut Builder, cfg: &GemmaConfig, position_ids: NodeId) -> Result<(NodeId, NodeId)> {
    let (b, s) = (m.g.shape(position_ids)[0], m.g.shape(position_ids)[1]);
    let hd = cfg.head_dim;
    let inv: Vec<f64> =
        (0..hd / 2).map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / hd as f32) as f64).map(|x| x as f32 as f64).collect();
    let inv = m.g.constant(DType::F32, &[1, 1, 1, hd / 2], inv)?;
    let pos = m.g.push(Op::Cast { to: DType::F32 }, &[position_ids])?;
    let pos = m.g.reshape(pos, &[b, s, 1, 1])?;
    let f = m.g.mul(pos, inv)?;
    let emb = m.g.concat(&[f, f], 3)?;
    let cos = m.g.unary(UnaryOp::Cos, emb)?;
    let sin = m.g.unary(UnaryOp::Sin, emb)?;
    let (cos, sin) = if m.dtype == DType::F32 {
        (cos, sin)
    } else {
        (m.g.push(Op::Cast { to: m.dtype }, &[cos])?, m.g.push(Op::Cast { to: m.dtype }, &[sin])?)
    };
    Ok((cos, sin))
}

/// `x * cos + rotate_half(x) * sin` on `[B, S, H, hd]`.
fn rope(m: &mut Builder, x: NodeId, ctx: &Ctx, hd: usize) -> Result<NodeId> {
    let x1 = m.g.slice(x, 3, 0, hd / 2)?;
    let x2 = m.g.slice(x, 3, hd / 2, hd)?;
    let n2 = m.g.unary(UnaryOp::Neg, x2)?;
    let rot = m.g.concat(&[n2, x1], 3)?;
    let a = m.g.mul(x, ctx.cos)?;
    let r = m.g.mul(rot, ctx.sin)?;
    Ok(m.g.add(a, r)?)
}

/// The additive mask `[B, S, KV]`: 0 where query index i may see key j (`j <= i` and with a
/// window `i - j < window`, or `extra [B, S, KV]` (bool: PaliGemma's bidirectional prefix);
/// and the key is not padding), the dtype's lowest value elsewhere (as transformers' eager
/// masks).
fn mask(m: &mut Builder, q_index: NodeId, attention_mask: NodeId, window: Option<usize>, extra: Option<NodeId>) -> Result<NodeId> {
    let (b, kv) = (m.g.shape(attention_mask)[0], m.g.shape(attention_mask)[1]);
    let s = m.g.shape(q_index)[1];
    let j = m.g.push_source(Op::Iota { axis: 2, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, [1, 1, kv]))?;
    let mut ok = m.g.binary(BinaryOp::Le, j, q_index)?;
    if let Some(w) = window {
        // kv_idx > q_idx - window
        let wc = m.g.scalar(DType::F32, w as f64)?;
        let lo = m.g.binary(BinaryOp::Sub, q_index, wc)?;
        let inw = m.g.binary(BinaryOp::Gt, j, lo)?;
        ok = m.g.binary(BinaryOp::And, ok, inw)?;
    }
    if let Some(e) = extra {
        ok = m.g.binary(BinaryOp::Or, ok, e)?;
    }
    let am = m.g.push(Op::Cast { to: DType::F32 }, &[attention_mask])?;
    let am = m.g.reshape(am, &[b, 1, kv])?;
    let zero = m.g.scalar(DType::F32, 0.0)?;
    let valid = m.g.binary(BinaryOp::Ne, am, zero)?;
    ok = m.g.binary(BinaryOp::And, ok, valid)?;
    let lowest = m.g.scalar(m.dtype, lowest(m.dtype))?;
    let zero = m.g.scalar(m.dtype, 0.0)?;
    let add = m.g.push(Op::Select, &[ok, zero, lowest])?;
    let shape = [b, s, kv];
    if m.g.shape(add) == shape {
        Ok(add)
    } else {
        Ok(m.g.push(Op::Broadcast { shape: shape.to_vec() }, &[add])?)
    }
}

fn rms(m: &mut Builder, p: &str, x: NodeId, cfg: &GemmaConfig) -> Result<NodeId> {
    let w = m.weight(&format!("{p}.weight"), &[cfg.hidden_size])?;
    Ok(m.g.push(Op::RmsNorm { eps: cfg.rms_norm_eps, add_one: true }, &[x, w])?)
}

fn proj(m: &mut Builder, cfg: &GemmaConfig, p: &str, x: NodeId, d_in: usize, d_out: usize) -> Result<NodeId> {
    if cfg.attention_bias {
        return m.linear(x, p, d_in, d_out);
    }
    let w = m.weight(&format!("{p}.weight"), &[d_out, d_in])?;
    Ok(m.g.matmul(x, w, true)?)
}

/// One decoder layer on `[B*S, D]` rows.
fn layer(m: &mut Builder, cfg: &GemmaConfig, p: &str, l: usize, x: NodeId, ctx: &Ctx) -> Result<NodeId> {
    let g2 = cfg.family == Family::Gemma2;
    let (d, h, kvh, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let (b, s) = (ctx.b, ctx.s);
    let a = rms(m, &format!("{p}.input_layernorm"), x, cfg)?;
    let q = proj(m, cfg, &format!("{p}.self_attn.q_proj"), a, d, h * hd)?;
    let k = proj(m, cfg, &format!("{p}.self_attn.k_proj"), a, d, kvh * hd)?;
    let v = proj(m, cfg, &format!("{p}.self_attn.v_proj"), a, d, kvh * hd)?;
    let q = m.g.reshape(q, &[b, s, h, hd])?;
    let k = m.g.reshape(k, &[b, s, kvh, hd])?;
    let v = m.g.reshape(v, &[b, s, kvh, hd])?;
    let q = rope(m, q, ctx, hd)?;
    let k = rope(m, k, ctx, hd)?;
    let (k, v) = match ctx.mode {
        Mode::Forward => (k, v),
        Mode::Prefill { capacity } | Mode::Decode { capacity } => {
            // The new rows go into the cache in place (the cache is persistent state): rows
            // past them keep what they held, which attention never reads (its keys are the
            // filled rows: prefill's own, decode's up to its position).
            let at = ctx.write_at.ok_or_else(|| ModelError::Unsupported("a cache write without a write index".into()))?;
            let mut kv_all = [k, v];
            for (i, name) in ["key", "value"].iter().enumerate() {
                let past = m.g.input(&format!("cache.{l}.{name}"), m.dtype, &[b, capacity, kvh, hd])?;
                let new = m.g.write_slice(past, kv_all[i], at, 1)?;
                m.g.output(format!("cache.{l}.{name}"), new);
                if matches!(ctx.mode, Mode::Decode { .. }) {
                    kv_all[i] = new;
                }
            }
            (kv_all[0], kv_all[1])
        }
    };
    let (scale, softcap) = (cfg.query_pre_attn_scalar.powf(-0.5) as f32, cfg.attn_logit_softcapping);
    let o = match &ctx.masks {
        Masks::Positions { start, keep, prefix } => {
            let pm = PosMask { window: cfg.windows[l], padding: true, prefix: prefix.is_some() };
            let mut ins = vec![q, k, v, *start, *keep];
            ins.extend(prefix);
            m.g.push(Op::Attention(Attention { scale, softcap, mask: MaskKind::Positions(pm) }), &ins)?
        }
        Masks::Additive { full, windowed } => {
            let mk = match cfg.windows[l] {
                Some(w) => windowed.iter().find(|(x, _)| *x == w).map(|(_, n)| *n).unwrap_or(*full),
                None => *full,
            };
            debug_assert_eq!(m.g.shape(mk), [b, s, ctx.kv]);
            m.g.push(Op::Attention(Attention { scale, softcap, mask: MaskKind::Additive }), &[q, k, v, mk])?
        }
    };
    let o = m.g.reshape(o, &[b * s, h * hd])?;
    let mut o = proj(m, cfg, &format!("{p}.self_attn.o_proj"), o, h * hd, d)?;
    if g2 {
        o = rms(m, &format!("{p}.post_attention_layernorm"), o, cfg)?;
    }
    let x = m.add(x, o)?;
    let pre_ffn = if g2 { "pre_feedforward_layernorm" } else { "post_attention_layernorm" };
    let f = rms(m, &format!("{p}.{pre_ffn}"), x, cfg)?;
    let (wg, wu) = (
        m.weight(&format!("{p}.mlp.gate_proj.weight"), &[cfg.intermediate_size, d])?,
        m.weight(&format!("{p}.mlp.up_proj.weight"), &[cfg.intermediate_size, d])?,
    );
    let wd = m.weight(&format!("{p}.mlp.down_proj.weight"), &[d, cfg.intermediate_size])?;
    let gate = m.g.matmul(f, wg, true)?;
    let up = m.g.matmul(f, wu, true)?;
    let gate = m.act(gate, cfg.act)?;
    let f = m.g.mul(gate, up)?;
    let mut f = m.g.matmul(f, wd, true)?;
    if g2 {
        f = rms(m, &format!("{p}.post_feedforward_layernorm"), f, cfg)?;
    }
    m.add(x, f)
}

/// The most negative finite value of a float dtype (`torch.finfo(dtype).min`).
fn lowest(d: DType) -> f64 {
    match d {
        DType::BF16 => -3.3895313892515355e38,
        DType::F16 => -65504.0,
        _ => f32::MIN as f64,
    }
}

/// The Gemma family: Gemma and Gemma 2 decoders (`GemmaForCausalLM`, `Gemma2ForCausalLM`).
pub static FAMILY: registry::Family = registry::Family {
    name: "gemma",
    about: "Gemma and Gemma 2 decoders (transformers GemmaForCausalLM, Gemma2ForCausalLM)",
    claims: |k| matches!(k, Kind::HuggingFace("gemma" | "gemma2")),
    build: crate::build_text,
    generation: Some(crate::build_text_generation),
    synth: &[
        SynthRow {
            name: "gemma2-2b",
            about: "Gemma 2 2B decoder (2304 wide, 26 layers, 8/4 heads of 256, vocab 256000, ~2.6B params, f32)",
            recipe: |_| {
                Ok(SynthRecipe {
                    config: gemma2_config(&GEMMA2_2B),
                    dtype: DType::F32,
                    format: WeightFormat::Safetensors,
                    roots: &[""],
                    given: Vec::new(),
                    batch: 1,
                })
            },
        },
        SynthRow {
            name: "gemma2-2b-bf16",
            about: "the same Gemma 2 2B with bf16 weights (as the released checkpoints of PaliGemma 2's decoder)",
            recipe: |_| {
                let mut config = gemma2_config(&GEMMA2_2B);
                config["dtype"] = serde_json::json!("bfloat16");
                Ok(SynthRecipe { config, dtype: DType::BF16, format: WeightFormat::Safetensors, roots: &[""], given: Vec::new(), batch: 1 })
            },
        },
    ],
    init: synth_init,
};

/// The sizes of a synthetic Gemma 2 decoder; the rest is Gemma 2's defaults (soft-caps 50 and
/// 30, window 4096 on even layers, query scalar 256, tied embeddings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemma2Sizes {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

/// Gemma 2 2B's decoder.
pub const GEMMA2_2B: Gemma2Sizes = Gemma2Sizes {
    vocab_size: 256000,
    hidden_size: 2304,
    intermediate_size: 9216,
    num_hidden_layers: 26,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    head_dim: 256,
};

/// The `config.json` of a `Gemma2ForCausalLM`, as transformers writes it.
pub fn gemma2_config(s: &Gemma2Sizes) -> serde_json::Value {
    let layer_types: Vec<&str> =
        (0..s.num_hidden_layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
    serde_json::json!({
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "dtype": "float32",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": s.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "layer_types": layer_types,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": 4096,
        "tie_word_embeddings": true,
        "vocab_size": s.vocab_size,
    })
}

/// Synthetic Gemma weights: projections N(0, 1/fan_in), RMSNorm offsets N(0, 0.05²) (the scale
/// is `1 + w`), embeddings N(0, 1/D) (scaled by sqrt(D) on the way in).
pub fn synth_init(_name: &str, shape: &[usize]) -> Init {
    if shape.len() == 1 {
        Init::Normal { mean: 0.0, std: 0.05 }
    } else {
        Init::fan_in(torch_fan_in(shape))
    }
}
