//! Indexing kernels for routing and embeddings: row gather, top-k, cumulative sum,
//! take-along-axis (torch.gather) and scatter-add (torch.scatter_add_).
//!
//! Axis-wise ops use the outer/axis/inner form: a tensor is `[outer, len, inner]` around the
//! axis. Indices are i64 and must already be validated (0 ≤ i < len); an out-of-range index
//! panics through slice bounds checks rather than reading out of bounds.

use std::cmp::Ordering;
use std::ops::AddAssign;

use rayon::prelude::*;

/// Elements below which a kernel runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// Embedding lookup: `out[i] = table[ids[i]]`, each row `d` elements.
pub fn gather_rows<T: Copy + Send + Sync>(table: &[T], d: usize, ids: &[i64], out: &mut [T]) {
    debug_assert_eq!(out.len(), ids.len() * d);
    debug_assert!(d == 0 || ids.iter().all(|&i| i >= 0 && (i as usize) < table.len() / d));
    if d == 0 {
        return;
    }
    let copy = |(o, &id): (&mut [T], &i64)| {
        let r = id as usize;
        o.copy_from_slice(&table[r * d..(r + 1) * d]);
    };
    if out.len() < PAR_MIN {
        out.chunks_mut(d).zip(ids).for_each(copy);
    } else {
        out.par_chunks_mut(d).zip(ids).for_each(copy);
    }
}

/// [`gather_rows`] from a bfloat16 table (its bits, `u16`), each row widened to f32 as it is
/// copied: a bf16 is the high half of an f32, so the rows are exactly what a table converted
/// to f32 beforehand would give, and the table need never exist in f32.
pub fn gather_rows_bf16(table: &[u16], d: usize, ids: &[i64], out: &mut [f32]) {
    debug_assert_eq!(out.len(), ids.len() * d);
    debug_assert!(d == 0 || ids.iter().all(|&i| i >= 0 && (i as usize) < table.len() / d));
    if d == 0 {
        return;
    }
    let copy = |(o, &id): (&mut [f32], &i64)| {
        let r = id as usize;
        for (o, &h) in o.iter_mut().zip(&table[r * d..(r + 1) * d]) {
            *o = f32::from_bits((h as u32) << 16);
        }
    };
    if out.len() < PAR_MIN {
        out.chunks_mut(d).zip(ids).for_each(copy);
    } else {
        out.par_chunks_mut(d).zip(ids).for_each(copy);
    }
}

/// [`gather_rows`] of a `[V, D]` table held only as the panels of a GEMM operand packed
/// transposed (`D x V`, a tied embedding's LM head): row `ids[i]` is column `ids[i]`, widened
/// to f32 where the panels are bf16; so the table needs no copy of its own.
pub fn gather_columns(b: &crate::cpu::sgemm512::PackedB, ids: &[i64], out: &mut [f32]) {
    let d = b.k;
    debug_assert_eq!(out.len(), ids.len() * d);
    debug_assert!(ids.iter().all(|&i| i >= 0 && (i as usize) < b.n));
    if d == 0 {
        return;
    }
    let copy = |(o, &id): (&mut [f32], &i64)| b.column(id as usize, o);
    if out.len() < PAR_MIN {
        out.chunks_mut(d).zip(ids).for_each(copy);
    } else {
        out.par_chunks_mut(d).zip(ids).for_each(copy);
    }
}

/// Descending order with NaN largest and ties broken towards the lower index, as
/// `jax.lax.top_k` and `torch.topk` order them.
fn desc(x: &[f32], a: usize, b: usize) -> Ordering {
    let (va, vb) = (x[a], x[b]);
    match (va.is_nan(), vb.is_nan()) {
        (true, true) => a.cmp(&b),
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => vb.partial_cmp(&va).unwrap_or(Ordering::Equal).then(a.cmp(&b)),
    }
}

