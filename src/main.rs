//! The `kiln` command line: compile, run, inspect, bench and synth.

use clap::{Parser, Subcommand};
use kiln::{compile, io, CompileOptions, Compiled, Error, Result};
use kiln_graph::program::Program;
use kiln_graph::DType;
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Ahead-of-time compiler and static runtime for the big_vision model family")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options that fix a compile profile.
#[derive(clap::Args, Clone)]
struct ProfileArgs {
    /// Image resolution (square); defaults to the checkpoint's.
    #[arg(long)]
    resolution: Option<usize>,
    /// Batch size.
    #[arg(long)]
    batch: Option<usize>,
    /// Compute dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Backend: cpu, or cube (CubeCL kernels; see --device).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Device of the cube backend: wgpu (Vulkan, Metal; lavapipe on a CPU) or cuda.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile a model folder into an artifact.
    Compile {
        model: PathBuf,
        #[command(flatten)]
        p: ProfileArgs,
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
    /// Run a model folder or an artifact on inputs from a safetensors file.
    Run {
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Weights for an artifact (default: the folder it was compiled from).
        #[arg(long)]
        weights: Option<PathBuf>,
        #[command(flatten)]
        p: ProfileArgs,
    },
    /// Show the IR after each pass, the fusion groups, the schedule and the memory plan.
    Inspect {
        model: PathBuf,
        #[command(flatten)]
        p: ProfileArgs,
        /// Also print the IR after every pass (long for real models).
        #[arg(long)]
        ir: bool,
    },
    /// Time a model: warm-up, then min / median / max over several runs.
    Bench {
        model: PathBuf,
        #[command(flatten)]
        p: ProfileArgs,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Also split one run's time by kernel kind.
        #[arg(long)]
        breakdown: bool,
    },
    /// Compare the tensors of two safetensors files (relative error per tensor).
    Compare {
        got: PathBuf,
        want: PathBuf,
        /// Largest relative error accepted (max |a-b| / max |b|).
        #[arg(long, default_value_t = 1e-4)]
        tol: f64,
    },
    /// Write a full-size random-weight model folder (no downloads).
    Synth {
        name: Option<String>,
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// List the models it can make.
        #[arg(long)]
        list: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.cmd) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn profile(p: &ProfileArgs, batch: Option<usize>, hw: Option<(usize, usize)>) -> Result<CompileOptions> {
    let dtype = match p.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => return Err(Error::Usage(format!("--dtype {other}: expected f32 or bf16"))),
    };
    let image_hw = p.resolution.map(|r| (r, r)).or(hw);
    let batch = p.batch.or(batch).unwrap_or(1);
    if batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    let backend = match (p.backend.as_str(), p.device.as_deref()) {
        (b, None) => b.to_string(),
        ("cube", Some("wgpu")) => "cube".to_string(),
        ("cube", Some("cuda")) => "cube-cuda".to_string(),
        ("cube", Some(other)) => return Err(Error::Usage(format!("--device {other}: expected wgpu or cuda"))),
        (b, Some(_)) => return Err(Error::Usage(format!("--device applies to --backend cube, not {b}"))),
    };
    Ok(CompileOptions { profile: Profile { batch, image_hw, dtype }, backend, trace: false })
}

/// A spinner that appears only when the work takes over a second.
fn progress<T>(msg: &str, f: impl FnOnce() -> T) -> T {
    let bar = indicatif::ProgressBar::new_spinner().with_message(msg.to_string());
    let shown = std::sync::atomic::AtomicBool::new(false);
    let t = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if t.elapsed() > Duration::from_secs(1) {
                    shown.store(true, std::sync::atomic::Ordering::Relaxed);
                    bar.tick();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let out = f();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = h.join();
        out
    });
    if shown.load(std::sync::atomic::Ordering::Relaxed) {
        bar.finish_with_message(format!("{msg} done in {:.1} s", t.elapsed().as_secs_f64()));
    }
    out
}

fn is_artifact(p: &Path) -> bool {
    p.is_file()
}

