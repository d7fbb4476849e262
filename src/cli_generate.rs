//! `kiln generate`: a prompt (and image) answered as text, UViM's image tasks, or generation on
//! the inputs of a safetensors file; from a model folder or a `kiln compile --generate` artifact.

use super::*;

/// `kiln generate`'s arguments.
#[derive(clap::Args)]
pub(super) struct GenerateArgs {
    /// A Gemma or PaliGemma folder (compiled for the prompt), a big_vision encoder-decoder or
    /// UViM folder, or the artifact `kiln compile --generate` wrote.
    model: PathBuf,
    /// Weights for an artifact (default: the folder it was compiled from, whose config and
    /// tokenizer are read too).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Text prompt, tokenized with the folder's tokenizer.json (or SentencePiece tokenizer.model).
    #[arg(long, conflicts_with = "inputs")]
    prompt: Option<String>,
    /// Image file (JPEG or PNG): PaliGemma's (with --prompt, preprocessed per
    /// preprocessor_config.json), or a UViM task folder's (with -o).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Write the image with the detected boxes and labels (and masks) as a PNG.
    #[arg(long, requires = "image")]
    draw: Option<PathBuf>,
    /// PaliGemma's mask decoder: the released vae-oid.npz, or a folder of it with its
    /// config.json (model_name proj.paligemma.segmentation): each `<seg>` answer becomes a mask
    /// in its box.
    #[arg(long, requires = "image")]
    seg_decoder: Option<PathBuf>,
    /// Inputs (safetensors): `input_ids` [B, L] with an optional `attention_mask` (left
    /// padding) and `pixel_values`; an encoder-decoder's `images`.
    #[arg(long, required_unless_present_any = ["prompt", "image"], requires = "out")]
    inputs: Option<PathBuf>,
    /// With --inputs: the outputs (safetensors). With a UViM task folder and --image: the
    /// prediction as a PNG, or as safetensors (`depth`, `code`) when named `.safetensors`.
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// The most new tokens per row (default 32; an artifact's: what its cache holds).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Prompt bucket to compile for (default: the prompt length).
    #[arg(long)]
    bucket: Option<usize>,
    /// Backend: cpu, cube (see --device) or cuda.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Device of the cube backend: wgpu (Vulkan, Metal; lavapipe on a CPU) or cuda.
    #[arg(long)]
    device: Option<String>,
    /// Compute dtype: f32 or bf16 (weights, activations and the KV cache).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// After generating, time the prefill and one decode step kernel by kernel (each step
    /// synchronised): where the time to first token and per token goes.
    #[arg(long)]
    breakdown: bool,
    /// Encoder-decoders: project the cross-attention keys and values from the encoder's
    /// tokens at every step, as big_vision's loop does, instead of once (for comparison).
    #[arg(long, requires = "inputs")]
    recompute_cross: bool,
    /// Sample new tokens at this temperature (0: greedy) with kiln's seeded generator:
    /// filtered as transformers' generate does for Gemma and PaliGemma (temperature, then
    /// --top-k, then --top-p), as big_vision's decode.py does for encoder-decoders.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to p (default: all).
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampler (with --temperature > 0).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Gemma/PaliGemma with --inputs: draw N sequences per input in one batch of B*N rows
    /// (the prompt's prefill runs once on B rows; its KV cache is copied to the N rows).
    /// Sample j of input i uses random stream i + j*B, so sample 0 is what N = 1 gives.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    #[command(flatten)]
    beams: BeamArgs,
    /// Gemma/PaliGemma with --inputs from a folder: also write `step_logits` [R, n, V], the
    /// logits each token was chosen from (the program then outputs them and the host reads
    /// them; without it the last kernel chooses each token and the host reads only the ids
    /// and log-probabilities; cube samples from logits kept on the device). Beam search reads
    /// each row's best candidates (cpu, cuda) or the logits (cube).
    #[arg(long, requires = "inputs")]
    step_logits: bool,
    #[command(flatten)]
    load: CudaLoadArgs,
}

/// `--num-samples` / `--num-beams`, which only `--inputs` generation takes.
fn strategy_of(a: &GenerateArgs) -> Result<cli_decode::Strategy> {
    let sampling = kiln::sampling::HfSampling { temperature: a.temperature, top_k: 0, top_p: 1.0, seed: 0 };
    let strategy = a.beams.strategy(a.num_samples, &sampling)?;
    if a.inputs.is_none() && !matches!(strategy, cli_decode::Strategy::Rows(1)) {
        return Err(Error::Usage("--num-samples and --num-beams work with --inputs (Gemma, Gemma 2, PaliGemma)".into()));
    }
    Ok(strategy)
}

/// The load options (`kiln::load`) apply where a Gemma or PaliGemma generation program is
/// loaded: elsewhere a value other than the default is refused, naming what `what` is.
fn only_gemma(load: &kiln::load::LoadOptions, what: &str) -> Result<()> {
    if *load == kiln::load::LoadOptions::default() {
        return Ok(());
    }
    Err(Error::Usage(format!("--cuda-gemv, --cuda-fuse and --cuda-pdl apply to Gemma and PaliGemma generation; {what} is not")))
}

/// `kiln generate --prompt`: answers `o` with the loaded artifact's generator, or compiles
/// the folder; prints the answer, the breakdown if asked, and the timings as JSON on stderr.
fn answer_prompt(o: &kiln::prompt::PromptOptions, art: Option<kiln::generate::Generator>) -> Result<()> {
    let r = match art {
        Some(mut g) => kiln::prompt::run_on(&mut g, o, &mut std::io::stdout())?,
        None => kiln::prompt::run(o, &mut std::io::stdout())?,
    };
    for (entry, steps, total) in &r.profiles {
        println!("{entry}, kernel by kernel (each step synchronised):");
        commands::print_breakdown(steps, *total);
    }
    eprintln!(
        "{}",
        serde_json::json!({"prompt_tokens": r.input_ids.len(), "new_ids": r.new_ids, "compile_ms": r.compile_s * 1e3,
        "first_token_ms": r.first_token_s * 1e3, "decode_ms_per_token": r.decode_s_per_token * 1e3})
    );
    Ok(())
}

