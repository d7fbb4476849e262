//! `kiln generate <dir> --prompt ... [--image ...]`: text (and an image) in, streamed text out.
//! The prompt is laid out as transformers' `PaliGemmaProcessor` lays it out
//! (`"<image>" * num_image_tokens + "<bos>" + prompt + "\n"`, all of it the prefix, token
//! type 0), or as `"<bos>" + prompt` for a plain Gemma folder (a big_vision PaliGemma folder:
//! as its own code does, [`crate::paligemma_bv::prepare`]); both are tokenized as one string
//! with `add_special_tokens=False`. `<locNNNN>` / `<segNNN>` answers are parsed into boxes and
//! codes, and can be drawn onto the image.

use crate::generate::Generator;
use crate::preprocess::{Preprocessor, Rgb};
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use crate::{Error, Result};
use kiln_models::locations::{self, Detection};
use kiln_models::TextModel;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What `kiln generate --prompt` was asked.
#[derive(Clone, Debug)]
pub struct PromptOptions {
    pub model: PathBuf,
    pub prompt: String,
    pub image: Option<PathBuf>,
    pub max_new_tokens: usize,
    /// Prompt bucket to compile (default: the prompt's length); a longer prompt is an error.
    pub bucket: Option<usize>,
    pub backend: String,
    /// Compute dtype (f32, or bf16).
    pub dtype: kiln_graph::DType,
    /// Write the image with the detected boxes (and masks) here (PNG).
    pub draw: Option<PathBuf>,
    /// A PaliGemma mask decoder folder (`proj.paligemma.segmentation`): each `<seg>` answer
    /// is decoded and pasted into its box.
    pub seg_decoder: Option<PathBuf>,
    /// After generating, time the prefill and one decode step kernel by kernel.
    pub breakdown: bool,
    /// Sample instead of greedy (transformers' filters, kiln's seeded generator).
    pub sampling: Option<crate::sampling::HfSampling>,
    /// The cuda load options of a compiled folder (an artifact is loaded before [`run_on`]).
    pub load: crate::load::LoadOptions,
}

