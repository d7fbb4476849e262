//! `kiln synth`: full-size random-weight Hugging Face model folders.
//!
//! Writes `config.json` + `model.safetensors` in exactly the layout
//! transformers writes, so both kiln and `transformers`
//! (`SiglipVisionModel.from_pretrained(dir)`) can load the result. Meant for
//! benchmarks that should not depend on downloading checkpoints.
//!
//! Design:
//! * [`list`] is a static table of [`SynthModel`] rows. Each row carries a
//!   [`SynthSpec`], one variant per model family; [`synth`] dispatches on it to
//!   the family's writer (today only [`synth_siglip`]). Adding a family
//!   (Gemma 2, V-MoE, Jet, ...) means adding a variant, a writer fn and rows.
//! * A family writer only has to describe its tensors as [`TensorSpec`]s
//!   (name, shape, dtype, [`Init`]) and its `config.json`; the shared
//!   [`write_safetensors`] streams the file to disk.
//! * Values are deterministic in the seed, the tensor name and the element
//!   index only: every tensor is split into fixed-size chunks, and each chunk
//!   has its own PRNG stream (xoshiro256++ seeded through splitmix64 from
//!   `(seed, fnv1a(name), chunk index)`). Chunks are generated on all cores
//!   and written in order, so the output is identical for any thread count
//!   and generation keeps up with the disk.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Instant;

use crate::synth_rng::{fill, fnv1a};

use crate::synth_big_vision::BigVisionSynth;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Errors and report
// ---------------------------------------------------------------------------

/// Errors from [`synth`] and friends.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The requested model name is not in [`list`].
    #[error("unknown synth model `{name}`; known models: {known}")]
    UnknownModel { name: String, known: String },
    /// A config that cannot describe a valid model (zero sizes, indivisible dims).
    #[error("invalid synth config: {0}")]
    InvalidConfig(String),
    /// An I/O error, with the path it happened on.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl SynthError {
    fn io(path: &Path, source: io::Error) -> Self {
        SynthError::Io { path: path.to_path_buf(), source }
    }
}

/// What [`synth`] wrote.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// Model name (table row name, or `"custom"` for a bare config).
    pub name: String,
    /// Output directory.
    pub dir: PathBuf,
    /// Path of the written `config.json`.
    pub config_path: PathBuf,
    /// Path of the written `model.safetensors`.
    pub weights_path: PathBuf,
    /// Number of tensors in the safetensors file.
    pub num_tensors: usize,
    /// Total number of parameters (elements).
    pub num_params: u64,
    /// Size of `model.safetensors` in bytes (header included).
    pub bytes: u64,
    /// Wall-clock seconds spent writing.
    pub seconds: f64,
}

impl fmt::Display for SynthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = self.bytes as f64 / 1e6;
        write!(
            f,
            "{}: {} tensors, {:.1}M params, {:.1} MB in {:.2} s ({:.0} MB/s) -> {}",
            self.name,
            self.num_tensors,
            self.num_params as f64 / 1e6,
            mb,
            self.seconds,
            mb / self.seconds.max(1e-9),
            self.dir.display()
        )
    }
}

// ---------------------------------------------------------------------------
// Model table
// ---------------------------------------------------------------------------

/// One row of the synth table.
#[derive(Debug, Clone, Copy)]
pub struct SynthModel {
    /// CLI name, e.g. `siglip-so400m-14-224`.
    pub name: &'static str,
    /// One-line human description.
    pub description: &'static str,
    /// Family and its hyper-parameters; selects the writer.
    pub spec: SynthSpec,
}

/// Per-family hyper-parameters. Each variant has its own writer fn.
#[derive(Debug, Clone, Copy)]
pub enum SynthSpec {
    /// `SiglipVisionModel` (transformers `model_type: siglip_vision_model`).
    Siglip(SiglipSynthConfig),
    /// big_vision's Jet flow (`proj.jet.jet`, a `params.npz` folder; see [`crate::synth_jet`]).
    Jet(crate::synth_jet::JetSynthConfig),
    /// A big_vision folder (`config.json` + `params.npz`).
    BigVision(crate::synth_big_vision::BigVisionSynth),
    /// `Gemma2ForCausalLM` (transformers `model_type: gemma2`).
    Gemma2(Gemma2SynthConfig),
    /// The same, every weight stored as bf16 (`dtype: bfloat16` in its config).
    Gemma2Bf16(Gemma2SynthConfig),
    /// `PaliGemmaForConditionalGeneration` with a Gemma 2 decoder, bf16 weights.
    PaliGemma2(crate::synth_paligemma::PaliGemma2SynthConfig),
}

