//! JetFormer's graphs: the image side (patchify, the Jet adaptor, factoring out), the
//! two-modality sequence (`embed_image_and_text`), the decoder, the heads (`text_logits`,
//! `img_logits`, `get_pdf`) and the entries built from them.

use super::{JetFormerConfig, P};
use crate::error::{ModelError, Result};
use crate::gemma::{self, Mode};
use crate::layers::Builder;
use crate::Profile;
use kiln_graph::{BinaryOp, DType, NodeId, Op, ReduceOp, TensorType, UnaryOp};

/// Sizes fixed by the profile: batch, text length T, image size, the square patch grid, the N
/// image tokens and the C values per patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub hw: (usize, usize),
    pub grid: usize,
    pub n: usize,
    pub c: usize,
}

impl Dims {
    /// The profile's image size (else the config's `input_size`) and text length (else 1).
    pub fn new(cfg: &JetFormerConfig, profile: &Profile) -> Result<Self> {
        let hw = profile.image_hw.unwrap_or(cfg.input_size);
        let (gh, gw) = crate::big_vision::grid(hw, cfg.patch)?;
        if gh != gw {
            return Err(ModelError::Unsupported(format!("{}x{} images: JetFormer unflattens its latents as a square grid", hw.0, hw.1)));
        }
        let t = profile.seq_len.unwrap_or(1).max(1);
        Ok(Dims { b: profile.batch.max(1), t, hw, grid: gh, n: gh * gw, c: cfg.token_dim() })
    }
}

/// Builds entry `name` into `m`.
pub(super) fn entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims, name: &str) -> Result<()> {
    match name {
        "encode" => encode_entry(m, cfg, d),
        "forward" => forward_entry(m, cfg, d),
        "nll" => nll_entry(m, cfg, d),
        "decode" => decode_entry(m, cfg, d),
        "score_image_samples" => super::t2i::score_image_entry(m, cfg, d),
        "score_text_samples" => score_text_entry(m, cfg, d),
        other => Err(ModelError::Unsupported(format!("JetFormer has no entry '{other}'"))),
    }
}

pub(super) fn f32s(m: &mut Builder, shape: &[usize], v: f64) -> Result<NodeId> {
    Ok(m.g.constant(DType::F32, shape, vec![v; shape.iter().product()])?)
}

/// A 0/1 flag input (uint8) as bool.
pub(super) fn flag(m: &mut Builder, name: &str, shape: &[usize]) -> Result<NodeId> {
    let x = m.g.input(name, DType::U8, shape)?;
    let x = m.g.push(Op::Cast { to: DType::F32 }, &[x])?;
    let zero = m.g.scalar(DType::F32, 0.0)?;
    Ok(m.g.binary(BinaryOp::Ne, x, zero)?)
}

/// A 0/1 mask input (uint8) as f32.
pub(super) fn mask_input(m: &mut Builder, name: &str, shape: &[usize]) -> Result<NodeId> {
    let x = m.g.input(name, DType::U8, shape)?;
    Ok(m.g.push(Op::Cast { to: DType::F32 }, &[x])?)
}

/// big_vision's `RMSNorm` (`1 + scale`, eps 1e-6) over the last axis of `x [.., W]`.
pub(super) fn rms(m: &mut Builder, name: &str, x: NodeId, w: usize) -> Result<NodeId> {
    let shape = m.g.shape(x).to_vec();
    let rows = m.g.reshape(x, &[shape.iter().product::<usize>() / w, w])?;
    let s = m.weight(name, &[w])?;
    let y = m.g.push(Op::RmsNorm { eps: 1e-6, add_one: true }, &[rows, s])?;
    Ok(m.g.reshape(y, &shape)?)
}

/// `x - logsumexp(x)` along `axis` (kept).
pub(super) fn log_softmax(m: &mut Builder, x: NodeId, axis: usize) -> Result<NodeId> {
    let mx = m.g.reduce(ReduceOp::Max, x, &[axis], true)?;
    let y = m.g.binary(BinaryOp::Sub, x, mx)?;
    let e = m.g.unary(UnaryOp::Exp, y)?;
    let s = m.g.reduce(ReduceOp::Sum, e, &[axis], true)?;
    let ls = m.g.unary(UnaryOp::Log, s)?;
    Ok(m.g.binary(BinaryOp::Sub, y, ls)?)
}

