//! The model registry: every family kiln builds, declared once in its own file (`siglip.rs`,
//! `gemma.rs`, `paligemma.rs`, `big_vision/vit.rs`, `big_vision/vmoe.rs`, `jet.rs`) as a
//! [`Family`]: which folders it reads, its builder, its synthetic checkpoints and how their
//! weights are drawn. [`crate::build`], `kiln synth` and `kiln synth --list` find families
//! here; a new family is one file plus one line in [`FAMILIES`].
//!
//! `kiln synth` takes a model's weight list from its builder: the builder runs against a
//! [`Checkpoint::schema`], which answers yes to every weight it asks for and records the
//! names and shapes ([`synth_weights`]); no second copy of a family's weight names exists.

use crate::error::{ModelError, Result};
use crate::{Built, Checkpoint, Profile};
use kiln_graph::{DType, TensorType};
use serde_json::Value;
use std::path::Path;

/// What a folder's `config.json` says it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A Hugging Face folder: its `model_type` (`""` when absent).
    HuggingFace(&'a str),
    /// A big_vision folder: its `model_name`.
    BigVision(&'a str),
}

/// One model family.
pub struct Family {
    /// Short name (`kiln synth --list` groups by it).
    pub name: &'static str,
    /// What it is, one line.
    pub about: &'static str,
    /// Whether this family reads a folder of this kind.
    pub claims: fn(Kind) -> bool,
    /// Builds a folder's entries from its `config.json` and checkpoint index for a profile.
    pub build: fn(&Path, Checkpoint, &Profile) -> Result<Built>,
    /// Text decoders: builds `prefill` and `decode` over a KV cache of the given capacity
    /// (`kiln generate`, `kiln compile --generate`); `None` for models that do not generate.
    pub generation: Option<GenerationBuilder>,
    /// Full-size synthetic checkpoints `kiln synth` writes.
    pub synth: &'static [SynthRow],
    /// How a synthetic weight is drawn, from its name and shape.
    pub init: fn(&str, &[usize]) -> Init,
}

/// Builds a text model's `prefill` and `decode` from its `config.json`, checkpoint index,
/// profile (the prompt bucket in `seq_len`) and cache capacity.
pub type GenerationBuilder = fn(&Path, Checkpoint, &Profile, usize) -> Result<crate::Generation>;

/// One checkpoint `kiln synth` can write.
pub struct SynthRow {
    /// CLI name, e.g. `siglip-so400m-14-224`.
    pub name: &'static str,
    /// One line for `kiln synth --list`.
    pub about: &'static str,
    /// The config, weight format and given tensors, for a seed.
    pub recipe: fn(u64) -> Result<SynthRecipe>,
}

/// What a synthetic checkpoint is made of besides the weights the builder asks for.
pub struct SynthRecipe {
    /// Written as `config.json`.
    pub config: Value,
    /// Weight dtype: F32 or BF16.
    pub dtype: DType,
    pub format: WeightFormat,
    /// The weight-name layout: a layout probe for a name under one of these prefixes finds it
    /// (`""`: every name). A family that reads several layouts writes the first root's.
    pub roots: &'static [&'static str],
    /// Tensors with given values rather than random ones (Jet's permutation matrices).
    pub given: Vec<Given>,
    /// The batch the weight list is learned at (a V-MoE routing group spans several images).
    pub batch: usize,
}

/// A tensor of a synthetic checkpoint with given values.
pub struct Given {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// The weight file a synthetic checkpoint has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// `model.safetensors` (Hugging Face folders).
    Safetensors,
    /// `params.npz` (big_vision folders), keys sorted as `np.savez` of a flattened tree writes them.
    Npz,
}

/// How a synthetic tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// i.i.d. with the given mean and standard deviation, approximately normal (Irwin-Hall sum
    /// of 4 uniforms, support mean ± 3.46 std).
    Normal { mean: f32, std: f32 },
    /// All equal to the value.
    Constant(f32),
}

impl Init {
    /// Biases: N(0, 0.02²).
    pub const BIAS: Init = Init::Normal { mean: 0.0, std: 0.02 };
    /// Layer norm scales: 1 + N(0, 0.05²).
    pub const LN_WEIGHT: Init = Init::Normal { mean: 1.0, std: 0.05 };

    /// Weights that keep activation variance: N(0, 1/fan_in).
    pub fn fan_in(fan_in: usize) -> Init {
        Init::Normal { mean: 0.0, std: (1.0 / fan_in.max(1) as f64).sqrt() as f32 }
    }
}

