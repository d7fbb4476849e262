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

use kiln_graph::DType;
pub use kiln_models::registry::Init;
use kiln_models::registry::{self, Family, SynthRecipe, SynthRow, WeightFormat};
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
    /// The family's builder refused the config, or the recipe is invalid.
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
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
// Model table: the registry's rows
// ---------------------------------------------------------------------------

/// One checkpoint `kiln synth` writes: a row of a family in kiln's model registry.
#[derive(Clone, Copy)]
pub struct SynthModel {
    /// CLI name, e.g. `siglip-so400m-14-224`.
    pub name: &'static str,
    /// One-line human description.
    pub description: &'static str,
    /// The family that declares it (and builds it).
    pub family: &'static Family,
    row: &'static SynthRow,
}

impl std::fmt::Debug for SynthModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SynthModel({} of {})", self.name, self.family.name)
    }
}

impl SynthModel {
    /// Its config, weight format and given tensors for `seed`.
    pub fn recipe(&self, seed: u64) -> Result<SynthRecipe, SynthError> {
        Ok((self.row.recipe)(seed)?)
    }

    /// The tensors its weight file holds (the weights its builder reads, and the given ones),
    /// in file order (by name).
    pub fn tensors(&self) -> Result<Vec<TensorSpec>, SynthError> {
        let scratch = std::env::temp_dir().join(format!("kiln-synth-schema-{}-{}", std::process::id(), self.name));
        let result = (|| {
            let recipe = self.recipe(0)?;
            write_config(&scratch, &recipe.config)?;
            tensor_specs(self.family, &recipe, &scratch.join("config.json"))
        })();
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    /// Learned parameter count (given frozen tensors, like Jet's permutations, excluded).
    pub fn num_params(&self) -> Result<u64, SynthError> {
        Ok(self.tensors()?.iter().filter(|t| t.given.is_none()).map(|t| t.numel() as u64).sum())
    }
}

/// All models `kiln synth` knows, family by family.
pub fn list() -> Vec<SynthModel> {
    registry::synth_rows().map(|(family, row)| SynthModel { name: row.name, description: row.about, family, row }).collect()
}

/// Looks a model up by name.
pub fn find(name: &str) -> Option<SynthModel> {
    list().into_iter().find(|m| m.name == name)
}

/// Synthesizes table model `name` into directory `out` (created if missing; an existing
/// `config.json` and weight file are replaced).
/// A `name` ending in `.json` that is a file is a `config.json` to synthesize ([`synth_config`]).
pub fn synth(name: &str, out: &Path, seed: u64, progress: bool) -> Result<SynthReport, SynthError> {
    if name.ends_with(".json") && Path::new(name).is_file() {
        return synth_config(Path::new(name), out, seed, progress);
    }
    let model = find(name).ok_or_else(|| SynthError::UnknownModel {
        name: name.to_string(),
        known: list().iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
    })?;
    let mut report = synth_folder(model.family, &model.recipe(seed)?, out, seed, progress)?;
    report.name = model.name.to_string();
    Ok(report)
}

/// Synthesizes the model a `config.json` describes (any size, e.g. a small one for a benchmark):
/// the family its `model_name` (big_vision, written as `params.npz`) or `model_type` (Hugging
/// Face, `model.safetensors`) names, f32 weights learned at batch 8 (so a V-MoE's routing
/// groups may span up to 8 images). Families with given tensors (Jet) need their table rows.
pub fn synth_config(config: &Path, out: &Path, seed: u64, progress: bool) -> Result<SynthReport, SynthError> {
    let family = registry::family_of(config)?;
    let (big_vision, _) = registry::kind_of(config)?;
    let text = fs::read_to_string(config).map_err(|e| SynthError::io(config, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| SynthError::InvalidConfig(format!("{}: {e}", config.display())))?;
    let format = if big_vision { WeightFormat::Npz } else { WeightFormat::Safetensors };
    let recipe = SynthRecipe { config: value, dtype: DType::F32, format, roots: &[""], given: Vec::new(), batch: 8 };
    let mut report = synth_folder(family, &recipe, out, seed, progress)?;
    report.name = config.display().to_string();
    Ok(report)
}

/// Writes a folder of `family` for any recipe (the table's rows come through here; tests use
/// tiny configs): `config.json`, then every weight the family's builder reads for that config,
/// drawn by the family's init rule, plus the recipe's given tensors.
pub fn synth_folder(family: &Family, recipe: &SynthRecipe, out: &Path, seed: u64, progress: bool) -> Result<SynthReport, SynthError> {
    let start = Instant::now();
    let config_path = write_config(out, &recipe.config)?;
    let tensors = tensor_specs(family, recipe, &config_path)?;
    let (weights_path, bytes) = match recipe.format {
        WeightFormat::Safetensors => {
            let path = out.join("model.safetensors");
            let bytes = write_safetensors(&path, &tensors, seed, progress)?;
            (path, bytes)
        }
        WeightFormat::Npz => {
            let path = out.join("params.npz");
            let bytes = write_npz(&path, &tensors, seed)?;
            (path, bytes)
        }
    };
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

/// Writes `config` as `out/config.json` (creating `out`).
fn write_config(out: &Path, config: &Value) -> Result<PathBuf, SynthError> {
    fs::create_dir_all(out).map_err(|e| SynthError::io(out, e))?;
    let config_path = out.join("config.json");
    let mut text = serde_json::to_string_pretty(config).expect("config serializes");
    text.push('\n');
    fs::write(&config_path, text).map_err(|e| SynthError::io(&config_path, e))?;
    Ok(config_path)
}

/// The tensors of a recipe's weight file, sorted by name: what the builder reads (learned from
/// a schema build, see [`registry::synth_weights`]) and the given tensors.
fn tensor_specs(family: &Family, recipe: &SynthRecipe, config_path: &Path) -> Result<Vec<TensorSpec>, SynthError> {
    let dtype = match recipe.dtype {
        DType::F32 => SynthDtype::F32,
        DType::BF16 => SynthDtype::BF16,
        DType::F16 => SynthDtype::F16,
        other => return Err(SynthError::InvalidConfig(format!("weights of dtype {other}"))),
    };
    let weights = registry::synth_weights(family, config_path, recipe)?;
    let mut out: Vec<TensorSpec> =
        weights.into_iter().map(|w| TensorSpec { name: w.name, shape: w.shape, dtype, init: w.init, given: None }).collect();
    for g in &recipe.given {
        if g.values.len() != g.shape.iter().product::<usize>() {
            return Err(SynthError::InvalidConfig(format!("{}: {} values for shape {:?}", g.name, g.values.len(), g.shape)));
        }
        let given = Some(std::sync::Arc::new(g.values.clone()));
        out.push(TensorSpec { name: g.name.clone(), shape: g.shape.clone(), dtype, init: Init::Constant(0.0), given });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes `tensors` (f32, sorted by name) as an `np.savez` file; returns its size.
fn write_npz(path: &Path, tensors: &[TensorSpec], seed: u64) -> Result<u64, SynthError> {
    let io = |e| SynthError::io(path, e);
    let mut w = crate::npz_write::NpzWriter::create(path).map_err(io)?;
    for t in tensors {
        if t.dtype != SynthDtype::F32 {
            return Err(SynthError::InvalidConfig(format!("{}: npz weights are written as f32 only", t.name)));
        }
        w.add_f32(&t.name, &t.shape, &t.values(seed)).map_err(io)?;
    }
    w.finish().map_err(io)?;
    Ok(fs::metadata(path).map_err(io)?.len())
}

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

/// One tensor of a synthesized weight file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: SynthDtype,
    pub init: Init,
    /// Given values (row-major, `numel` of them) instead of random ones drawn by `init`.
    pub given: Option<std::sync::Arc<Vec<f32>>>,
}

impl TensorSpec {
    /// An f32 tensor.
    pub fn f32(name: String, shape: Vec<usize>, init: Init) -> Self {
        TensorSpec { name, shape, dtype: SynthDtype::F32, init, given: None }
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
        if let Some(v) = &self.given {
            return v.to_vec();
        }
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
                    match &t.given {
                        Some(v) => vals.extend_from_slice(&v[start..start + len]),
                        None => {
                            vals.resize(len, 0f32);
                            fill(&mut vals, t.init, seed, fnv1a(t.name.as_bytes()), ci as u64);
                        }
                    }
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
    use kiln_models::{gemma, paligemma, siglip};

    fn recipe(config: Value, dtype: DType, roots: &'static [&'static str]) -> SynthRecipe {
        SynthRecipe { config, dtype, format: WeightFormat::Safetensors, roots, given: Vec::new(), batch: 1 }
    }

    const SMALL_TEXT: gemma::Gemma2Sizes = gemma::Gemma2Sizes {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 16,
    };

    #[test]
    fn gemma2_2b_has_the_published_parameter_count() {
        assert_eq!(find("gemma2-2b").unwrap().num_params().unwrap(), 2_614_341_888);
    }

    #[test]
    fn small_gemma2_folder_compiles_and_generates() {
        let dir = std::env::temp_dir().join(format!("kiln-synth-gemma2-{}", std::process::id()));
        let r = recipe(gemma::gemma2_config(&SMALL_TEXT), DType::F32, &[""]);
        let report = synth_folder(&gemma::FAMILY, &r, &dir, 7, false).unwrap();
        // Embedding, final norm, and 4 norms + 7 projections per layer.
        assert_eq!(report.num_tensors, 2 + 2 * 11);
        let mut g = crate::generate::Generator::new(&dir, 1, 4, 3, "cpu").unwrap();
        let out = g.generate(&[2, 5, 6, 7], &[1; 4], 4, 3, None).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(out.sequences[..4], [2, 5, 6, 7]);
        assert!(out.new_tokens >= 1 && out.logprobs.iter().all(|x| x.is_finite() && *x <= 0.0));
    }

    #[test]
    fn small_paligemma2_folder_compiles_and_generates() {
        let vision = siglip::synth_config(32, 48, 2, 2, 8, 16, false);
        let text = gemma::Gemma2Sizes { vocab_size: 70, ..SMALL_TEXT };
        let config = paligemma::synth_config(vision, &text, 64);
        let r = recipe(config, DType::BF16, &["vision_tower.", "multi_modal_projector.", "language_model."]);
        let dir = std::env::temp_dir().join(format!("kiln-synth-pali2-{}", std::process::id()));
        let report = synth_folder(&paligemma::FAMILY, &r, &dir, 7, false).unwrap();
        let g = crate::generate::Generator::new(&dir, 1, 7, 2, "cpu");
        let out = g.and_then(|mut g| {
            let px = kiln_runtime::Tensor::from_f32(&[1, 3, 16, 16], &[0.1; 768]);
            g.generate(&[64, 64, 64, 64, 2, 5, 6], &[1; 7], 7, 2, Some(&px))
        });
        let header = std::fs::read(&report.weights_path).map(|b| String::from_utf8_lossy(&b[8..4096.min(b.len())]).into_owned());
        let _ = std::fs::remove_dir_all(&dir);
        let out = out.unwrap();
        assert!(out.new_tokens >= 1 && out.logprobs.iter().all(|x| x.is_finite() && *x <= 0.0));
        let header = header.unwrap();
        assert!(header.contains("\"multi_modal_projector.linear.bias\"") && !header.contains("\"F32\""), "{header}");
        assert_eq!(find("paligemma2-3b-224").unwrap().num_params().unwrap(), 3_032_242_416);
    }

    #[test]
    fn table_is_valid() {
        for m in list() {
            assert!(m.num_params().unwrap() > 0, "{}", m.name);
            assert_eq!(find(m.name).unwrap().name, m.name);
        }
        let params = |name: &str| find(name).unwrap().num_params().unwrap() as f64;
        assert!((280e6..300e6).contains(&params("vmoe-b16-e8")), "{}", params("vmoe-b16-e8"));
        assert!((400e6..450e6).contains(&params("siglip-so400m-14-224")));
        assert!((420e6..430e6).contains(&params("jet-jetformer-256")), "{}", params("jet-jetformer-256"));
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