/// `log sum exp(x)` along the last axis (dropped).
fn logsumexp_last(m: &mut Builder, x: NodeId) -> Result<NodeId> {
    let axis = m.g.shape(x).len() - 1;
    let mx = m.g.reduce(ReduceOp::Max, x, &[axis], true)?;
    let y = m.g.binary(BinaryOp::Sub, x, mx)?;
    let e = m.g.unary(UnaryOp::Exp, y)?;
    let s = m.g.reduce(ReduceOp::Sum, e, &[axis], true)?;
    let ls = m.g.unary(UnaryOp::Log, s)?;
    let r = m.add(mx, ls)?;
    let shape = m.g.shape(x)[..axis].to_vec();
    Ok(m.g.reshape(r, &shape)?)
}

/// `lp[b, t, ids[b, t]]` for `lp [B, T, V]` and i64 `ids [B, T]` (0 outside the vocabulary).
pub(super) fn pick(m: &mut Builder, lp: NodeId, ids: NodeId) -> Result<NodeId> {
    let s = m.g.shape(lp).to_vec();
    let f = m.g.push(Op::Cast { to: DType::F32 }, &[ids])?;
    let f = m.g.reshape(f, &[s[0], s[1], 1])?;
    let j = m.g.push_source(Op::Iota { axis: 2, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, [1, 1, s[2]]))?;
    let hit = m.g.binary(BinaryOp::Eq, j, f)?;
    let zero = m.g.scalar(DType::F32, 0.0)?;
    let v = m.g.push(Op::Select, &[hit, lp, zero])?;
    Ok(m.g.reduce(ReduceOp::Sum, v, &[2], false)?)
}

// ---------------------------------------------------------------- image side

/// What `encode` gives: the patches, the flow's latents and logdet, and their split.
struct Encoded {
    patches: NodeId,
    latents: NodeId,
    logdet: NodeId,
    tokens: NodeId,
    noise: Option<NodeId>,
}

/// The Jet adaptor on `x [B, N, C]` (unflattened to the square grid, its weights under
/// `params_adaptor/`), or the identity with logdet 0 without an adaptor.
fn adaptor(m: &mut Builder, cfg: &JetFormerConfig, d: Dims, x: NodeId, inverse: bool) -> Result<(NodeId, NodeId)> {
    let Some(jet) = &cfg.jet else {
        let zeros = f32s(m, &[d.b], 0.0)?;
        return Ok((x, zeros));
    };
    let g = m.g.reshape(x, &[d.b, d.grid, d.grid, d.c])?;
    let saved = m.weight_prefix.replace("params_adaptor/".to_string());
    let out = crate::jet::apply(m, jet, g, inverse);
    m.weight_prefix = saved;
    let (y, logdet) = out?;
    Ok((m.g.reshape(y, &[d.b, d.n, d.c])?, logdet))
}

/// `patch_pca.encode` (skip_pca: `b (h p) (w q) c -> b (h w) (p q c)`), the flow, the split.
fn encode(m: &mut Builder, cfg: &JetFormerConfig, d: Dims, images: NodeId) -> Result<Encoded> {
    let (p, q) = cfg.patch;
    let x = m.g.reshape(images, &[d.b, d.grid, p, d.grid, q, 3])?;
    let x = m.g.permute(x, &[0, 1, 3, 2, 4, 5])?;
    let patches = m.g.reshape(x, &[d.b, d.n, d.c])?;
    let (latents, logdet) = adaptor(m, cfg, d, patches, false)?;
    let tokens = m.g.slice(latents, 2, 0, cfg.out_dim)?;
    let noise = if cfg.latent_noise_dim > 0 { Some(m.g.slice(latents, 2, cfg.out_dim, d.c)?) } else { None };
    Ok(Encoded { patches, latents, logdet, tokens, noise })
}

pub(super) fn images_input(m: &mut Builder, d: Dims) -> Result<NodeId> {
    Ok(m.g.input("images", DType::F32, &[d.b, d.hw.0, d.hw.1, 3])?)
}

