//! UViM's task heads (big_vision `trainers/proj/uvim/{depth,panoptic,colorization}_task.py`
//! `predict_outputs`) for one image, and the image preprocessing the task configs give
//! (`resize`: TF's bilinear resize; `rgb_to_grayscale_to_rgb`). The VQ-VAE's logits for an
//! output are `[hn*wn, C, hp*wp]`: patch-major, channel, then the patch's pixels row-major.

/// The pixel `(y, x)` of patch-major logits: `(patch, pixel within it)`.
fn at(y: usize, x: usize, w: usize, (hp, wp): (usize, usize)) -> (usize, usize) {
    ((y / hp) * (w / wp) + x / wp, (y % hp) * wp + x % wp)
}

/// `depth_task.predict_outputs`: the argmax bin per pixel (ties to the first), its centre over
/// `[min, max]`. Logits `[(hn wn), bins, (hp wp)]`, depths `[H, W]`.
pub fn depth_map(logits: &[f32], (h, w): (usize, usize), patch: (usize, usize), bins: usize, (min, max): (f64, f64)) -> Vec<f32> {
    let pp = patch.0 * patch.1;
    let mut out = vec![0f32; h * w];
    for (y, x) in (0..h).flat_map(|y| (0..w).map(move |x| (y, x))) {
        let (t, p) = at(y, x, w, patch);
        let v = |c: usize| logits[(t * bins + c) * pp + p];
        let best = (0..bins).fold(0, |b, c| if v(c) > v(b) { c } else { b });
        // As big_vision computes it, in float32: (bin + 0.5) / bins * (max - min) + min.
        let d = (best as f32 + 0.5) / bins as f32;
        out[y * w + x] = d * (max - min) as f32 + min as f32;
    }
    out
}

/// `colorization_task.predict_outputs`: logits `[(hn wn), 3, (hp wp)]` rearranged to an image
/// `[H, W, 3]` and clipped to [-1, 1].
pub fn color_map(logits: &[f32], (h, w): (usize, usize), patch: (usize, usize)) -> Vec<f32> {
    let pp = patch.0 * patch.1;
    let mut out = vec![0f32; h * w * 3];
    for (y, x) in (0..h).flat_map(|y| (0..w).map(move |x| (y, x))) {
        let (t, p) = at(y, x, w, patch);
        for c in 0..3 {
            out[(y * w + x) * 3 + c] = logits[(t * 3 + c) * pp + p].clamp(-1.0, 1.0);
        }
    }
    out
}

/// `panoptic_task.predict_outputs` (`panoptic_predictions_from_logits`): per pixel the argmax
/// instance id; per instance the semantic class whose logits, summed over its pixels, are
/// largest; each pixel `(class of its instance, instance)`, zeroed where its instance covers no
/// more than `min_fraction` of the image. Logits `[(hn wn), classes, (hp wp)]` and
/// `[(hn wn), instances, (hp wp)]`; out `[H, W, 2]`.
pub fn panoptic_map(
    semantics: &[f32],
    instances: &[f32],
    (h, w): (usize, usize),
    patch: (usize, usize),
    (classes, ids): (usize, usize),
    min_fraction: f64,
) -> Vec<i64> {
    let pp = patch.0 * patch.1;
    let pixels: Vec<(usize, usize)> = (0..h).flat_map(|y| (0..w).map(move |x| at(y, x, w, patch))).collect();
    let ins: Vec<usize> = pixels
        .iter()
        .map(|&(t, p)| {
            let v = |n: usize| instances[(t * ids + n) * pp + p];
            (0..ids).fold(0, |b, n| if v(n) > v(b) { n } else { b })
        })
        .collect();
    let mut sums = vec![0f32; ids * classes];
    let mut count = vec![0usize; ids];
    for (&(t, p), &n) in pixels.iter().zip(&ins) {
        count[n] += 1;
        for k in 0..classes {
            sums[n * classes + k] += semantics[(t * classes + k) * pp + p];
        }
    }
    let label: Vec<usize> = (0..ids)
        .map(|n| {
            let s = &sums[n * classes..(n + 1) * classes];
            (0..classes).fold(0, |b, k| if s[k] > s[b] { k } else { b })
        })
        .collect();
    let big: Vec<bool> = count.iter().map(|&c| c as f32 / (h * w) as f32 > min_fraction as f32).collect();
    ins.iter().flat_map(|&n| if big[n] { [label[n] as i64, n as i64] } else { [0, 0] }).collect()
}

