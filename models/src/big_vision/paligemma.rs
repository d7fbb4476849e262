//! PaliGemma and PaliGemma 2 from big_vision's own checkpoints (`model_name:
//! proj.paligemma.paligemma`; the Kaggle JAX downloads): `params.npz` with or without the
//! `params/` root, f32 / bf16 (`|V2`) / f16, scan-stacked or per-layer, and the trainer's model
//! config with `llm.variant` presets resolved here (`big_vision/models/ppp/gemma.py`
//! `get_config`, explicit fields winning). ../shared/PALIGEMMA_BV.md has the layout and pitfalls.
//!
//! One model, two loaders: the image tower is the big_vision ViT kiln builds for `vit` folders
//! (`img/...` read natively, `img/head` the projector), and the decoder is the same Gemma builder
//! as the Hugging Face PaliGemma path, its weights read through aliases (the HF names stand for
//! views of the npz arrays, e.g. `q_proj` of layer 3 = `llm/layers/attn/q_einsum/w[3]~T(0,2,1)`,
//! materialised once at load). Where big_vision and transformers differ kiln follows big_vision:
//! `forward`'s logits are not soft-capped (P1), no layer has a sliding window (P2), positions
//! count from 0, and the attention mask is `make_attn_mask` over `mask_ar` literally.

use super::vit::{self, Pool, Posemb, VitConfig};
use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::gemma::{self, Family as GemmaFamily, GemmaConfig, Mode};
use crate::layers::{Activation, Builder};
use crate::paligemma::{self, PaliGemmaConfig};
use crate::registry::{Family, Kind};
use crate::siglip::SiglipVisionConfig;
use crate::{Built, Checkpoint, Generation, Profile, TextModel};
use kiln_graph::{BinaryOp, DType, NodeId, Op, TensorType};
use std::collections::BTreeMap;
use std::path::Path;

/// What the big_vision tower of a PaliGemma needs beyond the shared config.
#[derive(Clone, Debug, PartialEq)]
pub struct BigVisionTower {
    pub vit: VitConfig,
    /// `params/` or `""`: the root the npz keys start from.
    pub root: String,
    /// The decoder's final soft-cap, applied (as big_vision's `extend_cache` does) to the decode
    /// steps' logits only, never to `forward` or the prefill (P1).
    pub final_logits_softcap: Option<f32>,
}

impl BigVisionTower {
    /// `zimg`, the image tokens after the projector: `[B*G, D]` from `images [B, H, W, 3]`.
    pub fn features(&self, m: &mut Builder, images: NodeId, llm_width: usize) -> Result<NodeId> {
        let s = m.g.shape(images).to_vec();
        let p = format!("{}img/", self.root);
        let (x, _) = vit::encoder(m, &self.vit, &p, images, (s[1], s[2]), s[0])?;
        m.dense(x, &format!("{p}head"), self.vit.width, llm_width)
    }
}

/// `gemma.get_config(variant)`: width, depth, mlp_dim, heads, kv heads, head_dim, vocab,
/// `query_pre_attn_norm` is `rsqrt_emb_per_head`, final and attention soft-caps, post norms.
#[allow(clippy::type_complexity)]
fn preset(variant: &str) -> Option<(usize, usize, usize, usize, usize, usize, usize, bool, f64, f64, bool)> {
    Some(match variant {
        "gemma_2b" => (2048, 18, 16_384, 8, 1, 256, 256_000, false, 0.0, 0.0, false),
        "gemma_7b" => (3072, 28, 24_576, 16, 16, 256, 256_000, false, 0.0, 0.0, false),
        "gemma2_2b" => (2304, 26, 9_216, 8, 4, 256, 256_000, false, 30.0, 50.0, true),
        "gemma2_9b" => (3584, 42, 14_336, 16, 8, 256, 256_000, false, 30.0, 50.0, true),
        "gemma2_27b" => (4608, 46, 36_864, 32, 16, 128, 256_000, true, 30.0, 50.0, true),
        _ => return None,
    })
}

