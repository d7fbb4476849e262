//! The `kiln` command line: compile, run, inspect, bench and synth.

use clap::{Parser, Subcommand};
use kiln::inputs::{backend_for, cast_floats, parse_dtype, text_defaults, text_inputs};
use kiln::{compile, io, CompileOptions, Compiled, Error, Result};
use kiln_graph::program::Program;
use kiln_graph::DType;
use kiln_models::{MoeOptions, MoeOutputs, Profile};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

mod artifact_cli;
mod cli_decode;
mod cli_ensemble;
mod cli_generate;
use cli_decode::BeamArgs;
mod commands;
use commands::{
    bench, bench_kernels, compile_forward, generate_big_vision_paligemma, generate_encdec, generate_text_inputs, generate_uvim, inspect,
    kernels_check, run, writable, writable_unlike,
};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Ahead-of-time compiler and static runtime for the big_vision model family")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The cuda load options (`kiln::load::LoadOptions`): `run`, `bench`, `inspect`, `generate`.
#[derive(clap::Args, Clone)]
struct CudaLoadArgs {
    /// cuda load option: kiln's GEMV for small-M GEMMs (decode) `on`, `off` (cuBLASLt
    /// everywhere) or `auto` (whichever measures faster at load); a gated matmul (an MLP's
    /// gate and up) always runs its GLU GEMV.
    #[arg(long, default_value = "auto")]
    cuda_gemv: String,
    /// cuda load option: `on` runs steps together where the loaded modules allow (two launches
    /// of one kernel as one, split decode attention as one launch that also stores the new K/V
    /// rows, the next token with its log-probability); `off` runs each as its own launches
    /// (for timing the difference on one card).
    #[arg(long, default_value = "on")]
    cuda_fuse: String,
    /// cuda load option: `on` launches kiln's kernels with programmatic dependent launch (each
    /// may start while the one before it finishes, and waits on the device before it reads
    /// that one's output; the GEMVs prefetch their weights first); `off` launches them one
    /// after another. cuBLASLt's GEMMs launch as they do without it.
    #[arg(long, default_value = "off")]
    cuda_pdl: String,
}

impl CudaLoadArgs {
    fn options(&self) -> kiln::load::LoadOptions {
        kiln::load::LoadOptions { cuda_gemv: self.cuda_gemv.clone(), cuda_fuse: self.cuda_fuse.clone(), cuda_pdl: self.cuda_pdl.clone() }
    }
}

