//! Data movement: N-d permute (transpose), concat and strided slice, generic over any
//! `Copy` element so the same code moves f32, i64 and u8 tensors.
//!
//! Concat and slice use the outer/axis/inner form: a tensor is viewed as
//! `[outer, axis, inner]` around the axis being operated on.

use rayon::prelude::*;

/// Elements below which a copy runs on the calling thread.
const PAR_MIN: usize = 1 << 16;
/// Side of the square tiles used when the innermost axis moves (fits L1 for 8-byte types).
const TILE: usize = 32;

/// `dst = src.permute(perm)`: `dst` has shape `shape[perm[0]], shape[perm[1]], …` and
/// `dst[i0, i1, …] = src[…]` with dst axis a being src axis `perm[a]` (NumPy/PyTorch meaning).
///
/// Adjacent axes that stay adjacent are merged first; when the innermost axis stays
/// innermost the copy is a sequence of memcpy runs, otherwise 32×32 tiles are transposed.
pub fn permute<T: Copy + Send + Sync>(src: &[T], shape: &[usize], perm: &[usize], dst: &mut [T]) {
    debug_assert_eq!(shape.len(), perm.len());
    debug_assert!({
        let mut seen = [false; 64];
        perm.len() <= 64 && perm.iter().all(|&p| p < perm.len() && !std::mem::replace(&mut seen[p], true))
    });
    assert!(shape.len() <= MAX_RANK, "permute: rank {} exceeds {MAX_RANK}", shape.len());
    let total: usize = shape.iter().product();
    assert_eq!(src.len(), total, "permute: src has {} elements, shape {shape:?}", src.len());
    assert_eq!(dst.len(), total, "permute: dst has {} elements, shape {shape:?}", dst.len());
    if total == 0 {
        return;
    }
    let (dims, strides) = simplify(shape, perm);
    if dims.len() <= 1 {
        copy_par(src, dst);
        return;
    }
    // Split dst along its outermost axis: each range of it is a contiguous slice of dst.
    let outer = dims[0];
    let inner: usize = dims[1..].iter().product();
    let per_task = if total < PAR_MIN { outer } else { outer.div_ceil(4 * rayon::current_num_threads()).max(PAR_MIN.div_ceil(inner)) };
    dst.par_chunks_mut(per_task * inner).enumerate().for_each(|(t, d)| {
        let i0 = t * per_task;
        let mut sub_dims = dims;
        sub_dims[0] = d.len() / inner;
        permute_serial(&src[i0 * strides[0]..], &sub_dims, &strides, d);
    });
}

/// Most axes a permute handles: index arithmetic lives in fixed arrays so a permute
/// allocates nothing (a run of a compiled program must not allocate).
pub const MAX_RANK: usize = 12;

/// A short list of sizes or strides kept on the stack.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    v: [usize; MAX_RANK],
}

impl Dims {
    fn new() -> Self {
        Dims { n: 0, v: [0; MAX_RANK] }
    }
    fn filled(x: usize, n: usize) -> Self {
        let mut d = Dims::new();
        d.n = n;
        d.v[..n].fill(x);
        d
    }
    fn from(s: &[usize]) -> Self {
        let mut d = Dims::new();
        d.n = s.len();
        d.v[..s.len()].copy_from_slice(s);
        d
    }
    fn push(&mut self, x: usize) {
        self.v[self.n] = x;
        self.n += 1;
    }
    fn remove(&mut self, i: usize) {
        self.v.copy_within(i + 1..self.n, i);
        self.n -= 1;
    }
}

impl std::ops::Deref for Dims {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.v[..self.n]
    }
}

impl std::ops::DerefMut for Dims {
    fn deref_mut(&mut self) -> &mut [usize] {
        &mut self.v[..self.n]
    }
}