/// Reads `proj.paligemma.gemma_bv` kwargs (plus the `gemma.Model` fields PALIGEMMA_BV.md §6
/// lets a folder spell out) into the decoder config kiln builds.
fn read_llm(mut r: ConfigReader) -> Result<(GemmaConfig, Option<f32>)> {
    let variant = r.str_or("variant", Some("gemma_2b"))?;
    let p = preset(&variant);
    let num = |r: &mut ConfigReader, f: &str, i: Option<usize>| -> Result<usize> {
        match (r.has(f), i) {
            (true, _) => r.usize_or(f, None),
            (false, Some(v)) => Ok(v),
            (false, None) => Err(r.unsupported(
                f,
                format!("missing, and '{variant}' is not a preset kiln knows (gemma_2b, gemma_7b, gemma2_2b, gemma2_9b, gemma2_27b)"),
            )),
        }
    };
    let width = num(&mut r, "width", p.map(|p| p.0))?;
    let depth = num(&mut r, "depth", p.map(|p| p.1))?;
    let mlp = num(&mut r, "mlp_dim", p.map(|p| p.2))?;
    let heads = num(&mut r, "num_heads", p.map(|p| p.3))?;
    let kv = num(&mut r, "num_kv_heads", p.map(|p| p.4))?;
    let head_dim = num(&mut r, "head_dim", p.map(|p| p.5))?;
    let vocab = num(&mut r, "vocab_size", p.map(|p| p.6))?;
    let emb_per_head = p.is_some_and(|p| p.7);
    let qn = r.str_or("query_pre_attn_norm", Some(if emb_per_head { "rsqrt_emb_per_head" } else { "rsqrt_head_dim" }))?;
    let query_pre_attn_scalar = match qn.as_str() {
        "rsqrt_head_dim" => head_dim as f64,
        "rsqrt_emb_per_head" => (width / heads.max(1)) as f64,
        other => return Err(r.unsupported("query_pre_attn_norm", format!("'{other}' (rsqrt_head_dim, rsqrt_emb_per_head)"))),
    };
    // A soft-cap of 0 is off (`if self.final_logits_softcap:`).
    let cap = |r: &mut ConfigReader, f: &str, d: f64| -> Result<Option<f32>> {
        let c = r.f64_or(f, Some(d))?;
        if c < 0.0 {
            return Err(r.unsupported(f, format!("soft-cap {c} must not be negative")));
        }
        Ok((c > 0.0).then_some(c as f32))
    };
    let final_cap = cap(&mut r, "final_logits_softcap", p.map_or(0.0, |p| p.8))?;
    let attn_cap = cap(&mut r, "attn_logits_softcap", p.map_or(0.0, |p| p.9))?;
    let post_norms = r.bool_or("post_norms", p.is_some_and(|p| p.10))?;
    // None (the fixtures' null) keeps the cache in the activations' dtype, as kiln always does.
    let cache = if r.is_null("cache_dtype") { "float32".to_string() } else { r.str_or("cache_dtype", Some("float32"))? };
    r.skip(&["cache_dtype"]);
    if !matches!(cache.as_str(), "float32" | "bfloat16") {
        return Err(
            r.unsupported("cache_dtype", format!("'{cache}' (kiln keeps the KV cache in the compute dtype; null, float32 or bfloat16)"))
        );
    }
    let embed = r.str_or("embed_dtype", Some("float32"))?;
    if embed != "float32" {
        return Err(r.unsupported("embed_dtype", format!("'{embed}': big_vision runs Gemma in float32 only")));
    }
    if r.f64_or("dropout", Some(0.0))? < 0.0 {
        return Err(r.unsupported("dropout", "must not be negative"));
    }
    // `norm_eps` is unused by big_vision's RMSNorm (1e-6 hard-coded), as here; the rest are
    // training-only or say how the checkpoint is laid out, which kiln reads from the file.
    r.skip(&["norm_eps", "scan", "remat_policy", "dropout_bdims"]);
    r.finish()?;
    if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) || head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(ModelError::Unsupported(format!("llm: {heads} heads over {kv} kv heads of size {head_dim} is not a Gemma layout")));
    }
    let cfg = GemmaConfig {
        family: if post_norms { GemmaFamily::Gemma2 } else { GemmaFamily::Gemma },
        vocab_size: vocab,
        hidden_size: width,
        intermediate_size: mlp,
        num_hidden_layers: depth,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        act: Activation::GeluTanh,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        attention_bias: false,
        query_pre_attn_scalar,
        attn_logit_softcapping: attn_cap,
        final_logit_softcapping: None,
        windows: vec![None; depth],
        tie_word_embeddings: true,
        pad_token_id: Some(0),
        eos_token_ids: vec![1],
        bos_token_id: Some(2),
    };
    Ok((cfg, final_cap))
}

