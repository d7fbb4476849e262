//! Independent launches of one cube kernel as one launch (issue 16), in the spirit of the cuda
//! lowering's `_x2` pairs (`crate::cuda::lower::merge`): a concat's part copies, then two
//! steps each running one launch of the same generated kernel (RoPE on q and on k, K's and V's
//! cache writes, prefill's Q and stacked K/V projections). The
//! joined launch runs the kernel with `parts` parameter blocks, one per cube along its part
//! axis (`kiln_kernels::cube::part_base`); the kernels taking parts are the copy, the row
//! write and the matmul (parts of different batch counts, and of output ranks r and r + 1, the
//! smaller run as rank r + 1 with a leading axis of 1).
//!
//! This runs on the lowered steps, after the schedule and the memory plan, so it moves the
//! earlier step of a pair to the later step's place only where that changes no byte any step
//! reads or the entry leaves:
//!
//! - every step between the two (that launches anything) neither reads the earlier step's
//!   output nor writes bytes the earlier step reads or writes;
//! - the two are independent: neither reads the other's output, and their outputs do not
//!   overlap (the parts of one launch run in any order).
//!
//! A concat's copies join when no input of the concat overlaps its output (each copy writes
//! its own elements of the output).

use super::Launch;
use kiln_graph::program::{Operand, Slot, Step};
use kiln_graph::Op;
use kiln_kernels::cube::params::{multi, MatmulParams};
use kiln_kernels::cube::{CopyCfg, MatmulCfg};

/// A byte range `[start, end)` of the arena.
pub(super) type Range = (usize, usize);

/// The arena bytes of an operand; none for one in the weights buffer (never written).
pub(super) fn range(o: &Operand) -> Option<Range> {
    match o.slot {
        Slot::Arena { offset, bytes } => Some((offset, offset + bytes.max(o.ty.bytes()))),
        Slot::Weight(_) | Slot::Const(_) | Slot::State(_) => None,
    }
}

pub(super) fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}

/// What a step reads and writes in the arena.
pub(super) struct Access {
    reads: Vec<Range>,
    write: Option<Range>,
}

impl Access {
    pub(super) fn of(s: &Step) -> Access {
        Access { reads: s.inputs.iter().filter_map(range).collect(), write: range(&s.output) }
    }

    pub(super) fn reads(&self, r: Option<Range>) -> bool {
        r.is_some_and(|r| self.reads.iter().any(|&x| overlaps(x, r)))
    }

    /// Whether `self` and `other` may run in either order or at once.
    pub(super) fn independent(&self, other: &Access) -> bool {
        let writes_meet = matches!((self.write, other.write), (Some(a), Some(b)) if overlaps(a, b));
        !self.reads(other.write) && !other.reads(self.write) && !writes_meet
    }
}

/// The blocks of a launch's parts: its block, or a multi block's parts.
fn part_blocks(meta: &[u32], at: usize, len: usize, parts: u32) -> Vec<Vec<u32>> {
    let block = &meta[at..at + len];
    if parts == 1 {
        return vec![block.to_vec()];
    }
    let starts: Vec<usize> = block[..parts as usize].iter().map(|&w| w as usize).chain([len]).collect();
    starts.windows(2).map(|w| block[w[0]..w[1]].to_vec()).collect()
}

/// The multi block of `a`'s parts then `b`'s, appended to `meta` at a 256-byte boundary.
fn joined_block(meta: &mut Vec<u32>, a: (usize, usize, u32), b: (usize, usize, u32)) -> Option<(usize, usize)> {
    let mut blocks = part_blocks(meta, a.0, a.1, a.2);
    blocks.extend(part_blocks(meta, b.0, b.1, b.2));
    push_multi(meta, &blocks)
}

/// A [`MatmulParams`] block of output rank `rank` with `epilogue` extra inputs as one of rank
/// `rank + 1`: a leading output axis of 1, and a stride of 0 along it for every operand; what
/// follows the operands (an absorbed row write's block) is kept.
fn pad_matmul_rank(block: &[u32], rank: usize, epilogue: usize) -> Vec<u32> {
    let mut b = block[..MatmulParams::SHAPE].to_vec();
    b.push(1);
    b.extend_from_slice(&block[MatmulParams::SHAPE..MatmulParams::SHAPE + rank]);
    // The operands (offset, strides): a and b with `rank - 2` strides, then the epilogue's
    // inputs with `rank` each.
    let mut at = MatmulParams::SHAPE + rank;
    let mut width = rank - 2;
    while at < MatmulParams::epilogue_at(rank, epilogue) {
        b.extend_from_slice(&[block[at], 0]);
        b.extend_from_slice(&block[at + 1..at + 1 + width]);
        at += 1 + width;
        if at == MatmulParams::epilogue_at(rank, 0) {
            width = rank;
        }
    }
    b.extend_from_slice(&block[at..]);
    b
}

