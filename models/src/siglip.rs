//! SigLIP vision tower: "Sigmoid Loss for Language Image Pre-Training" (arXiv 2303.15343),
//! a pre-LN ViT ("An Image is Worth 16x16 Words", arXiv 2010.11929) with an optional
//! multihead attention pooling (MAP) head. Matches transformers' `SiglipVisionModel`
//! (`modeling_siglip.py`), the vision half of `SiglipModel`, and the vision tower of
//! `PaliGemmaForConditionalGeneration`.

use crate::checkpoint::Checkpoint;
use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::{Activation, Builder};
use crate::registry::{torch_fan_in, Family, Init, Kind, SynthRecipe, SynthRow, WeightFormat};
use crate::{Built, Profile};
use kiln_graph::{DType, Graph, NodeId, Op, ResizeMode};
use std::path::Path;

/// The fields of `SiglipVisionConfig`, all honoured.
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f32,
    pub vision_use_head: bool,
}

/// Which checkpoint layout holds the tower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Container {
    /// `SiglipVisionModel`: the tower at the top level.
    Vision,
    /// `SiglipModel`: the tower under `vision_config`, text tower beside it.
    Siglip,
    /// `PaliGemmaForConditionalGeneration`: the tower under `vision_config`; the MAP head is unused.
    PaliGemma,
}

impl SiglipVisionConfig {
    /// Reads a vision config object strictly (unknown fields are errors).
    pub fn read(mut r: ConfigReader) -> Result<Self> {
        let act_name = r.str_or("hidden_act", Some("gelu_pytorch_tanh"))?;
        let hidden_act =
            Activation::parse(&act_name).ok_or_else(|| r.unsupported("hidden_act", format!("activation '{act_name}' is not supported")))?;
        let c = SiglipVisionConfig {
            hidden_size: r.usize_or("hidden_size", Some(768))?,
            intermediate_size: r.usize_or("intermediate_size", Some(3072))?,
            num_hidden_layers: r.usize_or("num_hidden_layers", Some(12))?,
            num_attention_heads: r.usize_or("num_attention_heads", Some(12))?,
            num_channels: r.usize_or("num_channels", Some(3))?,
            image_size: r.usize_or("image_size", Some(224))?,
            patch_size: r.usize_or("patch_size", Some(16))?,
            hidden_act,
            layer_norm_eps: r.f64_or("layer_norm_eps", Some(1e-6))? as f32,
            vision_use_head: r.bool_or("vision_use_head", true)?,
        };
        // PaliGemma copies these into its vision config; they size the projector, not the tower.
        r.skip(&["projection_dim", "num_image_tokens", "projector_hidden_act"]);
        if c.hidden_size == 0 || c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(r.unsupported(
                "num_attention_heads",
                format!("hidden_size {} is not divisible into {} heads", c.hidden_size, c.num_attention_heads),
            ));
        }
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return Err(
                r.unsupported("patch_size", format!("image_size {} is not a multiple of patch_size {}", c.image_size, c.patch_size))
            );
        }
        r.finish()?;
        Ok(c)
    }

    /// Reads `config.json` of any supported container.
    pub fn from_file(path: &std::path::Path) -> Result<(Self, Container)> {
        let mut r = ConfigReader::open(path)?;
        let mt = r.str_or("model_type", Some("siglip_vision_model"))?;
        match mt.as_str() {
            "siglip_vision_model" => Ok((SiglipVisionConfig::read(r)?, Container::Vision)),
            "siglip" | "paligemma" => {
                let v = r.object("vision_config")?.ok_or_else(|| r.unsupported("vision_config", "missing"))?;
                let cfg = SiglipVisionConfig::read(v)?;
                // The rest describes the text side, which this builder does not build.
                Ok((cfg, if mt == "siglip" { Container::Siglip } else { Container::PaliGemma }))
            }
            other => Err(r.unsupported("model_type", format!("'{other}' is not a SigLIP vision model"))),
        }
    }

    /// Patches per side at the checkpoint's resolution.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// Finds the tensor-name prefix of the tower ("", `vision_model.`, `vision_tower.`, ...).
