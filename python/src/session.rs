//! `kiln.Session`: a loaded program. `run` borrows the callers' array memory (no copy when the
//! dtype and shape are the entry's), releases the GIL while the program runs, and takes the
//! session's lock: runs of one session are serial (one arena), sessions run in parallel.

use crate::artifact::{compile_program, Options};
use crate::errors::{input, to_py, InputError, KilnError};
use kiln::generate::Generator;
use kiln_graph::program::Program;
use kiln_graph::{DType, TensorType};
use kiln_runtime::{Session as RtSession, Tensor, WeightStore};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An input as the Python side hands it over: name, dtype name, shape, address, byte length.
type RawInput = (String, String, Vec<usize>, usize, usize);
/// An output handed back: name, dtype name, shape, bytes.
type RawOutput = (String, String, Vec<usize>, Py<PyByteArray>);

/// A detection handed back: label, normalised box, box in pixels, mask codes.
type Detection = (String, [f32; 4], Option<[f32; 4]>, Option<Vec<u8>>);

/// A loaded program; a generation program (entries `prefill` and `decode`) comes with its driver.
enum Loaded {
    Run(Box<RtSession>),
    Gen(Box<Generator>),
}

impl Loaded {
    fn session(&mut self) -> &mut RtSession {
        match self {
            Loaded::Run(s) => s,
            Loaded::Gen(g) => &mut g.session,
        }
    }
}

/// A program loaded with its weights, ready to run many times.
#[pyclass(frozen, module = "kiln")]
pub struct Session {
    loaded: Mutex<Loaded>,
    /// The checkpoint folder (config, tokenizer, special ids).
    source: PathBuf,
    program: Program,
}

/// Loads a `.kiln` file, or compiles a folder first (`kiln run <folder>` with a fixed profile).
#[pyfunction]
#[pyo3(signature = (path, *, weights=None, backend=None, device=None, cuda_gemv="auto".to_string(), batch=None, resolution=None,
    dtype="f32".to_string(), seq_len=None, generate=false, max_new_tokens=None, moe_capacity=None, moe_bpr=None,
    arch="sm_90a".to_string(), rows_per_input=1))]
#[allow(clippy::too_many_arguments)]
pub fn load(
    py: Python<'_>,
    path: PathBuf,
    weights: Option<PathBuf>,
    backend: Option<String>,
    device: Option<String>,
    cuda_gemv: String,
    batch: Option<usize>,
    resolution: Option<usize>,
    dtype: String,
    seq_len: Option<usize>,
    generate: bool,
    max_new_tokens: Option<usize>,
    moe_capacity: Option<f64>,
    moe_bpr: Option<bool>,
    arch: String,
    rows_per_input: usize,
) -> PyResult<Session> {
    let program = if path.is_file() {
        let p = kiln_graph::artifact::load_file(&path).map_err(|e| to_py(e.into()))?;
        if let Some(b) = &backend {
            let want = kiln::inputs::backend_for(b, device.as_deref()).map_err(to_py)?;
            if want != p.backend {
                return Err(crate::errors::BackendError::new_err(format!(
                    "{}: compiled for backend {}, not {want} (compile it again with backend={want:?})",
                    path.display(),
                    p.backend
                )));
            }
        }
        p
    } else {
        let backend = backend.unwrap_or_else(|| "cpu".into());
        let o = Options {
            batch,
            resolution,
            dtype,
            backend,
            device,
            seq_len,
            generate,
            max_new_tokens,
            moe_capacity,
            moe_bpr,
            arch,
            rows_per_input,
        };
        py.detach(|| compile_program(&path, &o)).map_err(to_py)?
    };
    Session::open(py, program, weights, &cuda_gemv)
}

