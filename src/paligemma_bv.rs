//! `kiln generate` for big_vision PaliGemma folders (`proj.paligemma.paligemma`) with the
//! official decode loop's inputs and outputs (PALIGEMMA_BV.md §4, `predict_fns.py`): `images
//! [B, H, W, 3]` in [-1, 1], left-aligned prompts `text`, `mask_ar`, `mask_input` `[B, T]` and an
//! optional `eos_token [1]` (default 1) in; `sequences [B, N]` (the generated tokens only, greedy,
//! rows decoding past their own EOS until every row has produced one; slots never reached stay
//! 0) and `logprobs [B, N]` (each chosen token's log-probability, uncapped at step 0 and
//! soft-capped after, as big_vision computes them, P1) out.
//!
//! The prompt is laid out as the Hugging Face PaliGemma programs take it, which is what
//! big_vision's `_left_to_right_align` does: image slots then the real tokens, right-aligned,
//! positions counted from 0 over the real tokens, `mask_ar` as the token types (0 prefix, 1
//! suffix). That layout expresses `make_attn_mask` exactly when each prompt's `mask_ar` is
//! zeros then ones; other prompts are refused.

use crate::generate::{Generator, Prompt};
use crate::{Error, Result};
use kiln_graph::DType;
use kiln_runtime::Tensor;
use std::path::Path;

/// Whether the folder is a big_vision PaliGemma.
pub fn is_big_vision_paligemma(dir: &Path) -> bool {
    kiln_models::registry::family_of(&dir.join("config.json")).is_ok_and(|f| f.name == "paligemma-bv")
}

/// Runs the official greedy loop for `max_new_tokens` steps on `ins`; returns the outputs.
pub fn generate(dir: &Path, ins: &[(String, Tensor)], max_new_tokens: usize, backend: &str, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let get = |n: &str| ins.iter().find(|(name, _)| name == n).map(|(_, t)| t);
    let need = |n: &str| {
        get(n).ok_or_else(|| {
            Error::Usage(format!("a big_vision PaliGemma generates from images, text, mask_ar and mask_input: '{n}' is missing"))
        })
    };
    let images = need("images")?;
    let text = need("text")?;
    let [b, t] = text.ty.shape[..] else { return Err(Error::Usage(format!("text is {}, expected [batch, length]", text.ty))) };
    let ints = |n: &str| -> Result<Vec<i64>> {
        let x = need(n)?;
        if x.ty.shape != [b, t] || x.ty.dtype.is_float() {
            return Err(Error::Usage(format!("'{n}' is {}; expected integers [{b}, {t}] like text", x.ty)));
        }
        Ok(x.to_f64().iter().map(|&v| v as i64).collect())
    };
    let (text, mask_ar, mask_input) = (ints("text")?, ints("mask_ar")?, ints("mask_input")?);
    let eos = match get("eos_token") {
        Some(e) if e.ty.numel() == 1 && !e.ty.dtype.is_float() => e.to_f64()[0] as i64,
        Some(e) => return Err(Error::Usage(format!("eos_token is {}; expected one integer", e.ty))),
        None => 1,
    };
    let [ib, h, w, 3] = images.ty.shape[..] else { return Err(Error::Usage(format!("images is {}, expected [B, H, W, 3]", images.ty))) };
    if ib != b || h != w {
        return Err(Error::Usage(format!("images is {}: expected {b} square images (text has {b} rows)", images.ty)));
    }
    // Each row: its real tokens (a left-aligned run of mask_input 1), and their types.
    let mut rows = Vec::with_capacity(b);
    for r in 0..b {
        let m = &mask_input[r * t..(r + 1) * t];
        let n = m.iter().take_while(|&&x| x != 0).count();
        if m[n..].iter().any(|&x| x != 0) {
            return Err(Error::Usage(format!("row {r}: mask_input is not left-aligned (real tokens first, then padding)")));
        }
        let ar = &mask_ar[r * t..r * t + n];
        let zeros = ar.iter().take_while(|&&x| x == 0).count();
        if ar[zeros..].iter().any(|&x| x != 1) {
            return Err(Error::Usage(format!(
                "row {r}: mask_ar {ar:?} is not zeros then ones; kiln's generation takes a prefix and a causal suffix"
            )));
        }
        rows.push((text[r * t..r * t + n].to_vec(), ar.to_vec()));
    }
    let cfg_path = dir.join("config.json");
    let cfg = kiln_models::big_vision::paligemma::read(&cfg_path, &kiln_models::Checkpoint::open(dir)?, Some((h, w)))?;
    let (img_id, slots) = (cfg.image_token_index, cfg.vision.grid() * cfg.vision.grid());
    let len = slots + rows.iter().map(|(x, _)| x.len()).max().unwrap_or(0);
    let mut g = Generator::with_dtype(dir, b, len, max_new_tokens, backend, dtype)?;
    g.meta.eos = vec![eos];
    let (mut ids, mut mask, mut types) = (vec![0i64; b * len], vec![0i64; b * len], vec![0i64; b * len]);
    for (r, (x, ar)) in rows.iter().enumerate() {
        let start = r * len + len - slots - x.len();
        ids[start..start + slots].fill(img_id);
        ids[start + slots..(r + 1) * len].copy_from_slice(x);
        mask[start..(r + 1) * len].fill(1);
        types[start + slots..(r + 1) * len].copy_from_slice(ar);
    }
    let px = nchw(images);
    let prompt = Prompt { input_ids: &ids, attention_mask: &mask, token_type_ids: Some(&types), len };
    let out = g.generate_prompt(&prompt, max_new_tokens, Some(&px), &mut |_| Ok(()))?;
    let width = len + out.new_tokens;
    let mut seqs = vec![0i64; b * max_new_tokens];
    let mut logprobs = vec![0f32; b * max_new_tokens];
    for r in 0..b {
        for k in 0..out.new_tokens {
            seqs[r * max_new_tokens + k] = out.sequences[r * width + len + k];
            // Every row decodes to the end (big_vision's loop), so each log-probability is the
            // chosen token's log-softmax.
            logprobs[r * max_new_tokens + k] = out.logprobs[r * out.new_tokens + k];
        }
    }
    Ok(vec![
        ("sequences".into(), Tensor::from_i64(&[b, max_new_tokens], &seqs)),
        ("logprobs".into(), Tensor::from_f32(&[b, max_new_tokens], &logprobs)),
    ])
}

