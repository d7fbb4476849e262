//! The reporting commands of the CLI: `kiln inspect`, `kiln bench` (a model, or its kernels)
//! and `kiln kernels check`; and `kiln compile --generate`.

use super::*;

pub(super) fn inspect(model: &Path, p: &ProfileArgs, ir: bool, json: bool) -> Result<()> {
    if ir && json {
        return Err(Error::Usage("--json prints the launch counts only; it does not combine with --ir".into()));
    }
    if is_artifact(model) {
        let prog = kiln_graph::artifact::load_file(model)?;
        super::artifact_cli::refuse_compile_flags(model, &prog, p)?;
        if ir {
            return Err(Error::Usage(format!(
                "{}: --ir shows the passes of a folder's compile; an artifact keeps only its steps",
                model.display()
            )));
        }
        if json {
            println!("{}", kiln::launches::json(&prog)?);
            return Ok(());
        }
        print_program(&prog);
        println!("== load\n{}", super::artifact_cli::load_plan(model, &prog, p));
        return Ok(());
    }
    let mut opts = profile(p, None, None)?;
    opts.trace = !json;
    let c: Compiled = compile(model, &opts)?;
    if json {
        println!("{}", kiln::launches::json(&c.program)?);
        return Ok(());
    }
    println!("== model\n{}\n", c.program.model);
    for e in &c.entries {
        println!("== entry {}: passes", e.name);
        for (name, text) in &e.trace {
            println!("after {name}: {} nodes", text.lines().filter(|l| l.starts_with('%')).count());
            if ir {
                println!("{text}");
            }
        }
        println!("\n== entry {}: fusion groups", e.name);
        for (id, ex) in kiln_graph::passes::fusion_groups(&e.graph) {
            println!("{id}: {ex}");
        }
        println!();
    }
    let steps: Vec<String> = c.program.entries.iter().map(|e| format!("{} {}", e.name, e.steps.len())).collect();
    println!("== schedule (steps: {})", steps.join(", "));
    print_program(&c.program);
    for e in &c.entries {
        println!("\n== entry {}: memory plan", e.name);
        println!("{}", kiln_graph::plan::report(&e.plan, &e.graph));
    }
    Ok(())
}

