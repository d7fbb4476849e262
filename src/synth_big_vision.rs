//! `kiln synth` rows for big_vision folders: `config.json` (`model_name` + `model` kwargs)
//! and `params.npz` in `np.savez`'s layout, full size with random weights. ViT-B/16 (plain and
//! with a PatchMerger) and V-MoE-B/16 (E=8, K=2, every other block), plus the dense ViT that
//! V-MoE is built on (the same kwargs without `moe`).

use crate::npz_write::NpzWriter;
use crate::synth::{Init, SynthError, SynthReport, TensorSpec};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// Which big_vision model a synth row writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BigVisionSynth {
    /// big_vision `vit` B/16 at 224 px, GAP pooling, 1000 classes; optionally a PatchMerger
    /// to `tokens` tokens after `after` blocks.
    Vit { merger: Option<(usize, usize)> },
    /// vmoe `VisionTransformerMoe` B/16 at 224 px, class token, 1000 classes; with `experts`
    /// experts (K=2, blocks 1, 3, .., 11, groups of 8 images, C=1.05) or dense (`None`).
    Vmoe { experts: Option<usize> },
}

const D: usize = 768;
const F: usize = 3072;
const H: usize = 12;
const L: usize = 12;
const P: usize = 16;
const N: usize = 196;
const CLASSES: usize = 1000;

fn t(name: String, shape: &[usize], init: Init) -> TensorSpec {
    TensorSpec::f32(name, shape.to_vec(), init)
}

fn dense(out: &mut Vec<TensorSpec>, p: &str, din: usize, dout: usize) {
    out.push(t(format!("{p}/kernel"), &[din, dout], Init::fan_in(din)));
    out.push(t(format!("{p}/bias"), &[dout], Init::BIAS));
}

fn ln(out: &mut Vec<TensorSpec>, p: &str) {
    out.push(t(format!("{p}/scale"), &[D], Init::LN_WEIGHT));
    out.push(t(format!("{p}/bias"), &[D], Init::BIAS));
}

fn attention(out: &mut Vec<TensorSpec>, p: &str) {
    for q in ["query", "key", "value"] {
        out.push(t(format!("{p}/{q}/kernel"), &[D, H, D / H], Init::fan_in(D)));
        out.push(t(format!("{p}/{q}/bias"), &[H, D / H], Init::BIAS));
    }
    out.push(t(format!("{p}/out/kernel"), &[H, D / H, D], Init::fan_in(D)));
    out.push(t(format!("{p}/out/bias"), &[D], Init::BIAS));
}

impl BigVisionSynth {
    /// `config.json`: the big_vision config's `model_name` and `model` kwargs.
    pub fn config_json(&self) -> Value {
        match *self {
            BigVisionSynth::Vit { merger } => {
                let mut model = json!({"variant": "B/16", "num_classes": CLASSES, "pool_type": "gap", "posemb": "learn"});
                if let Some((after, tokens)) = merger {
                    model["patch_merger"] = json!({"num_tokens": tokens, "blocks_before": after});
                }
                json!({"model_name": "vit", "model": model})
            }
            BigVisionSynth::Vmoe { experts } => {
                let mut encoder =
                    json!({"num_layers": L, "mlp_dim": F, "num_heads": H, "dropout_rate": 0.0, "attention_dropout_rate": 0.0});
                if let Some(e) = experts {
                    encoder["moe"] = json!({
                        "layers": (1..L).step_by(2).collect::<Vec<_>>(), "num_experts": e, "group_size": 8 * (N + 1),
                        "router": {"num_selected_experts": 2, "noise_std": 1.0, "importance_loss_weight": 0.005, "load_loss_weight": 0.005,
                            "dispatcher": {"name": "einsum", "bfloat16": false, "capacity_factor": 1.05, "batch_priority": false,
                                "capacity_ceil_or_round": "ceil", "capacity_multiple_of": 4}}
                    });
                }
                json!({"model_name": "vmoe", "model": {"num_classes": CLASSES, "patch_size": [P, P], "hidden_size": D,
                    "classifier": "token", "deterministic": true, "encoder": encoder}})
            }
        }
    }