/// Drops size-1 axes and merges dst-adjacent axes that are also adjacent in src. Returns the
/// dst-order dims and, for each, its stride in src.
fn simplify(shape: &[usize], perm: &[usize]) -> (Dims, Dims) {
    let mut src_strides = Dims::filled(1, shape.len());
    for a in (0..shape.len().saturating_sub(1)).rev() {
        src_strides[a] = src_strides[a + 1] * shape[a + 1];
    }
    let mut dims = Dims::new();
    let mut strides = Dims::new();
    for &p in perm {
        let (n, s) = (shape[p], src_strides[p]);
        if n == 1 {
            continue;
        }
        match (dims.last_mut(), strides.last_mut()) {
            // The previous dst axis steps over exactly this axis in src: one axis of n·n'.
            (Some(ld), Some(ls)) if *ls == s * n => {
                *ld *= n;
                *ls = s;
            }
            _ => {
                dims.push(n);
                strides.push(s);
            }
        }
    }
    (dims, strides)
}

/// Serial permute of a simplified problem into contiguous `dst` (dims in dst order).
fn permute_serial<T: Copy>(src: &[T], dims: &[usize], strides: &[usize], dst: &mut [T]) {
    let nd = dims.len();
    if strides[nd - 1] == 1 {
        // Innermost axis stays innermost: memcpy runs of dims[nd-1] elements.
        let run = dims[nd - 1];
        for_each_index(&dims[..nd - 1], &strides[..nd - 1], |k, off| {
            dst[k * run..(k + 1) * run].copy_from_slice(&src[off..off + run]);
        });
        return;
    }
    // The src-contiguous axis b is somewhere outside the last dst axis: transpose tiles of
    // (dst axis b) × (dst last axis), iterating the remaining axes outside.
    let Some(b) = strides.iter().position(|&s| s == 1) else {
        // Unreachable after `simplify` (the innermost non-unit src axis has stride 1), but a
        // plain gather is correct for any strides.
        for_each_index(dims, strides, |k, off| dst[k] = src[off]);
        return;
    };
    let (nb, na, sa) = (dims[b], dims[nd - 1], strides[nd - 1]);
    let db: usize = dims[b + 1..].iter().product(); // dst stride of axis b
    let mut rest_dims = Dims::from(&dims[..nd - 1]);
    let mut rest_strides = Dims::from(&strides[..nd - 1]);
    rest_dims.remove(b);
    rest_strides.remove(b);
    let mut rest_dst_strides = Dims::filled(0, nd - 1);
    let mut acc = 1usize;
    for a in (0..nd).rev() {
        if a < nd - 1 {
            rest_dst_strides[a] = acc;
        }
        acc *= dims[a];
    }
    rest_dst_strides.remove(b);
    for_each_index_with(&rest_dims, &rest_strides, &rest_dst_strides, |src_off, dst_off| {
        for ib0 in (0..nb).step_by(TILE) {
            let ib1 = (ib0 + TILE).min(nb);
            for ia0 in (0..na).step_by(TILE) {
                let ia1 = (ia0 + TILE).min(na);
                for ib in ib0..ib1 {
                    // Slices up front so the inner copy has no per-element bounds checks.
                    let drow = dst_off + ib * db;
                    let d = &mut dst[drow + ia0..drow + ia1];
                    let s = &src[src_off + ib + ia0 * sa..];
                    for (x, y) in d.iter_mut().zip(s.iter().step_by(sa)) {
                        *x = *y;
                    }
                }
            }
        }
    });
}

/// Calls `f(k, src_offset)` for every multi-index of `dims` in row-major order, k counting.
fn for_each_index(dims: &[usize], strides: &[usize], mut f: impl FnMut(usize, usize)) {
    let count: usize = dims.iter().product();
    let mut idx = Dims::filled(0, dims.len());
    let mut off = 0usize;
    for k in 0..count {
        f(k, off);
        // Odometer increment, updating the src offset incrementally.
        for a in (0..dims.len()).rev() {
            idx[a] += 1;
            off += strides[a];
            if idx[a] < dims[a] {
                break;
            }
            off -= strides[a] * dims[a];
            idx[a] = 0;
        }
    }
}

