//! Choosing the next token, the code both sides run: [`Op::SampleToken`](crate::Op)'s
//! interpreter arm (so the cpu backend's step, and the oracle every other backend is checked
//! against) and the host's sampler (`kiln::sampling`). It lives in the graph crate because
//! the interpreter needs it; the host calls the same functions, so a seed gives the same
//! tokens whether the last kernel or the host chooses them.
//!
//! - [`uniform`]: kiln's counter-based random numbers: one number in [0, 1) per (seed,
//!   stream, step), SplitMix64's finaliser chained over the three (no state to carry).
//! - [`pick`]: transformers' `generate(do_sample=True)` filters (temperature, then top-k
//!   keeping ties with the k-th, then top-p over scores sorted ascending and stably by index,
//!   the largest always kept) and a draw from the softmax of what is left; temperature 0 is
//!   greedy (the first argmax, as `torch.argmax`).

/// A number in [0, 1) for `(seed, row, step)`: 53 bits of SplitMix64's finaliser applied
/// to the seed, then mixed with the row, then with the step.
pub fn uniform(seed: u64, row: u64, step: u64) -> f64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let h = mix(mix(mix(seed) ^ row) ^ step);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The index of the largest value, the first one on ties (as `torch.argmax`).
pub fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Sampling settings. `temperature <= 0` is greedy; `top_k` 0 and `top_p` 1 are off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Filters {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
}

/// The token drawn from `logits` with the uniform number `u` in [0, 1) under `f`.
pub fn pick(logits: &[f64], f: &Filters, u: f64) -> usize {
    if f.temperature <= 0.0 || logits.len() < 2 {
        return argmax(logits);
    }
    let n = logits.len();
    let scores: Vec<f64> = logits.iter().map(|&v| v / f.temperature).collect();
    let mut keep = vec![true; n];
    if f.top_k > 0 && f.top_k < n {
        let mut sorted = scores.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[f.top_k - 1];
        for (k, s) in keep.iter_mut().zip(&scores) {
            *k = *s >= kth;
        }
    }
    if f.top_p < 1.0 {
        let mut order: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let max = scores[*order.last().unwrap_or(&0)];
        let z: f64 = order.iter().map(|&i| (scores[i] - max).exp()).sum();
        let mut cum = 0.0;
        for (j, &i) in order.iter().enumerate() {
            cum += (scores[i] - max).exp() / z;
            if cum <= 1.0 - f.top_p && j + 1 < order.len() {
                keep[i] = false;
            }
        }
    }
    let kept: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
    draw(&kept, |i| scores[i], u)
}

