//! Beam search for the Hugging Face decoders (Gemma, Gemma 2, PaliGemma), as transformers 5's
//! `generate(num_beams=K)` runs it (`GenerationMixin._beam_search`): every step each input's
//! K running beams add the log-softmax of their next-token logits to their scores; the best
//! `max(2, 1 + #eos) * K` continuations over all beams and tokens are kept (sorted, best
//! first); those ending in EOS or at the last step, among the first K, are *finished* with the
//! score `sum of log-probs / new_tokens ^ length_penalty` and merged into the K best finished
//! hypotheses; the K best continuations that did not finish run on. Scores are f32 sums of f32
//! log-probabilities, as torch keeps them, with transformers' `-1e9` masks.
//!
//! Stopping: `early_stopping` true stops an input once K hypotheses have finished; false
//! (transformers' default) stops once the best running score, divided by the current length
//! to the penalty, cannot beat the worst finished one; "never" uses the longest possible length
//! there when the penalty is positive. Generation ends when no input can improve, or every
//! continuation hit a stop. `min_new_tokens` masks the EOS ids to `-inf` until that many
//! tokens are made (transformers' `MinNewTokensLengthLogitsProcessor`).
//!
//! The beams live in the static KV cache: after each step the cache rows are reordered in
//! place to the beams that run on ([`kiln_runtime::Session::gather_state_rows`]).

use crate::generate::{Generator, Prefilled, Prompt};
use crate::{Error, Result};
use kiln_runtime::Tensor;

/// transformers' `early_stopping`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyStopping {
    True,
    False,
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "true" => Ok(EarlyStopping::True),
            "false" => Ok(EarlyStopping::False),
            "never" => Ok(EarlyStopping::Never),
            other => Err(Error::Usage(format!("--early-stopping {other}: expected true, false or never"))),
        }
    }
}

/// Beam search settings (transformers' names and defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamOptions {
    pub num_beams: usize,
    pub num_return_sequences: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub min_new_tokens: usize,
}

impl BeamOptions {
    /// Refuses what transformers refuses.
    pub fn check(&self, max_new_tokens: usize) -> Result<()> {
        if self.num_beams < 1 {
            return Err(Error::Usage("--num-beams must be at least 1".into()));
        }
        if self.num_return_sequences < 1 || self.num_return_sequences > self.num_beams {
            return Err(Error::Usage(format!(
                "--num-return-sequences {} must be between 1 and --num-beams ({})",
                self.num_return_sequences, self.num_beams
            )));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::Usage(format!("--length-penalty {}: expected a finite number", self.length_penalty)));
        }
        if self.min_new_tokens > max_new_tokens {
            return Err(Error::Usage(format!("--min-new-tokens {} exceeds --max-new-tokens {max_new_tokens}", self.min_new_tokens)));
        }
        Ok(())
    }
}

/// What beam search returns for `B` inputs: `sequences [B * R, L + n]` (R = returned sequences
/// per input, best first; finished hypotheses shorter than `n` padded) and their
/// `sequences_scores [B * R]`.
pub struct BeamOutput {
    pub sequences: Vec<i64>,
    pub sequences_scores: Vec<f32>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub decode_steps: usize,
}

/// One input's search: K running beams, K finished slots, the early-stop flag.
struct Search {
    running: Vec<Vec<i64>>,
    scores: Vec<f32>,
    finished: Vec<Vec<i64>>,
    finished_scores: Vec<f32>,
    is_finished: Vec<bool>,
    improvable: bool,
}

/// The indices of the `k` largest of `x`, largest first (ties: the lower index first).
fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `log_softmax(row)` in f32, as torch computes it (here in f64, rounded).
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let lse = crate::sampling::log_sum_exp(row);
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

