//! Ensembles of pretrained classifiers, as "Deep Ensembles for Low-Data Transfer Learning"
//! (Mustafa et al., arXiv 2010.06866; the seed paper "Transfer learning with pre-trained
//! ensembles") builds them: greedy selection with replacement by the validation cross-entropy
//! of the averaged softmax probabilities (Caruana et al., "Ensemble selection from libraries of
//! models", ICML 2004), and the chosen members compiled into one program
//! ([`kiln_models::ensemble`]).

use crate::{CompileOptions, Compiled, Error, Result};
use kiln_graph::DType;
use kiln_models::ensemble::Member;
use std::path::{Path, PathBuf};

/// How `select` breaks a tie between candidates whose addition gives the same loss.
pub const SELECT_TIE_RULE: &str = "equal losses: the candidate given first wins";

/// One candidate's validation logits `[N, C]`.
#[derive(Clone, Debug)]
pub struct Logits {
    pub name: String,
    pub n: usize,
    pub c: usize,
    pub values: Vec<f64>,
}

/// One step of the greedy selection.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectStep {
    /// The candidate added (index into the candidate list).
    pub chosen: usize,
    /// The ensemble's validation cross-entropy after adding it (nats per example).
    pub loss: f64,
}

/// The result of [`select`]: each step, and how many times each candidate was chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub steps: Vec<SelectStep>,
    pub counts: Vec<usize>,
}

impl Selection {
    /// Each candidate's weight: times chosen / ensemble size.
    pub fn weights(&self) -> Vec<f64> {
        let n = self.steps.len().max(1) as f64;
        self.counts.iter().map(|&c| c as f64 / n).collect()
    }
}

/// Greedy ensemble selection with replacement: starting from no member, `size` times add the
/// candidate whose addition gives the lowest cross-entropy `-mean_i log pbar[i, y_i]` of the
/// ensemble's probabilities `pbar = sum_m count_m softmax(logits_m) / sum_m count_m`; ties go
/// to the candidate given first ([`SELECT_TIE_RULE`]). In f64: the chosen members' label
/// probabilities are kept as a running sum to which each candidate's is added, so two
/// candidates with equal logits always tie exactly; a probability below `f64::MIN_POSITIVE`
/// counts as that (a finite loss).
pub fn select(cands: &[Logits], labels: &[i64], size: usize) -> Result<Selection> {
    check_candidates(cands, labels)?;
    if size == 0 {
        return Err(Error::Usage("--size must be at least 1".into()));
    }
    // Each candidate's probability of each example's label.
    let p: Vec<Vec<f64>> = cands.iter().map(|c| label_log_probs(c, labels).into_iter().map(f64::exp).collect()).collect();
    let n = labels.len();
    let mut sum = vec![0f64; n];
    let mut counts = vec![0usize; cands.len()];
    let mut steps = Vec::with_capacity(size);
    for t in 0..size {
        let members = (t + 1) as f64;
        let mut best: Option<(usize, f64)> = None;
        for (j, pj) in p.iter().enumerate() {
            let total: f64 = sum.iter().zip(pj).map(|(s, q)| ((s + q) / members).max(f64::MIN_POSITIVE).ln()).sum();
            let loss = -total / n as f64;
            if best.is_none_or(|(_, b)| loss < b) {
                best = Some((j, loss));
            }
        }
        let Some((chosen, loss)) = best else { break };
        counts[chosen] += 1;
        for (s, q) in sum.iter_mut().zip(&p[chosen]) {
            *s += q;
        }
        steps.push(SelectStep { chosen, loss });
    }
    Ok(Selection { steps, counts })
}

fn log_sum_exp(row: &[f64]) -> f64 {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|t| (t - m).exp()).sum::<f64>().ln()
}

/// `log softmax(logits)[i, y_i]` for every example.
fn label_log_probs(c: &Logits, labels: &[i64]) -> Vec<f64> {
    labels
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            let row = &c.values[i * c.c..(i + 1) * c.c];
            row[y as usize] - log_sum_exp(row)
        })
        .collect()
}

fn check_candidates(cands: &[Logits], labels: &[i64]) -> Result<()> {
    let first = cands.first().ok_or_else(|| Error::Usage("ensemble select needs at least one --logits file".into()))?;
    if labels.is_empty() {
        return Err(Error::Usage("the labels are empty: selection needs validation examples".into()));
    }
    for c in cands {
        if (c.n, c.c) != (first.n, first.c) {
            return Err(Error::Usage(format!(
                "{}: logits are [{}, {}], {} has [{}, {}]: every candidate must score the same examples and classes",
                c.name, c.n, c.c, first.name, first.n, first.c
            )));
        }
        if let Some(i) = c.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Usage(format!("{}: logit {} (example {}) is {}", c.name, i, i / c.c.max(1), c.values[i])));
        }
    }
    if labels.len() != first.n {
        return Err(Error::Usage(format!("{} labels for {} examples of logits ({})", labels.len(), first.n, first.name)));
    }
    if let Some((i, y)) = labels.iter().enumerate().find(|(_, &y)| y < 0 || y as usize >= first.c) {
        return Err(Error::Usage(format!(
            "label {y} of example {i} is out of range: the logits have {} classes (0..{})",
            first.c, first.c
        )));
    }
    Ok(())
}