impl SynthModel {
    /// The tensors this model's weight file contains.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        match &self.spec {
            SynthSpec::Siglip(cfg) => cfg.tensors(),
            SynthSpec::Jet(cfg) => cfg.tensors(),
            SynthSpec::BigVision(b) => b.tensors(),
            SynthSpec::Gemma2(cfg) => cfg.tensors(),
            SynthSpec::Gemma2Bf16(cfg) => cfg.tensors().into_iter().map(|t| TensorSpec { dtype: SynthDtype::BF16, ..t }).collect(),
            SynthSpec::PaliGemma2(cfg) => cfg.tensors(),
        }
    }

    /// Total parameter count.
    pub fn num_params(&self) -> u64 {
        self.tensors().iter().map(|t| t.numel() as u64).sum()
    }

    /// Size of the tensor data in bytes (without the header).
    pub fn data_bytes(&self) -> u64 {
        self.tensors().iter().map(|t| t.nbytes() as u64).sum()
    }
}

/// Gemma 2 2B's decoder.
const GEMMA2_2B: Gemma2SynthConfig = Gemma2SynthConfig {
    vocab_size: 256000,
    hidden_size: 2304,
    intermediate_size: 9216,
    num_hidden_layers: 26,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    head_dim: 256,
};

const fn siglip(
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    patch_size: usize,
    image_size: usize,
) -> SynthSpec {
    SynthSpec::Siglip(SiglipSynthConfig {
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        patch_size,
        image_size,
        num_channels: 3,
        layer_norm_eps: 1e-6,
        vision_use_head: true,
    })
}

