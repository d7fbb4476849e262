//! UViM end to end: `kiln generate <task-folder> --image x.jpg -o out.png`. A task folder
//! holds the stage II VTT and the stage I VQ-VAE side by side (`vtt/`, `vqvae/`, each a
//! big_vision folder) and `uvim.json` naming the task and its settings (big_vision's
//! `configs/proj/uvim/train_*_pretrained.py`):
//! `{"task": "depth", "min_depth": 0.001, "max_depth": 10.0}`,
//! `{"task": "panoptic", "min_fraction": 0.0}` (`min_fraction` optional, default 0), or
//! `{"task": "colorization"}`.
//!
//! As big_vision predicts (`trainers/proj/uvim/train.py` and the task files): the image is
//! resized to the VTT's `input_size` (`resize(res)`: TF's bilinear resize, half-pixel centres, no
//! antialiasing) and the VQ-VAE's context made as the task's `pp_eval` makes `image_ctx`
//! (depth: the resized image resized again; panoptic: the original resized; colorization: the
//! resized image turned grey, `rgb_to_grayscale_to_rgb`, which the VTT sees too), both mapped
//! to [-1, 1]; the VTT writes the code greedily (prompts of zeros, no EOS; `code = token - 1`, a
//! token 0 giving code -1, the last codeword); the VQ-VAE decodes it with the context; then the
//! task's `predict_outputs` ([`crate::uvim_heads`]).

use crate::encdec::EncDecGenerator;
use crate::preprocess::Rgb;
pub use crate::uvim_heads::depth_map;
use crate::uvim_heads::{color_map, grayscale_to_rgb, panoptic_colors, panoptic_map, tf_resize, to_unit_range};
use crate::{compile, CompileOptions, Error, Result};
use kiln_graph::DType;
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a task makes of the VQ-VAE's logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    /// `depth_task`: `bins` bins over `[min, max]` metres.
    Depth { bins: usize, min: f64, max: f64 },
    /// `panoptic_task`: semantic classes, instance ids, and the area at or below which an
    /// instance is dropped.
    Panoptic { classes: usize, instances: usize, min_fraction: f64 },
    /// `colorization_task`: RGB in [-1, 1].
    Colorization,
}

/// A task folder, compiled.
pub struct UvimTask {
    vtt: EncDecGenerator,
    vqvae: Session,
    /// The VTT's and the VQ-VAE's image sizes.
    res: (usize, usize),
    ctx_res: (usize, usize),
    code_len: usize,
    /// Pixels per patch side of the VQ-VAE's output.
    patch: (usize, usize),
    task: Task,
}

/// A task's output for one image.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Metres, `[H, W]`.
    Depth(Vec<f32>),
    /// (semantic class, instance id) per pixel, `[H, W, 2]`.
    Panoptic(Vec<i64>),
    /// RGB in [-1, 1], `[H, W, 3]`.
    Color(Vec<f32>),
}

