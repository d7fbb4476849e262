//! Flash-style multi-head attention (FlashAttention's online softmax, Dao et al. 2022) that
//! never materialises the Sq×Sk score matrix: each task owns one (batch, head, query block)
//! and walks the key blocks keeping a running row max, row sum and rescaled accumulator.
//!
//! Layouts are the ones projections produce without a transpose: q `[B, Sq, Hq, D]`,
//! k `[B, Sk, Hkv, D]`, v `[B, Sk, Hkv, Dv]`, out `[B, Sq, Hq, Dv]`, all contiguous. The two
//! block products go through single-threaded `gemm` calls on strided views; rayon spreads
//! the tasks.

use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::elementwise::{exp_nonpos, tanh_fast};
use super::gemm::{gemm_serial, MatView};
use super::simd::{self, vectorized};
use super::SyncPtr;

/// Query rows per task.
const BLOCK_Q: usize = 64;
/// Keys per inner step; the score tile is BLOCK_Q × BLOCK_K f32 (128 KiB, L2-resident).
const BLOCK_K: usize = 512;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch size B.
    pub batch: usize,
    /// Number of queries Sq.
    pub q_len: usize,
    /// Number of keys/values Sk.
    pub kv_len: usize,
    /// Query heads Hq (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// Key/value heads Hkv; query head h reads kv head h / (Hq / Hkv).
    pub kv_heads: usize,
    /// Query/key head dimension D.
    pub head_dim: usize,
    /// Value head dimension Dv.
    pub v_head_dim: usize,
}

/// Which keys each query may attend to.
#[derive(Clone, Copy, Debug)]
pub enum AttnMask<'a> {
    /// Every query sees every key.
    None,
    /// Query i sits at absolute position q_offset + i and sees keys j ≤ q_offset + i.
    Causal {
        /// Absolute position of query 0 (the number of cached keys before it, when decoding).
        q_offset: usize,
    },
    /// Causal, and additionally only keys j > q_offset + i - window.
    SlidingWindow {
        /// Absolute position of query 0.
        q_offset: usize,
        /// Number of most recent positions visible (including the query's own).
        window: usize,
    },
    /// Added to the scaled (and soft-capped) scores: `[B, Sq, Sk]`, shared by all heads.
    Additive(&'a [f32]),
    /// Causal from run-time positions (the graph's `PosMask`): query i sits at key index
    /// `start + i`; key j of row b is visible when it is causal (and inside the window), or
    /// both the query and the key are below `prefix[b]`, and `keep[b, j] != 0`. Keys past `max(start + i + 1, prefix[b])` are
    /// never read.
    Positions {
        /// Key index of query 0 (decode's cache position).
        start: usize,
        /// Only the `window` most recent positions (the query's own included).
        window: Option<usize>,
        /// `[B, Sk]`, 0 = padding.
        keep: Option<&'a [i64]>,
        /// `[B]`: queries and keys below it see each other.
        prefix: Option<&'a [i64]>,
    },
}

/// Keys read by [`attention_in`] since the process started, summed over (batch, head, query
/// block) tasks: a work counter for tests (decode must read the filled keys, not the capacity).
static KEYS_VISITED: AtomicU64 = AtomicU64::new(0);

/// The number of key rows the attention kernel has read so far in this process (each task adds
/// the keys it walks; a task is one batch row, one query head and one block of queries).
pub fn keys_visited() -> u64 {
    KEYS_VISITED.load(Ordering::Relaxed)
}

impl AttnMask<'_> {
    /// Half-open range of keys that query `i` of batch row `b` may see (before any additive mask).
    fn key_range(&self, b: usize, i: usize, kv_len: usize) -> (usize, usize) {
        match *self {
            AttnMask::None | AttnMask::Additive(_) => (0, kv_len),
            AttnMask::Positions { start, window, prefix, .. } => {
                let (pos, p) = (start + i, prefix.map_or(0, |p| p[b].max(0) as usize));
                let hi = (pos + 1).max(p).min(kv_len);
                let lo = if pos < p { 0 } else { window.map_or(0, |w| (pos + 1).saturating_sub(w)) };
                (lo.min(hi), hi)
            }
            AttnMask::Causal { q_offset } => (0, (q_offset + i + 1).min(kv_len)),
            AttnMask::SlidingWindow { q_offset, window } => {
                let pos = q_offset + i;
                ((pos + 1).saturating_sub(window).min(kv_len), (pos + 1).min(kv_len))
            }
        }
    }
}

