//! The next token chosen by the last kernel of a generation entry: the graph that
//! [`crate::generate`] appends to the model's `prefill` and `decode`, and the runtime inputs
//! that drive it.
//!
//! The model's `logits [R, 1, V]` (soft-capped where the model caps its decode steps) end in
//! one of three ways ([`Choice`]):
//! - [`Choice::Sample`]: [`Op::SampleToken`] (greedy, or transformers' sampling filters drawn
//!   with kiln's counter-based generator, `kiln_graph::sample`), and [`Op::TokenLogProb`] gives
//!   the chosen ids' log-probabilities in one step (the log-softmax's elements at the ids, with
//!   the host's f64 log-sum-exp where the backend has f64). Outputs `ids [R]` (i64) and
//!   `logprobs [R]` (f32): the host reads those (12 bytes a row), never the logits.
//! - [`Choice::Greedy`]: the first argmax as `Op::TopK { k: 1 }` and its log-probability, for
//!   backends without a sampling kernel (cube: WGSL has no f64 or u64). The same outputs; the
//!   logits stay on the device in the state [`LOGITS_STATE`], which the host reads only to
//!   sample (a temperature above 0), with the host's copy of the same sampling code.
//! - [`Choice::Beams`]: beam search's candidates. The input `beam_scores` f32 `[R]` (each
//!   beam's running score) is added to `Op::LogSoftmax` of the logits (the host's f64
//!   log-sum-exp, so the sums equal the host's bit for bit); `Op::TopK { k: n }` keeps each
//!   row's `n` best and a take-along-axis gathers them. Outputs `beam_ids [R, n]` (i64) and
//!   `beam_logprobs [R, n]` (f32, the beam's score plus the token's log-probability): the host
//!   reads `R * n * 12` bytes a step, not the `R * V * 4` of the logits.
//!
//! With `step_logits` the entry also outputs the `logits [R, 1, V]` the choice was made from
//! (`kiln generate --step-logits`, the Python package).
//!
//! Runtime inputs of [`Choice::Sample`] (one artifact serves greedy and every sampling setting):
//! - `sampling` f32 `[2]`: temperature (0: greedy) and top-p (1: off);
//! - `sampling_counters` i64 `[4]`: top-k (0: off), the seed's high and low 32 bits, and the
//!   step (the index of the token being chosen: 0 for the prefill's).
//!
//! Each row draws from its own stream, fixed at compile time: sample `j` of input `i` (row
//! `i * n + j` with `n` rows per input) draws from stream `i + j * B`, so sample 0 of every
//! input is what one sample per input gives.

use crate::sampling::HfSampling;
use crate::{Error, Result};
use kiln_graph::program::Program;
use kiln_graph::{BinaryOp, DType, Graph, Op, UnaryOp};
use kiln_runtime::Tensor;

/// The name of the f32 `[2]` input (temperature, top-p).
pub const OPTIONS: &str = "sampling";
/// The name of the i64 `[4]` input (top-k, seed high, seed low, step).
pub const COUNTERS: &str = "sampling_counters";
/// The name of [`Choice::Greedy`]'s f32 `[R, 1, V]` state: the logits of the last step, left
/// on the device; the host reads them ([`kiln_runtime::Session::state`]) only to sample.
pub const LOGITS_STATE: &str = "sampling_logits";
/// The name of [`Choice::Beams`]' f32 `[R]` input (each beam's running score).
pub const BEAM_SCORES: &str = "beam_scores";

/// How an entry chooses its next tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// `Op::SampleToken`: greedy or sampled, by the runtime inputs.
    Sample,
    /// The first argmax (`Op::TopK { k: 1 }`); the logits are kept in the state
    /// [`LOGITS_STATE`], which the host reads to sample.
    Greedy,
    /// Beam search's `n` best continuations per row.
    Beams { n: usize },
}

/// How a generation entry ends: `batch` inputs, `rows_per_input` rows each (the entry's
/// logits have `batch` rows when `spread`, each then copied to its `rows_per_input` rows;
/// else they have all `batch * rows_per_input`), a soft-cap on the logits, and whether the
/// logits stay an output.
pub struct Selection {
    pub batch: usize,
    pub rows_per_input: usize,
    pub spread: bool,
    pub softcap: Option<f32>,
    pub step_logits: bool,
    pub choice: Choice,
}

