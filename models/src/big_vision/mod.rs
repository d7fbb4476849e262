//! big_vision checkpoint folders: `params.npz` (the Flax parameter tree flattened with
//! `/`-joined keys, per-layer or scan-stacked) beside a `config.json` holding the config's
//! `model_name` and `model` keyword arguments. Flax layers shared by the models read here:
//! `Dense` (`kernel [in, out]`), `LayerNorm` (`scale`, `bias`), `MultiHeadDotProductAttention`
//! (`query|key|value/kernel [D, H, hd]`, `out/kernel [H, hd, D]`), all reshape views of the
//! stored arrays.

pub mod cappa;
pub mod jetformer;
pub mod paligemma;
pub mod paligemma_seg;
pub mod patch_merger;
pub mod uvim_vqvae;
pub mod vit;
pub mod vmoe;

/// Synthetic big_vision weights (Flax layouts): kernels N(0, 1/fan_in) over their input axes,
/// biases N(0, 0.02²), layer norm scales 1 + N(0, 0.05²), position embeddings and the class
/// token N(0, 0.02²), token tables and VQ dictionaries N(0, 1), VQ counts 1.
pub fn synth_init(name: &str, shape: &[usize]) -> crate::registry::Init {
    use crate::registry::{flax_fan_in, Init};
    let leaf = name.rsplit('/').next().unwrap_or(name);
    let layer = name.rsplit('/').nth(1).unwrap_or("");
    match leaf {
        "bias" => Init::BIAS,
        "scale" => Init::LN_WEIGHT,
        "pos_embedding" | "cls" => Init::Normal { mean: 0.0, std: 0.02 },
        // A token table (CapPa's EmbedTargets), N(0, 1) as flax's nn.Embed initialises it.
        "embedding" => Init::Normal { mean: 0.0, std: 1.0 },
        // A VQ-VAE's dictionary N(0, 1) and its counts 1 (the codewords are dictionary / counts).
        "dictionary" => Init::Normal { mean: 0.0, std: 1.0 },
        "counts" => Init::Constant(1.0),
        // Attention projections [D, H, hd] read D; expert MLPs [E, in, out] read `in`.
        "kernel" if matches!(layer, "query" | "key" | "value") => Init::fan_in(shape[0]),
        "kernel" if name.contains("/Moe/Mlp/") => Init::fan_in(shape[1]),
        // A DenseGeneral head [D, *out] (UViM's head_<name>) reads D.
        "kernel" if layer.starts_with("head_") => Init::fan_in(shape[0]),
        _ => Init::fan_in(flax_fan_in(shape)),
    }
}

use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::Builder;
use crate::{Built, Checkpoint, Profile};
use kiln_graph::{DType, NodeId, UnaryOp};
use std::path::Path;

/// Flax `nn.LayerNorm`'s default epsilon, which none of these modules override.
pub const LN_EPS: f32 = 1e-6;

/// Builds the big_vision model whose `config.json` is at `cfg_path` over its checkpoint.
pub fn build(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile) -> Result<Built> {
    let mut r = ConfigReader::open(cfg_path)?;
    let name = r.str_or("model_name", None)?;
    let model = r.object("model")?.ok_or_else(|| r.unsupported("model", "missing: the model's keyword arguments"))?;
    r.finish()?;
    if profile.dtype != DType::F32 && profile.dtype != DType::BF16 && profile.dtype != DType::F16 {
        return Err(ModelError::Unsupported(format!("compute dtype {} is not a float type", profile.dtype)));
    }
    let (graph, description) = match name.as_str() {
        "vit" => {
            let cfg = vit::VitConfig::read(model)?;
            vit::build(&cfg, &checkpoint, profile)?
        }
        "vmoe" => {
            let cfg = vmoe::VmoeConfig::read(model)?;
            vmoe::build(&cfg, &checkpoint, profile)?
        }
        other => return Err(ModelError::Unsupported(format!("{}: model_name '{other}' is not built here", cfg_path.display()))),
    };
    Ok(Built { entries: vec![("forward".to_string(), graph)], description, checkpoint })
}

/// A `(h, w)` pair from a config value given as an integer or a two-element list.
pub(crate) fn pair(r: &mut ConfigReader, field: &str, default: (usize, usize)) -> Result<(usize, usize)> {
    match r.value(field) {
        None => Ok(default),
        Some(serde_json::Value::Number(n)) => {
            let v = n.as_u64().ok_or_else(|| r.unsupported(field, format!("expected a positive integer, found {n}")))? as usize;
            Ok((v, v))
        }
        Some(serde_json::Value::Array(a)) if a.len() == 2 && a.iter().all(|v| v.as_u64().is_some()) => {
            Ok((a[0].as_u64().unwrap_or(0) as usize, a[1].as_u64().unwrap_or(0) as usize))
        }
        Some(v) => Err(r.unsupported(field, format!("expected an integer or [h, w], found {v}"))),
    }
}

