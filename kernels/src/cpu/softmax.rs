//! Numerically stable softmax over the last axis of a `[rows, n]` buffer.
//!
//! Semantics match PyTorch: the row maximum is subtracted before exponentiating, and a row
//! that is entirely -inf (or contains NaN) yields NaN.

use rayon::prelude::*;

use super::elementwise::exp_nonpos;
use super::simd::{self, vectorized};

/// Minimum elements per parallel task.
const MIN_TASK: usize = 1 << 13;

/// Softmax of each row of `x` (`rows × n`), in place.
pub fn softmax_inplace(x: &mut [f32], rows: usize, n: usize) {
    debug_assert_eq!(x.len(), rows * n);
    if rows == 0 || n == 0 {
        return;
    }
    let chunk = super::rows_per_chunk(rows, n, MIN_TASK) * n;
    x.par_chunks_mut(chunk).for_each(|c| {
        vectorized(
            #[inline(always)]
            || {
                for row in c.chunks_exact_mut(n) {
                    let m = simd::max(row);
                    exp_sub_normalize(row, m);
                }
            },
        )
    });
}

/// Softmax of each row of `x` (`rows × n`) written to `out`.
pub fn softmax(x: &[f32], rows: usize, n: usize, out: &mut [f32]) {
    super::for_each_row(x, out, rows, n, MIN_TASK, |xrow, orow| {
        let m = simd::max(xrow);
        orow.copy_from_slice(xrow);
        exp_sub_normalize(orow, m);
    });
}

/// row ← exp(row - m) / Σ exp(row - m). NaN in the row (skipped by `max`) resurfaces here.
#[inline(always)]
fn exp_sub_normalize(row: &mut [f32], m: f32) {
    for v in row.iter_mut() {
        *v = exp_nonpos(*v - m);
    }
    let inv = 1.0 / simd::sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, Rng};

    fn reference(x: &[f32], rows: usize, n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(rows * n);
        for r in x.chunks(n) {
            let m = r.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let s: f64 = r.iter().map(|&v| (f64::from(v) - m).exp()).sum();
            out.extend(r.iter().map(|&v| (f64::from(v) - m).exp() / s));
        }
        out
    }

    #[test]
    fn matches_f64_in_and_out_of_place() {
        let mut rng = Rng::new(31);
        for &(rows, n) in &[(1, 1), (3, 5), (64, 256), (7, 1000), (2, 17)] {
            let x = rng.vec(rows * n, -30.0, 30.0);
            let want = reference(&x, rows, n);
            let mut out = vec![0.0; rows * n];
            softmax(&x, rows, n, &mut out);
            // Per-element relative error: probabilities span many decades, and rounding
            // x - max to f32 alone costs |x - max|·6e-8 relative.
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                let m = x[i / n * n..(i / n + 1) * n].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let tol = 1e-6 + 1e-7 * f64::from((x[i] - m).abs());
                assert!((f64::from(g) - w).abs() <= tol * w + 1e-37, "{rows}x{n}[{i}]: {g} vs {w}");
            }
            let mut y = x.clone();
            softmax_inplace(&mut y, rows, n);
            assert_eq!(y, out);
            assert_close("row sums", &y.chunks(n).map(|r| r.iter().sum::<f32>()).collect::<Vec<_>>(), &vec![1.0; rows], 1e-6);
        }
    }

    #[test]
    fn masked_entries_and_degenerate_rows() {
        let mut x = vec![0.0, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY];
        softmax_inplace(&mut x, 2, 3);
        assert_eq!(&x[..3], &[0.5, 0.0, 0.5]);
        assert!(x[3..].iter().all(|v| v.is_nan()), "all -inf row is NaN as in PyTorch");
        let mut y = vec![1.0, f32::NAN, 2.0];
        softmax_inplace(&mut y, 1, 3);
        assert!(y.iter().all(|v| v.is_nan()));
        let mut z = vec![1e30, 0.0];
        softmax_inplace(&mut z, 1, 2);
        assert_eq!(z, vec![1.0, 0.0]);
    }
}
