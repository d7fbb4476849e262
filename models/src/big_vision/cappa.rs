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
use crate::registry::{Family, Kind, SynthRecipe, SynthRow, WeightFormat};
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
    synth: &[SynthRow {
        name: "cappa-b16-224",
        about: "CapPa B/16 captioner at 224 px with a 6-layer decoder, vocab 32000, 64 tokens (big_vision's CapPa pretraining config)",
        recipe: |_| Ok(synth_recipe()),
    }],
    init: super::synth_init,
};

/// big_vision's `configs/proj/uvim/train_nyu_depth_pretrained.py` model (`VTT_MODELS['large']`,
/// patch 16 at 512 px, the depth VQ-VAE's 4096 codes + 1 as its vocabulary, 256 of them).
fn vtt_depth_recipe() -> SynthRecipe {
    let model = serde_json::json!({
        "num_layers": 24, "num_heads": 16, "mlp_dim": 4096, "emb_dim": 1024, "patches": {"size": [16, 16]},
        "vocab_size": 4097, "posemb_type": "learn", "input_size": [512, 512], "seq_len": 256, "zero_decoder_seq": false
    });
    let config = serde_json::json!({"model_name": "proj.uvim.vtt", "model": model});
    SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Npz, roots: &[""], given: Vec::new(), batch: 1 }
}

/// big_vision's `configs/proj/cappa/pretrain.py` model: a B/16 encoder, a 6-layer decoder of
/// the same width without biases, the mask token's embedding row.
fn synth_recipe() -> SynthRecipe {
    let model = serde_json::json!({
        "num_layers": 12, "num_heads": 12, "mlp_dim": 3072, "emb_dim": 768, "vocab_size": 32000,
        "patches": [16, 16], "seq_len": 64, "posemb_type": "learn",
        "decoder_num_layers": 6, "decoder_num_heads": 0, "decoder_mlp_dim": 0, "decoder_emb_dim": 0,
        "dec_dropout_rate": 0.0, "masked_pred_prob": 0.75, "masking_ratio": 1.0, "decoder_bias": false
    });
    let config = serde_json::json!({"model_name": "proj.cappa.cappa", "model": model});
    SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Npz, roots: &[""], given: Vec::new(), batch: 1 }
}

/// UViM's stage II model (`model_name: proj.uvim.vtt`): the same decoder over the VTT's encoder.
pub static VTT_FAMILY: Family = Family {
    name: "uvim-vtt",
    about: "UViM's stage II VTT (model_name proj.uvim.vtt): images + codes -> logits; greedy code generation",
    claims: |k| k == Kind::BigVision("proj.uvim.vtt"),
    build,
    generation: None,
    synth: &[SynthRow {
        name: "uvim-vtt-l16-depth",
        about: "UViM's stage II VTT-L/16 for NYU depth at 512 px: 24 + 24 layers, 1024 wide, 4096 codes + 1 (big_vision's train_nyu_depth_pretrained)",
        recipe: |_| Ok(vtt_depth_recipe()),
    }],
    init: super::synth_init,
};