pub fn prefix(ck: &Checkpoint) -> Result<String> {
    const SUFFIX: &str = "embeddings.patch_embedding.weight";
    for p in ["", "vision_model.", "vision_tower.", "vision_tower.vision_model.", "model.vision_tower.", "model.vision_tower.vision_model."]
    {
        if ck.has(&format!("{p}{SUFFIX}")) {
            return Ok(p.to_string());
        }
    }
    Err(ModelError::MissingTensor {
        dir: ck.dir.clone(),
        name: SUFFIX.into(),
        hint: "no SigLIP patch embedding under any known prefix".into(),
    })
}

/// Builds the tower for `profile`. Inputs: `pixel_values [B, C, H, W]`. Outputs:
/// `last_hidden_state [B, N, D]` and, with the MAP head, `pooler_output [B, D]`.
pub fn build(cfg: &SiglipVisionConfig, container: Container, ck: &Checkpoint, profile: &Profile) -> Result<Graph> {
    let p = prefix(ck)?;
    let (h, w) = profile.image_hw.unwrap_or((cfg.image_size, cfg.image_size));
    let ps = cfg.patch_size;
    if h % ps != 0 || w % ps != 0 || h == 0 || w == 0 {
        return Err(ModelError::Unsupported(format!("resolution {h}x{w} is not a multiple of the patch size {ps}")));
    }
    if profile.dtype != DType::F32 && profile.dtype != DType::BF16 && profile.dtype != DType::F16 {
        return Err(ModelError::Unsupported(format!("compute dtype {} is not a float type", profile.dtype)));
    }
    let (b, c, d) = (profile.batch, cfg.num_channels, cfg.hidden_size);
    let n = (h / ps) * (w / ps);
    let mut m = Builder::new(ck, profile.dtype);
    let x = m.g.input("pixel_values", profile.dtype, &[b, c, h, w])?;
    let x = tower(&mut m, cfg, &p, x)?;
    let last = m.g.reshape(x, &[b, n, d])?;
    m.g.output("last_hidden_state", last);

    // PaliGemma never runs the MAP head, and its checkpoints do not carry one.
    if cfg.vision_use_head && container != Container::PaliGemma {
        let pooled = map_head(&mut m, cfg, &format!("{p}head"), x, b, n)?;
        m.g.output("pooler_output", pooled);
    }
    Ok(m.g)
}

/// The tower from `pixel_values [B, C, H, W]` to the post-layernorm tokens `[B*N, D]`;
/// `p` is the tensor-name prefix ([`prefix`]).
pub fn tower(m: &mut Builder, cfg: &SiglipVisionConfig, p: &str, px: NodeId) -> Result<NodeId> {
    let sh = m.g.shape(px).to_vec();
    let (b, c, h, w) = (sh[0], sh[1], sh[2], sh[3]);
    let (ps, d) = (cfg.patch_size, cfg.hidden_size);
    let (gh, gw) = (h / ps, w / ps);
    let n = gh * gw;
    // Patch embedding: a stride-p convolution is a matmul over flattened (c, ky, kx) patches.
    let x = m.g.reshape(px, &[b, c, gh, ps, gw, ps])?;
    let x = m.g.permute(x, &[0, 2, 4, 1, 3, 5])?;
    let x = m.g.reshape(x, &[b * n, c * ps * ps])?;
    let wpe = m.weight(&format!("{p}embeddings.patch_embedding.weight"), &[d, c, ps, ps])?;
    let wpe = m.g.reshape(wpe, &[d, c * ps * ps])?;
    let bpe = m.weight(&format!("{p}embeddings.patch_embedding.bias"), &[d])?;
    let x = m.g.matmul(x, wpe, true)?;
    let x = m.g.add(x, bpe)?;
    let x = m.g.reshape(x, &[b, n, d])?;

    let pos = position_embedding(m, cfg, p, gh, gw)?;
    let mut x = m.g.add(x, pos)?;
    x = m.g.reshape(x, &[b * n, d])?;

    for l in 0..cfg.num_hidden_layers {
        x = encoder_layer(m, cfg, &format!("{p}encoder.layers.{l}"), x, b, n)?;
    }
    m.layer_norm(x, &format!("{p}post_layernorm"), d, cfg.layer_norm_eps)
}

