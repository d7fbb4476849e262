//! JetFormer text-to-image sampling (`predict_fns.sample_image_latents` + `train.py`
//! `sample_images_fn`), and the `kiln run` conveniences for JetFormer entries.
//!
//! The decoder runs as a compiled prefill (the right-aligned prompt into a static KV cache) and
//! one compiled step per image token (`extend_cache`); drawing from the mixture head happens
//! here, on the host, in f64 from the step's raw head logits:
//! - without guidance: a component from `softmax(mix · temperature_probs)`, then
//!   `loc + scale · temperature · ε`; `logp` is the temperature-modified mixture's log-density;
//! - with guidance weight w (`parallel_decode.CFGDensity`): rows are `[cond, uncond]` pairs
//!   (uncond = `drop_prefix`: the nolabel prompt), one component drawn from the conditional
//!   mixture and used for both, then per dimension rejection sampling from
//!   `N_c^(1+w) / N_u^w` (1000 proposals from `N(loc_c, 2 max(σ_c, σ_u))` under the envelope
//!   big_vision computes on 1001 grid points), falling back to a conditional draw; `logp` is the
//!   unnormalised `Σ_d (1+w) log N_c - w log N_u`.
//!
//! The factored-out dimensions get fresh N(0, 1) noise and the `decode` entry inverts the flow.
//! Randomness is kiln's own (big_vision's JAX keys cannot be reproduced): every draw is a
//! counter-based splitmix64 value of (seed, stream, image, token, index), so an image depends
//! only on the seed, its prompt and its position in the batch, never on the backend's
//! scheduling.

use crate::sampling::HfSampling;
use crate::{compile_with_states, CompileOptions, Error, Result};
use kiln_graph::program::StateSpec;
use kiln_graph::DType;
use kiln_models::big_vision::jetformer::{self, JetFormerConfig};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The sampler's settings (`sample_image_latents`' keyword arguments, and kiln's seed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct T2iOptions {
    /// Multiplies every component's scale.
    pub temperature: f64,
    /// Multiplies the mixture logits (> 1 sharpens).
    pub temperature_probs: f64,
    /// Classifier-free guidance weight (0: none).
    pub cfg_weight: f64,
    pub seed: u64,
}

/// What one call draws, per image: tokens `[B, N, D]`, their `logp [B, N]` and the head inputs
/// that predicted them `[B, N, W]`, the noise `[B, N, C - D]` and the decoded `images [B, H, W, 3]`.
pub struct T2iSamples {
    pub tokens: Vec<f32>,
    pub logp: Vec<f32>,
    pub prelogits: Vec<f32>,
    pub noise: Vec<f32>,
    pub images: Tensor,
    /// Seconds in the decoder (prefill and steps) and in the flow's inverse (`decode`).
    pub decoder_s: f64,
    pub flow_s: f64,
}

/// A compiled text-to-image sampler for `images` prompts of `text_len` tokens.
pub struct T2iSampler {
    session: Session,
    cfg: JetFormerConfig,
    images: usize,
    guided: bool,
    text_len: usize,
    n: usize,
    prompt_len: usize,
    capacity: usize,
    noise_dim: usize,
}

impl T2iSampler {
    /// Compiles the sampler of the folder `dir` on `backend`; `guided` doubles the rows for
    /// classifier-free guidance (the model needs a nolabel token).
    pub fn new(dir: &Path, images: usize, text_len: usize, guided: bool, backend: &str) -> Result<Self> {
        let rows = if guided { 2 * images } else { images };
        let s = jetformer::build_sampler(dir, rows, images, text_len, None)?;
        if guided && s.cfg.nolabel_id.is_none() {
            return Err(Error::Usage("classifier-free guidance needs the model's nolabel_id (it is None)".into()));
        }
        let states = s.states.iter().map(|(name, ty)| StateSpec { name: name.clone(), ty: ty.clone() }).collect();
        let profile = kiln_models::Profile { batch: rows, seq_len: Some(text_len), ..kiln_models::Profile::default() };
        let opts = CompileOptions { profile, backend: backend.to_string(), trace: false };
        let program = compile_with_states(&s.entries, &s.description, &dir.display().to_string(), states, &opts)?.program;
        let session = Session::new(program, Arc::new(WeightStore::open(dir)?))?;
        let noise_dim = s.cfg.latent_noise_dim;
        Ok(T2iSampler {
            session,
            images,
            guided,
            text_len,
            n: s.dims.n,
            prompt_len: s.prompt_len,
            capacity: s.capacity,
            noise_dim,
            cfg: s.cfg,
        })
    }