/// A head-less, GAP-pooled ViT of these sizes (the encoder's shape, for both models).
fn encoder_config(patch: (usize, usize), width: usize, depth: usize, mlp_dim: usize, heads: usize, posemb: Posemb) -> VitConfig {
    VitConfig { num_classes: None, patch, width, depth, mlp_dim, heads, posemb, rep_size: None, pool: Pool::Gap, patch_merger: None }
}

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
    /// UViM's VTT (`proj.uvim.vtt`): the image size its encoder's position table is made for
    /// (`input_size`). Its encoder is `EmbedPatches` + `pos_embedding_encoder` + `encoder/`
    /// blocks (no `Transformer/` level); CapPa's (`None`) is a big_vision ViT under `encoder/`.
    pub vtt_input: Option<(usize, usize)>,
    /// `scan: true`: the encoder's blocks stacked on axis 0 (`encoder/Transformer/encoderblock`,
    /// which the ViT builder reads either way) and the decoder's on axis 1
    /// (`decoder/EncDecBlock/...`, `param_scan_axis = 1`), read through views.
    pub scan: bool,
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
        let scan = r.bool_or("scan", false)?;
        if heads == 0 || width % heads != 0 || dec_heads == 0 || dec_width % dec_heads != 0 {
            return Err(r.unsupported("num_heads", format!("widths {width}/{dec_width} do not split into {heads}/{dec_heads} heads")));
        }
        r.finish()?;
        let encoder = encoder_config(patch, width, layers, mlp, heads, posemb);
        let embed_rows = vocab_size + usize::from(masked > 0.0);
        Ok(CappaConfig {
            encoder,
            vocab_size,
            seq_len,
            dec_width,
            dec_layers,
            dec_heads,
            dec_mlp,
            embed_rows,
            decoder_bias,
            vtt_input: None,
            scan,
        })
    }

    /// Reads UViM's `vtt.Model` kwargs strictly: encoder and decoder share their sizes; the
    /// decoder's LayerNorms and MLP have biases; the embedding has exactly `vocab_size` rows.
    pub fn read_vtt(mut r: ConfigReader) -> Result<Self> {
        let patch = match r.object("patches")? {
            Some(mut p) => {
                let size = pair(&mut p, "size", (0, 0))?;
                p.finish()?;
                size
            }
            None => return Err(r.unsupported("patches", "missing: {\"size\": [ph, pw]}")),
        };
        let heads = r.usize_or("num_heads", Some(8))?;
        let layers = r.usize_or("num_layers", Some(6))?;
        let mlp = r.usize_or("mlp_dim", Some(2048))?;
        let _ = r.f64_or("dropout_rate", Some(0.0))?;
        let width = r.usize_or("emb_dim", Some(512))?;
        let vocab_size = r.usize_or("vocab_size", Some(32_000))?;
        let seq_len = r.usize_or("seq_len", Some(256))?;
        let input = pair(&mut r, "input_size", (256, 256))?;
        let posemb = match r.str_or("posemb_type", Some("sincos2d"))?.as_str() {
            "learn" => Posemb::Learn,
            "sincos2d" => Posemb::SinCos2d,
            other => return Err(r.unsupported("posemb_type", format!("'{other}' is not supported (learn, sincos2d)"))),
        };
        if r.bool_or("zero_decoder_seq", false)? {
            return Err(r.unsupported("zero_decoder_seq", "a decoder fed zeros instead of its tokens is not supported"));
        }
        if patch.0 == 0 || patch.1 == 0 || input.0 % patch.0 != 0 || input.1 % patch.1 != 0 {
            return Err(r.unsupported("patches", format!("{patch:?} does not tile input_size {input:?}")));
        }
        if heads == 0 || width % heads != 0 {
            return Err(r.unsupported("num_heads", format!("width {width} does not split into {heads} heads")));
        }
        r.finish()?;
        let encoder = encoder_config(patch, width, layers, mlp, heads, posemb);
        Ok(CappaConfig {
            encoder,
            vocab_size,
            seq_len,
            dec_width: width,
            dec_layers: layers,
            dec_heads: heads,
            dec_mlp: mlp,
            embed_rows: vocab_size,
            decoder_bias: true,
            vtt_input: Some(input),
            scan: false,
        })
    }

    /// Reads a folder's `config.json`: CapPa's or the VTT's kwargs by its `model_name`.
    pub fn from_file(cfg_path: &Path) -> Result<Self> {
        let mut r = ConfigReader::open(cfg_path)?;
        let name = r.str_or("model_name", None)?;
        let kwargs = r.object("model")?.ok_or_else(|| r.unsupported("model", "missing: the model's keyword arguments"))?;
        r.finish()?;
        match name.as_str() {
            "proj.cappa.cappa" => Self::read(kwargs),
            "proj.uvim.vtt" => Self::read_vtt(kwargs),
            other => Err(ModelError::Unsupported(format!("{}: model_name '{other}' is not an encoder-decoder", cfg_path.display()))),
        }
    }

    /// The image size: the profile's, else the VTT's `input_size`, else 224.
    fn image_hw(&self, profile: &Profile) -> (usize, usize) {
        profile.image_hw.or(self.vtt_input).unwrap_or((224, 224))
    }
}