/// Indices of the `k` largest entries of each row of `x` (`rows × n`), in descending order
/// of value (ties to the lower index); `out_idx` is `rows × k`. Values can be read back with
/// [`take_along_axis`].
pub fn topk_indices(x: &[f32], rows: usize, n: usize, k: usize, out_idx: &mut [i64]) {
    debug_assert_eq!(x.len(), rows * n);
    debug_assert!(k <= n);
    debug_assert_eq!(out_idx.len(), rows * k);
    if k == 0 || rows == 0 {
        return;
    }
    let row_topk = |scratch: &mut Vec<usize>, (r, out): (usize, &mut [i64])| {
        let xr = &x[r * n..(r + 1) * n];
        if k <= 8 {
            // Small k (MoE routing): one pass keeping a sorted buffer of the best k.
            scratch.clear();
            for j in 0..n {
                if scratch.len() == k && desc(xr, j, scratch[k - 1]) != Ordering::Less {
                    continue;
                }
                let at = scratch.partition_point(|&s| desc(xr, s, j) == Ordering::Less);
                if scratch.len() == k {
                    scratch.pop();
                }
                scratch.insert(at, j);
            }
        } else {
            scratch.clear();
            scratch.extend(0..n);
            if k < n {
                scratch.select_nth_unstable_by(k - 1, |&a, &b| desc(xr, a, b));
            }
            scratch[..k].sort_unstable_by(|&a, &b| desc(xr, a, b));
        }
        for (o, &j) in out.iter_mut().zip(scratch.iter()) {
            *o = j as i64;
        }
    };
    if rows * n < PAR_MIN {
        let mut scratch = Vec::new();
        out_idx.chunks_mut(k).enumerate().for_each(|rk| row_topk(&mut scratch, rk));
    } else {
        out_idx.par_chunks_mut(k).enumerate().for_each_init(Vec::new, row_topk);
    }
}

/// Element types [`cumsum`] supports, with the type they accumulate in.
pub trait CumsumElem: Copy + Send + Sync {
    /// Accumulator type: f64 for f32 (as PyTorch's CPU cumsum does), i64 for i64.
    type Acc: Copy + Send + Sync;
    /// Additive identity.
    fn zero() -> Self::Acc;
    /// acc + x (integers wrap, like PyTorch).
    fn add(acc: Self::Acc, x: Self) -> Self::Acc;
    /// Converts the accumulator back to the element type.
    fn finish(acc: Self::Acc) -> Self;
}

impl CumsumElem for f32 {
    type Acc = f64;
    fn zero() -> f64 {
        0.0
    }
    fn add(acc: f64, x: f32) -> f64 {
        acc + f64::from(x)
    }
    fn finish(acc: f64) -> f32 {
        acc as f32
    }
}

impl CumsumElem for i64 {
    type Acc = i64;
    fn zero() -> i64 {
        0
    }
    fn add(acc: i64, x: i64) -> i64 {
        acc.wrapping_add(x)
    }
    fn finish(acc: i64) -> i64 {
        acc
    }
}

/// Cumulative sum along the middle axis of `x` (`[outer, len, inner]`); `exclusive` makes
/// position i hold the sum of positions < i (0 first).
pub fn cumsum<T: CumsumElem>(x: &[T], outer: usize, len: usize, inner: usize, exclusive: bool, out: &mut [T]) {
    debug_assert_eq!(x.len(), outer * len * inner);
    debug_assert_eq!(out.len(), x.len());
    let block = len * inner;
    if block == 0 {
        return;
    }
    let scan = |(o, dst): (usize, &mut [T])| {
        let src = &x[o * block..(o + 1) * block];
        let mut acc = vec![T::zero(); inner];
        for (drow, srow) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(inner)) {
            for ((d, &s), a) in drow.iter_mut().zip(srow).zip(acc.iter_mut()) {
                let next = T::add(*a, s);
                *d = T::finish(if exclusive { *a } else { next });
                *a = next;
            }
        }
    };
    if x.len() < PAR_MIN {
        out.chunks_mut(block).enumerate().for_each(scan);
    } else {
        out.par_chunks_mut(block).enumerate().for_each(scan);
    }
}

