//! 2-D convolution and transposed convolution over NHWC images with HWIO kernels (f32), in
//! gather form: each output pixel sums its taps, so output rows are independent and run in
//! parallel. A transposed conv's tap `(p, q)` reads input pixel `((r + pad - p) / s, ..)` when
//! the division is exact: the scatter of PyTorch's `ConvTranspose2d`, read from the output side.

use rayon::prelude::*;

/// Sizes and geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch.
    pub b: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub ci: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Output channels.
    pub co: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Stride along H and W.
    pub stride: [usize; 2],
    /// Zero padding along H and W, each side.
    pub pad: [usize; 2],
    /// PyTorch `ConvTranspose2d` rather than `Conv2d`.
    pub transposed: bool,
}

impl ConvShape {
    /// The input coordinate that tap `k` of output coordinate `o` reads along an axis of
    /// extent `n`, or `None` when it falls outside (padding) or between strides.
    #[inline]
    fn source(&self, axis: usize, o: usize, k: usize, n: usize) -> Option<usize> {
        let (s, p) = (self.stride[axis], self.pad[axis]);
        let i = if self.transposed {
            let num = (o + p).checked_sub(k)?;
            if num % s != 0 {
                return None;
            }
            num / s
        } else {
            (o * s + k).checked_sub(p)?
        };
        (i < n).then_some(i)
    }
}

/// `y = conv(x, w)`: `x [B, H, W, Ci]`, `w [KH, KW, Ci, Co]`, `y [B, OH, OW, Co]`.
pub fn conv2d(x: &[f32], w: &[f32], g: &ConvShape, y: &mut [f32]) {
    let row = g.ow * g.co;
    y.par_chunks_mut(row.max(1)).enumerate().for_each(|(br, out)| {
        let (n, r) = (br / g.oh.max(1), br % g.oh.max(1));
        out.fill(0.0);
        for p in 0..g.kh {
            let Some(i) = g.source(0, r, p, g.h) else { continue };
            for t in 0..g.ow {
                let acc = &mut out[t * g.co..(t + 1) * g.co];
                for q in 0..g.kw {
                    let Some(j) = g.source(1, t, q, g.w) else { continue };
                    let xs = &x[((n * g.h + i) * g.w + j) * g.ci..][..g.ci];
                    let taps = &w[(p * g.kw + q) * g.ci * g.co..][..g.ci * g.co];
                    for (c, &xv) in xs.iter().enumerate() {
                        for (a, &wv) in acc.iter_mut().zip(&taps[c * g.co..(c + 1) * g.co]) {
                            *a += xv * wv;
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposed conv by its definition (a scatter from every input pixel).
    fn scatter(x: &[f32], w: &[f32], g: &ConvShape) -> Vec<f32> {
        let mut y = vec![0.0; g.b * g.oh * g.ow * g.co];
        for (n, i, j) in (0..g.b).flat_map(|n| (0..g.h).flat_map(move |i| (0..g.w).map(move |j| (n, i, j)))) {
            for (p, q) in (0..g.kh).flat_map(|p| (0..g.kw).map(move |q| (p, q))) {
                let (r, t) = ((i * g.stride[0] + p).checked_sub(g.pad[0]), (j * g.stride[1] + q).checked_sub(g.pad[1]));
                let (Some(r), Some(t)) = (r, t) else { continue };
                if r >= g.oh || t >= g.ow {
                    continue;
                }
                for c in 0..g.ci {
                    for o in 0..g.co {
                        y[((n * g.oh + r) * g.ow + t) * g.co + o] +=
                            x[((n * g.h + i) * g.w + j) * g.ci + c] * w[((p * g.kw + q) * g.ci + c) * g.co + o];
                    }
                }
            }
        }
        y
    }

    #[test]
    fn gather_form_equals_the_scatter_of_a_transposed_conv() {
        let g = ConvShape { b: 2, h: 3, w: 4, ci: 3, kh: 4, kw: 3, co: 5, oh: 6, ow: 7, stride: [2, 2], pad: [1, 1], transposed: true };
        assert_eq!((g.h - 1) * 2 + g.kh - 2, g.oh);
        assert_eq!((g.w - 1) * 2 + g.kw - 2, g.ow);
        let x: Vec<f32> = (0..g.b * g.h * g.w * g.ci).map(|i| ((i * 37) % 11) as f32 / 5.0 - 1.0).collect();
        let w: Vec<f32> = (0..g.kh * g.kw * g.ci * g.co).map(|i| ((i * 53) % 13) as f32 / 6.0 - 1.0).collect();
        let mut y = vec![f32::NAN; g.b * g.oh * g.ow * g.co];
        conv2d(&x, &w, &g, &mut y);
        let want = scatter(&x, &w, &g);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