static MODELS: &[SynthModel] = &[
    SynthModel {
        name: "siglip-b16-224",
        description: "SigLIP B/16 vision tower, 224px (768 wide, 12 layers, ~93M params)",
        spec: siglip(768, 3072, 12, 12, 16, 224),
    },
    SynthModel {
        name: "siglip-l16-224",
        description: "SigLIP L/16 vision tower, 224px (1024 wide, 24 layers, ~316M params)",
        spec: siglip(1024, 4096, 24, 16, 16, 224),
    },
    SynthModel {
        name: "siglip-so400m-14-224",
        description: "SigLIP So400m/14 vision tower, 224px (1152 wide, 27 layers, ~428M params)",
        spec: siglip(1152, 4304, 27, 16, 14, 224),
    },
    SynthModel {
        name: "siglip-so400m-14-448",
        description: "SigLIP So400m/14 vision tower, 448px (1024 patches)",
        spec: siglip(1152, 4304, 27, 16, 14, 448),
    },
    SynthModel {
        name: "siglip-so400m-14-896",
        description: "SigLIP So400m/14 vision tower, 896px (4096 patches)",
        spec: siglip(1152, 4304, 27, 16, 14, 896),
    },
    SynthModel {
        name: "jet-imagenet64",
        description: "Jet, ImageNet 64x64 (32 couplings, block depth 2, width 512, 8 heads, ps 4; ~207M params)",
        spec: SynthSpec::Jet(crate::synth_jet::JetSynthConfig {
            depth: 32,
            block_depth: 2,
            emb_dim: 512,
            num_heads: 8,
            ps: 4,
            image_size: 64,
            channels: 3,
            kinds: &["channels", "channels", "channels", "channels", "spatial"],
            spatial_coupling_projs: &["checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes", "hstripes-inv"],
        }),
    },
    SynthModel {
        name: "jet-jetformer-256",
        description: "JetFormer-350M's Jet, 256x256 (32 channel couplings, block depth 4, width 512, 8 heads, 16x16 patches; ~427M params)",
        spec: SynthSpec::Jet(crate::synth_jet::JetSynthConfig {
            depth: 32,
            block_depth: 4,
            emb_dim: 512,
            num_heads: 8,
            ps: 16,
            image_size: 256,
            channels: 3,
            kinds: &["channels"],
            spatial_coupling_projs: &["checkerboard"],
        }),
    },
    SynthModel {
        name: "vit-b16",
        description: "big_vision ViT-B/16, 224px, GAP head, 1000 classes (params.npz, ~86M params)",
        spec: SynthSpec::BigVision(BigVisionSynth::Vit { merger: None }),
    },
    SynthModel {
        name: "vit-b16-pm8",
        description: "big_vision ViT-B/16 with a PatchMerger to 8 tokens after block 6",
        spec: SynthSpec::BigVision(BigVisionSynth::Vit { merger: Some((6, 8)) }),
    },
    SynthModel {
        name: "vmoe-b16-dense",
        description: "vmoe VisionTransformerMoe B/16 without experts: the dense ViT V-MoE-B/16 is built on",
        spec: SynthSpec::BigVision(BigVisionSynth::Vmoe { experts: None }),
    },
    SynthModel {
        name: "vmoe-b16-e8",
        description: "V-MoE-B/16, E=8 K=2 every other block, groups of 8 images, C=1.05 (~293M params)",
        spec: SynthSpec::BigVision(BigVisionSynth::Vmoe { experts: Some(8) }),
    },
    SynthModel {
        name: "gemma2-2b",
        description: "Gemma 2 2B decoder (2304 wide, 26 layers, 8/4 heads of 256, vocab 256000, ~2.6B params, f32)",
        spec: SynthSpec::Gemma2(GEMMA2_2B),
    },
    SynthModel {
        name: "gemma2-2b-bf16",
        description: "the same Gemma 2 2B with bf16 weights (as the released checkpoints of PaliGemma 2's decoder)",
        spec: SynthSpec::Gemma2Bf16(GEMMA2_2B),
    },
    SynthModel {
        name: "paligemma2-3b-224",
        description: "PaliGemma 2 3B at 224px: So400m/14 tower (256 image tokens), Gemma 2 2B, vocab 257216 (~3.0B params, bf16)",
        spec: SynthSpec::PaliGemma2(crate::synth_paligemma::PaliGemma2SynthConfig {
            vision: SiglipSynthConfig {
                hidden_size: 1152,
                intermediate_size: 4304,
                num_hidden_layers: 27,
                num_attention_heads: 16,
                patch_size: 14,
                image_size: 224,
                num_channels: 3,
                layer_norm_eps: 1e-6,
                vision_use_head: false,
            },
            // Gemma 2 2B with PaliGemma's vocabulary (256000 + 1024 loc + 128 seg, padded).
            text: Gemma2SynthConfig { vocab_size: 257216, ..GEMMA2_2B },
            image_token_index: 257152,
        }),
    },
];

/// All models `kiln synth` knows, smallest first.
pub fn list() -> &'static [SynthModel] {
    MODELS
}

/// Looks a model up by name.
pub fn find(name: &str) -> Option<&'static SynthModel> {
    MODELS.iter().find(|m| m.name == name)
}

/// Synthesizes table model `name` into directory `out` (created if missing;
/// existing `config.json` / `model.safetensors` are replaced).
pub fn synth(name: &str, out: &Path, seed: u64, progress: bool) -> Result<SynthReport, SynthError> {
    let model = find(name).ok_or_else(|| SynthError::UnknownModel {
        name: name.to_string(),
        known: MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
    })?;
    let mut report = match &model.spec {
        SynthSpec::Siglip(cfg) => synth_siglip(cfg, out, seed, progress)?,
        SynthSpec::Jet(cfg) => crate::synth_jet::synth_jet(cfg, out, seed)?,
        SynthSpec::BigVision(b) => crate::synth_big_vision::synth_big_vision(b, out, seed)?,
        SynthSpec::Gemma2(cfg) => write_model_dir(out, &cfg.config_json(), &cfg.tensors(), seed, progress)?,
        SynthSpec::Gemma2Bf16(cfg) => {
            let mut config = cfg.config_json();
            config["dtype"] = serde_json::json!("bfloat16");
            write_model_dir(out, &config, &model.tensors(), seed, progress)?
        }
        SynthSpec::PaliGemma2(cfg) => write_model_dir(out, &cfg.config_json(), &cfg.tensors(), seed, progress)?,
    };
    report.name = model.name.to_string();
    Ok(report)
}

