//! JetFormer: "JetFormer: An Autoregressive Generative Model of Raw Images and Text"
//! (Tschannen, Pinto, Kolesnikov; arXiv 2411.19722). Matches big_vision @ 0127fb6:
//! `models/proj/jetformer/jetformer.py` (`Model`), `models/proj/jetformer/patch_pca.py`
//! (`skip_pca`: patchify only), `models/proj/jet/jet.py` (the adaptor flow),
//! `trainers/proj/jetformer/train.py` (`loss_fn`, inference form) and
//! `trainers/proj/jetformer/predict_fns.py` (`decode_images`, the samplers' scoring).
//! ../shared/JETFORMER.md has the layout, the sequence rules and the pitfalls.
//!
//! An image is patchified, the Jet flow maps the patches to latents (with its logdet), the
//! first `out_dim` latent channels are the soft image tokens and the rest is factored-out noise
//! under N(0, 1). A Gemma v1 decoder reads `[bos, text, (boi), image]` or `[(boi|bos), image,
//! (bos), text]` per row and predicts text with a softmax head and image tokens with a Gaussian
//! mixture head. The decoder is kiln's Gemma builder; its weights are read through aliases
//! (views of big_vision's einsum arrays, as the big_vision PaliGemma folder does).

mod i2t;
mod seq;
mod t2i;

use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::gemma::{Family as GemmaFamily, GemmaConfig};
use crate::jet::JetConfig;
use crate::layers::{Activation, Builder};
use crate::registry::{Family, Given, Init, Kind, SynthRecipe, SynthRow, WeightFormat};
use crate::{Built, Checkpoint, Profile};
use kiln_graph::{DType, Graph};
use std::collections::BTreeMap;
use std::path::Path;

pub use i2t::build_captioner;
pub use seq::Dims;
pub use t2i::prompt_len;

/// The big_vision `model_name` of the transformer (the folder's top-level `model_name`).
pub const MODEL_NAME: &str = "proj.jetformer.jetformer";
/// The prefix the decoder's aliased (Hugging Face style) names carry.
const P: &str = "jetformer.decoder.";

/// `Model`'s keyword arguments, the patchifier's and the adaptor's, as kiln builds them.
#[derive(Clone, Debug, PartialEq)]
pub struct JetFormerConfig {
    pub width: usize,
    pub depth: usize,
    pub mlp_dim: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Text vocabulary V (special tokens included); `EmbedText` has `V * num_vocab_repeats` rows.
    pub vocab_size: usize,
    pub bos_id: usize,
    pub boi_id: Option<usize>,
    /// The unconditional (classifier-free guidance) token; without it there is no `drop_prefix`.
    pub nolabel_id: Option<usize>,
    pub num_vocab_repeats: usize,
    pub causal_mask_on_prefix: bool,
    pub untie_output_vocab: bool,
    /// M mixture components over `out_dim` = D dimensions per image token.
    pub num_mixtures: usize,
    pub out_dim: usize,
    pub scale_tol: f64,
    /// `head_dtype: bfloat16`: the image head's Dense runs in bfloat16.
    pub head_bf16: bool,
    pub per_modality_final_norm: bool,
    /// `patch_pca`: the image size the model was configured for, and the patch.
    pub input_size: (usize, usize),
    pub patch: (usize, usize),
    /// The adaptor flow (`adaptor_name: proj.jet.jet`), or none (`adaptor_name: ""`).
    pub jet: Option<JetConfig>,
    /// Latent channels factored out (the last ones of each token).
    pub latent_noise_dim: usize,
    /// The trainer config's `text_len` (`tolen` of its text preprocessing; 64 in
    /// `jetformer_image_text.py`): the length text prompts are cut or padded to.
    pub text_len: usize,
    /// The trainer config's `ignore_pad`: padding (and the EOS) hidden from attention and
    /// padded with 0, instead of padded with 1 and attended to (the official default, false).
    pub ignore_pad: bool,
}

