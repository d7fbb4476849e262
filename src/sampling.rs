//! Sampling for the Hugging Face decoders (Gemma, Gemma 2, PaliGemma), as transformers'
//! `generate(do_sample=True)` filters the next-token scores: `TemperatureLogitsWarper`, then
//! `TopKLogitsWarper` (scores below the k-th largest dropped; ties with it kept), then
//! `TopPLogitsWarper` (scores sorted ascending, stably by index; the leading ones whose
//! softmax running sum is at most `1 - top_p` dropped, the largest always kept); then a token
//! drawn from the softmax of what is left. transformers draws with torch's generator; kiln
//! draws with its own counter-based one ([`kiln_graph::sample::uniform`]: one number per seed,
//! row and step), so a seed gives the same tokens on every backend, and the distribution, not
//! the tokens, is what matches transformers. The filters and the draw live in
//! `kiln_graph::sample`, because the interpreter runs them too: a generation program's last
//! step ([`crate::select`], `Op::SampleToken`) chooses each token on the backend with that
//! code, and this host sampler (cube, whose kernels lack f64 and u64; beam search's callers)
//! runs the same functions.

use crate::{Error, Result};

/// transformers' sampling settings; `temperature == 0` is greedy (the first argmax).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HfSampling {
    pub temperature: f64,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f64,
    pub seed: u64,
}

impl HfSampling {
    /// Refuses settings transformers refuses.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Usage(format!("temperature {}: expected a finite value >= 0 (0 is greedy)", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Usage(format!("top_p {}: expected a value in (0, 1]", self.top_p)));
        }
        if self.top_k > u32::MAX as usize {
            return Err(Error::Usage(format!("top_k {}: expected at most {}", self.top_k, u32::MAX)));
        }
        if self.temperature > 0.0 && !(self.temperature as f32 > 0.0 && (self.top_p as f32) > 0.0) {
            return Err(Error::Usage(format!("temperature {} and top_p {}: too small for f32", self.temperature, self.top_p)));
        }
        Ok(())
    }

    /// The token drawn from `logits` with the uniform number `u` in [0, 1). Temperature and
    /// top-p are taken in f32, as the device's selection step reads them (and as
    /// transformers' float32 scores meet them), so both choose the same tokens.
    pub fn pick(&self, logits: &[f32], u: f64) -> usize {
        let row: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        kiln_graph::sample::pick(&row, &self.filters(), u)
    }

    /// The filters as the selection step applies them (temperature and top-p in f32).
    pub fn filters(&self) -> kiln_graph::sample::Filters {
        kiln_graph::sample::Filters { temperature: self.temperature as f32 as f64, top_k: self.top_k, top_p: self.top_p as f32 as f64 }
    }
}

/// The token of `kept` (ascending indices) that `u` in [0, 1) picks from the softmax of
/// `score(i)` over them ([`kiln_graph::sample::draw`]). Both samplers draw with it.
pub(crate) fn draw(kept: &[usize], score: impl Fn(usize) -> f64, u: f64) -> usize {
    kiln_graph::sample::draw(kept, score, u)
}

/// `log(sum(exp(row)))` in double precision (a log-softmax is `row[i] - log_sum_exp(row)`):
/// [`kiln_graph::sample::log_sum_exp`], the code `Op::LogSoftmax` runs too.
pub(crate) fn log_sum_exp(row: &[f32]) -> f64 {
    kiln_graph::sample::log_sum_exp_f32(row)
}

