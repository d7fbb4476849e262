//! `kiln rank`: pretrained checkpoints ranked by the leave-one-out k-nearest-neighbour accuracy
//! of their embeddings on a labelled image folder, the model-selection step of "Deep Ensembles
//! for Low-Data Transfer Learning" (Mustafa et al., arXiv 2010.06866).
//!
//! The folder is ImageFolder's layout: one subfolder per class (labels in the sorted order of
//! the subfolder names), `.png` / `.jpg` / `.jpeg` images in each (sorted by file name; other
//! files are counted and left out). Each model is compiled once for `batch` images and run
//! over the folder in batches (the last one padded with zero images whose rows are dropped; a
//! V-MoE routes tokens in groups that span images, so the padding can change the routing of the
//! last batch's images, as in any batched V-MoE evaluation).
//!
//! Preprocessing: a Hugging Face folder (input `pixel_values`) as its `preprocessor_config.json`
//! says ([`Preprocessor`]), resized to the compiled resolution with its filter; without that
//! file, SigLIP's defaults (Pillow bicubic, rescale 1/255, normalise mean 0.5 std 0.5). A
//! big_vision folder (input `images`): the big_vision convention of `decode|resize(R)|
//! value_range(-1, 1)`, the resize done with Pillow's bilinear filter (big_vision's `resize` is
//! `tf.image.resize` bilinear, which does not antialias a downscale: the two differ there).

use crate::preprocess::{load_image, resize, Filter, Preprocessor, Rgb};
use crate::{compile, CompileOptions, Error, Result};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How the vote is decided, as `kiln rank --help` and README state it.
pub const KNN_TIE_RULE: &str = "neighbours are ordered by cosine similarity, equal similarities by image order; \
among classes with equally many votes, the class of the nearest neighbour wins";

/// A labelled image folder.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub classes: Vec<String>,
    /// Every image and its label, classes in order.
    pub images: Vec<(PathBuf, usize)>,
    /// Files that are not images (left out).
    pub skipped: usize,
}