impl Generator {
    /// Beam search over `prompt` (`B` inputs) with `o.num_beams` beams per input; the
    /// generator must decode `num_beams` rows per input ([`Generator::with_rows`]).
    pub fn beam_search(
        &mut self,
        prompt: &Prompt,
        max_new_tokens: usize,
        pixel_values: Option<&Tensor>,
        o: &BeamOptions,
    ) -> Result<BeamOutput> {
        o.check(max_new_tokens)?;
        let k = o.num_beams;
        if self.rows_per_input != k {
            return Err(Error::Usage(format!("this generator decodes {} rows per input, not {k} beams", self.rows_per_input)));
        }
        if !self.has_logits {
            return Err(Error::Usage(
                "beam search reads the logits on the host: this generation program outputs only the chosen ids (compile it with step logits)".into(),
            ));
        }
        let Prefilled { first, mut mask, mut next_pos, prefill_s } = self.prefill_rows(prompt, max_new_tokens, pixel_values)?;
        let mut logits = first.logits;
        let (n_in, s, c, v, l) = (self.batch, self.bucket, self.meta.capacity, self.meta.vocab, prompt.len);
        let eos = self.meta.eos.clone();
        let keep = 2.max(1 + eos.len()) * k;
        let mut search: Vec<Search> = (0..n_in)
            .map(|_| Search {
                running: vec![vec![]; k],
                scores: (0..k).map(|j| if j == 0 { 0.0 } else { -1e9 }).collect(),
                finished: vec![vec![]; k],
                finished_scores: vec![-1e9; k],
                is_finished: vec![false; k],
                improvable: true,
            })
            .collect();
        let (mut decode_s, mut decode_steps) = (0.0, 0);
        let mut t = 0;
        loop {
            let last = t + 1 == max_new_tokens;
            let mut all_hit = true;
            let mut src_rows = vec![0usize; n_in * k];
            let mut next = vec![0i64; n_in * k];
            for (i, sr) in search.iter_mut().enumerate() {
                // Accumulated scores over [K * V] continuations.
                let mut acc = Vec::with_capacity(k * v);
                for j in 0..k {
                    let mut lp = log_softmax(&logits[(i * k + j) * v..(i * k + j + 1) * v]);
                    if t < o.min_new_tokens {
                        eos.iter().filter(|&&e| e >= 0 && (e as usize) < v).for_each(|&e| lp[e as usize] = f32::NEG_INFINITY);
                    }
                    acc.extend(lp.iter().map(|&x| x + sr.scores[j]));
                }
                let top = top_k(&acc, keep);
                let cand: Vec<(usize, i64, f32, bool)> = top
                    .iter()
                    .map(|&x| {
                        let tok = (x % v) as i64;
                        (x / v, tok, acc[x], last || eos.contains(&tok))
                    })
                    .collect();
                all_hit &= cand.iter().all(|c| c.3);
                // The K best continuations that did not stop run on.
                let run_scores: Vec<f32> = cand.iter().map(|c| c.2 + if c.3 { -1e9 } else { 0.0 }).collect();
                let chosen = top_k(&run_scores, k);
                // Finished: the stopped ones among the first K, length-normalised.
                let full = sr.is_finished.iter().all(|&f| f) && o.early_stopping == EarlyStopping::True;
                let norm = ((t + 1) as f64).powf(o.length_penalty) as f32;
                let mut merged_scores = sr.finished_scores.clone();
                let mut merged: Vec<Vec<i64>> = sr.finished.clone();
                let mut merged_done = sr.is_finished.clone();
                for (ci, c) in cand.iter().enumerate() {
                    let just = c.3 && ci < k;
                    let mut sc = c.2 / norm;
                    sc += if full { -1e9 } else { 0.0 };
                    sc += if sr.improvable { 0.0 } else { -1e9 };
                    sc += if just { 0.0 } else { -1e9 };
                    merged_scores.push(sc);
                    let mut seq = sr.running[c.0].clone();
                    seq.push(c.1);
                    merged.push(seq);
                    merged_done.push(just);
                }
                let best = top_k(&merged_scores, k);
                sr.finished = best.iter().map(|&x| merged[x].clone()).collect();
                sr.finished_scores = best.iter().map(|&x| merged_scores[x]).collect();
                sr.is_finished = best.iter().map(|&x| merged_done[x]).collect();
                let old = std::mem::take(&mut sr.running);
                sr.running = chosen
                    .iter()
                    .map(|&x| {
                        let mut seq = old[cand[x].0].clone();
                        seq.push(cand[x].1);
                        seq
                    })
                    .collect();
                sr.scores = chosen.iter().map(|&x| run_scores[x]).collect();
                for (j, &x) in chosen.iter().enumerate() {
                    src_rows[i * k + j] = i * k + cand[x].0;
                    next[i * k + j] = cand[x].1;
                }
                // The early-stop heuristic, at the length after this step.
                let len = if o.early_stopping == EarlyStopping::Never && o.length_penalty > 0.0 { max_new_tokens } else { t + 1 };
                let best_running = sr.scores[0] / (len as f64).powf(o.length_penalty) as f32;
                let worst = sr.finished_scores.iter().copied().fold(f32::INFINITY, f32::min);
                sr.improvable &= sr.is_finished.iter().any(|&f| best_running > if f { worst } else { -1e9 });
            }
            t += 1;
            let improvable = search.iter().any(|sr| sr.improvable);
            let open = !(search.iter().all(|sr| sr.is_finished.iter().all(|&f| f)) && o.early_stopping == EarlyStopping::True);
            if !(improvable && open && !all_hit) || t == max_new_tokens {
                break;
            }
            let t1 = std::time::Instant::now();
            self.session.gather_state_rows(&src_rows)?;
            let slot = s + t - 1;
            for r in 0..n_in * k {
                mask[r * c + slot] = 1;
            }
            logits = self.decode_step(&next, &mask, &next_pos, slot)?;
            next_pos.iter_mut().for_each(|p| *p += 1);
            decode_s += t1.elapsed().as_secs_f64();
            decode_steps += 1;
        }
        let r = o.num_return_sequences;
        let width = search.iter().flat_map(|sr| sr.finished[..r].iter().map(|x| x.len())).max().unwrap_or(0);
        // transformers fills with `pad_token_id or eos_token_id[0]` (a pad id of 0 is falsy).
        let fill = if self.meta.pad != 0 { self.meta.pad } else { eos.first().copied().unwrap_or(0) };
        let mut sequences = Vec::with_capacity(n_in * r * (l + width));
        let mut sequences_scores = Vec::with_capacity(n_in * r);
        for (i, sr) in search.iter().enumerate() {
            for j in 0..r {
                sequences.extend_from_slice(&prompt.input_ids[i * l..(i + 1) * l]);
                let f = &sr.finished[j];
                sequences.extend(f.iter().copied().chain(std::iter::repeat(fill)).take(width));
                sequences_scores.push(sr.finished_scores[j]);
            }
        }
        Ok(BeamOutput { sequences, sequences_scores, prompt_len: l, new_tokens: width, prefill_s, decode_s, decode_steps })
    }
}