    /// Draws one image per prompt: `text` i64 `[B, T]` and `text_mask` `[B, T]` (1 = real).
    pub fn sample(&mut self, text: &[i64], text_mask: &[u8], o: &T2iOptions) -> Result<T2iSamples> {
        let (b, t, n, d, w) = (self.images, self.text_len, self.n, self.cfg.out_dim, self.cfg.width);
        if text.len() != b * t || text_mask.len() != b * t {
            return Err(Error::Usage(format!(
                "{} prompt ids and {} mask values for {b} prompts of {t} tokens",
                text.len(),
                text_mask.len()
            )));
        }
        if !(o.temperature >= 0.0 && o.temperature_probs.is_finite() && o.cfg_weight.is_finite()) {
            return Err(Error::Usage(format!("sampler settings {o:?}: temperatures must be finite and >= 0")));
        }
        let rep = if self.guided { 2 } else { 1 };
        let rows = b * rep;
        let row_text: Vec<i64> = (0..rows).flat_map(|r| text[(r / rep) * t..(r / rep + 1) * t].to_vec()).collect();
        let row_mask: Vec<u8> = (0..rows).flat_map(|r| text_mask[(r / rep) * t..(r / rep + 1) * t].to_vec()).collect();
        let drop: Vec<u8> = (0..rows).map(|r| u8::from(rep == 2 && r % 2 == 1)).collect();
        let t0 = Instant::now();
        self.session.reset_states()?;
        let text_t = Tensor::from_i64(&[rows, t], &row_text);
        let mask_t = u8_tensor(&[rows, t], &row_mask);
        let drop_t = u8_tensor(&[rows], &drop);
        let mut ins: Vec<(&str, &Tensor)> = vec![("text", &text_t), ("text_mask", &mask_t)];
        if self.cfg.nolabel_id.is_some() {
            ins.push(("drop_prefix", &drop_t));
        }
        let outs = self.session.run("t2i_prefill", &ins)?;
        let p = self.prompt_len;
        let prompt_mask = get(&outs, "prompt_mask")?.to_f32();
        let mut am = vec![1f32; rows * self.capacity];
        let mut seqlen = vec![0f32; rows];
        for r in 0..rows {
            am[r * self.capacity..r * self.capacity + p].copy_from_slice(&prompt_mask[r * p..(r + 1) * p]);
            seqlen[r] = prompt_mask[r * p..(r + 1) * p].iter().sum();
        }
        let am_t = Tensor::from_f32(&[rows, self.capacity], &am);
        let (mut logits, mut pre) = (get(&outs, "logits")?.to_f32(), get(&outs, "prelogits")?.to_f32());
        let k = self.cfg.num_logits();
        let (mut tokens, mut logp, mut prelogits) = (vec![0f32; b * n * d], vec![0f32; b * n], vec![0f32; b * n * w]);
        for i in 0..n {
            let mut step_tokens = vec![0f32; rows * d];
            for img in 0..b {
                let cond = &logits[img * rep * k..(img * rep + 1) * k];
                let mix = |l: &[f32]| Mixture::new(&self.cfg, l, o.temperature, o.temperature_probs);
                let draw = Draw { seed: o.seed, image: img as u64, token: i as u64 };
                let (x, lp) = if self.guided {
                    let uncond = &logits[(img * 2 + 1) * k..(img * 2 + 2) * k];
                    cfg_sample(&mix(cond), &mix(uncond), o.cfg_weight, &draw)
                } else {
                    mix(cond).sample(&draw)
                };
                for (j, v) in x.iter().enumerate() {
                    tokens[(img * n + i) * d + j] = *v as f32;
                }
                logp[img * n + i] = lp as f32;
                let src = &pre[img * rep * w..(img * rep + 1) * w];
                prelogits[(img * n + i) * w..(img * n + i + 1) * w].copy_from_slice(src);
                for r in 0..rep {
                    let row = img * rep + r;
                    step_tokens[row * d..(row + 1) * d].copy_from_slice(&tokens[(img * n + i) * d..(img * n + i + 1) * d]);
                }
            }
            if i + 1 == n {
                break;
            }
            let token_t = Tensor::from_f32(&[rows, 1, d], &step_tokens);
            let pos: Vec<f32> = seqlen.iter().map(|s| s + i as f32).collect();
            let pos_t = Tensor::from_f32(&[rows, 1], &pos);
            let at_t = Tensor::from_i64(&[1], &[(p + i) as i64]);
            let ins = [("token", &token_t), ("attention_mask", &am_t), ("position", &pos_t), ("cache_position", &at_t)];
            let outs = self.session.run("t2i_step", &ins)?;
            logits = get(&outs, "logits")?.to_f32();
            pre = get(&outs, "prelogits")?.to_f32();
        }
        let decoder_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let noise: Vec<f32> = (0..b * n * self.noise_dim)
            .map(|idx| normal(&Draw { seed: o.seed, image: (idx / (n * self.noise_dim)) as u64, token: u64::MAX }, 1, idx as u64) as f32)
            .collect();
        let tokens_t = Tensor::from_f32(&[b, n, d], &tokens);
        let noise_t = Tensor::from_f32(&[b, n, self.noise_dim], &noise);
        let mut ins = vec![("image_tokens", &tokens_t)];
        if self.noise_dim > 0 {
            ins.push(("noise", &noise_t));
        }
        let outs = self.session.run("decode", &ins)?;
        let images = get(&outs, "images")?.clone();
        Ok(T2iSamples { tokens, logp, prelogits, noise, images, decoder_s, flow_s: t1.elapsed().as_secs_f64() })
    }
}

