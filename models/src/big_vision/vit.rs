//! The big_vision ViT: "An Image is Worth 16x16 Words" (arXiv 2010.11929) as
//! `big_vision/models/vit.py` `_Model` computes it at inference: patch convolution, learned or
//! sine-cosine 2-D position embedding, optional class token, pre-LN encoder, MAP / GAP /
//! token / no pooling, optional `pre_logits` (tanh Dense) and `head`. Optionally a PatchMerger
//! (arXiv 2202.12015) between two blocks (a kiln extension of the kwargs, see
//! [`super::patch_merger`]).

use super::patch_merger::{self, PatchMergerConfig};
use super::{block_prefix, grid, pair, patch_embed, posemb_sincos_2d, with_layer};
use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::Builder;
use crate::registry::{Family, Kind, SynthRecipe, SynthRow, WeightFormat};
use crate::{Checkpoint, Profile};
use kiln_graph::{Graph, NodeId, Op, ReduceOp, UnaryOp};

/// Position embedding kinds of `vit.py`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posemb {
    Learn,
    SinCos2d,
}

/// Pooling kinds of `vit.py` (`pool_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Map,
    Gap,
    Tok,
    None,
}

/// The keyword arguments of big_vision's `vit.Model`, all honoured or refused.
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    pub num_classes: Option<usize>,
    pub patch: (usize, usize),
    pub width: usize,
    pub depth: usize,
    pub mlp_dim: usize,
    pub heads: usize,
    pub posemb: Posemb,
    /// `pre_logits` width (`rep_size`: `true` means the model width).
    pub rep_size: Option<usize>,
    pub pool: Pool,
    pub patch_merger: Option<PatchMergerConfig>,
}

/// `decode_variant`'s table: (width, depth, mlp_dim, heads) per size name.
fn variant(size: &str) -> Option<(usize, usize, usize, usize)> {
    Some(match size {
        "Ti" => (192, 12, 768, 3),
        "S" => (384, 12, 1536, 6),
        "M" => (512, 12, 2048, 8),
        "B" => (768, 12, 3072, 12),
        "L" => (1024, 24, 4096, 16),
        "So400m" => (1152, 27, 4304, 16),
        "H" => (1280, 32, 5120, 16),
        "g" => (1408, 40, 6144, 16),
        "G" => (1664, 48, 8192, 16),
        "e" => (1792, 56, 15360, 16),
        _ => return None,
    })
}

impl VitConfig {
    /// Reads `vit.Model` kwargs strictly (unknown kwargs are errors).
    pub fn read(mut r: ConfigReader) -> Result<Self> {
        let (mut width, mut depth, mut mlp, mut heads, mut patch) = (768, 12, None, 12, (16, 16));
        if r.has("variant") {
            let v = r.str_or("variant", None)?;
            let (size, p) = v.split_once('/').unwrap_or((v.as_str(), ""));
            let (w, dp, f, h) = variant(size).ok_or_else(|| r.unsupported("variant", format!("unknown size '{size}' in '{v}'")))?;
            (width, depth, mlp, heads) = (w, dp, Some(f), h);
            if !p.is_empty() {
                let p: usize = p.parse().map_err(|_| r.unsupported("variant", format!("bad patch size in '{v}'")))?;
                patch = (p, p);
            }
        }
        let width = r.usize_or("width", Some(width))?;
        let depth = r.usize_or("depth", Some(depth))?;
        let heads = r.usize_or("num_heads", Some(heads))?;
        let mlp_dim = if r.has("mlp_dim") { r.usize_or("mlp_dim", None)? } else { mlp.unwrap_or(4 * width) };
        let patch = pair(&mut r, "patch_size", patch)?;
        let num_classes = if r.has("num_classes") { Some(r.usize_or("num_classes", None)?) } else { None };
        let posemb = match r.str_or("posemb", Some("learn"))?.as_str() {
            "learn" => Posemb::Learn,
            "sincos2d" => Posemb::SinCos2d,
            other => return Err(r.unsupported("posemb", format!("'{other}' is not supported (learn, sincos2d)"))),
        };
        let rep_size = match r.value("rep_size") {
            None | Some(serde_json::Value::Bool(false)) => None,
            Some(serde_json::Value::Bool(true)) => Some(width),
            Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => n.as_u64().map(|v| v as usize),
            Some(v) => return Err(r.unsupported("rep_size", format!("expected a boolean or an integer, found {v}"))),
        };
        let pool = match r.str_or("pool_type", Some("gap"))?.as_str() {
            "map" => Pool::Map,
            "gap" => Pool::Gap,
            "tok" | "0" => Pool::Tok,
            "none" => Pool::None,
            other => return Err(r.unsupported("pool_type", format!("'{other}' is not supported (map, gap, tok, 0, none)"))),
        };
        let dtype_mm = r.str_or("dtype_mm", Some("float32"))?;
        if dtype_mm != "float32" {
            return Err(r.unsupported("dtype_mm", format!("'{dtype_mm}': kiln computes big_vision models in float32")));
        }
        // Training-only: dropout is a no-op at inference; init, remat and scan do not change
        // the function (the checkpoint's layout decides how weights are read).
        r.skip(&["dropout", "head_zeroinit", "remat_policy", "scan"]);
        let patch_merger = match r.object("patch_merger")? {
            Some(pm) => Some(PatchMergerConfig::read(pm)?),
            None => None,
        };
        if heads == 0 || !width.is_multiple_of(heads) {
            return Err(r.unsupported("num_heads", format!("width {width} is not divisible into {heads} heads")));
        }
        if let Some(pm) = &patch_merger {
            if pm.blocks_before > depth {
                return Err(r.unsupported("patch_merger", format!("blocks_before {} exceeds depth {depth}", pm.blocks_before)));
            }
            if pool == Pool::Tok {
                return Err(r.unsupported("patch_merger", "a PatchMerger would merge the class token away; use pool_type gap, map or none"));
            }
        }
        r.finish()?;
        Ok(VitConfig { num_classes, patch, width, depth, mlp_dim, heads, posemb, rep_size, pool, patch_merger })
    }
}