/// Draws 20,000 tokens with `draw(step)` and checks them against the distribution `p`: no
/// token with probability 0 drawn, and Pearson's chi-square over the others below the 0.999
/// quantile of its distribution (at most 5 degrees of freedom).
#[cfg(test)]
pub(crate) fn check_draws(name: &str, p: &[f64], draw: impl Fn(u64) -> usize) {
    // The 0.999 quantiles of chi-square with 1..=5 degrees of freedom.
    const CRIT: [f64; 5] = [10.83, 13.82, 16.27, 18.47, 20.52];
    let n = 20_000;
    let mut counts = vec![0usize; p.len()];
    for step in 0..n {
        counts[draw(step)] += 1;
    }
    let kept: Vec<usize> = (0..p.len()).filter(|&i| p[i] > 0.0).collect();
    assert!((0..p.len()).all(|i| p[i] > 0.0 || counts[i] == 0), "{name}: drew a dropped token: {counts:?}");
    let chi: f64 = kept.iter().map(|&i| (counts[i] as f64 - n as f64 * p[i]).powi(2) / (n as f64 * p[i])).sum();
    assert!(chi < CRIT[kept.len() - 2], "{name}: chi-square {chi:.2} over {} tokens; counts {counts:?}, p {p:?}", kept.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encdec::uniform;

    const LOGITS: [f32; 6] = [1.0, 2.5, 0.3, 2.5, -1.0, 1.7];

    /// The distribution each setting should draw from, worked out by hand for `LOGITS`.
    fn expected(s: &HfSampling) -> Vec<f64> {
        let scaled: Vec<f64> = LOGITS.iter().map(|&v| v as f64 / s.temperature).collect();
        let keep: [bool; 6] = match (s.top_k, s.top_p) {
            (0, p) if p >= 1.0 => [true; 6],
            // Top 3 by value: 2.5, 2.5, 1.7 (indices 1, 3, 5).
            (3, p) if p >= 1.0 => [false, true, false, true, false, true],
            // Top 2: the two 2.5s (tie at the k-th kept).
            (2, p) if p >= 1.0 => [false, true, false, true, false, false],
            // Top-p 0.8 at temperature 1: ascending softmax [.011 .039 .079 .160 .355 .355];
            // running sums .011 .050 .129 .289 ..: those <= 0.2 go (-1.0, 0.3, 1.0).
            (0, p) if (p - 0.8).abs() < 1e-12 && s.temperature == 1.0 => [false, true, false, true, false, true],
            // Top-k 3 then top-p 0.6 at temperature 1: over {2.5, 2.5, 1.7} the softmax is
            // [.183 .408 .408]; .183 <= 0.4 goes: the two 2.5s stay.
            (3, p) if (p - 0.6).abs() < 1e-12 && s.temperature == 1.0 => [false, true, false, true, false, false],
            other => panic!("no hand-worked case for {other:?}"),
        };
        let w: Vec<f64> = scaled.iter().zip(keep).map(|(v, k)| if k { v.exp() } else { 0.0 }).collect();
        let t: f64 = w.iter().sum();
        w.iter().map(|x| x / t).collect()
    }

    /// 20,000 draws per setting (temperature, top-k, top-p, and top-k with top-p) match the
    /// filtered softmax: Pearson's chi-square below its 0.999 quantile, nothing dropped drawn.
    #[test]
    fn draws_follow_transformers_filters() {
        let settings = [
            HfSampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 11 },
            HfSampling { temperature: 0.6, top_k: 0, top_p: 1.0, seed: 12 },
            HfSampling { temperature: 1.0, top_k: 3, top_p: 1.0, seed: 13 },
            HfSampling { temperature: 1.3, top_k: 2, top_p: 1.0, seed: 14 },
            HfSampling { temperature: 1.0, top_k: 0, top_p: 0.8, seed: 15 },
            HfSampling { temperature: 1.0, top_k: 3, top_p: 0.6, seed: 16 },
        ];
        for s in settings {
            check_draws(&format!("{s:?}"), &expected(&s), |step| s.pick(&LOGITS, uniform(s.seed, 0, step)));
        }
    }

    #[test]
    fn limits_are_greedy() {
        for seed in 0..50 {
            let l: Vec<f32> = (0..40).map(|i| (uniform(seed, i, 0) * 8.0 - 4.0) as f32).collect();
            let u = uniform(seed, 1, 1);
            let greedy = crate::generate::argmax(&l);
            assert_eq!(HfSampling { temperature: 1.0, top_k: 1, top_p: 1.0, seed }.pick(&l, u), greedy);
            assert_eq!(HfSampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed }.pick(&l, u), greedy);
            assert_eq!(HfSampling { temperature: 1.0, top_k: 0, top_p: 1e-9, seed }.pick(&l, u), greedy);
        }
        assert!(HfSampling { temperature: 1.0, top_k: 0, top_p: 0.0, seed: 0 }.check().is_err());
        assert!(HfSampling { temperature: f64::NAN, top_k: 0, top_p: 1.0, seed: 0 }.check().is_err());
    }
}
