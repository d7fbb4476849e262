//! A permute read only by elementwise launches makes no launch of its own (issue 16): where
//! every step that reads a permute's output is a fused region or a RoPE rotation (one
//! `fused_*` launch reading that output whole, in the output's order), each reader reads the
//! permute's source through strides instead, and the permute's copy goes. Prefill's Q is such
//! a permute: `kiln_graph::passes::stack_projections_rows` computes Q, K and V as one
//! `[S, L, n]` product, and Q (`[L, 2n]`) is `permute(planes 0..2, [1, 0, 2])`, read by its RoPE
//! rotation.
//!
//! The reader's launch ([`super::fused_launch_with`]) decomposes its output index over `dims`
//! and reads each strided input at `sum(i_a * st[a])`. The permute's output `[O_0, .., O_r]`
//! is contiguous and the reader read it at the output index itself (contiguous access); the
//! source offset of that index is a sum over `O`'s digits of each digit times the source
//! stride of its axis. The reader's axes and `O`'s axes are refined into one geometry whose
//! axes each lie inside one axis of both (each suffix product of one divides the next of the
//! other: q `[1, L, 8, 256]` read from planes `[2, L, 4 * 256]` is `[L, 2, 4, 256]`), at most
//! `MAX_RANK` axes, and every input of the launch gets its strides over it. A rotation reads
//! input 0 at column `o0 % d`: its last axis must stay stride 1, `d` columns or a multiple, and
//! every other stride a multiple of `d`.
//!
//! This runs after the schedule and the memory plan are fixed, before the other moves of
//! [`super::merge::lower_entry`], and only where moving the read is safe:
//!
//! - a later step overwrites the permute's output (so it is no entry output), and every step
//!   reading it before then (or the one overwriting it) is such a reader, reading exactly the
//!   permute's bytes;
//! - no step from the permute to a reader writes the source's bytes (a reader's own output
//!   included: its threads would read bytes others overwrote).
//!
//! The steps handed on to the later moves read the source in the readers' place, so that a
//! merged pair of rotations (q's and k's) checks the bytes it really reads. Nothing here has run
//! on a GPU: the tests apply the readers' parameters on the host against the interpreter, and
//! the generated kernels run on the CPU through the host emulator (`tests/cuda_emulated.rs`).

use super::merge::{overlaps, range, Range};
use super::{addr, rotation, Layout, Work};
use crate::geometry::contiguous;
use kiln_graph::program::{Operand, Step};
use kiln_graph::Op;
use kiln_kernels::cuda::{fused, MAX_RANK};

/// A permute the readers absorb: (the permute, its first reader) per absorbed permute, and
/// the steps with each reader's input replaced by the permute's source.
pub struct Folded {
    pub absorbed: Vec<(usize, usize)>,
    pub steps: Vec<Step>,
}

/// Folds every permute whose readers allow it into them (the module doc); `work` holds each
/// step's lowered launches and is changed in place.
pub fn fold_permutes(steps: &[Step], work: &mut [Vec<Work>], l: &Layout) -> Folded {
    let mut out = Folded { absorbed: Vec::new(), steps: steps.to_vec() };
    for p in 0..steps.len() {
        let Some(readers) = readers(steps, work, l, p) else { continue };
        let mut changed = Vec::new();
        for (r, inputs) in &readers {
            match refold(&steps[p], &steps[*r], &work[*r], l, inputs) {
                Some(w) => changed.push((*r, w)),
                None => break,
            }
        }
        if changed.len() != readers.len() {
            continue;
        }
        for (r, w) in changed {
            work[r] = vec![w];
            for (i, o) in steps[r].inputs.iter().enumerate() {
                if same_bytes(o, &steps[p].output, l) {
                    out.steps[r].inputs[i] = steps[p].inputs[0].clone();
                }
            }
        }
        work[p].clear();
        out.absorbed.push((p, readers[0].0));
    }
    out
}

/// Whether operand `o` is exactly `of`'s bytes in `of`'s dtype (`of` read through reshapes).
fn same_bytes(o: &Operand, of: &Operand, l: &Layout) -> bool {
    let at = |x: &Operand| addr(x, l).ok();
    at(o).is_some() && at(o) == at(of) && o.ty.dtype == of.ty.dtype && o.ty.numel() == of.ty.numel()
}

/// The readers of permute step `p` ((step, the launch's inputs that read the output)) if it
/// may be folded into them: the steps up to the one overwriting its output, each one launch of
/// a fused region or rotation reading the output whole; none writes the source.
fn readers(steps: &[Step], work: &[Vec<Work>], l: &Layout, p: usize) -> Option<Vec<(usize, Vec<usize>)>> {
    let s = &steps[p];
    let [Work::Kernel(k)] = work[p].as_slice() else { return None };
    if !matches!(s.op, Op::Permute { .. }) || !k.kernel.starts_with("copy_b") || s.inputs.len() != 1 {
        return None;
    }
    let (out, src): (Range, Range) = (range(&s.output, l).ok()?, range(&s.inputs[0], l).ok()?);
    if overlaps(out, src) {
        return None;
    }
    let (mut found, mut changed) = (Vec::new(), false);
    for (j, t) in steps.iter().enumerate().skip(p + 1) {
        if work[j].is_empty() {
            continue;
        }
        let write = range(&t.output, l).ok()?;
        let reads: Vec<usize> = (0..t.inputs.len()).filter(|&i| range(&t.inputs[i], l).is_ok_and(|r| overlaps(r, out))).collect();
        // From a step writing the source on (that step included), no reader may come.
        changed |= overlaps(write, src);
        if !reads.is_empty() {
            if changed || !reads.iter().all(|&i| same_bytes(&t.inputs[i], &s.output, l)) {
                return None;
            }
            found.push((j, reads.iter().map(|&i| launch_input(t, l, i)).collect::<Option<Vec<_>>>()?));
        }
        if overlaps(write, out) {
            return (!found.is_empty()).then_some(found);
        }
    }
    None
}