fn encode_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims) -> Result<()> {
    let images = images_input(m, d)?;
    let e = encode(m, cfg, d, images)?;
    m.g.output("patches", e.patches);
    m.g.output("latents", e.latents);
    m.g.output("logdet", e.logdet);
    m.g.output("image_tokens", e.tokens);
    if let Some(n) = e.noise {
        m.g.output("noise", n);
    }
    Ok(())
}

/// `predict_fns.decode_images`: tokens and noise, the inverse flow, unpatchify, clip to [-1, 1].
fn decode_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims) -> Result<()> {
    let tokens = m.g.input("image_tokens", DType::F32, &[d.b, d.n, cfg.out_dim])?;
    let lat = if cfg.latent_noise_dim > 0 {
        let noise = m.g.input("noise", DType::F32, &[d.b, d.n, cfg.latent_noise_dim])?;
        m.g.concat(&[tokens, noise], 2)?
    } else {
        tokens
    };
    let (x, _) = adaptor(m, cfg, d, lat, true)?;
    let (p, q) = cfg.patch;
    let x = m.g.reshape(x, &[d.b, d.grid, d.grid, p, q, 3])?;
    let x = m.g.permute(x, &[0, 1, 3, 2, 4, 5])?;
    let x = m.g.reshape(x, &[d.b, d.hw.0, d.hw.1, 3])?;
    let lo = m.g.scalar(DType::F32, -1.0)?;
    let hi = m.g.scalar(DType::F32, 1.0)?;
    let x = m.g.binary(BinaryOp::Max, x, lo)?;
    let x = m.g.binary(BinaryOp::Min, x, hi)?;
    m.g.output("images", x);
    Ok(())
}

// ---------------------------------------------------------------- the sequence

/// `EmbedText` row `id` as `[B, 1, W]` (`lookup_token`).
pub(super) fn token(m: &mut Builder, table: NodeId, id: usize, b: usize, w: usize) -> Result<NodeId> {
    let row = m.g.slice(table, 0, id, id + 1)?;
    let row = m.g.reshape(row, &[1, 1, w])?;
    Ok(m.g.push(Op::Broadcast { shape: vec![b, 1, w] }, &[row])?)
}

/// The text embedded R times, repeat r from rows `r V ..` (`_repeat_text`): `[B, T R, W]`.
pub(super) fn embed_text(m: &mut Builder, cfg: &JetFormerConfig, table: NodeId, text: NodeId) -> Result<NodeId> {
    let (v, r) = (cfg.vocab_size, cfg.num_vocab_repeats);
    let mut parts = vec![];
    for i in 0..r {
        let rows = if r == 1 { table } else { m.g.slice(table, 0, i * v, (i + 1) * v)? };
        parts.push(m.g.push(Op::Gather { axis: 0 }, &[rows, text])?);
    }
    if parts.len() == 1 {
        return Ok(parts[0]);
    }
    Ok(m.g.concat(&parts, 1)?)
}

/// The nolabel embedding at every text slot (`nolabel_id + r V` in repeat r): `[B, T R, W]`.
pub(super) fn nolabel_text(m: &mut Builder, cfg: &JetFormerConfig, table: NodeId, id: usize, d: Dims) -> Result<NodeId> {
    let w = cfg.width;
    let mut parts = vec![];
    for r in 0..cfg.num_vocab_repeats {
        let row = token(m, table, id + r * cfg.vocab_size, d.b, w)?;
        parts.push(m.g.push(Op::Broadcast { shape: vec![d.b, d.t, w] }, &[row])?);
    }
    if parts.len() == 1 {
        return Ok(parts[0]);
    }
    Ok(m.g.concat(&parts, 1)?)
}

/// The text mask tiled R times, f32 `[B, T R]`.
pub(super) fn tile(m: &mut Builder, cfg: &JetFormerConfig, mask: NodeId) -> Result<NodeId> {
    if cfg.num_vocab_repeats == 1 {
        return Ok(mask);
    }
    Ok(m.g.concat(&vec![mask; cfg.num_vocab_repeats], 1)?)
}