pub use crate::synth_gemma::Gemma2SynthConfig;
pub use crate::synth_siglip::{synth_siglip, SiglipSynthConfig};

// ---------------------------------------------------------------------------
// Generic folder / safetensors writer
// ---------------------------------------------------------------------------

/// Element type of a synthesized tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDtype {
    F32,
    F16,
    BF16,
}

impl SynthDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SynthDtype::F32 => 4,
            SynthDtype::F16 | SynthDtype::BF16 => 2,
        }
    }

    /// The safetensors dtype string.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            SynthDtype::F32 => "F32",
            SynthDtype::F16 => "F16",
            SynthDtype::BF16 => "BF16",
        }
    }
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// i.i.d. with the given mean and standard deviation, approximately
    /// normal (Irwin-Hall sum of 4 uniforms, support mean ± 3.46 std).
    Normal { mean: f32, std: f32 },
    /// All equal to the value.
    Constant(f32),
}

impl Init {
    /// Biases: N(0, 0.02²).
    pub const BIAS: Init = Init::Normal { mean: 0.0, std: 0.02 };
    /// Layer norm scales: 1 + N(0, 0.05²).
    pub const LN_WEIGHT: Init = Init::Normal { mean: 1.0, std: 0.05 };

    /// Weights that keep activation variance: N(0, 1/fan_in).
    pub fn fan_in(fan_in: usize) -> Init {
        Init::Normal { mean: 0.0, std: (1.0 / fan_in.max(1) as f64).sqrt() as f32 }
    }
}

/// One tensor of a synthesized weight file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: SynthDtype,
    pub init: Init,
}

