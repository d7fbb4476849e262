//! Two independent launches of the same kernel as one (issue 16): K's and V's cache writes
//! (`write_rows_*` in decode, a concat's `copy_b*` in prefill), RoPE on q and on k
//! (`fused_rot_*`, where the memory plan allows), or any two steps running one fused region.
//! The merged launch runs the kernel's `_x2` entry point, which takes both parameter blocks
//! (`struct { P p[2]; }`) and runs half `blockIdx.y` of them, at the later step's position. This runs after the schedule and the memory plan are fixed, so it moves the
//! earlier step only where doing so changes no byte any step reads or the entry leaves
//! (two fused regions may instead run at the earlier step's position, the later one moving
//! back, under the same conditions for it):
//!
//! - every step between the two (that launches anything) neither reads the moved step's
//!   output nor writes bytes the moved step reads or writes (the plan reused memory for the
//!   original order);
//! - the two steps are independent of each other: neither's output overlaps the other's
//!   inputs or output (the later one reads nothing the earlier writes, and the two halves of
//!   one launch may run in any order).
//!
//! A step takes part only where every launch it lowers to is of a pairable kernel on a
//! one-dimensional grid; two steps pair when they launch the same kernels in the same order,
//! which merge launch by launch (two concats' copies; a `write_rows` after its copy).

use super::{addr, lower_step, Launch, Layout, Work};
use kiln_graph::program::{Operand, Slot, Step};

/// An entry's device work: one list per step, in order, and the merged pairs.
pub struct Lowered {
    pub work: Vec<Vec<Work>>,
    /// (moved step, host step) of each merged launch, which runs at the host: two launches of
    /// one kernel ([`merge_pairs`]: the host is the later step, or the earlier one where the
    /// later moved back) or a sample and its log-probability ([`super::fold`], at the later).
    pub pairs: Vec<(usize, usize)>,
    /// (write, attention) of each cache write the attention's launch does
    /// ([`super::kv_write`]), then (permute, its first reader) of each permute its readers
    /// read through strides ([`super::permute`]); the absorbed step makes no launch.
    pub absorbed: Vec<(usize, usize)>,
}

/// Lowers every step of an entry ([`lower_step`]), folds permutes into the elementwise
/// launches reading them ([`super::permute::fold_permutes`]), runs each split attention as one
/// launch ([`super::attention::one_launch`]), moves decode's and prefill's cache writes into the
/// attention
/// ([`super::kv_write::absorb_cache_writes`]), then merges the pairs [`merge_pairs`] finds
/// among the rest (these see a folded permute's readers reading its source). `has` as in
/// [`merge_pairs`]; an error names the step.
pub fn lower_entry(steps: &[Step], l: &Layout, has: &dyn Fn(&str) -> bool) -> Result<Lowered, (usize, String)> {
    let mut work = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        work.push(lower_step(s, l).map_err(|m| (i, m))?);
    }
    let folded = super::permute::fold_permutes(steps, &mut work, l);
    let steps = folded.steps.as_slice();
    super::attention::one_launch(&mut work, has);
    let mut absorbed = super::kv_write::absorb_cache_writes(steps, &mut work, l, has);
    let mut pairs = merge_pairs(steps, &mut work, l, has, &absorbed)?;
    super::copies::join_concat_copies(steps, &mut work, l, has, &pairs)?;
    pairs.extend(super::fold::sample_with_log_prob(steps, &mut work, l, has)?);
    absorbed.extend(folded.absorbed);
    Ok(Lowered { work, pairs, absorbed })
}

/// The suffix of a kernel's two-launch entry point.
pub const X2: &str = "_x2";
/// The suffix of a copy's four-launch entry point ([`super::copies`]).
pub const X4: &str = "_x4";

/// Whether `kernel` is an entry that runs steps together (`CudaBackend::fuse` off treats it as
/// absent): a `_x2` pair, a `_x4` concat pair, the one-launch split attention and the ones
/// storing the new K/V rows (decode's and prefill's), the next token with its log-probability.
pub fn fusing(kernel: &str) -> bool {
    kernel.ends_with(X2)
        || kernel.ends_with(X4)
        || kernel.starts_with("attn_rows1_")
        || kernel.starts_with("attn_rows_new_")
        || kernel.starts_with("attn_mma_new_")
        || kernel.starts_with("sample_token_log_prob_")
}