/// A teacher-forced sequence: embeddings, the input mask (f32), and the keys every query may
/// also see (the non-causal prefix), `[B|1, 1, L]` bool.
pub(super) struct Seq {
    pub x: NodeId,
    pub mask: NodeId,
    pub extra: Option<NodeId>,
}

/// The per-row text-first flag as `[B, 1, 1]` and `[B, 1]`; `None`: every row image first.
type TextFirst = Option<NodeId>;

pub(super) fn select_rows(m: &mut Builder, tf: NodeId, a: NodeId, b: NodeId) -> Result<NodeId> {
    let rank = m.g.shape(a).len();
    let bsz = m.g.shape(tf)[0];
    let mut shape = vec![bsz];
    shape.extend(std::iter::repeat_n(1, rank - 1));
    let c = m.g.reshape(tf, &shape)?;
    Ok(m.g.push(Op::Select, &[c, a, b])?)
}

/// `embed_image_and_text` with `shift`: `[bos, text, (boi), image]` for text-first rows,
/// `[boi, image, bos, text]` / `[bos, image, text]` for image-first rows, the last dropped.
#[allow(clippy::too_many_arguments)]
fn layout(
    m: &mut Builder,
    cfg: &JetFormerConfig,
    d: Dims,
    table: NodeId,
    (x_txt, m_txt): (NodeId, NodeId),
    x_img: NodeId,
    tf: TextFirst,
) -> Result<Seq> {
    let (b, w, tr) = (d.b, cfg.width, d.t * cfg.num_vocab_repeats);
    let one = f32s(m, &[b, 1], 1.0)?;
    let ones_n = f32s(m, &[b, d.n], 1.0)?;
    let bos = token(m, table, cfg.bos_id, b, w)?;
    let boi = cfg.boi_id.map(|id| token(m, table, id, b, w)).transpose()?;
    let l = tr + d.n + usize::from(boi.is_some());
    let cat = |m: &mut Builder, parts: &[NodeId]| -> Result<NodeId> {
        let x = m.g.concat(parts, 1)?;
        Ok(m.g.slice(x, 1, 0, l)?)
    };
    let (img_first, img_first_m) = match boi {
        Some(boi) => (cat(m, &[boi, x_img, bos, x_txt])?, cat(m, &[one, ones_n, one, m_txt])?),
        None => (cat(m, &[bos, x_img, x_txt])?, cat(m, &[one, ones_n, m_txt])?),
    };
    let (x, mask) = match tf {
        None => (img_first, img_first_m),
        Some(tf) => {
            let (txt_first, txt_first_m) = match boi {
                Some(boi) => (cat(m, &[bos, x_txt, boi, x_img])?, cat(m, &[one, m_txt, one, ones_n])?),
                None => (cat(m, &[bos, x_txt, x_img])?, cat(m, &[one, m_txt, ones_n])?),
            };
            (select_rows(m, tf, txt_first, img_first)?, select_rows(m, tf, txt_first_m, img_first_m)?)
        }
    };
    let extra = if cfg.causal_mask_on_prefix {
        None
    } else {
        // Every query also sees the prefix: bos + text (text first) or boi|bos + image.
        Some(match tf {
            None => gemma::prefix_len(m, b, d.n + 1)?,
            Some(tf) => {
                let img_len = m.g.scalar(DType::F32, (d.n + 1) as f64)?;
                let txt_len = m.g.scalar(DType::F32, (tr + 1) as f64)?;
                let c = m.g.reshape(tf, &[b])?;
                let len = m.g.push(Op::Select, &[c, txt_len, img_len])?;
                m.g.push(Op::Cast { to: DType::I64 }, &[len])?
            }
        })
    };
    Ok(Seq { x, mask, extra })
}

/// The decoder's outputs over all L positions: the last block's (`encoded`) and after
/// `final_norm` (`pre_logits`), both `[B, L, W]`.
pub(super) struct Trunk {
    pub encoded: NodeId,
    pub pre_logits: NodeId,
}

