//! Image resampling matching PyTorch's `F.interpolate(..., align_corners=False,
//! antialias=False)` for `mode="bicubic"` and `mode="bilinear"` when an output size is
//! given (scale = in/out). Used to resample ViT position embeddings for another resolution.
//!
//! Input and output are `[planes, h, w]` (NCHW with N·C flattened); channels-last data
//! must be permuted first. As in PyTorch, coordinates and weights are computed in f32 and
//! the result is Σ_y w_y · (Σ_x w_x · src), rows first.

use rayon::prelude::*;

/// PyTorch's bicubic coefficient (`A = -0.75`, as in OpenCV; Keys' kernel with a = -0.75).
const CUBIC_A: f32 = -0.75;

/// Per-output-position source indices (already clamped to the border) and weights.
struct Taps<const N: usize> {
    idx: Vec<[usize; N]>,
    w: Vec<[f32; N]>,
}

/// PyTorch's `area_pixel_compute_source_index` for align_corners=False.
fn source_index(scale: f32, dst: usize, cubic: bool) -> f32 {
    let s = scale * (dst as f32 + 0.5) - 0.5;
    if !cubic && s < 0.0 {
        0.0
    } else {
        s
    }
}

/// PyTorch's `guard_index_and_lambda`: integer part clamped to the last pixel, fraction in [0, 1].
fn index_and_lambda(real: f32, in_size: usize) -> (i64, f32) {
    let idx = (real.floor() as i64).min(in_size as i64 - 1);
    let lambda = (real - idx as f32).clamp(0.0, 1.0);
    (idx, lambda)
}

/// Keys' cubic kernel for |x| ≤ 1.
fn cubic1(x: f32) -> f32 {
    ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
}

/// Keys' cubic kernel for 1 < |x| < 2.
fn cubic2(x: f32) -> f32 {
    ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

fn cubic_taps(in_size: usize, out_size: usize) -> Taps<4> {
    let scale = in_size as f32 / out_size as f32;
    let clamp = |i: i64| i.clamp(0, in_size as i64 - 1) as usize;
    let (mut idx, mut w) = (Vec::with_capacity(out_size), Vec::with_capacity(out_size));
    for o in 0..out_size {
        let (i, t) = index_and_lambda(source_index(scale, o, true), in_size);
        idx.push([clamp(i - 1), clamp(i), clamp(i + 1), clamp(i + 2)]);
        w.push([cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)]);
    }
    Taps { idx, w }
}

fn linear_taps(in_size: usize, out_size: usize) -> Taps<2> {
    let scale = in_size as f32 / out_size as f32;
    let (mut idx, mut w) = (Vec::with_capacity(out_size), Vec::with_capacity(out_size));
    for o in 0..out_size {
        if in_size == out_size {
            // PyTorch special-cases equal sizes to an exact copy.
            idx.push([o, o]);
            w.push([1.0, 0.0]);
            continue;
        }
        let (i, l1) = index_and_lambda(source_index(scale, o, false), in_size);
        let i0 = i.max(0) as usize;
        let i1 = if i0 + 1 < in_size { i0 + 1 } else { i0 };
        idx.push([i0, i1]);
        w.push([1.0 - l1, l1]);
    }
    Taps { idx, w }
}

/// Bicubic resize of `planes` images `in_h × in_w` to `out_h × out_w` (PyTorch semantics).
pub fn resize_bicubic(src: &[f32], planes: usize, in_h: usize, in_w: usize, out_h: usize, out_w: usize, dst: &mut [f32]) {
    let ty = cubic_taps(in_h, out_h);
    let tx = cubic_taps(in_w, out_w);
    resample(src, planes, in_h, in_w, out_h, out_w, &ty, &tx, dst);
}

/// Bilinear resize of `planes` images `in_h × in_w` to `out_h × out_w` (PyTorch semantics).
pub fn resize_bilinear(src: &[f32], planes: usize, in_h: usize, in_w: usize, out_h: usize, out_w: usize, dst: &mut [f32]) {
    let ty = linear_taps(in_h, out_h);
    let tx = linear_taps(in_w, out_w);
    resample(src, planes, in_h, in_w, out_h, out_w, &ty, &tx, dst);
}

