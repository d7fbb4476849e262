//! `kiln generate` for big_vision's encoder-decoders (the CapPa captioner of LocCa and
//! LiT-decoder): the image encoded once, then one token per step over a self-attention cache
//! and the cross-attention keys and values kept as state, driven by the loop of big_vision's
//! `models/proj/uvim/decode.py` (`_temperature_sampling` at temperature 1e-7, i.e. greedy):
//!
//! - the buffer is `[0] + prompts` (`N` steps; step `i` feeds `buffer[i]` at position `i`);
//! - `logprobs = log_softmax(logits)`; the greedy token is the first argmax;
//! - where `buffer[i + 1]` is a forced prompt token (non-zero) it stays, with its log-prob;
//!   elsewhere the greedy token is written unless the row has finished (then the prompt's 0);
//! - `finished = out_of_prompt & (finished | token == eos)`: the EOS is written; `eos = -1`
//!   never finishes; the loop stops when every row finished or after `N` steps;
//! - `scores` sums the recorded log-probs. Log-probs after a row's EOS are the loop's
//!   artifacts, as in the reference.

use crate::{compile_with_states, CompileOptions, Error, Result};
use kiln_graph::program::StateSpec;
use kiln_graph::DType;
pub use kiln_models::big_vision::cappa::CrossKv;
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::Path;
use std::sync::Arc;

/// A compiled encoder-decoder and its decode length.
pub struct EncDecGenerator {
    session: Session,
    batch: usize,
    steps: usize,
    vocab: usize,
}

/// What [`EncDecGenerator::generate`] gives, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// `[B, N]` (the BOS dropped).
    pub sequences: Vec<i64>,
    /// `[B, N]`: the log-prob recorded at each step (0 where the loop stopped first).
    pub logprobs: Vec<f32>,
    /// `[B]`: their sums.
    pub scores: Vec<f32>,
    /// Steps run (at most N).
    pub steps: usize,
}

impl EncDecGenerator {
    /// Compiles the folder for `batch` images of `image_hw` and `steps` decode steps.
    pub fn new(dir: &Path, batch: usize, image_hw: (usize, usize), steps: usize, backend: &str, dtype: DType) -> Result<Self> {
        Self::with_cross(dir, batch, image_hw, steps, backend, dtype, CrossKv::Cached)
    }

    /// [`EncDecGenerator::new`] with the cross-attention keys and values cached (kiln's way) or
    /// recomputed at every step (the official loop's way, for comparison).
    pub fn with_cross(
        dir: &Path,
        batch: usize,
        image_hw: (usize, usize),
        steps: usize,
        backend: &str,
        dtype: DType,
        cross: CrossKv,
    ) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let family = kiln_models::registry::family_of(&cfg_path)?;
        if !matches!(family.name, "cappa" | "uvim-vtt") {
            return Err(Error::Usage(format!(
                "{}: encoder-decoder generation (images in, sequences out) is for CapPa and UViM VTT folders, not {}",
                dir.display(),
                family.name
            )));
        }
        let profile = Profile { batch, image_hw: Some(image_hw), dtype, ..Profile::default() };
        let g = kiln_models::big_vision::cappa::build_generation(&cfg_path, kiln_models::Checkpoint::open(dir)?, &profile, steps, cross)?;
        let states = g.states.iter().map(|(name, ty)| StateSpec { name: name.clone(), ty: ty.clone() }).collect();
        let built = [("encode".to_string(), g.encode), ("decode".to_string(), g.decode)];
        let opts = CompileOptions { profile, backend: backend.to_string(), trace: false };
        let program = compile_with_states(&built, &g.description, &dir.display().to_string(), states, &opts)?.program;
        let session = Session::new(program, Arc::new(WeightStore::open(dir)?))?;
        Ok(EncDecGenerator { session, batch, steps, vocab: g.vocab_size })
    }

    /// Greedy decoding of `images` with forced `prompts` `[B, N]` (0 = free) and `eos`.
    pub fn generate(&mut self, images: &Tensor, prompts: &[i64], eos: i64) -> Result<Decoded> {
        let (b, n, v) = (self.batch, self.steps, self.vocab);
        if prompts.len() != b * n {
            return Err(Error::Usage(format!("prompts: {} values for [{b}, {n}]", prompts.len())));
        }
        if let Some(&bad) = prompts.iter().find(|&&t| t < 0 || t as usize >= v) {
            return Err(Error::Usage(format!("prompt token {bad} is outside the vocabulary 0..{v}")));
        }
        self.session.run("encode", &[("images", images)])?;
        // buffer[r] = [0] + prompts[r]
        let mut buf: Vec<Vec<i64>> =
            (0..b).map(|r| std::iter::once(0).chain(prompts[r * n..(r + 1) * n].iter().copied()).collect()).collect();
        let mut logprobs = vec![0f32; b * n];
        let mut scores = vec![0f64; b];
        let mut finished = vec![false; b];
        let mut steps = 0;
        for i in 0..n {
            let tokens: Vec<i64> = buf.iter().map(|row| row[i]).collect();
            let outs = self.session.run(
                "decode",
                &[("token", &Tensor::from_i64(&[b, 1], &tokens)), ("cache_position", &Tensor::from_i64(&[1], &[i as i64]))],
            )?;
            let logits =
                outs.into_iter().find(|(name, _)| name == "logits").ok_or_else(|| Error::Usage("decode gave no logits".into()))?.1.to_f32();
            for r in 0..b {
                let row = &logits[r * v..(r + 1) * v];
                let lp = log_softmax(row);
                let sampled = argmax(row) as i64;
                let next = buf[r][i + 1];
                let out_of_prompt = next == 0;
                let update = out_of_prompt && !finished[r];
                let (token, logprob) = if update { (sampled, lp[sampled as usize]) } else { (next, lp[next as usize]) };
                buf[r][i + 1] = token;
                logprobs[r * n + i] = logprob as f32;
                scores[r] += logprob;
                finished[r] = out_of_prompt && (finished[r] || sampled == eos);
            }
            steps += 1;
            if finished.iter().all(|&f| f) {
                break;
            }
        }
        let sequences = buf.iter().flat_map(|row| row[1..].iter().copied()).collect();
        Ok(Decoded { sequences, logprobs, scores: scores.into_iter().map(|s| s as f32).collect(), steps })
    }
}

/// `log_softmax` in double precision.
fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// The first index of the largest value.
fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold(0, |best, (i, &v)| if v > x[best] { i } else { best })
}
