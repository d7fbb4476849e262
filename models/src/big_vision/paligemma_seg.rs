//! PaliGemma's `<seg>` mask decoder: the VQ-VAE decoder that turns the 16 codes after a
//! detection box into a 64x64 mask, as big_vision's evaluator computes it
//! (`evaluators/proj/paligemma/transfers/segmentation.py`, `Decoder` and
//! `get_reconstruct_masks`; the codebook and decoder of "Towards A Unified Interface for
//! Visual Perception", arXiv 2301.02229). The weights are read as released
//! (`vae-oid.npz`): PyTorch state-dict names and layouts, converted here by views.
//!
//! `codes [B, 16]` (0..K-1) -> the codebook rows as a 4x4 grid `[B, 4, 4, E]` -> 1x1 conv to
//! 128 + ReLU -> two residual blocks `x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))` -> four
//! transposed convs (k4 s2 p1, PyTorch `ConvTranspose2d`: 4 -> 8 -> 16 -> 32 -> 64 pixels,
//! 128, 128, 64, 32, 16 channels) each with a ReLU -> 1x1 conv to one channel = `masks
//! [B, 64, 64, 1]` (logits; the evaluator thresholds at 0 after resizing to the box).

use crate::config::ConfigReader;
use crate::error::{ModelError, Result};
use crate::layers::Builder;
use crate::registry::{Family, Kind, SynthRecipe, SynthRow, WeightFormat};
use crate::{Built, Checkpoint, Profile};
use kiln_graph::{Conv, DType, NodeId, Op, UnaryOp};
use std::path::Path;

/// The codebook's name in the released checkpoint.
pub const CODEBOOK: &str = "_vq_vae._embedding";
/// Codes per mask (a 4x4 grid).
pub const CODES: usize = 16;

/// The mask decoder (`model_name: proj.paligemma.segmentation`, no kwargs).
pub static FAMILY: Family = Family {
    name: "paligemma-seg",
    about: "PaliGemma's <seg> mask decoder (model_name proj.paligemma.segmentation; vae-oid.npz as released): codes -> 64x64 masks",
    claims: |k| k == Kind::BigVision("proj.paligemma.segmentation"),
    build,
    generation: None,
    synth: &[SynthRow {
        name: "paligemma-seg-oid",
        about: "PaliGemma's <seg> mask decoder in vae-oid.npz's layout: 128 codes of 512 (the codebook width is kiln's choice; the official code reads it from the file)",
        recipe: |_| {
            let config = serde_json::json!({"model_name": "proj.paligemma.segmentation", "model": {}});
            Ok(SynthRecipe { config, dtype: DType::F32, format: WeightFormat::Npz, roots: &[""], given: Vec::new(), batch: 1 })
        },
    }],
    init: synth_init,
};

/// `kiln synth`'s draws for the decoder's PyTorch-named weights: the codebook N(0, 1), biases
/// small, conv weights `[Co, Ci, KH, KW]` (transposed: `[Ci, Co, KH, KW]`) N(0, 1/(dim 1 x KH x KW)).
fn synth_init(name: &str, shape: &[usize]) -> crate::registry::Init {
    use crate::registry::Init;
    match (name, shape) {
        (CODEBOOK, _) => Init::Normal { mean: 0.0, std: 1.0 },
        (n, _) if n.ends_with(".bias") => Init::BIAS,
        (_, [_, c, kh, kw]) => Init::fan_in(c * kh * kw),
        _ => super::synth_init(name, shape),
    }
}