/// The patch grid of an `h x w` image for a `(ph, pw)` patch, or an error naming both.
pub(crate) fn grid(hw: (usize, usize), patch: (usize, usize)) -> Result<(usize, usize)> {
    let ((h, w), (ph, pw)) = (hw, patch);
    if ph == 0 || pw == 0 || h == 0 || w == 0 || !h.is_multiple_of(ph) || !w.is_multiple_of(pw) {
        return Err(ModelError::Unsupported(format!("image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")));
    }
    Ok((h / ph, w / pw))
}

impl Builder<'_> {
    /// Flax `Dense`: `x @ kernel + bias` with `{p}/kernel [d_in, d_out]`, `{p}/bias [d_out]`.
    pub fn dense(&mut self, x: NodeId, p: &str, d_in: usize, d_out: usize) -> Result<NodeId> {
        let w = self.weight(&format!("{p}/kernel"), &[d_in, d_out])?;
        let b = self.weight(&format!("{p}/bias"), &[d_out])?;
        let y = self.g.matmul(x, w, false)?;
        Ok(self.g.add(y, b)?)
    }

    /// Flax `LayerNorm` (`{p}/scale`, `{p}/bias`, epsilon 1e-6).
    pub fn flax_layer_norm(&mut self, x: NodeId, p: &str, d: usize) -> Result<NodeId> {
        let s = self.weight(&format!("{p}/scale"), &[d])?;
        let b = self.weight(&format!("{p}/bias"), &[d])?;
        Ok(self.g.layer_norm(x, s, b, LN_EPS)?)
    }

    /// One projection of Flax `MultiHeadDotProductAttention`: `kernel [D, H, hd]` viewed as
    /// `[D, H*hd]`, `bias [H, hd]` as `[H*hd]`.
    fn head_proj(&mut self, x: NodeId, p: &str, d: usize, heads: usize) -> Result<NodeId> {
        let hd = d / heads;
        let w = self.weight(&format!("{p}/kernel"), &[d, heads, hd])?;
        let w = self.g.reshape(w, &[d, d])?;
        let b = self.weight(&format!("{p}/bias"), &[heads, hd])?;
        let b = self.g.reshape(b, &[d])?;
        let y = self.g.matmul(x, w, false)?;
        Ok(self.g.add(y, b)?)
    }

    /// Flax `MultiHeadDotProductAttention` at `p` (`query`, `key`, `value`, `out`): queries
    /// from `xq` (`[B*sq, D]` rows), keys and values from `xkv` (`[B*sk, D]`).
    #[allow(clippy::too_many_arguments)]
    pub fn flax_mha(&mut self, xq: NodeId, xkv: NodeId, p: &str, b: usize, sq: usize, sk: usize, d: usize, heads: usize) -> Result<NodeId> {
        let q = self.head_proj(xq, &format!("{p}/query"), d, heads)?;
        let k = self.head_proj(xkv, &format!("{p}/key"), d, heads)?;
        let v = self.head_proj(xkv, &format!("{p}/value"), d, heads)?;
        let a = self.mha(q, k, v, b, sq, sk, heads, d / heads)?;
        let hd = d / heads;
        let w = self.weight(&format!("{p}/out/kernel"), &[heads, hd, d])?;
        let w = self.g.reshape(w, &[d, d])?;
        let bias = self.weight(&format!("{p}/out/bias"), &[d])?;
        let y = self.g.matmul(a, w, false)?;
        Ok(self.g.add(y, bias)?)
    }

    /// The ViT `MlpBlock`: `Dense_1(gelu_tanh(Dense_0(x)))`.
    pub fn mlp_block(&mut self, x: NodeId, p: &str, d: usize, f: usize) -> Result<NodeId> {
        let h = self.dense(x, &format!("{p}/Dense_0"), d, f)?;
        let h = self.g.unary(UnaryOp::GeluTanh, h)?;
        self.dense(h, &format!("{p}/Dense_1"), f, d)
    }

    /// The pre-LN encoder block (big_vision `Encoder1DBlock`, vmoe `EncoderBlock` without MoE)
    /// on `[B*n, D]` rows. `names` gives the attention and MLP module names.
    #[allow(clippy::too_many_arguments)]
    pub fn encoder_block(
        &mut self,
        x: NodeId,
        p: &str,
        names: (&str, &str),
        b: usize,
        n: usize,
        d: usize,
        heads: usize,
        f: usize,
    ) -> Result<NodeId> {
        let y = self.flax_layer_norm(x, &format!("{p}/LayerNorm_0"), d)?;
        let y = self.flax_mha(y, y, &format!("{p}/{}", names.0), b, n, n, d, heads)?;
        let x = self.add(x, y)?;
        let y = self.flax_layer_norm(x, &format!("{p}/LayerNorm_1"), d)?;
        let y = self.mlp_block(y, &format!("{p}/{}", names.1), d, f)?;
        self.add(x, y)
    }
}