impl JetFormerConfig {
    /// Reads a folder's `config.json` (the trainer-config layout of JETFORMER.md §6).
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut top = ConfigReader::open(path)?;
        let name = top.str_or("model_name", None)?;
        if name != MODEL_NAME {
            return Err(top.unsupported("model_name", format!("'{name}' is not '{MODEL_NAME}'")));
        }
        let model = top.object("model")?.ok_or_else(|| top.unsupported("model", "missing: the Model's keyword arguments"))?;
        let pp = top.object("patch_pca")?.ok_or_else(|| top.unsupported("patch_pca", "missing: the patchifier's config"))?;
        let (input_size, patch) = read_patch_pca(pp)?;
        let adaptor_name = if top.is_null("adaptor_name") { String::new() } else { top.str_or("adaptor_name", Some(""))? };
        top.skip(&["adaptor_name"]);
        let jet = match adaptor_name.as_str() {
            "" => {
                top.skip(&["adaptor"]);
                None
            }
            "proj.jet.jet" => {
                let mut a = top.object("adaptor")?.ok_or_else(|| top.unsupported("adaptor", "missing: the Jet's config"))?;
                let kw = a.object("model")?.ok_or_else(|| a.unsupported("model", "missing: the Jet Model's keyword arguments"))?;
                let jet = JetConfig::read(kw)?;
                a.finish()?;
                Some(jet)
            }
            other => return Err(top.unsupported("adaptor_name", format!("'{other}': kiln builds JetFormer with 'proj.jet.jet' or none"))),
        };
        let latent_noise_dim = top.usize_or("latent_noise_dim", Some(0))?;
        let text_len = top.usize_or("text_len", Some(64))?;
        let ignore_pad = top.bool_or("ignore_pad", false)?;
        let mut c = read_model(model)?;
        top.finish()?;
        c.input_size = input_size;
        c.patch = patch;
        c.jet = jet;
        c.latent_noise_dim = latent_noise_dim;
        c.text_len = text_len;
        c.ignore_pad = ignore_pad;
        c.check(path)?;
        Ok(c)
    }

    /// Values per patch (`p * q * 3`), the flow's width.
    pub fn token_dim(&self) -> usize {
        self.patch.0 * self.patch.1 * 3
    }

    /// Image-head outputs per token: `M + 2 M D` (mixture logits, then per mixture loc and scale).
    pub fn num_logits(&self) -> usize {
        self.num_mixtures + 2 * self.num_mixtures * self.out_dim
    }

    /// Text-head outputs: V (untied head) or `V * R` (tied to `EmbedText`).
    pub fn text_logits(&self) -> usize {
        if self.untie_output_vocab {
            self.vocab_size
        } else {
            self.vocab_size * self.num_vocab_repeats
        }
    }

    /// The Gemma v1 block settings big_vision's `GemmaBackbone` fixes (`block_kw`).
    pub fn gemma(&self) -> GemmaConfig {
        GemmaConfig {
            family: GemmaFamily::Gemma,
            vocab_size: self.vocab_size * self.num_vocab_repeats,
            hidden_size: self.width,
            intermediate_size: self.mlp_dim,
            num_hidden_layers: self.depth,
            num_attention_heads: self.num_heads,
            num_key_value_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            act: Activation::GeluTanh,
            // big_vision's RMSNorm hard-codes 1e-6 (`norm_eps` is not passed on).
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            attention_bias: false,
            query_pre_attn_scalar: self.head_dim as f64,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            windows: vec![None; self.depth],
            tie_word_embeddings: true,
            pad_token_id: None,
            eos_token_ids: vec![],
            bos_token_id: Some(self.bos_id as i64),
        }
    }

    /// What the kwargs must agree on (the asserts of `Model.setup` and `loss_fn`).
    fn check(&self, path: &Path) -> Result<()> {
        let refuse = |field: &str, msg: String| ModelError::Config { path: path.into(), field: field.into(), msg };
        let c = self.token_dim();
        if self.latent_noise_dim >= c || self.out_dim + self.latent_noise_dim != c {
            return Err(refuse(
                "latent_noise_dim",
                format!("out_dim {} + latent_noise_dim {} must be the {c} values of a patch", self.out_dim, self.latent_noise_dim),
            ));
        }
        if self.text_len == 0 {
            return Err(refuse("text_len", "0: text prompts need at least the EOS token".into()));
        }
        let (gh, gw) = super::grid(self.input_size, self.patch)?;
        if gh != gw {
            return Err(refuse("patch_pca.model.input_size", format!("a {gh}x{gw} patch grid: the latents are unflattened as a square")));
        }
        Ok(())
    }
}