/// Reads a `proj.paligemma.paligemma` folder's config into the PaliGemma config kiln builds,
/// for an image of `hw` (the profile's), else the checkpoint's position table, else 224 px.
pub fn read(cfg_path: &Path, ck: &Checkpoint, hw: Option<(usize, usize)>) -> Result<PaliGemmaConfig> {
    let mut top = ConfigReader::open(cfg_path)?;
    top.str_or("model_name", None)?;
    let mut r = top.object("model")?.ok_or_else(|| top.unsupported("model", "missing: the model's keyword arguments"))?;
    top.finish()?;
    for (f, want) in [("img_model", "vit"), ("llm_model", "proj.paligemma.gemma_bv")] {
        let got = r.str_or(f, Some(want))?;
        if got != want {
            return Err(r.unsupported(f, format!("'{got}': kiln builds PaliGemma with {f} '{want}'")));
        }
    }
    let (text, final_cap) = read_llm(r.object("llm")?.unwrap_or(ConfigReader::from_value(cfg_path, serde_json::json!({}))?))?;
    let img = r.object("img")?.unwrap_or(ConfigReader::from_value(cfg_path, serde_json::json!({}))?);
    r.finish()?;
    let vit = VitConfig::read(img)?;
    let refuse = |f: &str, msg: String| ModelError::Config { path: cfg_path.into(), field: format!("model.img.{f}"), msg };
    if vit.pool != Pool::None {
        return Err(refuse("pool_type", format!("{:?}: PaliGemma feeds every image token to the decoder ('none')", vit.pool)));
    }
    if vit.posemb != Posemb::Learn || vit.rep_size.is_some() || vit.patch_merger.is_some() {
        return Err(refuse("posemb", "PaliGemma's tower has a learned position table, no pre_logits and no PatchMerger".into()));
    }
    if vit.num_classes.is_some_and(|c| c != text.hidden_size) {
        return Err(refuse("num_classes", format!("{:?} differs from the decoder width {}", vit.num_classes, text.hidden_size)));
    }
    if vit.patch.0 != vit.patch.1 {
        return Err(refuse("patch_size", format!("{:?}: kiln builds square patches", vit.patch)));
    }
    let root = if ck.has("params/llm/embedder/input_embedding") { "params/" } else { "" }.to_string();
    let grid =
        ck.get(&format!("{root}img/pos_embedding")).map(|t| (t.ty.shape.get(1).copied().unwrap_or(0) as f64).sqrt().round() as usize);
    let size = match hw {
        Some((h, w)) if h == w => h,
        Some((h, w)) => return Err(ModelError::Unsupported(format!("{h}x{w} images: PaliGemma's tower takes square images"))),
        None => grid.map_or(224, |g| g * vit.patch.0),
    };
    let vision = SiglipVisionConfig {
        hidden_size: vit.width,
        intermediate_size: vit.mlp_dim,
        num_hidden_layers: vit.depth,
        num_attention_heads: vit.heads,
        num_channels: 3,
        image_size: size,
        patch_size: vit.patch.0,
        hidden_act: Activation::GeluTanh,
        layer_norm_eps: super::LN_EPS,
        vision_use_head: false,
    };
    let tower = BigVisionTower { vit, root, final_logits_softcap: final_cap };
    // No `<image>` row: the id after the vocabulary marks image slots, looked up as 0 and
    // replaced by the image tokens.
    let image_token_index = text.vocab_size as i64;
    Ok(PaliGemmaConfig { vision, projection_dim: text.hidden_size, text, image_token_index, big_vision: Some(Box::new(tower)) })
}

