//! Greedy generation over a compiled `prefill` + `decode` program, driven the way
//! transformers' `generate(do_sample=False)` drives a left-padded batch: the prompt is
//! left-padded to the compiled bucket, positions are `cumsum(attention_mask) - 1` (1 at padding),
//! every step appends a 1 to the attention mask, and a row that produced EOS gets the pad id
//! from then on; generation ends when every row has finished or `max_new_tokens` are made.

use crate::{compile_with_states, CompileOptions, Error, Result};
use kiln_graph::program::{Program, StateSpec};
use kiln_graph::{DType, TensorType};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::Path;
use std::sync::Arc;

mod cache_rows;

/// A compiled generation profile loaded in a session: batch, prompt bucket, and what driving
/// the program takes ([`GenerationMeta`]: cache capacity, vocabulary, special ids).
pub struct Generator {
    pub session: Session,
    pub batch: usize,
    /// Prompt tokens per row after left padding (the prefill bucket).
    pub bucket: usize,
    pub meta: GenerationMeta,
    /// The inputs of the last prefill, for `profile_prefill`.
    last_prefill: Vec<(String, Tensor)>,
    /// How new tokens are chosen: `None` greedy (the first argmax), else sampled as
    /// transformers does ([`crate::sampling`]).
    pub sampling: Option<crate::sampling::HfSampling>,
    /// Decode rows per input (`--num-samples`, `--num-beams`): the prefill runs on `batch`
    /// rows, its KV cache is copied to `batch * rows_per_input` rows by
    /// [`Session::gather_state_rows`], and the decode steps run on those.
    pub rows_per_input: usize,
    /// Whether the program's entries choose the tokens ([`crate::select`]: outputs `ids` and
    /// `logprobs`, or beam search's `beam_ids` and `beam_logprobs`), and whether they also
    /// output the logits.
    pub selects: bool,
    pub has_logits: bool,
    /// Whether the entries sample on the device (take the `sampling` inputs); else their `ids`
    /// are greedy only, and sampling reads the logits.
    pub samples_on_device: bool,
    /// Beam search's candidates per row where the entries output them ([`crate::select::Choice::Beams`]).
    pub beam_candidates: Option<usize>,
    /// The `beam_scores [R]` input the next run of such a program takes.
    pub(crate) beam_scores: Option<Tensor>,
    /// Seconds inside the decode entry's [`Session::run`] during the last generation.
    decode_run_s: f64,
}

/// A batch of prompts, `[B, len]` each, left-padded (`attention_mask` 0 on padding).
#[derive(Clone, Copy)]
pub struct Prompt<'a> {
    pub input_ids: &'a [i64],
    pub attention_mask: &'a [i64],
    /// PaliGemma: 0 for the prefix (full attention within it), 1 for suffix tokens; `None`:
    /// the whole prompt is prefix.
    pub token_type_ids: Option<&'a [i64]>,
    pub len: usize,
}

/// What one call produced for its `R` rows (`B` inputs times `rows_per_input` samples, input
/// by input): `sequences [R, L + n]` (prompt and new tokens), `step_logits [R, n, V]` (the
/// logits each new token was chosen from) and `logprobs [R, n]`: each chosen token's
/// log-probability under the model, the log-softmax of its step's logits (before temperature
/// and filters; 0 for the pad id a finished row gets).
pub struct Generated {
    pub sequences: Vec<i64>,
    pub step_logits: Vec<f32>,
    pub logprobs: Vec<f32>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Seconds spent in the prefill entry, and in all decode steps together.
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Decode steps run (`new_tokens - 1` unless every row stopped early).
    pub decode_steps: usize,
    /// Seconds of the decode steps spent inside the decode entry's `Session::run` (inputs in,
    /// the program, outputs out), and the token loop's seconds outside it (choosing on the
    /// host where it does, recording tokens, building the next inputs, reading the outputs):
    /// the host's per-token overhead.
    pub decode_run_s: f64,
    pub host_s: f64,
}

/// The ids generation stops at and pads with: `generation_config.json` first, then `config.json`.
fn special_ids(dir: &Path, cfg: &kiln_models::gemma::GemmaConfig) -> (Vec<i64>, i64) {
    let mut eos = cfg.eos_token_ids.clone();
    let mut pad = cfg.pad_token_id;
    if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match &v["eos_token_id"] {
                serde_json::Value::Number(n) => eos = n.as_i64().into_iter().collect(),
                serde_json::Value::Array(a) => eos = a.iter().filter_map(|x| x.as_i64()).collect(),
                _ => {}
            }
            if let Some(p) = v["pad_token_id"].as_i64() {
                pad = Some(p);
            }
        }
    }
    // transformers pads finished rows with the pad id, or the first EOS without one.
    let pad = pad.or(eos.first().copied()).unwrap_or(0);
    (eos, pad)
}

