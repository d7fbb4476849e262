//! An AVX-512 f32 GEMM for products against a weight packed once at load time.
//!
//! The `gemm` crate (the default path) uses AVX-512 only with a nightly feature, and
//! repacks the right-hand side on every call. Transformer inference multiplies fresh
//! activations by the same weights every run, so this path packs each weight once into
//! 32-column panels and runs a 12x32 register-blocked micro-kernel over row-major
//! activations (no packing of A, no allocation per call). Used when the CPU has AVX-512F;
//! everything else keeps the `gemm` crate path.

use super::gemm::MatView;
use super::SyncPtr;
use rayon::prelude::*;

/// Columns per packed panel (two 16-lane registers).
const NR: usize = 32;
/// Rows per micro-tile (12 x 2 accumulators + 2 B registers + 1 broadcast fit in 32 zmm).
const MR: usize = 12;
/// Depth of one pass over a panel: a 32 x 1152 panel (144 KiB) stays in L2 while every row
/// tile of A streams past it, and C is read back only every 1152 steps of k. Measured on
/// So400m (6 interleaved A/B runs): faster than 256 (an L1-sized panel) in each pair.
const KC: usize = 1152;

/// Whether this CPU runs the AVX-512 path.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A k x n right-hand side packed into panels `[n / 32][k][32]` (the last panel zero-padded).
#[derive(Clone, Debug)]
pub struct PackedB {
    /// Rows (the contraction length).
    pub k: usize,
    /// Columns.
    pub n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs any strided k x n view (a PyTorch `[n, k]` weight is `MatView::transposed`).
    pub fn pack(b: MatView) -> Self {
        let (k, n) = (b.rows, b.cols);
        let panels = n.div_ceil(NR);
        let mut data = vec![0.0f32; panels * k * NR];
        data.par_chunks_mut((k * NR).max(1)).enumerate().for_each(|(p, panel)| {
            for j in 0..NR.min(n - p * NR) {
                let col = p * NR + j;
                for kk in 0..k {
                    panel[kk * NR + j] = b.data[kk * b.row_stride + col * b.col_stride];
                }
            }
        });
        PackedB { k, n, data }
    }
}

/// C (m x n, row-major, contiguous) = A (m x k, row stride `lda`) * B.
pub fn matmul_packed(a: &[f32], m: usize, lda: usize, b: &PackedB, c: &mut [f32]) {
    let (k, n) = (b.k, b.n);
    assert!(c.len() == m * n, "sgemm512: C has {} elements, want {m}x{n}", c.len());
    assert!(m == 0 || (m - 1) * lda + k <= a.len(), "sgemm512: A too short");
    assert!(available(), "sgemm512: the CPU lacks AVX-512F");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let panels = n.div_ceil(NR);
    // Split columns across threads (each streams its share of the weight once), a few
    // panels per task for balance.
    let per = panels.div_ceil(3 * rayon::current_num_threads()).max(1);
    let cp = SyncPtr(c.as_mut_ptr());
    (0..panels.div_ceil(per)).into_par_iter().for_each(|t| {
        let (p0, p1) = (t * per, ((t + 1) * per).min(panels));
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for p in p0..p1 {
                let cols = NR.min(n - p * NR);
                let bp = &b.data[p * k * NR + k0 * NR..p * k * NR + (k0 + kc) * NR];
                let mut r0 = 0;
                while r0 < m {
                    let rows = MR.min(m - r0);
                    // SAFETY: `available()` was checked; A rows r0..r0+rows at columns
                    // k0..k0+kc lie inside `a` (asserted above); the panel slice holds kc
                    // rows of 32; C's tile rows r0.. at columns p*32..p*32+cols lie inside
                    // `c`, and tasks own disjoint column ranges, so no two threads write
                    // the same element.
                    unsafe {
                        tile(rows, kc, a.as_ptr().add(r0 * lda + k0), lda, bp.as_ptr(), cp.get().add(r0 * n + p * NR), n, cols, k0 == 0);
                    }
                    r0 += rows;
                }
            }
        }
    });
}