/// Whether `kernel` has an `_x2` entry point: the fused regions, the row writes, the copies.
pub fn pairable(kernel: &str) -> bool {
    kernel.starts_with("fused_") || kernel.starts_with("write_rows_") || kernel.starts_with("copy_b")
}

/// A byte range `[start, end)` of the allocation.
pub(super) type Range = (u64, u64);

pub(super) fn range(o: &Operand, l: &Layout) -> Result<Range, String> {
    let start = addr(o, l)?;
    let bytes = match o.slot {
        Slot::Arena { bytes, .. } => bytes.max(o.ty.bytes()),
        Slot::Weight(_) | Slot::Const(_) | Slot::State(_) => o.ty.bytes(),
    };
    Ok((start, start + bytes as u64))
}

pub(super) fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}

/// What a step reads and writes on the device.
pub(super) struct Access {
    reads: Vec<Range>,
    pub(super) write: Range,
}

impl Access {
    pub(super) fn of(s: &Step, l: &Layout) -> Result<Access, String> {
        Ok(Access { reads: s.inputs.iter().map(|o| range(o, l)).collect::<Result<_, _>>()?, write: range(&s.output, l)? })
    }

    pub(super) fn reads(&self, r: Range) -> bool {
        self.reads.iter().any(|&x| overlaps(x, r))
    }

    /// Whether `self` and `other` may run in either order (or at once): neither reads the
    /// other's output, and the outputs do not overlap. A step may move past a later step
    /// exactly when the two are independent.
    fn independent(&self, other: &Access) -> bool {
        !self.reads(other.write) && !other.reads(self.write) && !overlaps(self.write, other.write)
    }
}