/// `images [B, H, W, C]` as `pixel_values [B, C, H, W]` (f32).
fn nchw(images: &Tensor) -> Tensor {
    let s = &images.ty.shape;
    let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
    let x = images.to_f32();
    let mut y = vec![0f32; x.len()];
    for i in 0..b {
        for ch in 0..c {
            for p in 0..h * w {
                y[((i * c + ch) * h * w) + p] = x[(i * h * w + p) * c + ch];
            }
        }
    }
    Tensor::from_f32(&[b, c, h, w], &y)
}

/// big_vision PaliGemma's `forward`: `mask_ar` and `mask_input` default as `Model.__call__`'s
/// do (every text token causal, every token real); integer inputs of another width are read as
/// i64.
pub fn text_defaults(ins: &mut Vec<(String, Tensor)>, s: &kiln_runtime::Session) {
    let Some(e) = s.program().entry("forward") else { return };
    if !e.inputs.iter().any(|io| io.name == "mask_ar") {
        return;
    }
    for (name, t) in ins.iter_mut() {
        if matches!(name.as_str(), "text" | "mask_ar" | "mask_input") && !t.ty.dtype.is_float() && t.ty.dtype != DType::I64 {
            *t = Tensor::from_i64(&t.ty.shape.clone(), &t.to_f64().iter().map(|&x| x as i64).collect::<Vec<_>>());
        }
    }
    let Some(shape) = ins.iter().find(|(n, _)| n == "text").map(|(_, t)| t.ty.shape.clone()) else { return };
    for name in ["mask_ar", "mask_input"] {
        if !ins.iter().any(|(n, _)| n == name) {
            ins.push((name.into(), Tensor::from_i64(&shape, &vec![1; shape.iter().product()])));
        }
    }
}

/// `kiln generate --prompt --image` for a big_vision folder, as the official transfer configs
/// prepare an example: the image decoded, resized to the tower's size with TensorFlow's
/// bilinear `tf.image.resize` (half-pixel centres, no antialiasing; `pp/ops_image.py` `resize`),
/// mapped to [-1, 1] (`value_range(-1, 1)`); the text `[BOS] + tok(prompt) + tok("\n")`, the
/// separator tokenized on its own (`configs/proj/paligemma/transfers/common.py`), after the
/// image slots. Every prompt token is prefix.
pub fn prepare(
    p: &kiln_models::paligemma::PaliGemmaConfig,
    tok: &crate::tokenizer::TextTokenizer,
    prompt: &str,
    image: &Path,
) -> Result<crate::prompt::Prepared> {
    let v = &p.vision;
    let img = crate::preprocess::load_image(image, true)?;
    let s = v.image_size;
    let resized = bilinear(&img, s, s);
    let px: Vec<f32> = (0..3).flat_map(|c| (0..s * s).map(move |i| (c, i))).map(|(c, i)| resized[i * 3 + c] / 127.5 - 1.0).collect();
    let mut ids = vec![p.image_token_index; v.grid() * v.grid()];
    ids.push(p.text.bos_token_id.unwrap_or(2));
    ids.extend(tok.encode(prompt)?);
    ids.extend(tok.encode("\n")?);
    Ok(crate::prompt::Prepared { input_ids: ids, pixel_values: Some(Tensor::from_f32(&[1, 3, s, s], &px)), image: Some(img) })
}

/// `tf.image.resize(method="bilinear", antialias=False)` of an RGB image to `h x w`
/// ([`crate::uvim_heads::tf_resize`]). Values stay in 0..255 (f32).
pub fn bilinear(img: &crate::preprocess::Rgb, h: usize, w: usize) -> Vec<f32> {
    let px: Vec<f32> = img.pixels.iter().map(|&v| v as f32).collect();
    crate::uvim_heads::tf_resize(&px, (img.height, img.width), (h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_is_tensorflows_half_pixel_resize() {
        // tf.image.resize([[[0], [255]]] as 1x2, (1, 4), "bilinear") = [0, 63.75, 191.25, 255];
        // down to one pixel it samples the centre: the mean of the two.
        let img = crate::preprocess::Rgb { width: 2, height: 1, pixels: vec![0, 0, 0, 255, 255, 255] };
        let up: Vec<f32> = bilinear(&img, 1, 4).chunks(3).map(|p| p[0]).collect();
        assert_eq!(up, [0.0, 63.75, 191.25, 255.0]);
        assert_eq!(bilinear(&img, 1, 1)[0], 127.5);
        assert_eq!(bilinear(&img, 1, 2), [0.0, 0.0, 0.0, 255.0, 255.0, 255.0]);
    }
}