/// `GemmaBackbone` with positions `cumsum(input_mask) - 1`, causal attention (plus the
/// non-causal prefix) over keys the input mask keeps.
pub(super) fn trunk(m: &mut Builder, cfg: &JetFormerConfig, s: &Seq) -> Result<Trunk> {
    let shape = m.g.shape(s.x).to_vec();
    let (b, l, w) = (shape[0], shape[1], shape[2]);
    let c = m.g.push(Op::CumSum { axis: 1, exclusive: false }, &[s.mask])?;
    let one = m.g.scalar(DType::F32, 1.0)?;
    let pos = m.g.binary(BinaryOp::Sub, c, one)?;
    let start = gemma::start_zero(m)?;
    let extra = s.extra.map_or(gemma::Extra::None, gemma::Extra::Prefix);
    let rows = gemma::blocks(m, &cfg.gemma(), P, s.x, pos, s.mask, start, Mode::Forward, extra, None)?;
    let encoded = m.g.reshape(rows, &[b, l, w])?;
    let pre_logits = rms(m, "decoder/final_norm/scale", encoded, w)?;
    Ok(Trunk { encoded, pre_logits })
}

/// What the heads read: `encoded` under per-modality norms, else `pre_logits`.
pub(super) fn head_input(cfg: &JetFormerConfig, t: &Trunk) -> NodeId {
    if cfg.per_modality_final_norm {
        t.encoded
    } else {
        t.pre_logits
    }
}

/// `text_logits`: `TextNorm` (per-modality), then `LogitsText` or the tied `EmbedText.attend`.
pub(super) fn text_head(m: &mut Builder, cfg: &JetFormerConfig, table: NodeId, x: NodeId) -> Result<NodeId> {
    let s = m.g.shape(x).to_vec();
    let w = cfg.width;
    let x = if cfg.per_modality_final_norm { rms(m, "TextNorm/scale", x, w)? } else { x };
    let rows = m.g.reshape(x, &[s[0] * s[1], w])?;
    let logits = if cfg.untie_output_vocab { m.dense(rows, "LogitsText", w, cfg.vocab_size)? } else { m.g.matmul(rows, table, true)? };
    Ok(m.g.reshape(logits, &[s[0], s[1], cfg.text_logits()])?)
}

/// `img_logits`: `ImageNorm` (per-modality), then `LogitsImage` (under `head_dtype: bfloat16`
/// inputs, kernel, bias, product and sum rounded to bfloat16 as Flax's `Dense(dtype=bfloat16)`
/// rounds them; the mixture is then evaluated in f32 from the rounded logits, where big_vision
/// stays in bfloat16).
pub(super) fn image_head(m: &mut Builder, cfg: &JetFormerConfig, x: NodeId) -> Result<NodeId> {
    let s = m.g.shape(x).to_vec();
    let (w, k) = (cfg.width, cfg.num_logits());
    let x = if cfg.per_modality_final_norm { rms(m, "ImageNorm/scale", x, w)? } else { x };
    let rows = m.g.reshape(x, &[s[0] * s[1], w])?;
    let logits = if cfg.head_bf16 {
        // The kernel and bias are rounded once at load (`~bf16` views), the activations here.
        let kb = m.weight("LogitsImage/kernel~bf16", &[w, k])?;
        let bb = m.weight("LogitsImage/bias~bf16", &[k])?;
        let xb = round_bf16(m, rows)?;
        let y = m.g.matmul(xb, kb, false)?;
        let y = round_bf16(m, y)?;
        let y = m.add(y, bb)?;
        round_bf16(m, y)?
    } else {
        m.dense(rows, "LogitsImage", w, k)?
    };
    Ok(m.g.reshape(logits, &[s[0], s[1], k])?)
}

/// `x` rounded to bfloat16's 8 significant bits (to nearest), kept in f32: Veltkamp's split
/// `c = x (2^16 + 1)`, `c - (c - x)`, so every backend computes it in plain f32 arithmetic.
fn round_bf16(m: &mut Builder, x: NodeId) -> Result<NodeId> {
    let c = m.g.mul_scalar(x, 65537.0)?;
    let d = m.g.binary(BinaryOp::Sub, c, x)?;
    Ok(m.g.binary(BinaryOp::Sub, c, d)?)
}