/// What one prompt produced.
#[derive(Clone, Debug)]
pub struct PromptOutput {
    pub input_ids: Vec<i64>,
    pub new_ids: Vec<i64>,
    /// `decode(new_ids, skip_special_tokens=True)`.
    pub text: String,
    pub detections: Vec<Detection>,
    /// With `seg_decoder`: (detection index, its mask in image pixels).
    pub masks: Vec<(usize, crate::seg::BoxMask)>,
    /// Seconds from the start (tokenizer loaded, image decoded and preprocessed, prefill run)
    /// to the first new token, compile excluded; then the seconds per decode step.
    pub first_token_s: f64,
    pub decode_s_per_token: f64,
    pub compile_s: f64,
    /// With `breakdown`: ("prefill" | "decode", steps, seconds of the profiled call).
    pub profiles: Vec<(&'static str, Vec<crate::generate::StepTime>, f64)>,
}

/// A model folder's prompt: token ids and, for PaliGemma, the image.
pub struct Prepared {
    pub input_ids: Vec<i64>,
    pub pixel_values: Option<kiln_runtime::Tensor>,
    pub image: Option<Rgb>,
}

fn model_of(dir: &Path) -> Result<TextModel> {
    let cfg = dir.join("config.json");
    if !cfg.is_file() {
        return Err(Error::File { path: cfg, msg: "no config.json (is this a model folder?)".into() });
    }
    kiln_models::text_model(&cfg)?
        .ok_or_else(|| Error::File { path: cfg, msg: "text generation needs a Gemma, Gemma 2 or PaliGemma model".into() })
}

/// Tokenizes the prompt the way transformers' processor would and preprocesses the image.
pub fn prepare(dir: &Path, tok: &TextTokenizer, prompt: &str, image: Option<&Path>) -> Result<Prepared> {
    match (model_of(dir)?, image) {
        (TextModel::PaliGemma(_), None) => {
            Err(Error::Usage(format!("{} is a PaliGemma checkpoint: it needs an image (--image photo.jpg)", dir.display())))
        }
        (TextModel::Gemma(_), Some(_)) => Err(Error::Usage(format!("{} is a text-only Gemma model: it takes no --image", dir.display()))),
        (TextModel::Gemma(_), None) => Ok(Prepared { input_ids: tok.encode(&format!("<bos>{prompt}"))?, pixel_values: None, image: None }),
        (TextModel::PaliGemma(p), Some(path)) if p.big_vision.is_some() => crate::paligemma_bv::prepare(&p, tok, prompt, path),
        (TextModel::PaliGemma(p), Some(path)) => {
            let pre = Preprocessor::open(dir)?;
            let v = &p.vision;
            let n = v.grid() * v.grid();
            if pre.resize.is_some_and(|hw| hw != (v.image_size, v.image_size)) {
                return Err(Error::File {
                    path: pre.path.clone(),
                    msg: format!("size {:?} differs from the vision tower's {}x{}", pre.resize, v.image_size, v.image_size),
                });
            }
            if pre.image_seq_length.is_some_and(|k| k != n) {
                return Err(Error::File {
                    path: pre.path.clone(),
                    msg: format!("image_seq_length {:?} differs from the tower's {n} patches", pre.image_seq_length),
                });
            }
            let image_id = tok.id("<image>")?;
            if image_id != p.image_token_index {
                return Err(Error::Usage(format!(
                    "the tokenizer's <image> is id {image_id}, config.json's image_token_index is {}",
                    p.image_token_index
                )));
            }
            let (px, img) = pre.pixel_values(path)?;
            if px.ty.shape[2..] != [v.image_size, v.image_size] {
                return Err(Error::File {
                    path: pre.path.clone(),
                    msg: format!("images come out {}, the tower takes {}px", px.ty, v.image_size),
                });
            }
            let text = format!("{}<bos>{prompt}\n", "<image>".repeat(n));
            Ok(Prepared { input_ids: tok.encode(&text)?, pixel_values: Some(px), image: Some(img) })
        }
    }
}

/// Runs a prompt, writing the answer to `out` as it is decoded, then the boxes and codes.
pub fn run(o: &PromptOptions, out: &mut dyn Write) -> Result<PromptOutput> {
    // The first-token clock covers reading the tokenizer, the image and the prefill; not the compile.
    let t0 = std::time::Instant::now();
    let tok = TextTokenizer::open(&o.model)?;
    let p = prepare(&o.model, &tok, &o.prompt, o.image.as_deref())?;
    let prep_s = t0.elapsed().as_secs_f64();
    if o.draw.is_some() && p.image.is_none() {
        return Err(Error::Usage("--draw needs --image (it draws the boxes onto it)".into()));
    }
    if o.seg_decoder.is_some() && p.image.is_none() {
        return Err(Error::Usage("--seg-decoder needs --image (masks are pasted into the image's boxes)".into()));
    }
    // Compiled before generating, so a bad folder fails before the long part.
    let seg = o.seg_decoder.as_deref().map(crate::seg::SegDecoder::open).transpose()?;
    let len = p.input_ids.len();
    let bucket = o.bucket.unwrap_or(len);
    if len > bucket {
        return Err(Error::Usage(format!(
            "the prompt is {len} tokens but the compiled prompt capacity (--bucket) is {bucket}: shorten the prompt or raise --bucket"
        )));
    }
    let tc = std::time::Instant::now();
    let ending = crate::generate::Ending { step_logits: false, beams: false };
    let mut g = Generator::with_load(&o.model, (1, 1), bucket, o.max_new_tokens, (&o.backend, o.dtype), ending, &o.load)?;
    g.sampling = o.sampling;
    let compile_s = tc.elapsed().as_secs_f64();
    answer(&mut g, Asked { o, tok: &tok, p, seg, prep_s, compile_s }, out)
}

/// [`run`] on a loaded generation program for one row whose prompt bucket holds the prompt
/// (the Python package's session); `o.bucket`, `o.backend` and `o.dtype` are the program's.
pub fn run_on(g: &mut Generator, o: &PromptOptions, out: &mut dyn Write) -> Result<PromptOutput> {
    let t0 = std::time::Instant::now();
    let tok = TextTokenizer::open(&o.model)?;
    let p = prepare(&o.model, &tok, &o.prompt, o.image.as_deref())?;
    let prep_s = t0.elapsed().as_secs_f64();
    if o.draw.is_some() && p.image.is_none() {
        return Err(Error::Usage("--draw needs --image (it draws the boxes onto it)".into()));
    }
    let seg = o.seg_decoder.as_deref().map(crate::seg::SegDecoder::open).transpose()?;
    if g.batch != 1 {
        return Err(Error::Usage(format!("a prompt is one row; this generation program was compiled for batch {}", g.batch)));
    }
    let len = p.input_ids.len();
    if len > g.bucket {
        return Err(Error::Usage(format!(
            "the prompt is {len} tokens but the compiled prompt capacity (--bucket) is {}: shorten the prompt or raise --bucket",
            g.bucket
        )));
    }
    g.sampling = o.sampling;
    answer(g, Asked { o, tok: &tok, p, seg, prep_s, compile_s: 0.0 }, out)
}

/// A prepared prompt and what answering it takes.
struct Asked<'a> {
    o: &'a PromptOptions,
    tok: &'a TextTokenizer,
    p: Prepared,
    seg: Option<crate::seg::SegDecoder>,
    prep_s: f64,
    compile_s: f64,
}

