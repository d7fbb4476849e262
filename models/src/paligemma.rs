//! PaliGemma and PaliGemma 2: "PaliGemma: A versatile 3B VLM for transfer" (arXiv 2407.07726)
//! and "PaliGemma 2" (arXiv 2412.03555). A SigLIP tower, a linear projector, and a Gemma /
//! Gemma 2 decoder over `[image tokens][prefix][suffix]` with full attention inside the prefix
//! (`token_type_ids == 0`) and causal attention elsewhere. Matches transformers'
//! `PaliGemmaForConditionalGeneration` (`modeling_paligemma.py`): image features replace the
//! image-token embeddings in order, unscaled; positions are 1-indexed.

use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::gemma::{self, GemmaConfig, Mode};
use crate::layers::Builder;
use crate::registry::{Family, Kind, SynthRecipe, SynthRow, WeightFormat};
use crate::siglip::{self, SiglipVisionConfig};
use kiln_graph::{BinaryOp, DType, Op, ReduceOp, TensorType};

/// The fields of `PaliGemmaConfig`, all honoured.
#[derive(Clone, Debug, PartialEq)]
pub struct PaliGemmaConfig {
    pub vision: SiglipVisionConfig,
    pub text: GemmaConfig,
    pub image_token_index: i64,
    pub projection_dim: usize,
    /// A big_vision checkpoint's tower (`proj.paligemma.paligemma` folders): `pixel_values` go
    /// through big_vision's ViT and `img/head` instead of the SigLIP tower and projector.
    pub big_vision: Option<Box<crate::big_vision::paligemma::BigVisionTower>>,
}

impl PaliGemmaConfig {
    /// Reads a `paligemma` config strictly.
    pub fn read(mut r: ConfigReader) -> Result<Self> {
        let v = r.object("vision_config")?.ok_or_else(|| r.unsupported("vision_config", "missing"))?;
        let vision = SiglipVisionConfig::read(v)?;
        let t = r.object("text_config")?.ok_or_else(|| r.unsupported("text_config", "missing"))?;
        let text = GemmaConfig::read_text(t, true)?;
        let field = if r.has("image_token_id") { "image_token_id" } else { "image_token_index" };
        let image_token_index = r.usize_or(field, Some(256000))? as i64;
        let projection_dim = r.usize_or("projection_dim", Some(2048))?;
        if projection_dim != text.hidden_size {
            return Err(r.unsupported("projection_dim", format!("{projection_dim} differs from the text width {}", text.hidden_size)));
        }
        // Copies of text_config values kept at the top level by transformers.
        for (f, want) in [("hidden_size", text.hidden_size), ("vocab_size", text.vocab_size)] {
            let got = r.usize_or(f, Some(want))?;
            if got != want {
                return Err(r.unsupported(f, format!("{got} differs from text_config's {want}")));
            }
        }
        if r.bool_or("tie_word_embeddings", text.tie_word_embeddings)? != text.tie_word_embeddings {
            return Err(r.unsupported("tie_word_embeddings", "differs from text_config's"));
        }
        r.skip(&["model_type", "image_token_index", "image_token_id", "text_config", "vision_config"]);
        r.finish()?;
        Ok(PaliGemmaConfig { vision, text, image_token_index, projection_dim, big_vision: None })
    }
}