/// A compiled generation program (entries `prefill` and `decode` sharing the KV cache, its
/// persistent states) and what driving it takes: what [`Generator`] loads, and what
/// `kiln compile --generate` writes as an artifact.
pub struct GenerationProgram {
    pub program: Program,
    pub meta: GenerationMeta,
}

/// What driving a generation program takes besides the program.
pub struct GenerationMeta {
    /// Cache slots: the bucket plus the most tokens one call can generate.
    pub capacity: usize,
    pub vocab: usize,
    /// The ids generation stops at, and the id finished rows are padded with.
    pub eos: Vec<i64>,
    pub pad: i64,
    /// PaliGemma: the image token, how many of them each row must hold, the pixel_values type.
    pub image: Option<(i64, usize, kiln_graph::TensorType)>,
    /// Added to every position id (PaliGemma's positions are 1-indexed; big_vision's are not).
    pub position_offset: i64,
    /// A soft-cap applied to the decode steps' logits, not the prefill's (big_vision's
    /// PaliGemma caps in `extend_cache` only, PALIGEMMA_BV.md P1).
    pub decode_softcap: Option<f32>,
    /// Finished rows get the pad id (transformers); without, they keep decoding until every
    /// row has finished (big_vision's loop).
    pub pad_finished: bool,
}

/// Compiles the text model in `dir` to a generation program for `batch` rows, a prompt bucket
/// of `bucket` tokens and up to `max_new_tokens` new tokens per call, on `backend`, computing
/// in `dtype`. `prefill` takes the left-padded bucket (`input_ids`, `attention_mask`,
/// `position_ids` `[B, bucket]`) and fills the cache; `decode` takes one token per row, the
/// mask over the whole cache `[B, capacity]`, its positions and the `cache_position` slot it
/// writes. Both return the last position's `logits [B, 1, V]`; the cache is their inputs and
/// outputs named `cache.{layer}.key` / `.value`, bound to the program's states. Each writes
/// its K/V rows in place (`prefill` the bucket's at row 0, `decode` one at `cache_position`):
/// the rows past them keep what they held (zeros after load, an earlier generation's rows
/// otherwise), and attention reads only the rows written so far.
pub fn generation_program(
    dir: &Path,
    batch: usize,
    bucket: usize,
    max_new_tokens: usize,
    backend: &str,
    dtype: DType,
) -> Result<GenerationProgram> {
    generation_program_rows(dir, (batch, 1), bucket, max_new_tokens, backend, dtype)
}

/// [`generation_program`] with `rows_per_input` decode rows per prompt (samples or beams):
/// `prefill` runs on `batch` rows and writes them into the first `batch` rows of a cache of
/// `batch * rows_per_input` rows (the rest keep what they held), which
/// [`Session::gather_state_rows`] then spreads; `decode` runs on all of them.
pub fn generation_program_rows(
    dir: &Path,
    (batch, rows_per_input): (usize, usize),
    bucket: usize,
    max_new_tokens: usize,
    backend: &str,
    dtype: DType,
) -> Result<GenerationProgram> {
    generation_program_with(dir, (batch, rows_per_input), bucket, max_new_tokens, (backend, dtype), false)
}

/// Whether `backend` runs beam search's candidate step ([`crate::select::Choice::Beams`]:
/// `Op::LogSoftmax`, whose f64 log-sum-exp cube lacks); else beam search reads the logits.
pub fn beams_on_device(backend: &str) -> Result<bool> {
    let b = kiln_runtime::by_name(backend)?;
    let t = TensorType::new(DType::F32, [1, 2]);
    Ok(b.kernel_for(&kiln_graph::Op::LogSoftmax, std::slice::from_ref(&t), &t).is_ok())
}

/// What a generation program's entries end with: beam search's candidates (where the backend
/// has the step, else the logits) or the chosen token, and the logits too with `step_logits`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ending {
    pub step_logits: bool,
    pub beams: bool,
}

/// Whether `backend` runs the sampling step ([`crate::select::Choice::Sample`]); else (cube)
/// the entries choose greedily ([`crate::select::Choice::Greedy`]) and sampling reads the
/// logits.
pub fn selects_on_device(backend: &str) -> Result<bool> {
    let b = kiln_runtime::by_name(backend)?;
    let tys = [
        TensorType::new(DType::F32, [1, 2]),
        TensorType::new(DType::F32, [2]),
        TensorType::new(DType::I64, [4]),
        TensorType::new(DType::I64, [1]),
    ];
    Ok(b.kernel_for(&kiln_graph::Op::SampleToken, &tys, &TensorType::new(DType::I64, [1])).is_ok())
}

/// [`generation_program_rows`] whose entries also output the `logits [R, 1, V]` the tokens
/// were chosen from when `step_logits` is set (greedy and sampling read only `ids` and
/// `logprobs`).
pub fn generation_program_with(
    dir: &Path,
    rows: (usize, usize),
    bucket: usize,
    max_new_tokens: usize,
    target: (&str, DType),
    step_logits: bool,
) -> Result<GenerationProgram> {
    generation_program_for(dir, rows, bucket, max_new_tokens, target, Ending { step_logits, beams: false })
}

