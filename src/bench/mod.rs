//! `kiln bench kernels`: each kernel a program uses (or one kernel on given shapes) timed
//! step by step, its FLOPs and bytes counted from shapes, and its place under the machine's
//! roofline, whose ceilings are measured in the same run.

pub mod kernels;
pub mod roofline;
pub mod single;
pub mod svg;

pub use single::shape_label;

use crate::{Error, Result};
use kiln_graph::program::Entry;
use kiln_runtime::{Session, Tensor};
use std::path::PathBuf;

/// What `kiln bench kernels` was asked for.
#[derive(Clone, Debug)]
pub struct KernelsOptions {
    /// The entry of a model's program to time (default: its first, `forward`).
    pub entry: Option<String>,
    pub runs: kernels::Runs,
    /// Split rows by shape as well as by kernel.
    pub by_shape: bool,
    pub json: bool,
    /// Where to write the roofline SVG.
    pub plot: Option<PathBuf>,
    pub ceilings: roofline::CeilingOptions,
    /// Single-kernel mode: the kernel and its shapes (its default shape when empty); with no
    /// kernel and no model, every kind at its default shape.
    pub kernel: Option<String>,
    pub shapes: Vec<String>,
    pub backend: String,
}

/// Measures for `kiln bench kernels`: `model`'s program when given, else one-op programs.
pub fn kernels_command(o: &KernelsOptions, model: Option<Session>) -> Result<kernels::Report> {
    if model.is_some() && (o.kernel.is_some() || !o.shapes.is_empty()) {
        return Err(Error::Usage("give --model or --kernel/--shape, not both".into()));
    }
    if o.kernel.is_none() && !o.shapes.is_empty() {
        return Err(Error::Usage("--shape needs --kernel".into()));
    }
    // Ceilings before and after the kernels, the better of each kept: the device's where the
    // backend has one (measured through it), else the host's.
    let backend = model.as_ref().map_or(o.backend.clone(), |s| s.program().backend.clone());
    let measure = || -> Result<roofline::Ceilings> {
        Ok(match roofline::Ceilings::measure_device(&backend, &o.ceilings)? {
            Some(c) => c,
            None => roofline::Ceilings::measure(&o.ceilings),
        })
    };
    let ceilings = measure()?;
    let mut report = match model {
        Some(mut s) => kernels::measure(&mut s, o.entry.as_deref(), o.runs, o.by_shape, ceilings)?,
        None => {
            let jobs: Vec<(String, String)> = match &o.kernel {
                Some(k) if o.shapes.is_empty() => {
                    let kind = single::KINDS.iter().find(|x| x.name == k.as_str());
                    vec![(k.clone(), kind.map_or("", |x| x.default_shape).to_string())]
                }
                Some(k) => o.shapes.iter().map(|s| (k.clone(), s.clone())).collect(),
                None => single::KINDS.iter().map(|k| (k.name.to_string(), k.default_shape.to_string())).collect(),
            };
            let mut all: Option<kernels::Report> = None;
            for (k, shape) in &jobs {
                let mut s = single::session(k, shape, &o.backend)?;
                let mut r = kernels::measure(&mut s, None, o.runs, true, ceilings.clone())?;
                // The one-op graph's only step of interest; a gemm's input copy is not a step.
                r.rows.retain(|row| row.kernel == *k);
                match &mut all {
                    Some(a) => kernels::merge(a, r),
                    None => all = Some(r),
                }
            }
            all.ok_or_else(|| Error::Usage("nothing to measure".into()))?
        }
    };
    report.ceilings = report.ceilings.clone().best(measure()?);
    Ok(report)
}

/// Prints a report as a table or JSON and writes its plot when asked.
pub fn emit(o: &KernelsOptions, report: &kernels::Report) -> Result<()> {
    if o.json {
        println!("{}", kernels::json(report));
    } else {
        print!("{}", kernels::table(report));
    }
    if let Some(p) = &o.plot {
        std::fs::write(p, svg::roofline(report)).map_err(|e| Error::File { path: p.clone(), msg: e.to_string() })?;
        if !o.json {
            println!("roofline plot: {}", p.display());
        }
    }
    Ok(())
}

/// Median of `v` (sorted in place); 0 for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Deterministic inputs for an entry. Floats lie in [-1, 1] (what pixel inputs look like);
/// integers are valid for what their name says: token ids small enough for any vocabulary of
/// 100 or more, an attention mask of ones, positions counting along the last axis, token
/// types 0 (the prefix), a cache position 0, greedy selection (`sampling` [0, 1],
/// `sampling_counters` zeros).
pub fn synthetic_inputs(e: &Entry) -> Vec<(String, Tensor)> {
    e.inputs
        .iter()
        .map(|io| {
            let ty = io.operand.ty.clone();
            let last = ty.shape.last().copied().unwrap_or(1).max(1);
            let vals: Vec<f64> = (0..ty.numel())
                .map(|i| match (ty.dtype.is_float(), io.name.as_str()) {
                    // A generation entry's selection step: greedy (temperature 0, top-p 1).
                    (true, "sampling") => i as f64,
                    (false, "sampling_counters") => 0.0,
                    (true, _) => (i as f64 * 0.618_033_988_7).fract() * 2.0 - 1.0,
                    (false, n) if n.contains("mask") => 1.0,
                    (false, n) if n.contains("position") && n != "cache_position" => (i % last) as f64,
                    (false, "token_type_ids" | "cache_position") => 0.0,
                    (false, _) => ((i * 31) % 97 + 2) as f64,
                })
                .collect();
            (io.name.clone(), Tensor { bytes: kiln_runtime::tensor::from_f64(ty.dtype, &vals), ty })
        })
        .collect()
}