/// Replaces `g`'s output `logits [rows, 1, V]` with what `s.choice` outputs (and, with
/// `step_logits`, `logits [R, 1, V]` as the choice was made from).
pub fn append(g: &mut Graph, s: &Selection) -> Result<()> {
    let k = g.outputs.iter().position(|(n, _)| n == "logits").ok_or_else(|| Error::Usage("the entry has no logits output".into()))?;
    let logits = g.outputs[k].1;
    let (b, per) = (s.batch, s.rows_per_input);
    let rows = b * per;
    let shape = g.shape(logits).to_vec();
    let v = *shape.last().unwrap_or(&0);
    let mut x = g.reshape(logits, &[shape.iter().product::<usize>() / v.max(1), v])?;
    if g.ty(x).dtype != DType::F32 {
        x = g.push(Op::Cast { to: DType::F32 }, &[x])?;
    }
    if let Some(cap) = s.softcap {
        let c = g.scalar(DType::F32, cap as f64)?;
        let y = g.binary(BinaryOp::Div, x, c)?;
        let y = g.unary(UnaryOp::Tanh, y)?;
        x = g.mul(y, c)?;
    }
    let own_rows = x;
    if s.spread && per > 1 {
        let idx = g.constant(DType::I64, &[rows], (0..rows).map(|r| (r / per) as f64).collect())?;
        x = g.push(Op::Gather { axis: 0 }, &[x, idx])?;
    }
    if g.shape(x)[0] != rows {
        return Err(Error::Usage(format!("the entry's logits have {} rows, expected {rows}", g.shape(x)[0])));
    }
    g.outputs.remove(k);
    match s.choice {
        Choice::Sample | Choice::Greedy => {
            let ids = match s.choice {
                Choice::Sample => {
                    let options = g.input(OPTIONS, DType::F32, &[2])?;
                    let counters = g.input(COUNTERS, DType::I64, &[4])?;
                    let streams = g.constant(DType::I64, &[rows], (0..rows).map(|r| (r / per + (r % per) * b) as f64).collect())?;
                    g.push(Op::SampleToken, &[x, options, counters, streams])?
                }
                _ => {
                    // The logits stay on the device, in a state the host reads to sample; a
                    // prefill writes its inputs' rows first (zeros after), as it writes the KV
                    // cache's first rows, so that spreading the states to the rows spreads them too.
                    let mut kept = own_rows;
                    if g.shape(kept)[0] < rows {
                        let z = g.scalar(DType::F32, 0.0)?;
                        let z = g.push(Op::Broadcast { shape: vec![rows - g.shape(kept)[0], v] }, &[z])?;
                        kept = g.concat(&[kept, z], 0)?;
                    }
                    let kept = g.reshape(kept, &[rows, 1, v])?;
                    g.output(LOGITS_STATE, kept);
                    let first = g.push(Op::TopK { k: 1 }, &[x])?;
                    g.reshape(first, &[rows])?
                }
            };
            // One step: `logits[r, id] - log_sum_exp(logits[r, :])` (cpu and cuda: the
            // log-softmax's value bit for bit; cube: in f32).
            let lp = g.push(Op::TokenLogProb, &[x, ids])?;
            g.output("ids", ids);
            g.output("logprobs", lp);
        }
        Choice::Beams { n } => {
            if n == 0 || n > v {
                return Err(Error::Usage(format!("{n} beam candidates per row from a vocabulary of {v}")));
            }
            let scores = g.input(BEAM_SCORES, DType::F32, &[rows])?;
            let scores = g.reshape(scores, &[rows, 1])?;
            let lp = g.push(Op::LogSoftmax, &[x])?;
            let acc = g.binary(BinaryOp::Add, lp, scores)?;
            let ids = g.push(Op::TopK { k: n }, &[acc])?;
            let vals = g.push(Op::TakeAlongAxis { axis: 1 }, &[acc, ids])?;
            g.output("beam_ids", ids);
            g.output("beam_logprobs", vals);
        }
    }
    if s.step_logits {
        let kept = g.reshape(x, &[rows, 1, v])?;
        g.output("logits", kept);
    }
    Ok(())
}

/// What a generation program's `decode` entry says about how it ends: whether it chooses
/// (outputs `ids` or `beam_ids`), outputs `logits`, takes the sampling inputs, and how many
/// beam candidates a row it outputs.
pub(crate) fn ends_of(program: &Program) -> (bool, bool, bool, Option<usize>) {
    let decode = program.entry("decode");
    let output = |n: &str| decode.and_then(|e| e.outputs.iter().find(|io| io.name == n));
    let takes = |n: &str| decode.is_some_and(|e| e.inputs.iter().any(|io| io.name == n));
    let beams = output("beam_ids").and_then(|io| io.operand.ty.shape.get(1).copied());
    (output("ids").is_some() || beams.is_some(), output("logits").is_some(), takes(OPTIONS), beams)
}

/// Adds the selection step's runtime inputs a program takes: the sampling options `sel` where
/// it samples on the device, beam search's `scores` where it scores beams.
pub(crate) fn add_inputs<'a>(
    ins: &mut Vec<(&'a str, &'a Tensor)>,
    sel: &'a [(&'static str, Tensor); 2],
    samples: bool,
    scores: Option<&'a Tensor>,
) {
    if samples {
        ins.extend(sel.iter().map(|(n, t)| (*n, t)));
    }
    if let Some(t) = scores {
        ins.push((BEAM_SCORES, t));
    }
}

/// The bytes the host reads back from one run of `program`'s `decode` entry: its outputs other
/// than the states (`kiln generate`'s JSON `host_read_bytes_per_step`).
pub fn bytes_read_per_step(program: &Program) -> usize {
    let Some(e) = program.entry("decode") else { return 0 };
    e.outputs.iter().filter(|io| program.state_index(&io.name).is_none()).map(|io| io.operand.ty.bytes()).sum()
}

/// The runtime inputs of [`Choice::Sample`] for choosing token `step` (0: the prefill's) under
/// `sampling` (`None`: greedy).
pub fn inputs(sampling: Option<&HfSampling>, step: usize) -> [(&'static str, Tensor); 2] {
    let (t, k, p, seed) = match sampling {
        Some(s) => (s.temperature as f32, s.top_k as i64, s.top_p as f32, s.seed),
        None => (0.0, 0, 1.0, 0),
    };
    [
        (OPTIONS, Tensor::from_f32(&[2], &[t, p])),
        (COUNTERS, Tensor::from_i64(&[4], &[k, (seed >> 32) as i64, (seed & 0xffff_ffff) as i64, step as i64])),
    ]
}