pub(super) fn print_program(prog: &Program) {
    println!("{} [backend {}]", prog.model, prog.backend);
    for (i, st) in prog.states.iter().enumerate() {
        println!("state {i}: {} {} (persistent, {} bytes)", st.name, st.ty, st.ty.bytes());
    }
    // Launches from the backend's lowering (this build may lack the program's backend).
    let launches = kiln::launches::count(prog).map(|c| c.into_iter().map(|e| e.launches.to_string()).collect::<Vec<_>>());
    for (i, e) in prog.entries.iter().enumerate() {
        let n = launches.as_ref().map_or_else(|err| format!("unknown ({err})"), |c| c[i].clone());
        println!("entry {}: {} steps, {n} kernel launches, arena {} bytes", e.name, e.steps.len(), e.arena_bytes);
        for io in &e.inputs {
            println!("  in  {} {} {:?}", io.name, io.operand.ty, io.operand.slot);
        }
        for io in &e.outputs {
            println!("  out {} {} {:?}", io.name, io.operand.ty, io.operand.slot);
        }
        // Steps whose launches run as one (the later step's line says `x2` when both launch
        // one kernel).
        let merged = kiln_runtime::by_name(&prog.backend).ok().and_then(|b| b.merged_launches(prog, i).ok()).unwrap_or_default();
        // Steps computed inside another step's launch (the host's line names them).
        let absorbed = kiln_runtime::by_name(&prog.backend).ok().and_then(|b| b.absorbed_steps(prog, i).ok()).unwrap_or_default();
        for (i, s) in e.steps.iter().enumerate() {
            // A cpu group runs several steps in one dispatch: its first step names them all.
            let with: Vec<String> = merged.iter().filter(|&&(_, b)| b == i).map(|&(a, _)| a.to_string()).collect();
            let mut note = match merged.iter().find(|&&(a, b)| a == i || b == i) {
                Some(&(a, b)) if b == i && e.steps[a].kernel == s.kernel && with.len() == 1 => {
                    format!("  [{} x2: with step {a}]", s.kernel)
                }
                Some(&(a, b)) if b == i && with.len() == 1 => format!("  [one launch with step {a}]"),
                Some(&(_, b)) if b == i => format!("  [one launch with steps {}]", with.join(", ")),
                Some(&(_, b)) => format!("  [runs in step {b}'s launch]"),
                None => String::new(),
            };
            let computes: Vec<String> = absorbed.iter().filter(|&&(_, h)| h == i).map(|&(a, _)| a.to_string()).collect();
            note += &match absorbed.iter().find(|&&(a, _)| a == i) {
                _ if computes.len() == 1 => format!("  [computes step {} in its launch]", computes[0]),
                _ if computes.len() > 1 => format!("  [computes steps {} in its launch]", computes.join(", ")),
                Some(&(_, h)) => format!("  [runs in step {h}'s launch]"),
                None => String::new(),
            };
            println!("  {i:4} %{:<5} {:<20} {:<18} -> {} {:?}{note}", s.node, s.kernel, s.op.name(), s.output.ty, s.output.slot);
        }
        // The steps this backend runs through the reference interpreter (slow, allocating).
        let interpreted: Vec<String> = match kiln_runtime::by_name(&prog.backend) {
            Ok(b) => e
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| b.interpreted(&s.kernel))
                .map(|(i, s)| format!("{i} {} -> {}", s.op.name(), s.output.ty))
                .collect(),
            Err(_) => vec![],
        };
        if interpreted.is_empty() {
            println!("  interpreter fallbacks: none");
        } else {
            println!("  interpreter fallbacks: {} steps: {}", interpreted.len(), interpreted.join("; "));
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

pub(super) fn bench(
    model: &Path,
    p: &ProfileArgs,
    runs: usize,
    weights: Option<&Path>,
    json: bool,
    breakdown: bool,
    entry: &str,
) -> Result<()> {
    let opts = profile(p, None, None)?;
    let t0 = Instant::now();
    let (mut s, graphs) = session_and_graph(model, weights, Some(opts), p)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let e = &s.program().entries[s.entry_index(entry)?];
    let graph = graphs.and_then(|g| g.into_iter().find(|(n, _)| n == entry).map(|(_, g)| g));
    let inputs = kiln::bench::synthetic_inputs(e);
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let t1 = Instant::now();
    s.run(entry, &refs)?; // warm-up: the first call after the load
    let first_ms = t1.elapsed().as_secs_f64() * 1e3;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        s.run(entry, &refs)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let (min, med, max) = (times[0], times[times.len() / 2], times[times.len() - 1]);
    // GPU backends: also the device time alone (inputs already there, outputs left there).
    let device = s.time_device(entry, &refs, runs.max(1))?.map(|mut t| {
        t.sort_by(|a, b| a.total_cmp(b));
        (t[0] * 1e3, t[t.len() / 2] * 1e3)
    });
    // A generation program's decode entry: one step (a token per row) replayed on its inputs.
    let generation = entry == "decode" && s.program().entry("prefill").is_some();
    let step = generation.then_some(match device {
        Some((_, dmed)) => (dmed, "device time, inputs on the device"),
        None => (med, "the run's median: host memory, inputs and outputs copied"),
    });
    if json {
        let mut j = serde_json::json!({"model": s.program().model, "backend": s.program().backend, "entry": entry, "min_ms": min, "median_ms": med, "max_ms": max, "runs": times.len(), "load_ms": load_ms, "first_run_ms": first_ms});
        if let Some((dmin, dmed)) = device {
            j["device_min_ms"] = dmin.into();
            j["device_median_ms"] = dmed.into();
        }
        if let Some((ms, _)) = step {
            j["ms_per_decode_step"] = ms.into();
        }
        println!("{j}");
    } else {
        println!("{}", s.program().model);
        println!(
            "backend {}  entry {entry}  runs {}  min {min:.2} ms  median {med:.2} ms  max {max:.2} ms (inputs and outputs copied)",
            s.program().backend,
            times.len()
        );
        println!("load {load_ms:.0} ms (a folder: compile included), first run after it {first_ms:.0} ms");
        if let Some((dmin, dmed)) = device {
            println!("device alone (inputs already there): min {dmin:.3} ms  median {dmed:.3} ms");
        }
        if let Some((ms, what)) = step {
            println!("decode: {ms:.3} ms per step, every row's next token chosen ({what}); kiln generate's host_ms_per_token is the host's overhead beside it");
        }
    }
    if breakdown {
        let t0 = Instant::now();
        let steps = s.profile(entry, &refs)?;
        let total = t0.elapsed().as_secs_f64();
        print_breakdown(&steps, total);
        if let Some(parts) = graph.as_ref().map(moe_parts).filter(|p| p.iter().any(|x| x.is_some())) {
            let (mut routing, mut experts) = (0.0, 0.0);
            for (st, (_, _, t)) in s.program().entries[0].steps.iter().zip(&steps) {
                match parts.get(st.node as usize).copied().flatten() {
                    Some(true) => routing += t,
                    Some(false) => experts += t,
                    None => {}
                }
            }
            println!(
                "MoE layers: routing+dispatch+combine {:.2} ms, experts {:.2} ms; overhead {:.1}% of the MoE layers' time",
                routing * 1e3,
                experts * 1e3,
                100.0 * routing / (routing + experts).max(1e-12)
            );
        }
    }
    Ok(())
}

/// One run's time by kernel kind (steps run one at a time, each synchronised), largest
/// first, with what lies outside the steps, summing to `total` seconds.
pub(super) fn print_breakdown(steps: &[(String, &'static str, f64)], total: f64) {
    let mut kinds: Vec<(String, usize, f64)> = Vec::new();
    for (kernel, op, t) in steps {
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
        println!("{k:<40} {n:>6} {:>10.3} {:>6.1}%", t * 1e3, 100.0 * t / total);
    }
    println!(
        "{:<40} {:>6} {:>10.3} {:>6.1}%",
        "outside steps (copies in/out, checks)",
        "",
        (total - steps_sum) * 1e3,
        100.0 * (total - steps_sum) / total
    );
    println!("{:<40} {:>6} {:>10.3}", "total (one run)", steps.len(), total * 1e3);
}

pub(super) fn bench_kernels(k: KernelsArgs) -> Result<()> {
    let model = match &k.model {
        Some(m) => Some(session(m, k.weights.as_deref(), Some(profile(&k.p, None, None)?), &k.p)?),
        None => None,
    };
    let o = kiln::bench::KernelsOptions {
        entry: k.entry,
        runs: kiln::bench::kernels::Runs { warmup: k.warmup, runs: k.runs },
        by_shape: k.by_shape,
        json: k.json,
        plot: k.plot,
        ceilings: kiln::bench::roofline::CeilingOptions { copy_mib: k.copy_mib, gemm_n: k.gemm_n, reps: 5 },
        kernel: k.kernel,
        shapes: k.shape,
        backend: k.p.backend,
    };
    let report = progress("measuring", || kiln::bench::kernels_command(&o, model))?;
    kiln::bench::emit(&o, &report)
}

#[cfg(feature = "cuda")]
pub(super) fn kernels_check(arch: &str, model: Option<&Path>, p: &ProfileArgs) -> Result<()> {
    let program = match model {
        Some(m) => {
            let mut opts = profile(p, None, None)?;
            opts.backend = "cuda".into();
            Some(compile(m, &opts)?.program)
        }
        None => None,
    };
    let t = Instant::now();
    let r = kiln::cuda_tools::check(arch, program.as_ref())?;
    print!("{}", r.table());
    let spills = r.hot_spills();
    println!(
        "{} kernels compiled for {arch} in {:.1} s; {} compile errors; {} hot kernels spill",
        r.rows.len(),
        t.elapsed().as_secs_f64(),
        r.errors.len(),
        spills.len()
    );
    for e in &r.errors {
        eprintln!("{e}");
    }
    if !r.errors.is_empty() || !spills.is_empty() {
        let names: Vec<&str> = spills.iter().map(|r| r.kernel.as_str()).collect();
        return Err(Error::Usage(format!(
            "kernels check failed: {} compile errors; hot kernels that spill: [{}]",
            r.errors.len(),
            names.join(", ")
        )));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub(super) fn kernels_check(_: &str, _: Option<&Path>, _: &ProfileArgs) -> Result<()> {
    Err(Error::Usage("this kiln was built without the `cuda` feature (cargo build --features cuda)".into()))
}

/// `kiln compile --generate`: a text model's generation program (prefill, decode and the KV
/// cache states) for a bucket of `--seq-len` tokens, written as an artifact.
pub(super) fn compile_generation(model: &Path, p: &ProfileArgs, max_new_tokens: Option<usize>, out: &Path) -> Result<()> {
    let opts = profile(p, None, None)?;
    let bucket = p.seq_len.ok_or_else(|| Error::Usage("--generate needs --seq-len: the prompt bucket prefill is compiled for".into()))?;
    let max_new = max_new_tokens.ok_or_else(|| {
        Error::Usage("--generate needs --max-new-tokens: the most tokens one generation makes (it sizes the cache)".into())
    })?;
    if bucket == 0 {
        return Err(Error::Usage("--seq-len must be at least 1".into()));
    }
    let (batch, dtype) = (opts.profile.batch, opts.profile.dtype);
    let t = Instant::now();
    let g = progress("compiling", || kiln::generate::generation_program(model, batch, bucket, max_new, &opts.backend, dtype))?;
    let secs = t.elapsed().as_secs_f64();
    #[allow(unused_mut)]
    let mut program = g.program;
    if program.backend == "cuda" {
        #[cfg(feature = "cuda")]
        println!("{}", kiln::cuda_tools::attach_tuning(&mut program, p.tuning.as_deref())?);
        #[cfg(feature = "cuda")]
        progress("compiling CUDA kernels", || kiln::cuda_tools::attach_binaries(&mut program, &p.arch))?;
        println!("{} CUBINs for {} stored", program.binaries.len(), p.arch);
    }
    save_with_prepared(out, &program, p)?;
    println!("{}", program.model);
    println!(
        "compiled in {secs:.3} s: generation for batch {batch}, bucket {bucket}, up to {max_new} new tokens (cache {}): {} weights -> {}",
        g.meta.capacity,
        program.weights.len(),
        out.display()
    );
    for e in &program.entries {
        let ios = |v: &[kiln_graph::program::Io]| {
            let (states, plain): (Vec<_>, Vec<_>) = v.iter().partition(|io| program.state_index(&io.name).is_some());
            let mut s: Vec<String> = plain.iter().map(|io| format!("{} {}", io.name, io.operand.ty)).collect();
            if !states.is_empty() {
                s.push(format!("{} states", states.len()));
            }
            s.join(", ")
        };
        println!("  entry {}: {} steps, arena {}", e.name, e.steps.len(), human(e.arena_bytes));
        println!("    in:  {}", ios(&e.inputs));
        println!("    out: {}", ios(&e.outputs));
    }
    let total: usize = program.states.iter().map(|s| s.ty.bytes()).sum();
    println!("  {} states, {} in all (zeroed at load; reset before each generation):", program.states.len(), human(total));
    for s in &program.states {
        println!("    {} {}", s.name, s.ty);
    }
    println!("  eos {:?}, pad {}", g.meta.eos, g.meta.pad);
    Ok(())
}

/// `kiln generate` of a big_vision encoder-decoder (CapPa): `images` [B, H, W, 3], optional
/// `prompts` [B, N] (forced tokens, 0 = free; N defaults to --max-new-tokens) and `eos_token`
/// [1] (default 1, -1 = none) in; `sequences` [B, N], `logprobs` [B, N], `scores` [B] out.
#[allow(clippy::too_many_arguments)]
pub(super) fn generate_encdec(
    model: &Path,
    ins: &[(String, Tensor)],
    (path, out): (&Path, &Path),
    max_new_tokens: usize,
    backend: &str,
    dtype: DType,
    cross: kiln::encdec::CrossKv,
    sampling: &kiln::encdec::Sampling,
) -> Result<()> {
    sampling.check()?;
    let get = |n: &str| ins.iter().find(|(name, _)| name == n).map(|(_, t)| t);
    let images = get("images").ok_or_else(|| Error::File { path: path.into(), msg: "no images".into() })?;
    let s = &images.ty.shape;
    if s.len() != 4 || s[3] != 3 {
        return Err(Error::File { path: path.into(), msg: format!("images: expected [B, H, W, 3], found {:?}", s) });
    }
    let b = s[0];
    let prompts: Vec<i64> = match get("prompts") {
        Some(p) if p.ty.rank() == 2 && p.ty.shape[0] == b => p.to_f64().into_iter().map(|x| x as i64).collect(),
        Some(p) => return Err(Error::File { path: path.into(), msg: format!("prompts: expected [{b}, N], found {:?}", p.ty.shape) }),
        None => vec![0; b * max_new_tokens],
    };
    let n = prompts.len() / b.max(1);
    let eos = match get("eos_token") {
        Some(t) if t.ty.numel() == 1 => t.to_f64()[0] as i64,
        Some(t) => return Err(Error::File { path: path.into(), msg: format!("eos_token: expected one value, found {:?}", t.ty.shape) }),
        None => 1,
    };
    let mut g = progress("compiling", || kiln::encdec::EncDecGenerator::with_cross(model, b, (s[1], s[2]), n, backend, dtype, cross))?;
    let t = Instant::now();
    let r = g.generate_with(images, &prompts, eos, sampling)?;
    let secs = t.elapsed().as_secs_f64();
    for row in 0..b {
        println!("row {row}: {:?} score {:.5}", &r.sequences[row * n..(row + 1) * n], r.scores[row]);
    }
    let outs = vec![
        ("sequences".to_string(), Tensor::from_i64(&[b, n], &r.sequences)),
        ("logprobs".to_string(), Tensor::from_f32(&[b, n], &r.logprobs)),
        ("scores".to_string(), Tensor::from_f32(&[b], &r.scores)),
    ];
    io::write(out, &outs)?;
    eprintln!("{{\"steps\":{},\"generate_ms\":{:.3}}}", r.steps, secs * 1e3);
    println!("wrote {}", out.display());
    Ok(())
}

/// `kiln generate <uvim-task> --image x.jpg -o out.png`: UViM end to end (`kiln::uvim`).
pub(super) fn generate_uvim(
    model: &Path,
    image: &Path,
    out: Option<PathBuf>,
    backend: &str,
    text: (usize, kiln::sampling::HfSampling),
) -> Result<()> {
    if kiln_models::registry::kind_of(&model.join("config.json"))
        .is_ok_and(|(bv, n)| bv && n == kiln_models::big_vision::jetformer::MODEL_NAME)
    {
        // A JetFormer captions the image (`sample_text`): token ids, and text with its tokenizer.
        println!("{}", kiln::jetformer::caption_file(model, image, text.0, &text.1, backend)?);
        return Ok(());
    }
    if !kiln::uvim::is_task(model) {
        return Err(Error::Usage(format!(
            "--image without --prompt is for a UViM task folder (uvim.json beside vtt/ and vqvae/); {} has none",
            model.display()
        )));
    }
    let out = out.ok_or_else(|| Error::Usage("a UViM task needs -o out.png (or out.safetensors)".into()))?;
    writable(&out)?;
    let raw = out.extension().is_some_and(|e| e == "safetensors");
    let t = Instant::now();
    let (p, summary) = kiln::uvim::run(model, image, (!raw).then_some(out.as_path()), raw.then_some(out.as_path()), backend)?;
    println!("{summary} from {} codes in {:.2} s -> {}", p.code.len(), t.elapsed().as_secs_f64(), out.display());
    Ok(())
}

/// Writes the artifact and, for the cpu and cuda backends unless `--no-prepared`, its prepared
/// weight file beside it (`<out>.weights`: every weight as the backend reads it: cpu, packed as
/// the kernels read it, so a load maps it and packs nothing; cuda, as the upload sends it, so a
/// load maps it and converts nothing). A prepared file left from an earlier compile is removed
/// first: it would be refused as stale.
pub(super) fn save_with_prepared(out: &Path, program: &Program, p: &ProfileArgs) -> Result<()> {
    let pp = kiln_runtime::prepared::path_for(out);
    if pp.exists() {
        std::fs::remove_file(&pp).map_err(|e| Error::Usage(format!("{}: {e}", pp.display())))?;
    }
    kiln_graph::artifact::save_file(out, program)?;
    if !kiln_runtime::prepared::supported(&program.backend) || p.no_prepared {
        return Ok(());
    }
    let t = Instant::now();
    let store = WeightStore::for_program(program, None)?;
    let w = progress("writing prepared weights", || match program.backend.as_str() {
        "cuda" => kiln_runtime::prepared::cuda::write(program, &store, &pp),
        _ => kiln_runtime::cpu::prepared::write(program, Arc::new(store), &pp),
    })?;
    let what = match program.backend.as_str() {
        "cuda" => format!("{} weights as the upload sends them", w.raw),
        _ => format!("{} packed matrices and {} weights as stored", w.packed, w.raw),
    };
    println!("prepared weights: {what}, {} -> {} ({:.1} s)", human(w.bytes as usize), pp.display(), t.elapsed().as_secs_f64());
    Ok(())
}

/// `kiln compile` of a `forward` program.
pub(super) fn compile_forward(model: &Path, p: &ProfileArgs, out: &Path) -> Result<()> {
    let opts = profile(p, None, None)?;
    let (c, secs) = progress("compiling", || {
        let t = Instant::now();
        let c = compile(model, &opts);
        (c, t.elapsed().as_secs_f64())
    });
    #[allow(unused_mut)]
    let mut c = c?;
    if c.program.backend == "cuda" {
        #[cfg(feature = "cuda")]
        println!("{}", kiln::cuda_tools::attach_tuning(&mut c.program, p.tuning.as_deref())?);
        #[cfg(feature = "cuda")]
        progress("compiling CUDA kernels", || kiln::cuda_tools::attach_binaries(&mut c.program, &p.arch))?;
        println!("{} CUBINs for {} stored", c.program.binaries.len(), p.arch);
    }
    save_with_prepared(out, &c.program, p)?;
    println!("{}", c.program.model);
    println!("compiled in {secs:.3} s: {} weights -> {}", c.program.weights.len(), out.display());
    for e in &c.program.entries {
        println!("  entry {}: {} steps, arena {} (lower bound {})", e.name, e.steps.len(), human(e.arena_bytes), human(e.plan.lower_bound));
    }
    let arena = c.program.entries.iter().map(|e| e.arena_bytes as u64).max().unwrap_or(0);
    if let Err(e) = kiln_runtime::memory::check_host("its arena", arena) {
        eprintln!("note: this machine cannot load the artifact: {e}");
    }
    Ok(())
}

/// `kiln run`: a folder or artifact on the inputs of a safetensors file.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    model: &Path,
    inputs: &Path,
    out: &Path,
    weights: Option<&Path>,
    p: &ProfileArgs,
    entry: &str,
    bpd: bool,
    moe_stats: bool,
) -> Result<()> {
    let (_, mut outs) = forward_outputs(model, io::read(inputs)?, inputs, weights, p, entry, moe_stats)?;
    if moe_stats {
        print_moe_stats(&outs)?;
    }
    outs.retain(|(n, _)| !n.starts_with("moe/"));
    for (name, t) in &outs {
        let v = t.to_f64();
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        let first: Vec<String> = v.iter().take(4).map(|x| format!("{x:.5}")).collect();
        println!("{name}: {} mean {mean:.6} first [{}]", t.ty, first.join(", "));
    }
    if bpd {
        print_bits_per_dim(&outs)?;
    }
    io::write(out, &outs)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// What `kiln generate` runs: a folder compiled for the inputs, or a loaded generation artifact.
pub(super) enum GenModel<'a> {
    Folder(&'a Path),
    Loaded(Box<kiln::generate::Generator>),
}

/// `kiln generate <gemma | paligemma> --inputs in --out out`: `input_ids` (with an optional
/// `attention_mask` and `pixel_values`) to `sequences` and `logprobs` (and `step_logits` when
/// asked: a folder is then compiled to output them).
pub(super) fn generate_text_inputs(
    model: GenModel,
    mut ins: Vec<(String, Tensor)>,
    (inputs, out): (&Path, &Path),
    (max_new_tokens, bucket): (usize, Option<usize>),
    (backend, dtype, load): (&str, DType, &kiln::load::LoadOptions),
    (breakdown, step_logits): (bool, bool),
    (sampling, strategy): (kiln::sampling::HfSampling, crate::cli_decode::Strategy),
) -> Result<()> {
    use crate::cli_decode::Strategy;
    sampling.check()?;
    let (b, l) = text_inputs(&mut ins, inputs)?
        .ok_or_else(|| Error::File { path: inputs.to_path_buf(), msg: "no input_ids tensor [B, L]".into() })?;
    let ids = ins.iter().find(|(n, _)| n == "input_ids").map(|(_, t)| t.to_f64()).unwrap_or_default();
    let mask = ins.iter().find(|(n, _)| n == "attention_mask").map(|(_, t)| t.to_f64()).unwrap_or_default();
    let to_i64 = |v: Vec<f64>| v.into_iter().map(|x| x as i64).collect::<Vec<_>>();
    let (ids, mask) = (to_i64(ids), to_i64(mask));
    let bucket = bucket.unwrap_or(l);
    let per = match &strategy {
        Strategy::Rows(n) => *n,
        Strategy::Beams(o) => {
            o.check(max_new_tokens)?;
            o.num_beams
        }
    };
    let mut g = match model {
        GenModel::Folder(dir) => {
            // Beam search scores its candidates on the device where the backend can.
            let ending = kiln::generate::Ending { step_logits, beams: matches!(strategy, Strategy::Beams(_)) };
            progress("compiling", || {
                kiln::generate::Generator::with_load(dir, (b, per), bucket, max_new_tokens, (backend, dtype), ending, load)
            })?
        }
        GenModel::Loaded(g) if step_logits && !g.has_logits => {
            return Err(Error::Usage("--step-logits: this artifact outputs no logits (give the model folder)".into()));
        }
        GenModel::Loaded(g) if g.rows_per_input != per => {
            return Err(Error::Usage(format!(
                "the artifact decodes {} row(s) per input; --num-samples / --num-beams {per} need a folder (compiled for them at run time)",
                g.rows_per_input
            )));
        }
        GenModel::Loaded(g) => *g,
    };
    let bucket = g.bucket;
    g.sampling = (sampling.temperature > 0.0).then_some(sampling);
    let t = Instant::now();
    let px = ins.iter().find(|(n, _)| n == "pixel_values").map(|(_, t)| t);
    let prompt = kiln::generate::Prompt { input_ids: &ids, attention_mask: &mask, token_type_ids: None, len: l };
    let (outs, rows, width, timing) = match strategy {
        Strategy::Beams(o) => {
            let r = g.beam_search(&prompt, max_new_tokens, px, &o)?;
            let rows = b * o.num_return_sequences;
            let width = l + r.new_tokens;
            let outs = vec![
                ("sequences".to_string(), Tensor::from_i64(&[rows, width], &r.sequences)),
                ("sequences_scores".to_string(), Tensor::from_f32(&[rows], &r.sequences_scores)),
            ];
            (outs, (rows, r.new_tokens), width, (r.prefill_s, r.decode_steps, r.decode_s, None))
        }
        Strategy::Rows(_) => {
            let r = g.generate_prompt(&prompt, max_new_tokens, px, &mut |_| Ok(()))?;
            let rows = b * per;
            let width = l + r.new_tokens;
            let mut outs = vec![("sequences".to_string(), Tensor::from_i64(&[rows, width], &r.sequences))];
            if step_logits {
                outs.push(("step_logits".to_string(), Tensor::from_f32(&[rows, r.new_tokens, g.meta.vocab], &r.step_logits)));
            }
            outs.push(("logprobs".to_string(), Tensor::from_f32(&[rows, r.new_tokens], &r.logprobs)));
            let host = (r.decode_run_s, r.host_s / r.new_tokens.max(1) as f64);
            (outs, (rows, r.new_tokens), width, (r.prefill_s, r.decode_steps, r.decode_s, Some(host)))
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let seqs = outs[0].1.to_f64();
    for row in 0..rows.0 {
        let new: Vec<i64> = seqs[row * width + l..(row + 1) * width].iter().map(|&x| x as i64).collect();
        println!("row {row}: {new:?}");
    }
    println!("{} new tokens per row in {secs:.3} s", rows.1);
    let (prefill_s, decode_steps, decode_s, host) = timing;
    let mut j = serde_json::json!({"prefill_ms": prefill_s * 1e3, "prompt_tokens": bucket, "decode_steps": decode_steps,
        "decode_ms_per_token": decode_s * 1e3 / decode_steps.max(1) as f64, "rows": rows.0, "seconds": secs});
    j["host_read_bytes_per_step"] = kiln::select::bytes_read_per_step(g.session.program()).into();
    if let Some((run_s, host_per_token)) = host {
        // The decode entry's Session::run per step, and the token loop's time outside it per token.
        j["decode_run_ms_per_step"] = (run_s * 1e3 / decode_steps.max(1) as f64).into();
        j["host_ms_per_token"] = (host_per_token * 1e3).into();
    }
    println!("{j}");
    io::write(out, &outs)?;
    println!("wrote {}", out.display());
    if breakdown {
        let (steps, total) = g.profile_prefill()?;
        println!("prefill, kernel by kernel (each step synchronised):");
        commands::print_breakdown(&steps, total);
        let (steps, total) = g.profile_decode()?;
        println!("one decode step, kernel by kernel (each step synchronised):");
        commands::print_breakdown(&steps, total);
    }
    Ok(())
}

/// `kiln generate <big_vision PaliGemma> --inputs --out`: the official greedy loop
/// ([`kiln::paligemma_bv::generate`]).
pub(super) fn generate_big_vision_paligemma(
    model: &Path,
    ins: &Named,
    out: &Path,
    max_new: usize,
    backend: &str,
    dtype: DType,
) -> Result<()> {
    let outs = progress("generating", || kiln::paligemma_bv::generate(model, ins, max_new, backend, dtype))?;
    io::write(out, &outs)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Named tensors, as a safetensors file holds them.
type Named = Vec<(String, Tensor)>;

/// Compiles (or loads) `model` for `ins` and runs `entry` on them: the inputs as completed
/// (text defaults, float casts) and the outputs.
pub(super) fn forward_outputs(
    model: &Path,
    mut ins: Vec<(String, Tensor)>,
    inputs: &Path,
    weights: Option<&Path>,
    p: &ProfileArgs,
    entry: &str,
    moe_stats: bool,
) -> Result<(Named, Named)> {
    let (batch, hw) = image_dims(&ins);
    let mut opts = profile(p, batch, hw)?;
    if let Some((b, l)) = text_inputs(&mut ins, inputs)? {
        opts.profile.batch = b;
        opts.profile.seq_len = Some(l);
    }
    // An encoder-decoder's `text [B, L]` (big_vision CapPa) fixes the decoder's length.
    if let Some((_, t)) = ins.iter().find(|(n, t)| n == "text" && t.ty.rank() == 2) {
        opts.profile.seq_len = Some(t.ty.shape[1]);
    }
    if moe_stats {
        opts.profile.moe.outputs = MoeOutputs::Stats;
    }
    let mut s = session(model, weights, Some(opts), p)?;
    text_defaults(&mut ins, &s);
    kiln::jetformer::input_defaults(&mut ins, &s, entry);
    cast_floats(&mut ins, &s, entry);
    // A file may hold more than the entry takes (a flow's forward outputs `z` and
    // `logdet`, fed to its inverse): pass the entry's inputs, name what is left out.
    let takes = &s.program().entries[s.entry_index(entry)?].inputs;
    type Named<'a> = Vec<(&'a str, &'a Tensor)>;
    let (refs, skipped): (Named, Named) = ins.iter().map(|(n, t)| (n.as_str(), t)).partition(|(n, _)| takes.iter().any(|io| io.name == *n));
    if !skipped.is_empty() && !refs.is_empty() {
        let names: Vec<&str> = skipped.iter().map(|(n, _)| *n).collect();
        println!("not inputs of '{entry}', left out: {}", names.join(", "));
    }
    let refs = if refs.is_empty() { skipped } else { refs };
    let outs = s.run(entry, &refs)?;
    Ok((ins, outs))
}

/// `kiln score`: see [`kiln::score`].
pub(super) fn score(model: &Path, inputs: &Path, out: &Path, weights: Option<&Path>, p: &ProfileArgs) -> Result<()> {
    let mut ins = io::read(inputs)?;
    let pl = ins.iter().position(|(n, _)| n == "prompt_len").map(|i| ins.remove(i).1);
    let (ins, outs) = forward_outputs(model, ins, inputs, weights, p, "forward", false)?;
    let get = |ts: &[(String, Tensor)], n: &str| ts.iter().find(|(name, _)| name == n).map(|(_, t)| t.clone());
    let logits = get(&outs, "logits").ok_or_else(|| Error::Usage(format!("{}: the model gives no logits to score", model.display())))?;
    let (tokens, layout, default) = match (get(&ins, "input_ids"), get(&ins, "text")) {
        (Some(t), _) => (t, kiln::score::Layout::Causal, 1),
        (None, Some(t)) => (t, kiln::score::Layout::Shifted, 0),
        (None, None) => return Err(Error::File { path: inputs.into(), msg: "no input_ids (causal LM) or text (encoder-decoder)".into() }),
    };
    let s = &logits.ty.shape;
    if s.len() != 3 || tokens.ty.shape.to_vec() != s[..2] {
        return Err(Error::Usage(format!("logits {:?} do not cover tokens {:?}", s, tokens.ty.shape)));
    }
    let (b, l, v) = (s[0], s[1], s[2]);
    let ids: Vec<i64> = tokens.to_f64().iter().map(|&x| x as i64).collect();
    let mask: Option<Vec<i64>> = get(&ins, "attention_mask").map(|m| m.to_f64().iter().map(|&x| x as i64).collect());
    let lens = kiln::score::prompt_lens(pl.as_ref(), b, default)?;
    let (lp, scores) = kiln::score::score(&logits.to_f32(), &ids, mask.as_deref(), (b, l, v), &lens, layout)?;
    for (r, sc) in scores.iter().enumerate() {
        println!("row {r}: score {sc:.5}");
    }
    io::write(out, &[("logprobs".to_string(), Tensor::from_f32(&[b, l], &lp)), ("scores".to_string(), Tensor::from_f32(&[b], &scores))])?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Refuses an output path before the work: its folder must exist, and it must not be `input`.
pub(super) fn writable_unlike(out: &Path, input: Option<&Path>) -> Result<()> {
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::Usage(format!("{}: the folder {} does not exist", out.display(), dir.display())));
    }
    if out.is_dir() {
        return Err(Error::Usage(format!("{}: is a folder, not a file", out.display())));
    }
    if let Some(i) = input {
        let same = match (std::fs::canonicalize(i), std::fs::canonicalize(out)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(Error::Usage(format!("--out {} is the --inputs file: it would be overwritten", out.display())));
        }
    }
    Ok(())
}

/// [`writable_unlike`] with no input to protect.
pub(super) fn writable(out: &Path) -> Result<()> {
    writable_unlike(out, None)
}

/// `kiln sample`: a flow's Gaussian z through its `inverse`, or a JetFormer's text-to-image
/// sampler (`jetformer`: the prompt's ids, the guidance weight, the mixture temperature).
pub(super) fn sample(
    model: &Path,
    seed: u64,
    (temperature, count): (f64, usize),
    weights: Option<&Path>,
    p: &ProfileArgs,
    out: &Path,
    jetformer: (Option<&str>, f64, f64),
) -> Result<()> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::Usage(format!("--temperature {temperature}: expected a finite value >= 0")));
    }
    if count == 0 {
        return Err(Error::Usage("--count must be at least 1".into()));
    }
    writable(out)?;
    if kiln_models::registry::kind_of(&model.join("config.json"))
        .is_ok_and(|(bv, n)| bv && n == kiln_models::big_vision::jetformer::MODEL_NAME)
    {
        let (prompt, cfg_weight, temperature_probs) = jetformer;
        let prompt = kiln::jetformer::prompt_tokens(model, prompt.unwrap_or(""))?;
        let o = kiln::jetformer::T2iOptions { temperature, temperature_probs, cfg_weight, seed };
        println!("{}", kiln::jetformer::sample_to_png(model, &prompt, count, &o, &p.backend, out)?);
        return Ok(());
    }
    let mut opts = profile(p, Some(count), None)?;
    opts.profile.batch = count;
    let mut s = session(model, weights, Some(opts), p)?;
    let batch = s.program().entries[s.entry_index("inverse")?].inputs.iter().find(|io| io.name == "z").map(|io| io.operand.ty.shape[0]);
    if batch.is_some_and(|b| b != count) {
        return Err(Error::Usage(format!(
            "--count {count}: the artifact was compiled for {} images (compile it with --batch {count}, or pass the folder)",
            batch.unwrap_or(0)
        )));
    }
    let r = kiln::sample::sample(&mut s, seed, temperature, out)?;
    println!("{r}");
    Ok(())
}