/// Options that fix a compile profile.
#[derive(clap::Args, Clone)]
struct ProfileArgs {
    /// Image size, N (square) or HxW (e.g. 192x256); defaults to the checkpoint's.
    #[arg(long, value_parser = kiln::inputs::parse_resolution)]
    resolution: Option<kiln::inputs::Resolution>,
    /// Batch size.
    #[arg(long)]
    batch: Option<usize>,
    /// Compute dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Backend: cpu, cube (CubeCL kernels; see --device) or cuda (builds with the `cuda`
    /// feature; NVIDIA GPUs).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// V-MoE capacity ratio C (overrides the config's capacity_factor).
    #[arg(long)]
    moe_capacity: Option<f64>,
    /// V-MoE batch-prioritized routing, true or false (overrides the config's batch_priority).
    #[arg(long)]
    moe_bpr: Option<bool>,
    /// Token length of a text model's `forward` (run takes it from input_ids); with
    /// `compile --generate`, the prompt bucket of `prefill`.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Device of the cube backend: wgpu (Vulkan, Metal; lavapipe on a CPU) or cuda.
    #[arg(long)]
    device: Option<String>,
    /// GPU architecture of `--backend cuda` (CUBINs stored by `kiln compile`).
    #[arg(long, default_value = "sm_90a")]
    arch: String,
    #[command(flatten)]
    load: CudaLoadArgs,
    /// cuda compile option: the tuning table (JSON of kernel choices measured per card; see
    /// tuning/README.md) stored in the artifact, or `none`; defaults to the built-in one.
    #[arg(long, value_name = "FILE")]
    tuning: Option<PathBuf>,
    /// cpu and cuda backends: `compile` writes no prepared weight file (`<artifact>.weights`:
    /// every weight as the backend reads it, mapped at load: cpu, packed for the kernels; cuda,
    /// as the upload sends it, no conversion); `run`, `bench`, `inspect` ignore one.
    #[arg(long)]
    no_prepared: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile a model folder into an artifact (or, with --ensemble, several classifiers into one).
    Compile {
        /// The model folder (config.json and weights).
        #[arg(required_unless_present = "ensemble", conflicts_with = "ensemble")]
        model: Option<PathBuf>,
        /// Classifier folders (`DIR` or `DIR@RES`): `forward` gives `probs` (weighted mean softmax) and
        /// `logits_<i>`; inputs resized in the program (bilinear, align_corners=False, no antialias).
        #[arg(long, num_args = 1.., conflicts_with = "generate")]
        ensemble: Vec<String>,
        /// With --ensemble: member weights from `kiln ensemble select --json` (default: equal).
        #[arg(long, requires = "ensemble")]
        weights_from: Option<PathBuf>,
        #[command(flatten)]
        p: ProfileArgs,
        /// The artifact to write (a file; an existing folder is refused).
        #[arg(short = 'o', long)]
        out: PathBuf,
        /// A text model's generation program instead of `forward`: entries `prefill` (a prompt
        /// bucket of --seq-len tokens) and `decode`, over a KV cache kept as persistent state.
        #[arg(long)]
        generate: bool,
        /// With --generate: the most new tokens one generation makes (cache slots: the bucket
        /// plus this).
        #[arg(long, requires = "generate")]
        max_new_tokens: Option<usize>,
    },
    /// Run a model folder or an artifact on inputs from a safetensors file.
    Run {
        /// A model folder (compiled in memory for the inputs) or a `.kiln` artifact.
        model: PathBuf,
        /// The inputs, a safetensors file (tensors named as the model's inputs).
        #[arg(long)]
        inputs: PathBuf,
        /// Where the outputs go (safetensors); never the --inputs file.
        #[arg(long)]
        out: PathBuf,
        /// Weights for an artifact (default: the folder it was compiled from).
        #[arg(long)]
        weights: Option<PathBuf>,
        #[command(flatten)]
        p: ProfileArgs,
        /// The entry to run (`forward`; flows also have `inverse`).
        #[arg(long, default_value = "forward")]
        entry: String,
        /// Also print bits per dimension per image from a flow's `z` and `logdet` outputs
        /// (big_vision's Jet trainer formula, without dequantisation noise).
        #[arg(long)]
        bpd: bool,
        /// V-MoE: print how many tokens each expert took and how many were dropped, per MoE layer.
        #[arg(long)]
        moe_stats: bool,
    },
    /// Greedy generation with a Gemma or PaliGemma model. Either `--prompt` (and `--image` for
    /// PaliGemma): text in, the answer streamed out, `<loc>` boxes parsed and optionally drawn;
    /// or `--inputs` (input_ids, optional attention_mask with left padding, pixel_values) to
    /// `--out` (sequences [B, L + n] int64, logprobs [B, n]; step_logits [B, n, V] with
    /// --step-logits). The last kernel of each step chooses the tokens; the host reads ids.
    Generate(Box<cli_generate::GenerateArgs>),
    /// CUDA kernels: `kiln kernels check --arch sm_90a` compiles each with NVRTC and prints
    /// registers, shared memory and spills (fails on a compile error or a spill in a hot kernel).
    Kernels {
        #[command(subcommand)]
        sub: KernelsCmd,
    },
    /// Show the IR after each pass, the fusion groups, the schedule and the memory plan.
    Inspect {
        /// A model folder (compiled with the flags below) or a `.kiln` artifact.
        model: PathBuf,
        #[command(flatten)]
        p: ProfileArgs,
        /// Also print the IR after every pass (long for real models).
        #[arg(long)]
        ir: bool,
        /// Print only steps and kernel launches per entry, as JSON on stdout
        /// (`{"entries": {"decode": {"steps": N, "launches": M, ..}, ..}}`).
        #[arg(long)]
        json: bool,
    },
    /// Time a model: warm-up, then min / median / max over several runs
    /// (`kiln bench kernels --help`: per-kernel times against the machine's roofline).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Bench {
        #[command(subcommand)]
        sub: Option<BenchCmd>,
        /// A model folder (compiled in memory) or a `.kiln` artifact.
        #[arg(required = true)]
        model: Option<PathBuf>,
        #[command(flatten)]
        p: ProfileArgs,
        /// Timed runs (after one warm-up run).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Weights for an artifact (default: the folder it was compiled from).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Also split one run's time by kernel kind.
        #[arg(long)]
        breakdown: bool,
        /// The entry to time.
        #[arg(long, default_value = "forward")]
        entry: String,
    },
    /// Draw images from a flow: Gaussian z at a temperature, the `inverse` entry, a PNG grid.
    Sample {
        /// A Jet or JetFormer folder, or a flow's `.kiln` artifact.
        model: PathBuf,
        /// Seed of the Gaussian z.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of z (1 samples the model's prior).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Number of images (the grid is as square as it can be).
        #[arg(long, default_value_t = 4)]
        count: usize,
        /// Weights for an artifact (default: the folder it was compiled from).
        #[arg(long)]
        weights: Option<PathBuf>,
        #[command(flatten)]
        p: ProfileArgs,
        /// The PNG grid to write.
        #[arg(short = 'o', long)]
        out: PathBuf,
        /// JetFormer: the prompt, as text when the folder holds its SentencePiece model
        /// (sentencepiece.model: big_vision's c4_en), else token ids ("17,5,9"; the class id of
        /// a class-conditional model).
        #[arg(long)]
        prompt: Option<String>,
        /// JetFormer: classifier-free guidance weight (0: none).
        #[arg(long, default_value_t = 0.0)]
        cfg_weight: f64,
        /// JetFormer: multiplies the mixture logits (> 1 sharpens).
        #[arg(long, default_value_t = 1.0)]
        temperature_probs: f64,
    },
    /// Log-probabilities of given tokens, teacher-forced (`kiln::score`): a causal LM's
    /// `input_ids` (each token scored by the logits before it) or an encoder-decoder's `images`
    /// and `text`, from `prompt_len` on; writes `logprobs [B, L]` and `scores [B]`.
    Score {
        /// A model folder or a `.kiln` artifact.
        model: PathBuf,
        /// The inputs (safetensors): `input_ids` (and `prompt_len`), or `images` and `text`.
        #[arg(long)]
        inputs: PathBuf,
        /// Where `logprobs` and `scores` go (safetensors); never the --inputs file.
        #[arg(long)]
        out: PathBuf,
        /// Weights for an artifact (default: the folder it was compiled from).
        #[arg(long)]
        weights: Option<PathBuf>,
        #[command(flatten)]
        p: ProfileArgs,
    },
    /// Compare the tensors of two safetensors files (relative error per tensor); fails on a
    /// missing tensor, a shape mismatch, NaN on either side, or an error above --tol.
    Compare {
        /// The safetensors file under test.
        got: PathBuf,
        /// The reference safetensors file.
        want: PathBuf,
        /// Largest relative error accepted (max |a-b| / max |b|).
        #[arg(long, default_value_t = 1e-4)]
        tol: f64,
    },
    /// Rank models by the leave-one-out kNN accuracy of their embeddings on a labelled folder.
    Rank(Box<cli_ensemble::RankArgs>),
    /// Ensembles of classifiers: `kiln ensemble select` (greedy, by validation cross-entropy).
    Ensemble {
        #[command(subcommand)]
        sub: cli_ensemble::EnsembleCmd,
    },
    /// Write a full-size random-weight model folder (no downloads).
    Synth {
        /// The model to write (`kiln synth --list` names them).
        name: Option<String>,
        /// The folder to write the model into.
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// List the models it can make.
        #[arg(long)]
        list: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time each kernel a program uses (or one kernel on given shapes): median time, FLOPs and
    /// bytes counted from shapes, GB/s, GFLOP/s and the share of the roofline, whose ceilings
    /// (a large copy, a large GEMM) are measured in the same run.
    #[command(after_help = KERNEL_SHAPES)]
    Kernels(Box<KernelsArgs>),
}