/// What [`UvimTask::predict`] gives: the code and the task's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub code: Vec<i64>,
    pub output: Output,
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
        let (vtt_dir, vq_dir) = (dir.join("vtt"), dir.join("vqvae"));
        let vtt_cfg = json(&vtt_dir.join("config.json"))?;
        let vq_path = vq_dir.join("config.json");
        let vq_cfg = json(&vq_path)?;
        let res = hw(&vtt_cfg["model"]["input_size"], &vtt_dir.join("config.json"), "input_size")?;
        let ctx_res = hw(&vq_cfg["model"]["input_size"], &vq_path, "input_size")?;
        let patch = hw(&vq_cfg["model"]["patch_size"], &vq_path, "patch_size")?;
        let code_len =
            vq_cfg["model"]["code_len"].as_u64().ok_or_else(|| Error::File { path: vq_path.clone(), msg: "no code_len".into() })? as usize;
        // An output of the VQ-VAE: [channels, patch pixels].
        let output = |name: &str, channels: Option<usize>| -> Result<usize> {
            let (c, pp) = hw(&vq_cfg["model"]["outputs"][name], &vq_path, &format!("outputs.{name}"))?;
            if pp != patch.0 * patch.1 || channels.is_some_and(|want| want != c) {
                let want = channels.map_or("C".to_string(), |c| c.to_string());
                let msg = format!("outputs.{name} [{c}, {pp}] is not [{want}, patch pixels {}]", patch.0 * patch.1);
                return Err(Error::File { path: vq_path.clone(), msg });
            }
            Ok(c)
        };
        let task = match t.get("task").and_then(|v| v.as_str()) {
            Some("depth") => {
                let num = |k: &str| t.get(k).and_then(|v| v.as_f64()).ok_or_else(|| bad(format!("no number \"{k}\"")));
                let (min, max) = (num("min_depth")?, num("max_depth")?);
                if max <= min {
                    return Err(bad(format!("max_depth {max} is not above min_depth {min}")));
                }
                Task::Depth { bins: output("depth", None)?, min, max }
            }
            Some("panoptic") => {
                let min_fraction = match t.get("min_fraction") {
                    None => 0.0,
                    Some(v) => v
                        .as_f64()
                        .filter(|f| (0.0..1.0).contains(f))
                        .ok_or_else(|| bad(format!("min_fraction {v}: expected a number in [0, 1)")))?,
                };
                Task::Panoptic { classes: output("semantics", None)?, instances: output("instances", None)?, min_fraction }
            }
            Some("colorization") => {
                output("color", Some(3))?;
                Task::Colorization
            }
            Some(other) => return Err(bad(format!("task '{other}': kiln does depth, panoptic and colorization"))),
            None => return Err(bad("no \"task\" (depth, panoptic or colorization)".into())),
        };
        let vtt = EncDecGenerator::new(&vtt_dir, 1, res, code_len, backend, DType::F32)?;
        let opts = CompileOptions { profile: Profile::default(), backend: backend.into(), trace: false };
        let c = compile(&vq_dir, &opts)?;
        let vqvae = Session::new(c.program, Arc::new(WeightStore::open(&vq_dir)?))?;
        Ok(UvimTask { vtt, vqvae, res, ctx_res, code_len, patch, task })
    }

    /// The task this folder does.
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// The VTT's input and the VQ-VAE's context, `[1, H, W, 3]` in [-1, 1], as the task's
    /// `pp_eval` makes `image` and `image_ctx`.
    pub fn inputs(&self, img: &Rgb) -> (Tensor, Tensor) {
        let orig: Vec<f32> = img.pixels.iter().map(|&v| v as f32).collect();
        let src = (img.height, img.width);
        let image = tf_resize(&orig, src, self.res);
        let (image, ctx) = match self.task {
            // resize(res) | resize(label_res, inkey=image, outkey=image_ctx)
            Task::Depth { .. } => (image.clone(), tf_resize(&image, self.res, self.ctx_res)),
            // resize(label_res, inkey=image, outkey=image_ctx) | resize(res)
            Task::Panoptic { .. } => (image, tf_resize(&orig, src, self.ctx_res)),
            // resize(res) | rgb_to_grayscale_to_rgb | copy to image_ctx | resize(label_res)
            Task::Colorization => {
                let grey = grayscale_to_rgb(&image);
                let ctx = tf_resize(&grey, self.res, self.ctx_res);
                (grey, ctx)
            }
        };
        let t = |(h, w): (usize, usize), v: &[f32]| Tensor::from_f32(&[1, h, w, 3], &to_unit_range(v));
        (t(self.res, &image), t(self.ctx_res, &ctx))
    }

    /// The code and the task's output for one image (`images` at the VTT's size, `ctx` at the
    /// VQ-VAE's, both `[1, H, W, 3]` in [-1, 1]).
    pub fn predict(&mut self, images: &Tensor, ctx: &Tensor) -> Result<Prediction> {
        let r = self.vtt.generate(images, &vec![0; self.code_len], -1)?;
        let code: Vec<i64> = r.sequences.iter().map(|t| t - 1).collect();
        let outs = self.vqvae.run("decode", &[("codes", &Tensor::from_i64(&[1, self.code_len], &code)), ("ctx", ctx)])?;
        let logits = |name: &str| -> Result<Vec<f32>> {
            let key = format!("logits/{name}");
            outs.iter().find(|(n, _)| *n == key).map(|(_, t)| t.to_f32()).ok_or_else(|| Error::Usage(format!("the VQ-VAE gave no {key}")))
        };
        let (h, w) = self.ctx_res;
        let output = match self.task {
            Task::Depth { bins, min, max } => Output::Depth(depth_map(&logits("depth")?, (h, w), self.patch, bins, (min, max))),
            Task::Panoptic { classes, instances, min_fraction } => Output::Panoptic(panoptic_map(
                &logits("semantics")?,
                &logits("instances")?,
                (h, w),
                self.patch,
                (classes, instances),
                min_fraction,
            )),
            Task::Colorization => Output::Color(color_map(&logits("color")?, (h, w), self.patch)),
        };
        Ok(Prediction { code, output, height: h, width: w })
    }
}