fn u8_tensor(shape: &[usize], v: &[u8]) -> Tensor {
    Tensor { ty: kiln_graph::TensorType::new(DType::U8, shape.to_vec()), bytes: v.to_vec() }
}

fn get<'a>(outs: &'a [(String, Tensor)], name: &str) -> Result<&'a Tensor> {
    outs.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| Error::Usage(format!("the sampler program gives no '{name}'")))
}

/// Where a draw sits: the seed, the image, the token (`u64::MAX`: the flow's noise).
struct Draw {
    seed: u64,
    image: u64,
    token: u64,
}

/// A uniform value in (0, 1] for draw `index` of `stream` at `at`.
fn uniform(at: &Draw, stream: u64, index: u64) -> f64 {
    let u = crate::encdec::uniform(
        at.seed ^ stream.wrapping_mul(0xA24B_AED4_963E_E407),
        at.image,
        at.token ^ index.wrapping_mul(0x9FB2_1C65_1E98_DF25),
    );
    1.0 - u
}

/// An N(0, 1) value (Box-Muller over two uniforms of the stream).
fn normal(at: &Draw, stream: u64, index: u64) -> f64 {
    let (u, v) = (uniform(at, stream, 2 * index), uniform(at, stream, 2 * index + 1));
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

const HALF_LOG_2PI: f64 = 0.918_938_533_204_672_8;

fn normal_log_pdf(x: f64, loc: f64, scale: f64) -> f64 {
    let z = (x - loc) / scale;
    -0.5 * z * z - scale.ln() - HALF_LOG_2PI
}

/// One token's mixture (`get_pdf` with temperatures), from the head's raw logits.
struct Mixture {
    log_w: Vec<f64>,
    loc: Vec<f64>,
    scale: Vec<f64>,
    d: usize,
}

impl Mixture {
    fn new(cfg: &JetFormerConfig, logits: &[f32], temperature: f64, temperature_probs: f64) -> Self {
        let (m, d) = (cfg.num_mixtures, cfg.out_dim);
        let mix: Vec<f64> = logits[..m].iter().map(|&x| x as f64 * temperature_probs).collect();
        let mx = mix.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + mix.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        let (mut loc, mut scale) = (Vec::with_capacity(m * d), Vec::with_capacity(m * d));
        for k in 0..m {
            let base = m + 2 * k * d;
            loc.extend(logits[base..base + d].iter().map(|&x| x as f64));
            scale.extend(logits[base + d..base + 2 * d].iter().map(|&x| {
                let x = x as f64;
                ((x + (x * x + 4.0).sqrt()) / 2.0).max(cfg.scale_tol) * temperature
            }));
        }
        Mixture { log_w: mix.iter().map(|x| x - lse).collect(), loc, scale, d }
    }

    /// A component drawn from the mixture weights.
    fn component(&self, at: &Draw) -> usize {
        let u = uniform(at, 2, 0);
        let mut acc = 0.0;
        for (k, lw) in self.log_w.iter().enumerate() {
            acc += lw.exp();
            if u <= acc {
                return k;
            }
        }
        self.log_w.len() - 1
    }

    fn log_prob(&self, x: &[f64]) -> f64 {
        let terms: Vec<f64> = (0..self.log_w.len())
            .map(|k| {
                self.log_w[k] + (0..self.d).map(|j| normal_log_pdf(x[j], self.loc[k * self.d + j], self.scale[k * self.d + j])).sum::<f64>()
            })
            .collect();
        let mx = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        mx + terms.iter().map(|t| (t - mx).exp()).sum::<f64>().ln()
    }

    fn sample(&self, at: &Draw) -> (Vec<f64>, f64) {
        let k = self.component(at);
        let x: Vec<f64> = (0..self.d).map(|j| self.loc[k * self.d + j] + self.scale[k * self.d + j] * normal(at, 3, j as u64)).collect();
        let lp = self.log_prob(&x);
        (x, lp)
    }
}

/// `CFGDensity`: the conditional mixture's component for both, then per dimension rejection
/// sampling from `N_c^(1+w) / N_u^w`; the unnormalised log-density summed over dimensions.
fn cfg_sample(c: &Mixture, u: &Mixture, w: f64, at: &Draw) -> (Vec<f64>, f64) {
    let k = c.component(at);
    let (mut x, mut lp) = (vec![0f64; c.d], 0.0);
    for (j, xj) in x.iter_mut().enumerate() {
        let (lc, sc) = (c.loc[k * c.d + j], c.scale[k * c.d + j]);
        let (lu, su) = (u.loc[k * c.d + j], u.scale[k * c.d + j]);
        let log_p = |v: f64| (1.0 + w) * normal_log_pdf(v, lc, sc) - w * normal_log_pdf(v, lu, su);
        let sq = 2.0 * sc.max(su);
        let q_at_c = normal_log_pdf(lc, lc, sq).exp();
        let fac = (0..1001).map(|i| log_p(lc - 10.0 + 20.0 * i as f64 / 1000.0).exp() / q_at_c).fold(0.0, f64::max);
        let stream = 16 + j as u64;
        let mut got = None;
        for i in 0..1000u64 {
            let v = lc + sq * normal(at, stream, i);
            let y = uniform(at, stream + 1_000_000, i) * fac * normal_log_pdf(v, lc, sq).exp();
            if y < log_p(v).exp() {
                got = Some(v);
                break;
            }
        }
        *xj = got.unwrap_or_else(|| lc + sc * normal(at, 4, j as u64));
        lp += log_p(*xj);
    }
    (x, lp)
}

/// The official text pipeline's end-of-sequence id (`EOS_ID` of `jetformer_image_text.py`,
/// `</s>` of the `c4_en` vocabulary).
pub const EOS_ID: i64 = 1;

/// A text-to-image prompt: `text` ids and `text_mask` (1 = attended to), both `len` long.
#[derive(Clone, Debug, PartialEq)]
pub struct TextPrompt {
    pub text: Vec<i64>,
    pub mask: Vec<u8>,
}

/// The prompt of `kiln sample <jetformer> --prompt`. With a SentencePiece model in the folder
/// (`sentencepiece.model` or `tokenizer.model`: JetFormer's `c4_en`), the text goes through
/// `jetformer_image_text.py`'s `tokenize`: `lower` (ASCII only, as `tf.strings.lower`), the
/// tokenizer without EOS, then [`EOS_ID`] appended and `tolen(text_len)`: cut to the config's
/// `text_len`, padded with 1 (or, with `ignore_pad`, with 0 and the EOS and padding masked).
/// Without a tokenizer the prompt is token ids ("17,5,9"; a class-conditional model's class id),
/// all attended to.
pub fn prompt_tokens(dir: &Path, prompt: &str) -> Result<TextPrompt> {
    let Some(tok) = folder_tokenizer(dir)? else {
        let ids = prompt_ids(prompt)?;
        return Ok(TextPrompt { mask: vec![1; ids.len()], text: ids });
    };
    let cfg = kiln_models::big_vision::jetformer::JetFormerConfig::from_file(&dir.join("config.json"))?;
    Ok(tokenize_prompt(&tok.encode(&prompt.to_ascii_lowercase())?, cfg.text_len, cfg.ignore_pad))
}

/// The folder's tokenizer, if it holds one (a broken one is an error naming it).
fn folder_tokenizer(dir: &Path) -> Result<Option<crate::tokenizer::TextTokenizer>> {
    let any = crate::tokenizer::SPM_NAMES.iter().chain(&["tokenizer.json"]).any(|n| dir.join(n).is_file());
    any.then(|| crate::tokenizer::TextTokenizer::open(dir)).transpose()
}

/// `masked_concat([text, eos])` then `tolen(text_len)` of the official pipeline.
pub fn tokenize_prompt(ids: &[i64], text_len: usize, ignore_pad: bool) -> TextPrompt {
    let pad = if ignore_pad { 0 } else { 1 };
    let mut text: Vec<i64> = ids.iter().copied().chain([EOS_ID]).take(text_len).collect();
    let mut mask: Vec<u8> = (0..text.len()).map(|i| if i < ids.len() { 1 } else { pad as u8 }).collect();
    text.resize(text_len, pad);
    mask.resize(text_len, pad as u8);
    TextPrompt { text, mask }
}

/// Token ids from `--prompt` for a folder without a tokenizer (comma- or space-separated
/// integers; class-conditional models take the class id).
pub fn prompt_ids(prompt: &str) -> Result<Vec<i64>> {
    let ids: std::result::Result<Vec<i64>, _> = prompt.split([',', ' ']).filter(|s| !s.is_empty()).map(str::parse::<i64>).collect();
    match ids {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::Usage(format!(
            "--prompt '{prompt}': this JetFormer folder has no tokenizer (sentencepiece.model or tokenizer.model), so a prompt is token ids (e.g. \"3\" or \"17,5,9\")"
        ))),
    }
}

