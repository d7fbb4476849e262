//! kiln's model builders: a config struct and a builder that reads like the paper per model
//! family, shared layers, strict config parsing and checkpoint indexing.

pub mod big_vision;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod jet;
pub mod layers;
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
}

impl Default for Profile {
    fn default() -> Self {
        Profile { batch: 1, image_hw: None, dtype: DType::F32, moe: MoeOptions::default() }
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

/// Builds the graph of the model in `dir` (a Hugging Face folder) for `profile`.
pub fn build(dir: &Path, profile: &Profile) -> Result<Built> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(ModelError::Unsupported(format!("{}: no config.json (is this a model folder?)", dir.display())));
    }
    if let Some(name) = big_vision_model_name(&cfg_path)? {
        // big_vision folders: `config.json` holds the config's `model_name` and `model` kwargs.
        return match name.as_str() {
            "proj.jet.jet" => jet::build_folder(dir, &cfg_path, profile),
            "vit" | "vmoe" => big_vision::build(dir, &cfg_path, profile),
            other => Err(ModelError::Unsupported(format!(
                "{}: big_vision model_name '{other}' is not supported (kiln knows 'vit', 'vmoe', 'proj.jet.jet')",
                cfg_path.display()
            ))),
        };
    }
    let (cfg, container) = siglip::SiglipVisionConfig::from_file(&cfg_path)?;
    let checkpoint = Checkpoint::open(dir)?;
    let graph = siglip::build(&cfg, container, &checkpoint, profile)?;
    let (h, w) = profile.image_hw.unwrap_or((cfg.image_size, cfg.image_size));
    let description = format!(
        "SigLIP vision ({container:?}) width {} depth {} heads {} mlp {} patch {} at {h}x{w}, batch {}, {}",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.patch_size,
        profile.batch,
        profile.dtype
    );
    Ok(Built { entries: vec![("forward".into(), graph)], description, checkpoint })
}

/// The `model_name` of a big_vision folder's `config.json`, or `None` for a Hugging Face folder.
fn big_vision_model_name(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Json { path: path.into(), msg: e.to_string() })?;
    match v.get("model_name") {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => {
            Err(ModelError::Config { path: path.into(), field: "model_name".into(), msg: format!("expected a string, found {other}") })
        }
    }
}