/// The checkpoint with the scan layout's decoder arrays standing for the per-layer names the
/// builders ask for: `decoder/EncDecBlock{i}/X` is `decoder/EncDecBlock/X[:, i]` (the layer axis
/// at position 1, as `nn.scan` stores it with `variable_axes={"params": 1}`).
fn with_scan_aliases(mut ck: Checkpoint, cfg: &CappaConfig) -> Result<Checkpoint> {
    if !cfg.scan {
        return Ok(ck);
    }
    let stacked: Vec<(String, usize)> = ck
        .tensors
        .iter()
        .filter_map(|(n, t)| n.strip_prefix("decoder/EncDecBlock/").map(|rest| (rest.to_string(), t.ty.shape.len())))
        .collect();
    if stacked.is_empty() && !ck.is_schema() {
        return Err(ModelError::MissingTensor {
            dir: ck.dir.clone(),
            name: "decoder/EncDecBlock/LayerNorm1/scale".into(),
            hint: "scan: true, but the checkpoint has no decoder/EncDecBlock/ arrays (per-layer EncDecBlock<i> needs scan: false)".into(),
        });
    }
    for (rest, rank) in stacked {
        let base = format!("decoder/EncDecBlock/{rest}");
        let layers = ck.tensors[&base].ty.shape.get(1).copied().unwrap_or(0);
        if rank < 2 || layers != cfg.dec_layers {
            return Err(ModelError::Unsupported(format!(
                "{}: {base} has shape {:?}; the scan layout stacks the {} decoder layers on axis 1",
                ck.dir.display(),
                ck.tensors[&base].ty.shape,
                cfg.dec_layers
            )));
        }
        let perm: Vec<String> = [1, 0].into_iter().chain(2..rank).map(|a| a.to_string()).collect();
        for i in 0..cfg.dec_layers {
            ck.aliases.insert(format!("decoder/EncDecBlock{i}/{rest}"), format!("{base}~T({})[{i}]", perm.join(",")));
        }
    }
    Ok(ck)
}

/// The encoder's normalised tokens `[B*P, E]` and `P`.
fn encode(m: &mut Builder, cfg: &CappaConfig, images: NodeId, (h, w): (usize, usize), b: usize) -> Result<(NodeId, usize)> {
    let Some(input) = cfg.vtt_input else { return vit::encoder(m, &cfg.encoder, "encoder/", images, (h, w), b) };
    let e = &cfg.encoder;
    if (h, w) != input {
        return Err(ModelError::Unsupported(format!("a {h}x{w} image: the VTT's position table is made for input_size {input:?}")));
    }
    let (gh, gw) = super::grid((h, w), e.patch)?;
    let (d, n) = (e.width, gh * gw);
    let x = super::patch_embed(m, images, "EmbedPatches", e.patch, d)?;
    let x = m.g.reshape(x, &[b, n, d])?;
    let pos = match e.posemb {
        Posemb::Learn => m.weight("pos_embedding_encoder", &[1, n, d])?,
        Posemb::SinCos2d => m.g.constant(m.dtype, &[1, n, d], posemb_sincos_2d(gh, gw, d)?)?,
    };
    let x = m.add(x, pos)?;
    let mut x = m.g.reshape(x, &[b * n, d])?;
    for i in 0..e.depth {
        let p = format!("encoder/encoderblock_{i}");
        x = m.encoder_block(x, &p, ("MultiHeadDotProductAttention_0", "MlpBlock_0"), b, n, d, e.heads, e.mlp_dim)?;
    }
    Ok((m.flax_layer_norm(x, "encoder/encoder_norm", d)?, n))
}