/// The tensor prefix of the image tower: `""`, or `img/` in a two-tower checkpoint.
fn prefix(ck: &Checkpoint) -> String {
    if !ck.has("embedding/kernel") && ck.has("img/embedding/kernel") {
        "img/".into()
    } else {
        String::new()
    }
}

/// The image size: the profile's, else the learned table's square grid, else 224.
fn image_hw(cfg: &VitConfig, ck: &Checkpoint, p: &str, profile: &Profile) -> (usize, usize) {
    if let Some(hw) = profile.image_hw {
        return hw;
    }
    if cfg.posemb == Posemb::Learn {
        if let Some(t) = ck.get(&format!("{p}pos_embedding")) {
            let n = t.ty.shape.get(1).copied().unwrap_or(0);
            let g = (n as f64).sqrt().round() as usize;
            if g * g == n {
                return (g * cfg.patch.0, g * cfg.patch.1);
            }
        }
    }
    (224, 224)
}

/// A learned position table of `found` positions where `(h, w)` images need another number:
/// the error names the checkpoint's grid (or the grids its count allows, for a table that is
/// not square) and the `--resolution` that fits it.
pub(crate) fn posemb_mismatch(name: &str, found: usize, patch: (usize, usize), (h, w): (usize, usize)) -> ModelError {
    let (gh, gw) = (h / patch.0.max(1), w / patch.1.max(1));
    let fits: Vec<String> = (1..=found)
        .filter(|a| found.is_multiple_of(*a) && a * a * 4 >= found && found * 4 >= a * a)
        .map(|a| format!("{}x{}", a * patch.0, found / a * patch.1))
        .take(6)
        .collect();
    ModelError::Unsupported(format!(
        "'{name}' holds {found} positions, but {h}x{w} images make a {gh}x{gw} grid of {}x{} patches ({} positions): \
         pass --resolution HxW for the checkpoint's grid (of {found} positions: {})",
        patch.0,
        patch.1,
        gh * gw,
        if fits.is_empty() { "none near square".to_string() } else { fits.join(", ") }
    ))
}

