//! UViM end to end: `kiln generate <task-folder> --image x.jpg -o out.png`. A task folder
//! holds the stage II VTT and the stage I VQ-VAE side by side (`vtt/`, `vqvae/`, each a
//! big_vision folder) and `uvim.json` naming the task and its settings, e.g.
//! `{"task": "depth", "min_depth": 0.001, "max_depth": 10.0}` (big_vision's
//! `configs/proj/uvim/train_nyu_depth_pretrained.py`).
//!
//! As big_vision predicts (`trainers/proj/uvim/train.py`, `depth_task.py`): the image is
//! resized to each model's `input_size` (`resize(res)`: TF's bilinear resize, half-pixel
//! centres, no antialiasing) and mapped to [-1, 1]; the VTT writes the code greedily (prompts of
//! zeros, no EOS; `code = token - 1`, a token 0 giving code -1, the last codeword); the
//! VQ-VAE decodes it with the image as context. Depth: the argmax over the bins per pixel,
//! `(bin + 0.5) / bins * (max - min) + min`. Other tasks (panoptic, colorization) are refused
//! by name.

use crate::encdec::EncDecGenerator;
use crate::preprocess::Rgb;
use crate::{compile, CompileOptions, Error, Result};
use kiln_graph::DType;
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A task folder, compiled.
pub struct UvimTask {
    vtt: EncDecGenerator,
    vqvae: Session,
    /// The VTT's and the VQ-VAE's image sizes.
    res: (usize, usize),
    ctx_res: (usize, usize),
    code_len: usize,
    /// Depth bins, pixels per patch side, patch grid of the VQ-VAE's output.
    bins: usize,
    patch: (usize, usize),
    min_depth: f64,
    max_depth: f64,
}

/// What [`UvimTask::predict`] gives: the code and the depth map `[H, W]` (row-major, metres).
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub code: Vec<i64>,
    pub depth: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

fn json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File { path: path.into(), msg: format!("cannot read: {e}") })?;
    serde_json::from_str(&text).map_err(|e| Error::File { path: path.into(), msg: format!("not JSON: {e}") })
}

/// A `[h, w]` pair of a big_vision config.
fn hw(v: &serde_json::Value, path: &Path, field: &str) -> Result<(usize, usize)> {
    match v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect::<Vec<_>>()).as_deref() {
        Some([h, w]) => Ok((*h as usize, *w as usize)),
        _ => Err(Error::File { path: path.into(), msg: format!("{field}: expected [h, w], found {v}") }),
    }
}

/// Whether `dir` is a UViM task folder.
pub fn is_task(dir: &Path) -> bool {
    dir.join("uvim.json").is_file()
}

