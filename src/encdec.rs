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

use crate::generate::argmax;
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
        self.generate_with(images, prompts, eos, &Sampling::GREEDY)
    }

    /// [`EncDecGenerator::generate`] drawing each free token as `sampling` says.
    pub fn generate_with(&mut self, images: &Tensor, prompts: &[i64], eos: i64, sampling: &Sampling) -> Result<Decoded> {
        sampling.check()?;
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
                let lse = crate::sampling::log_sum_exp(row);
                let lp = |t: i64| row[t as usize] as f64 - lse;
                let sampled = sampling.pick(row, uniform(sampling.seed, r as u64, i as u64)) as i64;
                let next = buf[r][i + 1];
                let out_of_prompt = next == 0;
                let update = out_of_prompt && !finished[r];
                let token = if update { sampled } else { next };
                let logprob = lp(token);
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

/// How a free token is chosen, as `uvim/decode.py`'s `_temperature_sampling` filters and draws
/// (its categorical draw replaced by kiln's own generator, so that a seed gives the same
/// tokens on every backend and batch layout):
/// - `temperature == 0`: the first argmax (big_vision's greedy is temperature 1e-7);
/// - `top_p > 0`: logits below the logit at which the sorted softmax's running sum first
///   reaches `top_p` are dropped (the cut logit and its ties kept);
/// - `top_k > 0`: only the k largest logits (ties to the lower index) take part;
/// - then token `i` with probability `softmax(logits / temperature)_i` over those kept:
///   the first `i` whose running sum (in double precision, in index order) exceeds `u`, with
///   `u` uniform in [0, 1) from [`uniform`].
///
/// `top_k` and `top_p` together are refused, as in the reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    /// The first argmax.
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 0.0, seed: 0 };

    /// Refuses settings the reference refuses or that mean nothing.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Usage(format!("temperature {}: expected a finite value >= 0", self.temperature)));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(Error::Usage(format!("top_p {}: expected a value in [0, 1]", self.top_p)));
        }
        if self.top_k > 0 && self.top_p > 0.0 {
            return Err(Error::Usage(format!(
                "top_k {} and top_p {} together: use one (as big_vision's decode.py)",
                self.top_k, self.top_p
            )));
        }
        Ok(())
    }

    /// The token drawn from `logits` with the uniform number `u` in [0, 1).
    pub fn pick(&self, logits: &[f32], u: f64) -> usize {
        if self.temperature == 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        let mut keep: Vec<usize> = (0..logits.len()).collect();
        if self.top_p > 0.0 {
            let mut sorted: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let max = sorted[0];
            let z: f64 = sorted.iter().map(|v| (v - max).exp()).sum();
            let (mut cum, mut cut) = (0.0, sorted.len() - 1);
            for (i, v) in sorted.iter().enumerate() {
                cum += (v - max).exp() / z;
                if cum >= self.top_p {
                    cut = i;
                    break;
                }
            }
            let cutoff = sorted[cut];
            keep.retain(|&i| logits[i] as f64 >= cutoff);
        }
        if self.top_k > 0 && self.top_k < keep.len() {
            // The k largest, ties to the lower index, kept in index order.
            let mut order = keep.clone();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            order.truncate(self.top_k);
            order.sort_unstable();
            keep = order;
        }
        crate::sampling::draw(&keep, |i| logits[i] as f64 / self.temperature, u)
    }
}

/// kiln's counter-based uniform numbers: `u = (h >> 11) / 2^53` in [0, 1) with
/// `h = splitmix64(splitmix64(splitmix64(seed) ^ row) ^ step)`: one number per (seed, row,
/// step), independent of threads, batch layout and backend.
pub fn uniform(seed: u64, row: u64, step: u64) -> f64 {
    kiln_graph::sample::uniform(seed, row, step)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; 6] = [1.0, 2.5, 0.3, 2.5, -1.0, 1.7];

    fn logits(seed: u64, n: usize) -> Vec<f32> {
        (0..n).map(|i| (uniform(seed, i as u64, 0) * 8.0 - 4.0) as f32).collect()
    }

    /// top-k 1 and a temperature near 0 are the greedy token; the same seed gives the same
    /// tokens.
    #[test]
    fn limits_are_greedy_and_seeds_repeat() {
        for s in 0..50 {
            let l = logits(s, 40);
            let u = uniform(s, 1, 2);
            let top1 = Sampling { temperature: 1.0, top_k: 1, top_p: 0.0, seed: s };
            assert_eq!(top1.pick(&l, u), argmax(&l));
            let cold = Sampling { temperature: 1e-7, top_k: 0, top_p: 0.0, seed: s };
            assert_eq!(cold.pick(&l, u), argmax(&l));
        }
        assert_eq!(uniform(7, 3, 9), uniform(7, 3, 9));
        assert_ne!(uniform(7, 3, 9), uniform(8, 3, 9));
        assert!(Sampling { temperature: 1.0, top_k: 2, top_p: 0.5, seed: 0 }.check().is_err());
        assert!(Sampling { temperature: -1.0, ..Sampling::GREEDY }.check().is_err());
    }

    /// The filtered softmax each setting should draw from.
    fn expected(s: &Sampling) -> Vec<f64> {
        let l: Vec<f64> = LOGITS.iter().map(|&v| v as f64).collect();
        let mut keep = vec![true; l.len()];
        if s.top_k > 0 {
            // [1.0, 2.5, 0.3, 2.5, -1.0, 1.7]: the top 3 are indices 1, 3, 5.
            keep = vec![false, true, false, true, false, true];
            assert_eq!(s.top_k, 3);
        }
        if s.top_p > 0.0 {
            // softmax(LOGITS) = [.079, .355, .039, .355, .011, .160]: sorted, the running sum
            // passes 0.8 at the 1.7 (0.355 + 0.355 = 0.711, + 0.160 = 0.871), so 2.5, 2.5 and
            // 1.7 stay (before the temperature, as decode.py cuts).
            let z: f64 = l.iter().map(|v| v.exp()).sum();
            let (p25, p17) = (2.5f64.exp() / z, 1.7f64.exp() / z);
            assert!(2.0 * p25 < 0.8 && 2.0 * p25 + p17 >= 0.8, "{p25} {p17}");
            keep = vec![false, true, false, true, false, true];
        }
        let w: Vec<f64> = l.iter().zip(&keep).map(|(v, &k)| if k { (v / s.temperature).exp() } else { 0.0 }).collect();
        let t: f64 = w.iter().sum();
        w.iter().map(|x| x / t).collect()
    }

    /// 20,000 draws per setting match the filtered softmax: Pearson's chi-square over the kept
    /// tokens below the 0.999 quantile of its distribution (5 degrees of freedom at most:
    /// 20.52), and no draw outside the kept set.
    #[test]
    fn draws_follow_the_filtered_softmax() {
        let settings = [
            Sampling { temperature: 1.0, top_k: 0, top_p: 0.0, seed: 1 },
            Sampling { temperature: 0.7, top_k: 0, top_p: 0.0, seed: 2 },
            Sampling { temperature: 1.0, top_k: 3, top_p: 0.0, seed: 3 },
            Sampling { temperature: 1.0, top_k: 0, top_p: 0.8, seed: 4 },
            Sampling { temperature: 1.5, top_k: 3, top_p: 0.0, seed: 5 },
            Sampling { temperature: 0.7, top_k: 0, top_p: 0.8, seed: 6 },
        ];
        for s in settings {
            crate::sampling::check_draws(&format!("{s:?}"), &expected(&s), |step| s.pick(&LOGITS, uniform(s.seed, 0, step)));
        }
    }
}
