//! kiln's model builders: a config struct and a builder that reads like the paper per model
//! family, shared layers, strict config parsing and checkpoint indexing.

pub mod big_vision;
pub mod checkpoint;
pub mod config;
pub mod ensemble;
pub mod error;
pub mod gemma;
pub mod jet;
pub mod layers;
pub mod locations;
pub mod paligemma;
pub mod registry;
pub mod siglip;

pub use checkpoint::Checkpoint;
pub use error::{ModelError, Result};

use kiln_graph::{DType, Graph};
use std::path::Path;

/// What a compile fixes besides the checkpoint: every dimension of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub batch: usize,
    /// Image height and width; `None` uses the checkpoint's resolution.
    pub image_hw: Option<(usize, usize)>,
    /// The compute dtype.
    pub dtype: DType,
    /// Mixture-of-experts settings (V-MoE); ignored by dense models.
    pub moe: MoeOptions,
    /// Text models: the token length (the prompt bucket for generation).
    pub seq_len: Option<usize>,
}

impl Default for Profile {
    fn default() -> Self {
        Profile { batch: 1, image_hw: None, dtype: DType::F32, moe: MoeOptions::default(), seq_len: None }
    }
}

/// Compile-time overrides of a V-MoE config's routing, and what routing the graph reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeOptions {
    /// Capacity ratio C (the dispatcher's `capacity_factor`); `None` keeps the config's.
    pub capacity_factor: Option<f64>,
    /// Batch-prioritized routing on or off; `None` keeps the config's `batch_priority`.
    pub batch_priority: Option<bool>,
    /// Extra outputs per MoE layer.
    pub outputs: MoeOutputs,
}

/// Which routing tensors a V-MoE graph also outputs, per MoE layer `moe/<block>/...`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeOutputs {
    /// Only the model's outputs.
    #[default]
    None,
    /// `expert [G, S, K]`: the expert each assignment went to, -1 where it was dropped
    /// (what `kiln run --moe-stats` counts).
    Stats,
    /// `expert`, plus vmoe's `gates_softmax [G,S,E]`, `dispatch_weights [G,S,E,Cap]` and
    /// `combine_weights [G,S,E,Cap]` (for tests against the reference).
    Debug,
}

/// A model built from a folder: one graph per entry (`forward`; Jet adds `inverse`), a
/// description, and the checkpoint they all read.
pub struct Built {
    pub entries: Vec<(String, Graph)>,
    pub description: String,
    pub checkpoint: Checkpoint,
}

impl Built {
    /// The graph of entry `name`.
    pub fn graph(&self, name: &str) -> Option<&Graph> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, g)| g)
    }
}

/// Builds the graph of the model in `dir` (a Hugging Face or big_vision folder) for `profile`:
/// the family the folder's `config.json` names (see [`registry`]) builds it.
pub fn build(dir: &Path, profile: &Profile) -> Result<Built> {
    let cfg_path = config_path(dir)?;
    let family = registry::family_of(&cfg_path)?;
    (family.build)(&cfg_path, Checkpoint::open(dir)?, profile)
}

/// A folder's `config.json`, which must exist.
fn config_path(dir: &Path) -> Result<std::path::PathBuf> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(ModelError::Unsupported(format!("{}: no config.json (is this a model folder?)", dir.display())));
    }
    Ok(cfg_path)
}

/// Builds a text model's `forward` (the families `gemma` and `paligemma`).
pub(crate) fn build_text(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile) -> Result<Built> {
    let tm = text_model(cfg_path)?.ok_or_else(|| ModelError::Unsupported(format!("{}: not a text model", cfg_path.display())))?;
    let seq = seq_len(profile)?;
    let mut m = layers::Builder::new(&checkpoint, profile.dtype);
    tm.build(&mut m, profile.batch, seq, gemma::Mode::Forward)?;
    let (graph, description) = (m.g, describe(&tm, profile, seq));
    Ok(Built { entries: vec![("forward".to_string(), graph)], description, checkpoint })
}

/// A model with a text decoder.
#[derive(Clone, Debug, PartialEq)]
pub enum TextModel {
    Gemma(gemma::GemmaConfig),
    PaliGemma(paligemma::PaliGemmaConfig),
}

impl TextModel {
    /// The decoder's config.
    pub fn text(&self) -> &gemma::GemmaConfig {
        match self {
            TextModel::Gemma(c) => c,
            TextModel::PaliGemma(c) => &c.text,
        }
    }