/// softmax(scale·q·kᵀ [soft-capped, masked])·v for every batch and head, written to `out`.
///
/// `softcap = Some(c)` replaces each scaled score s by c·tanh(s/c) before masking (Gemma 2).
/// Queries that see no key (fully masked rows) produce zeros, not NaN.
#[allow(clippy::too_many_arguments)]
pub fn attention(shape: &AttnShape, q: &[f32], k: &[f32], v: &[f32], scale: f32, softcap: Option<f32>, mask: AttnMask, out: &mut [f32]) {
    attention_in(shape, q, k, v, scale, softcap, mask, out, &AttnWorkspace::new(shape));
}

/// Buffers one attention shape needs: the transposed keys and one score/accumulator tile
/// set per worker thread (each behind an uncontended lock, taken by the running thread).
pub struct AttnWorkspace {
    shape: AttnShape,
    block_q: usize,
    block_k: usize,
    kt: Mutex<Vec<f32>>,
    scratch: Vec<Mutex<Scratch>>,
}

impl AttnWorkspace {
    /// Buffers for `shape` on the current rayon pool.
    pub fn new(shape: &AttnShape) -> Self {
        Self::with_blocks(shape, BLOCK_Q, BLOCK_K)
    }

    fn with_blocks(shape: &AttnShape, block_q: usize, block_k: usize) -> Self {
        let kt_len = if transpose_keys(shape.q_len, block_q) { shape.batch * shape.kv_len * shape.kv_heads * shape.head_dim } else { 0 };
        // One tile set per pool thread, plus one for a caller outside the pool.
        let threads = rayon::current_num_threads() + 1;
        let scratch = (0..threads).map(|_| Mutex::new(Scratch::new(block_q, block_k, shape.v_head_dim))).collect();
        AttnWorkspace { shape: *shape, block_q, block_k, kt: Mutex::new(vec![0.0; kt_len]), scratch }
    }

