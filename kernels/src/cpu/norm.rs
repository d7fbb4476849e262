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