/// The image-token mixture of `get_pdf`: normalised mixture log-weights `[B, N, M]`, locations
/// and scales `[B, N, M, D]`; `temps` = (scale temperature, mixture temperature).
pub(super) struct Gmm {
    mix: NodeId,
    loc: NodeId,
    scale: NodeId,
}

pub(super) fn gmm(m: &mut Builder, cfg: &JetFormerConfig, logits: NodeId, temps: Option<(NodeId, NodeId)>) -> Result<Gmm> {
    let s = m.g.shape(logits).to_vec();
    let (mm, dd) = (cfg.num_mixtures, cfg.out_dim);
    let mut mix = m.g.slice(logits, 2, 0, mm)?;
    if let Some((_, tp)) = temps {
        mix = m.g.mul(mix, tp)?;
    }
    let mix = log_softmax(m, mix, 2)?;
    let rest = m.g.slice(logits, 2, mm, cfg.num_logits())?;
    let rest = m.g.reshape(rest, &[s[0], s[1], mm, 2, dd])?;
    let loc = m.g.slice(rest, 3, 0, 1)?;
    let loc = m.g.reshape(loc, &[s[0], s[1], mm, dd])?;
    let raw = m.g.slice(rest, 3, 1, 2)?;
    let raw = m.g.reshape(raw, &[s[0], s[1], mm, dd])?;
    // squareplus(x) = (x + sqrt(x² + 4)) / 2, floored at scale_tol.
    let sq = m.g.unary(UnaryOp::Square, raw)?;
    let four = m.g.scalar(DType::F32, 4.0)?;
    let sq = m.add(sq, four)?;
    let sq = m.g.unary(UnaryOp::Sqrt, sq)?;
    let sp = m.add(raw, sq)?;
    let sp = m.g.mul_scalar(sp, 0.5)?;
    let tol = m.g.scalar(DType::F32, cfg.scale_tol)?;
    let mut scale = m.g.binary(BinaryOp::Max, sp, tol)?;
    if let Some((t, _)) = temps {
        scale = m.g.mul(scale, t)?;
    }
    Ok(Gmm { mix, loc, scale })
}

/// `log p(x)` of `x [B, N, D]` under the mixture: `[B, N]`.
pub(super) fn gmm_log_prob(m: &mut Builder, g: &Gmm, x: NodeId) -> Result<NodeId> {
    let s = m.g.shape(x).to_vec();
    let xe = m.g.reshape(x, &[s[0], s[1], 1, s[2]])?;
    let z = m.g.binary(BinaryOp::Sub, xe, g.loc)?;
    let z = m.g.binary(BinaryOp::Div, z, g.scale)?;
    let z2 = m.g.unary(UnaryOp::Square, z)?;
    let z2 = m.g.mul_scalar(z2, -0.5)?;
    let ls = m.g.unary(UnaryOp::Log, g.scale)?;
    let per = m.g.binary(BinaryOp::Sub, z2, ls)?;
    let c = m.g.scalar(DType::F32, -0.5 * (2.0 * std::f64::consts::PI).ln())?;
    let per = m.add(per, c)?;
    let comp = m.g.reduce(ReduceOp::Sum, per, &[3], false)?;
    let joint = m.add(g.mix, comp)?;
    logsumexp_last(m, joint)
}

/// The teacher-forced model (`Model.__call__`): the head inputs at the text and image
/// prediction rows (`split_image_and_text_prelogits`), both logits and the trunk.
struct Heads {
    text_pre: NodeId,
    text_logits: NodeId,
    image_logits: NodeId,
    trunk: Trunk,
}

/// The inputs every teacher-forced entry shares: `text` i64 `[B, T]`, its f32 mask, the
/// image tokens `[B, N, D]`, the per-row order and the rows whose prefix is dropped.
struct Batch {
    text: NodeId,
    text_mask: NodeId,
    tokens: NodeId,
    tf: TextFirst,
    drop: Option<NodeId>,
}