/// Builds `forward`: input `codes [B, 16]` (i64), outputs `masks [B, 64, 64, 1]` and the
/// official module's intermediates (`quantized`, `Conv_0` and `ConvTranspose_<i>` before their
/// ReLU, `ResBlock_<i>`).
pub fn build(cfg_path: &Path, checkpoint: Checkpoint, profile: &Profile) -> Result<Built> {
    let mut r = ConfigReader::open(cfg_path)?;
    let name = r.str_or("model_name", None)?;
    if name != "proj.paligemma.segmentation" {
        return Err(r.unsupported("model_name", format!("'{name}' is not proj.paligemma.segmentation")));
    }
    let kwargs = r.object("model")?;
    r.finish()?;
    if let Some(k) = kwargs {
        // The official Decoder takes no arguments: every size is fixed in its code.
        k.finish()?;
    }
    if !profile.dtype.is_float() {
        return Err(ModelError::Unsupported(format!("compute dtype {} is not a float type", profile.dtype)));
    }
    let (k, e) = match checkpoint.get(CODEBOOK).map(|t| t.ty.shape) {
        Some(s) if s.len() == 2 => (s[0], s[1]),
        Some(s) => return Err(ModelError::Unsupported(format!("{CODEBOOK}: shape {s:?}, expected [codes, dim]"))),
        None => (128, 512),
    };
    let b = profile.batch;
    let mut m = Builder::new(&checkpoint, profile.dtype);
    let codes = m.g.input("codes", DType::I64, &[b, CODES])?;
    let table = m.weight(CODEBOOK, &[k, e])?;
    let q = m.g.push(Op::Gather { axis: 0 }, &[table, codes])?;
    let q = m.g.reshape(q, &[b, 4, 4, e])?;
    m.g.output("quantized", q);

    let x = conv(&mut m, q, "decoder.0", [e, 128], 1, 0, false)?;
    m.g.output("Conv_0", x);
    let mut x = m.g.unary(UnaryOp::Relu, x)?;
    for (i, p) in ["decoder.2.net", "decoder.3.net"].into_iter().enumerate() {
        let y = conv(&mut m, x, &format!("{p}.0"), [128, 128], 3, 1, false)?;
        let y = m.g.unary(UnaryOp::Relu, y)?;
        let y = conv(&mut m, y, &format!("{p}.2"), [128, 128], 3, 1, false)?;
        let y = m.g.unary(UnaryOp::Relu, y)?;
        let y = conv(&mut m, y, &format!("{p}.4"), [128, 128], 1, 0, false)?;
        x = m.add(y, x)?;
        m.g.output(format!("ResBlock_{i}"), x);
    }
    for (i, (p, cin, cout)) in
        [("decoder.4", 128, 128), ("decoder.6", 128, 64), ("decoder.8", 64, 32), ("decoder.10", 32, 16)].into_iter().enumerate()
    {
        let y = conv(&mut m, x, p, [cin, cout], 4, 1, true)?;
        m.g.output(format!("ConvTranspose_{i}"), y);
        x = m.g.unary(UnaryOp::Relu, y)?;
    }
    let masks = conv(&mut m, x, "decoder.12", [16, 1], 1, 0, false)?;
    m.g.output("masks", masks);
    let description = format!("PaliGemma <seg> mask decoder: {k} codes of {e}, 16 codes -> 64x64 masks, batch {b}, {}", profile.dtype);
    Ok(Built { entries: vec![("forward".into(), m.g)], description, checkpoint })
}

/// A square conv (or PyTorch transposed conv, stride 2) with bias over NHWC `x`, its weight
/// read in PyTorch's layout (`[out, in, k, k]`; transposed: `[in, out, k, k]`) and viewed as
/// HWIO.
fn conv(m: &mut Builder, x: NodeId, prefix: &str, [cin, cout]: [usize; 2], k: usize, pad: usize, transposed: bool) -> Result<NodeId> {
    let (shape, perm) = if transposed { ([cin, cout, k, k], [2, 3, 0, 1]) } else { ([cout, cin, k, k], [2, 3, 1, 0]) };
    let w = m.weight(&format!("{prefix}.weight"), &shape)?;
    let w = m.g.permute(w, &perm)?;
    let stride = if transposed { 2 } else { 1 };
    let y = m.g.push(Op::Conv(Conv { stride: [stride; 2], pad: [pad; 2], transposed }), &[x, w])?;
    let bias = m.weight(&format!("{prefix}.bias"), &[cout])?;
    m.add(y, bias)
}