impl UvimTask {
    /// Reads and compiles the task folder on `backend`.
    pub fn open(dir: &Path, backend: &str) -> Result<Self> {
        let task_path = dir.join("uvim.json");
        let t = json(&task_path)?;
        let bad = |msg: String| Error::File { path: task_path.clone(), msg };
        match t.get("task").and_then(|v| v.as_str()) {
            Some("depth") => {}
            Some(other) => return Err(bad(format!("task '{other}': kiln does depth (panoptic and colorization are not built yet)"))),
            None => return Err(bad("no \"task\"".into())),
        }
        let num = |k: &str| t.get(k).and_then(|v| v.as_f64()).ok_or_else(|| bad(format!("no number \"{k}\"")));
        let (min_depth, max_depth) = (num("min_depth")?, num("max_depth")?);
        if max_depth <= min_depth {
            return Err(bad(format!("max_depth {max_depth} is not above min_depth {min_depth}")));
        }
        let (vtt_dir, vq_dir) = (dir.join("vtt"), dir.join("vqvae"));
        let vtt_cfg = json(&vtt_dir.join("config.json"))?;
        let vq_path = vq_dir.join("config.json");
        let vq_cfg = json(&vq_path)?;
        let res = hw(&vtt_cfg["model"]["input_size"], &vtt_dir.join("config.json"), "input_size")?;
        let ctx_res = hw(&vq_cfg["model"]["input_size"], &vq_path, "input_size")?;
        let patch = hw(&vq_cfg["model"]["patch_size"], &vq_path, "patch_size")?;
        let code_len =
            vq_cfg["model"]["code_len"].as_u64().ok_or_else(|| Error::File { path: vq_path.clone(), msg: "no code_len".into() })? as usize;
        let depth = hw(&vq_cfg["model"]["outputs"]["depth"], &vq_path, "outputs.depth")?;
        if depth.1 != patch.0 * patch.1 {
            return Err(Error::File {
                path: vq_path,
                msg: format!("outputs.depth {depth:?} is not [bins, patch pixels {}]", patch.0 * patch.1),
            });
        }
        let vtt = EncDecGenerator::new(&vtt_dir, 1, res, code_len, backend, DType::F32)?;
        let opts = CompileOptions { profile: Profile::default(), backend: backend.into(), trace: false };
        let c = compile(&vq_dir, &opts)?;
        let vqvae = Session::new(c.program, Arc::new(WeightStore::open(&vq_dir)?))?;
        Ok(UvimTask { vtt, vqvae, res, ctx_res, code_len, bins: depth.0, patch, min_depth, max_depth })
    }

    /// The image in [-1, 1] at the VTT's and at the VQ-VAE's size.
    pub fn inputs(&self, img: &Rgb) -> (Tensor, Tensor) {
        let t = |(h, w): (usize, usize)| {
            Tensor::from_f32(&[1, h, w, 3], &tf_resize_bilinear(img, h, w).iter().map(|v| v / 127.5 - 1.0).collect::<Vec<_>>())
        };
        (t(self.res), t(self.ctx_res))
    }

    /// The code and the depth map of one image (`images` at the VTT's size, `ctx` at the
    /// VQ-VAE's, both `[1, H, W, 3]` in [-1, 1]).
    pub fn predict(&mut self, images: &Tensor, ctx: &Tensor) -> Result<Prediction> {
        let r = self.vtt.generate(images, &vec![0; self.code_len], -1)?;
        let code: Vec<i64> = r.sequences.iter().map(|t| t - 1).collect();
        let outs = self.vqvae.run("decode", &[("codes", &Tensor::from_i64(&[1, self.code_len], &code)), ("ctx", ctx)])?;
        let logits =
            outs.into_iter().find(|(n, _)| n == "logits/depth").ok_or_else(|| Error::Usage("the VQ-VAE gave no logits/depth".into()))?.1;
        let (h, w) = self.ctx_res;
        let depth = depth_map(&logits.to_f32(), (h, w), self.patch, self.bins, (self.min_depth, self.max_depth));
        Ok(Prediction { code, depth, height: h, width: w })
    }

    /// The depth range the task maps to grey levels.
    pub fn range(&self) -> (f64, f64) {
        (self.min_depth, self.max_depth)
    }
}

/// `depth_task.predict_outputs`: logits `[1, (hn wn), bins, (hp wp)]` to depths `[H, W]`.
pub fn depth_map(logits: &[f32], (h, w): (usize, usize), (hp, wp): (usize, usize), bins: usize, (min, max): (f64, f64)) -> Vec<f32> {
    let wn = w / wp;
    let pp = hp * wp;
    let mut out = vec![0f32; h * w];
    for (y, x) in (0..h).flat_map(|y| (0..w).map(move |x| (y, x))) {
        let (t, p) = ((y / hp) * wn + x / wp, (y % hp) * wp + x % wp);
        let at = |c: usize| logits[(t * bins + c) * pp + p];
        let best = (0..bins).fold(0, |b, c| if at(c) > at(b) { c } else { b });
        out[y * w + x] = (((best as f64 + 0.5) / bins as f64) * (max - min) + min) as f32;
    }
    out
}