/// `patch_pca` (`{"model_name": "proj.jetformer.patch_pca", "model": {..}}`): the image size and
/// patch. Only `skip_pca` (patchify, no PCA) is built; the dequantisation and PCA noise are
/// training-time randomness kiln's deterministic entries leave out (JETFORMER.md §2).
fn read_patch_pca(mut r: ConfigReader) -> Result<((usize, usize), (usize, usize))> {
    let name = r.str_or("model_name", Some("proj.jetformer.patch_pca"))?;
    if name != "proj.jetformer.patch_pca" {
        return Err(r.unsupported("model_name", format!("'{name}' is not 'proj.jetformer.patch_pca'")));
    }
    let mut m = r.object("model")?.ok_or_else(|| r.unsupported("model", "missing: the patchifier's keyword arguments"))?;
    r.finish()?;
    if !m.bool_or("skip_pca", false)? {
        return Err(m.unsupported("skip_pca", "false: kiln builds the official configs' skip_pca=True (patchify, no PCA file)"));
    }
    let d2s = m.usize_or("depth_to_seq", Some(1))?;
    if d2s != 1 {
        return Err(m.unsupported("depth_to_seq", format!("{d2s}: skip_pca needs 1")));
    }
    let input_size = super::pair(&mut m, "input_size", (256, 256))?;
    let patch = super::pair(&mut m, "patch_size", (16, 16))?;
    // With skip_pca these only size a PCA that is not there (`codeword_dim` must merely be set);
    // `noise_std` and `add_dequant_noise` add random noise that kiln's entries leave out.
    for f in ["code_len", "codeword_dim"] {
        if m.has(f) {
            m.usize_or(f, None)?;
        }
    }
    m.f64_or("noise_std", Some(0.01))?;
    m.bool_or("add_dequant_noise", false)?;
    m.bool_or("whiten", true)?;
    m.skip(&["pca_init_file"]);
    m.finish()?;
    Ok((input_size, patch))
}