/// Loads `program` as the CLI does (`--cuda-gemv` included).
fn load_program(program: Program, store: Arc<WeightStore>, cuda_gemv: &str) -> kiln::Result<RtSession> {
    if !matches!(cuda_gemv, "auto" | "on" | "off") {
        return Err(kiln::Error::Usage(format!("--cuda-gemv {cuda_gemv}: expected auto, on or off")));
    }
    #[cfg(feature = "cuda")]
    if program.backend == "cuda" {
        use kiln_runtime::cuda::tune::GemvMode;
        let gemv = match cuda_gemv {
            "on" => GemvMode::On,
            "off" => GemvMode::Off,
            _ => GemvMode::Auto,
        };
        let backend = kiln_runtime::cuda::CudaBackend { gemv, ..Default::default() };
        return Ok(RtSession::with_backend(program, store, &backend)?);
    }
    if cuda_gemv != "auto" {
        return Err(kiln::Error::Usage(format!("--cuda-gemv applies to the cuda backend, not {}", program.backend)));
    }
    Ok(RtSession::new(program, store)?)
}

impl Session {
    /// Loads `program` with the weights at `weights` (default: the folder it was compiled from).
    pub fn open(py: Python<'_>, program: Program, weights: Option<PathBuf>, cuda_gemv: &str) -> PyResult<Session> {
        let source = PathBuf::from(&program.source);
        let kept = program.clone();
        let loaded = py
            .detach(|| -> kiln::Result<Loaded> {
                // One checkpoint (`weights`, else the folder compiled from), or an ensemble's
                // weight sets (relative ones read against `weights`).
                let store = Arc::new(WeightStore::for_program(&program, weights.as_deref())?);
                let generation = program.entry("prefill").is_some() && program.entry("decode").is_some();
                let s = load_program(program, store, cuda_gemv)?;
                Ok(if generation { Loaded::Gen(Box::new(Generator::from_session(s, &source)?)) } else { Loaded::Run(Box::new(s)) })
            })
            .map_err(to_py)?;
        Ok(Session { loaded: Mutex::new(loaded), source, program: kept })
    }

    /// Runs `f` on the loaded program with the GIL released.
    fn with<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut Loaded) -> PyResult<T> + Send) -> PyResult<T> {
        py.detach(|| {
            // A panic in an earlier run poisons the lock; the arena may then be half written.
            let mut g = self
                .loaded
                .lock()
                .map_err(|_| KilnError::new_err("the session is unusable after an internal error in an earlier call: load it again"))?;
            f(&mut g)
        })
    }
}

/// Parses the views the Python side made, checking each address range's length.
fn views(inputs: &[RawInput]) -> PyResult<Vec<(String, TensorType, usize, usize)>> {
    inputs
        .iter()
        .map(|(name, dt, shape, addr, n)| {
            let dtype = DType::parse(dt).ok_or_else(|| {
                InputError::new_err(format!("input '{name}': dtype {dt} is not one kiln runs (f32, f16, bf16, i32, i64, u8, bool)"))
            })?;
            let ty = TensorType::new(dtype, shape.as_slice());
            if ty.bytes() != *n {
                return Err(InputError::new_err(format!("input '{name}': {n} bytes given, {ty} needs {}", ty.bytes())));
            }
            Ok((name.clone(), ty, *addr, *n))
        })
        .collect()
}

/// Runs `entry` as `kiln run` does: inputs exactly of the entry's types run from the callers'
/// memory; otherwise they are copied and completed as the CLI completes them (a text model's
/// integer inputs and defaults, float casts) before the runtime checks them.
fn run_entry(s: &mut RtSession, entry: &str, given: &[(&str, (&TensorType, &[u8]))]) -> kiln::Result<Vec<(String, Tensor)>> {
    let exact = s.program().entry(entry).is_some_and(|e| {
        let state = |n: &str| s.program().state_index(n).is_some();
        let has = |n: &str, t: &TensorType| e.inputs.iter().any(|io| io.name == n && io.operand.ty == *t);
        e.inputs.iter().all(|io| state(&io.name) || given.iter().any(|(n, _)| *n == io.name)) && given.iter().all(|(n, (t, _))| has(n, t))
    });
    if exact {
        return Ok(s.run_views(entry, given)?);
    }
    let mut ins: Vec<(String, Tensor)> =
        given.iter().map(|(n, (t, b))| (n.to_string(), Tensor { ty: (*t).clone(), bytes: b.to_vec() })).collect();
    kiln::inputs::text_inputs(&mut ins, Path::new("inputs"))?;
    kiln::inputs::text_defaults(&mut ins, s);
    kiln::inputs::cast_floats(&mut ins, s, entry);
    let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Ok(s.run(entry, &refs)?)
}