/// `kiln sample <jetformer>`: `count` images for one prompt, written as a PNG grid.
pub fn sample_to_png(dir: &Path, prompt: &TextPrompt, count: usize, o: &T2iOptions, backend: &str, out: &Path) -> Result<String> {
    let mut s = T2iSampler::new(dir, count, prompt.text.len(), o.cfg_weight != 0.0, backend)?;
    let text: Vec<i64> = (0..count).flat_map(|_| prompt.text.clone()).collect();
    let mask: Vec<u8> = (0..count).flat_map(|_| prompt.mask.clone()).collect();
    let r = s.sample(&text, &mask, o)?;
    let (cols, rows, w, h, px) = crate::sample::grid(&r.images.to_f32(), &r.images.ty.shape)?;
    crate::png::write(out, w, h, 3, &px).map_err(|e| Error::File { path: out.into(), msg: e.to_string() })?;
    let lp: f64 = r.logp.iter().map(|&x| x as f64).sum::<f64>() / count as f64;
    Ok(format!(
        "{count} images in a {cols}x{rows} grid ({w}x{h} px) -> {}; {} tokens each, mean log p {lp:.3}; decoder {:.3} s, flow inverse {:.3} s",
        out.display(),
        s.n,
        r.decoder_s,
        r.flow_s
    ))
}