/// Builds a PaliGemma graph for `mode`. Forward and prefill take `input_ids`,
/// `attention_mask`, `position_ids`, `token_type_ids` `[B, S]` and `pixel_values`; decode is
/// the text decoder's (the image is in the cache by then).
pub fn build(m: &mut Builder, cfg: &PaliGemmaConfig, batch: usize, seq: usize, mode: Mode) -> Result<()> {
    if let Mode::Decode { .. } = mode {
        return gemma::build(m, &cfg.text, batch, seq, mode);
    }
    if let Mode::Prefill { capacity } = mode {
        if capacity < seq {
            return Err(ModelError::Unsupported(format!("a cache of {capacity} slots cannot hold a prompt of {seq} tokens")));
        }
    }
    let tp = gemma::prefix(m.ck)?;
    let (b, s) = (batch, seq);
    let v = &cfg.vision;
    let (c, hw, n) = (v.num_channels, v.image_size, v.grid() * v.grid());
    let ids = m.g.input("input_ids", DType::I64, &[b, s])?;
    let am = m.g.input("attention_mask", DType::I64, &[b, s])?;
    let pos = m.g.input("position_ids", DType::I64, &[b, s])?;
    let tt = m.g.input("token_type_ids", DType::I64, &[b, s])?;
    let px = m.g.input("pixel_values", m.dtype, &[b, c, hw, hw])?;

    // Image features: the tower's tokens through the projector, [B*N, D].
    let feats = match &cfg.big_vision {
        Some(tower) => {
            let nhwc = m.g.permute(px, &[0, 2, 3, 1])?;
            tower.features(m, nhwc, cfg.projection_dim)?
        }
        None => {
            let feats = siglip::tower(m, v, &siglip::prefix(m.ck)?, px)?;
            let proj = ["multi_modal_projector.linear", "model.multi_modal_projector.linear"]
                .into_iter()
                .find(|p| m.ck.has(&format!("{p}.weight")))
                .unwrap_or("multi_modal_projector.linear");
            m.linear(feats, proj, v.hidden_size, cfg.projection_dim)?
        }
    };

    // Text embeddings; an image token outside the vocabulary is looked up as id 0.
    let img_id = m.g.scalar(DType::I64, cfg.image_token_index as f64)?;
    let is_img = m.g.binary(BinaryOp::Eq, ids, img_id)?;
    let zero_i = m.g.scalar(DType::I64, 0.0)?;
    let lookup = if cfg.image_token_index as usize >= cfg.text.vocab_size { m.g.push(Op::Select, &[is_img, zero_i, ids])? } else { ids };
    let text = gemma::embed(m, &cfg.text, &tp, lookup)?;

    // The k-th image token of row r takes feature row r*N + k (masked_scatter's order when
    // every row holds N image tokens; the runtime checks that before running).
    let flags = m.g.push(Op::Cast { to: DType::I64 }, &[is_img])?;
    let k = m.g.push(Op::CumSum { axis: 1, exclusive: true }, &[flags])?;
    let base = m.g.push_source(Op::Iota { axis: 0, start: 0.0, step: n as f64 }, TensorType::new(DType::I64, [b, 1]))?;
    let row = m.g.add(k, base)?;
    let row = m.g.push(Op::Select, &[is_img, row, zero_i])?;
    let img = m.g.push(Op::Gather { axis: 0 }, &[feats, row])?;
    let at = m.g.reshape(is_img, &[b, s, 1])?;
    let x = m.g.push(Op::Select, &[at, img, text])?;

    // Prefix-LM: query i and key j both in the prefix (token type 0) see each other. The
    // prefix is the leading run of type-0 tokens: its length is the first index of a
    // non-zero type (S when none). A type-0 token after the suffix (right padding) is then
    // causal: only its own output (a padding row's) can change, never a real token's.
    let tf = m.g.push(Op::Cast { to: DType::F32 }, &[tt])?;
    let zf = m.g.scalar(DType::F32, 0.0)?;
    let suffix = m.g.binary(BinaryOp::Ne, tf, zf)?;
    let j = m.g.push_source(Op::Iota { axis: 1, start: 0.0, step: 1.0 }, TensorType::new(DType::F32, [1, s]))?;
    let end = m.g.scalar(DType::F32, s as f64)?;
    let at = m.g.push(Op::Select, &[suffix, j, end])?;
    let len = m.g.push(Op::Reduce { op: ReduceOp::Min, axes: vec![1], keep_dims: false }, &[at])?;
    let len = m.g.push(Op::Cast { to: DType::I64 }, &[len])?;
    let start = gemma::start_zero(m)?;
    let h = gemma::decoder(m, &cfg.text, &tp, x, pos, am, start, mode, gemma::Extra::Prefix(len), None)?;
    let h = match mode {
        Mode::Prefill { .. } => m.g.slice(h, 1, s - 1, s)?,
        Mode::Forward | Mode::Decode { .. } => h,
    };
    let logits = gemma::lm_head(m, &cfg.text, &tp, h)?;
    m.g.output("logits", logits);
    Ok(())
}

