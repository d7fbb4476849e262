//! The cuda profile of the prepared weight file: every weight exactly as a cuda load uploads
//! it (the program's dtype, each `~stack(..)` of sibling projections concatenated, each
//! permuted or rounded view materialised), so a load maps the file and uploads from the
//! mapping with no conversion. [`upload_bytes`] is the one host function that says what the
//! upload sends for a weight, from the checkpoint or from the mapping; the writer and the
//! upload (`cuda::upload`, which needs a GPU) both call it, so the two cannot drift apart.

use super::{PreparedFile, Record, Written};
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use kiln_graph::program::Program;
use std::borrow::Cow;
use std::path::Path;

/// The profile string of a cuda prepared file: names the layout, so a cpu file is refused by
/// a cuda load (and a cuda file by a cpu load) by name.
pub const PROFILE: &str = "backend cuda; upload layout 1: each weight in the program's dtype, stacks concatenated, views materialised";

/// The bytes a cuda load uploads for weight `i` of `program`: from a prepared file (the
/// store holds one) as stored; else from the checkpoint, converted where its dtype differs
/// from the program's (a stack of parts is concatenated by the store).
pub fn upload_bytes<'a>(program: &Program, store: &'a WeightStore, i: usize) -> Result<Cow<'a, [u8]>> {
    let spec = program
        .weights
        .get(i)
        .ok_or_else(|| RuntimeError::Weight { name: format!("#{i}"), msg: format!("the program has {} weights", program.weights.len()) })?;
    if let Some(file) = store.prepared() {
        let b = file.raw(i as u32).ok_or_else(|| super::refused(&file.path, format!("it holds no copy of weight '{}'", spec.name)))?;
        return Ok(Cow::Borrowed(b));
    }
    let (ty, bytes) = store.get(&spec.name, &spec.ty)?;
    Ok(if ty.dtype == spec.ty.dtype { Cow::Borrowed(bytes) } else { Cow::Owned(crate::tensor::convert(ty.dtype, spec.ty.dtype, bytes)) })
}

/// A cuda file holds each weight once, raw, in the program's dtype.
pub(super) fn check_records(program: &Program, records: &[Record]) -> std::result::Result<(), String> {
    let mut seen = vec![false; program.weights.len()];
    for r in records {
        let name = &program.weights[r.weight as usize].name;
        if r.packed || r.bf16 {
            return Err(format!("weight '{name}' is stored packed or as bf16 bits, which the cuda layout never holds"));
        }
        if std::mem::replace(&mut seen[r.weight as usize], true) {
            return Err(format!("weight '{name}' is stored twice"));
        }
    }
    match seen.iter().position(|s| !s) {
        Some(i) => Err(format!("it holds no copy of weight '{}'", program.weights[i].name)),
        None => Ok(()),
    }
}

/// Writes the cuda prepared file of `program` from the checkpoint in `weights` to `out`: each
/// weight's [`upload_bytes`], in the program's weight order.
pub fn write(program: &Program, weights: &WeightStore, out: &Path) -> Result<Written> {
    if program.backend != "cuda" {
        return Err(RuntimeError::Unsupported {
            backend: program.backend.clone(),
            msg: "the cuda profile of a prepared weight file is for cuda programs".into(),
        });
    }
    if weights.prepared().is_some() {
        return Err(RuntimeError::Unsupported { backend: "cuda".into(), msg: "a prepared file is written from a checkpoint".into() });
    }
    let records = program.weights.iter().enumerate().map(|(i, w)| Record::raw(i as u32, false, w.ty.bytes() as u64)).collect();
    super::write_file(program, weights, out, records, &|j| upload_bytes(program, weights, j))
}

/// What a cuda load of `program` does with its weights from the checkpoint: map it, convert
/// the weights whose stored dtype differs (`store`, when the checkpoint could be opened) and
/// upload.
pub fn plan(program: &Program, store: Option<&WeightStore>) -> String {
    let bytes: usize = program.weights.iter().map(|w| w.ty.bytes()).sum();
    let converted =
        store.map(|s| program.weights.iter().filter(|w| s.resolve(&w.name).is_some_and(|r| r.ty.dtype != w.ty.dtype)).count().to_string());
    format!(
        "map the checkpoint {}, upload {bytes} bytes ({} of {} weights converted on the host)",
        program.source,
        converted.as_deref().unwrap_or("unknown (checkpoint not readable here):"),
        program.weights.len()
    )
}

/// What a cuda load does with its weights: one line, and the prepared file it maps (its path
/// and bytes) when it maps one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsPlan {
    /// What the load does, in words.
    pub line: String,
    /// The prepared file mapped and uploaded as stored, and its bytes.
    pub mapped: Option<(String, u64)>,
}

/// What a cuda load of the artifact at `artifact` does with its weights: map its prepared file
/// (checked as a load checks it, checksums included) and upload with no conversion, or the
/// checkpoint's [`plan`] and why.
pub fn weights_plan(artifact: &Path, program: &Program, use_prepared: bool) -> WeightsPlan {
    let pp = super::path_for(artifact);
    if !use_prepared || !pp.is_file() {
        let store = WeightStore::for_program(program, None).ok();
        let why = if use_prepared { "no prepared weight file" } else { "--no-prepared: not using" };
        return WeightsPlan { line: format!("{} ({why} {})", plan(program, store.as_ref()), pp.display()), mapped: None };
    }
    match PreparedFile::open(&pp, program, true) {
        Ok(f) => {
            let (file, bytes) = (pp.display().to_string(), f.summary().0);
            WeightsPlan { line: format!("map the prepared file {file}, upload {bytes} bytes, convert none"), mapped: Some((file, bytes)) }
        }
        Err(e) => WeightsPlan { line: format!("a load fails: {e}"), mapped: None },
    }
}