/// Dispatches a tile of `rows` (1..=12) rows to the micro-kernel built for that height.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(rows: usize, kc: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, cols: usize, first: bool) {
    // SAFETY: every arm forwards the caller's contract unchanged.
    unsafe {
        match rows {
            12 => micro::<12>(kc, a, lda, b, c, ldc, cols, first),
            11 => micro::<11>(kc, a, lda, b, c, ldc, cols, first),
            10 => micro::<10>(kc, a, lda, b, c, ldc, cols, first),
            9 => micro::<9>(kc, a, lda, b, c, ldc, cols, first),
            8 => micro::<8>(kc, a, lda, b, c, ldc, cols, first),
            7 => micro::<7>(kc, a, lda, b, c, ldc, cols, first),
            6 => micro::<6>(kc, a, lda, b, c, ldc, cols, first),
            5 => micro::<5>(kc, a, lda, b, c, ldc, cols, first),
            4 => micro::<4>(kc, a, lda, b, c, ldc, cols, first),
            3 => micro::<3>(kc, a, lda, b, c, ldc, cols, first),
            2 => micro::<2>(kc, a, lda, b, c, ldc, cols, first),
            _ => micro::<1>(kc, a, lda, b, c, ldc, cols, first),
        }
    }
}

/// `C[0..R, 0..cols] (+)= A[0..R, 0..kc] * panel[0..kc, 0..32]`; `first` overwrites C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize>(kc: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, cols: usize, first: bool) {
    use std::arch::x86_64::*;
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    // SAFETY: the caller guarantees the A, panel and C ranges named in `matmul_packed`.
    unsafe {
        for kk in 0..kc {
            let b0 = _mm512_loadu_ps(b.add(kk * NR));
            let b1 = _mm512_loadu_ps(b.add(kk * NR + 16));
            for r in 0..R {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
            }
        }
        let m0: __mmask16 = if cols >= 16 { 0xffff } else { ((1u32 << cols) - 1) as u16 };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols <= 16 {
            0
        } else {
            ((1u32 << (cols - 16)) - 1) as u16
        };
        for r in 0..R {
            let cr = c.add(r * ldc);
            // Masked lanes are neither read nor written, so a partial tile at the right
            // edge of C touches only its own columns.
            if !first {
                lo[r] = _mm512_add_ps(lo[r], _mm512_maskz_loadu_ps(m0, cr));
                hi[r] = _mm512_add_ps(hi[r], _mm512_maskz_loadu_ps(m1, cr.add(16)));
            }
            _mm512_mask_storeu_ps(cr, m0, lo[r]);
            _mm512_mask_storeu_ps(cr.add(16), m1, hi[r]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize>(_: usize, _: *const f32, _: usize, _: *const f32, _: *mut f32, _: usize, _: usize, _: bool) {
    unreachable!("sgemm512 is only dispatched when available() is true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::Rng;

    #[test]
    fn matches_naive_on_ragged_shapes() {
        if !available() {
            eprintln!("no AVX-512F on this CPU: nothing to test");
            return;
        }
        let mut rng = Rng::new(7);
        for &(m, k, n) in &[(1, 1, 1), (13, 7, 33), (25, 300, 70), (12, 256, 32), (37, 513, 65), (14, 2500, 40)] {
            let a = rng.vec(m * k, -1.0, 1.0);
            let w = rng.vec(n * k, -1.0, 1.0); // [n, k], used transposed
            let packed = PackedB::pack(MatView::transposed(&w, k, n));
            let mut c = vec![f32::NAN; m * n];
            matmul_packed(&a, m, k, &packed, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| a[i * k + l] as f64 * w[j * k + l] as f64).sum();
                    let got = c[i * n + j] as f64;
                    assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "({m},{k},{n}) at ({i},{j}): {got} vs {want}");
                }
            }
        }
    }
}
