//! Row normalisations: LayerNorm (PyTorch semantics) and RMSNorm (Gemma's `1 + w` option).
//!
//! Statistics are computed in f32 with a two-pass mean/variance per row, accumulated in 16
//! lanes, which keeps the error near f32 rounding for the row lengths in these models.

use super::simd;

/// Minimum elements per parallel task.
const MIN_TASK: usize = 1 << 14;

/// LayerNorm over the last axis of `x` (`rows × d`): (x - mean)/√(var + eps)·γ + β, with the
/// biased variance as in PyTorch; `beta` may be absent (bias-free LayerNorm).
pub fn layer_norm(x: &[f32], rows: usize, d: usize, gamma: &[f32], beta: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    debug_assert_eq!(gamma.len(), d);
    debug_assert!(beta.is_none_or(|b| b.len() == d));
    super::for_each_row(x, out, rows, d, MIN_TASK, |xrow, orow| layer_norm_row(xrow, gamma, beta, eps, orow));
}

#[inline(always)]
fn layer_norm_row(x: &[f32], gamma: &[f32], beta: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let d = x.len() as f32;
    let mean = simd::sum(x) / d;
    let var = simd::sum_sq_dev(x, mean) / d;
    let rstd = 1.0 / (var + eps).sqrt();
    match beta {
        Some(beta) => {
            for (((o, &x), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
                *o = (x - mean) * rstd * g + b;
            }
        }
        None => {
            for ((o, &x), &g) in out.iter_mut().zip(x).zip(gamma) {
                *o = (x - mean) * rstd * g;
            }
        }
    }
}

/// RMSNorm over the last axis: x / √(mean(x²) + eps) · w, or · (1 + w) when `add_one`
/// (Gemma stores the weight as an offset from 1).
pub fn rms_norm(x: &[f32], rows: usize, d: usize, w: &[f32], add_one: bool, eps: f32, out: &mut [f32]) {
    debug_assert_eq!(w.len(), d);
    let offset = if add_one { 1.0 } else { 0.0 };
    super::for_each_row(x, out, rows, d, MIN_TASK, |xrow, orow| {
        let ms = simd::dot(xrow, xrow) / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &x), &w) in orow.iter_mut().zip(xrow).zip(w) {
            *o = x * r * (offset + w);
        }
    });
}

/// The residual junction between two RMS norms, per row of `x` and `o` (`rows × d`): `h = x +
/// rms_norm(o, w_post)` (`x + o` without `w_post`) and `n = rms_norm(h, w_pre)`, both norms
/// with [`rms_norm`]'s attributes. The arithmetic is `rms_norm`'s and an f32 add, in the same
/// order, so `h` and `n` are bit-identical to the three unfused kernels' results.
/// `out` is `[2 rows_pad, d]`: `h` in its first rows, `n` from row `rows_pad` on, zeros in the
/// rows between and after (`attrs`: `add_one`, `eps`, `rows_pad`).
pub fn residual_rms_norm(x: &[f32], o: &[f32], w_post: Option<&[f32]>, w_pre: &[f32], attrs: (bool, f32, usize), out: &mut [f32]) {
    let (add_one, eps, rows_pad) = attrs;
    let d = w_pre.len();
    let (h, n) = out.split_at_mut((rows_pad * d).min(out.len()));
    let (h, h_pad) = h.split_at_mut(x.len().min(h.len()));
    let (n, n_pad) = n.split_at_mut(x.len().min(n.len()));
    residual_rms_norm_rows(x, o, d, w_post, w_pre, add_one, eps, h, n);
    h_pad.fill(0.0);
    n_pad.fill(0.0);
}

