//! PaliGemma's `<seg>` masks, end to end: the mask decoder folder (`proj.paligemma.segmentation`,
//! the released `vae-oid.npz`) compiled once, each detection's 16 codes decoded to a 64x64
//! mask, and the mask pasted into its box as big_vision's segmentation evaluator does it
//! (`evaluators/proj/paligemma/transfers/segmentation.py`): the box in pixels is
//! `int(y1 * h), int(x1 * w), int(y2 * h), int(x2 * w)`, the mask is resized to it with PIL's
//! bilinear filter (mode "F": a triangle filter widened by the scale when shrinking, weights
//! renormalised at the edges) and thresholded at 0.

use crate::{compile, CompileOptions, Error, Result};
use kiln_models::locations::Detection;
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Scratch folders made by [`SegDecoder::open`], numbered within the process.
static SEQ: AtomicU64 = AtomicU64::new(0);
use std::sync::Arc;

/// Side of a decoded mask.
pub const SIDE: usize = 64;

/// A compiled mask decoder.
pub struct SegDecoder {
    session: Session,
}

/// A detection's mask in image pixels: the box `(x0, y0)` to `(x1, y1)` (exclusive) and its
/// `(y1 - y0) x (x1 - x0)` pixels, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct BoxMask {
    pub x0: usize,
    pub y0: usize,
    pub x1: usize,
    pub y1: usize,
    pub inside: Vec<bool>,
}

impl BoxMask {
    /// Pixels of the object.
    pub fn area(&self) -> usize {
        self.inside.iter().filter(|&&b| b).count()
    }
}

impl SegDecoder {
    /// Compiles the decoder for one mask at a time on the cpu backend, from a folder
    /// (`config.json` + `params.npz`) or from the released `vae-oid.npz` itself.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Self::open_folder(path);
        }
        if path.extension().is_none_or(|e| e != "npz") {
            return Err(Error::Usage(format!("--seg-decoder {}: expected vae-oid.npz or a mask decoder folder", path.display())));
        }
        // The released file alone: a scratch folder holding the decoder's config and a link to
        // it, removed once the weights are mapped (the mapping outlives the link).
        let abs = std::fs::canonicalize(path).map_err(|e| Error::File { path: path.into(), msg: format!("cannot read: {e}") })?;
        let dir = std::env::temp_dir().join(format!("kiln-segdec-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("config.json"), r#"{"model_name": "proj.paligemma.segmentation", "model": {}}"#)?;
            std::os::unix::fs::symlink(&abs, dir.join("params.npz"))
        })();
        let opened =
            made.map_err(|e| Error::File { path: dir.clone(), msg: format!("cannot prepare: {e}") }).and_then(|()| Self::open_folder(&dir));
        let _ = std::fs::remove_dir_all(&dir);
        opened.map_err(|e| Error::Usage(e.to_string().replace(&dir.display().to_string(), &path.display().to_string())))
    }

    fn open_folder(dir: &Path) -> Result<Self> {
        let opts = CompileOptions { profile: Profile::default(), backend: "cpu".into(), trace: false };
        let c = compile(dir, &opts).map_err(|e| Error::Usage(format!("--seg-decoder {}: {e}", dir.display())))?;
        if c.program.entries.first().is_none_or(|e| !e.inputs.iter().any(|i| i.name == "codes")) {
            return Err(Error::Usage(format!("--seg-decoder {}: not a mask decoder (no `codes` input)", dir.display())));
        }
        let store = WeightStore::open(dir)?;
        Ok(SegDecoder { session: Session::new(c.program, Arc::new(store))? })
    }

    /// The 64x64 mask logits of 16 codes (row-major).
    pub fn decode(&mut self, codes: &[u8; 16]) -> Result<Vec<f32>> {
        let ids: Vec<i64> = codes.iter().map(|&c| c as i64).collect();
        let t = Tensor::from_i64(&[1, 16], &ids);
        let outs = self.session.run("forward", &[("codes", &t)])?;
        let m = outs.into_iter().find(|(n, _)| n == "masks").ok_or_else(|| Error::Usage("the mask decoder gave no `masks`".into()))?;
        Ok(m.1.to_f32())
    }
}

/// The box of `d` in a `width` x `height` image as the evaluator truncates it, and the mask
/// resized into it and thresholded; `None` when the box is empty after truncation.
pub fn paste(mask64: &[f32], d: &Detection, width: usize, height: usize) -> Option<BoxMask> {
    // The evaluator's `tokens / 1023` in double precision, from the `<loc>` value.
    let px = |v: f32, n: usize| ((v as f64 * 1023.0).round() / 1023.0 * n as f64) as usize;
    let [by0, bx0, by1, bx1] = d.bbox;
    let (y0, x0, y1, x1) = (px(by0, height), px(bx0, width), px(by1, height), px(bx1, width));
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    let r = pil_resize_bilinear(mask64, SIDE, SIDE, x1 - x0, y1 - y0);
    Some(BoxMask { x0, y0, x1, y1, inside: r.iter().map(|&v| v > 0.0).collect() })
}

/// PIL's resampling coefficients along one axis (`precompute_coeffs`, bilinear filter): per
/// output index, the first input index and the normalised weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the bilinear filter's support is 1
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            (xmin, k)
        })
        .collect()
}

/// `Image.fromarray(f32 array).resize([out_w, out_h], BILINEAR)`: horizontal pass, then
/// vertical, each output a weighted sum in double precision stored as f32 (PIL's 32-bit float
/// path). Row-major `in_h x in_w` in, `out_h x out_w` out.
pub fn pil_resize_bilinear(src: &[f32], in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> Vec<f32> {
    let horizontal = if out_w == in_w {
        src.to_vec()
    } else {
        let cx = coeffs(in_w, out_w);
        let mut t = vec![0f32; in_h * out_w];
        for y in 0..in_h {
            for (xx, (xmin, k)) in cx.iter().enumerate() {
                t[y * out_w + xx] = k.iter().enumerate().map(|(i, w)| src[y * in_w + xmin + i] as f64 * w).sum::<f64>() as f32;
            }
        }
        t
    };
    if out_h == in_h {
        return horizontal;
    }
    let cy = coeffs(in_h, out_h);
    let mut out = vec![0f32; out_h * out_w];
    for (yy, (ymin, k)) in cy.iter().enumerate() {
        for x in 0..out_w {
            out[yy * out_w + x] = k.iter().enumerate().map(|(i, w)| horizontal[(ymin + i) * out_w + x] as f64 * w).sum::<f64>() as f32;
        }
    }
    out
}