impl TensorSpec {
    /// An f32 tensor.
    pub fn f32(name: String, shape: Vec<usize>, init: Init) -> Self {
        TensorSpec { name, shape, dtype: SynthDtype::F32, init }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the data in bytes.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// The f32 values this tensor gets with `seed` (before dtype conversion).
    /// Exactly what [`write_safetensors`] writes; useful for tests and for
    /// regenerating a single tensor without reading the file.
    pub fn values(&self, seed: u64) -> Vec<f32> {
        let n = self.numel();
        let mut out = vec![0f32; n];
        let name_hash = fnv1a(self.name.as_bytes());
        for (ci, chunk) in out.chunks_mut(CHUNK_ELEMS).enumerate() {
            fill(chunk, self.init, seed, name_hash, ci as u64);
        }
        out
    }
}

/// Elements per independently seeded chunk (and per write).
const CHUNK_ELEMS: usize = 1 << 20;

/// Writes `config.json` and `model.safetensors` into `out`.
pub fn write_model_dir(out: &Path, config: &Value, tensors: &[TensorSpec], seed: u64, progress: bool) -> Result<SynthReport, SynthError> {
    let start = Instant::now();
    fs::create_dir_all(out).map_err(|e| SynthError::io(out, e))?;
    let config_path = out.join("config.json");
    let mut text = serde_json::to_string_pretty(config).expect("config serializes");
    text.push('\n');
    fs::write(&config_path, text).map_err(|e| SynthError::io(&config_path, e))?;
    let weights_path = out.join("model.safetensors");
    let bytes = write_safetensors(&weights_path, tensors, seed, progress)?;
    Ok(SynthReport {
        name: "custom".to_string(),
        dir: out.to_path_buf(),
        config_path,
        weights_path,
        num_tensors: tensors.len(),
        num_params: tensors.iter().map(|t| t.numel() as u64).sum(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Builds the safetensors header (8-byte length prefix included) for
/// `tensors` laid out in name order. Returns the header bytes and the tensors
/// in file order.
pub fn safetensors_header(tensors: &[TensorSpec]) -> Result<(Vec<u8>, Vec<&TensorSpec>), SynthError> {
    let mut order: Vec<&TensorSpec> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = order.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(SynthError::InvalidConfig(format!("duplicate tensor name `{}`", w[0].name)));
    }
    // Insert in sorted order so the JSON is sorted whether or not serde_json's
    // `preserve_order` feature is on somewhere in the build.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in &order {
        let end = offset + t.nbytes();
        header.insert(
            t.name.clone(),
            json!({
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).expect("header serializes");
    let pad = (8 - json.len() % 8) % 8;
    json.resize(json.len() + pad, b' ');
    let mut bytes = Vec::with_capacity(8 + json.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    Ok((bytes, order))
}

/// Streams a safetensors file with random `tensors` to `path` (via a
/// temporary file renamed into place). Data is generated in parallel chunks
/// and written in order with bounded memory. Returns the file size.
pub fn write_safetensors(path: &Path, tensors: &[TensorSpec], seed: u64, progress: bool) -> Result<u64, SynthError> {
    let (header, order) = safetensors_header(tensors)?;

    // Jobs in file order: (tensor, chunk index).
    let mut jobs: Vec<(&TensorSpec, usize)> = Vec::new();
    for t in &order {
        let n = t.numel();
        for ci in 0..n.div_ceil(CHUNK_ELEMS) {
            jobs.push((t, ci));
        }
    }
    let data_bytes: u64 = order.iter().map(|t| t.nbytes() as u64).sum();
    let total = header.len() as u64 + data_bytes;

    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    let file = File::create(&tmp).map_err(|e| SynthError::io(&tmp, e))?;
    let mut w = io::BufWriter::with_capacity(1 << 20, file);

    let bar = if progress {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(path.display().to_string());
        Some(bar)
    } else {
        None
    };

    let result = (|| -> io::Result<()> {
        w.write_all(&header)?;
        if let Some(b) = &bar {
            b.inc(header.len() as u64);
        }
        write_jobs(&jobs, seed, &mut w, bar.as_ref())?;
        w.flush()
    })();
    drop(w);
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(SynthError::io(&tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| SynthError::io(path, e))?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(total)
}

/// Generates `jobs` on worker threads and writes them in order to `w`.
fn write_jobs(jobs: &[(&TensorSpec, usize)], seed: u64, w: &mut impl Write, bar: Option<&indicatif::ProgressBar>) -> io::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 32);
    // At most `window` chunks (~4 MB each for f32) are in flight at once.
    let window = 2 * threads + 2;
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let written = (Mutex::new(0usize), Condvar::new());
    // Written buffers go back to the workers instead of being reallocated.
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, Vec<u8>)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, abort, written, pool) = (&next, &abort, &written, &pool);
            s.spawn(move || {
                let mut vals = Vec::new();
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= jobs.len() {
                        break;
                    }
                    {
                        let mut done = written.0.lock().unwrap();
                        while j >= *done + window && !abort.load(Ordering::Relaxed) {
                            done = written.1.wait(done).unwrap();
                        }
                    }
                    if abort.load(Ordering::Relaxed) {
                        break;
                    }
                    let (t, ci) = jobs[j];
                    let start = ci * CHUNK_ELEMS;
                    let len = CHUNK_ELEMS.min(t.numel() - start);
                    vals.clear();
                    vals.resize(len, 0f32);
                    fill(&mut vals, t.init, seed, fnv1a(t.name.as_bytes()), ci as u64);
                    let mut buf = pool.lock().unwrap().pop().unwrap_or_default();
                    encode(&vals, t.dtype, &mut buf);
                    if tx.send((j, buf)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);

        let stop = |e: io::Error| {
            abort.store(true, Ordering::Relaxed);
            written.1.notify_all();
            e
        };
        let mut pending = BTreeMap::new();
        let mut next_write = 0usize;
        for (j, buf) in rx.iter() {
            pending.insert(j, buf);
            while let Some(buf) = pending.remove(&next_write) {
                w.write_all(&buf).map_err(stop)?;
                if let Some(b) = bar {
                    b.inc(buf.len() as u64);
                }
                pool.lock().unwrap().push(buf);
                next_write += 1;
                *written.0.lock().unwrap() = next_write;
                written.1.notify_all();
            }
        }
        if next_write != jobs.len() {
            return Err(stop(io::Error::other("generator thread stopped early")));
        }
        Ok(())
    })
}

fn encode(vals: &[f32], dtype: SynthDtype, out: &mut Vec<u8>) {
    out.resize(vals.len() * dtype.size(), 0);
    match dtype {
        SynthDtype::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(vals) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        SynthDtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(vals) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        SynthDtype::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(vals) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma2_2b_has_the_published_parameter_count() {
        assert_eq!(find("gemma2-2b").unwrap().num_params(), 2_614_341_888);
    }

    #[test]
    fn small_gemma2_folder_compiles_and_generates() {
        let cfg = Gemma2SynthConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 16,
        };
        let dir = std::env::temp_dir().join(format!("kiln-synth-gemma2-{}", std::process::id()));
        write_model_dir(&dir, &cfg.config_json(), &cfg.tensors(), 7, false).unwrap();
        let mut g = crate::generate::Generator::new(&dir, 1, 4, 3, "cpu").unwrap();
        let out = g.generate(&[2, 5, 6, 7], &[1; 4], 4, 3, None).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(out.sequences[..4], [2, 5, 6, 7]);
        assert!(out.new_tokens >= 1 && out.step_logits.iter().all(|x| x.is_finite() && x.abs() <= 30.0));
    }

    #[test]
    fn small_paligemma2_folder_compiles_and_generates() {
        let big = match find("paligemma2-3b-224").unwrap().spec {
            SynthSpec::PaliGemma2(c) => c,
            _ => unreachable!(),
        };
        let vision = SiglipSynthConfig {
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            patch_size: 8,
            image_size: 16,
            ..big.vision
        };
        let text = Gemma2SynthConfig {
            vocab_size: 70,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 16,
        };
        let cfg = crate::synth_paligemma::PaliGemma2SynthConfig { vision, text, image_token_index: 64 };
        assert!(cfg.tensors().iter().all(|t| t.dtype == SynthDtype::BF16));
        let dir = std::env::temp_dir().join(format!("kiln-synth-pali2-{}", std::process::id()));
        write_model_dir(&dir, &cfg.config_json(), &cfg.tensors(), 7, false).unwrap();
        let g = crate::generate::Generator::new(&dir, 1, 7, 2, "cpu");
        let out = g.and_then(|mut g| {
            let px = kiln_runtime::Tensor::from_f32(&[1, 3, 16, 16], &[0.1; 768]);
            g.generate(&[64, 64, 64, 64, 2, 5, 6], &[1; 7], 7, 2, Some(&px))
        });
        let _ = std::fs::remove_dir_all(&dir);
        let out = out.unwrap();
        assert!(out.new_tokens >= 1 && out.step_logits.iter().all(|x| x.is_finite() && x.abs() <= 30.0));
        assert_eq!(find("paligemma2-3b-224").unwrap().num_params(), 3_032_242_416);
    }

    #[test]
    fn table_is_valid() {
        for m in list() {
            match &m.spec {
                SynthSpec::Siglip(cfg) => cfg.validate().unwrap(),
                SynthSpec::Jet(cfg) => assert_eq!(cfg.model_config().unwrap().schedule().len(), cfg.depth),
                SynthSpec::BigVision(_) => {}
                SynthSpec::Gemma2(_) | SynthSpec::Gemma2Bf16(_) | SynthSpec::PaliGemma2(_) => {}
            }
            assert!(find(m.name).is_some());
        }
        let moe = find("vmoe-b16-e8").unwrap();
        assert!((280e6..300e6).contains(&(moe.num_params() as f64)), "{}", moe.num_params());
        let so = find("siglip-so400m-14-224").unwrap();
        assert!((400e6..450e6).contains(&(so.num_params() as f64)));
        let jet = find("jet-jetformer-256").unwrap();
        assert!((420e6..430e6).contains(&(jet.num_params() as f64)), "{}", jet.num_params());
    }

    #[test]
    fn normal_stats() {
        let t = TensorSpec::f32("x".into(), vec![3, 100_001], Init::Normal { mean: 1.0, std: 0.5 });
        let v = t.values(7);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 1.0).abs() < 0.005, "{mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.005, "{var}");
        assert!(v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn unknown_name_lists_known() {
        let e = synth("nope", Path::new("/nonexistent"), 0, false).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("nope") && msg.contains("siglip-so400m-14-224"), "{msg}");
    }
}
