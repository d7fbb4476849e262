//! The CapPa / Cap image captioner, the encoder-decoder of LocCa and LiT-decoder: "Image
//! Captioners Are Scalable Vision Learners Too" (arXiv 2306.07915), as big_vision's
//! `models/proj/cappa/cappa.py` `Model` computes it at inference (ENCDEC.md §1).
//!
//! The encoder is big_vision's ViT (`vit.Model`, no head) under `encoder/`; its normalised
//! tokens are `encoded [B, P, E]`. The decoder embeds `shift_right(text)` (BOS = 0 = pad),
//! adds `pos_embedding_decoder`, then per `EncDecBlock{i}` (pre-LN): causal self-attention,
//! cross-attention to `encoded` (no mask), MLP; the attentions have no biases, and
//! `decoder_bias: false` removes the MLP's and the block LayerNorms' biases. A final
//! `LayerNorm` and `LogitsDense` give `logits [B, L, V]` (`logits[:, t]` predicts `text[:, t]`).
//! There is no padding mask: trailing zeros are attended to, causally, as in the reference.

use super::vit::{self, Pool, Posemb, VitConfig};
use super::{pair, posemb_sincos_2d};
use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::Builder;
use crate::registry::{Family, Kind};
use crate::{Built, Checkpoint, Profile};
use kiln_graph::{Attention, DType, MaskKind, NodeId, Op, UnaryOp};
use std::path::Path;

/// The CapPa family (`model_name: proj.cappa.cappa`).
pub static FAMILY: Family = Family {
    name: "cappa",
    about: "big_vision CapPa / Cap captioner (model_name proj.cappa.cappa; LocCa, LiT-decoder): images + text -> logits",
    claims: |k| k == Kind::BigVision("proj.cappa.cappa"),
    build,
    generation: None,
    synth: &[],
    init: super::synth_init,
};

/// The keyword arguments of `cappa.Model`, all honoured or refused.
#[derive(Clone, Debug, PartialEq)]
pub struct CappaConfig {
    /// The encoder as a head-less, GAP-pooled big_vision ViT.
    pub encoder: VitConfig,
    pub vocab_size: usize,
    /// Decoder positions (`pos_embedding_decoder` rows): the longest text.
    pub seq_len: usize,
    pub dec_width: usize,
    pub dec_layers: usize,
    pub dec_heads: usize,
    pub dec_mlp: usize,
    /// `decoder/EmbedTargets/embedding` rows: V, or V + 1 (a mask token) when
    /// `masked_pred_prob > 0`.
    pub embed_rows: usize,
    pub decoder_bias: bool,
}

impl CappaConfig {
    /// Reads the `model` kwargs strictly; training-only kwargs (dropouts, masking) are read
    /// and have no effect at inference.
    pub fn read(mut r: ConfigReader) -> Result<Self> {
        let heads = r.usize_or("num_heads", Some(8))?;
        let layers = r.usize_or("num_layers", Some(6))?;
        let mlp = r.usize_or("mlp_dim", Some(2048))?;
        let width = r.usize_or("emb_dim", Some(512))?;
        let vocab_size = r.usize_or("vocab_size", Some(32_000))?;
        let seq_len = r.usize_or("seq_len", Some(256))?;
        let patch = pair(&mut r, "patches", (16, 16))?;
        let posemb = match r.str_or("posemb_type", Some("learn"))?.as_str() {
            "learn" => Posemb::Learn,
            "sincos2d" => Posemb::SinCos2d,
            other => return Err(r.unsupported("posemb_type", format!("'{other}' is not supported (learn, sincos2d)"))),
        };
        let or_enc = |v: usize, enc: usize| if v == 0 { enc } else { v };
        let dec_heads = or_enc(r.usize_or("decoder_num_heads", Some(0))?, heads);
        let dec_layers = or_enc(r.usize_or("decoder_num_layers", Some(0))?, layers);
        let dec_mlp = or_enc(r.usize_or("decoder_mlp_dim", Some(0))?, mlp);
        let dec_width = or_enc(r.usize_or("decoder_emb_dim", Some(0))?, width);
        let masked = r.f64_or("masked_pred_prob", Some(0.0))?;
        let _ = r.f64_or("masking_ratio", Some(0.0))?;
        for f in ["enc_dropout_rate", "dec_dropout_rate", "patch_dropout"] {
            let _ = r.f64_or(f, Some(0.0))?;
        }
        let _ = r.usize_or("input_seq_len", Some(768))?;
        let _ = r.str_or("remat_policy", Some("nothing_saveable"))?;
        let decoder_bias = r.bool_or("decoder_bias", true)?;
        if r.bool_or("scan", false)? {
            return Err(r.unsupported("scan", "the scan layout (EncDecBlock stacked on axis 1) is not supported yet; use scan: false"));
        }
        if heads == 0 || width % heads != 0 || dec_heads == 0 || dec_width % dec_heads != 0 {
            return Err(r.unsupported("num_heads", format!("widths {width}/{dec_width} do not split into {heads}/{dec_heads} heads")));
        }
        r.finish()?;
        let encoder = VitConfig {
            num_classes: None,
            patch,
            width,
            depth: layers,
            mlp_dim: mlp,
            heads,
            posemb,
            rep_size: None,
            pool: Pool::Gap,
            patch_merger: None,
        };
        let embed_rows = vocab_size + usize::from(masked > 0.0);
        Ok(CappaConfig { encoder, vocab_size, seq_len, dec_width, dec_layers, dec_heads, dec_mlp, embed_rows, decoder_bias })
    }
}