/// A colour for each (class, instance) pair of a panoptic map, so segments can be told apart;
/// a zeroed pixel (a filtered instance, or class 0 instance 0) is black.
pub fn panoptic_colors(map: &[i64]) -> Vec<u8> {
    map.chunks(2)
        .flat_map(|p| {
            if p == [0, 0] {
                return [0, 0, 0];
            }
            let mut z = (p[0] as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (p[1] as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
            z ^= z >> 31;
            z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            [64 + (z & 0xbf) as u8, 64 + ((z >> 8) & 0xbf) as u8, 64 + ((z >> 16) & 0xbf) as u8]
        })
        .collect()
}

/// TF's `tf.image.resize(image, (oh, ow), 'bilinear')` (half-pixel centres, edges clamped, no
/// antialiasing; big_vision's `resize` op) of an `h x w x 3` float image, computed as TF's
/// kernel does: each output pixel samples the input at `(i + 0.5) * in / out - 0.5` (clamped at
/// 0) in f32 and interpolates the two nearest rows and columns as `a + (b - a) * t`.
pub fn tf_resize(img: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f32> {
    let taps = |o: usize, n: usize, out: usize| -> (usize, usize, f32) {
        let x = ((o as f32 + 0.5) * n as f32 / out as f32 - 0.5).max(0.0);
        let x0 = (x.floor() as usize).min(n - 1);
        (x0, (x0 + 1).min(n - 1), x - x0 as f32)
    };
    let mut out = vec![0f32; oh * ow * 3];
    for y in 0..oh {
        let (y0, y1, fy) = taps(y, h, oh);
        for x in 0..ow {
            let (x0, x1, fx) = taps(x, w, ow);
            for c in 0..3 {
                let at = |yy: usize, xx: usize| img[(yy * w + xx) * 3 + c];
                let top = at(y0, x0) + (at(y0, x1) - at(y0, x0)) * fx;
                let bottom = at(y1, x0) + (at(y1, x1) - at(y1, x0)) * fx;
                out[(y * ow + x) * 3 + c] = top + (bottom - top) * fy;
            }
        }
    }
    out
}

/// `tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))`: the luma
/// `0.2989 R + 0.5870 G + 0.1140 B` in all three channels.
pub fn grayscale_to_rgb(img: &[f32]) -> Vec<f32> {
    img.chunks(3).flat_map(|p| [p[0] * 0.2989 + p[1] * 0.5870 + p[2] * 0.1140; 3]).collect()
}

/// big_vision's `value_range(-1, 1)` of values in [0, 255].
pub fn to_unit_range(img: &[f32]) -> Vec<f32> {
    img.iter().map(|&v| -1.0 + v * 2.0 / 255.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TF's half-pixel bilinear: a 2-pixel row doubled is `a, (3a + b) / 4, (a + 3b) / 4, b`;
    /// the same size is the identity.
    #[test]
    fn tf_bilinear_has_half_pixel_centres() {
        let img = [0.0, 0.0, 0.0, 200.0, 100.0, 40.0];
        let out = tf_resize(&img, (1, 2), (1, 4));
        let red: Vec<f32> = out.chunks(3).map(|p| p[0]).collect();
        assert_eq!(red, [0.0, 50.0, 150.0, 200.0]);
        assert_eq!(tf_resize(&img, (1, 2), (1, 2)), img);
    }

    #[test]
    fn grey_is_tf_luma_in_three_channels() {
        let got = grayscale_to_rgb(&[100.0, 0.0, 0.0, 0.0, 0.0, 200.0]);
        for (g, w) in got.iter().zip([29.89f32, 29.89, 29.89, 22.8, 22.8, 22.8]) {
            assert!((g - w).abs() < 1e-4, "{got:?}");
        }
    }
}
