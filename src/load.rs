//! How a compiled program is loaded: the cuda backend's load options (`--cuda-gemv`,
//! `--cuda-fuse`, `--cuda-pdl` on `kiln run`, `bench`, `inspect` and `generate`), checked the
//! same way for every command. They change how the program runs on the card, never what it
//! computes; on another backend a value other than the default is refused.

use crate::{Error, Result};
use kiln_graph::program::Program;
use kiln_runtime::{Session, WeightStore};
use std::sync::Arc;

/// The cuda load options, as given on the command line (`kiln --help` says what each does).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// kiln's GEMV for small-M GEMMs: `auto`, `on` or `off`.
    pub cuda_gemv: String,
    /// Steps run together where the loaded modules allow: `on` or `off`.
    pub cuda_fuse: String,
    /// Programmatic dependent launch: `on` or `off`.
    pub cuda_pdl: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { cuda_gemv: "auto".into(), cuda_fuse: "on".into(), cuda_pdl: "off".into() }
    }
}

impl LoadOptions {
    /// Each value is one its option takes.
    pub fn check(&self) -> Result<()> {
        if !matches!(self.cuda_gemv.as_str(), "auto" | "on" | "off") {
            return Err(Error::Usage(format!("--cuda-gemv {}: expected auto, on or off", self.cuda_gemv)));
        }
        if !matches!(self.cuda_fuse.as_str(), "on" | "off") {
            return Err(Error::Usage(format!("--cuda-fuse {}: expected on or off", self.cuda_fuse)));
        }
        if !matches!(self.cuda_pdl.as_str(), "on" | "off") {
            return Err(Error::Usage(format!("--cuda-pdl {}: expected on or off", self.cuda_pdl)));
        }
        Ok(())
    }
}

/// Loads `program` with `o` (checked; a non-default value for a program of another backend
/// than cuda is refused, naming the option).
pub fn session(program: Program, store: Arc<WeightStore>, o: &LoadOptions) -> Result<Session> {
    o.check()?;
    #[cfg(feature = "cuda")]
    if program.backend == "cuda" {
        let gemv = match o.cuda_gemv.as_str() {
            "on" => kiln_runtime::cuda::tune::GemvMode::On,
            "off" => kiln_runtime::cuda::tune::GemvMode::Off,
            _ => kiln_runtime::cuda::tune::GemvMode::Auto,
        };
        let backend = kiln_runtime::cuda::CudaBackend { gemv, fuse: o.cuda_fuse == "on", pdl: o.cuda_pdl == "on", ..Default::default() };
        return Ok(Session::with_backend(program, store, &backend)?);
    }
    let d = LoadOptions::default();
    for (name, given, default) in
        [("gemv", &o.cuda_gemv, &d.cuda_gemv), ("fuse", &o.cuda_fuse, &d.cuda_fuse), ("pdl", &o.cuda_pdl, &d.cuda_pdl)]
    {
        if given != default {
            return Err(Error::Usage(format!("--cuda-{name} applies to the cuda backend, not {}", program.backend)));
        }
    }
    Ok(Session::new(program, store)?)
}