/// Builds `forward`: inputs `images [B, H, W, 3]` (NHWC in [-1, 1]) and `text [B, L]` (i64,
/// `L = profile.seq_len`, default the config's `seq_len`); outputs `logits [B, L, V]`,
/// `encoded [B, P, E]`, and the decoder's `decoder/embedded`, `decoder/block<i>`,
/// `decoder/final_norm` (each `[B, L, Ed]`).
pub fn build(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile) -> Result<Built> {
    let mut r = ConfigReader::open(cfg_path)?;
    let _ = r.str_or("model_name", None)?;
    let kwargs = r.object("model")?.ok_or_else(|| r.unsupported("model", "missing: the model's keyword arguments"))?;
    r.finish()?;
    let cfg = CappaConfig::read(kwargs)?;
    let (h, w) = profile.image_hw.unwrap_or((224, 224));
    let l = profile.seq_len.unwrap_or(cfg.seq_len);
    if l == 0 || l > cfg.seq_len {
        return Err(ModelError::Unsupported(format!("text of {l} tokens: the decoder has {} positions (seq_len)", cfg.seq_len)));
    }
    let (b, e) = (profile.batch, cfg.encoder.width);
    let mut m = Builder::new(&checkpoint, profile.dtype);
    let images = m.g.input("images", profile.dtype, &[b, h, w, 3])?;
    let text = m.g.input("text", DType::I64, &[b, l])?;
    let (enc, p) = vit::encoder(&mut m, &cfg.encoder, "encoder/", images, (h, w), b)?;
    let encoded = m.g.reshape(enc, &[b, p, e])?;
    m.g.output("encoded", encoded);
    let logits = decoder(&mut m, &cfg, text, enc, b, l, p)?;
    m.g.output("logits", logits);
    let description = format!(
        "CapPa: ViT encoder width {e} depth {} heads {} patch {}x{} at {h}x{w}; decoder width {} depth {} heads {} mlp {}, vocab {}, {l} tokens, batch {b}, {}",
        cfg.encoder.depth,
        cfg.encoder.heads,
        cfg.encoder.patch.0,
        cfg.encoder.patch.1,
        cfg.dec_width,
        cfg.dec_layers,
        cfg.dec_heads,
        cfg.dec_mlp,
        cfg.vocab_size,
        profile.dtype
    );
    Ok(Built { entries: vec![("forward".into(), m.g)], description, checkpoint })
}