/// TF's `tf.image.resize(image, (h, w), 'bilinear')` (half-pixel centres, edges clamped, no
/// antialiasing; big_vision's `resize` op) of an RGB image, as floats in 0..255.
pub fn tf_resize_bilinear(img: &Rgb, oh: usize, ow: usize) -> Vec<f32> {
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f64 / n_out as f64;
        (0..n_out)
            .map(|o| {
                let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, (s - i0 as f64) as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(img.height, oh), taps(img.width, ow));
    let px = |y: usize, x: usize, c: usize| img.pixels[(y * img.width + x) * 3 + c] as f32;
    let mut out = vec![0f32; oh * ow * 3];
    for (oy, &(y0, y1, fy)) in ty.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in tx.iter().enumerate() {
            for c in 0..3 {
                let top = px(y0, x0, c) * (1.0 - fx) + px(y0, x1, c) * fx;
                let bottom = px(y1, x0, c) * (1.0 - fx) + px(y1, x1, c) * fx;
                out[(oy * ow + ox) * 3 + c] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    out
}

/// `kiln generate <task> --image x.jpg -o out.png`: predicts, writes the depth map as a grey
/// PNG (near dark, far bright, over the task's range) and, with `depth_out`, the depths and
/// the code as safetensors.
pub fn run(dir: &Path, image: &Path, png: Option<&Path>, depth_out: Option<&Path>, backend: &str) -> Result<Prediction> {
    let img = crate::preprocess::load_image(image, true)?;
    let mut task = UvimTask::open(dir, backend)?;
    let (images, ctx) = task.inputs(&img);
    let p = task.predict(&images, &ctx)?;
    let (min, max) = task.range();
    if let Some(path) = png {
        let grey: Vec<u8> = p.depth.iter().map(|&d| (((d as f64 - min) / (max - min)).clamp(0.0, 1.0) * 255.0).round() as u8).collect();
        crate::png::write(path, p.width, p.height, 1, &grey)
            .map_err(|e| Error::File { path: PathBuf::from(path), msg: format!("cannot write: {e}") })?;
    }
    if let Some(path) = depth_out {
        let outs = vec![
            ("depth".to_string(), Tensor::from_f32(&[p.height, p.width], &p.depth)),
            ("code".to_string(), Tensor::from_i64(&[1, p.code.len()], &p.code)),
        ];
        crate::io::write(path, &outs)?;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TF's half-pixel bilinear: a 2-pixel row doubled is `a, (3a + b) / 4, (a + 3b) / 4, b`;
    /// the same size is the identity.
    #[test]
    fn tf_bilinear_has_half_pixel_centres() {
        let img = Rgb { width: 2, height: 1, pixels: vec![0, 0, 0, 200, 100, 40] };
        let out = tf_resize_bilinear(&img, 1, 4);
        let red: Vec<f32> = out.chunks(3).map(|p| p[0]).collect();
        assert_eq!(red, [0.0, 50.0, 150.0, 200.0]);
        assert_eq!(tf_resize_bilinear(&img, 1, 2), [0.0, 0.0, 0.0, 200.0, 100.0, 40.0]);
    }

    /// Bin centres over the range, patch pixels laid out row-major inside their patch.
    #[test]
    fn depth_map_takes_the_argmax_bin_per_pixel() {
        // One 2x1 patch grid of 1x2 patches: [T=2, bins=2, pp=2].
        let logits = [0.0, 1.0, 1.0, 0.0, /* patch 1 */ 5.0, 5.0, 0.0, 9.0];
        let d = depth_map(&logits, (1, 4), (1, 2), 2, (0.0, 4.0));
        // bin 1 -> 3, bin 0 -> 1; ties go to the first bin.
        assert_eq!(d, [3.0, 1.0, 1.0, 3.0]);
    }
}
