//! A generation step's last two steps as one launch (issue 16): the next token
//! (`Op::SampleToken`, `sample_token_f32`) and its log-probability (`Op::TokenLogProb` of the
//! id just chosen, on the same logits, `token_log_prob_f32_i64`) run as one
//! `sample_token_log_prob_f32` launch: each block chooses its row's token, then takes the
//! row's log-sum-exp while the logits are still in cache, with the same bits as the two
//! kernels. This runs after [`super::merge::merge_pairs`], on what it left: the log-probability
//! must be the next step that launches anything after the sample, and its output must overlap
//! none of the sample's operands (other blocks may still be reading them).

use super::merge::{overlaps, range};
use super::{addr, Launch, Layout, Work};
use kiln_graph::program::Step;
use kiln_graph::Op;

/// The merged kernel (`kernels/src/cuda/index.cu`).
pub const SAMPLE_LOG_PROB: &str = "sample_token_log_prob_f32";

fn only_launch<'a>(work: &'a [Work], kernel: &str) -> Option<&'a Launch> {
    match work {
        [Work::Kernel(k)] if k.kernel == kernel => Some(k),
        _ => None,
    }
}

/// Merges each sample step with the log-probability step that reads its ids (see the module
/// doc) in place: the sample's launch goes, the log-probability's becomes the merged one.
/// `has(kernel)` says whether the merged kernel may be launched (a CUBIN stored before it
/// lacks it). Returns the (sample, log-probability) steps merged.
pub fn sample_with_log_prob(
    steps: &[Step],
    work: &mut [Vec<Work>],
    l: &Layout,
    has: &dyn Fn(&str) -> bool,
) -> Result<Vec<(usize, usize)>, (usize, String)> {
    let mut merged = Vec::new();
    if !has(SAMPLE_LOG_PROB) {
        return Ok(merged);
    }
    for i in 0..steps.len() {
        if !matches!(steps[i].op, Op::SampleToken) {
            continue;
        }
        let Some(sample) = only_launch(&work[i], "sample_token_f32") else { continue };
        let Some(j) = (i + 1..steps.len()).find(|&j| !work[j].is_empty()) else { continue };
        let (s, t) = (&steps[i], &steps[j]);
        if !matches!(t.op, Op::TokenLogProb) || only_launch(&work[j], "token_log_prob_f32_i64").is_none() {
            continue;
        }
        let same = |a: &kiln_graph::program::Operand, b: &kiln_graph::program::Operand| a.slot == b.slot && a.ty == b.ty;
        if t.inputs.len() != 2 || !same(&t.inputs[0], &s.inputs[0]) || !same(&t.inputs[1], &s.output) {
            continue;
        }
        let out = range(&t.output, l).map_err(|m| (j, m))?;
        let mut touched = vec![range(&s.output, l).map_err(|m| (i, m))?];
        for o in &s.inputs {
            touched.push(range(o, l).map_err(|m| (i, m))?);
        }
        if touched.iter().any(|&r| overlaps(r, out)) {
            continue;
        }
        // `struct SampleLogProbParams { SampleParams s; i64 logprob; }`.
        let mut fused = sample.clone();
        fused.kernel = SAMPLE_LOG_PROB.to_string();
        fused.relocs.push(fused.params.len());
        fused.params.extend_from_slice(&addr(&t.output, l).map_err(|m| (j, m))?.to_le_bytes());
        work[i].clear();
        work[j] = vec![Work::Kernel(fused)];
        merged.push((i, j));
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{arena, tt};
    use super::super::{lower_entry, lower_step, with_kernel};
    use super::*;
    use kiln_graph::DType;

    const V: usize = 64;

    /// Greedy-or-sampled ids of logits `[2, V]` at 0 (opts at 1024, counters at 1280, streams
    /// at 1536) into `ids`.
    fn sample(ids: usize) -> Step {
        let inputs = vec![
            arena(0, tt(DType::F32, &[2, V])),
            arena(1024, tt(DType::F32, &[2])),
            arena(1280, tt(DType::I64, &[4])),
            arena(1536, tt(DType::I64, &[2])),
        ];
        with_kernel(Step { node: 0, op: Op::SampleToken, kernel: String::new(), inputs, output: arena(ids, tt(DType::I64, &[2])) })
    }

    fn log_prob(ids: usize, out: usize) -> Step {
        let inputs = vec![arena(0, tt(DType::F32, &[2, V])), arena(ids, tt(DType::I64, &[2]))];
        with_kernel(Step { node: 1, op: Op::TokenLogProb, kernel: String::new(), inputs, output: arena(out, tt(DType::F32, &[2])) })
    }

    fn kernel(w: &[Work]) -> &Launch {
        let [Work::Kernel(k)] = w else { panic!("{w:?}") };
        k
    }

    #[test]
    fn the_token_and_its_log_probability_are_one_launch() {
        let steps = [sample(2048), log_prob(2048, 2304)];
        let l = Layout { scratch: 1 << 20, ..Default::default() };
        let lowered = lower_entry(&steps, &l, &|_| true).unwrap();
        assert_eq!(lowered.pairs, [(0, 1)]);
        assert!(lowered.work[0].is_empty());
        let single = lower_step(&steps[0], &l).unwrap();
        let (a, b) = (kernel(&single), kernel(&lowered.work[1]));
        assert_eq!((a.kernel.as_str(), b.kernel.as_str()), ("sample_token_f32", SAMPLE_LOG_PROB));
        // The sample's block, then the log-probabilities' address, relocated like the others.
        assert_eq!(&b.params[..a.params.len()], &a.params[..]);
        assert_eq!((b.params.len(), b.relocs.len()), (a.params.len() + 8, a.relocs.len() + 1));
        let read = |at: usize| u64::from_le_bytes(b.params[at..at + 8].try_into().unwrap());
        assert_eq!(read(*b.relocs.last().unwrap()), 2304);
        assert_eq!((b.grid, b.block), (a.grid, a.block));
    }

    #[test]
    fn the_merge_is_refused_where_it_could_change_a_byte() {
        let l = Layout { scratch: 1 << 20, ..Default::default() };
        let merges = |steps: &[Step], has: &dyn Fn(&str) -> bool| lower_entry(steps, &l, has).unwrap().pairs.len();
        // A CUBIN without the merged kernel.
        assert_eq!(merges(&[sample(2048), log_prob(2048, 2304)], &|k| k != SAMPLE_LOG_PROB), 0);
        // The log-probabilities written over the sampling options, which other blocks read.
        assert_eq!(merges(&[sample(2048), log_prob(2048, 1024)], &|_| true), 0);
        // The log-probability of other ids than the sample's.
        assert_eq!(merges(&[sample(2048), log_prob(2560, 2304)], &|_| true), 0);
        // A launch between the two (another sample, of other ids).
        assert_eq!(merges(&[sample(2048), sample(2560), log_prob(2048, 2304)], &|_| true), 0);
    }
}