/// Builds the ViT. Input `images [B, H, W, 3]` (NHWC, values in [-1, 1]); outputs as
/// `vit.py` names them: `encoded`, `head_input`, `pre_logits`, `logits` (with a head), and
/// `pre_logits_2d` / `logits_2d` over the patch grid when no merger changed the tokens.
pub fn build(cfg: &VitConfig, ck: &Checkpoint, profile: &Profile) -> Result<(Graph, String)> {
    let p = prefix(ck);
    let (h, w) = image_hw(cfg, ck, &p, profile);
    let (gh, gw) = grid((h, w), cfg.patch)?;
    let (b, d, n) = (profile.batch, cfg.width, gh * gw);
    let mut m = Builder::new(ck, profile.dtype);
    let images = m.g.input("images", profile.dtype, &[b, h, w, 3])?;
    let (x, tokens) = encoder(&mut m, cfg, &p, images, (h, w), b)?;
    let encoded = m.g.reshape(x, &[b, tokens, d])?;
    m.g.output("encoded", encoded);

    let pooled = match cfg.pool {
        Pool::Map => map_head(&mut m, cfg, &format!("{p}MAPHead_0"), x, b, tokens)?,
        Pool::Gap => m.g.reduce(ReduceOp::Mean, encoded, &[1], false)?,
        Pool::Tok => {
            let t = m.g.slice(encoded, 1, 0, 1)?;
            m.g.reshape(t, &[b, d])?
        }
        Pool::None => encoded,
    };
    m.g.output("head_input", pooled);
    // The grid of patch tokens (the class token removed), when the merger kept the grid.
    let grid_tokens = match (cfg.pool, &cfg.patch_merger) {
        (_, Some(_)) => None,
        (Pool::Tok, None) => Some(m.g.slice(encoded, 1, 1, tokens)?),
        (_, None) => Some(encoded),
    };
    let mut x2d = match grid_tokens {
        Some(t) => Some(m.g.reshape(t, &[b * n, d])?),
        None => None,
    };
    let pshape = m.g.shape(pooled).to_vec();
    let mut x = m.g.reshape(pooled, &[pshape.iter().product::<usize>() / d, d])?;
    let mut width = d;
    if let Some(rep) = cfg.rep_size {
        x = m.dense(x, &format!("{p}pre_logits"), d, rep)?;
        x = m.g.unary(UnaryOp::Tanh, x)?;
        if let Some(t) = x2d {
            let t = m.dense(t, &format!("{p}pre_logits"), d, rep)?;
            x2d = Some(m.g.unary(UnaryOp::Tanh, t)?);
        }
        width = rep;
    }
    let out_shape = |c: usize| -> Vec<usize> {
        let mut s = pshape.clone();
        *s.last_mut().unwrap_or(&mut 0) = c;
        s
    };
    let pre = m.g.reshape(x, &out_shape(width))?;
    m.g.output("pre_logits", pre);
    if let Some(t) = x2d {
        let t2 = m.g.reshape(t, &[b, gh, gw, width])?;
        m.g.output("pre_logits_2d", t2);
    }
    if let Some(c) = cfg.num_classes {
        let y = m.dense(x, &format!("{p}head"), width, c)?;
        let y = m.g.reshape(y, &out_shape(c))?;
        m.g.output("logits", y);
        if let Some(t) = x2d {
            let t = m.dense(t, &format!("{p}head"), width, c)?;
            let t = m.g.reshape(t, &[b, gh, gw, c])?;
            m.g.output("logits_2d", t);
        }
    }
    let merger = cfg
        .patch_merger
        .as_ref()
        .map(|pm| format!(", PatchMerger to {} tokens after block {}", pm.num_tokens, pm.blocks_before))
        .unwrap_or_default();
    let description = format!(
        "big_vision ViT width {d} depth {} heads {} mlp {} patch {}x{} posemb {:?} pool {:?}{merger} at {h}x{w}, batch {b}, {}",
        cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch.0, cfg.patch.1, cfg.posemb, cfg.pool, profile.dtype
    );
    Ok((m.g, description))
}