/// The transformer's kwargs; the image fields are filled by the caller.
fn read_model(mut r: ConfigReader) -> Result<JetFormerConfig> {
    let width = r.usize_or("width", None)?;
    let depth = r.usize_or("depth", None)?;
    let mlp_dim = r.usize_or("mlp_dim", None)?;
    let num_heads = r.usize_or("num_heads", None)?;
    let num_kv_heads = r.usize_or("num_kv_heads", None)?;
    let head_dim = r.usize_or("head_dim", None)?;
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) || head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(r.unsupported("num_kv_heads", format!("{num_heads} heads over {num_kv_heads} kv heads of size {head_dim}")));
    }
    // Unused by big_vision's RMSNorm (1e-6 hard-coded), as here.
    r.f64_or("norm_eps", Some(1e-6))?;
    if r.f64_or("dropout", Some(0.0))? < 0.0 {
        return Err(r.unsupported("dropout", "must not be negative"));
    }
    // Training only (dropout is inert at inference; drop_labels draws the CFG labels), or the
    // parameter layout, which kiln reads from the file (scan or per layer).
    r.f64_or("drop_labels_probability", Some(0.0))?;
    r.bool_or("scan", false)?;
    r.skip(&["dropout_bdims", "remat_policy"]);
    let cache = if r.is_null("cache_dtype") { "float32".to_string() } else { r.str_or("cache_dtype", Some("float32"))? };
    r.skip(&["cache_dtype"]);
    if cache != "float32" {
        return Err(r.unsupported("cache_dtype", format!("'{cache}': kiln keeps the KV cache in the compute dtype (null or float32)")));
    }
    let embed = r.str_or("embed_dtype", Some("float32"))?;
    if embed != "float32" {
        return Err(r.unsupported("embed_dtype", format!("'{embed}': big_vision runs JetFormer's decoder in float32 only")));
    }
    let vocab_size = r.usize_or("vocab_size", Some(1000))?;
    let id = |r: &mut ConfigReader, f: &str| -> Result<Option<usize>> {
        if !r.has(f) {
            return Ok(None);
        }
        let v = r.usize_or(f, None)?;
        if v >= vocab_size {
            return Err(r.unsupported(f, format!("{v} is not below vocab_size {vocab_size}")));
        }
        Ok(Some(v))
    };
    let bos_id = id(&mut r, "bos_id")?.ok_or_else(|| r.unsupported("bos_id", "None: every JetFormer sequence has a bos token"))?;
    let boi_id = id(&mut r, "boi_id")?;
    let nolabel_id = id(&mut r, "nolabel_id")?;
    let num_vocab_repeats = r.usize_or("num_vocab_repeats", Some(1))?;
    let untie_output_vocab = r.bool_or("untie_output_vocab", false)?;
    if num_vocab_repeats == 0 || (untie_output_vocab && num_vocab_repeats != 1) {
        return Err(r.unsupported("num_vocab_repeats", format!("{num_vocab_repeats} (at least 1; an untied head needs 1)")));
    }
    if r.bool_or("multivariate", false)? {
        return Err(r.unsupported(
            "multivariate",
            "true: the full-covariance head is used by no official config; kiln builds the diagonal mixture",
        ));
    }
    let num_mixtures = r.usize_or("num_mixtures", Some(4))?;
    if num_mixtures == 0 {
        return Err(r.unsupported("num_mixtures", "must be at least 1"));
    }
    let head = r.str_or("head_dtype", Some("float32"))?;
    let head_bf16 = match head.as_str() {
        "float32" => false,
        "bfloat16" => true,
        other => return Err(r.unsupported("head_dtype", format!("'{other}' (float32 or bfloat16)"))),
    };
    let scale_tol = r.f64_or("scale_tol", Some(1e-6))?;
    let c = JetFormerConfig {
        width,
        depth,
        mlp_dim,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        bos_id,
        boi_id,
        nolabel_id,
        num_vocab_repeats,
        causal_mask_on_prefix: r.bool_or("causal_mask_on_prefix", true)?,
        untie_output_vocab,
        num_mixtures,
        out_dim: r.usize_or("out_dim", Some(32))?,
        scale_tol,
        head_bf16,
        per_modality_final_norm: r.bool_or("per_modality_final_norm", false)?,
        input_size: (0, 0),
        patch: (0, 0),
        jet: None,
        latent_noise_dim: 0,
        text_len: 64,
        ignore_pad: false,
    };
    r.finish()?;
    Ok(c)
}

/// The decoder's Gemma names as views of big_vision's `decoder/...` arrays (scan layout: a
/// leading depth axis; per-layer layout: `decoder/layers/<i>/...`).
fn aliases(cfg: &JetFormerConfig, ck: &Checkpoint) -> Result<BTreeMap<String, String>> {
    super::gemma_layer_aliases(ck, "decoder/layers", P, cfg.depth, (cfg.num_heads, cfg.num_kv_heads), false)
}