/// Builds `forward`: inputs `images [B, H, W, 3]` (NHWC in [-1, 1]) and `text [B, L]` (i64,
/// `L = profile.seq_len`, default the config's `seq_len`); outputs `logits [B, L, V]`,
/// `encoded [B, P, E]`, and the decoder's `decoder/embedded`, `decoder/block<i>`,
/// `decoder/final_norm` (each `[B, L, Ed]`).
pub fn build(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile) -> Result<Built> {
    let cfg = CappaConfig::from_file(cfg_path)?;
    let (h, w) = cfg.image_hw(profile);
    let l = profile.seq_len.unwrap_or(cfg.seq_len);
    if l == 0 || l > cfg.seq_len {
        return Err(ModelError::Unsupported(format!("text of {l} tokens: the decoder has {} positions (seq_len)", cfg.seq_len)));
    }
    let (b, e) = (profile.batch, cfg.encoder.width);
    let checkpoint = with_scan_aliases(checkpoint, &cfg)?;
    let mut m = Builder::new(&checkpoint, profile.dtype);
    let images = m.g.input("images", profile.dtype, &[b, h, w, 3])?;
    let text = m.g.input("text", DType::I64, &[b, l])?;
    let (enc, p) = encode(&mut m, &cfg, images, (h, w), b)?;
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
    let pos = positions(m, cfg)?;
    let pos = if l < cfg.seq_len { m.g.slice(pos, 0, 0, l)? } else { pos };
    let y = m.add(y, pos)?;
    m.g.output("decoder/embedded", y);
    let mut t = m.g.reshape(y, &[b * l, d])?;
    for i in 0..cfg.dec_layers {
        let bp = format!("decoder/EncDecBlock{i}");
        let x = ln(m, cfg, t, &format!("{bp}/LayerNorm1"), d)?;
        let sp = format!("{bp}/SelfAttn");
        let qkv =
            [heads(m, cfg, x, &sp, "query", d, b, l)?, heads(m, cfg, x, &sp, "key", d, b, l)?, heads(m, cfg, x, &sp, "value", d, b, l)?];
        let sa = attend(m, cfg, qkv, Mask::Causal, &sp, b, l)?;
        let cross = cross_kv(m, cfg, i, enc, b, p)?;
        t = block_rest(m, cfg, &bp, t, sa, cross, b, l)?;
        let out = m.g.reshape(t, &[b, l, d])?;
        m.g.output(format!("decoder/block{i}"), out);
    }
    let (t, logits) = head(m, cfg, t)?;
    let out = m.g.reshape(t, &[b, l, d])?;
    m.g.output("decoder/final_norm", out);
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

/// One projection of a bias-free Flax attention: `{p}/{name}/kernel [d_in, H, hd]` applied to
/// `[B*s, d_in]` rows, as `[B, s, H, hd]`.
#[allow(clippy::too_many_arguments)]
fn heads(m: &mut Builder, cfg: &CappaConfig, x: NodeId, p: &str, name: &str, d_in: usize, b: usize, s: usize) -> Result<NodeId> {
    let (d, h) = (cfg.dec_width, cfg.dec_heads);
    let w = m.weight(&format!("{p}/{name}/kernel"), &[d_in, h, d / h])?;
    let w = m.g.reshape(w, &[d_in, d])?;
    let y = m.g.matmul(x, w, false)?;
    Ok(m.g.reshape(y, &[b, s, h, d / h])?)
}

/// Attention of `q [B, sq, H, hd]` over `k, v [B, sk, H, hd]` (causal, unmasked, or with an
/// additive mask `[B, sq, sk]`), then `{p}/out/kernel [H, hd, D]`: `[B*sq, D]` rows.
fn attend(m: &mut Builder, cfg: &CappaConfig, qkv: [NodeId; 3], mask: Mask, p: &str, b: usize, sq: usize) -> Result<NodeId> {
    let (d, h) = (cfg.dec_width, cfg.dec_heads);
    let scale = ((d / h) as f32).powf(-0.5);
    let (kind, extra) = match mask {
        Mask::None => (MaskKind::None, None),
        Mask::Causal => (MaskKind::Causal { q_offset: 0 }, None),
        Mask::Additive(m) => (MaskKind::Additive, Some(m)),
    };
    let mut ins = qkv.to_vec();
    ins.extend(extra);
    let a = m.g.push(Op::Attention(Attention { scale, softcap: None, mask: kind }), &ins)?;
    let a = m.g.reshape(a, &[b * sq, d])?;
    let w = m.weight(&format!("{p}/out/kernel"), &[h, d / h, d])?;
    let w = m.g.reshape(w, &[d, d])?;
    Ok(m.g.matmul(a, w, false)?)
}

/// Which keys a decoder attention sees.
#[derive(Clone, Copy)]
enum Mask {
    None,
    Causal,
    /// An additive `[B, sq, sk]` mask (decode: the cache slots written so far).
    Additive(NodeId),
}

/// The rest of a decoder block after its self-attention output `sa` over `t`: residual,
/// cross-attention to the encoder's keys and values, MLP. `[B*s, D]` rows.
#[allow(clippy::too_many_arguments)]
fn block_rest(
    m: &mut Builder,
    cfg: &CappaConfig,
    bp: &str,
    t: NodeId,
    sa: NodeId,
    cross: [NodeId; 2],
    b: usize,
    s: usize,
) -> Result<NodeId> {
    let d = cfg.dec_width;
    let x = m.add(sa, t)?;
    let y = ln(m, cfg, x, &format!("{bp}/LayerNorm2"), d)?;
    let q = heads(m, cfg, y, &format!("{bp}/CrossAttn"), "query", d, b, s)?;
    let y = attend(m, cfg, [q, cross[0], cross[1]], Mask::None, &format!("{bp}/CrossAttn"), b, s)?;
    let y = m.add(y, x)?;
    let z = ln(m, cfg, y, &format!("{bp}/LayerNorm3"), d)?;
    let z = dense(m, cfg.decoder_bias, z, &format!("{bp}/MLP/Dense_0"), d, cfg.dec_mlp)?;
    let z = m.g.unary(UnaryOp::GeluTanh, z)?;
    let z = dense(m, cfg.decoder_bias, z, &format!("{bp}/MLP/Dense_1"), cfg.dec_mlp, d)?;
    m.add(y, z)
}

/// The decoder's cross-attention keys and values of layer `l` from the encoder's `[B*P, E]`
/// rows: `[B, P, H, hd]` each.
fn cross_kv(m: &mut Builder, cfg: &CappaConfig, l: usize, enc: NodeId, b: usize, p: usize) -> Result<[NodeId; 2]> {
    let bp = format!("decoder/EncDecBlock{l}/CrossAttn");
    Ok([heads(m, cfg, enc, &bp, "key", cfg.encoder.width, b, p)?, heads(m, cfg, enc, &bp, "value", cfg.encoder.width, b, p)?])
}

/// The decoder's position embedding table `[seq_len, D]`.
fn positions(m: &mut Builder, cfg: &CappaConfig) -> Result<NodeId> {
    let d = cfg.dec_width;
    let pos = match cfg.encoder.posemb {
        Posemb::Learn => m.weight("pos_embedding_decoder", &[1, cfg.seq_len, d])?,
        Posemb::SinCos2d => m.g.constant(m.dtype, &[1, cfg.seq_len, d], posemb_sincos_2d(1, cfg.seq_len, d)?)?,
    };
    Ok(m.g.reshape(pos, &[cfg.seq_len, d])?)
}

/// The final LayerNorm and `LogitsDense` (both keep their biases whatever `decoder_bias` says)
/// on `[B*s, D]` rows: `(normalised rows, logits rows [B*s, V])`.
fn head(m: &mut Builder, cfg: &CappaConfig, t: NodeId) -> Result<(NodeId, NodeId)> {
    let d = cfg.dec_width;
    let t = m.flax_layer_norm(t, "decoder/LayerNorm", d)?;
    let logits = m.dense(t, "decoder/LogitsDense", d, cfg.vocab_size)?;
    Ok((t, logits))
}

/// A captioner compiled for decoding: `encode` (the image, once) and `decode` (one token per
/// row), sharing persistent state: per decoder layer the self-attention cache
/// `self.{l}.key|value [B, N, H, hd]` (zeroed by `encode`, written in place by `decode`) and
/// the cross-attention keys and values `cross.{l}.key|value [B, P, H, hd]` (computed once by
/// `encode`; the official loop recomputes them every step).
pub struct EncDecGeneration {
    pub encode: kiln_graph::Graph,
    pub decode: kiln_graph::Graph,
    pub states: Vec<(String, kiln_graph::TensorType)>,
    pub vocab_size: usize,
    pub description: String,
    pub checkpoint: Checkpoint,
}

/// Where `decode` gets the cross-attention keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossKv {
    /// Computed once by `encode` and kept as state (kiln's way).
    Cached,
    /// Projected from the encoder's tokens (kept as state `encoded`) at every step, as the
    /// official loop does; for comparison.
    Recomputed,
}