    fn tiles(&self) -> std::sync::MutexGuard<'_, Scratch> {
        let n = self.scratch.len();
        let i = rayon::current_thread_index().map_or(n - 1, |i| i % n);
        self.scratch[i].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether transposing K once beats gathering it per query block.
fn transpose_keys(q_len: usize, block_q: usize) -> bool {
    q_len >= 2 * block_q.min(q_len).max(16)
}

/// [`attention`] with buffers made once by the caller: no allocation per call. The
/// workspace also fixes the tile sizes (tests use tiny ones to exercise block edges).
#[allow(clippy::too_many_arguments)]
pub fn attention_in(
    shape: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    softcap: Option<f32>,
    mask: AttnMask,
    out: &mut [f32],
    ws: &AttnWorkspace,
) {
    assert_eq!(ws.shape, *shape, "attention: workspace made for another shape");
    let (block_q, block_k) = (ws.block_q, ws.block_k);
    let AttnShape { batch, q_len, kv_len, q_heads, kv_heads, head_dim, v_head_dim } = *shape;
    // Real asserts: the strided gemm views below are unchecked in release builds.
    assert!(kv_heads > 0 && q_heads % kv_heads == 0, "attention: {q_heads} query heads, {kv_heads} kv heads");
    assert_eq!(q.len(), batch * q_len * q_heads * head_dim, "attention: q length");
    assert_eq!(k.len(), batch * kv_len * kv_heads * head_dim, "attention: k length");
    assert_eq!(v.len(), batch * kv_len * kv_heads * v_head_dim, "attention: v length");
    assert_eq!(out.len(), batch * q_len * q_heads * v_head_dim, "attention: out length");
    if let AttnMask::Additive(m) = mask {
        assert_eq!(m.len(), batch * q_len * kv_len, "attention: additive mask must be [B, Sq, Sk]");
    }
    if let AttnMask::Positions { keep, prefix, .. } = mask {
        assert!(keep.is_none_or(|k| k.len() == batch * kv_len), "attention: keep must be [B, Sk]");
        assert!(prefix.is_none_or(|p| p.len() == batch), "attention: prefix must be [B]");
    }
    if out.is_empty() {
        return;
    }
    if kv_len == 0 {
        out.fill(0.0);
        return;
    }
    let q_blocks = q_len.div_ceil(block_q);
    let tasks = batch * q_heads * q_blocks;
    let out_ptr = SyncPtr(out.as_mut_ptr());
    // Q·Kᵀ contracts over K's contiguous axis, so gemm must pack K transposed, a strided
    // gather, once per query block. With several query blocks per head it is cheaper to
    // transpose K once to [B, Hkv, D, Sk] (measured: the gather was ~18% of the time).
    let mut kt = ws.kt.lock().unwrap_or_else(|e| e.into_inner());
    let k_layout = if transpose_keys(q_len, block_q) {
        super::movement::permute(k, &[batch, kv_len, kv_heads, head_dim], &[0, 2, 3, 1], &mut kt[..k.len()]);
        KLayout::Transposed(&kt[..k.len()])
    } else {
        KLayout::Natural(k)
    };
    let ctx = Ctx { shape: *shape, q, k: k_layout, v, scale, softcap, mask, block_q, block_k };
    (0..tasks).into_par_iter().for_each(|t| {
        let qb = t % q_blocks;
        let h = (t / q_blocks) % q_heads;
        let b = t / (q_blocks * q_heads);
        let mut scratch = ws.tiles();
        vectorized(
            #[inline(always)]
            || ctx.run_task(b, h, qb, &mut scratch, out_ptr),
        );
    });
}

/// Per-thread buffers reused across tasks.
struct Scratch {
    /// Score / probability tile, block_q × block_k.
    s: Vec<f32>,
    /// Output accumulator, block_q × Dv.
    acc: Vec<f32>,
    /// Running row maxima.
    m: Vec<f32>,
    /// Running row sums of exp(s - m).
    l: Vec<f32>,
}

impl Scratch {
    fn new(bq: usize, bk: usize, dv: usize) -> Self {
        Scratch { s: vec![0.0; bq * bk], acc: vec![0.0; bq * dv], m: vec![0.0; bq], l: vec![0.0; bq] }
    }
}

/// Where the keys live.
#[derive(Clone, Copy)]
enum KLayout<'a> {
    /// The caller's `[B, Sk, Hkv, D]`.
    Natural(&'a [f32]),
    /// Transposed copy `[B, Hkv, D, Sk]`.
    Transposed(&'a [f32]),
}

/// Everything a task needs, shared by all tasks.
struct Ctx<'a> {
    shape: AttnShape,
    q: &'a [f32],
    k: KLayout<'a>,
    v: &'a [f32],
    scale: f32,
    softcap: Option<f32>,
    mask: AttnMask<'a>,
    block_q: usize,
    block_k: usize,
}

impl Ctx<'_> {
    /// One (batch b, query head h, query block qb) task.
    #[inline(always)]
    fn run_task(&self, b: usize, h: usize, qb: usize, sc: &mut Scratch, out: SyncPtr<f32>) {
        let AttnShape { q_len, kv_len, q_heads, kv_heads, head_dim: d, v_head_dim: dv, .. } = self.shape;
        let hk = h / (q_heads / kv_heads);
        let q0 = qb * self.block_q;
        let rows = self.block_q.min(q_len - q0);
        let (k_lo, _) = self.mask.key_range(b, q0, kv_len);
        let (_, k_hi) = self.mask.key_range(b, q0 + rows - 1, kv_len);
        KEYS_VISITED.fetch_add(k_hi.saturating_sub(k_lo) as u64, Ordering::Relaxed);

        let acc = &mut sc.acc[..rows * dv];
        acc.fill(0.0);
        sc.m[..rows].fill(f32::NEG_INFINITY);
        sc.l[..rows].fill(0.0);

        let q_base = ((b * q_len + q0) * q_heads + h) * d;
        let qv = MatView::strided(&self.q[q_base..], rows, d, q_heads * d, 1);
        let mut j0 = k_lo;
        while j0 < k_hi {
            let cols = self.block_k.min(k_hi - j0);
            let s = &mut sc.s[..rows * cols];
            // S = scale · Q Kᵀ with Kᵀ a D × cols view of the keys.
            let kt = match self.k {
                KLayout::Natural(k) => {
                    let base = ((b * kv_len + j0) * kv_heads + hk) * d;
                    MatView::strided(&k[base..], d, cols, 1, kv_heads * d)
                }
                KLayout::Transposed(k) => {
                    let base = (b * kv_heads + hk) * d * kv_len + j0;
                    MatView::strided(&k[base..], d, cols, kv_len, 1)
                }
            };
            gemm_serial(qv, kt, s, cols, false, self.scale);
            if let Some(c) = self.softcap {
                let inv = 1.0 / c;
                for x in s.iter_mut() {
                    *x = c * tanh_fast(*x * inv);
                }
            }
            for r in 0..rows {
                let row = &mut s[r * cols..(r + 1) * cols];
                let i = q0 + r;
                self.mask_row(b, i, j0, row);
                let m_old = sc.m[r];
                let m_new = m_old.max(simd::max(row));
                if m_new == f32::NEG_INFINITY {
                    // Nothing visible yet: contribute nothing (avoids exp(-inf - -inf) = NaN).
                    row.fill(0.0);
                    continue;
                }
                let alpha = exp_nonpos(m_old - m_new);
                sc.l[r] = sc.l[r] * alpha + exp_sub_sum(row, m_new);
                sc.m[r] = m_new;
                if alpha != 1.0 {
                    for a in &mut acc[r * dv..(r + 1) * dv] {
                        *a *= alpha;
                    }
                }
            }
            // acc += P · V, V a cols × Dv view of v with row stride Hkv·Dv.
            let v_base = ((b * kv_len + j0) * kv_heads + hk) * dv;
            let vv = MatView::strided(&self.v[v_base..], cols, dv, kv_heads * dv, 1);
            gemm_serial(MatView::row_major(s, rows, cols), vv, acc, dv, true, 1.0);
            j0 += cols;
        }

        for r in 0..rows {
            let l = sc.l[r];
            let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
            let o = ((b * q_len + q0 + r) * q_heads + h) * dv;
            // SAFETY: `out` has B·Sq·Hq·Dv elements (asserted by the caller) and this task is
            // the only writer of the Dv elements of (b, q0 + r, h): tasks partition
            // (batch, head, query block) and rows within a block are distinct.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(o), dv) };
            for (d, &a) in dst.iter_mut().zip(&acc[r * dv..(r + 1) * dv]) {
                *d = a * inv;
            }
        }
    }