impl Dataset {
    /// The label of every image.
    pub fn labels(&self) -> Vec<usize> {
        self.images.iter().map(|(_, l)| *l).collect()
    }
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let bad = |e: std::io::Error| Error::File { path: dir.into(), msg: format!("cannot read the folder: {e}") };
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map_err(bad)?.map(|e| e.map(|e| e.path()).map_err(bad)).collect::<Result<_>>()?;
    v.retain(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')));
    v.sort();
    Ok(v)
}

/// Reads an ImageFolder: every class needs at least two images (leave-one-out).
pub fn scan(dir: &Path) -> Result<Dataset> {
    let bad = |msg: String| Error::File { path: dir.into(), msg };
    if !dir.is_dir() {
        return Err(bad("not a folder (expected one subfolder of images per class)".into()));
    }
    let (mut classes, mut images, mut skipped) = (Vec::new(), Vec::new(), 0);
    for sub in sorted_entries(dir)? {
        if !sub.is_dir() {
            skipped += 1;
            continue;
        }
        let files: Vec<PathBuf> = sorted_entries(&sub)?.into_iter().filter(|p| p.is_file()).collect();
        let (imgs, other): (Vec<PathBuf>, Vec<PathBuf>) = files.into_iter().partition(|p| is_image(p));
        skipped += other.len();
        let name = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match imgs.len() {
            0 => return Err(bad(format!("class '{name}' has no images (.png, .jpg, .jpeg)"))),
            1 => return Err(bad(format!("class '{name}' has one image: leave-one-out needs at least two per class"))),
            _ => {}
        }
        images.extend(imgs.into_iter().map(|p| (p, classes.len())));
        classes.push(name);
    }
    if classes.is_empty() {
        return Err(bad("no class subfolders: expected one subfolder of images per class".into()));
    }
    if classes.len() < 2 {
        return Err(bad(format!("one class ('{}'): nearest-neighbour accuracy needs at least two", classes[0])));
    }
    Ok(Dataset { classes, images, skipped })
}

/// Leave-one-out kNN with cosine similarity and majority vote ([`KNN_TIE_RULE`]): each
/// example's predicted label. `emb` is `[N, D]` row-major; a zero row has similarity 0 with
/// every other row.
pub fn knn_predict(emb: &[f32], d: usize, labels: &[usize], k: usize) -> Result<Vec<usize>> {
    let n = labels.len();
    if d == 0 || emb.len() != n * d {
        return Err(Error::Usage(format!("{} embedding values for {n} examples of width {d}", emb.len())));
    }
    if k == 0 || k >= n {
        return Err(Error::Usage(format!("--k {k}: expected 1 to {} (the examples but the one left out)", n.saturating_sub(1))));
    }
    if let Some(i) = emb.iter().position(|x| !x.is_finite()) {
        return Err(Error::Usage(format!("embedding of example {} holds {} at {}", i / d, emb[i], i % d)));
    }
    let unit: Vec<Vec<f64>> = emb
        .chunks_exact(d)
        .map(|r| {
            let norm = r.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
            r.iter().map(|&x| if norm > 0.0 { x as f64 / norm } else { 0.0 }).collect()
        })
        .collect();
    let classes = labels.iter().max().map_or(0, |m| m + 1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut sims: Vec<(f64, usize)> =
            (0..n).filter(|&j| j != i).map(|j| (unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum(), j)).collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut votes = vec![0usize; classes];
        for &(_, j) in &sims[..k] {
            votes[labels[j]] += 1;
        }
        let most = votes.iter().copied().max().unwrap_or(0);
        // The first neighbour (nearest first) whose class has the most votes.
        let pred = sims[..k].iter().map(|&(_, j)| labels[j]).find(|&c| votes[c] == most).unwrap_or(0);
        out.push(pred);
    }
    Ok(out)
}

/// Options of [`rank`].
#[derive(Clone, Debug)]
pub struct RankOptions {
    pub k: usize,
    /// The output used as the embedding (default: `pooler_output`, else `pre_logits`).
    pub output: Option<String>,
    /// Images per run (the compiled batch).
    pub batch: usize,
    pub compile: CompileOptions,
    /// Show progress bars (on stderr; indicatif draws nothing when it is not a terminal).
    pub progress: bool,
    /// Write each model's embeddings and the labels here (`<index>.safetensors`).
    pub save_embeddings: Option<PathBuf>,
}

/// One model's embeddings of a dataset.
#[derive(Clone, Debug)]
pub struct Embeddings {
    pub output: String,
    pub dim: usize,
    /// `[N, dim]`, row-major.
    pub values: Vec<f32>,
    pub compile_s: f64,
    pub embed_s: f64,
}

/// One ranked model.
#[derive(Clone, Debug)]
pub struct Ranked {
    pub model: PathBuf,
    pub accuracy: f64,
    pub correct: usize,
    pub emb: Embeddings,
}

/// Every model's result: the ranked ones best first, and the ones that failed with why.
#[derive(Clone, Debug)]
pub struct RankReport {
    pub images: usize,
    pub classes: usize,
    pub ranked: Vec<Ranked>,
    pub failed: Vec<(PathBuf, String)>,
}

/// The embedding output of a program: `wanted`, else `pooler_output`, else `pre_logits`.
fn embedding_output(s: &Session, wanted: Option<&str>) -> Result<String> {
    let e = &s.program().entries[s.entry_index("forward")?];
    let names: Vec<&str> = e.outputs.iter().map(|io| io.name.as_str()).collect();
    let pick = match wanted {
        Some(w) => names.iter().find(|n| **n == w),
        None => names.iter().find(|n| **n == "pooler_output").or_else(|| names.iter().find(|n| **n == "pre_logits")),
    };
    pick.map(|n| n.to_string()).ok_or_else(|| {
        let want = wanted.map_or("pooler_output or pre_logits (give --output NAME)".to_string(), |w| format!("'{w}'"));
        Error::Usage(format!("no output {want}; the model's outputs: {}", names.join(", ")))
    })
}

/// How images become the model's input: which input, its layout and the pixel mapping.
enum Input {
    /// `pixel_values [B, 3, H, W]` through a Hugging Face preprocessor.
    PixelValues(Preprocessor),
    /// big_vision `images [B, H, W, 3]` in [-1, 1].
    Images,
}

/// SigLIP's processor defaults (`SiglipImageProcessor`): bicubic, 1/255, mean 0.5, std 0.5.
fn siglip_default(dir: &Path, hw: (usize, usize)) -> Preprocessor {
    Preprocessor {
        convert_rgb: true,
        resize: Some(hw),
        filter: Filter::Bicubic,
        rescale: Some(1.0 / 255.0),
        normalize: Some(([0.5; 3], [0.5; 3])),
        image_seq_length: None,
        path: dir.join("preprocessor_config.json"),
    }
}

impl Input {
    fn of(dir: &Path, name: &str, hw: (usize, usize)) -> Result<Input> {
        match name {
            "images" => Ok(Input::Images),
            "pixel_values" if dir.join("preprocessor_config.json").exists() => {
                let mut p = Preprocessor::open(dir)?;
                p.resize = Some(hw);
                Ok(Input::PixelValues(p))
            }
            "pixel_values" => Ok(Input::PixelValues(siglip_default(dir, hw))),
            other => Err(Error::Usage(format!("the model takes '{other}'; kiln rank embeds images (pixel_values or images)"))),
        }
    }