/// [`generation_program_rows`] ending as `ending` says: with `beams`, `rows_per_input` is the
/// number of beams and the entries output beam search's candidates
/// ([`crate::beam::candidates_per_row`] a row), or the logits where the backend lacks the step.
pub fn generation_program_for(
    dir: &Path,
    (batch, rows_per_input): (usize, usize),
    bucket: usize,
    max_new_tokens: usize,
    (backend, dtype): (&str, DType),
    ending: Ending,
) -> Result<GenerationProgram> {
    if max_new_tokens == 0 {
        return Err(Error::Usage("--max-new-tokens must be at least 1".into()));
    }
    if rows_per_input == 0 {
        return Err(Error::Usage("--num-samples and --num-beams must be at least 1".into()));
    }
    let capacity = bucket + max_new_tokens;
    let rows = batch * rows_per_input;
    let profile = Profile { batch: rows, seq_len: Some(bucket), dtype, image_hw: None, ..Profile::default() };
    let g = kiln_models::build_generation(dir, &profile, capacity)?;
    let mut prefill = if rows_per_input == 1 {
        g.prefill
    } else {
        let few = Profile { batch, ..profile.clone() };
        cache_rows::pad_cache_rows(kiln_models::build_generation(dir, &few, capacity)?.prefill, rows)?
    };
    let (eos, pad) = special_ids(dir, g.model.text());
    let px = |v: &kiln_models::siglip::SiglipVisionConfig| {
        kiln_graph::TensorType::new(dtype, [batch, v.num_channels, v.image_size, v.image_size])
    };
    let image_ty = match &g.model {
        kiln_models::TextModel::PaliGemma(p) => Some(px(&p.vision)),
        kiln_models::TextModel::Gemma(_) => None,
    };
    let meta = GenerationMeta::of_model(&g.model, capacity, (eos, pad), image_ty);
    let mut decode = g.decode;
    use crate::select::Choice;
    let choice = if ending.beams && beams_on_device(backend)? {
        Choice::Beams { n: crate::beam::candidates_per_row(rows_per_input, &meta.eos, meta.vocab) }
    } else if selects_on_device(backend)? {
        Choice::Sample
    } else {
        Choice::Greedy
    };
    // Beam search without its step on the device reads the logits.
    let step_logits = ending.step_logits || (ending.beams && !matches!(choice, Choice::Beams { .. }));
    let sel = |spread, softcap| crate::select::Selection { batch, rows_per_input, spread, softcap, step_logits, choice };
    crate::select::append(&mut prefill, &sel(true, None))?;
    crate::select::append(&mut decode, &sel(false, meta.decode_softcap))?;
    let mut states: Vec<StateSpec> = g.states.iter().map(|(name, ty)| StateSpec { name: name.clone(), ty: ty.clone() }).collect();
    if choice == Choice::Greedy {
        let ty = TensorType::new(DType::F32, [rows, 1, meta.vocab]);
        states.push(StateSpec { name: crate::select::LOGITS_STATE.to_string(), ty });
    }
    let built = [("prefill".to_string(), prefill), ("decode".to_string(), decode)];
    let opts = CompileOptions { profile, backend: backend.to_string(), trace: false };
    let program = compile_with_states(&built, &g.description, &dir.display().to_string(), states, &opts)?.program;
    Ok(GenerationProgram { program, meta })
}

impl GenerationMeta {
    /// The meta of a stored generation program (`kiln compile --generate`) whose checkpoint is
    /// the folder `dir`: the shapes come from the program's entries, the ids from the folder.
    pub fn of_program(dir: &Path, program: &Program) -> Result<GenerationMeta> {
        let not_generation = || Error::Usage("not a generation program (compile with --generate: entries prefill and decode)".into());
        let input = |entry: &str, name: &str| {
            let e = program.entry(entry).ok_or_else(not_generation)?;
            e.inputs.iter().find(|io| io.name == name).map(|io| io.operand.ty.clone()).ok_or_else(not_generation)
        };
        let capacity = *input("decode", "attention_mask")?.shape.get(1).ok_or_else(not_generation)?;
        let cfg = dir.join("config.json");
        let model = kiln_models::text_model(&cfg)?
            .ok_or_else(|| Error::File { path: cfg, msg: "text generation needs a Gemma, Gemma 2 or PaliGemma model".into() })?;
        let image_ty = match &model {
            kiln_models::TextModel::Gemma(_) => None,
            kiln_models::TextModel::PaliGemma(_) => Some(input("prefill", "pixel_values")?),
        };
        Ok(GenerationMeta::of_model(&model, capacity, special_ids(dir, model.text()), image_ty))
    }