/// Outputs as (name, dtype, shape, bytes); bf16 becomes f32 (NumPy has no bf16).
fn outputs(py: Python<'_>, outs: Vec<(String, Tensor)>) -> Vec<RawOutput> {
    outs.into_iter()
        .map(|(name, t)| {
            let (dtype, bytes) = match t.ty.dtype {
                DType::BF16 => (DType::F32, kiln_runtime::tensor::convert(DType::BF16, DType::F32, &t.bytes)),
                d => (d, t.bytes),
            };
            (name, dtype.name().to_string(), t.ty.shape.to_vec(), PyByteArray::new(py, &bytes).unbind())
        })
        .collect()
}

/// The `len` bytes at `addr` (none for an empty array, whose address may be dangling).
///
/// # Safety
/// `addr..addr + len` is readable memory that outlives the returned slice.
unsafe fn borrow<'a>(addr: usize, len: usize) -> &'a [u8] {
    match len {
        0 => &[],
        // SAFETY: the caller guarantees the range is readable for the slice's lifetime.
        _ => unsafe { std::slice::from_raw_parts(addr as *const u8, len) },
    }
}

/// Copies views into owned tensors (generation inputs are small).
fn owned(inputs: &[RawInput]) -> PyResult<Vec<(String, Tensor)>> {
    Ok(views(inputs)?
        .into_iter()
        .map(|(n, ty, addr, len)| {
            // SAFETY: the Python side keeps each array alive and contiguous for the call and
            // gave its address and byte length; `views` checked the length against the type.
            let bytes = unsafe { borrow(addr, len) }.to_vec();
            (n, Tensor { ty, bytes })
        })
        .collect())
}

/// name -> {"inputs": [...], "outputs": [...]} for every entry of `p`.
pub fn entries_dict<'py>(py: Python<'py>, p: &Program) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for e in &p.entries {
        let ed = PyDict::new(py);
        let ins: Vec<_> = e.inputs.iter().map(|io| io_dict(py, p, io)).collect::<PyResult<_>>()?;
        let outs: Vec<_> = e.outputs.iter().map(|io| io_dict(py, p, io)).collect::<PyResult<_>>()?;
        ed.set_item("inputs", ins)?;
        ed.set_item("outputs", outs)?;
        d.set_item(&e.name, ed)?;
    }
    Ok(d)
}

fn io_dict<'py>(py: Python<'py>, p: &Program, io: &kiln_graph::program::Io) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &io.name)?;
    d.set_item("dtype", io.operand.ty.dtype.name())?;
    d.set_item("shape", io.operand.ty.shape.to_vec())?;
    d.set_item("state", p.state_index(&io.name).is_some())?;
    Ok(d)
}

#[pymethods]
impl Session {
    /// Runs `entry` on `inputs` (name, dtype, shape, address, bytes) and returns its outputs
    /// (name, dtype, shape, bytes). The arrays must stay alive and unchanged during the call.
    #[pyo3(signature = (inputs, entry="forward"))]
    fn run_raw(&self, py: Python<'_>, inputs: Vec<RawInput>, entry: &str) -> PyResult<Vec<RawOutput>> {
        let v = views(&inputs)?;
        let outs = self.with(py, |l| {
            // SAFETY: the Python side keeps every array alive and contiguous until this call
            // returns and gave its address and byte length; `views` checked the length.
            let given: Vec<(&str, (&TensorType, &[u8]))> =
                v.iter().map(|(n, ty, addr, len)| (n.as_str(), (ty, unsafe { borrow(*addr, *len) }))).collect();
            run_entry(l.session(), entry, &given).map_err(input)
        })?;
        Ok(outputs(py, outs))
    }