fn teacher_forced(m: &mut Builder, cfg: &JetFormerConfig, d: Dims, table: NodeId, x: &Batch) -> Result<Heads> {
    let (w, tr) = (cfg.width, d.t * cfg.num_vocab_repeats);
    let mut x_txt = embed_text(m, cfg, table, x.text)?;
    let mut m_txt = tile(m, cfg, x.text_mask)?;
    let rows = m.g.reshape(x.tokens, &[d.b * d.n, cfg.out_dim])?;
    let x_img = m.dense(rows, "EmbedImage", cfg.out_dim, w)?;
    let mut x_img = m.g.reshape(x_img, &[d.b, d.n, w])?;
    if let (Some(drop), Some(id)) = (x.drop, cfg.nolabel_id) {
        // Text-first rows lose their text (and its mask), image-first rows their image.
        let drop_img = match x.tf {
            Some(tf) => {
                let drop_txt = m.g.binary(BinaryOp::And, tf, drop)?;
                let nolabel = nolabel_text(m, cfg, table, id, d)?;
                let ones = f32s(m, &[d.b, tr], 1.0)?;
                x_txt = select_rows(m, drop_txt, nolabel, x_txt)?;
                m_txt = select_rows(m, drop_txt, ones, m_txt)?;
                let not_tf = m.g.unary(UnaryOp::Not, tf)?;
                m.g.binary(BinaryOp::And, not_tf, drop)?
            }
            None => drop,
        };
        let nolabel_img = token(m, table, id, d.b, w)?;
        let nolabel_img = m.g.push(Op::Broadcast { shape: vec![d.b, d.n, w] }, &[nolabel_img])?;
        x_img = select_rows(m, drop_img, nolabel_img, x_img)?;
    }
    let seq = layout(m, cfg, d, table, (x_txt, m_txt), x_img, x.tf)?;
    let trunk = trunk(m, cfg, &seq)?;
    let h = head_input(cfg, &trunk);
    let boi = usize::from(cfg.boi_id.is_some());
    let if_txt = m.g.slice(h, 1, d.n + boi, d.n + boi + d.t)?;
    let if_img = m.g.slice(h, 1, 0, d.n)?;
    let (text_pre, img_pre) = match x.tf {
        None => (if_txt, if_img),
        Some(tf) => {
            let tf_txt = m.g.slice(h, 1, 0, d.t)?;
            let tf_img = m.g.slice(h, 1, tr + boi, tr + boi + d.n)?;
            (select_rows(m, tf, tf_txt, if_txt)?, select_rows(m, tf, tf_img, if_img)?)
        }
    };
    let text_logits = text_head(m, cfg, table, text_pre)?;
    let image_logits = image_head(m, cfg, img_pre)?;
    Ok(Heads { text_pre, text_logits, image_logits, trunk })
}

pub(super) fn table(m: &mut Builder, cfg: &JetFormerConfig) -> Result<NodeId> {
    m.weight("EmbedText/embedding", &[cfg.vocab_size * cfg.num_vocab_repeats, cfg.width])
}

/// `text` (i64) and `text_mask` (u8 → f32) inputs.
pub(super) fn text_inputs(m: &mut Builder, d: Dims) -> Result<(NodeId, NodeId)> {
    let text = m.g.input("text", DType::I64, &[d.b, d.t])?;
    let mask = mask_input(m, "text_mask", &[d.b, d.t])?;
    Ok((text, mask))
}

/// `Model.__call__` with `drop_prefix` (an input only when the model has a nolabel token).
fn forward_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims) -> Result<()> {
    let table = table(m, cfg)?;
    let (text, text_mask) = text_inputs(m, d)?;
    let tf = flag(m, "text_first", &[d.b])?;
    let tokens = m.g.input("image_tokens", DType::F32, &[d.b, d.n, cfg.out_dim])?;
    let drop = cfg.nolabel_id.map(|_| flag(m, "drop_prefix", &[d.b])).transpose()?;
    let h = teacher_forced(m, cfg, d, table, &Batch { text, text_mask, tokens, tf: Some(tf), drop })?;
    let g = gmm(m, cfg, h.image_logits, None)?;
    m.g.output("text_logits", h.text_logits);
    m.g.output("image_logits", h.image_logits);
    m.g.output("gmm_mix_logits", g.mix);
    m.g.output("gmm_means", g.loc);
    m.g.output("gmm_scales", g.scale);
    // The head input at every position (`Model.__call__`'s prelogits): `encoded` under
    // per-modality norms, else the final norm's output.
    m.g.output("pre_logits", head_input(cfg, &h.trunk));
    m.g.output("encoded", h.trunk.encoded);
    Ok(())
}