    /// Builds the graph for `mode` into `m`.
    pub fn build(&self, m: &mut layers::Builder, batch: usize, seq: usize, mode: gemma::Mode) -> Result<()> {
        match self {
            TextModel::Gemma(c) => gemma::build(m, c, batch, seq, mode),
            TextModel::PaliGemma(c) => paligemma::build(m, c, batch, seq, mode),
        }
    }
}

/// The config of a text model (Gemma, Gemma 2, PaliGemma), or `None` for another model type.
pub fn text_model(cfg_path: &Path) -> Result<Option<TextModel>> {
    if let (true, name) = registry::kind_of(cfg_path)? {
        if name != "proj.paligemma.paligemma" {
            return Ok(None);
        }
        let ck = Checkpoint::open(cfg_path.parent().unwrap_or(Path::new(".")))?;
        return Ok(Some(TextModel::PaliGemma(big_vision::paligemma::read(cfg_path, &ck, None)?)));
    }
    let mut r = config::ConfigReader::open(cfg_path)?;
    let mt = r.str_or("model_type", Some(""))?;
    let r = config::ConfigReader::open(cfg_path)?;
    match mt.as_str() {
        "gemma" | "gemma2" => Ok(Some(TextModel::Gemma(gemma::GemmaConfig::read(r)?))),
        "paligemma" => Ok(Some(TextModel::PaliGemma(paligemma::PaliGemmaConfig::read(r)?))),
        _ => Ok(None),
    }
}

fn seq_len(profile: &Profile) -> Result<usize> {
    match profile.seq_len {
        Some(s) if s > 0 => Ok(s),
        _ => Err(ModelError::Unsupported("a text model needs a token length in its profile (the input_ids length)".into())),
    }
}

fn describe(tm: &TextModel, profile: &Profile, seq: usize) -> String {
    let cfg = tm.text();
    let what = match tm {
        TextModel::Gemma(_) => String::new(),
        TextModel::PaliGemma(p) => {
            format!("PaliGemma (SigLIP {}x{} at {} px) + ", p.vision.hidden_size, p.vision.num_hidden_layers, p.vision.image_size)
        }
    };
    format!(
        "{what}{:?} hidden {} layers {} heads {}/{} (head_dim {}) ffn {} vocab {}, batch {}, {} tokens, {}",
        cfg.family,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
        profile.batch,
        seq,
        profile.dtype
    )
}

/// The two graphs of a generation profile and the state they share.
pub struct Generation {
    /// `prefill`: the prompt bucket in, last-position logits and the filled cache out.
    pub prefill: Graph,
    /// `decode`: one token per row over the cache.
    pub decode: Graph,
    /// The persistent state (the KV cache), by name.
    pub states: Vec<(String, kiln_graph::TensorType)>,
    pub model: TextModel,
    pub description: String,
    pub checkpoint: Checkpoint,
}

/// Builds the prefill and decode graphs of the text model in `dir` for a prompt bucket of
/// `profile.seq_len` tokens and a cache of `capacity` slots.
pub fn build_generation(dir: &Path, profile: &Profile, capacity: usize) -> Result<Generation> {
    let cfg_path = config_path(dir)?;
    let family = registry::family_of(&cfg_path)?;
    let generate = family.generation.ok_or_else(|| {
        let can: Vec<&str> = registry::FAMILIES.iter().filter(|f| f.generation.is_some()).map(|f| f.name).collect();
        ModelError::Unsupported(format!(
            "{}: a {} model does not generate text (generation: {})",
            cfg_path.display(),
            family.name,
            can.join(", ")
        ))
    })?;
    generate(&cfg_path, Checkpoint::open(dir)?, profile, capacity)
}

/// Builds a text model's `prefill` and `decode` over a cache of `capacity` slots (the
/// `generation` of the families `gemma` and `paligemma`).
pub(crate) fn build_text_generation(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile, capacity: usize) -> Result<Generation> {
    let tm = text_model(cfg_path)?.ok_or_else(|| ModelError::Unsupported(format!("{}: not a text model", cfg_path.display())))?;
    let seq = seq_len(profile)?;
    let mut m = layers::Builder::new(&checkpoint, profile.dtype);
    tm.build(&mut m, profile.batch, seq, gemma::Mode::Prefill { capacity })?;
    let prefill = m.g;
    let mut m = layers::Builder::new(&checkpoint, profile.dtype);
    tm.build(&mut m, profile.batch, seq, gemma::Mode::Decode { capacity })?;
    let decode = m.g;
    let states = gemma::cache_states(tm.text(), profile.batch, capacity, profile.dtype);
    let description = format!("{}, cache {capacity}", describe(&tm, profile, seq));
    Ok(Generation { prefill, decode, states, model: tm, description, checkpoint })
}