    /// How `model`'s programs are driven: PaliGemma's image tokens (with `image_ty`, the
    /// `pixel_values` type) and 1-indexed positions; a big_vision PaliGemma's 0-indexed positions,
    /// soft-capped decode steps and rows that keep decoding after their EOS.
    fn of_model(model: &kiln_models::TextModel, capacity: usize, (eos, pad): (Vec<i64>, i64), image_ty: Option<TensorType>) -> Self {
        let (mut image, mut position_offset, mut decode_softcap, mut pad_finished) = (None, 0, None, true);
        if let (kiln_models::TextModel::PaliGemma(p), Some(ty)) = (model, image_ty) {
            image = Some((p.image_token_index, p.vision.grid() * p.vision.grid(), ty));
            match &p.big_vision {
                Some(t) => (decode_softcap, pad_finished) = (t.final_logits_softcap, false),
                None => position_offset = 1,
            }
        }
        GenerationMeta { capacity, vocab: model.text().vocab_size, eos, pad, image, position_offset, decode_softcap, pad_finished }
    }
}

impl Generator {
    /// A generator over a loaded generation program (`kiln compile --generate`) whose
    /// checkpoint is the folder `dir` (its config and special ids).
    pub fn from_session(session: Session, dir: &Path) -> Result<Self> {
        let meta = GenerationMeta::of_program(dir, session.program())?;
        let ids = session.program().entry("prefill").and_then(|e| e.inputs.iter().find(|io| io.name == "input_ids"));
        let [batch, bucket] = ids.map(|io| io.operand.ty.shape.to_vec()).unwrap_or_default()[..] else {
            return Err(Error::Usage("the prefill entry takes no input_ids [B, L]".into()));
        };
        let ids = session.program().entry("decode").and_then(|e| e.inputs.iter().find(|io| io.name == "input_ids"));
        let rows = ids.and_then(|io| io.operand.ty.shape.first().copied()).unwrap_or(batch);
        if !rows.is_multiple_of(batch) {
            return Err(Error::Usage(format!("decode runs {rows} rows, not a multiple of the prefill's {batch}")));
        }
        Ok(Generator::loaded(session, (batch, rows / batch), bucket, meta))
    }

    /// Compiles `dir` for `batch` rows, a prompt bucket of `bucket` tokens and up to
    /// `max_new_tokens` new tokens per call, and loads it on `backend`.
    pub fn new(dir: &Path, batch: usize, bucket: usize, max_new_tokens: usize, backend: &str) -> Result<Self> {
        Self::with_dtype(dir, batch, bucket, max_new_tokens, backend, DType::F32)
    }

    /// [`Generator::new`] computing in `dtype` (f32, or bf16 on the GPU backends: weights,
    /// activations and the KV cache in bf16; logits are read back as f32).
    pub fn with_dtype(dir: &Path, batch: usize, bucket: usize, max_new_tokens: usize, backend: &str, dtype: DType) -> Result<Self> {
        Self::with_rows(dir, (batch, 1), bucket, max_new_tokens, backend, dtype)
    }

    /// [`Generator::with_dtype`] decoding `rows_per_input` rows per prompt (`--num-samples`,
    /// `--num-beams`; see [`generation_program_rows`]).
    pub fn with_rows(
        dir: &Path,
        (batch, rows_per_input): (usize, usize),
        bucket: usize,
        max_new_tokens: usize,
        backend: &str,
        dtype: DType,
    ) -> Result<Self> {
        Self::with_outputs(dir, (batch, rows_per_input), bucket, max_new_tokens, backend, dtype, false)
    }

    /// [`Generator::with_rows`] whose program also outputs the logits each token was chosen
    /// from when `step_logits` is set ([`Generated::step_logits`]; beam search needs them).
    pub fn with_outputs(
        dir: &Path,
        (batch, rows_per_input): (usize, usize),
        bucket: usize,
        max_new_tokens: usize,
        backend: &str,
        dtype: DType,
        step_logits: bool,
    ) -> Result<Self> {
        let ending = Ending { step_logits, beams: false };
        Self::with_load(
            dir,
            (batch, rows_per_input),
            bucket,
            max_new_tokens,
            (backend, dtype),
            ending,
            &crate::load::LoadOptions::default(),
        )
    }

    /// A generator for beam search with `num_beams` beams per input: its entries output beam
    /// search's candidates where the backend has the step (cpu, cuda), else the logits (cube);
    /// with `step_logits` the logits too.
    pub fn for_beams(
        dir: &Path,
        (batch, num_beams): (usize, usize),
        bucket: usize,
        max_new_tokens: usize,
        backend: &str,
        dtype: DType,
        step_logits: bool,
    ) -> Result<Self> {
        let ending = Ending { step_logits, beams: true };
        Self::with_load(dir, (batch, num_beams), bucket, max_new_tokens, (backend, dtype), ending, &crate::load::LoadOptions::default())
    }

