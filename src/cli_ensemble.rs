//! The CLI of model selection and ensembles: `kiln rank`, `kiln ensemble select` and
//! `kiln compile --ensemble` (see `kiln::rank` and `kiln::ensemble`).

use super::*;
use std::io::IsTerminal;

/// `kiln rank`'s arguments.
#[derive(clap::Args)]
#[command(after_help = RANK_HELP)]
pub(super) struct RankArgs {
    /// Model folders (SigLIP towers, big_vision ViT, V-MoE, ...): `DIR`, or `DIR@RES` to run
    /// that model at RES x RES.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// A labelled image folder: one subfolder per class, at least two images in each.
    #[arg(long)]
    data: PathBuf,
    /// Neighbours that vote.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// The output used as the embedding (default: pooler_output, else pre_logits).
    #[arg(long)]
    output: Option<String>,
    /// Write each model's embeddings and the labels to DIR/<index>.safetensors.
    #[arg(long)]
    save_embeddings: Option<PathBuf>,
    #[command(flatten)]
    p: ProfileArgs,
}

const RANK_HELP: &str = "Each model is compiled once for --batch images (default 8) at its own resolution (or --resolution) and \
run over the folder in batches. Leave-one-out k-nearest-neighbour accuracy, cosine similarity, majority vote. Ties: \
neighbours are ordered by similarity, equal similarities by image order (classes sorted by name, files by name); among \
classes with equally many votes, the class of the nearest neighbour wins. Models that fail to compile or run are reported \
on stderr and in the JSON's `failed`, and skipped. Preprocessing: pixel_values models per preprocessor_config.json (SigLIP's \
defaults without one); big_vision models resize with Pillow's bilinear filter to the model's resolution, then map to [-1, 1].";

#[derive(Subcommand)]
pub(super) enum EnsembleCmd {
    /// Greedy ensemble selection with replacement (Caruana et al. 2004, as "Deep Ensembles for
    /// Low-Data Transfer Learning" uses it): each step adds the candidate that gives the lowest
    /// validation cross-entropy of the averaged softmax probabilities; equal losses: the
    /// candidate given first wins. Prints each step's loss and the members' weights
    /// (times chosen / size); `--json` for `kiln compile --ensemble --weights-from`.
    Select {
        /// Validation logits per candidate: safetensors holding `logits [N, C]` (as `kiln run`
        /// writes it) or one tensor.
        #[arg(long, num_args = 1.., required_unless_present = "models", conflicts_with = "models", requires = "labels")]
        logits: Vec<PathBuf>,
        /// `labels [N]` (integers in 0..C), or the file's one tensor.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Or candidate model folders (`DIR` or `DIR@RES`), run over --data for their `logits`.
        #[arg(long, num_args = 1.., requires = "data")]
        models: Vec<String>,
        /// With --models: a labelled folder read as `kiln rank` reads it (class i, in sorted
        /// subfolder order, must be the models' logit i).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Ensemble size: steps of the selection (default: the number of candidates).
        #[arg(long)]
        size: Option<usize>,
        /// Print one JSON object (for `kiln compile --ensemble --weights-from`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        p: ProfileArgs,
    },
}

/// `kiln rank`.
pub(super) fn rank(a: RankArgs) -> Result<()> {
    let compile = profile(&a.p, Some(8), None)?;
    let o = kiln::rank::RankOptions {
        k: a.k,
        output: a.output,
        batch: compile.profile.batch,
        compile,
        progress: std::io::stderr().is_terminal(),
        save_embeddings: a.save_embeddings,
    };
    let r = kiln::rank::rank(&a.models, &a.data, &o)?;
    if a.json {
        println!("{}", kiln::rank::to_json(&r, &a.data, a.k));
    } else {
        println!("{} images in {} classes, leave-one-out {}-NN accuracy (cosine):", r.images, r.classes, a.k);
        println!("{:>4}  {:>8}  {:>9}  {:>9}  {:<14} model", "rank", "accuracy", "images/s", "compile s", "embedding");
        for (i, m) in r.ranked.iter().enumerate() {
            println!(
                "{:>4}  {:>8.4}  {:>9.1}  {:>9.2}  {:<14} {}",
                i + 1,
                m.accuracy,
                r.images as f64 / m.emb.embed_s.max(1e-9),
                m.emb.compile_s,
                format!("{} [{}]", m.emb.output, m.emb.dim),
                m.model.display()
            );
        }
        for (m, e) in &r.failed {
            println!("   -  failed: {}: {e}", m.display());
        }
    }
    if r.ranked.is_empty() {
        return Err(Error::Usage(format!("no model could be ranked ({} failed)", r.failed.len())));
    }
    Ok(())
}