/// Generates the answer of a prepared prompt, streaming it to `out`, then the boxes, masks and
/// the drawing.
fn answer(g: &mut Generator, a: Asked, out: &mut dyn Write) -> Result<PromptOutput> {
    let Asked { o, tok, p, mut seg, prep_s, compile_s } = a;
    let len = p.input_ids.len();
    if tok.vocab_size() > g.meta.vocab {
        // Only ids the model can embed are fed back; a larger tokenizer is still fine to read.
        eprintln!("note: {} has {} tokens, the model {}", tok.path().display(), tok.vocab_size(), g.meta.vocab);
    }
    let mask = vec![1i64; len];
    let mut stream = StreamDecoder::default();
    let mut first: Option<f64> = None;
    let t1 = std::time::Instant::now();
    let mut on_step = |ids: &[i64]| -> Result<()> {
        first.get_or_insert(t1.elapsed().as_secs_f64());
        let piece = stream.push(tok, ids[0])?;
        write!(out, "{piece}").and_then(|_| out.flush()).map_err(|e| Error::Usage(format!("cannot write the answer: {e}")))
    };
    let r = g.generate_streaming(&p.input_ids, &mask, len, o.max_new_tokens, p.pixel_values.as_ref(), &mut on_step)?;
    let rest = stream.finish(tok)?;
    let text = stream.text().to_string();
    let mut new_ids = r.sequences[len..].to_vec();
    // After EOS the generator pads; the answer ends at EOS (kept, as transformers keeps it).
    if let Some(k) = new_ids.iter().position(|t| g.meta.eos.contains(t)) {
        new_ids.truncate(k + 1);
    }
    let detections = locations::parse(&text);
    let mut masks = Vec::new();
    let mut w = |s: String| out.write_all(s.as_bytes()).map_err(|e| Error::Usage(format!("cannot write the answer: {e}")));
    w(format!("{rest}\n"))?;
    if let Some(img) = &p.image {
        for (i, d) in detections.iter().enumerate() {
            let (x0, y0, x1, y1) = d.pixels(img.width as u32, img.height as u32);
            w(format!(
                "box {i}: {:?} y0 {:.4} x0 {:.4} y1 {:.4} x1 {:.4} -> pixels x {x0:.1}..{x1:.1} y {y0:.1}..{y1:.1}\n",
                d.label, d.bbox[0], d.bbox[1], d.bbox[2], d.bbox[3]
            ))?;
            if let Some(codes) = d.seg {
                w(format!("  mask codes: {codes:?}\n"))?;
                if let Some(dec) = seg.as_mut() {
                    let m64 = dec.decode(&codes)?;
                    match crate::seg::paste(&m64, d, img.width, img.height) {
                        Some(m) => {
                            w(format!("  mask: {} of {} pixels in x {}..{} y {}..{}\n", m.area(), m.inside.len(), m.x0, m.x1, m.y0, m.y1))?;
                            masks.push((i, m));
                        }
                        None => w("  mask: the box is empty in pixels\n".to_string())?,
                    }
                }
            }
        }
    }
    if let (Some(path), Some(img)) = (&o.draw, &p.image) {
        let mut canvas = img.clone();
        crate::draw::masks(&mut canvas, &masks);
        crate::draw::detections(&mut canvas, &detections);
        crate::png::write(path, canvas.width, canvas.height, 3, &canvas.pixels)
            .map_err(|e| Error::File { path: path.clone(), msg: format!("cannot write: {e}") })?;
        w(format!("drew {} boxes to {}\n", detections.len(), path.display()))?;
    }
    let mut profiles = Vec::new();
    if o.breakdown {
        let (steps, secs) = g.profile_prefill()?;
        profiles.push(("prefill", steps, secs));
        if o.max_new_tokens > 1 {
            let (steps, secs) = g.profile_decode()?;
            profiles.push(("decode", steps, secs));
        }
    }
    Ok(PromptOutput {
        input_ids: p.input_ids,
        new_ids,
        text,
        detections,
        masks,
        first_token_s: prep_s + first.unwrap_or(r.prefill_s),
        decode_s_per_token: r.decode_s / r.decode_steps.max(1) as f64,
        compile_s,
        profiles,
    })
}
