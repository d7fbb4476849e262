//! Text-to-image: the sampler's sequence (`sample_image_latents`: the prompt `[bos, text,
//! (boi)]` right-aligned, then one image token per step over a KV cache), its teacher-forced
//! re-scoring (`score_image_samples`) and the two programs a sampler drives, `t2i_prefill` and
//! `t2i_step`, over the decoder's cache.

use super::seq::{self, Dims, Seq};
use super::{JetFormerConfig, P};
use crate::error::Result;
use crate::gemma::{self, Mode};
use crate::layers::Builder;
use kiln_graph::{BinaryOp, DType, NodeId, Op, ReduceOp, TensorType};

/// Text-to-image scoring of sampled image tokens as `sample_image_latents` computes them: the
/// prompt right-aligned (`right_align`: padding first, positions counting real tokens), then
/// the tokens fed back; the head inputs predicting each token and its log-density under the
/// temperature-modified mixture.
pub(super) fn score_image_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims) -> Result<()> {
    let table = seq::table(m, cfg)?;
    let (text, text_mask) = seq::text_inputs(m, d)?;
    let tokens = m.g.input("image_tokens", DType::F32, &[d.b, d.n, cfg.out_dim])?;
    let t = m.g.input("temperature", DType::F32, &[1])?;
    let tp = m.g.input("temperature_probs", DType::F32, &[1])?;
    let (prefix, pmask) = prompt(m, cfg, d, table, (text, text_mask), None)?;
    let p = m.g.shape(prefix)[1];
    let (x, mask) = align(m, d, prefix, pmask)?;
    let (x, mask) = if d.n > 1 {
        let fed = m.g.slice(tokens, 1, 0, d.n - 1)?;
        let e = embed_image(m, cfg, fed)?;
        let ones = seq::f32s(m, &[d.b, d.n - 1], 1.0)?;
        (m.g.concat(&[x, e], 1)?, m.g.concat(&[mask, ones], 1)?)
    } else {
        (x, mask)
    };
    let extra = prefix_extra(m, cfg, d.b, p)?;
    let trunk = seq::trunk(m, cfg, &Seq { x, mask, extra })?;
    let h = seq::head_input(cfg, &trunk);
    let pre = m.g.slice(h, 1, p - 1, p - 1 + d.n)?;
    let logits = seq::image_head(m, cfg, pre)?;
    let g = seq::gmm(m, cfg, logits, Some((t, tp)))?;
    let logp = seq::gmm_log_prob(m, &g, tokens)?;
    m.g.output("prelogits", pre);
    m.g.output("logp", logp);
    Ok(())
}

/// `EmbedImage` on `[B, n, D]` tokens: `[B, n, W]`.
fn embed_image(m: &mut Builder, cfg: &JetFormerConfig, tokens: NodeId) -> Result<NodeId> {
    let s = m.g.shape(tokens).to_vec();
    let rows = m.g.reshape(tokens, &[s[0] * s[1], cfg.out_dim])?;
    let e = m.dense(rows, "EmbedImage", cfg.out_dim, cfg.width)?;
    Ok(m.g.reshape(e, &[s[0], s[1], cfg.width])?)
}

/// The text-to-image prompt `[bos, text R times, (boi)]` and its f32 mask (`shift=False`, no
/// image); rows with `drop` set have every text slot the nolabel token, all real (the
/// unconditional half of classifier-free guidance).
fn prompt(
    m: &mut Builder,
    cfg: &JetFormerConfig,
    d: Dims,
    table: NodeId,
    text: (NodeId, NodeId),
    drop: Option<NodeId>,
) -> Result<(NodeId, NodeId)> {
    let w = cfg.width;
    let mut x_txt = seq::embed_text(m, cfg, table, text.0)?;
    let mut m_txt = seq::tile(m, cfg, text.1)?;
    if let (Some(drop), Some(id)) = (drop, cfg.nolabel_id) {
        let nolabel = seq::nolabel_text(m, cfg, table, id, d)?;
        let ones = seq::f32s(m, &[d.b, d.t * cfg.num_vocab_repeats], 1.0)?;
        x_txt = seq::select_rows(m, drop, nolabel, x_txt)?;
        m_txt = seq::select_rows(m, drop, ones, m_txt)?;
    }
    let one = seq::f32s(m, &[d.b, 1], 1.0)?;
    let bos = seq::token(m, table, cfg.bos_id, d.b, w)?;
    let (mut xs, mut ms) = (vec![bos, x_txt], vec![one, m_txt]);
    if let Some(id) = cfg.boi_id {
        xs.push(seq::token(m, table, id, d.b, w)?);
        ms.push(one);
    }
    Ok((m.g.concat(&xs, 1)?, m.g.concat(&ms, 1)?))
}