    /// One image's input values at `hw`, in the input's layout.
    fn values(&self, img: &Rgb, hw: (usize, usize)) -> Vec<f32> {
        let (h, w) = hw;
        let filter = match self {
            Input::PixelValues(p) => p.filter,
            Input::Images => Filter::Bilinear,
        };
        let px =
            if (img.height, img.width) == hw { img.pixels.clone() } else { resize(&img.pixels, img.width, img.height, 3, w, h, filter) };
        match self {
            Input::PixelValues(p) => p.normalise(&px, h, w),
            Input::Images => px.iter().map(|&v| v as f32 / 127.5 - 1.0).collect(),
        }
    }
}

/// Embeds every image of `images` with the model in `dir` (at `hw`, else the options' or the
/// checkpoint's resolution).
pub fn embed(dir: &Path, hw: Option<(usize, usize)>, images: &[Rgb], o: &RankOptions, bar: &indicatif::ProgressBar) -> Result<Embeddings> {
    let t = Instant::now();
    let mut opts = o.compile.clone();
    opts.profile.batch = o.batch;
    opts.profile.image_hw = hw.or(opts.profile.image_hw);
    let c = compile(dir, &opts)?;
    let store = WeightStore::open(dir)?;
    let mut s = Session::new(c.program, Arc::new(store))?;
    let compile_s = t.elapsed().as_secs_f64();
    let output = embedding_output(&s, o.output.as_deref())?;
    let e = &s.program().entries[s.entry_index("forward")?];
    let [io] = &e.inputs[..] else {
        let names: Vec<&str> = e.inputs.iter().map(|io| io.name.as_str()).collect();
        return Err(Error::Usage(format!("the model takes {}; kiln rank runs models that take one image input", names.join(", "))));
    };
    let (name, shape) = (io.name.clone(), io.operand.ty.shape.to_vec());
    let hw = if name == "images" { (shape[1], shape[2]) } else { (shape[2], shape[3]) };
    let input = Input::of(dir, &name, hw)?;
    let per = 3 * hw.0 * hw.1;
    let t = Instant::now();
    let (mut values, mut dim) = (Vec::new(), 0);
    for chunk in images.chunks(o.batch) {
        let mut x = vec![0f32; o.batch * per];
        for (k, img) in chunk.iter().enumerate() {
            x[k * per..(k + 1) * per].copy_from_slice(&input.values(img, hw));
        }
        let t_in = Tensor::from_f32(&shape, &x);
        let outs = s.run("forward", &[(name.as_str(), &t_in)])?;
        let y = outs.iter().find(|(n, _)| *n == output).map(|(_, t)| t).ok_or_else(|| Error::Usage(format!("no output {output}")))?;
        let [b, d] = y.ty.shape[..] else {
            return Err(Error::Usage(format!("output {output} is {}, expected [batch, width] embeddings", y.ty)));
        };
        dim = d;
        values.extend_from_slice(&y.to_f32()[..chunk.len().min(b) * d]);
        bar.inc(chunk.len() as u64);
    }
    Ok(Embeddings { output, dim, values, compile_s, embed_s: t.elapsed().as_secs_f64() })
}

/// Ranks `models` (folders, or `DIR@RES` for a model at resolution RES) by leave-one-out kNN
/// accuracy on the folder `data`. A model that fails to compile or run is reported in `failed`
/// with its error, never dropped.
pub fn rank(models: &[PathBuf], data: &Path, o: &RankOptions) -> Result<RankReport> {
    let ds = scan(data)?;
    let labels = ds.labels();
    if o.k == 0 || o.k >= labels.len() {
        return Err(Error::Usage(format!("--k {}: expected 1 to {} (the images but the one left out)", o.k, labels.len() - 1)));
    }
    if o.batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    let images: Vec<Rgb> = ds.images.iter().map(|(p, _)| load_image(p, true)).collect::<Result<_>>()?;
    if let Some(d) = &o.save_embeddings {
        std::fs::create_dir_all(d).map_err(|e| Error::File { path: d.clone(), msg: e.to_string() })?;
    }
    let (mut ranked, mut failed) = (Vec::new(), Vec::new());
    for (i, m) in models.iter().enumerate() {
        let bar = progress_bar(o.progress, images.len(), &format!("[{}/{}] {}", i + 1, models.len(), m.display()));
        let got = crate::ensemble::parse_member(&m.to_string_lossy(), i).and_then(|spec| {
            let emb = embed(&spec.dir, spec.image_hw, &images, o, &bar)?;
            let pred = knn_predict(&emb.values, emb.dim, &labels, o.k)?;
            Ok((pred, emb))
        });
        bar.finish_and_clear();
        match got {
            Ok((pred, emb)) => {
                if let Some(d) = &o.save_embeddings {
                    save_embeddings(&d.join(format!("{i}.safetensors")), &emb, &labels)?;
                }
                let correct = pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
                let accuracy = correct as f64 / labels.len() as f64;
                ranked.push(Ranked { model: m.clone(), accuracy, correct, emb });
            }
            Err(e) => {
                eprintln!("kiln rank: skipping {}: {e}", m.display());
                failed.push((m.clone(), e.to_string()));
            }
        }
    }
    // Best first; equal accuracies keep the order the models were given.
    ranked.sort_by(|a, b| b.accuracy.total_cmp(&a.accuracy));
    Ok(RankReport { images: labels.len(), classes: ds.classes.len(), ranked, failed })
}

fn progress_bar(show: bool, n: usize, msg: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64).with_message(msg.to_string());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images {per_sec} eta {eta}") {
        bar.set_style(style);
    }
    bar
}