/// Every family kiln builds, in the order `kiln synth --list` shows them.
pub static FAMILIES: &[&Family] = &[
    &crate::siglip::FAMILY,
    &crate::jet::FAMILY,
    &crate::big_vision::vit::FAMILY,
    &crate::big_vision::vmoe::FAMILY,
    &crate::big_vision::paligemma_seg::FAMILY,
    &crate::big_vision::cappa::FAMILY,
    &crate::big_vision::cappa::VTT_FAMILY,
    &crate::big_vision::uvim_vqvae::FAMILY,
    &crate::gemma::FAMILY,
    &crate::paligemma::FAMILY,
    &crate::big_vision::paligemma::FAMILY,
    &crate::big_vision::jetformer::FAMILY,
];

/// What the `config.json` at `path` says it holds: a big_vision `model_name`, else the
/// Hugging Face `model_type` (empty when absent).
pub fn kind_of(path: &Path) -> Result<(bool, String)> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json { path: path.into(), msg: e.to_string() })?;
    let field = |name: &str| match v.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ModelError::Config { path: path.into(), field: name.into(), msg: format!("expected a string, found {other}") }),
    };
    match field("model_name")? {
        Some(name) => Ok((true, name)),
        None => Ok((false, field("model_type")?.unwrap_or_default())),
    }
}

/// The family that reads the folder whose `config.json` is at `path`.
pub fn family_of(path: &Path) -> Result<&'static Family> {
    let (big_vision, name) = kind_of(path)?;
    let kind = if big_vision { Kind::BigVision(&name) } else { Kind::HuggingFace(&name) };
    FAMILIES.iter().copied().find(|f| (f.claims)(kind)).ok_or_else(|| {
        let (what, field) = if big_vision { ("big_vision", "model_name") } else { ("Hugging Face", "model_type") };
        ModelError::Unsupported(format!(
            "{}: {what} {field} '{name}' is not a family kiln builds (kiln builds: {})",
            path.display(),
            FAMILIES.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
        ))
    })
}

/// Every synthetic checkpoint, with its family, in listing order.
pub fn synth_rows() -> impl Iterator<Item = (&'static Family, &'static SynthRow)> {
    FAMILIES.iter().flat_map(|f| f.synth.iter().map(move |r| (*f, r)))
}

/// The synthetic checkpoint named `name`.
pub fn synth_row(name: &str) -> Option<(&'static Family, &'static SynthRow)> {
    synth_rows().find(|(_, r)| r.name == name)
}

/// One weight of a synthetic checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthWeight {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// The weights the model of `family` whose `config.json` is at `cfg_path` reads, learned by
/// building every entry against a schema checkpoint with the recipe's roots and given tensors. A
/// stacked layer (`name[i]`, the scan layout) becomes one array `name` of every layer.
pub fn synth_weights(family: &Family, cfg_path: &Path, recipe: &SynthRecipe) -> Result<Vec<SynthWeight>> {
    let (roots, given) = (recipe.roots, &recipe.given);
    let dir = cfg_path.parent().unwrap_or(Path::new("."));
    let given: Vec<(String, TensorType)> = given.iter().map(|g| (g.name.clone(), TensorType::new(DType::F32, g.shape.clone()))).collect();
    // A text model builds its whole decoder at one token; vision models ignore the length.
    let profile = Profile { seq_len: Some(1), batch: recipe.batch.max(1), ..Profile::default() };
    let built = (family.build)(cfg_path, Checkpoint::schema(dir, roots, &given), &profile)?;
    let mut out: Vec<SynthWeight> = Vec::new();
    for (name, shape) in built.checkpoint.asked() {
        let Some((base, i)) = kiln_graph::safetensors::stacked_layer(&name) else {
            out.push(SynthWeight { init: (family.init)(&name, &shape), name, shape });
            continue;
        };
        let mut full = vec![i + 1];
        full.extend(&shape);
        match out.iter_mut().find(|w| w.name == base) {
            Some(w) if w.shape[1..] == shape[..] => w.shape[0] = w.shape[0].max(i + 1),
            Some(w) => {
                return Err(ModelError::Unsupported(format!(
                    "{name}: layer shape {shape:?} differs from the other layers' {:?}",
                    &w.shape[1..]
                )))
            }
            None => out.push(SynthWeight { init: (family.init)(base, &shape), name: base.to_string(), shape: full }),
        }
    }
    // Arrays the builder declared (read through views, e.g. JetFormer's einsum stacks).
    let schema_file = dir.join("(schema)");
    for (name, t) in &built.checkpoint.tensors {
        if t.file == schema_file && !given.iter().any(|(g, _)| g == name) {
            out.push(SynthWeight { init: (family.init)(name, &t.ty.shape), name: name.clone(), shape: t.ty.shape.clone() });
        }
    }
    Ok(out)
}

/// The fan-in of a PyTorch weight `[out, in...]`: every axis but the first.
pub fn torch_fan_in(shape: &[usize]) -> usize {
    shape.iter().skip(1).product()
}

/// The fan-in of a Flax kernel `[in..., out]`: every axis but the last.
pub fn flax_fan_in(shape: &[usize]) -> usize {
    shape[..shape.len().saturating_sub(1)].iter().product()
}