/// The token of `kept` (ascending indices) that `u` in [0, 1) picks from the softmax of
/// `score(i)` over them: the first whose running probability, summed in index order in
/// double precision, exceeds `u`.
pub fn draw(kept: &[usize], score: impl Fn(usize) -> f64, u: f64) -> usize {
    let max = kept.iter().fold(f64::NEG_INFINITY, |m, &i| m.max(score(i)));
    let w: Vec<f64> = kept.iter().map(|&i| (score(i) - max).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut cum = 0.0;
    for (j, wj) in w.iter().enumerate() {
        cum += wj / total;
        if u < cum {
            return kept[j];
        }
    }
    kept.last().copied().unwrap_or(0)
}

/// `log(sum(exp(row)))` in double precision: the row's max, then the sum of `exp(x - max)`
/// in index order.
pub fn log_sum_exp(row: &[f64]) -> f64 {
    lse(|| row.iter().copied())
}

/// [`log_sum_exp`] of f32 values (widened exactly: the same result as on the widened row).
pub fn log_sum_exp_f32(row: &[f32]) -> f64 {
    lse(|| row.iter().map(|&v| v as f64))
}

fn lse<I: Iterator<Item = f64>>(row: impl Fn() -> I) -> f64 {
    let max = row().fold(f64::NEG_INFINITY, f64::max);
    max + row().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// `row - log_sum_exp(row)`: the log-softmax [`Op::LogSoftmax`](crate::Op) computes before
/// rounding to its element type, and the host's beam search and log-probabilities take.
pub fn log_softmax(row: &[f64]) -> Vec<f64> {
    let lse = log_sum_exp(row);
    row.iter().map(|&x| x - lse).collect()
}

/// [`log_softmax`] of an f32 row rounded to f32, into `out` (the cpu kernel; no allocation).
pub fn log_softmax_f32(row: &[f32], out: &mut [f32]) {
    let lse = log_sum_exp_f32(row);
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (x as f64 - lse) as f32;
    }
}

/// [`log_softmax_f32`] of each row of `n` values of `x` into `out` (the cpu kernel).
pub fn log_softmax_rows_f32(x: &[f32], n: usize, out: &mut [f32]) {
    x.chunks(n.max(1)).zip(out.chunks_mut(n.max(1))).for_each(|(x, o)| log_softmax_f32(x, o));
}

/// `row[id] - log_sum_exp(row)`: the log-probability [`Op::TokenLogProb`](crate::Op) computes
/// before rounding to f32, the element `id` of [`log_softmax`] (the same arithmetic).
pub fn token_log_prob(row: &[f64], id: usize) -> f64 {
    row[id] - log_sum_exp(row)
}

/// [`token_log_prob`] of an f32 row rounded to f32: element `id` of [`log_softmax_f32`]'s
/// output, bit for bit (the cpu kernel).
pub fn token_log_prob_f32(row: &[f32], id: usize) -> f32 {
    (row[id] as f64 - log_sum_exp_f32(row)) as f32
}

/// What [`Op::SampleToken`](crate::Op) reads from its runtime inputs, checked: `options`
/// `[temperature, top_p]` (f32) and `counters` `[top_k, seed >> 32, seed & 0xffff_ffff, step]`
/// (i64; the seed split so each half is exact in the interpreter's f64 values).
pub fn runtime_filters(options: &[f64], counters: &[f64]) -> Result<(Filters, u64, u64), String> {
    let ([t, p], [k, hi, lo, step]) = (options, counters) else {
        return Err(format!("sampling options: {} and {} values, expected 2 and 4", options.len(), counters.len()));
    };
    if !t.is_finite() || (*t > 0.0 && !(*p > 0.0 && *p <= 1.0)) {
        return Err(format!("temperature {t}, top_p {p}: expected a finite temperature (<= 0 greedy) and top_p in (0, 1]"));
    }
    let word = |x: f64, what: &str| {
        if (0.0..4_294_967_296.0).contains(&x) && x.fract() == 0.0 {
            Ok(x as u64)
        } else {
            Err(format!("{what} {x}: expected an integer in [0, 2^32)"))
        }
    };
    let (k, hi, lo, step) = (word(*k, "top_k")?, word(*hi, "seed (high half)")?, word(*lo, "seed (low half)")?, word(*step, "step")?);
    Ok((Filters { temperature: *t, top_k: k as usize, top_p: *p }, (hi << 32) | lo, step))
}

/// [`Op::SampleToken`](crate::Op) on plain values: `logits [B, V]` row-major, the runtime
/// inputs as [`runtime_filters`] reads them, and each row's random stream; the ids `[B]`.
pub fn sample_rows(logits: &[f64], options: &[f64], counters: &[f64], streams: &[f64]) -> Result<Vec<f64>, String> {
    let (f, seed, step) = runtime_filters(options, counters)?;
    let b = streams.len();
    if b == 0 || !logits.len().is_multiple_of(b) {
        return Err(format!("{} logits for {b} rows", logits.len()));
    }
    let v = logits.len() / b;
    let mut ids = Vec::with_capacity(b);
    for (r, row) in logits.chunks(v).enumerate() {
        let stream = streams[r];
        if !(stream >= 0.0 && stream.fract() == 0.0) {
            return Err(format!("stream {stream} of row {r}: expected an integer >= 0"));
        }
        ids.push(pick(row, &f, uniform(seed, stream as u64, step)) as f64);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log-softmax's probabilities sum to 1; the f32 rows are the f64 values rounded; a
    /// constant shift of the row leaves it unchanged.
    #[test]
    fn log_softmax_is_the_host_formula() {
        let row: Vec<f32> = (0..50).map(|i| (uniform(3, i, 0) * 20.0 - 10.0) as f32).collect();
        let wide: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let lp = log_softmax(&wide);
        assert!((lp.iter().map(|x| x.exp()).sum::<f64>() - 1.0).abs() < 1e-12);
        let mut out = vec![0.0f32; 100];
        let twice: Vec<f32> = row.iter().chain(&row).copied().collect();
        log_softmax_rows_f32(&twice, 50, &mut out);
        assert!(out[..50].iter().zip(&lp).all(|(&a, &b)| a == b as f32) && out[..50] == out[50..]);
        let shifted: Vec<f64> = wide.iter().map(|x| x + 4.0).collect();
        assert!(log_softmax(&shifted).iter().zip(&lp).all(|(a, b)| (a - b).abs() < 1e-12));
        // One token's log-probability is that element of the log-softmax, bit for bit.
        for id in [0, 17, 49] {
            assert_eq!(token_log_prob_f32(&row, id).to_bits(), out[id].to_bits());
            assert_eq!(token_log_prob(&wide, id).to_bits(), lp[id].to_bits());
        }
    }

    /// Bad runtime inputs are errors, not panics; greedy ignores top-p.
    #[test]
    fn runtime_inputs_are_checked() {
        assert!(runtime_filters(&[1.0, 0.0], &[0.0, 0.0, 1.0, 0.0]).is_err());
        assert!(runtime_filters(&[f64::NAN, 1.0], &[0.0, 0.0, 1.0, 0.0]).is_err());
        assert!(runtime_filters(&[1.0, 1.0], &[-1.0, 0.0, 1.0, 0.0]).is_err());
        assert!(runtime_filters(&[1.0, 1.0], &[0.0, 0.0, 1.5, 0.0]).is_err());
        assert!(runtime_filters(&[1.0], &[0.0, 0.0, 1.0, 0.0]).is_err());
        let (f, seed, step) = runtime_filters(&[0.0, 0.0], &[3.0, 1.0, 5.0, 7.0]).expect("greedy");
        assert_eq!((f.top_k, seed, step), (3, (1 << 32) | 5, 7));
        assert!(sample_rows(&[0.0; 5], &[1.0, 1.0], &[0.0; 4], &[0.0, 1.0]).is_err());
        assert!(sample_rows(&[0.0; 4], &[1.0, 1.0], &[0.0; 4], &[0.0, -1.0]).is_err());
        assert_eq!(sample_rows(&[0.0, 3.0, 3.0, 1.0], &[0.0, 0.0], &[0.0; 4], &[0.0, 0.0]).unwrap(), vec![1.0, 0.0]);
    }
}