/// The learned position table, resampled bicubically when the grid differs from the
/// checkpoint's (transformers' `interpolate_pos_encoding`).
fn position_embedding(m: &mut Builder, cfg: &SiglipVisionConfig, p: &str, gh: usize, gw: usize) -> Result<NodeId> {
    let (d, g0) = (cfg.hidden_size, cfg.grid());
    let pos = m.weight(&format!("{p}embeddings.position_embedding.weight"), &[g0 * g0, d])?;
    if (gh, gw) == (g0, g0) {
        return Ok(m.g.reshape(pos, &[1, g0 * g0, d])?);
    }
    let t = m.g.reshape(pos, &[1, g0, g0, d])?;
    let t = m.g.permute(t, &[0, 3, 1, 2])?;
    let t = m.g.push(Op::Resize { size: [gh, gw], mode: ResizeMode::Bicubic }, &[t])?;
    let t = m.g.permute(t, &[0, 2, 3, 1])?;
    Ok(m.g.reshape(t, &[1, gh * gw, d])?)
}

/// One pre-LN encoder layer on `[B*N, D]` rows.
fn encoder_layer(m: &mut Builder, cfg: &SiglipVisionConfig, p: &str, x: NodeId, b: usize, n: usize) -> Result<NodeId> {
    let (d, heads, eps) = (cfg.hidden_size, cfg.num_attention_heads, cfg.layer_norm_eps);
    let h = m.layer_norm(x, &format!("{p}.layer_norm1"), d, eps)?;
    let q = m.linear(h, &format!("{p}.self_attn.q_proj"), d, d)?;
    let k = m.linear(h, &format!("{p}.self_attn.k_proj"), d, d)?;
    let v = m.linear(h, &format!("{p}.self_attn.v_proj"), d, d)?;
    let a = m.mha(q, k, v, b, n, n, heads, d / heads)?;
    let a = m.linear(a, &format!("{p}.self_attn.out_proj"), d, d)?;
    let x = m.add(x, a)?;
    let h = m.layer_norm(x, &format!("{p}.layer_norm2"), d, eps)?;
    let h = mlp(m, cfg, &format!("{p}.mlp"), h)?;
    m.add(x, h)
}

/// `fc2(act(fc1(x)))`.
fn mlp(m: &mut Builder, cfg: &SiglipVisionConfig, p: &str, x: NodeId) -> Result<NodeId> {
    let h = m.linear(x, &format!("{p}.fc1"), cfg.hidden_size, cfg.intermediate_size)?;
    let h = m.act(h, cfg.hidden_act)?;
    m.linear(h, &format!("{p}.fc2"), cfg.intermediate_size, cfg.hidden_size)
}

/// The MAP head: a learned probe attends over the tokens (PyTorch `nn.MultiheadAttention`
/// with packed q/k/v projections), then `a + MLP(LN(a))`.
fn map_head(m: &mut Builder, cfg: &SiglipVisionConfig, p: &str, x: NodeId, b: usize, n: usize) -> Result<NodeId> {
    let (d, heads) = (cfg.hidden_size, cfg.num_attention_heads);
    let probe = m.weight(&format!("{p}.probe"), &[1, 1, d])?;
    let probe = m.g.reshape(probe, &[1, d])?;
    let w = m.weight(&format!("{p}.attention.in_proj_weight"), &[3 * d, d])?;
    let bias = m.weight(&format!("{p}.attention.in_proj_bias"), &[3 * d])?;
    let proj = |m: &mut Builder, input: NodeId, i: usize| -> Result<NodeId> {
        let wi = m.g.slice(w, 0, i * d, (i + 1) * d)?;
        let bi = m.g.slice(bias, 0, i * d, (i + 1) * d)?;
        let y = m.g.matmul(input, wi, true)?;
        Ok(m.g.add(y, bi)?)
    };
    let q = proj(m, probe, 0)?;
    let k = proj(m, x, 1)?;
    let v = proj(m, x, 2)?;
    let q = m.g.push(Op::Broadcast { shape: vec![b, d] }, &[q])?;
    let a = m.mha(q, k, v, b, 1, n, heads, d / heads)?;
    let a = m.linear(a, &format!("{p}.attention.out_proj"), d, d)?;
    let h = m.layer_norm(a, &format!("{p}.layernorm"), d, cfg.layer_norm_eps)?;
    let h = mlp(m, cfg, &format!("{p}.mlp"), h)?;
    m.add(a, h)
}

