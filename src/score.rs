//! `kiln score`: the log-probabilities a model gives given tokens, teacher-forced, from one
//! forward pass (the reference's logits, log-softmaxed in double precision and gathered).
//!
//! - Causal LMs (Gemma, Gemma 2, PaliGemma; inputs `input_ids [B, L]`): token `t` is scored by
//!   the logits at `t - 1`, for `prompt_len <= t < L` (`prompt_len` at least 1), where the
//!   attention mask is 1 at `t` and at `t - 1`.
//! - Encoder-decoders (CapPa, UViM VTT; inputs `images`, `text [B, L]`): `logits[:, t]`
//!   predicts `text[:, t]` (the decoder shifts right itself), for `t >= prompt_len` where the
//!   token is not 0 (padding), as big_vision's captioner scoring sums them.
//!
//! `prompt_len` is an optional input, `[1]` or `[B]` (default 1 for causal LMs, 0 for
//! encoder-decoders). Outputs: `logprobs [B, L]` (0 where not scored) and `scores [B]`, their sums.

use crate::{Error, Result};
use kiln_runtime::Tensor;

/// Which tokens the logits at each position predict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `logits[t - 1]` predicts `tokens[t]`.
    Causal,
    /// `logits[t]` predicts `tokens[t]`; token 0 is padding.
    Shifted,
}

/// `(logprobs [B, L], scores [B])` of `tokens [B, L]` under `logits [B, L, V]`.
pub fn score(
    logits: &[f32],
    tokens: &[i64],
    mask: Option<&[i64]>,
    (b, l, v): (usize, usize, usize),
    prompt_len: &[usize],
    layout: Layout,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if logits.len() != b * l * v || tokens.len() != b * l || prompt_len.len() != b {
        return Err(Error::Usage(format!(
            "score: logits {} / tokens {} / prompt_len {} for [{b}, {l}, {v}]",
            logits.len(),
            tokens.len(),
            prompt_len.len()
        )));
    }
    let mut lp = vec![0f32; b * l];
    let mut scores = vec![0f32; b];
    for r in 0..b {
        let mut sum = 0f64;
        for t in prompt_len[r]..l {
            let (at, tok) = match layout {
                Layout::Causal if t == 0 => continue,
                Layout::Causal => (t - 1, tokens[r * l + t]),
                Layout::Shifted => (t, tokens[r * l + t]),
            };
            // Causal: the token and the one before it must be real (not left padding).
            let masked = |i: usize| mask.is_some_and(|m| m[r * l + i] == 0);
            if (layout == Layout::Shifted && tok == 0) || masked(t) || (layout == Layout::Causal && masked(at)) {
                continue;
            }
            if tok < 0 || tok as usize >= v {
                return Err(Error::Usage(format!("token {tok} at [{r}, {t}] is outside the vocabulary 0..{v}")));
            }
            let row = &logits[(r * l + at) * v..][..v];
            let x = row[tok as usize] as f64 - crate::sampling::log_sum_exp(row);
            lp[r * l + t] = x as f32;
            sum += x;
        }
        scores[r] = sum as f32;
    }
    Ok((lp, scores))
}

/// The `prompt_len` input as one value per row (`default` when absent).
pub fn prompt_lens(t: Option<&Tensor>, b: usize, default: usize) -> Result<Vec<usize>> {
    match t {
        None => Ok(vec![default; b]),
        Some(t) => {
            let v: Vec<usize> = t.to_f64().iter().map(|&x| x.max(0.0) as usize).collect();
            match v.len() {
                1 => Ok(vec![v[0]; b]),
                n if n == b => Ok(v),
                n => Err(Error::Usage(format!("prompt_len: {n} values for {b} rows (give 1 or {b})"))),
            }
        }
    }
}