/// `kiln run` on a JetFormer entry: integer and flag inputs given in another integer dtype are
/// converted to the ones the entry declares (ids i64, masks and flags u8), inputs of the
/// declared size read in the declared shape (a `[]` temperature as `[1]`), and what
/// `Model.__call__` and the scorers default is filled: `text_mask` all real, `drop_prefix` none,
/// `text_loss` the text mask, temperatures 1.
pub fn input_defaults(ins: &mut Vec<(String, Tensor)>, s: &Session, entry: &str) {
    if s.program().entry("score_image_samples").is_none() {
        return;
    }
    let Some(e) = s.program().entry(entry) else { return };
    for (name, t) in ins.iter_mut() {
        let Some(io) = e.inputs.iter().find(|io| io.name == *name) else { continue };
        let want = io.operand.ty.dtype;
        // A scalar temperature given as [] (or any same-sized shape) is read as declared.
        if t.ty.shape != io.operand.ty.shape && t.ty.numel() == io.operand.ty.numel() {
            t.ty = kiln_graph::TensorType::new(t.ty.dtype, io.operand.ty.shape.clone());
        }
        if t.ty.dtype != want && !want.is_float() && t.ty.numel() == io.operand.ty.numel() {
            let v = t.to_f64();
            *t = match want {
                DType::U8 => u8_tensor(&t.ty.shape.clone(), &v.iter().map(|&x| x as u8).collect::<Vec<_>>()),
                _ => Tensor::from_i64(&t.ty.shape.clone(), &v.iter().map(|&x| x as i64).collect::<Vec<_>>()),
            };
        }
    }
    let has = |ins: &Vec<(String, Tensor)>, n: &str| ins.iter().any(|(m, _)| m == n);
    for io in &e.inputs {
        if has(ins, &io.name) {
            continue;
        }
        let ty = &io.operand.ty;
        let fill = match io.name.as_str() {
            "text_mask" => u8_tensor(&ty.shape, &vec![1; ty.numel()]),
            "drop_prefix" => u8_tensor(&ty.shape, &vec![0; ty.numel()]),
            "text_loss" => match ins.iter().find(|(n, _)| n == "text_mask") {
                Some((_, m)) => m.clone(),
                None => u8_tensor(&ty.shape, &vec![1; ty.numel()]),
            },
            "temperature" | "temperature_probs" => Tensor::from_f32(&[1], &[1.0]),
            _ => continue,
        };
        ins.push((io.name.clone(), fill));
    }
}

