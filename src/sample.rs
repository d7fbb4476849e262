//! `kiln sample`: draws images from a normalizing flow. z is Gaussian at a temperature, the
//! program's `inverse` entry maps it to images in [-1, 1], and a PNG grid shows them.

use crate::{Error, Result};
use kiln_runtime::{Session, Tensor};
use std::fmt;
use std::path::{Path, PathBuf};

/// What [`sample`] wrote.
pub struct SampleReport {
    pub path: PathBuf,
    pub images: usize,
    /// Grid size in images (columns, rows) and in pixels (width, height).
    pub grid: (usize, usize),
    pub pixels: (usize, usize),
}

impl fmt::Display for SampleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} images in a {}x{} grid ({}x{} px) -> {}",
            self.images,
            self.grid.0,
            self.grid.1,
            self.pixels.0,
            self.pixels.1,
            self.path.display()
        )
    }
}

/// A seeded stream of standard normal values (splitmix64, Box-Muller).
pub struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Self {
        Gaussian { state: seed ^ 0x5DEE_CE66_D1CE_4E5B, spare: None }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // In (0, 1]: never 0, so the logarithm below is finite.
        ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// The next N(0, 1) value.
    pub fn next_value(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * v;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

/// Lays out `[B, H, W, C]` images in [-1, 1] as a grid of 8-bit pixels (1 px gaps, black):
/// returns (columns, rows, width, height, bytes).
pub fn grid(images: &[f32], shape: &[usize]) -> Result<(usize, usize, usize, usize, Vec<u8>)> {
    let [b, h, w, c] = shape else {
        return Err(Error::Usage(format!("expected images [B, H, W, C], found {shape:?}")));
    };
    let (b, h, w, c) = (*b, *h, *w, *c);
    let cols = (b as f64).sqrt().ceil().max(1.0) as usize;
    let rows = b.div_ceil(cols);
    let (gw, gh) = (cols * w + cols - 1, rows * h + rows - 1);
    let mut px = vec![0u8; gw * gh * c];
    for (i, img) in images.chunks(h * w * c).enumerate().take(b) {
        let (ox, oy) = ((i % cols) * (w + 1), (i / cols) * (h + 1));
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let v = img[(y * w + x) * c + ch];
                    px[((oy + y) * gw + ox + x) * c + ch] = ((v as f64 + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    Ok((cols, rows, gw, gh, px))
}

/// Samples one batch: z ~ N(0, temperature²) shaped like the `inverse` entry's `z` input,
/// inverted, written as a PNG grid to `out`.
pub fn sample(s: &mut Session, seed: u64, temperature: f64, out: &Path) -> Result<SampleReport> {
    let e = &s.program().entries[s.entry_index("inverse")?];
    let io = e.inputs.iter().find(|io| io.name == "z").ok_or_else(|| Error::Usage("the 'inverse' entry has no 'z' input".into()))?;
    let ty = io.operand.ty.clone();
    let mut g = Gaussian::new(seed);
    let z: Vec<f64> = (0..ty.numel()).map(|_| temperature * g.next_value()).collect();
    let z = Tensor { bytes: kiln_runtime::tensor::from_f64(ty.dtype, &z), ty };
    let outs = s.run("inverse", &[("z", &z)])?;
    let (_, images) =
        outs.iter().find(|(n, _)| n == "images").ok_or_else(|| Error::Usage("the 'inverse' entry has no 'images' output".into()))?;
    let (cols, rows, w, h, px) = grid(&images.to_f32(), &images.ty.shape)?;
    let channels = images.ty.shape[3];
    crate::png::write(out, w, h, channels, &px).map_err(|e| Error::File { path: out.into(), msg: e.to_string() })?;
    Ok(SampleReport { path: out.into(), images: images.ty.shape[0], grid: (cols, rows), pixels: (w, h) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_moments() {
        let mut g = Gaussian::new(3);
        let v: Vec<f64> = (0..20_000).map(|_| g.next_value()).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }

    #[test]
    fn grid_places_images_and_maps_range() {
        let imgs = [-1.0f32, 1.0, 0.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0];
        let (cols, rows, w, h, px) = grid(&imgs, &[3, 1, 1, 3]).unwrap();
        assert_eq!((cols, rows, w, h), (2, 2, 3, 3));
        assert_eq!(&px[..3], &[0, 255, 128]);
        assert_eq!(&px[6..9], &[255, 255, 255]);
        assert_eq!(&px[18..21], &[0, 0, 0]);
    }
}