/// `kiln ensemble ...`.
pub(super) fn ensemble(cmd: EnsembleCmd) -> Result<()> {
    let EnsembleCmd::Select { logits, labels, models, data, size, json, p } = cmd;
    let (cands, y) = match (labels, data) {
        (Some(labels), _) => {
            let cands = logits.iter().map(|p| kiln::ensemble::read_logits(p)).collect::<Result<Vec<_>>>()?;
            (cands, kiln::ensemble::read_labels(&labels)?)
        }
        (None, Some(data)) => {
            let compile = profile(&p, Some(8), None)?;
            let o = kiln::rank::RankOptions {
                k: 1,
                output: None,
                batch: compile.profile.batch,
                compile,
                progress: false,
                save_embeddings: None,
            };
            progress("running the candidates", || kiln::ensemble::folder_logits(&models, &data, &o))?
        }
        (None, None) => return Err(Error::Usage("ensemble select needs --logits and --labels, or --models and --data".into())),
    };
    let size = size.unwrap_or(cands.len());
    let sel = kiln::ensemble::select(&cands, &y, size)?;
    let w = sel.weights();
    if json {
        let steps: Vec<serde_json::Value> = sel
            .steps
            .iter()
            .enumerate()
            .map(|(t, s)| serde_json::json!({"step": t + 1, "chosen": s.chosen, "name": cands[s.chosen].name, "loss": s.loss}))
            .collect();
        let names: Vec<&str> = cands.iter().map(|c| c.name.as_str()).collect();
        println!(
            "{}",
            serde_json::json!({"candidates": names, "size": size, "steps": steps, "counts": sel.counts, "weights": w,
                "tie_rule": kiln::ensemble::SELECT_TIE_RULE})
        );
        return Ok(());
    }
    println!("greedy selection with replacement over {} candidates, {} examples, {} classes:", cands.len(), y.len(), cands[0].c);
    for (t, s) in sel.steps.iter().enumerate() {
        println!("  step {:>3}: + [{}] {}  loss {:.6}", t + 1, s.chosen, cands[s.chosen].name, s.loss);
    }
    println!("members (weight = times chosen / {size}):");
    for (i, c) in cands.iter().enumerate().filter(|(i, _)| sel.counts[*i] > 0) {
        println!("  [{i}] {}  x{}  weight {:.4}", c.name, sel.counts[i], w[i]);
    }
    Ok(())
}

/// `kiln compile`: a folder, a generation program, or `--ensemble`.
pub(super) fn compile_cmd(
    model: Option<PathBuf>,
    (ensemble, weights_from): (Vec<String>, Option<PathBuf>),
    p: &ProfileArgs,
    out: &Path,
    (generate, max_new_tokens): (bool, Option<usize>),
) -> Result<()> {
    // Checked before compiling: an existing folder as -o is refused (name the file inside it).
    writable(out)?;
    match model {
        Some(m) if generate => commands::compile_generation(&m, p, max_new_tokens, out),
        Some(m) => compile_forward(&m, p, out),
        None => compile_ensemble(&ensemble, weights_from.as_deref(), p, out),
    }
}

/// `kiln compile --ensemble a b ... -o ens.kiln`.
fn compile_ensemble(specs: &[String], weights_from: Option<&Path>, p: &ProfileArgs, out: &Path) -> Result<()> {
    writable(out)?;
    let mut members = specs.iter().enumerate().map(|(i, s)| kiln::ensemble::parse_member(s, i)).collect::<Result<Vec<_>>>()?;
    if let Some(wf) = weights_from {
        for (m, w) in members.iter_mut().zip(kiln::ensemble::weights_from(wf, specs.len())?) {
            m.weight = w;
        }
        for m in members.iter().filter(|m| m.weight == 0.0) {
            println!("member {} ({}) has weight 0: left out", m.index, m.dir.display());
        }
    }
    let opts = profile(p, None, None)?;
    let t = Instant::now();
    #[allow(unused_mut)]
    let mut c = progress("compiling", || kiln::ensemble::compile(&members, &opts))?;
    let secs = t.elapsed().as_secs_f64();
    if c.program.backend == "cuda" {
        #[cfg(feature = "cuda")]
        println!("{}", kiln::cuda_tools::attach_tuning(&mut c.program, p.tuning.as_deref())?);
        #[cfg(feature = "cuda")]
        progress("compiling CUDA kernels", || kiln::cuda_tools::attach_binaries(&mut c.program, &p.arch))?;
        println!("{} CUBINs for {} stored", c.program.binaries.len(), p.arch);
    }
    super::commands::save_with_prepared(out, &c.program, p)?;
    println!("{}", c.program.model);
    println!(
        "compiled in {secs:.3} s: {} weights from {} members -> {}",
        c.program.weights.len(),
        c.program.weight_sets.len(),
        out.display()
    );
    for e in &c.program.entries {
        let outs: Vec<String> = e.outputs.iter().map(|io| format!("{} {}", io.name, io.operand.ty)).collect();
        println!(
            "  entry {}: {} steps, one arena {} (lower bound {})",
            e.name,
            e.steps.len(),
            human(e.arena_bytes),
            human(e.plan.lower_bound)
        );
        println!("    out: {}", outs.join(", "));
    }
    for s in &c.program.weight_sets {
        println!("  weights {}* <- {}", s.prefix, s.path);
    }
    Ok(())
}