/// The launches of `work` if all are pairable (on one-dimensional grids), else none.
fn launches(work: &[Work]) -> Option<Vec<&Launch>> {
    work.iter()
        .map(|w| match w {
            Work::Kernel(k) if pairable(&k.kernel) && k.grid.1 == 1 && k.grid.2 == 1 && k.params.len() % 8 == 0 => Some(k),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .filter(|v| !v.is_empty())
}

/// Whether two steps' launches pair up one by one: the same kernels with blocks of one size.
fn same_kernels(a: &[&Launch], b: &[&Launch]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| x.kernel == y.kernel && x.block == y.block && x.smem == y.smem && x.params.len() == y.params.len())
}

/// One launch of `a`'s kernel's `_x2` entry running `a` (half 0) and `b` (half 1).
pub fn merged(a: &Launch, b: &Launch) -> Launch {
    joined(a, b, format!("{}{X2}", a.kernel))
}

/// One launch of entry `kernel` running `a`'s parameter blocks, then `b`'s, one per
/// `blockIdx.y`: `a`'s and `b`'s blocks side by side, `b`'s relocations moved past `a`'s.
pub(super) fn joined(a: &Launch, b: &Launch, kernel: String) -> Launch {
    let mut params = a.params.clone();
    params.extend_from_slice(&b.params);
    let mut relocs = a.relocs.clone();
    relocs.extend(b.relocs.iter().map(|r| r + a.params.len()));
    let halves = a.grid.1 + b.grid.1;
    Launch { module: a.module.clone(), kernel, grid: (a.grid.0.max(b.grid.0), halves, 1), block: a.block, smem: a.smem, params, relocs }
}

/// Merges pairs of `work` (one list per step of `steps`, lowered in order) in place: the
/// earlier step's launch goes, the later step's becomes the merged one (for two fused regions
/// where only the later step may move, the other way round). `has(kernel)` says
/// whether an `_x2` entry may be launched (a load passes the loaded modules: an artifact's
/// CUBINs from before these entries lack them). `absorbed` holds (step, the step whose launch
/// does its work) of steps that launch nothing themselves. Returns the (moved, host) steps
/// merged: (earlier, later), or (later, earlier) where the later step moved.
pub fn merge_pairs(
    steps: &[Step],
    work: &mut [Vec<Work>],
    l: &Layout,
    has: &dyn Fn(&str) -> bool,
    absorbed: &[(usize, usize)],
) -> Result<Vec<(usize, usize)>, (usize, String)> {
    // What runs at each step's position: a merged launch holds both steps' accesses, a launch
    // that does an absorbed step's work that step's too.
    let mut access: Vec<Vec<Access>> = Vec::with_capacity(steps.len());
    for (i, (s, w)) in steps.iter().zip(work.iter()).enumerate() {
        access.push(if w.is_empty() { Vec::new() } else { vec![Access::of(s, l).map_err(|m| (i, m))?] });
    }
    for &(w, h) in absorbed {
        access[h].push(Access::of(&steps[w], l).map_err(|m| (w, m))?);
    }
    let mut taken = vec![false; steps.len()];
    let mut pairs = Vec::new();
    for j in 0..steps.len() {
        let Some(b) = launches(&work[j]) else { continue };
        if taken[j] || !b.iter().all(|k| has(&format!("{}{X2}", k.kernel))) {
            continue;
        }
        let Some((i, back)) = partner(j, &b, work, &access, &taken) else { continue };
        let Some(a) = launches(&work[i]) else { continue };
        // Launch by launch, so each half keeps its step's order (a copy, then a row write).
        let m: Vec<Work> = a.iter().zip(&b).map(|(x, y)| Work::Kernel(merged(x, y))).collect();
        // The launch runs at the later step, or where only the later step may move, at the
        // earlier one.
        let (moved, host) = if back { (j, i) } else { (i, j) };
        work[moved].clear();
        work[host] = m;
        let gone = std::mem::take(&mut access[moved]);
        access[host].extend(gone);
        (taken[i], taken[j]) = (true, true);
        pairs.push((moved, host));
    }
    Ok(pairs)
}

/// The nearest earlier step launching the kernels `kernels` does that may run with step `j`,
/// and whether `j` moves back to it (only fused regions do, where the earlier step may not move
/// to `j` but `j` may move to it) rather than it to `j`.
fn partner(j: usize, kernels: &[&Launch], work: &[Vec<Work>], access: &[Vec<Access>], taken: &[bool]) -> Option<(usize, bool)> {
    let [b] = access[j].as_slice() else { return None };
    let fused = kernels.iter().all(|k| k.kernel.starts_with("fused_"));
    // What runs between the candidate and `j`, nearest first.
    let mut between: Vec<&Access> = Vec::new();
    for i in (0..j).rev() {
        if let [a] = access[i].as_slice() {
            let same = !taken[i] && launches(&work[i]).is_some_and(|k| same_kernels(&k, kernels));
            if same && a.independent(b) {
                if between.iter().all(|k| a.independent(k)) {
                    return Some((i, false));
                }
                if fused && between.iter().all(|k| b.independent(k)) {
                    return Some((i, true));
                }
            }
        }
        between.extend(access[i].iter());
    }
    None
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::tests::{arena, tt};
    use super::super::{lower_step, with_kernel};
    use super::*;
    use kiln_graph::program::Step;
    use kiln_graph::{DType, Op, UnaryOp};

    const X: [usize; 2] = [4, 64];

    fn exp(input: usize, output: usize) -> Step {
        let t = tt(DType::BF16, &X);
        with_kernel(Step {
            node: 0,
            op: Op::Unary(UnaryOp::Exp),
            kernel: String::new(),
            inputs: vec![arena(input, t.clone())],
            output: arena(output, t),
        })
    }

    fn tanh(input: usize, output: usize) -> Step {
        let mut s = exp(input, output);
        s.op = Op::Unary(UnaryOp::Tanh);
        with_kernel(s)
    }

    /// A write of `[1, 2, 8]` rows into the `[1, 16, 8]` state at `dst`, in place, at the
    /// position held at `pos`.
    fn write_rows(dst: usize, rows: usize, pos: usize) -> Step {
        let c = tt(DType::BF16, &[1, 16, 8]);
        let inputs = vec![arena(dst, c.clone()), arena(rows, tt(DType::BF16, &[1, 2, 8])), arena(pos, tt(DType::I64, &[1]))];
        with_kernel(Step { node: 0, op: Op::WriteSlice { axis: 1 }, kernel: String::new(), inputs, output: arena(dst, c) })
    }

    /// Lowers and merges `steps`: the launches per step.
    /// Lowered with every entry but the copies' `_x4` (`copies.rs` joins those; its tests).
    fn lowered(steps: &[Step]) -> (Vec<Vec<Work>>, usize) {
        let l = lower_entry(steps, &Layout::default(), &|k| !k.ends_with(X4)).unwrap();
        (l.work, l.pairs.len())
    }

    fn kernel(w: &[Work]) -> &Launch {
        let [Work::Kernel(k)] = w else { panic!("{w:?}") };
        k
    }

    #[test]
    fn independent_launches_of_one_kernel_are_merged() {
        // Two independent exps with an unrelated tanh between.
        let steps = [exp(0, 1024), tanh(5120, 6144), exp(3072, 4096)];
        let (work, n) = lowered(&steps);
        assert_eq!(n, 1);
        assert!(work[0].is_empty(), "the earlier launch moves to the later step");
        let single = lower_step(&steps[0], &Layout::default()).unwrap();
        let (a, b) = (kernel(&single), kernel(&work[2]));
        assert_eq!(b.kernel, format!("{}_x2", a.kernel));
        assert_eq!((b.grid.1, b.params.len(), b.relocs.len()), (2, 2 * a.params.len(), 2 * a.relocs.len()));
        // Half 0 is the earlier step's block, half 1 the later's, relocations included.
        assert_eq!(&b.params[..a.params.len()], &a.params[..]);
        let read = |at: usize| u64::from_le_bytes(b.params[at..at + 8].try_into().unwrap());
        assert_eq!(b.relocs.iter().map(|&r| read(r)).collect::<Vec<_>>(), [1024, 0, 4096, 3072]);
    }

    #[test]
    fn a_fused_launch_moves_back_where_only_it_may_move() {
        // The tanh between reads the earlier exp's output: the later exp runs at the earlier's
        // position instead, half 0 still the earlier step's block.
        let steps = [exp(0, 1024), tanh(1024, 2048), exp(3072, 4096)];
        let l = Layout::default();
        let mut work: Vec<Vec<Work>> = steps.iter().map(|s| lower_step(s, &l).unwrap()).collect();
        assert_eq!(merge_pairs(&steps, &mut work, &l, &|_| true, &[]).unwrap(), [(2, 0)]);
        assert!(work[2].is_empty());
        let read = |k: &Launch, at: usize| u64::from_le_bytes(k.params[at..at + 8].try_into().unwrap());
        let k = kernel(&work[0]);
        assert_eq!(k.relocs.iter().map(|&r| read(k, r)).collect::<Vec<_>>(), [1024, 0, 4096, 3072]);
        // Row writes (not fused regions) only move forward.
        let steps = [write_rows(0, 1024, 2048), exp(4096, 0), write_rows(8192, 5120, 2048)];
        let mut work: Vec<Vec<Work>> = steps.iter().map(|s| lower_step(s, &l).unwrap()).collect();
        assert_eq!(merge_pairs(&steps, &mut work, &l, &|_| true, &[]).unwrap(), []);
    }

    #[test]
    fn a_dependency_or_an_overlap_keeps_two_launches() {
        // The later step reads the earlier one's output.
        assert_eq!(lowered(&[exp(0, 1024), exp(1024, 2048)]).1, 0);
        // A step between reads the earlier one's output (it would read it before it exists),
        // and the later one reads the step between's output (so it cannot move back either).
        assert_eq!(lowered(&[exp(0, 1024), tanh(1024, 2048), exp(2048, 4096)]).1, 0);
        // A step between overwrites the earlier one's input, or its output (memory reuse), and
        // the later one overwrites the step between's input.
        assert_eq!(lowered(&[exp(0, 1024), tanh(3072, 0), exp(4096, 3072)]).1, 0);
        assert_eq!(lowered(&[exp(0, 1024), tanh(3072, 1024 + 256), exp(4096, 3072)]).1, 0);
        // The two outputs overlap, or the later one writes the earlier one's input.
        assert_eq!(lowered(&[exp(0, 1024), exp(3072, 1024 + 256)]).1, 0);
        assert_eq!(lowered(&[exp(0, 1024), exp(3072, 0)]).1, 0);
        // A different kernel is not a partner.
        assert_eq!(lowered(&[tanh(0, 1024), exp(3072, 4096)]).1, 0);
        // No `_x2` entry loaded: nothing merges.
        let steps = [exp(0, 1024), exp(3072, 4096)];
        let l = Layout::default();
        let mut work: Vec<Vec<Work>> = steps.iter().map(|s| lower_step(s, &l).unwrap()).collect();
        assert_eq!(merge_pairs(&steps, &mut work, &l, &|_| false, &[]).unwrap(), []);
    }

    #[test]
    fn fusing_off_treats_the_joint_entries_as_absent() {
        for k in ["fused_ab_x2", "copy_b2_x2", "attn_rows1_bf16", "attn_rows_new_bf16", "attn_rows1_new_f32", "sample_token_log_prob_f32"] {
            assert!(fusing(k), "{k}");
        }
        for k in ["fused_ab", "copy_b2", "attn_rows_bf16", "attn_combine_bf16", "sample_token_f32", "write_rows_b2_i64"] {
            assert!(!fusing(k), "{k}");
        }
        // What a load with `fuse: false` asks: the independent pair stays two launches.
        let steps = [exp(0, 1024), exp(3072, 4096)];
        let l = Layout::default();
        let lowered = lower_entry(&steps, &l, &|k| !fusing(k)).unwrap();
        assert!(lowered.pairs.is_empty() && lowered.work.iter().all(|w| w.len() == 1));
    }

    /// A concat of two `[1, 2, 8]` parts at `a` and `b` into `[1, 4, 8]` at `out`: two copies.
    pub(in crate::cuda::lower) fn concat(a: usize, b: usize, out: usize) -> Step {
        let part = tt(DType::BF16, &[1, 2, 8]);
        let inputs = vec![arena(a, part.clone()), arena(b, part)];
        with_kernel(Step {
            node: 0,
            op: Op::Concat { axis: 1 },
            kernel: String::new(),
            inputs,
            output: arena(out, tt(DType::BF16, &[1, 4, 8])),
        })
    }

    #[test]
    fn steps_of_several_launches_merge_launch_by_launch() {
        // Prefill's cache writes: two concats, each two copies, become two launches.
        let (work, n) = lowered(&[concat(0, 1024, 2048), concat(4096, 5120, 6144)]);
        assert_eq!((n, work[0].len(), work[1].len()), (1, 0, 2));
        let dst = |w: &Work| {
            let Work::Kernel(k) = w else { panic!() };
            assert_eq!(k.kernel, "copy_b2_x2");
            let p = k.params.len() / 2;
            [8, p + 8].map(|at| u64::from_le_bytes(k.params[at..at + 8].try_into().unwrap()))
        };
        // Each launch holds one copy of each concat, in the concats' order.
        assert_eq!(dst(&work[1][0]), [2048, 6144]);
        assert_eq!(dst(&work[1][1]), [2048 + 32, 6144 + 32]);
        // A concat reading the other's output stays apart; so do different launch lists.
        assert_eq!(lowered(&[concat(0, 1024, 2048), concat(2048, 5120, 6144)]).1, 0);
        assert_eq!(lowered(&[concat(0, 1024, 2048), exp(4096, 6144)]).1, 0);
    }

    #[test]
    fn the_key_and_value_cache_writes_are_one_launch() {
        // K and V written into their caches at one position, the V product between.
        let steps = [write_rows(0, 8192, 9216), exp(10240, 11264), write_rows(4096, 11264, 9216)];
        let (work, n) = lowered(&steps);
        assert_eq!(n, 1);
        assert_eq!(kernel(&work[2]).kernel, "write_rows_b2_i64_x2");
        // A step between that reads the K cache: the K write cannot move past it.
        let mut read = exp(0, 11264);
        read.inputs[0] = arena(0, tt(DType::BF16, &X));
        let steps = [write_rows(0, 8192, 9216), read, write_rows(4096, 11264, 9216)];
        assert_eq!(lowered(&steps).1, 0);
        // Both writes into one cache: their outputs overlap.
        assert_eq!(lowered(&[write_rows(0, 8192, 9216), write_rows(0, 10240, 9216)]).1, 0);
    }
}