/// The transformers names the Gemma builder asks for, as views of big_vision's arrays
/// (PALIGEMMA_BV.md §1.1), under `language_model.model.`.
pub fn aliases(cfg: &GemmaConfig, ck: &Checkpoint, root: &str) -> Result<BTreeMap<String, String>> {
    let llm = format!("{root}llm");
    let emb = format!("{llm}/embedder/input_embedding");
    if let Some(t) = ck.get(&emb) {
        if t.ty.shape.first() != Some(&cfg.vocab_size) {
            return Err(ModelError::Unsupported(format!(
                "{emb} has {:?} rows but vocab_size is {}: kiln does not trim or pad the vocabulary (big_vision pads with random rows only when training)",
                t.ty.shape.first(),
                cfg.vocab_size
            )));
        }
    }
    let p = "language_model.model.";
    let heads = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let post_norms = cfg.family == GemmaFamily::Gemma2;
    let mut a = super::gemma_layer_aliases(ck, &format!("{llm}/layers"), p, cfg.num_hidden_layers, heads, post_norms)?;
    a.insert(format!("{p}embed_tokens.weight"), emb);
    a.insert(format!("{p}norm.weight"), format!("{llm}/final_norm/scale"));
    Ok(a)
}

/// The config and the checkpoint with the decoder's aliases in place.
fn open(cfg_path: &Path, mut ck: Checkpoint, hw: Option<(usize, usize)>) -> Result<(PaliGemmaConfig, Checkpoint)> {
    let cfg = read(cfg_path, &ck, hw)?;
    let root = cfg.big_vision.as_ref().map(|t| t.root.clone()).unwrap_or_default();
    ck.aliases = aliases(&cfg.text, &ck, &root)?;
    Ok((cfg, ck))
}

/// `forward` as big_vision's `Model.__call__(images, text, mask_ar)` computes it: inputs
/// `images [B, H, W, 3]` (NHWC in [-1, 1]), `text`, `mask_ar`, `mask_input` (i64 `[B, T]`;
/// `kiln run` fills a missing `mask_input` with ones, the official default); outputs `logits
/// [B, T, V]` for the text positions, not soft-capped (P1), and `zimg [B, G, D]`. Without a
/// token length the entry takes `images` alone and gives `zimg`.
pub fn build(cfg_path: &Path, ck: Checkpoint, profile: &Profile) -> Result<Built> {
    let (cfg, ck) = open(cfg_path, ck, profile.image_hw)?;
    let tower = *cfg.big_vision.clone().ok_or_else(|| ModelError::Unsupported("not a big_vision PaliGemma".into()))?;
    let (b, d, v) = (profile.batch, cfg.text.hidden_size, &cfg.vision);
    let (hw, g) = (v.image_size, v.grid() * v.grid());
    let mut m = Builder::new(&ck, profile.dtype);
    let images = m.g.input("images", profile.dtype, &[b, hw, hw, 3])?;
    let zimg = tower.features(&mut m, images, d)?;
    let zimg = m.g.reshape(zimg, &[b, g, d])?;
    m.g.output("zimg", zimg);
    if let Some(t) = profile.seq_len {
        let logits = text_logits(&mut m, &cfg, zimg, b, t)?;
        m.g.output("logits", logits);
    }
    let graph = m.g;
    let description = format!(
        "big_vision PaliGemma: ViT width {} depth {} at {hw} px ({g} tokens) + {:?} width {d} depth {} heads {}/{}, batch {b}{}, {}",
        tower.vit.width,
        tower.vit.depth,
        cfg.text.family,
        cfg.text.num_hidden_layers,
        cfg.text.num_attention_heads,
        cfg.text.num_key_value_heads,
        profile.seq_len.map(|t| format!(", {t} text tokens")).unwrap_or_default(),
        profile.dtype
    );
    Ok(Built { entries: vec![("forward".to_string(), graph)], description, checkpoint: ck })
}