    /// Compiles [`generation_program_for`] and loads it with the load options `load`
    /// (`crate::load`).
    pub fn with_load(
        dir: &Path,
        rows: (usize, usize),
        bucket: usize,
        max_new_tokens: usize,
        target: (&str, DType),
        ending: Ending,
        load: &crate::load::LoadOptions,
    ) -> Result<Self> {
        let g = generation_program_for(dir, rows, bucket, max_new_tokens, target, ending)?;
        let session = crate::load::session(g.program, Arc::new(WeightStore::open(dir)?), load)?;
        Ok(Generator::loaded(session, rows, bucket, g.meta))
    }

    /// A generator over a loaded session of `batch` inputs with `rows_per_input` rows each.
    fn loaded(session: Session, (batch, rows_per_input): (usize, usize), bucket: usize, meta: GenerationMeta) -> Self {
        let (selects, has_logits, samples_on_device, beam_candidates) = crate::select::ends_of(session.program());
        let (sampling, last_prefill, decode_run_s, beam_scores) = (None, Vec::new(), 0.0, None);
        Generator {
            session,
            batch,
            bucket,
            meta,
            last_prefill,
            sampling,
            rows_per_input,
            selects,
            has_logits,
            samples_on_device,
            beam_candidates,
            beam_scores,
            decode_run_s,
        }
    }

    /// Greedy generation for `input_ids [B, L]` with `attention_mask [B, L]` (left padding);
    /// PaliGemma also takes `pixel_values`, and the whole prompt is its prefix.
    pub fn generate(
        &mut self,
        input_ids: &[i64],
        attention_mask: &[i64],
        prompt_len: usize,
        max_new_tokens: usize,
        pixel_values: Option<&Tensor>,
    ) -> Result<Generated> {
        self.generate_streaming(input_ids, attention_mask, prompt_len, max_new_tokens, pixel_values, &mut |_| Ok(()))
    }

    /// [`Generator::generate`], calling `on_step` with each step's chosen ids `[B]` as soon as
    /// they are known (before the next decode step runs), so text can be streamed.
    pub fn generate_streaming(
        &mut self,
        input_ids: &[i64],
        attention_mask: &[i64],
        prompt_len: usize,
        max_new_tokens: usize,
        pixel_values: Option<&Tensor>,
        on_step: &mut dyn FnMut(&[i64]) -> Result<()>,
    ) -> Result<Generated> {
        let prompt = Prompt { input_ids, attention_mask, token_type_ids: None, len: prompt_len };
        self.generate_prompt(&prompt, max_new_tokens, pixel_values, on_step)
    }

    /// [`Generator::generate_streaming`] for a [`Prompt`]; PaliGemma's `token_type_ids` (0 for
    /// the prefix, 1 for a forced suffix start), when given, say which prompt tokens are prefix.
    pub fn generate_prompt(
        &mut self,
        prompt: &Prompt,
        max_new_tokens: usize,
        pixel_values: Option<&Tensor>,
        on_step: &mut dyn FnMut(&[i64]) -> Result<()>,
    ) -> Result<Generated> {
        let Prefilled { first, mut mask, mut next_pos, prefill_s } = self.prefill_rows(prompt, max_new_tokens, pixel_values)?;
        let mut chosen = first;
        let (n_in, s, c, v) = (self.batch, self.bucket, self.meta.capacity, self.meta.vocab);
        let (per, prompt_len) = (self.rows_per_input, prompt.len);
        let b = n_in * per;
        let (mut decode_s, mut decode_steps) = (0.0, 0);
        self.decode_run_s = 0.0;
        let loop_start = std::time::Instant::now();
        let mut seqs: Vec<Vec<i64>> =
            (0..b).map(|r| prompt.input_ids[(r / per) * prompt_len..(r / per + 1) * prompt_len].to_vec()).collect();
        let mut step_logits: Vec<Vec<f32>> = vec![vec![]; b];
        let mut logprobs: Vec<Vec<f32>> = vec![vec![]; b];
        let mut done = vec![false; b];
        let mut n = 0;
        for t in 0..max_new_tokens {
            let mut next = vec![0i64; b];
            for r in 0..b {
                let row = chosen.logits.get(r * v..(r + 1) * v);
                if let Some(row) = row {
                    step_logits[r].extend_from_slice(row);
                }
                // Sample j of input i draws from stream i + j * B: sample 0 of every input is the
                // sequence a single sample per input gives (the selection step's streams).
                let stream = (r / per + (r % per) * n_in) as u64;
                let padded = done[r] && self.meta.pad_finished;
                // The device's ids are greedy only where it does not sample (cube).
                let device = chosen.ids.as_ref().filter(|_| self.sampling.is_none() || self.samples_on_device);
                let (id, lp) = match (device, row, &self.sampling) {
                    _ if padded => (self.meta.pad, 0.0),
                    (Some((ids, lps)), _, _) => (ids[r], lps[r]),
                    (None, Some(row), sp) => {
                        let id = match sp {
                            Some(sp) => sp.pick(row, crate::encdec::uniform(sp.seed, stream, t as u64)),
                            None => argmax(row),
                        };
                        (id as i64, (row[id] as f64 - crate::sampling::log_sum_exp(row)) as f32)
                    }
                    (None, None, Some(_)) if chosen.ids.is_some() => {
                        return Err(Error::Usage(
                            "this backend samples on the host from the logits, and this program outputs only greedy ids (compile it with step logits)"
                                .into(),
                        ))
                    }
                    (None, None, _) => return Err(Error::Usage("the program output neither ids nor logits".into())),
                };
                next[r] = id;
                logprobs[r].push(lp);
                seqs[r].push(next[r]);
                if self.meta.eos.contains(&next[r]) {
                    done[r] = true;
                }
            }
            n += 1;
            on_step(&next)?;
            if done.iter().all(|&d| d) || t + 1 == max_new_tokens {
                break;
            }
            let slot = s + t;
            for r in 0..b {
                mask[r * c + slot] = 1;
            }
            let t1 = std::time::Instant::now();
            chosen = self.decode_choose(&next, &mask, &next_pos, slot, t + 1)?;
            next_pos.iter_mut().for_each(|p| *p += 1);
            decode_s += t1.elapsed().as_secs_f64();
            decode_steps += 1;
        }
        let host_s = (loop_start.elapsed().as_secs_f64() - self.decode_run_s).max(0.0);
        Ok(Generated {
            decode_run_s: self.decode_run_s,
            host_s,
            sequences: seqs.concat(),
            step_logits: step_logits.concat(),
            logprobs: logprobs.concat(),
            prompt_len,
            new_tokens: n,
            prefill_s,
            decode_s,
            decode_steps,
        })
    }