/// The most values a table computed at compile time (a constant) may hold: 2 GiB as f64.
pub const MAX_CONSTANT_VALUES: usize = 1 << 28;

/// The 2-D sine-cosine position table of big_vision's `posemb_sincos_2d` (`[gh*gw, D]`,
/// row-major tokens; x is the column, y the row), computed in f32 as JAX does.
pub fn posemb_sincos_2d(gh: usize, gw: usize, d: usize) -> Result<Vec<f64>> {
    if !d.is_multiple_of(4) || d < 8 {
        return Err(ModelError::Unsupported(format!("sincos2d position embedding needs a width divisible by 4 (and >= 8), got {d}")));
    }
    let q = d / 4;
    let omega: Vec<f32> = (0..q).map(|i| 1.0 / 10000f32.powf(i as f32 / (q - 1) as f32)).collect();
    // A constant table: an image size far past the model's would make it larger than memory.
    let n = gh.checked_mul(gw).and_then(|t| t.checked_mul(d)).filter(|&n| n <= MAX_CONSTANT_VALUES);
    let mut pe = Vec::new();
    if n.is_none_or(|n| pe.try_reserve_exact(n).is_err()) {
        return Err(ModelError::Unsupported(format!(
            "a {gh}x{gw} patch grid's sincos2d position table of width {d} is larger than kiln builds as a constant ({MAX_CONSTANT_VALUES} values): use a smaller --resolution"
        )));
    }
    for t in 0..gh * gw {
        let (y, x) = ((t / gw) as f32, (t % gw) as f32);
        pe.extend(omega.iter().map(|w| (x * w).sin() as f64));
        pe.extend(omega.iter().map(|w| (x * w).cos() as f64));
        pe.extend(omega.iter().map(|w| (y * w).sin() as f64));
        pe.extend(omega.iter().map(|w| (y * w).cos() as f64));
    }
    Ok(pe)
}

/// The patch embedding: a stride-p convolution over NHWC `images` is a matmul of each
/// `(kh, kw, cin)`-flattened patch with the HWIO kernel viewed as `[kh*kw*cin, D]`.
/// Returns `[B*gh*gw, D]` rows, tokens row-major.
pub(crate) fn patch_embed(m: &mut Builder, images: NodeId, p: &str, patch: (usize, usize), d: usize) -> Result<NodeId> {
    let s = m.g.shape(images).to_vec();
    let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
    let (ph, pw) = patch;
    let (gh, gw) = grid((h, w), patch)?;
    let x = m.g.reshape(images, &[b, gh, ph, gw, pw, c])?;
    let x = m.g.permute(x, &[0, 1, 3, 2, 4, 5])?;
    let x = m.g.reshape(x, &[b * gh * gw, ph * pw * c])?;
    let k = m.weight(&format!("{p}/kernel"), &[ph, pw, c, d])?;
    let k = m.g.reshape(k, &[ph * pw * c, d])?;
    let bias = m.weight(&format!("{p}/bias"), &[d])?;
    let y = m.g.matmul(x, k, false)?;
    Ok(m.g.add(y, bias)?)
}

/// Where encoder block `i` lives: `{base}_{i}` (per-layer layout) or `{base}` sliced at
/// layer `i` (`[i]` on every array: the scan layout, one stacked array per parameter).
pub(crate) fn block_prefix(ck: &Checkpoint, base: &str, probe: &str, i: usize) -> Result<BlockPrefix> {
    if ck.has(&format!("{base}_{i}/{probe}")) {
        Ok(BlockPrefix { prefix: format!("{base}_{i}"), layer: None })
    } else if ck.has(&format!("{base}/{probe}[{i}]")) {
        Ok(BlockPrefix { prefix: base.to_string(), layer: Some(i) })
    } else {
        Err(ModelError::MissingTensor {
            dir: ck.dir.clone(),
            name: format!("{base}_{i}/{probe}"),
            hint: format!("block {i} is in neither the per-layer layout nor the scan layout ({base}/{probe} with a leading depth axis)"),
        })
    }
}