const KERNEL_SHAPES: &str = "--shape syntax per kernel (without --model and --kernel, every kernel at its default shape):
  cpu.gemm             MxKxN    activations [M,K] times a PyTorch-layout weight [N,K] (default 256x1152x1152)
  cpu.gemm+epilogue    MxKxN    the same plus bias [N] and GELU-tanh fused in (default 256x1152x4304)
  cpu.flash_attention  BxSxHxD or BxSqxSkxHxD, no mask (default 1x256x16x72)
  cpu.layer_norm       RxD      rows x model width (default 256x1152)
  cpu.rms_norm         RxD      (default 256x2304)
  cpu.softmax          RxN      (default 4096x256)
  cpu.fused            AxBx..   gelu_tanh(x + y), one fused region (default 256x4304)
  cpu.permute          AxBxC    [A,B,C] -> [B,A,C] (default 256x16x72)
Examples:
  kiln bench kernels --model <folder | .kiln> --resolution 224 --plot roofline.svg
  kiln bench kernels --kernel cpu.gemm --shape 512x768x768 --shape 256x1152x4304";

/// Arguments of `kiln bench kernels`.
#[derive(clap::Args)]
struct KernelsArgs {
    /// A model folder or artifact: time every kernel its program uses.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    p: ProfileArgs,
    /// Weights for an artifact (default: the folder it was compiled from).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The entry of the model's program to time (default: its first, `forward`).
    #[arg(long)]
    entry: Option<String>,
    /// One kernel to time alone (see the shapes below).
    #[arg(long)]
    kernel: Option<String>,
    /// Shapes for --kernel (repeatable).
    #[arg(long)]
    shape: Vec<String>,
    /// Untimed runs first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed runs; each step's median is kept.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Split a model's rows by shape as well as by kernel.
    #[arg(long)]
    by_shape: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the roofline with each kernel on it as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Size of the bandwidth ceiling's copy, MiB.
    #[arg(long, default_value_t = 256)]
    copy_mib: usize,
    /// Size n of the compute ceiling's n x n x n GEMM.
    #[arg(long, default_value_t = 2048)]
    gemm_n: usize,
}