/// The input of step `s`'s fused launch that reads step input `i`: the same for a fused
/// region; for a rotation (`x @ P`, the launch reading `x` and the epilogue's inputs) input 0
/// is 0 and input `i >= 2` is `i - 1`.
fn launch_input(s: &Step, l: &Layout, i: usize) -> Option<usize> {
    if rotation::of_step(s, &l.rotations).is_some() {
        return match i {
            0 => Some(0),
            1 => None,
            i => Some(i - 1),
        };
    }
    s.op.elementwise_expr().is_some().then_some(i)
}

/// The fused launch of reader `r` with its launch inputs `inputs` read from permute `p`'s
/// source, if its geometry allows.
fn refold(p: &Step, r: &Step, work: &[Work], l: &Layout, inputs: &[usize]) -> Option<Work> {
    let [Work::Kernel(k)] = work else { return None };
    if !k.kernel.starts_with("fused_") || k.params.len() != std::mem::size_of::<fused::FusedParams>() {
        return None;
    }
    // SAFETY: the params are a `FusedParams`' bytes ([`super::fused_launch_with`]), of its size.
    let mut fp: fused::FusedParams = unsafe { std::ptr::read_unaligned(k.params.as_ptr() as *const fused::FusedParams) };
    if inputs.iter().any(|&i| fp.access[i] != fused::Access::Contiguous as i32) {
        return None;
    }
    let Op::Permute { perm } = &p.op else { return None };
    let rank = fp.rank as usize;
    let dims: Vec<usize> = fp.dims[..rank].iter().map(|&d| d as usize).collect();
    let src_st = contiguous(&p.inputs[0].ty.shape);
    let read_st: Vec<usize> = perm.iter().map(|&a| src_st[a]).collect();
    let g = refine(&dims, &p.output.ty.shape)?;
    if g.len() > MAX_RANK {
        return None;
    }
    let source: Vec<i64> = g.iter().map(|a| (read_st[a.o] * a.o_inner) as i64).collect();
    if let Some(perm) = rotation::of_step(r, &l.rotations).filter(|_| inputs.contains(&0)) {
        let (last, d) = (g.last()?, perm.d as i64);
        let others = source[..g.len() - 1].iter().all(|s| s % d == 0);
        if source[g.len() - 1] != 1 || last.len as i64 % d != 0 || !others {
            return None;
        }
    }
    let mut st = fp.st;
    for ((row, old), &access) in st.iter_mut().zip(&fp.st).zip(&fp.access) {
        if access == fused::Access::Strided as i32 {
            for (a, ax) in g.iter().enumerate() {
                row[a] = old[ax.d] * ax.d_inner as i64;
            }
        }
    }
    let from = addr(&p.inputs[0], l).ok()?;
    for &i in inputs {
        st[i][..g.len()].copy_from_slice(&source);
        fp.access[i] = fused::Access::Strided as i32;
        fp.ins[i] = from;
    }
    for (a, ax) in g.iter().enumerate() {
        fp.dims[a] = ax.len as i64;
    }
    for a in g.len()..MAX_RANK {
        fp.dims[a] = 0;
        st.iter_mut().for_each(|row| row[a] = 0);
    }
    (fp.st, fp.rank, fp.strided) = (st, g.len() as i32, 1);
    let mut w = k.clone();
    w.params = super::bytes_of(&fp);
    Some(Work::Kernel(w))
}

/// One axis of a refinement of two row-major shapes of one size.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Axis {
    len: usize,
    /// The axis of the first shape it lies in, and the elements of that axis's inner part it
    /// steps over (its stride there, in units of that axis's stride).
    d: usize,
    d_inner: usize,
    /// The same for the second shape.
    o: usize,
    o_inner: usize,
}

/// The coarsest row-major shape refining both `a` and `b` (each axis inside one axis of each),
/// if one exists: every suffix product of either divides the next larger one.
fn refine(a: &[usize], b: &[usize]) -> Option<Vec<Axis>> {
    let n: usize = a.iter().product();
    if n == 0 || n != b.iter().product::<usize>() {
        return None;
    }
    let suffixes = |s: &[usize]| -> Vec<usize> { (0..s.len()).map(|i| s[i + 1..].iter().product()).collect() };
    let (sa, sb) = (suffixes(a), suffixes(b));
    let mut cuts: Vec<usize> = sa.iter().chain(&sb).copied().chain([n]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    // The axis of `s` holding the elements from inner size `at`: the outermost whose inner
    // size (suffix product) is at most `at`, among the axes longer than one.
    let owner = |s: &[usize], suf: &[usize], at: usize| (0..s.len()).rev().take_while(|&i| suf[i] <= at).last().map(|i| (i, at / suf[i]));
    let mut out = Vec::new();
    for w in cuts.windows(2).rev() {
        let (inner, outer) = (w[0], w[1]);
        if outer % inner != 0 {
            return None;
        }
        let (d, d_inner) = owner(a, &sa, inner)?;
        let (o, o_inner) = owner(b, &sb, inner)?;
        out.push(Axis { len: outer / inner, d, d_inner, o, o_inner });
    }
    Some(out)
}

#[cfg(test)]
#[path = "permute_tests.rs"]
mod tests;