/// `kiln run --bpd` on JetFormer's `nll`: bits per dimension per image, one line.
pub fn bits_per_dim_line(outs: &[(String, Tensor)]) -> Option<String> {
    let bpd = outs.iter().find(|(n, _)| n == "nll_image_bpd")?.1.to_f64();
    let shown: Vec<String> = bpd.iter().map(|b| format!("{b:.6}")).collect();
    Some(format!("bits per dim: [{}] mean {:.6}", shown.join(", "), bpd.iter().sum::<f64>() / bpd.len().max(1) as f64))
}

/// What a captioner gives per image: `decode_len` token ids, their log-probabilities under the
/// unmodified softmax and the head inputs that predicted them `[B, L, W]`.
pub struct Captions {
    pub tokens: Vec<i64>,
    pub logp: Vec<f32>,
    pub prelogits: Vec<f32>,
}

/// A compiled image-to-text sampler (`predict_fns.sample_text`: prefill `[boi, image, bos]`,
/// then one token per step, no EOS stop) for `batch` images and `decode_len` tokens.
pub struct Captioner {
    session: Session,
    cfg: JetFormerConfig,
    batch: usize,
    prompt_len: usize,
    decode_len: usize,
    /// The image size the program encodes.
    pub hw: (usize, usize),
}

impl Captioner {
    /// Compiles the captioner of the folder `dir` on `backend`.
    pub fn new(dir: &Path, batch: usize, decode_len: usize, backend: &str) -> Result<Self> {
        let (entries, states, cfg, d) = jetformer::build_captioner(dir, batch, decode_len)?;
        let states = states.iter().map(|(name, ty)| StateSpec { name: name.clone(), ty: ty.clone() }).collect();
        let profile = kiln_models::Profile { batch, ..kiln_models::Profile::default() };
        let opts = CompileOptions { profile, backend: backend.to_string(), trace: false };
        let desc = format!("JetFormer captioner: {batch} images, {decode_len} tokens");
        let program = compile_with_states(&entries, &desc, &dir.display().to_string(), states, &opts)?.program;
        let session = Session::new(program, Arc::new(WeightStore::open(dir)?))?;
        let prompt_len = d.n + 1 + usize::from(cfg.boi_id.is_some());
        Ok(Captioner { session, cfg, batch, prompt_len, decode_len, hw: d.hw })
    }