#[derive(Subcommand)]
enum KernelsCmd {
    /// Compile every CUDA kernel (and, with a model, each of its fused regions) with NVRTC
    /// for `--arch` (default sm_90a).
    Check {
        /// Also compile the fused regions of this model folder (compiled for --backend cuda).
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        p: ProfileArgs,
    },
}

fn main() {
    // Mesa's Vulkan device-select layer asks Wayland for the display's GPU at every Vulkan
    // instance (the cube backend makes two) and, with no XDG_RUNTIME_DIR, prints "error:
    // XDG_RUNTIME_DIR is invalid or not set" each time. A headless run has no display to pick
    // a GPU for, so the layer is turned off there; set before any thread starts.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() && std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let cli = Cli::parse();
    kiln::progress::install();
    if let Err(e) = dispatch(cli.cmd) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn profile(p: &ProfileArgs, batch: Option<usize>, hw: Option<(usize, usize)>) -> Result<CompileOptions> {
    let dtype = parse_dtype(&p.dtype)?;
    let image_hw = p.resolution.map(|r| (r.h, r.w)).or(hw);
    let batch = p.batch.or(batch).unwrap_or(1);
    if batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    // Far beyond any machine, and products of such sizes would overflow while building.
    if batch > 1 << 31 || image_hw.is_some_and(|(h, w)| h.max(w) > 1 << 20) {
        return Err(Error::Usage("--batch above 2^31 or --resolution above 2^20 pixels a side: larger than kiln compiles".into()));
    }
    let moe = MoeOptions { capacity_factor: p.moe_capacity, batch_priority: p.moe_bpr, outputs: MoeOutputs::None };
    let backend = backend_for(&p.backend, p.device.as_deref())?;
    if p.tuning.is_some() && backend != "cuda" {
        return Err(Error::Usage(format!("--tuning applies to the cuda backend, not {backend}")));
    }
    Ok(CompileOptions { profile: Profile { batch, image_hw, dtype, moe, seq_len: p.seq_len }, backend, trace: false })
}

use kiln::progress::progress;

fn is_artifact(p: &Path) -> bool {
    p.is_file()
}

/// Loads a session from an artifact or compiles a folder in memory.
fn session(model: &Path, weights: Option<&Path>, opts: Option<CompileOptions>, p: &ProfileArgs) -> Result<Session> {
    Ok(session_and_graph(model, weights, opts, p)?.0)
}

/// Loads `program` with the load options of `p` (`--cuda-gemv`, `--cuda-fuse`, `--cuda-pdl`).
fn load(program: Program, store: Arc<WeightStore>, p: &ProfileArgs) -> Result<Session> {
    kiln::load::session(program, store, &p.load.options())
}

/// Each entry's optimised graph, when a folder was compiled (for step attribution).
type EntryGraphs = Option<Vec<(String, kiln_graph::Graph)>>;

/// A session, and its entries' optimised graphs when a folder was compiled.
fn session_and_graph(
    model: &Path,
    weights: Option<&Path>,
    opts: Option<CompileOptions>,
    p: &ProfileArgs,
) -> Result<(Session, EntryGraphs)> {
    if is_artifact(model) {
        let program = kiln_graph::artifact::load_file(model)?;
        artifact_cli::refuse_compile_flags(model, &program, p)?;
        let prepared =
            kiln_runtime::prepared::supported(&program.backend) && !p.no_prepared && kiln_runtime::prepared::path_for(model).is_file();
        if !prepared {
            // Without a prepared file the weights come from the folder it was compiled from:
            // a missing one is named, with --weights.
            artifact_cli::weights_path(model, &program, weights)?;
        }
        let opts = kiln_runtime::cpu::prepared::LoadOptions { prepared: !p.no_prepared, verify: true };
        let t = Instant::now();
        let (store, report) =
            progress("loading weights", || kiln_runtime::cpu::prepared::store_for_artifact(model, &program, weights, opts))?;
        let session = progress("preparing", || load(program, Arc::new(store), p))?;
        eprintln!("load: {report} ({:.0} ms)", t.elapsed().as_secs_f64() * 1e3);
        return Ok((session, None));
    }
    let (program, graph) = {
        let opts = opts.ok_or_else(|| Error::Usage("a model folder needs a profile".into()))?;
        #[allow(unused_mut)]
        let mut c = progress("compiling", || compile(model, &opts))?;
        #[cfg(feature = "cuda")]
        if c.program.backend == "cuda" {
            kiln::cuda_tools::attach_tuning(&mut c.program, p.tuning.as_deref())?;
        }
        (c.program, Some(c.entries.into_iter().map(|e| (e.name, e.graph)).collect()))
    };
    let wpath = weights.map(Path::to_path_buf).unwrap_or_else(|| model.to_path_buf());
    // An ensemble's weights span its members' folders (`weight_sets`, relative to `wpath`).
    let store = progress("loading weights", || WeightStore::for_program(&program, Some(&wpath)))?;
    Ok((progress("preparing", || load(program, Arc::new(store), p))?, graph))
}

/// For a graph with mixture-of-experts layers: per node, `Some(true)` for routing, dispatch
/// and combine (everything from the MoE input to the combine except the experts),
/// `Some(false)` for the experts (dispatch buffer to expert output), `None` elsewhere.
fn moe_parts(g: &kiln_graph::Graph) -> Vec<Option<bool>> {
    use kiln_graph::{NodeId, Op};
    let n = g.nodes.len();
    let ancestors = |roots: &[NodeId]| -> Vec<bool> {
        let mut seen = vec![false; n];
        let mut stack: Vec<NodeId> = roots.to_vec();
        while let Some(id) = stack.pop() {
            if !std::mem::replace(&mut seen[id.index()], true) {
                stack.extend(&g.node(id).inputs);
            }
        }
        seen
    };
    let mut part = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        if node.op != Op::MoeCombine {
            continue;
        }
        let (out, rows, w) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let anc_out = ancestors(&[out]);
        let Some(d) = (0..n).rev().find(|&j| anc_out[j] && matches!(g.nodes[j].op, Op::MoeDispatch { .. })) else { continue };
        let anc_y = ancestors(&[g.nodes[d].inputs[0]]);
        let anc_d = ancestors(&[NodeId(d as u32)]);
        let anc_rw = ancestors(&[rows, w]);
        for j in 0..n {
            if part[j].is_some() {
                continue;
            }
            if (anc_rw[j] || anc_d[j]) && !anc_y[j] {
                part[j] = Some(true);
            } else if anc_out[j] && !anc_d[j] {
                part[j] = Some(false);
            }
        }
        part[i] = Some(true);
    }
    part
}

fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Compile { model, p, out, generate, max_new_tokens, ensemble, weights_from } => {
            cli_ensemble::compile_cmd(model, (ensemble, weights_from), &p, &out, (generate, max_new_tokens))
        }
        Cmd::Rank(a) => cli_ensemble::rank(*a),
        Cmd::Ensemble { sub } => cli_ensemble::ensemble(sub),
        Cmd::Run { model, inputs, out, weights, p, entry, bpd, moe_stats } => {
            writable_unlike(&out, Some(&inputs))?;
            run(&model, &inputs, &out, weights.as_deref(), &p, &entry, bpd, moe_stats)
        }
        Cmd::Generate(g) => cli_generate::generate(*g),
        Cmd::Inspect { model, p, ir, json } => inspect(&model, &p, ir, json),
        Cmd::Kernels { sub: KernelsCmd::Check { model, p } } => kernels_check(&p.arch, model.as_deref(), &p),
        Cmd::Bench { sub: Some(BenchCmd::Kernels(k)), .. } => bench_kernels(*k),
        Cmd::Bench { model, p, runs, weights, json, breakdown, entry, .. } => {
            let model = model.ok_or_else(|| Error::Usage("kiln bench needs a model folder or artifact (or: kiln bench kernels)".into()))?;
            bench(&model, &p, runs, weights.as_deref(), json, breakdown, &entry)
        }
        Cmd::Sample { model, seed, temperature, count, weights, p, out, prompt, cfg_weight, temperature_probs } => {
            let jetformer = (prompt.as_deref(), cfg_weight, temperature_probs);
            commands::sample(&model, seed, (temperature, count), weights.as_deref(), &p, &out, jetformer)
        }
        Cmd::Score { model, inputs, out, weights, p } => {
            writable_unlike(&out, Some(&inputs))?;
            commands::score(&model, &inputs, &out, weights.as_deref(), &p)
        }
        Cmd::Compare { got, want, tol } => kiln::compare::compare(&got, &want, tol),
        Cmd::Synth { name, out, seed, list } => {
            if list || name.is_none() {
                for m in kiln::synth::list() {
                    println!("{:<24} {:<10} {}", m.name, m.family.name, m.description);
                }
                return Ok(());
            }
            let name = name.unwrap_or_default();
            let out = out.ok_or_else(|| Error::Usage("kiln synth <name> needs -o <dir>".into()))?;
            let r = kiln::synth::synth(&name, &out, seed, true).map_err(|e| Error::Usage(e.to_string()))?;
            println!("{r}");
            Ok(())
        }
    }
}