    /// One decode step choosing token `step` ([`crate::select`]); the logits only where the
    /// program outputs them (soft-capped where the model caps its decode steps).
    pub(crate) fn decode_choose(&mut self, next: &[i64], mask: &[i64], pos: &[i64], slot: usize, step: usize) -> Result<Chosen> {
        let (b, c) = (next.len(), self.meta.capacity);
        let (ids, mask, pos) = (Tensor::from_i64(&[b, 1], next), Tensor::from_i64(&[b, c], mask), Tensor::from_i64(&[b, 1], pos));
        let at = Tensor::from_i64(&[1], &[slot as i64]);
        let sel = crate::select::inputs(self.sampling.as_ref(), step);
        let scores = self.beam_candidates.and(self.beam_scores.clone());
        let mut ins: Vec<(&str, &Tensor)> =
            vec![("input_ids", &ids), ("attention_mask", &mask), ("position_ids", &pos), ("cache_position", &at)];
        crate::select::add_inputs(&mut ins, &sel, self.samples_on_device, scores.as_ref());
        let t = std::time::Instant::now();
        let outs = self.session.run("decode", &ins)?;
        self.decode_run_s += t.elapsed().as_secs_f64();
        let mut chosen = self.chosen(&outs)?;
        self.read_kept_logits(&mut chosen)?;
        // A program that chooses its tokens caps the logits itself.
        if let (Some(cap), false) = (self.meta.decode_softcap, self.selects) {
            chosen.logits.iter_mut().for_each(|z| *z = cap * (*z / cap).tanh());
        }
        Ok(chosen)
    }

    /// What an entry's outputs say about the next token: ids and log-probabilities where the
    /// program chose them, beam search's candidates where it output them, the logits where it
    /// outputs them.
    fn chosen(&self, outs: &[(String, Tensor)]) -> Result<Chosen> {
        let get = |n: &str| outs.iter().find(|(k, _)| k == n).map(|(_, t)| t);
        let logits = get("logits").map(|t| t.to_f32()).unwrap_or_default();
        let pair = |i: &str, l: &str| match (get(i), get(l)) {
            (Some(i), Some(l)) => Some((i.to_f64().iter().map(|&x| x as i64).collect(), l.to_f32())),
            _ => None,
        };
        let (ids, beams) = (pair("ids", "logprobs"), pair("beam_ids", "beam_logprobs"));
        if ids.is_none() && beams.is_none() && logits.is_empty() {
            return Err(Error::Usage("the program outputs neither ids and logprobs, beam candidates nor logits".into()));
        }
        Ok(Chosen { ids, beams, logits })
    }