    /// Applies the mask to the scores of query `i` against keys `j0..j0 + row.len()`.
    #[inline(always)]
    fn mask_row(&self, b: usize, i: usize, j0: usize, row: &mut [f32]) {
        let kv_len = self.shape.kv_len;
        match self.mask {
            AttnMask::None => {}
            AttnMask::Additive(m) => {
                let base = (b * self.shape.q_len + i) * kv_len + j0;
                let n = row.len();
                for (x, &a) in row.iter_mut().zip(&m[base..base + n]) {
                    *x += a;
                }
            }
            AttnMask::Positions { start, window, keep, prefix } => {
                let (pos, p) = (start + i, prefix.map_or(0, |p| p[b].max(0) as usize));
                let keep = keep.map(|k| &k[b * kv_len + j0..b * kv_len + j0 + row.len()]);
                for (t, x) in row.iter_mut().enumerate() {
                    let j = j0 + t;
                    let causal = j <= pos && window.is_none_or(|w| j + w > pos);
                    if !((causal || pos < p && j < p) && keep.is_none_or(|k| k[t] != 0)) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            AttnMask::Causal { .. } | AttnMask::SlidingWindow { .. } => {
                let (lo, hi) = self.mask.key_range(0, i, kv_len);
                let n = row.len();
                let lo = lo.saturating_sub(j0).min(n);
                let hi = hi.saturating_sub(j0).min(n).max(lo);
                row[..lo].fill(f32::NEG_INFINITY);
                row[hi..].fill(f32::NEG_INFINITY);
            }
        }
    }
}

/// row ← exp(row - m), returning the sum, in one pass with 16 independent partial sums.
#[inline(always)]
fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for c in &mut chunks {
        for l in 0..L {
            let e = exp_nonpos(c[l] - m);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp_nonpos(*x - m);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, Rng};

    fn reference(sh: &AttnShape, q: &[f32], k: &[f32], v: &[f32], scale: f32, softcap: Option<f32>, mask: AttnMask) -> Vec<f64> {
        let AttnShape { batch, q_len, kv_len, q_heads, kv_heads, head_dim: d, v_head_dim: dv } = *sh;
        let mut out = vec![0.0f64; batch * q_len * q_heads * dv];
        for b in 0..batch {
            for h in 0..q_heads {
                let hk = h / (q_heads / kv_heads);
                for i in 0..q_len {
                    let mut s = vec![f64::NEG_INFINITY; kv_len];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let mut dot = 0.0;
                        for t in 0..d {
                            dot += f64::from(q[((b * q_len + i) * q_heads + h) * d + t])
                                * f64::from(k[((b * kv_len + j) * kv_heads + hk) * d + t]);
                        }
                        let mut x = dot * f64::from(scale);
                        if let Some(c) = softcap {
                            x = f64::from(c) * (x / f64::from(c)).tanh();
                        }
                        let pos = match mask {
                            AttnMask::Causal { q_offset } | AttnMask::SlidingWindow { q_offset, .. } => q_offset + i,
                            AttnMask::Positions { start, .. } => start + i,
                            _ => usize::MAX,
                        };
                        let visible = match mask {
                            AttnMask::None => true,
                            AttnMask::Additive(m) => {
                                x += f64::from(m[(b * q_len + i) * kv_len + j]);
                                true
                            }
                            AttnMask::Causal { .. } => j <= pos,
                            AttnMask::SlidingWindow { window, .. } => j <= pos && j + window > pos,
                            AttnMask::Positions { window, keep, prefix, .. } => {
                                let causal = j <= pos && window.is_none_or(|w| j + w > pos);
                                let p = prefix.map_or(0, |p| p[b] as usize);
                                (causal || pos < p && j < p) && keep.is_none_or(|k| k[b * kv_len + j] != 0)
                            }
                        };
                        if visible {
                            *sj = x;
                        }
                    }
                    let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                    if m == f64::NEG_INFINITY {
                        continue;
                    }
                    let p: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
                    let z: f64 = p.iter().sum();
                    for t in 0..dv {
                        let mut acc = 0.0;
                        for (j, pj) in p.iter().enumerate() {
                            acc += pj * f64::from(v[((b * kv_len + j) * kv_heads + hk) * dv + t]);
                        }
                        out[((b * q_len + i) * q_heads + h) * dv + t] = acc / z;
                    }
                }
            }
        }
        out
    }

    fn run_case(sh: AttnShape, softcap: Option<f32>, mask_kind: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let q = rng.vec(sh.batch * sh.q_len * sh.q_heads * sh.head_dim, -1.0, 1.0);
        let k = rng.vec(sh.batch * sh.kv_len * sh.kv_heads * sh.head_dim, -1.0, 1.0);
        let v = rng.vec(sh.batch * sh.kv_len * sh.kv_heads * sh.v_head_dim, -1.0, 1.0);
        let mut add = rng.vec(sh.batch * sh.q_len * sh.kv_len, -2.0, 0.0);
        // Fully mask query 1 of batch 0 and a few random entries elsewhere.
        if sh.q_len > 1 {
            add[sh.kv_len..2 * sh.kv_len].fill(f32::NEG_INFINITY);
        }
        for _ in 0..add.len() / 4 {
            let idx = rng.below(add.len());
            add[idx] = f32::NEG_INFINITY;
        }
        let offset = sh.kv_len.saturating_sub(sh.q_len);
        // Left padding of b rows in row b, the first key of row 0 kept; prefixes of 0, 3, 6...
        let keep: Vec<i64> = (0..sh.batch * sh.kv_len).map(|x| i64::from(x % sh.kv_len >= x / sh.kv_len)).collect();
        let prefix: Vec<i64> = (0..sh.batch as i64).map(|b| 3 * b).collect();
        // A start that leaves keys past the last query unfilled (garbage that must not be read).
        let start = offset.saturating_sub(1);
        let mask = match mask_kind {
            0 => AttnMask::None,
            1 => AttnMask::Causal { q_offset: offset },
            2 => AttnMask::SlidingWindow { q_offset: offset, window: 4 },
            3 => AttnMask::Additive(&add),
            5 => AttnMask::Positions { start, window: None, keep: Some(&keep), prefix: None },
            6 => AttnMask::Positions { start, window: Some(3), keep: Some(&keep), prefix: Some(&prefix) },
            7 => AttnMask::Positions { start, window: Some(2), keep: None, prefix: None },
            _ => AttnMask::SlidingWindow { q_offset: 0, window: 0 }, // sees nothing
        };
        // Large scale so softmax is peaked and the softcap actually bites.
        let scale = 3.0 / (sh.head_dim as f32).sqrt();
        let want = reference(&sh, &q, &k, &v, scale, softcap, mask);
        for (bq, bk) in [(BLOCK_Q, BLOCK_K), (3, 5), (1, 1), (4, 16)] {
            let mut out = vec![f32::NAN; want.len()];
            attention_in(&sh, &q, &k, &v, scale, softcap, mask, &mut out, &AttnWorkspace::with_blocks(&sh, bq, bk));
            assert!(out.iter().all(|x| x.is_finite()), "non-finite output for {sh:?} mask {mask_kind}");
            assert_close(&format!("{sh:?} cap {softcap:?} mask {mask_kind} blocks {bq}x{bk}"), &out, &want, 2e-6);
        }
    }

    #[test]
    fn matches_reference_across_shapes_masks_and_blocks() {
        let shapes = [
            AttnShape { batch: 1, q_len: 1, kv_len: 1, q_heads: 1, kv_heads: 1, head_dim: 1, v_head_dim: 1 },
            AttnShape { batch: 2, q_len: 9, kv_len: 9, q_heads: 4, kv_heads: 2, head_dim: 8, v_head_dim: 5 },
            AttnShape { batch: 1, q_len: 3, kv_len: 17, q_heads: 6, kv_heads: 1, head_dim: 16, v_head_dim: 16 },
            AttnShape { batch: 2, q_len: 70, kv_len: 70, q_heads: 2, kv_heads: 2, head_dim: 12, v_head_dim: 7 },
        ];
        let mut seed = 100;
        for sh in shapes {
            for mask_kind in 0..8 {
                for cap in [None, Some(2.0)] {
                    seed += 1;
                    run_case(sh, cap, mask_kind, seed);
                }
            }
        }
    }

    #[test]
    fn long_keys_use_several_blocks_at_default_size() {
        let sh = AttnShape { batch: 1, q_len: 70, kv_len: 1100, q_heads: 2, kv_heads: 1, head_dim: 8, v_head_dim: 8 };
        run_case(sh, None, 1, 7);
        run_case(sh, None, 2, 8);
    }

    #[test]
    fn positions_never_read_past_the_filled_keys() {
        // Keys at and past index 5 hold NaN: a decode at start 4 must not read them.
        let sh = AttnShape { batch: 1, q_len: 1, kv_len: 40, q_heads: 2, kv_heads: 1, head_dim: 4, v_head_dim: 4 };
        let mut rng = Rng::new(3);
        let q = rng.vec(8, -1.0, 1.0);
        let (mut k, mut v) = (rng.vec(160, -1.0, 1.0), rng.vec(160, -1.0, 1.0));
        k[20..].fill(f32::NAN);
        v[20..].fill(f32::NAN);
        let mask = AttnMask::Positions { start: 4, window: None, keep: None, prefix: None };
        let mut out = vec![0.0; 8];
        attention(&sh, &q, &k, &v, 0.5, None, mask, &mut out);
        assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    }

    #[test]
    fn empty_keys_give_zeros() {
        let sh = AttnShape { batch: 1, q_len: 2, kv_len: 0, q_heads: 1, kv_heads: 1, head_dim: 4, v_head_dim: 3 };
        let mut out = vec![f32::NAN; 6];
        attention(&sh, &[0.0; 8], &[], &[], 1.0, None, AttnMask::None, &mut out);
        assert_eq!(out, vec![0.0; 6]);
    }
}