/// `kiln generate`.
pub(super) fn generate(a: GenerateArgs) -> Result<()> {
    let strategy = strategy_of(&a)?;
    let load = a.load.options();
    load.check()?;
    let only_gemma = |what: &str| only_gemma(&load, what);
    match a {
        GenerateArgs {
            model,
            prompt: None,
            image: Some(image),
            out,
            backend,
            device,
            inputs: None,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            ..
        } => {
            let sampling = kiln::sampling::HfSampling { temperature, top_k, top_p: top_p.unwrap_or(1.0), seed };
            only_gemma("a UViM task")?;
            let backend = backend_for(&backend, device.as_deref())?;
            generate_uvim(&model, &image, out, &backend, (max_new_tokens.unwrap_or(32), sampling))
        }
        GenerateArgs {
            model,
            prompt: Some(prompt),
            image,
            draw,
            seg_decoder,
            max_new_tokens,
            bucket,
            backend,
            dtype,
            breakdown,
            temperature,
            top_k,
            top_p,
            seed,
            device,
            weights,
            ..
        } => {
            let sampling = kiln::sampling::HfSampling { temperature, top_k, top_p: top_p.unwrap_or(1.0), seed };
            sampling.check()?;
            let sampling = (temperature > 0.0).then_some(sampling);
            if let Some(d) = &draw {
                writable(d)?;
            }
            let flags = artifact_cli::GenerateFlags { bucket, backend: &backend, device: device.as_deref(), dtype: &dtype, load: &load };
            let art = is_artifact(&model).then(|| artifact_cli::generator(&model, weights.as_deref(), &flags)).transpose()?;
            let dtype = parse_dtype(&dtype)?;
            let max_new_tokens = max_new_tokens.or(art.as_ref().map(|(g, _)| g.meta.capacity - g.bucket)).unwrap_or(32);
            let model = art.as_ref().map(|(_, dir)| dir.clone()).unwrap_or(model);
            let o = kiln::prompt::PromptOptions {
                model,
                prompt,
                image,
                max_new_tokens,
                bucket,
                backend: backend_for(&backend, device.as_deref())?,
                dtype,
                draw,
                seg_decoder,
                breakdown,
                sampling,
                load: load.clone(),
            };
            answer_prompt(&o, art.map(|(g, _)| g))
        }
        GenerateArgs {
            model,
            inputs,
            out,
            max_new_tokens,
            bucket,
            backend,
            dtype,
            breakdown,
            step_logits,
            recompute_cross,
            temperature,
            top_k,
            top_p,
            seed,
            device,
            weights,
            ..
        } => {
            let sampling = kiln::sampling::HfSampling { temperature, top_k, top_p: top_p.unwrap_or(1.0), seed };
            let (Some(inputs), Some(out)) = (inputs, out) else {
                return Err(Error::Usage("kiln generate needs --prompt, or --inputs and --out".into()));
            };
            writable_unlike(&out, Some(&inputs))?;
            let flags = artifact_cli::GenerateFlags { bucket, backend: &backend, device: device.as_deref(), dtype: &dtype, load: &load };
            let art = is_artifact(&model).then(|| artifact_cli::generator(&model, weights.as_deref(), &flags)).transpose()?;
            let backend = backend_for(&backend, device.as_deref())?;
            let dtype = parse_dtype(&dtype)?;
            let ins = io::read(&inputs)?;
            if let Some((g, _)) = art {
                let max_new_tokens = max_new_tokens.unwrap_or(g.meta.capacity - g.bucket);
                return generate_text_inputs(
                    commands::GenModel::Loaded(Box::new(g)),
                    ins,
                    (&inputs, &out),
                    (max_new_tokens, bucket),
                    (&backend, dtype, &load),
                    (breakdown, step_logits),
                    (sampling, strategy),
                );
            }
            let not_hf = |what: &str| Error::Usage(format!("--num-samples and --num-beams are for Gemma and PaliGemma; {what} is not"));
            let max_new_tokens = max_new_tokens.unwrap_or(32);
            let plain = matches!(strategy, cli_decode::Strategy::Rows(1));
            if kiln::paligemma_bv::is_big_vision_paligemma(&model) {
                if !plain {
                    return Err(not_hf("a big_vision PaliGemma folder"));
                }
                only_gemma("a big_vision PaliGemma folder")?;
                return generate_big_vision_paligemma(&model, &ins, &out, max_new_tokens, &backend, dtype);
            }
            if ins.iter().any(|(n, _)| n == "images") {
                if !plain {
                    return Err(not_hf("an encoder-decoder"));
                }
                only_gemma("an encoder-decoder")?;
                let cross = if recompute_cross { kiln::encdec::CrossKv::Recomputed } else { kiln::encdec::CrossKv::Cached };
                let sampling = kiln::encdec::Sampling { temperature, top_k, top_p: top_p.unwrap_or(0.0), seed };
                return generate_encdec(&model, &ins, (&inputs, &out), max_new_tokens, &backend, dtype, cross, &sampling);
            }
            generate_text_inputs(
                commands::GenModel::Folder(&model),
                ins,
                (&inputs, &out),
                (max_new_tokens, bucket),
                (&backend, dtype, &load),
                (breakdown, step_logits),
                (sampling, strategy),
            )
        }
    }
}
