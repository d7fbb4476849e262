//! `kiln.compile` and `kiln.Artifact`: a compiled program, as `kiln compile` makes it, that can
//! be saved, pickled (Ray ships it to its workers that way) and loaded into sessions.

use crate::errors::{to_py, ArtifactError};
use crate::session::Session;
use kiln::{CompileOptions, Error};
use kiln_graph::program::Program;
use kiln_models::{MoeOptions, MoeOutputs, Profile};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};
use std::path::{Path, PathBuf};

/// A compiled program: every shape fixed, the weights left in the checkpoint folder.
#[pyclass(frozen, module = "kiln")]
pub struct Artifact {
    pub program: Program,
}

/// What `kiln compile` takes besides the folder, as keyword arguments.
pub struct Options {
    pub batch: Option<usize>,
    pub resolution: Option<usize>,
    pub dtype: String,
    pub backend: String,
    pub device: Option<String>,
    pub seq_len: Option<usize>,
    pub generate: bool,
    pub max_new_tokens: Option<usize>,
    pub moe_capacity: Option<f64>,
    pub moe_bpr: Option<bool>,
    pub arch: String,
    /// Decode rows per prompt of a generation program (samples or beams; 1 by default).
    pub rows_per_input: usize,
}

/// `kiln compile <folder>` with the CLI's defaults and messages (`--batch 1`, the checkpoint's
/// resolution, f32, cpu); `generate` is `--generate` (needs `seq_len` and `max_new_tokens`).
pub fn compile_program(folder: &Path, o: &Options) -> kiln::Result<Program> {
    let dtype = kiln::inputs::parse_dtype(&o.dtype)?;
    let batch = o.batch.unwrap_or(1);
    if batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    let backend = kiln::inputs::backend_for(&o.backend, o.device.as_deref())?;
    #[allow(unused_mut)]
    let mut program = if o.generate {
        let bucket =
            o.seq_len.ok_or_else(|| Error::Usage("--generate needs --seq-len: the prompt bucket prefill is compiled for".into()))?;
        let max_new = o.max_new_tokens.ok_or_else(|| {
            Error::Usage("--generate needs --max-new-tokens: the most tokens one generation makes (it sizes the cache)".into())
        })?;
        if bucket == 0 {
            return Err(Error::Usage("--seq-len must be at least 1".into()));
        }
        // Python's generation keeps the logits output: it returns `step_logits` and runs beam search.
        kiln::generate::generation_program_with(folder, (batch, o.rows_per_input), bucket, max_new, (&backend, dtype), true)?.program
    } else {
        let moe = MoeOptions { capacity_factor: o.moe_capacity, batch_priority: o.moe_bpr, outputs: MoeOutputs::None };
        let image_hw = o.resolution.map(|r| (r, r));
        let profile = Profile { batch, image_hw, dtype, moe, seq_len: o.seq_len };
        kiln::compile(folder, &CompileOptions { profile, backend, trace: false })?.program
    };
    if program.backend == "cuda" {
        #[cfg(feature = "cuda")]
        kiln::cuda_tools::attach_binaries(&mut program, &o.arch)?;
        #[cfg(not(feature = "cuda"))]
        return Err(Error::Usage(format!("backend cuda ({}) needs a kiln built with the `cuda` feature", o.arch)));
    }
    Ok(program)
}

/// Compiles a checkpoint folder (`kiln compile`); the GIL is released meanwhile.
#[pyfunction]
#[pyo3(signature = (folder, *, batch=None, resolution=None, dtype="f32".to_string(), backend="cpu".to_string(), device=None,
    seq_len=None, generate=false, max_new_tokens=None, moe_capacity=None, moe_bpr=None, arch="sm_90a".to_string(), rows_per_input=1))]
#[allow(clippy::too_many_arguments)]
pub fn compile(
    py: Python<'_>,
    folder: PathBuf,
    batch: Option<usize>,
    resolution: Option<usize>,
    dtype: String,
    backend: String,
    device: Option<String>,
    seq_len: Option<usize>,
    generate: bool,
    max_new_tokens: Option<usize>,
    moe_capacity: Option<f64>,
    moe_bpr: Option<bool>,
    arch: String,
    rows_per_input: usize,
) -> PyResult<Artifact> {
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
    let program = py.detach(|| compile_program(&folder, &o)).map_err(to_py)?;
    Ok(Artifact { program })
}

#[pymethods]
impl Artifact {
    /// Writes the artifact to `path` (a `.kiln` file, as `kiln compile -o` writes).
    fn save(&self, path: PathBuf) -> PyResult<()> {
        kiln_graph::artifact::save_file(&path, &self.program).map_err(|e| to_py(e.into()))
    }

    /// Reads a `.kiln` file.
    #[classmethod]
    fn load_file(_cls: &Bound<'_, PyType>, path: PathBuf) -> PyResult<Artifact> {
        let program = kiln_graph::artifact::load_file(&path).map_err(|e| to_py(e.into()))?;
        Ok(Artifact { program })
    }

    /// The artifact's bytes (the `.kiln` file's contents).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &kiln_graph::artifact::save(&self.program))
    }

    /// An artifact from bytes `to_bytes` gave; `name` names it in errors.
    #[classmethod]
    #[pyo3(signature = (data, name="<bytes>"))]
    fn from_bytes(_cls: &Bound<'_, PyType>, data: &[u8], name: &str) -> PyResult<Artifact> {
        let program = kiln_graph::artifact::load(data, name).map_err(|e| ArtifactError::new_err(e.to_string()))?;
        Ok(Artifact { program })
    }

    /// Pickles as its bytes (how Ray ships it to workers).
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let from_bytes = slf.get_type().getattr("from_bytes")?;
        Ok((from_bytes, (slf.get().to_bytes(slf.py()),)))
    }

    /// Loads the artifact into a session, with the weights of `weights` (a safetensors file or
    /// a folder; default: the folder it was compiled from).
    #[pyo3(signature = (weights=None, *, cuda_gemv="auto"))]
    fn open_session(&self, py: Python<'_>, weights: Option<PathBuf>, cuda_gemv: &str) -> PyResult<Session> {
        Session::open(py, self.program.clone(), weights, cuda_gemv)
    }

    /// The model the program computes, as `kiln inspect` prints it.
    #[getter]
    fn model(&self) -> String {
        self.program.model.clone()
    }

    /// The backend it was compiled for (cpu, cube, cube-cuda, cuda).
    #[getter]
    fn backend(&self) -> String {
        self.program.backend.clone()
    }

    /// The checkpoint folder it was compiled from (where its weights are read by default).
    #[getter]
    fn source(&self) -> String {
        self.program.source.clone()
    }

    /// The entries' names (`forward`; `prefill` and `decode` for generation; `inverse` for flows).
    #[getter]
    fn entries(&self) -> Vec<String> {
        self.program.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Each entry's inputs and outputs: name -> {"inputs": [...], "outputs": [...]}, each a dict
    /// of name, dtype, shape and whether it is a persistent state.
    #[getter]
    fn signature<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        crate::session::entries_dict(py, &self.program)
    }

    fn __repr__(&self) -> String {
        format!("<kiln.Artifact {} [backend {}] entries {:?}>", self.program.model, self.program.backend, self.entries())
    }
}