/// The teacher-forced decoder over `text [B, L]` and the encoder's `[B*P, E]` rows: logits
/// `[B, L, V]`.
fn decoder(m: &mut Builder, cfg: &CappaConfig, text: NodeId, enc: NodeId, b: usize, l: usize, p: usize) -> Result<NodeId> {
    let d = cfg.dec_width;
    // shift_right: [0, t0, .., t_{L-2}], looked up as the embeddings of the text shifted by
    // one row behind the embedding of token 0 (BOS): float rows, which every backend concats.
    let table = m.weight("decoder/EmbedTargets/embedding", &[cfg.embed_rows, d])?;
    let emb = m.g.push(Op::Gather { axis: 0 }, &[table, text])?;
    let bos = m.g.slice(table, 0, 0, 1)?;
    let bos = m.g.reshape(bos, &[1, 1, d])?;
    let bos = m.g.push(Op::Broadcast { shape: vec![b, 1, d] }, &[bos])?;
    let y = if l > 1 {
        let head = m.g.slice(emb, 1, 0, l - 1)?;
        m.g.concat(&[bos, head], 1)?
    } else {
        bos
    };
    let pos = match cfg.encoder.posemb {
        Posemb::Learn => m.weight("pos_embedding_decoder", &[1, cfg.seq_len, d])?,
        Posemb::SinCos2d => m.g.constant(m.dtype, &[1, cfg.seq_len, d], posemb_sincos_2d(1, cfg.seq_len, d)?)?,
    };
    let pos = if l < cfg.seq_len { m.g.slice(pos, 1, 0, l)? } else { pos };
    let y = m.add(y, pos)?;
    m.g.output("decoder/embedded", y);
    let mut t = m.g.reshape(y, &[b * l, d])?;
    for i in 0..cfg.dec_layers {
        let bp = format!("decoder/EncDecBlock{i}");
        let x = ln(m, cfg, t, &format!("{bp}/LayerNorm1"), d)?;
        let x = attention(m, cfg, x, x, &format!("{bp}/SelfAttn"), (b, l, l), d, true)?;
        let x = m.add(x, t)?;
        let y = ln(m, cfg, x, &format!("{bp}/LayerNorm2"), d)?;
        let y = attention(m, cfg, y, enc, &format!("{bp}/CrossAttn"), (b, l, p), cfg.encoder.width, false)?;
        let y = m.add(y, x)?;
        let z = ln(m, cfg, y, &format!("{bp}/LayerNorm3"), d)?;
        let z = dense(m, cfg.decoder_bias, z, &format!("{bp}/MLP/Dense_0"), d, cfg.dec_mlp)?;
        let z = m.g.unary(UnaryOp::GeluTanh, z)?;
        let z = dense(m, cfg.decoder_bias, z, &format!("{bp}/MLP/Dense_1"), cfg.dec_mlp, d)?;
        t = m.add(y, z)?;
        let out = m.g.reshape(t, &[b, l, d])?;
        m.g.output(format!("decoder/block{i}"), out);
    }
    // The final LayerNorm and LogitsDense keep their biases whatever `decoder_bias` says.
    let t = m.flax_layer_norm(t, "decoder/LayerNorm", d)?;
    let out = m.g.reshape(t, &[b, l, d])?;
    m.g.output("decoder/final_norm", out);
    let logits = m.dense(t, "decoder/LogitsDense", d, cfg.vocab_size)?;
    Ok(m.g.reshape(logits, &[b, l, cfg.vocab_size])?)
}

/// A block LayerNorm: with its bias unless `decoder_bias` is false.
fn ln(m: &mut Builder, cfg: &CappaConfig, x: NodeId, p: &str, d: usize) -> Result<NodeId> {
    if cfg.decoder_bias {
        return m.flax_layer_norm(x, p, d);
    }
    let s = m.weight(&format!("{p}/scale"), &[d])?;
    let zero = m.g.constant(m.dtype, &[d], vec![0.0; d])?;
    Ok(m.g.layer_norm(x, s, zero, super::LN_EPS)?)
}

/// A Flax `Dense`, with or without its bias.
fn dense(m: &mut Builder, bias: bool, x: NodeId, p: &str, d_in: usize, d_out: usize) -> Result<NodeId> {
    if bias {
        return m.dense(x, p, d_in, d_out);
    }
    let w = m.weight(&format!("{p}/kernel"), &[d_in, d_out])?;
    Ok(m.g.matmul(x, w, false)?)
}

/// Flax multi-head attention without biases (`query|key|value/kernel [D_in, H, hd]`,
/// `out/kernel [H, hd, D]`), queries from `xq` (`[B*sq, D]`), keys and values from `xkv`
/// (`[B*sk, d_kv]`), causal or unmasked; `hd = D / H`.
#[allow(clippy::too_many_arguments)]
fn attention(
    m: &mut Builder,
    cfg: &CappaConfig,
    xq: NodeId,
    xkv: NodeId,
    p: &str,
    (b, sq, sk): (usize, usize, usize),
    d_kv: usize,
    causal: bool,
) -> Result<NodeId> {
    let (d, heads) = (cfg.dec_width, cfg.dec_heads);
    let hd = d / heads;
    let mut proj = |x: NodeId, name: &str, d_in: usize, s: usize| -> Result<NodeId> {
        let w = m.weight(&format!("{p}/{name}/kernel"), &[d_in, heads, hd])?;
        let w = m.g.reshape(w, &[d_in, d])?;
        let y = m.g.matmul(x, w, false)?;
        Ok(m.g.reshape(y, &[b, s, heads, hd])?)
    };
    let q = proj(xq, "query", d, sq)?;
    let k = proj(xkv, "key", d_kv, sk)?;
    let v = proj(xkv, "value", d_kv, sk)?;
    let mask = if causal { MaskKind::Causal { q_offset: 0 } } else { MaskKind::None };
    let a = m.g.attention(q, k, v, Attention { scale: (hd as f32).powf(-0.5), softcap: None, mask })?;
    let a = m.g.reshape(a, &[b * sq, d])?;
    let w = m.weight(&format!("{p}/out/kernel"), &[heads, hd, d])?;
    let w = m.g.reshape(w, &[d, d])?;
    Ok(m.g.matmul(a, w, false)?)
}