/// Builds the two entries for `profile.batch` images of `profile.image_hw` and `capacity`
/// decode steps (at most the config's `seq_len`). `encode`: `images` in, the states out.
/// `decode`: `token [B, 1]` (i64, the previous token; 0 = BOS) and `cache_position [1]` (the
/// step) in, `logits [B, V]` out.
pub fn build_generation(
    cfg_path: &Path,
    checkpoint: Checkpoint,
    profile: &Profile,
    capacity: usize,
    cross: CrossKv,
) -> Result<EncDecGeneration> {
    let cfg = CappaConfig::from_file(cfg_path)?;
    if capacity == 0 || capacity > cfg.seq_len {
        return Err(ModelError::Unsupported(format!("{capacity} decode steps: the decoder has {} positions (seq_len)", cfg.seq_len)));
    }
    let (h, w) = cfg.image_hw(profile);
    let (b, e, d, n) = (profile.batch, cfg.encoder.width, cfg.dec_width, capacity);
    let (hh, hd) = (cfg.dec_heads, cfg.dec_width / cfg.dec_heads);
    let dt = profile.dtype;
    let checkpoint = with_scan_aliases(checkpoint, &cfg)?;

    // encode: the cross keys and values, and a zeroed self-attention cache.
    let mut m = Builder::new(&checkpoint, dt);
    let images = m.g.input("images", dt, &[b, h, w, 3])?;
    let (enc, p) = encode(&mut m, &cfg, images, (h, w), b)?;
    let zero = m.g.scalar(dt, 0.0)?;
    let mut states = Vec::new();
    if cross == CrossKv::Recomputed {
        m.g.output("encoded", enc);
        states.push(("encoded".to_string(), kiln_graph::TensorType::new(dt, [b * p, e])));
    }
    for l in 0..cfg.dec_layers {
        if cross == CrossKv::Cached {
            let kv = cross_kv(&mut m, &cfg, l, enc, b, p)?;
            for (name, t) in ["key", "value"].into_iter().zip(kv) {
                m.g.output(format!("cross.{l}.{name}"), t);
                states.push((format!("cross.{l}.{name}"), kiln_graph::TensorType::new(dt, [b, p, hh, hd])));
            }
        }
        for name in ["key", "value"] {
            let z = m.g.push(Op::Broadcast { shape: vec![b, n, hh, hd] }, &[zero])?;
            m.g.output(format!("self.{l}.{name}"), z);
            states.push((format!("self.{l}.{name}"), kiln_graph::TensorType::new(dt, [b, n, hh, hd])));
        }
    }
    let encode = m.g;

    // decode: one token at position `cache_position`.
    let mut m = Builder::new(&checkpoint, dt);
    let token = m.g.input("token", DType::I64, &[b, 1])?;
    let at = m.g.input("cache_position", DType::I64, &[1])?;
    let table = m.weight("decoder/EmbedTargets/embedding", &[cfg.embed_rows, d])?;
    let y = m.g.push(Op::Gather { axis: 0 }, &[table, token])?;
    let pos = positions(&mut m, &cfg)?;
    let pos = m.g.push(Op::Gather { axis: 0 }, &[pos, at])?;
    let pos = m.g.reshape(pos, &[1, 1, d])?;
    let y = m.add(y, pos)?;
    let mut t = m.g.reshape(y, &[b, d])?;
    // Slots 0..=cache_position are visible: an additive mask [B, 1, N].
    let j = m.g.push_source(Op::Iota { axis: 2, start: 0.0, step: 1.0 }, kiln_graph::TensorType::new(DType::F32, [1, 1, n]))?;
    let qi = m.g.push(Op::Cast { to: DType::F32 }, &[at])?;
    let qi = m.g.reshape(qi, &[1, 1, 1])?;
    let ok = m.g.binary(kiln_graph::BinaryOp::Le, j, qi)?;
    let (zero, lowest) = (m.g.scalar(dt, 0.0)?, m.g.scalar(dt, f64::from(f32::MIN))?);
    let mask = m.g.push(Op::Select, &[ok, zero, lowest])?;
    let mask = m.g.push(Op::Broadcast { shape: vec![b, 1, n] }, &[mask])?;
    let enc_in = match cross {
        CrossKv::Recomputed => Some(m.g.input("encoded", dt, &[b * p, e])?),
        CrossKv::Cached => None,
    };
    for l in 0..cfg.dec_layers {
        let bp = format!("decoder/EncDecBlock{l}");
        let x = ln(&mut m, &cfg, t, &format!("{bp}/LayerNorm1"), d)?;
        let sp = format!("{bp}/SelfAttn");
        let q = heads(&mut m, &cfg, x, &sp, "query", d, b, 1)?;
        let mut cache = [NodeId(0); 2];
        for (i, name) in ["key", "value"].into_iter().enumerate() {
            let new = heads(&mut m, &cfg, x, &sp, name, d, b, 1)?;
            let past = m.g.input(&format!("self.{l}.{name}"), dt, &[b, n, hh, hd])?;
            cache[i] = m.g.write_slice(past, new, at, 1)?;
            m.g.output(format!("self.{l}.{name}"), cache[i]);
        }
        let sa = attend(&mut m, &cfg, [q, cache[0], cache[1]], Mask::Additive(mask), &sp, b, 1)?;
        let cross = match enc_in {
            Some(enc) => cross_kv(&mut m, &cfg, l, enc, b, p)?,
            None => {
                [m.g.input(&format!("cross.{l}.key"), dt, &[b, p, hh, hd])?, m.g.input(&format!("cross.{l}.value"), dt, &[b, p, hh, hd])?]
            }
        };
        t = block_rest(&mut m, &cfg, &bp, t, sa, cross, b, 1)?;
    }
    let (_, logits) = head(&mut m, &cfg, t)?;
    m.g.output("logits", logits);
    let decode = m.g;
    let description = format!(
        "CapPa generation: ViT width {e} at {h}x{w}, decoder width {d} depth {} heads {hh}, vocab {}, {n} steps, batch {b}, {dt}",
        cfg.dec_layers, cfg.vocab_size
    );
    Ok(EncDecGeneration { encode, decode, states, vocab_size: cfg.vocab_size, description, checkpoint })
}