/// The decoder over `[zimg, embed(text)]` with `make_attn_mask(input_mask, mask_ar)`: logits of
/// the `t` text positions.
fn text_logits(m: &mut Builder, cfg: &PaliGemmaConfig, zimg: NodeId, b: usize, t: usize) -> Result<NodeId> {
    let g = m.g.shape(zimg)[1];
    let s = g + t;
    let p = "language_model.model.";
    let text = m.g.input("text", DType::I64, &[b, t])?;
    let mask_ar = m.g.input("mask_ar", DType::I64, &[b, t])?;
    let mask_input = m.g.input("mask_input", DType::I64, &[b, t])?;
    let emb = gemma::embed(m, &cfg.text, p, text)?;
    let x = m.g.concat(&[zimg, emb], 1)?;
    // Image slots: mask_ar 0 (one block with the prefix), input_mask 1 (in f32: small exact
    // integers, and every backend concatenates floats).
    let zeros = m.g.constant(DType::F32, &[b, g], vec![0.0; b * g])?;
    let ones = m.g.constant(DType::F32, &[b, g], vec![1.0; b * g])?;
    let mask_ar = m.g.push(Op::Cast { to: DType::F32 }, &[mask_ar])?;
    let mask_input = m.g.push(Op::Cast { to: DType::F32 }, &[mask_input])?;
    let ar = m.g.concat(&[zeros, mask_ar], 1)?;
    let input_mask = m.g.concat(&[ones, mask_input], 1)?;
    // i sees j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]: a superset of causal (the cumsum
    // never falls), so it is the decoder's causal mask OR'ed with this.
    let c = m.g.push(Op::CumSum { axis: 1, exclusive: false }, &[ar])?;
    let ci = m.g.reshape(c, &[b, s, 1])?;
    let cj = m.g.reshape(c, &[b, 1, s])?;
    let allowed = m.g.binary(BinaryOp::Le, cj, ci)?;
    let pos = m.g.push_source(Op::Iota { axis: 1, start: 0.0, step: 1.0 }, TensorType::new(DType::I64, [b, s]))?;
    let start = gemma::start_zero(m)?;
    let h = gemma::decoder(m, &cfg.text, p, x, pos, input_mask, start, Mode::Forward, gemma::Extra::Allowed(allowed), None)?;
    let h = m.g.slice(h, 1, g, s)?;
    gemma::lm_head(m, &cfg.text, p, h)
}

/// `prefill` and `decode` for `kiln generate`: the Hugging Face PaliGemma programs (prompt
/// `[image slots][text]`, the prefix by `token_type_ids`) over the big_vision tower and aliases.
fn build_generation(cfg_path: &Path, ck: Checkpoint, profile: &Profile, capacity: usize) -> Result<Generation> {
    let (cfg, ck) = open(cfg_path, ck, profile.image_hw)?;
    let seq = profile.seq_len.filter(|&s| s > 0).ok_or_else(|| ModelError::Unsupported("generation needs a prompt bucket".into()))?;
    let mut graphs = vec![];
    for mode in [Mode::Prefill { capacity }, Mode::Decode { capacity }] {
        let mut m = Builder::new(&ck, profile.dtype);
        paligemma::build(&mut m, &cfg, profile.batch, seq, mode)?;
        graphs.push(m.g);
    }
    let (Some(decode), Some(prefill)) = (graphs.pop(), graphs.pop()) else { unreachable!("two modes built") };
    let states = gemma::cache_states(&cfg.text, profile.batch, capacity, profile.dtype);
    let description = format!(
        "big_vision PaliGemma ({} px, {:?} width {} depth {}), batch {}, {seq} prompt tokens, cache {capacity}, {}",
        cfg.vision.image_size, cfg.text.family, cfg.text.hidden_size, cfg.text.num_hidden_layers, profile.batch, profile.dtype
    );
    Ok(Generation { prefill, decode, states, model: TextModel::PaliGemma(cfg), description, checkpoint: ck })
}

/// The family: big_vision's PaliGemma 1 and 2 checkpoints.
pub static FAMILY: Family = Family {
    name: "paligemma-bv",
    about: "PaliGemma 1 and 2 from big_vision (model_name proj.paligemma.paligemma; params.npz, the Kaggle JAX release)",
    claims: |k| k == Kind::BigVision("proj.paligemma.paligemma"),
    build,
    generation: Some(build_generation),
    synth: &[],
    init: super::synth_init,
};