/// `blocks` as one multi block appended to `meta` at a 256-byte boundary.
fn push_multi(meta: &mut Vec<u32>, blocks: &[Vec<u32>]) -> Option<(usize, usize)> {
    let refs: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
    let block = multi(&refs).ok()?;
    meta.resize(meta.len().next_multiple_of(64), 0);
    let at = meta.len();
    let len = block.len();
    meta.extend(block);
    Some((at, len))
}

/// Whether two configurations are one generated kernel's but for their part counts.
fn same_code<C: Clone + PartialEq>(a: &C, b: &C, parts: impl Fn(&mut C)) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    parts(&mut a);
    parts(&mut b);
    a == b
}

/// `a` and `b` as one launch of their kernel (`a`'s parts, then `b`'s), if they run the same
/// generated code (and, for matmuls, the same batch count).
fn join(a: &Launch, b: &Launch, meta: &mut Vec<u32>) -> Option<Launch> {
    match (a, b) {
        (Launch::Copy { cfg: ca, n: na, meta: ma, len: la }, Launch::Copy { cfg: cb, n: nb, meta: mb, len: lb }) if ca.rank == cb.rank => {
            let (meta, len) = joined_block(meta, (*ma, *la, ca.parts()), (*mb, *lb, cb.parts()))?;
            let src_in_arena = [&ca.src_in_arena[..], &cb.src_in_arena].concat();
            Some(Launch::Copy { cfg: CopyCfg { rank: ca.rank, src_in_arena }, n: (*na).max(*nb), meta, len })
        }
        (Launch::WriteRows { cfg: ca, n: na, meta: ma, len: la }, Launch::WriteRows { cfg: cb, n: nb, meta: mb, len: lb })
            if same_code(ca, cb, |c| c.parts = 1) =>
        {
            let (meta, len) = joined_block(meta, (*ma, *la, ca.parts), (*mb, *lb, cb.parts))?;
            let mut cfg = ca.clone();
            cfg.parts = ca.parts + cb.parts;
            Some(Launch::WriteRows { cfg, n: (*na).max(*nb), meta, len })
        }
        (
            Launch::MatMul { cfg: ca, m: m_a, n: n_a, batch: ba, meta: ma, len: la },
            Launch::MatMul { cfg: cb, m: m_b, n: n_b, batch: bb, meta: mb, len: lb },
        ) if same_code(ca, cb, |c| (c.parts, c.rank, c.stores) = (1, 0, vec![])) && ca.rank.abs_diff(cb.rank) <= 1 => {
            // Products of ranks r and r + 1 run at rank r + 1 (a leading axis of 1).
            let rank = ca.rank.max(cb.rank);
            let epilogue = ca.epilogue.as_ref().map_or(0, |e| e.1.len());
            let mut blocks = Vec::new();
            for (c, at, len) in [(ca, *ma, *la), (cb, *mb, *lb)] {
                for b in part_blocks(meta, at, len, c.parts) {
                    blocks.push(if c.rank < rank { pad_matmul_rank(&b, c.rank, epilogue) } else { b });
                }
            }
            let (meta, len) = push_multi(meta, &blocks)?;
            let stores = [&ca.stores[..], &cb.stores].concat();
            let cfg = MatmulCfg { parts: ca.parts + cb.parts, rank, stores, ..ca.clone() };
            Some(Launch::MatMul { cfg, m: (*m_a).max(*m_b), n: (*n_a).max(*n_b), batch: (*ba).max(*bb), meta, len })
        }
        _ => None,
    }
}

/// Each concat's copies as one launch, where no input of the concat overlaps its output.
pub(super) fn join_concat_parts(steps: &[Step], work: &mut [Vec<Launch>], meta: &mut Vec<u32>) {
    for (s, w) in steps.iter().zip(work.iter_mut()) {
        let out = range(&s.output);
        let apart = !s.inputs.iter().any(|o| matches!((range(o), out), (Some(a), Some(b)) if overlaps(a, b)));
        if !matches!(s.op, Op::Concat { .. }) || w.len() < 2 || !apart {
            continue;
        }
        let mut joined = w[0].clone();
        for l in &w[1..] {
            match join(&joined, l, meta) {
                Some(j) => joined = j,
                None => break,
            }
        }
        if let Launch::Copy { cfg, .. } = &joined {
            if cfg.parts() as usize == w.len() {
                *w = vec![joined];
            }
        }
    }
}