/// A block's parameter prefix, and the layer to slice for the scan layout.
pub(crate) struct BlockPrefix {
    pub prefix: String,
    pub layer: Option<usize>,
}

/// A builder view that appends `[layer]` to every weight name (scan layout).
pub(crate) fn with_layer<T>(m: &mut Builder, layer: Option<usize>, f: impl FnOnce(&mut Builder) -> Result<T>) -> Result<T> {
    let saved = m.weight_suffix.take();
    m.weight_suffix = layer.map(|i| format!("[{i}]"));
    let out = f(m);
    m.weight_suffix = saved;
    out
}

/// The per-layer names transformers' Gemma layout gives (`{hf}layers.{l}.self_attn.q_proj.weight`,
/// ...), as views of big_vision's Gemma arrays under `base` (`llm/layers`, `decoder/layers`):
/// the scan layout (a leading depth axis) or the per-layer one (`{base}/<i>/...`), fused
/// `qkv_einsum` or `q_einsum` + `kv_einsum`, and with `post_norms` Gemma 2's four norms
/// (PALIGEMMA_BV.md §1.1). The einsum arrays are permuted once at load by the weight store.
pub(crate) fn gemma_layer_aliases(
    ck: &Checkpoint,
    base: &str,
    hf: &str,
    depth: usize,
    (heads, kv_heads): (usize, usize),
    post_norms: bool,
) -> Result<std::collections::BTreeMap<String, String>> {
    let scan = ck.has(&format!("{base}/pre_attention_norm/scale"));
    if !scan && !ck.has(&format!("{base}/0/pre_attention_norm/scale")) {
        return Err(ModelError::MissingTensor {
            dir: ck.dir.clone(),
            name: format!("{base}/pre_attention_norm/scale"),
            hint: "the decoder's layers are in neither the scan layout (a leading depth axis) nor the per-layer one (layers/<i>/...)"
                .into(),
        });
    }
    let at = |l: usize, rest: &str, idx: &str, view: &str| match scan {
        true => format!("{base}/{rest}[{l}]{idx}{view}"),
        false => format!("{base}/{l}/{rest}{idx}{view}"),
    };
    let fused = kv_heads == heads && ck.has(&at(0, "attn/qkv_einsum/w", "", ""));
    let mut a = std::collections::BTreeMap::new();
    for l in 0..depth {
        let name = |n: &str| format!("{hf}layers.{l}.{n}.weight");
        let (q, k, v) = match fused {
            true => (
                at(l, "attn/qkv_einsum/w", "[0]", "~T(0,2,1)"),
                at(l, "attn/qkv_einsum/w", "[1]", "~T(0,2,1)"),
                at(l, "attn/qkv_einsum/w", "[2]", "~T(0,2,1)"),
            ),
            false => (
                at(l, "attn/q_einsum/w", "", "~T(0,2,1)"),
                at(l, "attn/kv_einsum/w", "[0]", "~T(0,2,1)"),
                at(l, "attn/kv_einsum/w", "[1]", "~T(0,2,1)"),
            ),
        };
        a.insert(name("self_attn.q_proj"), q);
        a.insert(name("self_attn.k_proj"), k);
        a.insert(name("self_attn.v_proj"), v);
        a.insert(name("self_attn.o_proj"), at(l, "attn/attn_vec_einsum/w", "", "~T(2,0,1)"));
        a.insert(name("mlp.gate_proj"), at(l, "mlp/gating_einsum", "[0]", "~T(1,0)"));
        a.insert(name("mlp.up_proj"), at(l, "mlp/gating_einsum", "[1]", "~T(1,0)"));
        a.insert(name("mlp.down_proj"), at(l, "mlp/linear", "", "~T(1,0)"));
        a.insert(name("input_layernorm"), at(l, "pre_attention_norm/scale", "", ""));
        if post_norms {
            a.insert(name("pre_feedforward_layernorm"), at(l, "pre_ffw_norm/scale", "", ""));
            a.insert(name("post_attention_layernorm"), at(l, "post_attention_norm/scale", "", ""));
            a.insert(name("post_feedforward_layernorm"), at(l, "post_ffw_norm/scale", "", ""));
        } else {
            a.insert(name("post_attention_layernorm"), at(l, "pre_ffw_norm/scale", "", ""));
        }
    }
    Ok(a)
}