    /// The parameter tree, flattened with `/`.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        let emb = Init::Normal { mean: 0.0, std: 0.02 };
        out.push(t("embedding/kernel".into(), &[P, P, 3, D], Init::fan_in(P * P * 3)));
        out.push(t("embedding/bias".into(), &[D], Init::BIAS));
        match *self {
            BigVisionSynth::Vit { merger } => {
                out.push(t("pos_embedding".into(), &[1, N, D], emb));
                for i in 0..L {
                    let p = format!("Transformer/encoderblock_{i}");
                    ln(&mut out, &format!("{p}/LayerNorm_0"));
                    attention(&mut out, &format!("{p}/MultiHeadDotProductAttention_0"));
                    ln(&mut out, &format!("{p}/LayerNorm_1"));
                    dense(&mut out, &format!("{p}/MlpBlock_0/Dense_0"), D, F);
                    dense(&mut out, &format!("{p}/MlpBlock_0/Dense_1"), F, D);
                }
                if let Some((_, tokens)) = merger {
                    ln(&mut out, "Transformer/PatchMerger/LayerNorm");
                    out.push(t("Transformer/PatchMerger/kernel".into(), &[D, tokens], Init::fan_in(D)));
                }
                ln(&mut out, "Transformer/encoder_norm");
            }
            BigVisionSynth::Vmoe { experts } => {
                out.push(t("cls".into(), &[1, 1, D], emb));
                out.push(t("Encoder/posembed_input/pos_embedding".into(), &[1, N + 1, D], emb));
                for i in 0..L {
                    let p = format!("Encoder/encoderblock_{i}");
                    ln(&mut out, &format!("{p}/LayerNorm_0"));
                    attention(&mut out, &format!("{p}/SelfAttention"));
                    ln(&mut out, &format!("{p}/LayerNorm_1"));
                    match experts.filter(|_| i % 2 == 1) {
                        Some(e) => {
                            out.push(t(format!("{p}/Moe/Router/dense/kernel"), &[D, e], Init::fan_in(D)));
                            out.push(t(format!("{p}/Moe/Mlp/Dense_0/kernel"), &[e, D, F], Init::fan_in(D)));
                            out.push(t(format!("{p}/Moe/Mlp/Dense_0/bias"), &[e, F], Init::BIAS));
                            out.push(t(format!("{p}/Moe/Mlp/Dense_1/kernel"), &[e, F, D], Init::fan_in(F)));
                            out.push(t(format!("{p}/Moe/Mlp/Dense_1/bias"), &[e, D], Init::BIAS));
                        }
                        None => {
                            dense(&mut out, &format!("{p}/Mlp/Dense_0"), D, F);
                            dense(&mut out, &format!("{p}/Mlp/Dense_1"), F, D);
                        }
                    }
                }
                ln(&mut out, "Encoder/encoder_norm");
            }
        }
        dense(&mut out, "head", D, CLASSES);
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// Writes `config.json` and `params.npz` into `out`.
pub fn synth_big_vision(spec: &BigVisionSynth, out: &Path, seed: u64) -> Result<SynthReport, SynthError> {
    let start = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| SynthError::Io { path: out.into(), source: e })?;
    let config_path = out.join("config.json");
    let mut text = serde_json::to_string_pretty(&spec.config_json()).map_err(|e| SynthError::InvalidConfig(e.to_string()))?;
    text.push('\n');
    std::fs::write(&config_path, text).map_err(|e| SynthError::Io { path: config_path.clone(), source: e })?;
    let weights_path = out.join("params.npz");
    let io = |e| SynthError::Io { path: weights_path.clone(), source: e };
    let file = std::fs::File::create(&weights_path).map_err(io)?;
    let mut w = NpzWriter::new(std::io::BufWriter::with_capacity(1 << 22, file));
    let tensors = spec.tensors();
    for ts in &tensors {
        w.add_f32(&ts.name, &ts.shape, &ts.values(seed)).map_err(io)?;
    }
    let bytes = w.finish().map_err(io)?;
    Ok(SynthReport {
        name: "custom".into(),
        dir: out.into(),
        config_path,
        weights_path,
        num_tensors: tensors.len(),
        num_params: tensors.iter().map(|t| t.numel() as u64).sum(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
