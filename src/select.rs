//! The next token chosen by the last kernel of a generation entry: the graph that
//! [`crate::generate`] appends to the model's `prefill` and `decode`, and the runtime inputs
//! that drive it.
//!
//! The model's `logits [R, 1, V]` (soft-capped where the model caps its decode steps) feed
//! [`Op::SampleToken`] (greedy, or transformers' sampling filters drawn with kiln's
//! counter-based generator, `kiln_graph::sample`), and a log-softmax gathered at the chosen
//! ids gives their log-probabilities. The entry's outputs become `ids [R]` (i64) and
//! `logprobs [R]` (f32): the host reads those, never the logits, unless the program was
//! compiled to keep them (`step_logits`: beam search and `kiln generate --step-logits`).
//!
//! Runtime inputs (one artifact serves greedy and every sampling setting):
//! - `sampling` f32 `[2]`: temperature (0: greedy) and top-p (1: off);
//! - `sampling_counters` i64 `[4]`: top-k (0: off), the seed's high and low 32 bits, and the
//!   step (the index of the token being chosen: 0 for the prefill's).
//!
//! Each row draws from its own stream, fixed at compile time: sample `j` of input `i` (row
//! `i * n + j` with `n` rows per input) draws from stream `i + j * B`, so sample 0 of every
//! input is what one sample per input gives.

use crate::sampling::HfSampling;
use crate::{Error, Result};
use kiln_graph::{BinaryOp, DType, Graph, Op, ReduceOp, UnaryOp};
use kiln_runtime::Tensor;

/// The name of the f32 `[2]` input (temperature, top-p).
pub const OPTIONS: &str = "sampling";
/// The name of the i64 `[4]` input (top-k, seed high, seed low, step).
pub const COUNTERS: &str = "sampling_counters";

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
}

/// Replaces `g`'s output `logits [rows, 1, V]` with `ids [R]` and `logprobs [R]` (and, with
/// `step_logits`, `logits [R, 1, V]` as the ids were chosen from).
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
    if s.spread && per > 1 {
        let idx = g.constant(DType::I64, &[rows], (0..rows).map(|r| (r / per) as f64).collect())?;
        x = g.push(Op::Gather { axis: 0 }, &[x, idx])?;
    }
    if g.shape(x)[0] != rows {
        return Err(Error::Usage(format!("the entry's logits have {} rows, expected {rows}", g.shape(x)[0])));
    }
    let options = g.input(OPTIONS, DType::F32, &[2])?;
    let counters = g.input(COUNTERS, DType::I64, &[4])?;
    let streams = g.constant(DType::I64, &[rows], (0..rows).map(|r| (r / per + (r % per) * b) as f64).collect())?;
    let ids = g.push(Op::SampleToken, &[x, options, counters, streams])?;
    // log p(id) = x[id] - max - log(sum(exp(x - max))).
    let max = g.reduce(ReduceOp::Max, x, &[1], true)?;
    let shifted = g.binary(BinaryOp::Sub, x, max)?;
    let e = g.unary(UnaryOp::Exp, shifted)?;
    let sum = g.reduce(ReduceOp::Sum, e, &[1], true)?;
    let log_sum = g.unary(UnaryOp::Log, sum)?;
    let at = g.reshape(ids, &[rows, 1])?;
    let chosen = g.push(Op::TakeAlongAxis { axis: 1 }, &[shifted, at])?;
    let lp = g.binary(BinaryOp::Sub, chosen, log_sum)?;
    let lp = g.reshape(lp, &[rows])?;
    g.outputs.remove(k);
    g.output("ids", ids);
    g.output("logprobs", lp);
    if s.step_logits {
        let kept = g.reshape(x, &[rows, 1, v])?;
        g.output("logits", kept);
    }
    Ok(())
}

/// The runtime inputs for choosing token `step` (0: the prefill's) under `sampling` (`None`:
/// greedy).
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
