//! Image-to-text (`predict_fns.sample_text`): the prompt `[boi, image, bos]` (without a BOI
//! `[bos, image]`, the last image token predicting the first word) prefilled into the decoder's
//! cache, then one text token per step; the programs a captioner drives.

use super::seq::{self, Dims};
use super::{aliases, declare_decoder, JetFormerConfig, P};
use crate::error::{ModelError, Result};
use crate::gemma::{self, Mode};
use crate::layers::Builder;
use crate::{Checkpoint, Profile};
use kiln_graph::{DType, Graph, NodeId, Op, TensorType};
use std::path::Path;

/// The head input `[B, S, W]` of the decoder's `[B*S, W]` rows.
fn head_rows(m: &mut Builder, cfg: &JetFormerConfig, rows: NodeId, b: usize, s: usize) -> Result<NodeId> {
    let encoded = m.g.reshape(rows, &[b, s, cfg.width])?;
    if cfg.per_modality_final_norm {
        return Ok(encoded);
    }
    seq::rms(m, "decoder/final_norm/scale", encoded, cfg.width)
}

/// `i2t_prefill`: `image_tokens [B, N, D]` in; the cache filled with the prompt, the last
/// position's `prelogits [B, 1, W]` and text `logits [B, 1, V']`.
fn prefill_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims, capacity: usize) -> Result<()> {
    let table = seq::table(m, cfg)?;
    let tokens = m.g.input("image_tokens", DType::F32, &[d.b, d.n, cfg.out_dim])?;
    let rows = m.g.reshape(tokens, &[d.b * d.n, cfg.out_dim])?;
    let img = m.dense(rows, "EmbedImage", cfg.out_dim, cfg.width)?;
    let img = m.g.reshape(img, &[d.b, d.n, cfg.width])?;
    let bos = seq::token(m, table, cfg.bos_id, d.b, cfg.width)?;
    let x = match cfg.boi_id {
        Some(id) => {
            let boi = seq::token(m, table, id, d.b, cfg.width)?;
            m.g.concat(&[boi, img, bos], 1)?
        }
        None => m.g.concat(&[bos, img], 1)?,
    };
    let p = m.g.shape(x)[1];
    let mask = seq::f32s(m, &[d.b, p], 1.0)?;
    let pos = m.g.push_source(Op::Iota { axis: 1, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, [d.b, p]))?;
    // The non-causal prefix: boi|bos and the image.
    let extra = if cfg.causal_mask_on_prefix { gemma::Extra::None } else { gemma::Extra::Prefix(gemma::prefix_len(m, d.b, d.n + 1)?) };
    let start = gemma::start_zero(m)?;
    let rows = gemma::blocks(m, &cfg.gemma(), P, x, pos, mask, start, Mode::Prefill { capacity }, extra, None)?;
    let h = head_rows(m, cfg, rows, d.b, p)?;
    let last = m.g.slice(h, 1, p - 1, p)?;
    let logits = seq::text_head(m, cfg, table, last)?;
    m.g.output("prelogits", last);
    m.g.output("logits", logits);
    Ok(())
}

/// `i2t_step`: the previous `token` (i64 `[B, 1]`) at `cache_position` (i64 `[1]`, also its
/// RoPE position: the prompt has no padding); `prelogits` and `logits [B, 1, V']`.
fn step_entry(m: &mut Builder, cfg: &JetFormerConfig, d: Dims, capacity: usize) -> Result<()> {
    let table = seq::table(m, cfg)?;
    let token = m.g.input("token", DType::I64, &[d.b, 1])?;
    let at = m.g.input("cache_position", DType::I64, &[1])?;
    let qi = m.g.push(Op::Cast { to: DType::F32 }, &[at])?;
    let pos = m.g.reshape(qi, &[1, 1])?;
    let pos = m.g.push(Op::Broadcast { shape: vec![d.b, 1] }, &[pos])?;
    let mask = seq::f32s(m, &[d.b, capacity], 1.0)?;
    let x = m.g.push(Op::Gather { axis: 0 }, &[table, token])?;
    let rows = gemma::blocks(m, &cfg.gemma(), P, x, pos, mask, at, Mode::Decode { capacity }, gemma::Extra::None, Some(at))?;
    let h = head_rows(m, cfg, rows, d.b, 1)?;
    let logits = seq::text_head(m, cfg, table, h)?;
    m.g.output("prelogits", h);
    m.g.output("logits", logits);
    Ok(())
}

/// A captioner's graphs for `batch` images and `decode_len` tokens: `encode`, `i2t_prefill`,
/// `i2t_step` over a cache of prompt + `decode_len` - 1 slots; its states; the config.
#[allow(clippy::type_complexity)]
pub fn build_captioner(
    dir: &Path,
    batch: usize,
    decode_len: usize,
) -> Result<(Vec<(String, Graph)>, Vec<(String, kiln_graph::TensorType)>, JetFormerConfig, Dims)> {
    let cfg = JetFormerConfig::from_file(&dir.join("config.json"))?;
    if cfg.num_vocab_repeats > 1 {
        return Err(ModelError::Unsupported(format!(
            "num_vocab_repeats {}: big_vision's text sampler is degenerate with repeated vocabularies (it feeds back one embedding of R); kiln does not sample text from such a model",
            cfg.num_vocab_repeats
        )));
    }
    if decode_len == 0 {
        return Err(ModelError::Unsupported("a caption of 0 tokens".into()));
    }
    let mut ck = Checkpoint::open(dir)?;
    declare_decoder(&cfg, &mut ck);
    ck.aliases = aliases(&cfg, &ck)?;
    let d = Dims::new(&cfg, &Profile { batch, ..Profile::default() })?;
    let capacity = d.n + 1 + usize::from(cfg.boi_id.is_some()) + decode_len - 1;
    let mut entries = vec![];
    for name in ["encode", "i2t_prefill", "i2t_step"] {
        let mut m = Builder::new(&ck, DType::F32);
        match name {
            "i2t_prefill" => prefill_entry(&mut m, &cfg, d, capacity)?,
            "i2t_step" => step_entry(&mut m, &cfg, d, capacity)?,
            _ => seq::entry(&mut m, &cfg, d, name)?,
        }
        entries.push((name.to_string(), m.g));
    }
    let states = gemma::cache_states(&cfg.gemma(), batch, capacity, DType::F32);
    Ok((entries, states, cfg, d))
}