/// Writes `embeddings [N, D]` (f32) and `labels [N]` (i64).
pub fn save_embeddings(path: &Path, emb: &Embeddings, labels: &[usize]) -> Result<()> {
    let n = labels.len();
    let l: Vec<i64> = labels.iter().map(|&x| x as i64).collect();
    crate::io::write(
        path,
        &[("embeddings".to_string(), Tensor::from_f32(&[n, emb.dim], &emb.values)), ("labels".to_string(), Tensor::from_i64(&[n], &l))],
    )
}

/// The report as one JSON object.
pub fn to_json(r: &RankReport, data: &Path, k: usize) -> serde_json::Value {
    let ranked: Vec<serde_json::Value> = r
        .ranked
        .iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::json!({"rank": i + 1, "model": m.model.display().to_string(), "accuracy": m.accuracy, "correct": m.correct,
                "output": m.emb.output, "dim": m.emb.dim, "compile_s": m.emb.compile_s, "embed_s": m.emb.embed_s,
                "images_per_s": r.images as f64 / m.emb.embed_s.max(1e-9)})
        })
        .collect();
    let failed: Vec<serde_json::Value> =
        r.failed.iter().map(|(m, e)| serde_json::json!({"model": m.display().to_string(), "error": e})).collect();
    serde_json::json!({"data": data.display().to_string(), "images": r.images, "classes": r.classes, "k": k,
        "similarity": "cosine", "tie_rule": KNN_TIE_RULE, "ranked": ranked, "failed": failed})
}