/// The SigLIP family: `SiglipVisionModel` folders and the vision tower of a `SiglipModel`.
pub static FAMILY: Family = Family {
    name: "siglip",
    about: "SigLIP vision towers (transformers SiglipVisionModel, SiglipModel's vision half)",
    claims: |k| matches!(k, Kind::HuggingFace("siglip_vision_model" | "siglip" | "")),
    build: build_folder,
    generation: None,
    synth: &[
        SynthRow {
            name: "siglip-b16-224",
            about: "SigLIP B/16 vision tower, 224px (768 wide, 12 layers, ~93M params)",
            recipe: |_| Ok(synth_recipe(768, 3072, 12, 12, 16, 224)),
        },
        SynthRow {
            name: "siglip-l16-224",
            about: "SigLIP L/16 vision tower, 224px (1024 wide, 24 layers, ~316M params)",
            recipe: |_| Ok(synth_recipe(1024, 4096, 24, 16, 16, 224)),
        },
        SynthRow {
            name: "siglip-so400m-14-224",
            about: "SigLIP So400m/14 vision tower, 224px (1152 wide, 27 layers, ~428M params)",
            recipe: |_| Ok(synth_recipe(1152, 4304, 27, 16, 14, 224)),
        },
        SynthRow {
            name: "siglip-so400m-14-448",
            about: "SigLIP So400m/14 vision tower, 448px (1024 patches)",
            recipe: |_| Ok(synth_recipe(1152, 4304, 27, 16, 14, 448)),
        },
        SynthRow {
            name: "siglip-so400m-14-896",
            about: "SigLIP So400m/14 vision tower, 896px (4096 patches)",
            recipe: |_| Ok(synth_recipe(1152, 4304, 27, 16, 14, 896)),
        },
    ],
    init: synth_init,
};

/// Builds a SigLIP folder: the tower alone (`forward`).
pub fn build_folder(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile) -> Result<Built> {
    let (cfg, container) = SiglipVisionConfig::from_file(cfg_path)?;
    let graph = build(&cfg, container, &checkpoint, profile)?;
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

/// A synthetic tower at `image` px with the MAP head.
fn synth_recipe(d: usize, f: usize, layers: usize, heads: usize, patch: usize, image: usize) -> SynthRecipe {
    let config = synth_config(d, f, layers, heads, patch, image, true);
    SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Safetensors, roots: &[""], given: Vec::new(), batch: 1 }
}

/// The `config.json` of a `SiglipVisionModel` (3 channels, eps 1e-6, GELU-tanh), as
/// transformers writes it.
pub fn synth_config(d: usize, f: usize, layers: usize, heads: usize, patch: usize, image: usize, head: bool) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["SiglipVisionModel"],
        "attention_dropout": 0.0,
        "dtype": "float32",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": d,
        "image_size": image,
        "intermediate_size": f,
        "layer_norm_eps": 1e-6,
        "model_type": "siglip_vision_model",
        "num_attention_heads": heads,
        "num_channels": 3,
        "num_hidden_layers": layers,
        "patch_size": patch,
        "vision_use_head": head,
    })
}

/// Synthetic SigLIP weights: linear and conv weights N(0, 1/fan_in), biases N(0, 0.02²), layer
/// norm scales 1 + N(0, 0.05²), position embeddings N(0, 1/D), the MAP probe N(0, 1). Keeps a
/// random-pixel forward pass well scaled and finite.
pub fn synth_init(name: &str, shape: &[usize]) -> Init {
    if name.ends_with("head.probe") {
        Init::Normal { mean: 0.0, std: 1.0 }
    } else if name.ends_with("bias") {
        Init::BIAS
    } else if shape.len() == 1 {
        Init::LN_WEIGHT
    } else {
        Init::fan_in(torch_fan_in(shape))
    }
}