/// torch.gather / take_along_axis: `out[o, i, n] = src[o, idx[o, i, n], n]` with `src`
/// `[outer, src_len, inner]` and `idx`, `out` `[outer, idx_len, inner]`.
#[allow(clippy::too_many_arguments)]
pub fn take_along_axis<T: Copy + Send + Sync>(
    src: &[T],
    outer: usize,
    src_len: usize,
    inner: usize,
    idx: &[i64],
    idx_len: usize,
    out: &mut [T],
) {
    debug_assert_eq!(src.len(), outer * src_len * inner);
    debug_assert_eq!(idx.len(), outer * idx_len * inner);
    debug_assert_eq!(out.len(), idx.len());
    debug_assert!(idx.iter().all(|&i| i >= 0 && (i as usize) < src_len));
    let block = idx_len * inner;
    if block == 0 {
        return;
    }
    let take = |(o, dst): (usize, &mut [T])| {
        let s = &src[o * src_len * inner..(o + 1) * src_len * inner];
        let ix = &idx[o * block..(o + 1) * block];
        for (e, (d, &i)) in dst.iter_mut().zip(ix).enumerate() {
            *d = s[i as usize * inner + e % inner];
        }
    };
    if out.len() < PAR_MIN {
        out.chunks_mut(block).enumerate().for_each(take);
    } else {
        out.par_chunks_mut(block).enumerate().for_each(take);
    }
}

/// torch.scatter_add_: `dst[o, idx[o, i, n], n] += src[o, i, n]` with `dst`
/// `[outer, dst_len, inner]` and `idx`, `src` `[outer, idx_len, inner]`. Updates to the same
/// element are applied in increasing i, so results are deterministic.
#[allow(clippy::too_many_arguments)]
pub fn scatter_add_along_axis<T: Copy + AddAssign + Send + Sync>(
    dst: &mut [T],
    outer: usize,
    dst_len: usize,
    inner: usize,
    idx: &[i64],
    idx_len: usize,
    src: &[T],
) {
    debug_assert_eq!(dst.len(), outer * dst_len * inner);
    debug_assert_eq!(idx.len(), outer * idx_len * inner);
    debug_assert_eq!(src.len(), idx.len());
    debug_assert!(idx.iter().all(|&i| i >= 0 && (i as usize) < dst_len));
    let block = idx_len * inner;
    if block == 0 || dst.is_empty() {
        return;
    }
    let add = |(o, d): (usize, &mut [T])| {
        let ix = &idx[o * block..(o + 1) * block];
        let s = &src[o * block..(o + 1) * block];
        for (e, (&i, &v)) in ix.iter().zip(s).enumerate() {
            d[i as usize * inner + e % inner] += v;
        }
    };
    let chunk = dst_len * inner;
    if src.len() < PAR_MIN {
        dst.chunks_mut(chunk).enumerate().for_each(add);
    } else {
        dst.par_chunks_mut(chunk).enumerate().for_each(add);
    }
}

/// Mixture-of-experts dispatch into expert buffers of static capacity: `out` (`rows × d`) is
/// zeroed, then for every assignment `(t, k)` with `slot[t·K + k] ≥ 0`,
/// `out[slot] += x[t]`. Slots come from routing, so each is used at most once and the add is
/// a copy; buffer rows no token reached stay zero (the expert then sees a zero input, as
/// vmoe's einsum dispatch gives it).
pub fn moe_dispatch(x: &[f32], d: usize, slot: &[i64], k: usize, out: &mut [f32]) {
    debug_assert_eq!(x.len() / d.max(1), slot.len() / k.max(1));
    out.fill(0.0);
    if d == 0 || k == 0 {
        return;
    }
    for (i, &r) in slot.iter().enumerate() {
        if r < 0 {
            continue;
        }
        let (t, r) = (i / k, r as usize);
        let (src, dst) = (&x[t * d..(t + 1) * d], &mut out[r * d..(r + 1) * d]);
        for (o, &v) in dst.iter_mut().zip(src) {
            *o += v;
        }
    }
}