    /// Captions `images [B, H, W, 3]` in [-1, 1] (encoded, the noise dimensions dropped).
    pub fn caption_images(&mut self, images: &Tensor, sampling: &HfSampling) -> Result<Captions> {
        let outs = self.session.run("encode", &[("images", images)])?;
        let tokens = get(&outs, "image_tokens")?.clone();
        self.caption_tokens(&tokens, sampling)
    }

    /// Captions soft image tokens `[B, N, D]`: greedy at temperature 0, else drawn as kiln's
    /// other decoders draw (temperature, then top-k, then top-p; counter-based draws per seed,
    /// image and step). big_vision's `sample_text` knows the temperature alone.
    pub fn caption_tokens(&mut self, image_tokens: &Tensor, sampling: &HfSampling) -> Result<Captions> {
        sampling.check()?;
        let (b, l, w) = (self.batch, self.decode_len, self.cfg.width);
        self.session.reset_states()?;
        let outs = self.session.run("i2t_prefill", &[("image_tokens", image_tokens)])?;
        let (mut logits, mut pre) = (get(&outs, "logits")?.to_f32(), get(&outs, "prelogits")?.to_f32());
        let v = logits.len() / b;
        let (mut tokens, mut logp, mut prelogits) = (vec![0i64; b * l], vec![0f32; b * l], vec![0f32; b * l * w]);
        for i in 0..l {
            for r in 0..b {
                let row: Vec<f64> = logits[r * v..(r + 1) * v].iter().map(|&x| x as f64).collect();
                let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                let tok = sampling.pick(&logits[r * v..(r + 1) * v], crate::encdec::uniform(sampling.seed, r as u64, i as u64));

                tokens[r * l + i] = tok as i64;
                logp[r * l + i] = (row[tok] - lse) as f32;
                prelogits[(r * l + i) * w..(r * l + i + 1) * w].copy_from_slice(&pre[r * w..(r + 1) * w]);
            }
            if i + 1 == l {
                break;
            }
            let token_t = Tensor::from_i64(&[b, 1], &(0..b).map(|r| tokens[r * l + i]).collect::<Vec<_>>());
            let at_t = Tensor::from_i64(&[1], &[(self.prompt_len + i) as i64]);
            let outs = self.session.run("i2t_step", &[("token", &token_t), ("cache_position", &at_t)])?;
            logits = get(&outs, "logits")?.to_f32();
            pre = get(&outs, "prelogits")?.to_f32();
        }
        Ok(Captions { tokens, logp, prelogits })
    }
}

/// `kiln generate <jetformer> --image x.png`: the image resized to the model's size as
/// big_vision's `resize` does (TF bilinear), mapped to [-1, 1], captioned; one line of ids.
pub fn caption_file(dir: &Path, image: &Path, decode_len: usize, sampling: &HfSampling, backend: &str) -> Result<String> {
    let mut c = Captioner::new(dir, 1, decode_len, backend)?;
    let (h, w) = c.hw;
    let img = crate::preprocess::load_image(image, true)?;
    let px: Vec<f32> = crate::paligemma_bv::bilinear(&img, h, w).iter().map(|&v| v / 127.5 - 1.0).collect();
    let r = c.caption_images(&Tensor::from_f32(&[1, h, w, 3], &px), sampling)?;
    let lp: f32 = r.logp.iter().sum();
    let ids = format!("tokens {:?} (log p {lp:.3})", r.tokens);
    // With the folder's tokenizer, the text up to the first EOS (the sampler does not stop
    // there); ids past the tokenizer's pieces (the model's bos, boi, nolabel) are left out.
    match folder_tokenizer(dir)? {
        Some(tok) => {
            let end = r.tokens.iter().position(|&t| t == EOS_ID).unwrap_or(r.tokens.len());
            let known: Vec<i64> = r.tokens[..end].iter().copied().filter(|&t| (t as usize) < tok.vocab_size()).collect();
            Ok(format!("{}\n{ids}", tok.decode(&known, true)?))
        }
        None => Ok(ids),
    }
}