/// The PaliGemma family (1 and 2): given no token length, a folder builds its vision tower alone.
pub static FAMILY: Family = Family {
    name: "paligemma",
    about: "PaliGemma 1 and 2 (transformers PaliGemmaForConditionalGeneration)",
    claims: |k| matches!(k, Kind::HuggingFace("paligemma")),
    build: |cfg_path, ck, profile| match profile.seq_len {
        None => siglip::build_folder(cfg_path, ck, profile),
        Some(_) => crate::build_text(cfg_path, ck, profile),
    },
    generation: Some(crate::build_text_generation),
    synth: &[
        SynthRow {
            name: "paligemma2-3b-224",
            about: "PaliGemma 2 3B at 224px: So400m/14 tower (256 image tokens), Gemma 2 2B, vocab 257216 (~3.0B params, bf16)",
            recipe: |_| pg2_recipe(224),
        },
        SynthRow {
            name: "paligemma2-3b-448",
            about: "PaliGemma 2 3B at 448px: the same with 1024 image tokens (~3.0B params, bf16)",
            recipe: |_| pg2_recipe(448),
        },
        SynthRow {
            name: "paligemma2-3b-896",
            about: "PaliGemma 2 3B at 896px: the same with 4096 image tokens, the seed paper's headline resolution (~3.0B params, bf16)",
            recipe: |_| pg2_recipe(896),
        },
    ],
    init: |name, shape| match name.strip_prefix("language_model.") {
        Some(rest) => gemma::synth_init(rest, shape),
        None => siglip::synth_init(name, shape),
    },
};

/// PaliGemma 2 3B at `res` px: So400m/14 and Gemma 2 2B with PaliGemma's vocabulary (256000 +
/// 1024 loc + 128 seg, padded), bf16 as released.
fn pg2_recipe(res: usize) -> Result<SynthRecipe> {
    let text = gemma::Gemma2Sizes { vocab_size: 257216, ..gemma::GEMMA2_2B };
    let config = synth_config(siglip::synth_config(1152, 4304, 27, 16, 14, res, false), &text, 257152);
    Ok(SynthRecipe {
        config,
        dtype: DType::BF16,
        format: WeightFormat::Safetensors,
        roots: &["vision_tower.", "multi_modal_projector.", "language_model."],
        given: Vec::new(),
        batch: 1,
    })
}

/// The `config.json` transformers expects of a PaliGemma 2 model with this tower and decoder
/// (MODELS.md §4: 256 000 base pieces + 1024 loc + 128 seg = 257 152 = the `<image>` id).
pub fn synth_config(mut vision: serde_json::Value, text: &gemma::Gemma2Sizes, image_token_index: usize) -> serde_json::Value {
    let mut text_cfg = gemma::gemma2_config(text);
    let n = {
        let (img, patch) = (vision["image_size"].as_u64().unwrap_or(0), vision["patch_size"].as_u64().unwrap_or(1).max(1));
        (img / patch).pow(2)
    };
    for (v, proj) in [(&mut text_cfg, false), (&mut vision, true)] {
        if let Some(o) = v.as_object_mut() {
            o.remove("architectures");
            o.insert("dtype".into(), serde_json::json!("bfloat16"));
            o.insert("num_image_tokens".into(), serde_json::json!(n));
            if proj {
                o.insert("projection_dim".into(), serde_json::json!(text.hidden_size));
            }
        }
    }
    serde_json::json!({
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "dtype": "bfloat16",
        "eos_token_id": 1,
        "hidden_size": text.hidden_size,
        "image_token_index": image_token_index,
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": text.hidden_size,
        "text_config": text_cfg,
        "vision_config": vision,
    })
}