/// Joins pairs of steps that each make one launch of one kernel (see the module doc) in place:
/// the earlier step's launch goes, the later one's becomes the joined launch. `absorbed` holds
/// (step, the step whose launch does its work) of steps that launch nothing themselves.
/// Returns the (earlier, later) steps joined.
pub(super) fn merge_pairs(
    steps: &[Step],
    work: &mut [Vec<Launch>],
    meta: &mut Vec<u32>,
    absorbed: &[(usize, usize)],
) -> Vec<(usize, usize)> {
    // What runs at each step's place (a joined launch: both steps' accesses; a launch doing an
    // absorbed step's work, that step's too).
    let mut access: Vec<Vec<Access>> =
        steps.iter().zip(work.iter()).map(|(s, w)| if w.is_empty() { Vec::new() } else { vec![Access::of(s)] }).collect();
    for &(w, h) in absorbed {
        access[h].push(Access::of(&steps[w]));
    }
    let mut taken = vec![false; steps.len()];
    let mut pairs = Vec::new();
    for j in 0..steps.len() {
        let [lb] = work[j].as_slice() else { continue };
        if taken[j] || access[j].is_empty() {
            continue;
        }
        let b = &access[j];
        // What runs between the candidate and `j`, nearest first.
        let mut between: Vec<&Access> = Vec::new();
        let mut found = None;
        for i in (0..j).rev() {
            let a = &access[i];
            if let [la] = work[i].as_slice() {
                let free = |k: &Access| a.iter().all(|x| x.independent(k));
                if !taken[i] && !a.is_empty() && b.iter().all(free) && between.iter().all(|k| free(k)) {
                    if let Some(l) = join(la, lb, meta) {
                        found = Some((i, l));
                        break;
                    }
                }
            }
            between.extend(access[i].iter());
        }
        let Some((i, l)) = found else { continue };
        work[i].clear();
        work[j] = vec![l];
        let moved = std::mem::take(&mut access[i]);
        access[j].extend(moved);
        (taken[i], taken[j]) = (true, true);
        pairs.push((i, j));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::super::Lower;
    use super::*;
    use kiln_graph::program::Operand;
    use kiln_graph::{DType, TensorType, UnaryOp};
    use kiln_kernels::cube::params::Strided;

    fn arena(offset: usize, dtype: DType, shape: &[usize]) -> Operand {
        let ty = TensorType::new(dtype, shape);
        Operand { slot: Slot::Arena { offset, bytes: ty.bytes().next_multiple_of(256) }, ty }
    }

    fn step(op: Op, kernel: &str, inputs: Vec<Operand>, output: Operand) -> Step {
        Step { node: 0, op, kernel: kernel.into(), inputs, output }
    }

    /// `[2, 8]` at `a` times the weight `[8, 8]` into `out`.
    fn matmul(a: usize, out: usize) -> Step {
        let w = Operand { slot: Slot::Weight(0), ty: TensorType::new(DType::F32, [8, 8]) };
        let op = Op::MatMul { transpose_b: true, epilogue: None };
        step(op, "cube.matmul", vec![arena(a, DType::F32, &[2, 8]), w], arena(out, DType::F32, &[2, 8]))
    }

    /// `exp` of `[2, 8]` at `x` into `out`.
    fn exp(x: usize, out: usize) -> Step {
        step(Op::Unary(UnaryOp::Exp), "cube.fused", vec![arena(x, DType::F32, &[2, 8])], arena(out, DType::F32, &[2, 8]))
    }

    /// Row `pos` of the `[4, 8]` cache at `cache` set to the `[1, 8]` rows at `rows`, in place.
    fn write_rows(cache: usize, rows: usize, pos: usize) -> Step {
        let c = arena(cache, DType::F32, &[4, 8]);
        let ins = vec![c.clone(), arena(rows, DType::F32, &[1, 8]), arena(pos, DType::I64, &[1])];
        step(Op::WriteSlice { axis: 0 }, "cube.write_rows", ins, c)
    }

    /// Per step its launches, the joined pairs, the absorbed writes.
    type Joined = (Vec<Vec<Launch>>, Vec<(usize, usize)>, Vec<(usize, usize)>);

    /// The launches of `steps` after joining (and absorbing, with `absorb`): per step, the
    /// pairs, the absorbed writes.
    fn lowered(steps: &[Step], absorb: bool) -> Joined {
        let (woff, mut meta) = (vec![0], Vec::new());
        let mut l = Lower { woff: &woff, coff: &[], meta: &mut meta };
        let mut work: Vec<Vec<Launch>> = steps.iter().map(|s| l.step(s).unwrap()).collect();
        let absorbed = if absorb { super::super::absorb::absorb_cache_writes(steps, &mut work, &mut meta) } else { vec![] };
        let pairs = merge_pairs(steps, &mut work, &mut meta, &absorbed);
        (work, pairs, absorbed)
    }

    #[test]
    fn independent_matmuls_are_one_launch_at_the_later_step() {
        let (work, pairs, _) = lowered(&[matmul(0, 1024), exp(4096, 5120), matmul(0, 2048)], false);
        assert_eq!(pairs, [(0, 2)]);
        assert!(work[0].is_empty());
        assert!(matches!(work[2].as_slice(), [Launch::MatMul { cfg, .. }] if cfg.parts == 2), "{:?}", work[2]);
    }

    #[test]
    fn a_dependency_or_an_overlap_keeps_two_launches() {
        // The second reads the first's output.
        assert!(lowered(&[matmul(0, 1024), matmul(1024, 2048)], false).1.is_empty());
        // A step between reads the first's output.
        assert!(lowered(&[matmul(0, 1024), exp(1024, 4096), matmul(0, 2048)], false).1.is_empty());
        // A step between writes the first's input.
        assert!(lowered(&[matmul(0, 1024), exp(4096, 0), matmul(3072, 2048)], false).1.is_empty());
        // The outputs overlap.
        assert!(lowered(&[matmul(0, 1024), matmul(0, 1024)], false).1.is_empty());
    }

    #[test]
    fn a_cache_write_is_absorbed_by_the_matmul_of_its_rows_only_where_it_may_move() {
        // The write's rows are the matmul's second row.
        let (work, _, absorbed) = lowered(&[matmul(0, 1024), exp(4096, 5120), write_rows(8192, 1024 + 32, 6144)], true);
        assert_eq!(absorbed, [(2, 0)]);
        assert!(work[2].is_empty());
        assert!(matches!(work[0].as_slice(), [Launch::MatMul { cfg, .. }] if cfg.stores[0].is_some()), "{:?}", work[0]);
        // A step between reads the cache, or writes the position.
        for between in [exp(8192, 5120), exp(4096, 6144)] {
            let (_, _, absorbed) = lowered(&[matmul(0, 1024), between, write_rows(8192, 1024 + 32, 6144)], true);
            assert!(absorbed.is_empty());
        }
    }

    fn params(shape: Vec<usize>, a: Strided, b: Strided, epilogue: Vec<Strided>) -> MatmulParams {
        MatmulParams { m: 3, n: 4, k: 5, out_off: 6, shape, a, b, epilogue }
    }

    #[test]
    fn a_padded_block_is_the_block_of_the_product_with_a_leading_axis_of_1() {
        let st = |off, strides: &[usize]| Strided { off, strides: strides.to_vec() };
        let low = params(vec![2, 3, 4], st(10, &[15]), st(20, &[0]), vec![st(30, &[12, 4, 1]), st(40, &[0, 0, 1])]);
        let high = params(vec![1, 2, 3, 4], st(10, &[0, 15]), st(20, &[0, 0]), vec![st(30, &[0, 12, 4, 1]), st(40, &[0, 0, 0, 1])]);
        let suffix = [7, 8, 9];
        let block = [low.pack().unwrap(), suffix.to_vec()].concat();
        assert_eq!(pad_matmul_rank(&block, 3, 2), [high.pack().unwrap(), suffix.to_vec()].concat());
    }

    #[test]
    fn a_multi_block_splits_back_into_its_parts() {
        let block = multi(&[&[1, 2], &[3], &[4, 5, 6]]).unwrap();
        let meta = [vec![0; 5], block.clone()].concat();
        assert_eq!(part_blocks(&meta, 5, block.len(), 3), [vec![1, 2], vec![3], vec![4, 5, 6]]);
    }
}