fn human(b: usize) -> String {
    kiln_runtime::memory::human(b as u64)
}

/// Batch and image size implied by an image input, so a folder compiles for its inputs:
/// `pixel_values` (NCHW, Hugging Face) or a flow's `images` / `z` (NHWC, big_vision); `codes`
/// (PaliGemma's mask decoder) give the batch alone.
fn image_dims(ins: &[(String, Tensor)]) -> (Option<usize>, Option<(usize, usize)>) {
    for (name, t) in ins {
        let s = &t.ty.shape;
        match name.as_str() {
            "pixel_values" if s.len() == 4 => return (Some(s[0]), Some((s[2], s[3]))),
            "images" | "z" if s.len() == 4 => return (Some(s[0]), Some((s[1], s[2]))),
            // PaliGemma's mask decoder: 16 codes per mask.
            "codes" if s.len() == 2 => return (Some(s[0]), None),
            // JetFormer's entries without images (forward, decode, the scorers).
            "image_tokens" if s.len() == 3 => return (Some(s[0]), None),
            _ => {}
        }
    }
    (None, None)
}

/// Prints bits per dimension per image from a flow's `z` and `logdet` outputs.
fn print_bits_per_dim(outs: &[(String, Tensor)]) -> Result<()> {
    if let Some(line) = kiln::jetformer::bits_per_dim_line(outs) {
        println!("{line}");
        return Ok(());
    }
    let get = |n: &str| {
        outs.iter()
            .find(|(name, _)| name == n)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Usage(format!("--bpd needs a '{n}' output (run a flow's forward entry)")))
    };
    let (z, logdet) = (get("z")?.to_f32(), get("logdet")?.to_f64());
    let per = z.len() / logdet.len().max(1);
    let bpd: Vec<f64> = logdet.iter().enumerate().map(|(i, &ld)| kiln_models::jet::bits_per_dim(&z[i * per..(i + 1) * per], ld)).collect();
    let shown: Vec<String> = bpd.iter().map(|b| format!("{b:.6}")).collect();
    println!("bits per dim: [{}] mean {:.6}", shown.join(", "), bpd.iter().sum::<f64>() / bpd.len().max(1) as f64);
    Ok(())
}