/// Like [`for_each_index`] but tracks a src and a dst offset with separate strides.
fn for_each_index_with(dims: &[usize], s: &[usize], d: &[usize], mut f: impl FnMut(usize, usize)) {
    let count: usize = dims.iter().product();
    let mut idx = Dims::filled(0, dims.len());
    let (mut so, mut dof) = (0usize, 0usize);
    for _ in 0..count {
        f(so, dof);
        for a in (0..dims.len()).rev() {
            idx[a] += 1;
            so += s[a];
            dof += d[a];
            if idx[a] < dims[a] {
                break;
            }
            so -= s[a] * dims[a];
            dof -= d[a] * dims[a];
            idx[a] = 0;
        }
    }
}

/// Parallel `dst.copy_from_slice(src)` for large buffers.
fn copy_par<T: Copy + Send + Sync>(src: &[T], dst: &mut [T]) {
    if dst.len() < PAR_MIN {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(PAR_MIN).zip(src.par_chunks(PAR_MIN)).for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// Concatenates `inputs[i]` (each `[outer, axis_lens[i], inner]`) along the middle axis into
/// `dst` (`[outer, Σ axis_lens, inner]`).
pub fn concat<T: Copy + Send + Sync>(inputs: &[&[T]], outer: usize, axis_lens: &[usize], inner: usize, dst: &mut [T]) {
    debug_assert_eq!(inputs.len(), axis_lens.len());
    debug_assert!(inputs.iter().zip(axis_lens).all(|(x, &n)| x.len() == outer * n * inner));
    let total_axis: usize = axis_lens.iter().sum();
    let row = total_axis * inner;
    debug_assert_eq!(dst.len(), outer * row);
    if row == 0 {
        return;
    }
    let fill = |o: usize, drow: &mut [T]| {
        let mut at = 0;
        for (x, &n) in inputs.iter().zip(axis_lens) {
            let len = n * inner;
            drow[at..at + len].copy_from_slice(&x[o * len..(o + 1) * len]);
            at += len;
        }
    };
    if dst.len() < PAR_MIN {
        dst.chunks_mut(row).enumerate().for_each(|(o, d)| fill(o, d));
    } else {
        dst.par_chunks_mut(row).enumerate().for_each(|(o, d)| fill(o, d));
    }
}

/// `dst = src[:, start:end:step, :]` for `src` viewed as `[outer, axis_len, inner]`; `dst`
/// is `[outer, ceil((end - start) / step), inner]`. Requires step ≥ 1 and start ≤ end ≤ axis_len.
#[allow(clippy::too_many_arguments)]
pub fn slice<T: Copy + Send + Sync>(
    src: &[T],
    outer: usize,
    axis_len: usize,
    inner: usize,
    start: usize,
    end: usize,
    step: usize,
    dst: &mut [T],
) {
    debug_assert!(step >= 1 && start <= end && end <= axis_len);
    debug_assert_eq!(src.len(), outer * axis_len * inner);
    let count = (end - start).div_ceil(step);
    debug_assert_eq!(dst.len(), outer * count * inner);
    let row = count * inner;
    if row == 0 {
        return;
    }
    let fill = |o: usize, drow: &mut [T]| {
        let base = o * axis_len * inner;
        if step == 1 {
            drow.copy_from_slice(&src[base + start * inner..base + end * inner]);
        } else {
            for (c, d) in drow.chunks_exact_mut(inner).enumerate() {
                let s = base + (start + c * step) * inner;
                d.copy_from_slice(&src[s..s + inner]);
            }
        }
    };
    if dst.len() < PAR_MIN {
        dst.chunks_mut(row).enumerate().for_each(|(o, d)| fill(o, d));
    } else {
        dst.par_chunks_mut(row).enumerate().for_each(|(o, d)| fill(o, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::Rng;

    /// Obvious per-element permute.
    fn naive<T: Copy + Default>(src: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
        let nd = shape.len();
        let dshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let total: usize = shape.iter().product();
        let mut out = vec![T::default(); total];
        let mut didx = vec![0usize; nd];
        for (k, o) in out.iter_mut().enumerate() {
            let mut rem = k;
            for a in (0..nd).rev() {
                didx[a] = rem % dshape[a];
                rem /= dshape[a];
            }
            let mut sidx = vec![0usize; nd];
            for a in 0..nd {
                sidx[perm[a]] = didx[a];
            }
            let off = sidx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i);
            *o = src[off];
        }
        out
    }

    fn all_perms(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in all_perms(n - 1) {
            for at in 0..=p.len() {
                let mut q = p.clone();
                q.insert(at, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn permute_matches_naive_for_all_perms() {
        let mut rng = Rng::new(41);
        for shape in [vec![], vec![5], vec![3, 4], vec![2, 1, 3], vec![3, 4, 5, 2], vec![1, 7, 1, 33], vec![40, 3, 37]] {
            let total: usize = shape.iter().product();
            let src: Vec<i64> = (0..total as i64).collect();
            for perm in all_perms(shape.len()) {
                let mut dst = vec![-1i64; total];
                permute(&src, &shape, &perm, &mut dst);
                assert_eq!(dst, naive(&src, &shape, &perm), "shape {shape:?} perm {perm:?}");
            }
            let fsrc = rng.vec(total, -1.0, 1.0);
            let perm: Vec<usize> = (0..shape.len()).rev().collect();
            let mut fdst = vec![0.0f32; total];
            permute(&fsrc, &shape, &perm, &mut fdst);
            assert_eq!(fdst, naive(&fsrc, &shape, &perm));
        }
    }

    #[test]
    fn permute_large_parallel_paths() {
        // Big enough to split across tasks: a 2-D transpose, a head split and a u8 case.
        for (shape, perm) in [(vec![300, 517], vec![1, 0]), (vec![2, 256, 16, 72], vec![0, 2, 1, 3]), (vec![3, 200, 300], vec![2, 0, 1])] {
            let total: usize = shape.iter().product();
            let src: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
            let mut dst = vec![0u8; total];
            permute(&src, &shape, &perm, &mut dst);
            assert_eq!(dst, naive(&src, &shape, &perm), "shape {shape:?} perm {perm:?}");
        }
    }

    #[test]
    fn concat_and_slice() {
        let a: Vec<i64> = (0..2 * 3 * 4).collect();
        let b: Vec<i64> = (100..100 + 2 * 4).collect();
        let mut d = vec![0i64; 2 * 4 * 4];
        concat(&[&a, &b], 2, &[3, 1], 4, &mut d);
        assert_eq!(&d[..16], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 100, 101, 102, 103]);
        assert_eq!(&d[16..], &[12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 104, 105, 106, 107]);

        let src: Vec<i64> = (0..2 * 10 * 3).collect();
        for (start, end, step) in [(0usize, 10usize, 1usize), (2, 9, 3), (1, 2, 5), (4, 4, 1), (0, 10, 4)] {
            let count = (end - start).div_ceil(step);
            let mut out = vec![0i64; 2 * count * 3];
            slice(&src, 2, 10, 3, start, end, step, &mut out);
            let mut want = Vec::new();
            for o in 0..2 {
                for i in (start..end).step_by(step) {
                    for n in 0..3 {
                        want.push(src[(o * 10 + i) * 3 + n]);
                    }
                }
            }
            assert_eq!(out, want, "{start}:{end}:{step}");
        }
        // Large parallel concat.
        let big: Vec<f32> = (0..200_000).map(|i| i as f32).collect();
        let mut out = vec![0.0; 400_000];
        concat(&[&big, &big], 1000, &[1, 1], 200, &mut out);
        assert_eq!(out[200..400], big[..200]);
        assert_eq!(out[400..600], big[200..400]);
    }
}