    /// Checks `prompt`, runs the prefill on its `B` rows and, with several rows per input,
    /// copies each row's KV cache to its rows by [`Session::gather_state_rows`] (row `i * n + j`
    /// gets input `i`'s): the first logits, the mask over the cache and the next positions,
    /// one per decode row.
    pub(crate) fn prefill_rows(&mut self, prompt: &Prompt, max_new_tokens: usize, pixel_values: Option<&Tensor>) -> Result<Prefilled> {
        let Prompt { input_ids, attention_mask, token_type_ids, len: prompt_len } = *prompt;
        let (b, s, c, v) = (self.batch, self.bucket, self.meta.capacity, self.meta.vocab);
        if input_ids.len() != b * prompt_len
            || attention_mask.len() != b * prompt_len
            || token_type_ids.is_some_and(|t| t.len() != b * prompt_len)
        {
            return Err(Error::Usage(format!("input_ids, attention_mask and token_type_ids must be [{b}, {prompt_len}]")));
        }
        if prompt_len > s {
            return Err(Error::Usage(format!("the prompt has {prompt_len} tokens but this profile holds {s} (compile a larger bucket)")));
        }
        if max_new_tokens > c - s {
            return Err(Error::Usage(format!("{max_new_tokens} new tokens do not fit the cache ({} slots after the prompt)", c - s)));
        }
        // An image token may lie past the vocabulary (big_vision's PaliGemma has no row for it).
        let img_tok = self.meta.image.as_ref().map(|(t, _, _)| *t);
        for (i, &t) in input_ids.iter().enumerate() {
            if (t < 0 || t as usize >= v) && Some(t) != img_tok {
                return Err(Error::Usage(format!(
                    "input_ids[{}, {}] = {t} is out of range for a vocabulary of {v}",
                    i / prompt_len,
                    i % prompt_len
                )));
            }
        }
        let converted;
        let image = match (&self.meta.image, pixel_values) {
            (Some((tok, n, ty)), Some(px)) => {
                // f32 pixels for a bf16 profile are converted.
                let px = if px.ty.shape == ty.shape && px.ty.dtype != ty.dtype && px.ty.dtype.is_float() {
                    converted = Tensor { bytes: kiln_runtime::tensor::convert(px.ty.dtype, ty.dtype, &px.bytes), ty: ty.clone() };
                    &converted
                } else {
                    px
                };
                if px.ty != *ty {
                    return Err(Error::Usage(format!("pixel_values is {}, this model takes {ty}", px.ty)));
                }
                for r in 0..b {
                    let k = input_ids[r * prompt_len..(r + 1) * prompt_len].iter().filter(|&&t| t == *tok).count();
                    if k != *n {
                        return Err(Error::Usage(format!("row {r} of input_ids holds {k} image tokens ({tok}); the image gives {n}")));
                    }
                }
                Some(px)
            }
            (Some(_), None) => return Err(Error::Usage("this is an image model: give pixel_values (or --image)".into())),
            (None, Some(_)) => return Err(Error::Usage("this model takes no image".into())),
            (None, None) => None,
        };
        let (ids, mask, types) = self.left_pad(prompt);
        let mut pos = vec![0i64; b * s];
        let mut next_pos = vec![0i64; b];
        for r in 0..b {
            let mut acc = 0;
            for j in 0..s {
                acc += mask[r * c + j];
                pos[r * s + j] = if mask[r * c + j] == 0 { 1 } else { acc - 1 } + self.meta.position_offset;
            }
            next_pos[r] = acc + self.meta.position_offset;
        }
        let prefill_mask: Vec<i64> = (0..b).flat_map(|r| mask[r * c..r * c + s].to_vec()).collect();
        let sel = crate::select::inputs(self.sampling.as_ref(), 0);
        let scores = self.beam_candidates.and(self.beam_scores.clone());
        // No reset: prefill writes the bucket's rows and decode each next row before any
        // attention reads it, so an earlier generation's rows are never read.
        let t0 = std::time::Instant::now();
        let (ids_t, mask_t, pos_t) =
            (Tensor::from_i64(&[b, s], &ids), Tensor::from_i64(&[b, s], &prefill_mask), Tensor::from_i64(&[b, s], &pos));
        let types = Tensor::from_i64(&[b, s], &types);
        let mut ins: Vec<(&str, &Tensor)> = vec![("input_ids", &ids_t), ("attention_mask", &mask_t), ("position_ids", &pos_t)];
        if let Some(px) = image {
            ins.push(("pixel_values", px));
            ins.push(("token_type_ids", &types));
        }
        crate::select::add_inputs(&mut ins, &sel, self.samples_on_device, scores.as_ref());
        let outs = self.session.run("prefill", &ins)?;
        let mut first = self.chosen(&outs)?;
        let per = self.rows_per_input;
        if per > 1 {
            let rows: Vec<usize> = (0..b * per).map(|r| r / per).collect();
            self.session.gather_state_rows(&rows)?;
        }
        self.read_kept_logits(&mut first)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        self.last_prefill = ins.iter().map(|(n, t)| (n.to_string(), (*t).clone())).collect();
        let spread = |x: &[i64], w: usize| (0..b * per).flat_map(|r| x[(r / per) * w..(r / per + 1) * w].to_vec()).collect::<Vec<_>>();
        if !self.selects {
            // The host chooses: each input's logits serve its rows (a selecting program
            // spreads them itself).
            first.logits = (0..b * per).flat_map(|r| first.logits[(r / per) * v..(r / per + 1) * v].to_vec()).collect();
        }
        Ok(Prefilled { first, mask: spread(&mask, c), next_pos: spread(&next_pos, 1), prefill_s })
    }
}

