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
//!
//! Where the backend has the step (cpu, cuda), the continuations are scored on the device
//! ([`crate::select::Choice::Beams`]): each row's `n` best of `score + log_softmax(logits)`
//! ([`candidates_per_row`]), the very values the host computes from the logits, so the host
//! reads `R * n * 12` bytes a step instead of the logits and merges the rows' lists in the
//! order the host's selection over all `K * V` continuations has (the value, then the
//! flattened index `beam * V + token`). On cube (no f64 for the log-softmax) the host reads
//! the logits and scores them itself.

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

/// How many continuations per row beam search with `num_beams` beams needs from the device:
/// transformers keeps the best `max(2, 1 + #eos) * num_beams` over all beams and tokens, each
/// among its own row's best that many, plus one per EOS id so that masking EOS (before
/// `min_new_tokens`) still leaves enough; at most the vocabulary.
pub fn candidates_per_row(num_beams: usize, eos: &[i64], vocab: usize) -> usize {
    let mut ids: Vec<i64> = eos.iter().copied().filter(|&e| e >= 0 && (e as usize) < vocab).collect();
    ids.sort_unstable();
    ids.dedup();
    (2.max(1 + eos.len()) * num_beams + ids.len()).min(vocab)
}

/// One step's continuations for every row: the logits `[R, V]` (scored on the host), or the
/// device's best `n` a row, ids `[R, n]` and scores `[R, n]`.
enum Scored {
    Logits(Vec<f32>),
    Candidates(Vec<i64>, Vec<f32>),
}

impl Scored {
    fn of(c: crate::generate::Chosen) -> Result<Scored> {
        match c.beams {
            Some((ids, vals)) => Ok(Scored::Candidates(ids, vals)),
            None if !c.logits.is_empty() => Ok(Scored::Logits(c.logits)),
            None => Err(Error::Usage("the program output neither beam candidates nor logits".into())),
        }
    }
}

impl Scored {
    /// Input `i`'s best `keep` continuations over its `k` beams' `v` tokens (of `rows` rows in
    /// all), best first: (`beam * v + token`, score), the `masked` ids scored `-inf`.
    fn best(
        &self,
        (i, k, v, rows): (usize, usize, usize, usize),
        scores: &[f32],
        keep: usize,
        masked: &[i64],
    ) -> Result<Vec<(usize, f32)>> {
        match self {
            Scored::Logits(logits) => {
                let mut acc = Vec::with_capacity(k * v);
                for j in 0..k {
                    let mut lp = log_softmax(&logits[(i * k + j) * v..(i * k + j + 1) * v]);
                    masked.iter().filter(|&&e| e >= 0 && (e as usize) < v).for_each(|&e| lp[e as usize] = f32::NEG_INFINITY);
                    acc.extend(lp.iter().map(|&x| x + scores[j]));
                }
                Ok(top_k(&acc, keep).into_iter().map(|x| (x, acc[x])).collect())
            }
            Scored::Candidates(ids, vals) => {
                let n = ids.len() / rows.max(1);
                merge_rows((ids, vals), (i, k, n, v), keep, |tok| masked.contains(&tok))
            }
        }
    }
}

/// The indices of the `k` largest of `x`, largest first (ties: the lower index first).
fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `log_softmax(row)` in f32, as torch computes it (here in f64, rounded): the code of
/// `Op::LogSoftmax`, the device's candidate step.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; row.len()];
    kiln_graph::sample::log_softmax_f32(row, &mut out);
    out
}