/// The one tensor of a safetensors file named `name`, or its only tensor.
fn one_tensor(path: &Path, name: &str) -> Result<kiln_runtime::Tensor> {
    let mut ts = crate::io::read(path)?;
    let bad = |msg: String| Error::File { path: path.into(), msg };
    match ts.iter().position(|(n, _)| n == name) {
        Some(i) => Ok(ts.swap_remove(i).1),
        None if ts.len() == 1 => Ok(ts.remove(0).1),
        None => {
            let names: Vec<&str> = ts.iter().map(|(n, _)| n.as_str()).collect();
            Err(bad(format!("no tensor '{name}' (and not exactly one tensor: {})", names.join(", "))))
        }
    }
}

/// Reads validation logits `[N, C]`: the tensor `logits` (as `kiln run` writes it) or the
/// file's only tensor.
pub fn read_logits(path: &Path) -> Result<Logits> {
    let t = one_tensor(path, "logits")?;
    let [n, c] = t.ty.shape[..] else {
        return Err(Error::File { path: path.into(), msg: format!("logits are {}, expected [examples, classes]", t.ty) });
    };
    if !t.ty.dtype.is_float() || n == 0 || c == 0 {
        return Err(Error::File { path: path.into(), msg: format!("logits are {}, expected a non-empty float [examples, classes]", t.ty) });
    }
    Ok(Logits { name: path.display().to_string(), n, c, values: t.to_f64() })
}

/// Reads labels `[N]`: the integer tensor `labels` or the file's only tensor.
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    let t = one_tensor(path, "labels")?;
    if t.ty.rank() != 1 || !matches!(t.ty.dtype, DType::I64 | DType::I32 | DType::U8) {
        return Err(Error::File { path: path.into(), msg: format!("labels are {}, expected an integer vector [examples]", t.ty) });
    }
    Ok(t.to_f64().into_iter().map(|y| y as i64).collect())
}

/// A member given as `DIR` or `DIR@RES` (the member's square resolution); a folder whose
/// name holds `@` is taken as is.
pub fn parse_member(spec: &str, index: usize) -> Result<Member> {
    let plain = Member { dir: PathBuf::from(spec), image_hw: None, weight: 1.0, index };
    if Path::new(spec).exists() {
        return Ok(plain);
    }
    let Some((dir, res)) = spec.rsplit_once('@') else { return Ok(plain) };
    let r: usize = res.parse().map_err(|_| Error::Usage(format!("{spec}: '{res}' after @ is not a resolution")))?;
    if r == 0 {
        return Err(Error::Usage(format!("{spec}: the resolution must be at least 1")));
    }
    Ok(Member { dir: PathBuf::from(dir), image_hw: Some((r, r)), weight: 1.0, index })
}

/// Member weights from a selection file (`kiln ensemble select --json`): its `weights`, one per
/// candidate, which must be as many as the members.
pub fn weights_from(path: &Path, members: usize) -> Result<Vec<f64>> {
    let bad = |msg: String| Error::File { path: path.into(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let w = v
        .get("weights")
        .and_then(|w| w.as_array())
        .ok_or_else(|| bad("no 'weights' list (write it with kiln ensemble select --json)".into()))?;
    let w: Vec<f64> = w.iter().map(|x| x.as_f64().ok_or_else(|| bad(format!("weight {x} is not a number")))).collect::<Result<_>>()?;
    if w.len() != members {
        return Err(bad(format!("{} weights (one per candidate of the selection) for {members} ensemble members", w.len())));
    }
    Ok(w)
}

/// Compiles `members` into one program whose `forward` returns `probs` and each member's
/// `logits_<i>`, reading every member's weights as one weight set (names prefixed `m<i>/`).
/// Members of weight 0 are left out.
pub fn compile(members: &[Member], opts: &CompileOptions) -> Result<Compiled> {
    let kept: Vec<Member> = members.iter().filter(|m| m.weight != 0.0).cloned().collect();
    let e = kiln_models::ensemble::build(&kept, &opts.profile)?;
    let mut c = crate::compile_graph(&[("forward".to_string(), e.graph)], &e.description, "", opts)?;
    c.program.weight_sets =
        e.weight_sets.into_iter().map(|(prefix, dir)| kiln_graph::program::WeightSet { prefix, path: dir.display().to_string() }).collect();
    Ok(c)
}

/// Validation logits from models instead of files: each model (`DIR` or `DIR@RES`) run over a
/// labelled folder as `kiln rank` reads and preprocesses it ([`crate::rank`]), its `logits`
/// output kept; the labels are the folder's (class `i` is the `i`-th subfolder in sorted order,
/// which must be the models' logit `i`). A model that fails is an error naming it: selection
/// needs every candidate.
pub fn folder_logits(models: &[String], data: &Path, o: &crate::rank::RankOptions) -> Result<(Vec<Logits>, Vec<i64>)> {
    let ds = crate::rank::scan(data)?;
    let images: Vec<_> = ds.images.iter().map(|(p, _)| crate::preprocess::load_image(p, true)).collect::<Result<_>>()?;
    let o = crate::rank::RankOptions { output: Some("logits".into()), ..o.clone() };
    let mut out = Vec::with_capacity(models.len());
    for (i, spec) in models.iter().enumerate() {
        let m = parse_member(spec, i)?;
        let bar = indicatif::ProgressBar::hidden();
        let e =
            crate::rank::embed(&m.dir, m.image_hw, &images, &o, &bar).map_err(|e| Error::Usage(format!("candidate {i} ({spec}): {e}")))?;
        let values = e.values.iter().map(|&v| v as f64).collect();
        out.push(Logits { name: spec.clone(), n: images.len(), c: e.dim, values });
    }
    Ok((out, ds.labels().into_iter().map(|l| l as i64).collect()))
}