#[allow(clippy::too_many_arguments)]
fn resample<const N: usize>(
    src: &[f32],
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    ty: &Taps<N>,
    tx: &Taps<N>,
    dst: &mut [f32],
) {
    debug_assert_eq!(src.len(), planes * in_h * in_w);
    debug_assert_eq!(dst.len(), planes * out_h * out_w);
    if dst.is_empty() {
        return;
    }
    assert!(in_h > 0 && in_w > 0, "resize: empty input {in_h}x{in_w} for a non-empty output");
    // One task per output row of one plane.
    dst.par_chunks_mut(out_w).enumerate().for_each(|(row, d)| {
        let (p, oy) = (row / out_h, row % out_h);
        let plane = &src[p * in_h * in_w..(p + 1) * in_h * in_w];
        let (yi, yw) = (ty.idx[oy], ty.w[oy]);
        for (ox, o) in d.iter_mut().enumerate() {
            let (xi, xw) = (tx.idx[ox], tx.w[ox]);
            let interp_row = |y: usize| {
                let r = &plane[y * in_w..(y + 1) * in_w];
                let mut acc = r[xi[0]] * xw[0];
                for j in 1..N {
                    acc += r[xi[j]] * xw[j];
                }
                acc
            };
            let mut acc = interp_row(yi[0]) * yw[0];
            for i in 1..N {
                acc += interp_row(yi[i]) * yw[i];
            }
            *o = acc;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, Rng};

    /// Direct f64 transcription of PyTorch's upsample_bicubic2d / upsample_bilinear2d.
    fn reference(src: &[f32], planes: usize, ih: usize, iw: usize, oh: usize, ow: usize, cubic: bool) -> Vec<f64> {
        let a = -0.75f64;
        let c1 = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
        let c2 = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
        let taps = |n_in: usize, n_out: usize, o: usize| -> Vec<(usize, f64)> {
            let scale = n_in as f64 / n_out as f64;
            let mut real = scale * (o as f64 + 0.5) - 0.5;
            if cubic {
                let i = real.floor();
                let t = real - i;
                let w = [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)];
                (0..4).map(|k| (((i as i64) - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize, w[k])).collect()
            } else {
                if n_in == n_out {
                    return vec![(o, 1.0)];
                }
                real = real.max(0.0);
                let i = real.floor() as usize;
                let l = real - i as f64;
                vec![(i, 1.0 - l), ((i + 1).min(n_in - 1), l)]
            }
        };
        let mut out = Vec::new();
        for p in 0..planes {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0;
                    for (y, wy) in taps(ih, oh, oy) {
                        for (x, wx) in taps(iw, ow, ox) {
                            acc += wy * wx * f64::from(src[(p * ih + y) * iw + x]);
                        }
                    }
                    out.push(acc);
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_up_and_down() {
        let mut rng = Rng::new(51);
        for &(planes, ih, iw, oh, ow) in
            &[(3, 16, 16, 24, 24), (2, 27, 27, 16, 16), (1, 5, 7, 9, 3), (4, 1, 1, 3, 2), (2, 6, 6, 6, 6), (1, 64, 64, 14, 14)]
        {
            let src = rng.vec(planes * ih * iw, -1.0, 1.0);
            let mut d = vec![0.0; planes * oh * ow];
            resize_bicubic(&src, planes, ih, iw, oh, ow, &mut d);
            // Coordinates and weights are f32, as in PyTorch: a source coordinate near 63
            // carries ~4e-6 absolute rounding, which moves the weights by about as much.
            assert_close(&format!("bicubic {ih}x{iw}->{oh}x{ow}"), &d, &reference(&src, planes, ih, iw, oh, ow, true), 1e-5);
            resize_bilinear(&src, planes, ih, iw, oh, ow, &mut d);
            assert_close("bilinear", &d, &reference(&src, planes, ih, iw, oh, ow, false), 1e-5);
        }
    }

    #[test]
    fn known_values() {
        // F.interpolate(torch.tensor([[[[0., 1.]]]]), size=(1, 4), mode="bilinear")
        let mut d = vec![0.0; 4];
        resize_bilinear(&[0.0, 1.0], 1, 1, 2, 1, 4, &mut d);
        assert_eq!(d, vec![0.0, 0.25, 0.75, 1.0]);
        // Same sizes are an exact copy in both modes; constants stay constant.
        let src: Vec<f32> = (0..12).map(|i| i as f32 * 0.3).collect();
        let mut same = vec![0.0; 12];
        resize_bicubic(&src, 1, 3, 4, 3, 4, &mut same);
        assert_eq!(same, src);
        let mut up = vec![0.0; 49];
        resize_bicubic(&[2.5; 9], 1, 3, 3, 7, 7, &mut up);
        assert!(up.iter().all(|&v| (v - 2.5).abs() < 1e-5), "{up:?}");
        // Bicubic 2x upsample of a ramp: A = -0.75 does not reproduce linear functions, and
        // the clamped border overshoots (values are exact in binary, worked by hand).
        let mut r = vec![0.0; 8];
        resize_bicubic(&[0.0, 1.0, 2.0, 3.0], 1, 1, 4, 1, 8, &mut r);
        let want = [-0.10546875f64, 0.19140625, 0.66796875, 1.296875, 1.703125, 2.33203125, 2.80859375, 3.10546875];
        for (&g, w) in r.iter().zip(want) {
            assert!((f64::from(g) - w).abs() < 1e-6, "{r:?}");
        }
    }
}