    /// `kiln generate --inputs`: `input_ids` (+ `attention_mask`, `pixel_values`) as raw
    /// inputs. Greedy or sampled: `sequences [R, L + n]` (i64), `step_logits [R, n, V]` and
    /// `logprobs [R, n]` (f32), R = B times the program's rows per input (samples). With
    /// `beams` = (num_beams, num_return_sequences, length_penalty, early_stopping,
    /// min_new_tokens): transformers' beam search, `sequences [B * R, L + n]` and
    /// `sequences_scores [B * R]`.
    #[pyo3(signature = (inputs, max_new_tokens=None, temperature=0.0, top_k=0, top_p=None, seed=0, beams=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_raw(
        &self,
        py: Python<'_>,
        inputs: Vec<RawInput>,
        max_new_tokens: Option<usize>,
        temperature: f64,
        top_k: usize,
        top_p: Option<f64>,
        seed: u64,
        beams: Option<(usize, usize, f64, String, usize)>,
    ) -> PyResult<Vec<RawOutput>> {
        let mut ins = owned(&inputs)?;
        let outs = self.with(py, |l| {
            let Loaded::Gen(g) = l else {
                return Err(KilnError::new_err(
                    "generate needs a generation program: kiln.compile(folder, generate=True, seq_len=L, max_new_tokens=N)",
                ));
            };
            let sampling = kiln::sampling::HfSampling { temperature, top_k, top_p: top_p.unwrap_or(1.0), seed };
            sampling.check().map_err(to_py)?;
            let (b, l) = kiln::inputs::text_inputs(&mut ins, Path::new("inputs"))
                .map_err(input)?
                .ok_or_else(|| InputError::new_err("inputs: no input_ids tensor [B, L]"))?;
            let get = |n: &str| ins.iter().find(|(k, _)| k == n).map(|(_, t)| t);
            let ids: Vec<i64> = get("input_ids").map(|t| t.to_f64().into_iter().map(|x| x as i64).collect()).unwrap_or_default();
            let mask: Vec<i64> = get("attention_mask").map(|t| t.to_f64().into_iter().map(|x| x as i64).collect()).unwrap_or_default();
            let max_new = max_new_tokens.unwrap_or(g.meta.capacity - g.bucket);
            let prompt = kiln::generate::Prompt { input_ids: &ids, attention_mask: &mask, token_type_ids: None, len: l };
            if let Some((num_beams, num_return_sequences, length_penalty, early_stopping, min_new_tokens)) = beams {
                if temperature > 0.0 {
                    return Err(to_py(kiln::Error::Usage("beam search is deterministic: no temperature with num_beams".into())));
                }
                let early_stopping = early_stopping.parse().map_err(to_py)?;
                let o = kiln::beam::BeamOptions { num_beams, num_return_sequences, length_penalty, early_stopping, min_new_tokens };
                let r = g.beam_search(&prompt, max_new, get("pixel_values"), &o).map_err(input)?;
                let rows = b * num_return_sequences;
                return Ok(vec![
                    ("sequences".to_string(), Tensor::from_i64(&[rows, l + r.new_tokens], &r.sequences)),
                    ("sequences_scores".to_string(), Tensor::from_f32(&[rows], &r.sequences_scores)),
                ]);
            }
            g.sampling = (temperature > 0.0).then_some(sampling);
            let r = g.generate_prompt(&prompt, max_new, get("pixel_values"), &mut |_| Ok(())).map_err(input)?;
            let rows = b * g.rows_per_input;
            let mut outs = vec![("sequences".to_string(), Tensor::from_i64(&[rows, l + r.new_tokens], &r.sequences))];
            // Only a program that outputs its logits gives them (the package's compile keeps them).
            if !r.step_logits.is_empty() {
                outs.push(("step_logits".to_string(), Tensor::from_f32(&[rows, r.new_tokens, g.meta.vocab], &r.step_logits)));
            }
            outs.push(("logprobs".to_string(), Tensor::from_f32(&[rows, r.new_tokens], &r.logprobs)));
            Ok(outs)
        })?;
        Ok(outputs(py, outs))
    }

    /// `kiln generate --prompt [--image]` on this session's generation program (batch 1):
    /// returns a dict with `text`, `input_ids`, `new_ids` and `detections` (label, box
    /// `[ymin, xmin, ymax, xmax]` in [0, 1], box in pixels, mask codes or None).
    #[pyo3(signature = (prompt, image=None, *, max_new_tokens=None, temperature=0.0, top_k=0, top_p=None, seed=0, draw=None, seg_decoder=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_prompt<'py>(
        &self,
        py: Python<'py>,
        prompt: String,
        image: Option<PathBuf>,
        max_new_tokens: Option<usize>,
        temperature: f64,
        top_k: usize,
        top_p: Option<f64>,
        seed: u64,
        draw: Option<PathBuf>,
        seg_decoder: Option<PathBuf>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let model = self.source.clone();
        let backend = self.program.backend.clone();
        let image_path = image.clone();
        let r = self.with(py, |l| {
            let Loaded::Gen(g) = l else {
                return Err(KilnError::new_err(
                    "generate needs a generation program: kiln.compile(folder, generate=True, seq_len=L, max_new_tokens=N)",
                ));
            };
            let sampling = kiln::sampling::HfSampling { temperature, top_k, top_p: top_p.unwrap_or(1.0), seed };
            sampling.check().map_err(to_py)?;
            let max_new_tokens = max_new_tokens.unwrap_or(g.meta.capacity - g.bucket);
            let o = kiln::prompt::PromptOptions {
                model,
                prompt,
                image,
                max_new_tokens,
                bucket: Some(g.bucket),
                backend,
                dtype: DType::F32,
                draw,
                seg_decoder,
                breakdown: false,
                sampling: (temperature > 0.0).then_some(sampling),
                load: kiln::load::LoadOptions::default(),
            };
            kiln::prompt::run_on(g, &o, &mut std::io::sink()).map_err(input)
        })?;
        let d = PyDict::new(py);
        d.set_item("text", &r.text)?;
        d.set_item("input_ids", &r.input_ids)?;
        d.set_item("new_ids", &r.new_ids)?;
        let size = image_path.as_deref().and_then(|p| image_size(p).ok());
        let dets: Vec<Detection> = r
            .detections
            .iter()
            .map(|det| {
                let px = size.map(|(w, h)| {
                    let (x0, y0, x1, y1) = det.pixels(w, h);
                    [x0, y0, x1, y1]
                });
                (det.label.clone(), det.bbox, px, det.seg.map(|c| c.to_vec()))
            })
            .collect();
        d.set_item("detections", dets)?;
        Ok(d)
    }

    /// The entries: name -> {"inputs": [...], "outputs": [...]}, each a dict of name, dtype,
    /// shape and whether it is a persistent state (the KV cache, kept by the session).
    #[getter]
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        entries_dict(py, &self.program)
    }

    /// The model the program computes.
    #[getter]
    fn model(&self) -> String {
        self.program.model.clone()
    }

    /// The backend it runs on.
    #[getter]
    fn backend(&self) -> String {
        self.program.backend.clone()
    }

    /// The checkpoint folder it was compiled from.
    #[getter]
    fn source(&self) -> String {
        self.program.source.clone()
    }

    /// Whether it is a generation program (`generate` works).
    #[getter]
    fn is_generation(&self) -> bool {
        self.program.entry("prefill").is_some() && self.program.entry("decode").is_some()
    }
}

/// An image file's width and height (for boxes in pixels).
fn image_size(path: &Path) -> kiln::Result<(u32, u32)> {
    let img = kiln::preprocess::load_image(path, true)?;
    Ok((img.width as u32, img.height as u32))
}
