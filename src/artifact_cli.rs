//! Artifacts given where a model folder could be: where their weights come from, what a
//! load of one will do (`kiln inspect`'s `== load`), the compile-time flags they cannot
//! take, and `kiln generate` on the artifact that `kiln compile --generate` writes.

use super::*;
use kiln::generate::Generator;

/// Where an artifact's weights are read from: `--weights`, else the folder it was compiled
/// from (an ensemble's members are read against the working directory). A folder that is not
/// there is an error naming the artifact, the folder and `--weights`.
pub(super) fn weights_path(artifact: &Path, program: &Program, weights: Option<&Path>) -> Result<PathBuf> {
    if let Some(w) = weights {
        return Ok(w.to_path_buf());
    }
    let source = PathBuf::from(&program.source);
    if program.source.is_empty() || source.exists() {
        return Ok(source);
    }
    let relative = if source.is_relative() {
        " (a relative path, read against the working directory: the artifact predates absolute source paths)"
    } else {
        ""
    };
    Err(Error::Usage(format!(
        "{}: its weights are read from {}{relative}, the folder it was compiled from, which is not there; \
         pass --weights <model folder or safetensors file>",
        artifact.display(),
        source.display()
    )))
}

/// An artifact was compiled with its own batch, resolution, dtype, backend, ...: a flag that
/// fixes a compile, given with one, is refused by name instead of being ignored.
pub(super) fn refuse_compile_flags(artifact: &Path, program: &Program, p: &ProfileArgs) -> Result<()> {
    let mut given = Vec::new();
    for (flag, set) in [
        ("--resolution", p.resolution.is_some()),
        ("--batch", p.batch.is_some()),
        ("--dtype", p.dtype != "f32"),
        ("--moe-capacity", p.moe_capacity.is_some()),
        ("--moe-bpr", p.moe_bpr.is_some()),
        ("--seq-len", p.seq_len.is_some()),
        ("--arch", p.arch != "sm_90a"),
        ("--tuning", p.tuning.is_some()),
    ] {
        if set {
            given.push(flag);
        }
    }
    // `--backend`/`--device` naming the artifact's own backend say nothing new; another is refused.
    let named = p.backend != "cpu" || p.device.is_some();
    if named && backend_for(&p.backend, p.device.as_deref()).ok().as_deref() != Some(program.backend.as_str()) {
        given.push(if p.device.is_some() { "--backend/--device" } else { "--backend" });
    }
    refuse(artifact, program, &given)
}

fn refuse(artifact: &Path, program: &Program, given: &[&str]) -> Result<()> {
    if given.is_empty() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "{} is an artifact, compiled with its own shapes, dtype and backend ({}): {} applies to a model folder \
         (recompile with kiln compile to change it)",
        artifact.display(),
        program.backend,
        given.join(", ")
    )))
}

/// The generation flags of `kiln generate` that fix a compile.
pub(super) struct GenerateFlags<'a> {
    pub bucket: Option<usize>,
    pub backend: &'a str,
    pub device: Option<&'a str>,
    pub dtype: &'a str,
    /// The cuda load options (`kiln::load`).
    pub load: &'a kiln::load::LoadOptions,
}

/// `kiln generate <gen.kiln>`: the generation program `kiln compile --generate` wrote, loaded
/// with its weights; also gives the model folder (config, tokenizer) the generator reads.
pub(super) fn generator(artifact: &Path, weights: Option<&Path>, f: &GenerateFlags) -> Result<(Generator, PathBuf)> {
    let program = kiln_graph::artifact::load_file(artifact)?;
    let mut given = Vec::new();
    if f.bucket.is_some() {
        given.push("--bucket");
    }
    if f.dtype != "f32" {
        given.push("--dtype");
    }
    if (f.backend != "cpu" || f.device.is_some()) && backend_for(f.backend, f.device).ok().as_deref() != Some(program.backend.as_str()) {
        given.push("--backend/--device");
    }
    refuse(artifact, &program, &given)?;
    if program.entry("prefill").is_none() || program.entry("decode").is_none() {
        return Err(Error::Usage(format!(
            "{}: not a generation program (entries prefill and decode): compile one with kiln compile --generate",
            artifact.display()
        )));
    }
    let wpath = weights_path(artifact, &program, weights)?;
    // The folder holds config.json and the tokenizer; `--weights` may name its safetensors file.
    let dir = if wpath.is_file() { wpath.parent().map(Path::to_path_buf).unwrap_or_default() } else { wpath.clone() };
    let store = progress("loading weights", || WeightStore::for_program(&program, Some(&wpath)))?;
    let session = progress("preparing", || kiln::load::session(program, Arc::new(store), f.load))?;
    Ok((Generator::from_session(session, &dir)?, dir))
}

/// What loading the artifact at `model` will do: on cpu, map its prepared weight file
/// (checked as a load checks it, checksums included) or pack weights from the checkpoint, and
/// why; on cuda, [`kiln_runtime::cuda::plan::load_plan_for`] (the prepared file or the
/// checkpoint, upload, CUBINs, NVRTC).
pub(super) fn load_plan(model: &Path, prog: &Program, p: &ProfileArgs) -> String {
    use kiln_runtime::cpu::prepared;
    let pp = prepared::path_for(model);
    let ordinary = format!("from the checkpoint {}: {}", prog.source, prepared::plan(prog));
    #[cfg(feature = "cuda")]
    if prog.backend == "cuda" {
        // Without a prepared file, the checkpoint is opened (its headers read) only to say
        // which weights convert.
        return kiln_runtime::cuda::plan::load_plan_for(model, prog, !p.no_prepared);
    }
    if prog.backend != "cpu" {
        return ordinary;
    }
    if p.no_prepared || !pp.is_file() {
        return format!("{ordinary} (no prepared weight file {})", pp.display());
    }
    match prepared::PreparedFile::open(&pp, prog, true) {
        Ok(f) => {
            let (bytes, packed, raw) = f.summary();
            format!(
                "prepared {}: map {bytes} bytes ({packed} packed matrices, {raw} weights as stored); pack none, compile none",
                pp.display()
            )
        }
        Err(e) => format!("a load fails: {e}"),
    }
}