/// The ViT's `Transformer` on `images [B, H, W, 3]`: patch embedding, position embedding, class
/// token, blocks (and PatchMerger), `encoder_norm`, with weights under `p` (`""`, `img/`, or
/// CapPa's `encoder/`). Returns the normalised tokens as `[B*tokens, D]` rows and `tokens`.
pub(crate) fn encoder(
    m: &mut Builder,
    cfg: &VitConfig,
    p: &str,
    images: NodeId,
    (h, w): (usize, usize),
    b: usize,
) -> Result<(NodeId, usize)> {
    let (gh, gw) = grid((h, w), cfg.patch)?;
    let (d, n) = (cfg.width, gh * gw);
    let x = patch_embed(m, images, &format!("{p}embedding"), cfg.patch, d)?;
    let x = m.g.reshape(x, &[b, n, d])?;
    let pos = match cfg.posemb {
        Posemb::Learn => {
            let name = format!("{p}pos_embedding");
            let found = m.ck.get(&name).filter(|_| m.weight_prefix.is_none()).and_then(|t| t.ty.shape.get(1).copied());
            if let Some(found) = found.filter(|&f| f != n) {
                return Err(posemb_mismatch(&name, found, cfg.patch, (h, w)));
            }
            m.weight(&name, &[1, n, d])?
        }
        Posemb::SinCos2d => m.g.constant(m.dtype, &[1, n, d], posemb_sincos_2d(gh, gw, d)?)?,
    };
    let mut x = m.g.add(x, pos)?;
    let mut tokens = n;
    if cfg.pool == Pool::Tok {
        // The class token joins after the position embedding, so it has none.
        let cls = m.weight(&format!("{p}cls"), &[1, 1, d])?;
        let cls = m.g.push(Op::Broadcast { shape: vec![b, 1, d] }, &[cls])?;
        x = m.g.concat(&[cls, x], 1)?;
        tokens += 1;
    }
    let mut x = m.g.reshape(x, &[b * tokens, d])?;
    for i in 0..cfg.depth {
        if let Some(pm) = cfg.patch_merger.as_ref().filter(|pm| pm.blocks_before == i) {
            x = patch_merger::merge(m, pm, &format!("{p}Transformer/PatchMerger"), x, b, tokens, d)?;
            tokens = pm.num_tokens;
        }
        let bp = block_prefix(m.ck, &format!("{p}Transformer/encoderblock"), "LayerNorm_0/scale", i)?;
        x = with_layer(m, bp.layer, |m| {
            m.encoder_block(x, &bp.prefix, ("MultiHeadDotProductAttention_0", "MlpBlock_0"), b, tokens, d, cfg.heads, cfg.mlp_dim)
        })?;
    }
    if let Some(pm) = cfg.patch_merger.as_ref().filter(|pm| pm.blocks_before == cfg.depth) {
        x = patch_merger::merge(m, pm, &format!("{p}Transformer/PatchMerger"), x, b, tokens, d)?;
        tokens = pm.num_tokens;
    }
    let x = m.flax_layer_norm(x, &format!("{p}Transformer/encoder_norm"), d)?;
    Ok((x, tokens))
}

/// `MAPHead`: a learned probe attends over the tokens (no LayerNorm on them, no residual
/// from the probe), then `y + MlpBlock(LayerNorm(y))`; `[B, D]`.
fn map_head(m: &mut Builder, cfg: &VitConfig, p: &str, x: NodeId, b: usize, n: usize) -> Result<NodeId> {
    let d = cfg.width;
    let probe = m.weight(&format!("{p}/probe"), &[1, 1, d])?;
    let probe = m.g.reshape(probe, &[1, d])?;
    let probe = m.g.push(Op::Broadcast { shape: vec![b, d] }, &[probe])?;
    let y = m.flax_mha(probe, x, &format!("{p}/MultiHeadDotProductAttention_0"), b, 1, n, d, cfg.heads)?;
    let h = m.flax_layer_norm(y, &format!("{p}/LayerNorm_0"), d)?;
    let h = m.mlp_block(h, &format!("{p}/MlpBlock_0"), d, cfg.mlp_dim)?;
    m.add(y, h)
}

/// The big_vision ViT family (`model_name: vit`), PatchMerger included.
pub static FAMILY: Family = Family {
    name: "vit",
    about: "big_vision ViT (model_name vit; params.npz), optionally with a PatchMerger",
    claims: |k| k == Kind::BigVision("vit"),
    build: super::build,
    generation: None,
    synth: &[
        SynthRow {
            name: "vit-b16",
            about: "big_vision ViT-B/16, 224px, GAP head, 1000 classes (params.npz, ~86M params)",
            recipe: |_| Ok(synth_recipe(None)),
        },
        SynthRow {
            name: "vit-b16-pm8",
            about: "big_vision ViT-B/16 with a PatchMerger to 8 tokens after block 6",
            recipe: |_| Ok(synth_recipe(Some((6, 8)))),
        },
    ],
    init: super::synth_init,
};

/// ViT-B/16 at 224 px, GAP pooling, 1000 classes; optionally a PatchMerger to `tokens` tokens
/// after `after` blocks.
fn synth_recipe(merger: Option<(usize, usize)>) -> SynthRecipe {
    let mut model = serde_json::json!({"variant": "B/16", "num_classes": 1000, "pool_type": "gap", "posemb": "learn"});
    if let Some((after, tokens)) = merger {
        model["patch_merger"] = serde_json::json!({"num_tokens": tokens, "blocks_before": after});
    }
    let config = serde_json::json!({"model_name": "vit", "model": model});
    SynthRecipe { config, dtype: kiln_graph::DType::F32, format: WeightFormat::Npz, roots: &[""], given: Vec::new(), batch: 1 }
}