/// `right_align`: the real tokens of `x [B, P, W]` moved to the end in order (a one-hot
/// permutation, as big_vision computes it), and the aligned f32 mask.
fn align(m: &mut Builder, d: Dims, x: NodeId, mask: NodeId) -> Result<(NodeId, NodeId)> {
    let (b, p) = (d.b, m.g.shape(x)[1]);
    let seqlen = m.g.reduce(ReduceOp::Sum, mask, &[1], true)?;
    let cum = m.g.push(Op::CumSum { axis: 1, exclusive: false }, &[mask])?;
    // x_pos = (P - seqlen + cumsum) * mask - 1: the slot each real token moves to (-1: none).
    let pc = m.g.scalar(DType::F32, p as f64)?;
    let start = m.g.binary(BinaryOp::Sub, pc, seqlen)?;
    let pos = m.add(start, cum)?;
    let pos = m.g.mul(pos, mask)?;
    let one = m.g.scalar(DType::F32, 1.0)?;
    let pos = m.g.binary(BinaryOp::Sub, pos, one)?;
    let pos = m.g.reshape(pos, &[b, p, 1])?;
    let slots = m.g.push_source(Op::Iota { axis: 2, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, [1, 1, p]))?;
    let hit = m.g.binary(BinaryOp::Eq, pos, slots)?;
    let perm = m.g.push(Op::Cast { to: DType::F32 }, &[hit])?;
    let perm = m.g.permute(perm, &[0, 2, 1])?;
    let x = m.g.matmul(perm, x, false)?;
    let slots = m.g.push_source(Op::Iota { axis: 1, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, [1, p]))?;
    let real = m.g.binary(BinaryOp::Ge, slots, start)?;
    Ok((x, m.g.push(Op::Cast { to: DType::F32 }, &[real])?))
}

/// Without `causal_mask_on_prefix`: every query of an `l`-long sequence also sees the aligned
/// prompt's bos + text slots (all of its `p` but a final boi).
fn prefix_extra(m: &mut Builder, cfg: &JetFormerConfig, b: usize, p: usize) -> Result<Option<NodeId>> {
    if cfg.causal_mask_on_prefix {
        return Ok(None);
    }
    let end = p - usize::from(cfg.boi_id.is_some());
    Ok(Some(gemma::prefix_len(m, b, end)?))
}

/// The prompt's length P for a profile's text length.
pub fn prompt_len(cfg: &JetFormerConfig, t: usize) -> usize {
    1 + t * cfg.num_vocab_repeats + usize::from(cfg.boi_id.is_some())
}

/// The head input `[B, S, W]` from the decoder's `[B*S, W]` rows.
fn head_rows(m: &mut Builder, cfg: &JetFormerConfig, rows: NodeId, b: usize, s: usize) -> Result<NodeId> {
    let encoded = m.g.reshape(rows, &[b, s, cfg.width])?;
    if cfg.per_modality_final_norm {
        return Ok(encoded);
    }
    seq::rms(m, "decoder/final_norm/scale", encoded, cfg.width)
}

/// `t2i_prefill`: `text`, `text_mask` (and `drop_prefix` with a nolabel token) in; the cache
/// (capacity slots) filled with the right-aligned prompt, the aligned mask `prompt_mask [B, P]`,
/// and the last position's `prelogits [B, 1, W]` and raw image-head `logits [B, 1, K]`.
pub(super) fn prefill_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims, capacity: usize) -> Result<()> {
    let table = seq::table(m, cfg)?;
    let (text, text_mask) = seq::text_inputs(m, d)?;
    let drop = cfg.nolabel_id.map(|_| seq::flag(m, "drop_prefix", &[d.b])).transpose()?;
    let (prefix, pmask) = prompt(m, cfg, d, table, (text, text_mask), drop)?;
    let p = m.g.shape(prefix)[1];
    let (x, mask) = align(m, d, prefix, pmask)?;
    let extra = prefix_extra(m, cfg, d.b, p)?;
    let extra = extra.map_or(gemma::Extra::None, gemma::Extra::Prefix);
    let c = m.g.push(Op::CumSum { axis: 1, exclusive: false }, &[mask])?;
    let one = m.g.scalar(DType::F32, 1.0)?;
    let pos = m.g.binary(BinaryOp::Sub, c, one)?;
    let start = gemma::start_zero(m)?;
    let rows = gemma::blocks(m, &cfg.gemma(), P, x, pos, mask, start, Mode::Prefill { capacity }, extra, None)?;
    let h = head_rows(m, cfg, rows, d.b, p)?;
    let last = m.g.slice(h, 1, p - 1, p)?;
    let logits = seq::image_head(m, cfg, last)?;
    m.g.output("prompt_mask", mask);
    m.g.output("prelogits", last);
    m.g.output("logits", logits);
    Ok(())
}

/// `t2i_step` (`extend_cache`): the previous image `token [B, 1, D]` at `cache_position` (i64
/// `[1]`) with its RoPE `position [B, 1]` (f32) over the cache slots `attention_mask [B, C]`
/// (f32, 1 = real); the new `prelogits` and `logits [B, 1, K]`.
pub(super) fn step_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims, capacity: usize) -> Result<()> {
    let token = m.g.input("token", DType::F32, &[d.b, 1, cfg.out_dim])?;
    let mask = m.g.input("attention_mask", DType::F32, &[d.b, capacity])?;
    let pos = m.g.input("position", DType::F32, &[d.b, 1])?;
    let at = m.g.input("cache_position", DType::I64, &[1])?;
    let x = embed_image(m, cfg, token)?;
    let rows = gemma::blocks(m, &cfg.gemma(), P, x, pos, mask, at, Mode::Decode { capacity }, gemma::Extra::None, Some(at))?;
    let h = head_rows(m, cfg, rows, d.b, 1)?;
    let logits = seq::image_head(m, cfg, h)?;
    m.g.output("prelogits", h);
    m.g.output("logits", logits);
    Ok(())
}