/// Per MoE layer: tokens each expert took, and the assignments and tokens dropped.
fn print_moe_stats(outs: &[(String, Tensor)]) -> Result<()> {
    let mut any = false;
    for (name, t) in outs {
        let Some(block) = name.strip_prefix("moe/").and_then(|n| n.strip_suffix("/expert")) else { continue };
        let load = outs.iter().find(|(n, _)| *n == format!("moe/{block}/expert_load")).map(|(_, t)| t.to_f64()).unwrap_or_default();
        let v = t.to_f64();
        let k = *t.ty.shape.last().unwrap_or(&1);
        let dropped = v.iter().filter(|&&x| x < 0.0).count();
        let lost = v.chunks(k.max(1)).filter(|c| c.iter().all(|&x| x < 0.0)).count();
        let loads: Vec<String> = load.iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "{block}: tokens per expert [{}]; dropped {dropped} of {} assignments (K={k}); {lost} of {} tokens dropped by every expert",
            loads.join(", "),
            v.len(),
            v.len() / k.max(1)
        );
        any = true;
    }
    if !any {
        return Err(Error::Usage(
            "--moe-stats: the program has no MoE routing outputs (a V-MoE folder compiles them in; an artifact must be recompiled)".into(),
        ));
    }
    Ok(())
}