/// [`residual_rms_norm`] on the rows alone: `h` and `n` have `x`'s length.
#[allow(clippy::too_many_arguments)]
fn residual_rms_norm_rows(
    x: &[f32],
    o: &[f32],
    d: usize,
    w_post: Option<&[f32]>,
    w_pre: &[f32],
    add_one: bool,
    eps: f32,
    h: &mut [f32],
    n: &mut [f32],
) {
    use rayon::prelude::*;
    let rows = x.len() / d.max(1);
    debug_assert!(o.len() == x.len() && h.len() == x.len() && n.len() == x.len() && w_pre.len() == d);
    if rows == 0 || d == 0 {
        return;
    }
    let offset = if add_one { 1.0 } else { 0.0 };
    let norm = |xrow: &[f32], w: &[f32], orow: &mut [f32]| {
        let ms = simd::dot(xrow, xrow) / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &x), &w) in orow.iter_mut().zip(xrow).zip(w) {
            *o = x * r * (offset + w);
        }
    };
    let chunk = super::rows_per_chunk(rows, d, MIN_TASK / 2) * d;
    h.par_chunks_mut(chunk).zip(n.par_chunks_mut(chunk)).zip(x.par_chunks(chunk).zip(o.par_chunks(chunk))).for_each(|((h, n), (x, o))| {
        simd::vectorized(
            #[inline(always)]
            || {
                for (((hrow, nrow), xrow), orow) in
                    h.chunks_exact_mut(d).zip(n.chunks_exact_mut(d)).zip(x.chunks_exact(d)).zip(o.chunks_exact(d))
                {
                    match w_post {
                        Some(wp) => {
                            norm(orow, wp, hrow);
                            for (h, &x) in hrow.iter_mut().zip(xrow) {
                                *h += x;
                            }
                        }
                        None => {
                            for ((h, &x), &o) in hrow.iter_mut().zip(xrow).zip(orow) {
                                *h = x + o;
                            }
                        }
                    }
                    norm(hrow, w_pre, nrow);
                }
            },
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, Rng};

    #[test]
    fn layer_norm_matches_f64() {
        let mut rng = Rng::new(21);
        for &(rows, d) in &[(1, 1), (3, 7), (50, 64), (300, 1152), (2, 33)] {
            // An offset mean stresses the variance computation (catastrophic in one pass).
            let x: Vec<f32> = rng.vec(rows * d, -1.0, 1.0).iter().map(|v| v + 100.0).collect();
            let g = rng.vec(d, 0.5, 1.5);
            let b = rng.vec(d, -0.5, 0.5);
            for beta in [Some(&b[..]), None] {
                let mut out = vec![0.0; rows * d];
                layer_norm(&x, rows, d, &g, beta, 1e-6, &mut out);
                let mut want = vec![0.0f64; rows * d];
                for r in 0..rows {
                    let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| f64::from(v)).collect();
                    let mean = xr.iter().sum::<f64>() / d as f64;
                    let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                    for j in 0..d {
                        let bb = beta.map_or(0.0, |b| f64::from(b[j]));
                        want[r * d + j] = (xr[j] - mean) / (var + 1e-6).sqrt() * f64::from(g[j]) + bb;
                    }
                }
                // x ≈ 100 ± 1 holds ~7 significant bits of the deviation after the mean is
                // subtracted in f32, so the bound reflects input rounding, not the kernel.
                assert_close(&format!("layer_norm {rows}x{d}"), &out, &want, if d == 1 { 1e-3 } else { 2e-4 });
            }
        }
    }

    #[test]
    fn residual_rms_norm_equals_the_unfused_kernels_bit_for_bit() {
        let mut rng = Rng::new(23);
        for &(rows, d) in &[(1, 1), (4, 9), (37, 2304), (3, 256)] {
            let (x, o) = (rng.vec(rows * d, -2.0, 2.0), rng.vec(rows * d, -3.0, 3.0));
            let (wp, w) = (rng.vec(d, -0.5, 0.5), rng.vec(d, -0.5, 0.5));
            for (post, add_one) in [(true, true), (false, false), (true, false)] {
                let mut want_h = x.clone();
                if post {
                    let mut on = vec![0.0; rows * d];
                    rms_norm(&o, rows, d, &wp, add_one, 1e-6, &mut on);
                    want_h.iter_mut().zip(&on).for_each(|(h, o)| *h += o);
                } else {
                    want_h.iter_mut().zip(&o).for_each(|(h, o)| *h += o);
                }
                let mut want_n = vec![0.0; rows * d];
                rms_norm(&want_h, rows, d, &w, add_one, 1e-6, &mut want_n);
                let pad = rows + 3;
                let mut out = vec![f32::NAN; 2 * pad * d];
                residual_rms_norm(&x, &o, post.then_some(&wp[..]), &w, (add_one, 1e-6, pad), &mut out);
                let (h, n) = (&out[..rows * d], &out[pad * d..(pad + rows) * d]);
                assert!(out[rows * d..pad * d].iter().chain(&out[(pad + rows) * d..]).all(|&v| v == 0.0), "padding {rows}x{d}");
                assert!(h.iter().zip(&want_h).all(|(a, b)| a.to_bits() == b.to_bits()), "h {rows}x{d} {post}");
                assert!(n.iter().zip(&want_n).all(|(a, b)| a.to_bits() == b.to_bits()), "n {rows}x{d} {post}");
            }
        }
    }

    #[test]
    fn rms_norm_matches_f64() {
        let mut rng = Rng::new(22);
        for &(rows, d) in &[(1, 1), (4, 9), (100, 2304), (65, 256)] {
            let x = rng.vec(rows * d, -2.0, 2.0);
            let w = rng.vec(d, -0.5, 0.5);
            for add_one in [false, true] {
                let mut out = vec![0.0; rows * d];
                rms_norm(&x, rows, d, &w, add_one, 1e-6, &mut out);
                let mut want = vec![0.0f64; rows * d];
                for r in 0..rows {
                    let xr = &x[r * d..(r + 1) * d];
                    let ms = xr.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / d as f64;
                    for j in 0..d {
                        let ww = f64::from(w[j]) + if add_one { 1.0 } else { 0.0 };
                        want[r * d + j] = f64::from(xr[j]) / (ms + 1e-6).sqrt() * ww;
                    }
                }
                assert_close(&format!("rms_norm {rows}x{d} {add_one}"), &out, &want, 1e-6);
            }
        }
    }
}