/// For `kiln synth`: the decoder's stacked arrays (scan layout) and a bfloat16 head's kernel,
/// which the builder reads only through views.
fn declare_decoder(cfg: &JetFormerConfig, ck: &mut Checkpoint) {
    let (l, w, f, h, k, hd) = (cfg.depth, cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let p = "decoder/layers/";
    ck.declare(&format!("{p}pre_attention_norm/scale"), &[l, w]);
    ck.declare(&format!("{p}pre_ffw_norm/scale"), &[l, w]);
    if k == h {
        ck.declare(&format!("{p}attn/qkv_einsum/w"), &[l, 3, h, w, hd]);
    } else {
        ck.declare(&format!("{p}attn/q_einsum/w"), &[l, h, w, hd]);
        ck.declare(&format!("{p}attn/kv_einsum/w"), &[l, 2, k, w, hd]);
    }
    ck.declare(&format!("{p}attn/attn_vec_einsum/w"), &[l, h, hd, w]);
    ck.declare(&format!("{p}mlp/gating_einsum"), &[l, 2, w, f]);
    ck.declare(&format!("{p}mlp/linear"), &[l, f, w]);
    if cfg.head_bf16 {
        // Read through `~bf16` views.
        ck.declare("LogitsImage/kernel", &[w, cfg.num_logits()]);
        ck.declare("LogitsImage/bias", &[cfg.num_logits()]);
    }
}

/// JetFormer-350M at 256 px (`configs/proj/jetformer/jetformer_image_text.py`, model_size
/// 350M): a 24-layer decoder 1024 wide (16 heads, one kv head of 64), 1024 mixtures of 128
/// dims, BOI, an untied text head over 32000 + 3 ids, a causal prefix; the Jet of 32 channel
/// couplings (block depth 4, width 512) on 16x16 patches, 640 of 768 dims factored out. The
/// image head is float32 here (the release config computes it in bfloat16, which kiln emulates
/// by rounding: the kernel once at load, the activations on every call).
fn synth_350m(seed: u64) -> Result<SynthRecipe> {
    let jet_kwargs = crate::jet::synth_kwargs(32, 4, 512, 8, 1, &["channels"], &["checkerboard", "checkerboard-inv"]);
    let jet = crate::jet::synth_recipe(jet_kwargs.clone(), 16, 768, seed)?;
    let given = jet.given.into_iter().map(|g| Given { name: format!("params_adaptor/{}", g.name), ..g }).collect();
    let model = serde_json::json!({
        "width": 1024, "depth": 24, "mlp_dim": 4096, "num_heads": 16, "num_kv_heads": 1, "head_dim": 64,
        "vocab_size": 32003, "bos_id": 32000, "boi_id": 32001, "nolabel_id": 32002, "num_mixtures": 1024, "out_dim": 128,
        "scale_tol": 1e-6, "drop_labels_probability": 0.1, "dropout": 0.1, "head_dtype": "float32", "scan": true,
        "remat_policy": "nothing_saveable", "untie_output_vocab": true, "causal_mask_on_prefix": true
    });
    let patch_pca = serde_json::json!({"model_name": "proj.jetformer.patch_pca", "model": {
        "depth_to_seq": 1, "input_size": [256, 256], "patch_size": [16, 16], "code_len": 256, "codeword_dim": 128,
        "noise_std": 0.0, "add_dequant_noise": true, "skip_pca": true}});
    let config = serde_json::json!({"model_name": MODEL_NAME, "model": model, "patch_pca": patch_pca,
        "adaptor_name": "proj.jet.jet", "adaptor": {"model": jet_kwargs}, "latent_noise_dim": 640});
    Ok(SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Npz, roots: &[""], given, batch: 1 })
}

/// Synthetic JetFormer weights: the Jet's by its rule; einsum kernels N(0, 1/fan_in) over their
/// input axis; RMSNorm offsets N(0, 0.05²) (the scale is `1 + w`); the token table N(0, 1);
/// the image head N(0, 0.01/width) (big_vision zero-initialises it), biases N(0, 0.02²).
pub fn synth_init(name: &str, shape: &[usize]) -> Init {
    if let Some(rest) = name.strip_prefix("params_adaptor/") {
        return crate::jet::synth_init(rest, shape);
    }
    let n = shape.len();
    match name {
        "EmbedText/embedding" => Init::Normal { mean: 0.0, std: 1.0 },
        "LogitsImage/kernel" => Init::Normal { mean: 0.0, std: 0.1 / (shape[0] as f32).sqrt() },
        _ if name.ends_with("/scale") => Init::Normal { mean: 0.0, std: 0.05 },
        _ if name.ends_with("/bias") => Init::BIAS,
        // [.., W, hd] projections read W; attn_vec [.., H, hd, W] reads H*hd; the rest [.., in, out].
        _ if name.ends_with("attn_vec_einsum/w") => Init::fan_in(shape[n - 3] * shape[n - 2]),
        _ => Init::fan_in(shape[n.saturating_sub(2)]),
    }
}

/// The entries of a JetFormer folder (JETFORMER.md §6), in the order `kiln inspect` lists them.
pub const ENTRIES: [&str; 6] = ["encode", "forward", "nll", "decode", "score_image_samples", "score_text_samples"];