/// `kiln generate <task> --image x.jpg -o out.png`: predicts and writes the output as a PNG
/// (depth: grey, near dark and far bright over the task's range; panoptic: a colour per
/// segment; colorization: the RGB image) and, with `raw_out`, as safetensors (`depth [H, W]`,
/// `panoptic [H, W, 2]` or `color [H, W, 3]` in [-1, 1], with the `code`). Returns the
/// prediction and a one-line summary.
pub fn run(dir: &Path, image: &Path, png: Option<&Path>, raw_out: Option<&Path>, backend: &str) -> Result<(Prediction, String)> {
    let img = crate::preprocess::load_image(image, true)?;
    let mut task = UvimTask::open(dir, backend)?;
    let (images, ctx) = task.inputs(&img);
    let p = task.predict(&images, &ctx)?;
    let (h, w) = (p.height, p.width);
    let (channels, px, raw, summary) = match (&p.output, task.task()) {
        (Output::Depth(d), &Task::Depth { min, max, .. }) => {
            let grey = d.iter().map(|&v| (((v as f64 - min) / (max - min)).clamp(0.0, 1.0) * 255.0).round() as u8).collect();
            let (lo, hi) = d.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            (1, grey, ("depth", Tensor::from_f32(&[h, w], d)), format!("depth {w}x{h}: {lo:.3}..{hi:.3} m"))
        }
        (Output::Panoptic(m), _) => {
            let segments: std::collections::BTreeSet<(i64, i64)> = m.chunks(2).map(|p| (p[0], p[1])).collect();
            let s = format!("panoptic {w}x{h}: {} segments", segments.len());
            (3, panoptic_colors(m), ("panoptic", Tensor::from_i64(&[h, w, 2], m)), s)
        }
        (Output::Color(c), _) => {
            let rgb = c.iter().map(|&v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8).collect();
            (3, rgb, ("color", Tensor::from_f32(&[h, w, 3], c)), format!("colorization {w}x{h}"))
        }
        (Output::Depth(_), _) => return Err(Error::Usage("a depth output from a task that is not depth".into())),
    };
    if let Some(path) = png {
        crate::png::write(path, w, h, channels, &px)
            .map_err(|e| Error::File { path: PathBuf::from(path), msg: format!("cannot write: {e}") })?;
    }
    if let Some(path) = raw_out {
        let outs = vec![(raw.0.to_string(), raw.1), ("code".to_string(), Tensor::from_i64(&[1, p.code.len()], &p.code))];
        crate::io::write(path, &outs)?;
    }
    Ok((p, summary))
}