/// Input `i`'s best `keep` continuations from its `k` rows' device candidates (`n` a row, best
/// first): each row's list is its best in the order the host's selection has (the value, then
/// the token), so merging them by (value, `beam * v + token`) gives the host's order over all
/// `k * v` continuations. A candidate `masked` says is set to `-inf`, as the host masks it.
fn merge_rows(
    (ids, vals): (&[i64], &[f32]),
    (i, k, n, v): (usize, usize, usize, usize),
    keep: usize,
    masked: impl Fn(i64) -> bool,
) -> Result<Vec<(usize, f32)>> {
    let rows = (i * k..(i + 1) * k).map(|r| r * n..(r + 1) * n);
    if ids.len() != vals.len() || ids.len() < (i + 1) * k * n {
        return Err(Error::Usage(format!("{} beam candidates and {} scores for {k} beams of {n}", ids.len(), vals.len())));
    }
    let mut all = Vec::with_capacity(k * n);
    for (j, at) in rows.enumerate() {
        for (&tok, &val) in ids[at.clone()].iter().zip(&vals[at]) {
            if tok < 0 || tok as usize >= v {
                return Err(Error::Usage(format!("beam candidate {tok} is out of range for a vocabulary of {v}")));
            }
            all.push((j * v + tok as usize, if masked(tok) { f32::NEG_INFINITY } else { val }));
        }
    }
    // -0.0 never occurs (a log-probability x - lse is +0 at most, the scores start at +0), so
    // total_cmp agrees with the device's comparison.
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(keep);
    Ok(all)
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
        if self.beam_candidates.is_none() && !self.has_logits {
            return Err(Error::Usage(
                "beam search needs beam candidates or the logits: this generation program outputs only the chosen ids (compile it for beams)"
                    .into(),
            ));
        }
        let (n_in, s, c, v, l) = (self.batch, self.bucket, self.meta.capacity, self.meta.vocab, prompt.len);
        let initial: Vec<f32> = (0..n_in * k).map(|r| if r % k == 0 { 0.0 } else { -1e9 }).collect();
        self.beam_scores = self.beam_candidates.map(|_| Tensor::from_f32(&[n_in * k], &initial));
        let prefilled = self.prefill_rows(prompt, max_new_tokens, pixel_values);
        let Prefilled { first, mut mask, mut next_pos, prefill_s } = prefilled.inspect_err(|_| self.beam_scores = None)?;
        let mut scored = Scored::of(first)?;
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
                // The best `keep` continuations over [K * V]: (flattened index, score).
                let masked = if t < o.min_new_tokens { &eos[..] } else { &[] };
                let top = scored.best((i, k, v, n_in * k), &sr.scores, keep, masked)?;
                let cand: Vec<(usize, i64, f32, bool)> = top
                    .iter()
                    .map(|&(x, score)| {
                        let tok = (x % v) as i64;
                        (x / v, tok, score, last || eos.contains(&tok))
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
            if self.beam_candidates.is_some() {
                let running: Vec<f32> = search.iter().flat_map(|sr| sr.scores.iter().copied()).collect();
                self.beam_scores = Some(Tensor::from_f32(&[n_in * k], &running));
            }
            let step = self.decode_choose(&next, &mask, &next_pos, slot, 0);
            scored = Scored::of(step.inspect_err(|_| self.beam_scores = None)?)?;
            next_pos.iter_mut().for_each(|p| *p += 1);
            decode_s += t1.elapsed().as_secs_f64();
            decode_steps += 1;
        }
        self.beam_scores = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The device's path (each row's best `n` of `score + log_softmax`, by value then token,
    /// merged by [`merge_rows`]) picks exactly the host's best `keep` over all `K * V`
    /// continuations, order included, on rows full of ties (logits from a set of 3 values, equal
    /// beam scores, rows equal to each other) and with EOS masked.
    #[test]
    fn merged_candidates_equal_the_host_selection() {
        let (k, v) = (3, 9);
        let eos = [2i64, 7];
        for seed in 0..200u64 {
            let u = |i: u64| kiln_graph::sample::uniform(seed, i, 0);
            let mut logits: Vec<f32> = (0..k * v).map(|i| [0.5f32, 1.25, -2.0][(u(i as u64) * 3.0) as usize]).collect();
            if seed % 3 == 0 {
                let row0 = logits[..v].to_vec();
                logits[v..2 * v].copy_from_slice(&row0);
            }
            let scores: Vec<f32> = (0..k).map(|j| if seed % 2 == 0 { -1.5 } else { [0.0, -1e9, -0.75][j] }).collect();
            let masked = |tok: i64| seed % 4 < 2 && eos.contains(&tok);
            let keep = 2.max(1 + eos.len()) * k;
            let n = candidates_per_row(k, &eos, v);
            // The host: every continuation.
            let mut acc = Vec::new();
            let mut rows = Vec::new();
            for j in 0..k {
                let lp = log_softmax(&logits[j * v..(j + 1) * v]);
                let row: Vec<f32> = lp.iter().map(|&x| x + scores[j]).collect();
                acc.extend(row.iter().enumerate().map(|(t, &x)| if masked(t as i64) { f32::NEG_INFINITY } else { x }));
                rows.push(row);
            }
            let host: Vec<(usize, f32)> = top_k(&acc, keep).into_iter().map(|x| (x, acc[x])).collect();
            // The device: Op::TopK's order (value descending, ties to the lower token) per row.
            let (mut ids, mut vals) = (Vec::new(), Vec::new());
            for row in &rows {
                let mut idx: Vec<usize> = (0..v).collect();
                idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
                ids.extend(idx[..n].iter().map(|&t| t as i64));
                vals.extend(idx[..n].iter().map(|&t| row[t]));
            }
            let device = merge_rows((&ids, &vals), (0, k, n, v), keep, masked).expect("merge");
            assert_eq!(device.len(), host.len(), "seed {seed}");
            for (d, h) in device.iter().zip(&host) {
                assert_eq!((d.0, d.1.to_bits()), (h.0, h.1.to_bits()), "seed {seed}: {device:?} vs {host:?}");
            }
        }
        assert!(merge_rows((&[9], &[0.0]), (0, 1, 1, 9), 1, |_| false).is_err(), "a token past the vocabulary");
        // max(2, 1 + 3) * 4 + one valid EOS id, at most the vocabulary.
        assert_eq!(candidates_per_row(4, &[1, 1, 50], 10), 10);
        assert_eq!(candidates_per_row(2, &[1, 1, 50], 100), 4 * 2 + 2);
    }
}