/// `loss_fn`'s per-example quantities at inference (no dequantisation or curriculum noise).
fn nll_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims) -> Result<()> {
    let images = images_input(m, d)?;
    let table = table(m, cfg)?;
    let (text, text_mask) = text_inputs(m, d)?;
    let loss = mask_input(m, "text_loss", &[d.b, d.t])?;
    let tf = flag(m, "text_first", &[d.b])?;
    let e = encode(m, cfg, d, images)?;
    let h = teacher_forced(m, cfg, d, table, &Batch { text, text_mask, tokens: e.tokens, tf: Some(tf), drop: None })?;
    let lp = log_softmax(m, h.text_logits, 2)?;
    let tok = pick(m, lp, text)?;
    let tok_nll = m.g.unary(UnaryOp::Neg, tok)?;
    let weighted = m.g.mul(tok_nll, loss)?;
    let num = m.g.reduce(ReduceOp::Sum, weighted, &[1], false)?;
    let den = m.g.reduce(ReduceOp::Sum, loss, &[1], false)?;
    let nll_text = m.g.binary(BinaryOp::Div, num, den)?;
    let g = gmm(m, cfg, h.image_logits, None)?;
    let img = gmm_log_prob(m, &g, e.tokens)?;
    let img_nll = m.g.unary(UnaryOp::Neg, img)?;
    let noise_nll = match e.noise {
        Some(n) => {
            let sq = m.g.unary(UnaryOp::Square, n)?;
            let half = m.g.mul_scalar(sq, 0.5)?;
            let c = m.g.scalar(DType::F32, 0.5 * (2.0 * std::f64::consts::PI).ln())?;
            let per = m.add(half, c)?;
            m.g.reduce(ReduceOp::Sum, per, &[1, 2], false)?
        }
        None => f32s(m, &[d.b], 0.0)?,
    };
    let subpixels = (d.hw.0 * d.hw.1 * 3) as f64;
    let ln2 = std::f64::consts::LN_2;
    let sum_img = m.g.reduce(ReduceOp::Sum, img_nll, &[1], false)?;
    let tokens_bpd = m.add(sum_img, noise_nll)?;
    let tokens_bpd = m.g.mul_scalar(tokens_bpd, 1.0 / (subpixels * ln2))?;
    let ld = m.g.mul_scalar(e.logdet, 1.0 / subpixels)?;
    let c = m.g.scalar(DType::F32, -(127.5f64).ln())?;
    let ld = m.add(ld, c)?;
    let logdet_bpd = m.g.mul_scalar(ld, 1.0 / ln2)?;
    let image_bpd = m.g.binary(BinaryOp::Sub, tokens_bpd, logdet_bpd)?;
    m.g.output("text_token_nll", tok_nll);
    m.g.output("nll_text", nll_text);
    m.g.output("image_token_nll", img_nll);
    m.g.output("noise_nll", noise_nll);
    m.g.output("nll_image_tokens_bpd", tokens_bpd);
    m.g.output("logdet_bpd", logdet_bpd);
    m.g.output("nll_image_bpd", image_bpd);
    Ok(())
}

/// Teacher-forced image-to-text scoring of sampled text (`sample_text`'s prefill
/// `[boi, image, bos]` / `[bos, image]`, every text token real): the head inputs at the text
/// rows and the log-probabilities under the unmodified softmax.
fn score_text_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims) -> Result<()> {
    let table = table(m, cfg)?;
    let tokens = m.g.input("image_tokens", DType::F32, &[d.b, d.n, cfg.out_dim])?;
    let text = m.g.input("text", DType::I64, &[d.b, d.t])?;
    let text_mask = f32s(m, &[d.b, d.t], 1.0)?;
    let h = teacher_forced(m, cfg, d, table, &Batch { text, text_mask, tokens, tf: None, drop: None })?;
    let lp = log_softmax(m, h.text_logits, 2)?;
    let logp = pick(m, lp, text)?;
    m.g.output("prelogits", h.text_pre);
    m.g.output("logp", logp);
    Ok(())
}