/// Loads a session from an artifact or compiles a folder in memory.
fn session(model: &Path, weights: Option<&Path>, opts: Option<CompileOptions>) -> Result<Session> {
    let program = if is_artifact(model) {
        kiln_graph::artifact::load_file(model)?
    } else {
        let opts = opts.ok_or_else(|| Error::Usage("a model folder needs a profile".into()))?;
        progress("compiling", || compile(model, &opts))?.program
    };
    let wpath = match weights {
        Some(w) => w.to_path_buf(),
        None if is_artifact(model) => PathBuf::from(&program.source),
        None => model.to_path_buf(),
    };
    let store = progress("loading weights", || WeightStore::open(&wpath))?;
    Ok(progress("preparing", || Session::new(program, Arc::new(store)))?)
}

fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Compile { model, p, out } => {
            let opts = profile(&p, None, None)?;
            let (c, secs) = progress("compiling", || {
                let t = Instant::now();
                let c = compile(&model, &opts);
                (c, t.elapsed().as_secs_f64())
            });
            let c = c?;
            kiln_graph::artifact::save_file(&out, &c.program)?;
            let e = &c.program.entries[0];
            println!("{}", c.program.model);
            println!(
                "compiled in {secs:.3} s: {} steps, arena {} (lower bound {}), {} weights -> {}",
                e.steps.len(),
                human(e.arena_bytes),
                human(e.plan.lower_bound),
                c.program.weights.len(),
                out.display()
            );
            Ok(())
        }
        Cmd::Run { model, inputs, out, weights, p } => {
            let ins = io::read(&inputs)?;
            let (batch, hw) = image_dims(&ins);
            let opts = profile(&p, batch, hw)?;
            let mut s = session(&model, weights.as_deref(), Some(opts))?;
            let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let outs = s.run("forward", &refs)?;
            for (name, t) in &outs {
                let v = t.to_f64();
                let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                let first: Vec<String> = v.iter().take(4).map(|x| format!("{x:.5}")).collect();
                println!("{name}: {} mean {mean:.6} first [{}]", t.ty, first.join(", "));
            }
            io::write(&out, &outs)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Inspect { model, p, ir } => inspect(&model, &p, ir),
        Cmd::Bench { model, p, runs, weights, json, breakdown } => bench(&model, &p, runs, weights.as_deref(), json, breakdown),
        Cmd::Compare { got, want, tol } => {
            let (a, b) = (io::read(&got)?, io::read(&want)?);
            let mut worst = 0f64;
            for (name, t) in &a {
                let Some((_, r)) = b.iter().find(|(n, _)| n == name) else {
                    println!("{name}: not in {}", want.display());
                    continue;
                };
                if t.ty.shape != r.ty.shape {
                    return Err(Error::Usage(format!("{name}: shape {:?} vs {:?}", t.ty.shape, r.ty.shape)));
                }
                let (x, y) = (t.to_f64(), r.to_f64());
                let scale = y.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
                let diff = x.iter().zip(&y).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
                let e = diff / scale;
                worst = worst.max(e);
                println!("{name}: {} relative error {e:.3e}", t.ty);
            }
            if worst > tol {
                return Err(Error::Usage(format!("relative error {worst:.3e} exceeds {tol:e}")));
            }
            println!("all within {tol:e}");
            Ok(())
        }
        Cmd::Synth { name, out, seed, list } => {
            if list || name.is_none() {
                for m in kiln::synth::list() {
                    println!("{:<24} {}", m.name, m.description);
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
    match b {
        0..1024 => format!("{b} B"),
        1024..1048576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1048576.0),
    }
}

/// Batch and image size implied by a `pixel_values` input, so a folder compiles for its inputs.
fn image_dims(ins: &[(String, Tensor)]) -> (Option<usize>, Option<(usize, usize)>) {
    match ins.iter().find(|(n, _)| n == "pixel_values") {
        Some((_, t)) if t.ty.rank() == 4 => (Some(t.ty.shape[0]), Some((t.ty.shape[2], t.ty.shape[3]))),
        _ => (None, None),
    }
}

fn inspect(model: &Path, p: &ProfileArgs, ir: bool) -> Result<()> {
    if is_artifact(model) {
        let prog = kiln_graph::artifact::load_file(model)?;
        print_program(&prog);
        return Ok(());
    }
    let mut opts = profile(p, None, None)?;
    opts.trace = true;
    let c: Compiled = compile(model, &opts)?;
    println!("== model\n{}\n", c.program.model);
    println!("== passes");
    for (name, text) in &c.trace {
        println!("after {name}: {} nodes", text.lines().filter(|l| l.starts_with('%')).count());
        if ir {
            println!("{text}");
        }
    }
    println!("\n== fusion groups");
    for (id, e) in kiln_graph::passes::fusion_groups(&c.graph) {
        println!("{id}: {e}");
    }
    println!("\n== schedule ({} steps)", c.program.entries[0].steps.len());
    print_program(&c.program);
    println!("\n== memory plan");
    println!("{}", kiln_graph::plan::report(&c.plan, &c.graph));
    Ok(())
}

fn print_program(prog: &Program) {
    println!("{} [backend {}]", prog.model, prog.backend);
    for e in &prog.entries {
        println!("entry {}: {} steps, arena {} bytes", e.name, e.steps.len(), e.arena_bytes);
        for io in &e.inputs {
            println!("  in  {} {}", io.name, io.operand.ty);
        }
        for io in &e.outputs {
            println!("  out {} {}", io.name, io.operand.ty);
        }
        for (i, s) in e.steps.iter().enumerate() {
            println!("  {i:4} %{:<5} {:<20} {:<18} -> {} {:?}", s.node, s.kernel, s.op.name(), s.output.ty, s.output.slot);
        }
        let st = e.plan;
        println!(
            "  plan: peak {} B, lower bound {} B ({:.3}x), no reuse {} B ({:.2}x)",
            st.peak,
            st.lower_bound,
            st.peak as f64 / st.lower_bound.max(1) as f64,
            st.no_reuse,
            st.no_reuse as f64 / st.peak.max(1) as f64
        );
    }
}

fn bench(model: &Path, p: &ProfileArgs, runs: usize, weights: Option<&Path>, json: bool, breakdown: bool) -> Result<()> {
    let opts = profile(p, None, None)?;
    let mut s = session(model, weights, Some(opts))?;
    let e = &s.program().entries[0];
    let inputs: Vec<(String, Tensor)> = e
        .inputs
        .iter()
        .map(|io| {
            let ty = io.operand.ty.clone();
            // Deterministic values in [-1, 1]: what pixel inputs look like.
            let vals: Vec<f64> = (0..ty.numel()).map(|i| (i as f64 * 0.618_033_988_7).fract() * 2.0 - 1.0).collect();
            (io.name.clone(), Tensor { bytes: kiln_runtime::tensor::from_f64(ty.dtype, &vals), ty })
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    s.run("forward", &refs)?; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        s.run("forward", &refs)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let (min, med, max) = (times[0], times[times.len() / 2], times[times.len() - 1]);
    if json {
        println!(
            "{}",
            serde_json::json!({"model": s.program().model, "backend": s.program().backend, "min_ms": min, "median_ms": med, "max_ms": max, "runs": times.len()})
        );
    } else {
        println!("{}", s.program().model);
        println!("backend {}  runs {}  min {min:.2} ms  median {med:.2} ms  max {max:.2} ms", s.program().backend, times.len());
    }
    if breakdown {
        let t0 = Instant::now();
        let steps = s.profile("forward", &refs)?;
        let total = t0.elapsed().as_secs_f64();
        let mut kinds: Vec<(String, usize, f64)> = Vec::new();
        for (kernel, op, t) in &steps {
            let key = format!("{kernel} ({op})");
            match kinds.iter_mut().find(|k| k.0 == key) {
                Some(k) => {
                    k.1 += 1;
                    k.2 += t;
                }
                None => kinds.push((key, 1, *t)),
            }
        }
        kinds.sort_by(|a, b| b.2.total_cmp(&a.2));
        let steps_sum: f64 = kinds.iter().map(|k| k.2).sum();
        println!("{:<40} {:>6} {:>10} {:>7}", "kernel (op)", "steps", "ms", "share");
        for (k, n, t) in &kinds {
            println!("{k:<40} {n:>6} {:>10.2} {:>6.1}%", t * 1e3, 100.0 * t / total);
        }
        println!(
            "{:<40} {:>6} {:>10.2} {:>6.1}%",
            "outside steps (copies in/out, checks)",
            "",
            (total - steps_sum) * 1e3,
            100.0 * (total - steps_sum) / total
        );
        println!("{:<40} {:>6} {:>10.2}", "total (one run)", steps.len(), total * 1e3);
    }
    Ok(())
}