/// Builds every entry for `profile`: the image size is the profile's (else `input_size`), the
/// text length its `seq_len` (else 1: entries without text ignore it).
pub fn build(cfg_path: &Path, mut ck: Checkpoint, profile: &Profile) -> Result<Built> {
    let cfg = JetFormerConfig::from_file(cfg_path)?;
    declare_decoder(&cfg, &mut ck);
    ck.aliases = aliases(&cfg, &ck)?;
    if profile.dtype != DType::F32 {
        return Err(ModelError::Unsupported(format!("compute dtype {}: big_vision runs JetFormer in float32", profile.dtype)));
    }
    let dims = Dims::new(&cfg, profile)?;
    let mut entries: Vec<(String, Graph)> = vec![];
    for name in ENTRIES {
        let mut m = Builder::new(&ck, DType::F32);
        seq::entry(&mut m, &cfg, dims, name)?;
        entries.push((name.to_string(), m.g));
    }
    let description = format!(
        "JetFormer: decoder width {} depth {} ({} heads, {} kv), {} mixtures of {} dims, {}x{} px in {}x{} patches ({} noise dims), {}, batch {}, text {}",
        cfg.width,
        cfg.depth,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.num_mixtures,
        cfg.out_dim,
        dims.hw.0,
        dims.hw.1,
        cfg.patch.0,
        cfg.patch.1,
        cfg.latent_noise_dim,
        cfg.jet.as_ref().map_or("no flow".to_string(), |j| format!("Jet depth {}", j.depth)),
        dims.b,
        dims.t
    );
    Ok(Built { entries, description, checkpoint: ck })
}

/// A text-to-image sampler's graphs: `t2i_prefill` and `t2i_step` for `rows` sequences (twice
/// the images under classifier-free guidance) over a KV cache of `capacity` = P + N - 1 slots,
/// and `decode` for `images` images.
pub struct Sampler {
    pub entries: Vec<(String, Graph)>,
    /// The KV cache, by name (the programs' persistent state).
    pub states: Vec<(String, kiln_graph::TensorType)>,
    pub cfg: JetFormerConfig,
    pub dims: Dims,
    pub prompt_len: usize,
    pub capacity: usize,
    pub description: String,
}

/// Builds the sampler of the folder `dir` for prompts of `t` tokens.
pub fn build_sampler(dir: &Path, rows: usize, images: usize, t: usize, image_hw: Option<(usize, usize)>) -> Result<Sampler> {
    let cfg_path = dir.join("config.json");
    let cfg = JetFormerConfig::from_file(&cfg_path)?;
    let mut ck = Checkpoint::open(dir)?;
    ck.aliases = aliases(&cfg, &ck)?;
    let profile = |batch: usize| Profile { batch, image_hw, seq_len: Some(t), ..Profile::default() };
    let dims = Dims::new(&cfg, &profile(rows))?;
    let prompt_len = t2i::prompt_len(&cfg, dims.t);
    let capacity = prompt_len + dims.n - 1;
    let mut entries = vec![];
    for name in ["t2i_prefill", "t2i_step", "decode"] {
        let mut m = Builder::new(&ck, DType::F32);
        match name {
            "t2i_prefill" => t2i::prefill_entry(&mut m, &cfg, dims, capacity)?,
            "t2i_step" => t2i::step_entry(&mut m, &cfg, dims, capacity)?,
            _ => seq::entry(&mut m, &cfg, Dims::new(&cfg, &profile(images))?, name)?,
        }
        entries.push((name.to_string(), m.g));
    }
    let states = crate::gemma::cache_states(&cfg.gemma(), rows, capacity, DType::F32);
    let description = format!(
        "JetFormer text-to-image sampler: {rows} sequences of a {prompt_len}-slot prompt and {} image tokens, {images} images of {}x{}",
        dims.n, dims.hw.0, dims.hw.1
    );
    Ok(Sampler { entries, states, cfg, dims, prompt_len, capacity, description })
}

/// The JetFormer family (`model_name: proj.jetformer.jetformer`).
pub static FAMILY: Family = Family {
    name: "jetformer",
    about: "big_vision JetFormer (model_name proj.jetformer.jetformer; params.npz): encode, forward, nll, decode, scoring",
    claims: |k| k == Kind::BigVision(MODEL_NAME),
    build,
    generation: None,
    synth: &[SynthRow {
        name: "jetformer-350m-256",
        about: "JetFormer-350M at 256 px: 24-layer decoder (1024 wide, MQA), 1024-mixture head, 32-coupling Jet on 16x16 patches (~1.1B params with the head and text tables)",
        recipe: synth_350m,
    }],
    init: synth_init,
};