impl Generator {
    /// Reads the logits a greedy-only program keeps on the device
    /// ([`crate::select::LOGITS_STATE`]) into `chosen` when the host samples from them.
    fn read_kept_logits(&mut self, chosen: &mut Chosen) -> Result<()> {
        if self.sampling.is_some() && !self.samples_on_device && chosen.logits.is_empty() {
            if let Some(t) = self.session.state(crate::select::LOGITS_STATE)? {
                chosen.logits = t.to_f32();
            }
        }
        Ok(())
    }
}

/// What [`Generator::prefill_rows`] leaves for the decode steps, one entry per decode row.
pub(crate) struct Prefilled {
    /// The first token's choice, one row per decode row.
    pub first: Chosen,
    /// `[R, capacity]`.
    pub mask: Vec<i64>,
    pub next_pos: Vec<i64>,
    pub prefill_s: f64,
}

/// One step's outcome for its `R` rows.
pub(crate) struct Chosen {
    /// The ids `[R]` and their log-probabilities `[R]`, where the program chose them.
    pub ids: Option<(Vec<i64>, Vec<f32>)>,
    /// Beam search's candidates `[R, n]` and their scores `[R, n]` (the beam's score plus the
    /// token's log-probability), where the program output them.
    pub beams: Option<(Vec<i64>, Vec<f32>)>,
    /// The logits `[R, V]` where the program outputs them (else empty).
    pub logits: Vec<f32>,
}

impl Generator {
    /// The prompt left-padded to the bucket: ids `[B, bucket]`, the mask over the whole cache
    /// `[B, capacity]` (padding and the slots still to come 0), token types `[B, bucket]`.
    fn left_pad(&self, p: &Prompt) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let (b, s, c, l) = (self.batch, self.bucket, self.meta.capacity, p.len);
        let extra = s - l;
        let mut ids = vec![self.meta.pad; b * s];
        let mut mask = vec![0i64; b * c];
        let mut types = vec![0i64; b * s];
        for r in 0..b {
            let row = r * l..(r + 1) * l;
            ids[r * s + extra..(r + 1) * s].copy_from_slice(&p.input_ids[row.clone()]);
            mask[r * c + extra..r * c + s].copy_from_slice(&p.attention_mask[row.clone()]);
            if let Some(t) = p.token_type_ids {
                types[r * s + extra..(r + 1) * s].copy_from_slice(&t[row]);
            }
        }
        (ids, mask, types)
    }
}

/// One program step's time: (kernel, op, seconds).
pub type StepTime = (String, &'static str, f64);

impl Generator {
    /// Times the last `generate` call's prefill again, kernel by kernel (each step synchronised):
    /// where the time to first token goes. It rewrites the prompt's cache slots with the same
    /// values, so call it after a generation, not in the middle of one.
    pub fn profile_prefill(&mut self) -> Result<(Vec<StepTime>, f64)> {
        if self.last_prefill.is_empty() {
            return Err(Error::Usage("profile_prefill needs a generation first".into()));
        }
        let ins: Vec<(&str, &Tensor)> = self.last_prefill.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let t = std::time::Instant::now();
        let steps = self.session.profile("prefill", &ins)?;
        Ok((steps, t.elapsed().as_secs_f64()))
    }

    /// One decode step with each program step run and timed alone (`kiln generate
    /// --breakdown`): (kernel, op, seconds) per step and the whole call's seconds. It writes
    /// the cache's last slot, so call it after a generation, not in the middle of one.
    pub fn profile_decode(&mut self) -> Result<(Vec<StepTime>, f64)> {
        let (b, c) = (self.batch * self.rows_per_input, self.meta.capacity);
        let slot = c - 1;
        let ids = Tensor::from_i64(&[b, 1], &vec![self.meta.pad; b]);
        let mask = Tensor::from_i64(&[b, c], &vec![1; b * c]);
        let pos = Tensor::from_i64(&[b, 1], &vec![slot as i64 + self.meta.position_offset; b]);
        let at = Tensor::from_i64(&[1], &[slot as i64]);
        let sel = crate::select::inputs(self.sampling.as_ref(), 1);
        let mut ins: Vec<(&str, &Tensor)> =
            vec![("input_ids", &ids), ("attention_mask", &mask), ("position_ids", &pos), ("cache_position", &at)];
        let scores = self.beam_candidates.map(|_| Tensor::from_f32(&[b], &vec![0.0; b]));
        crate::select::add_inputs(&mut ins, &sel, self.samples_on_device, scores.as_ref());
        let t = std::time::Instant::now();
        let steps = self.session.profile("decode", &ins)?;
        Ok((steps, t.elapsed().as_secs_f64()))
    }
}

/// The index of the largest value, the first one on ties (as `torch.argmax`).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}