/// Mixture-of-experts combine: `out[t] = Σ_k w[t·K + k] · y[slot[t·K + k]]` over the
/// assignments with a slot ≥ 0 (`out` is `T × d`; a token every expert dropped gets zeros).
/// Tokens are independent, so rows run in parallel.
pub fn moe_combine(y: &[f32], d: usize, slot: &[i64], w: &[f32], k: usize, out: &mut [f32]) {
    debug_assert_eq!(slot.len(), w.len());
    debug_assert_eq!(out.len(), slot.len() / k.max(1) * d);
    if d == 0 {
        return;
    }
    let row = |(t, o): (usize, &mut [f32])| {
        o.fill(0.0);
        for j in 0..k {
            let r = slot[t * k + j];
            if r < 0 {
                continue;
            }
            let (r, wt) = (r as usize, w[t * k + j]);
            for (a, &v) in o.iter_mut().zip(&y[r * d..(r + 1) * d]) {
                *a += wt * v;
            }
        }
    };
    if out.len() < PAR_MIN {
        out.chunks_mut(d).enumerate().for_each(row);
    } else {
        out.par_chunks_mut(d).enumerate().for_each(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::Rng;

    #[test]
    fn gather_rows_small_and_parallel() {
        let table: Vec<f32> = (0..10 * 4).map(|i| i as f32).collect();
        let mut out = vec![0.0; 3 * 4];
        gather_rows(&table, 4, &[2, 0, 9], &mut out);
        assert_eq!(out, vec![8.0, 9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0, 36.0, 37.0, 38.0, 39.0]);
        let ids: Vec<i64> = (0..20_000).map(|i| (i * 7 % 10) as i64).collect();
        let mut big = vec![0.0; ids.len() * 4];
        gather_rows(&table, 4, &ids, &mut big);
        for (r, &id) in ids.iter().enumerate() {
            assert_eq!(big[r * 4 + 3], table[id as usize * 4 + 3]);
        }
    }

    #[test]
    fn gather_rows_bf16_widens_exactly() {
        // Values exactly representable in bf16 (and a NaN and an infinity), small and parallel.
        let wide: Vec<f32> = (0..10 * 4).map(|i| (i as f32 - 17.0) * 0.375).chain([f32::NAN, f32::NEG_INFINITY, 0.0, -0.0]).collect();
        let bits: Vec<u16> = wide.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        let ids: Vec<i64> = (0..20_000).map(|i| (i * 7 % 11) as i64).collect();
        for n in [3, ids.len()] {
            let (mut a, mut b) = (vec![0.0f32; n * 4], vec![0.0f32; n * 4]);
            gather_rows(&wide, 4, &ids[..n], &mut a);
            gather_rows_bf16(&bits, 4, &ids[..n], &mut b);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "rows differ for {n} ids");
        }
    }

    #[test]
    fn gather_columns_reads_a_transposed_packing() {
        use crate::cpu::sgemm512::{PackedB, Stored};
        // A [V, D] table with V not a multiple of the panel width, packed as D x V; f32 and bf16.
        let (v, d) = (77, 5);
        // Values exact in bf16 (at most 8 significant bits), so both packings hold them.
        let wide: Vec<f32> = (0..v * d).map(|i| ((i % 97) as f32 - 48.0) * 0.25).collect();
        let bits: Vec<u8> = wide.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
        let f32s: Vec<u8> = wide.iter().flat_map(|x| x.to_le_bytes()).collect();
        let ids: Vec<i64> = (0..9_000).map(|i| (i * 13 % v) as i64).collect();
        let mut want = vec![0.0f32; ids.len() * d];
        gather_rows(&wide, d, &ids, &mut want);
        for stored in [Stored::F32(&f32s), Stored::Bf16(&bits)] {
            let b = PackedB::pack_stored(stored, d, v, true);
            for n in [2, ids.len()] {
                let mut got = vec![0.0f32; n * d];
                gather_columns(&b, &ids[..n], &mut got);
                assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "rows differ for {n} ids");
            }
        }
    }

    fn topk_ref(x: &[f32], k: usize) -> Vec<i64> {
        let mut ix: Vec<usize> = (0..x.len()).collect();
        ix.sort_by(|&a, &b| desc(x, a, b)); // stable full sort
        ix[..k].iter().map(|&i| i as i64).collect()
    }

    #[test]
    fn topk_orders_ties_and_nan() {
        let x = [1.0, 3.0, 3.0, f32::NAN, -1.0, 3.0];
        let mut out = vec![0; 4];
        topk_indices(&x, 1, 6, 4, &mut out);
        assert_eq!(out, vec![3, 1, 2, 5]);
        let mut rng = Rng::new(61);
        for &(rows, n) in &[(5, 1), (7, 8), (100, 32), (3, 1000), (2000, 20)] {
            // Coarse values force many ties.
            let x: Vec<f32> = (0..rows * n).map(|_| (rng.uniform(0.0, 6.0)).floor()).collect();
            for k in [1, 2.min(n), n.min(5), n.min(9), n] {
                let mut out = vec![0; rows * k];
                topk_indices(&x, rows, n, k, &mut out);
                for r in 0..rows {
                    assert_eq!(&out[r * k..(r + 1) * k], &topk_ref(&x[r * n..(r + 1) * n], k)[..], "{rows}x{n} k={k} row {r}");
                }
            }
        }
    }

    #[test]
    fn cumsum_inclusive_exclusive_f32_i64() {
        let x: Vec<i64> = (1..=12).collect(); // [2, 3, 2]
        let mut out = vec![0; 12];
        cumsum(&x, 2, 3, 2, false, &mut out);
        assert_eq!(out, vec![1, 2, 4, 6, 9, 12, 7, 8, 16, 18, 27, 30]);
        cumsum(&x, 2, 3, 2, true, &mut out);
        assert_eq!(out, vec![0, 0, 1, 2, 4, 6, 0, 0, 7, 8, 16, 18]);
        let mut rng = Rng::new(62);
        let (outer, len, inner) = (3, 20_000, 2);
        let xf = rng.vec(outer * len * inner, -1.0, 1.0);
        let mut of = vec![0.0; xf.len()];
        cumsum(&xf, outer, len, inner, false, &mut of);
        for o in 0..outer {
            for n in 0..inner {
                let mut acc = 0.0f64;
                for i in 0..len {
                    let at = (o * len + i) * inner + n;
                    acc += f64::from(xf[at]);
                    assert_eq!(of[at], acc as f32);
                }
            }
        }
    }

    #[test]
    fn moe_dispatch_and_combine_round_trip() {
        // 3 tokens, d = 2, K = 2; token 2 is dropped by both experts.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let slot = [0, 3, 2, -1, -1, -1];
        let mut buf = vec![9.0; 4 * 2];
        moe_dispatch(&x, 2, &slot, 2, &mut buf);
        assert_eq!(buf, vec![1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 1.0, 2.0]);
        let w = [0.5, 0.25, 2.0, 7.0, 7.0, 7.0];
        let mut out = vec![9.0; 6];
        moe_combine(&buf, 2, &slot, &w, 2, &mut out);
        assert_eq!(out, vec![0.75, 1.5, 6.0, 8.0, 0.0, 0.0]);
    }

    #[test]
    fn take_and_scatter_add_match_naive() {
        let mut rng = Rng::new(63);
        for &(outer, len, ilen, inner) in &[(2, 5, 3, 4), (1, 1, 6, 1), (40, 30, 50, 20)] {
            let src = rng.vec(outer * len * inner, -1.0, 1.0);
            let idx: Vec<i64> = (0..outer * ilen * inner).map(|_| rng.below(len) as i64).collect();
            let mut out = vec![0.0; idx.len()];
            take_along_axis(&src, outer, len, inner, &idx, ilen, &mut out);
            let upd = rng.vec(idx.len(), -1.0, 1.0);
            let mut dst = src.clone();
            scatter_add_along_axis(&mut dst, outer, len, inner, &idx, ilen, &upd);
            let mut want = src.clone();
            for o in 0..outer {
                for i in 0..ilen {
                    for n in 0..inner {
                        let e = (o * ilen + i) * inner + n;
                        let s = (o * len + idx[e] as usize) * inner + n;
                        assert_eq!(out[e], src[s]);
                        want[s] += upd[e];
                    }
                }
            }
            assert_eq!(dst, want);
        }
    }
}
