//! `kiln synth` rows for SigLIP: a `SiglipVisionModel` folder transformers loads, with
//! random weights (written by the generic writer in [`crate::synth`]).

use crate::synth::{write_model_dir, Init, SynthError, SynthReport, TensorSpec};
use serde_json::{json, Value};
use std::path::Path;

/// Hyper-parameters of a `SiglipVisionModel` (the fields of its config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiglipSynthConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub vision_use_head: bool,
}

impl SiglipSynthConfig {
    /// Number of patches (= position embeddings).
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }

    /// Checks that the config describes a buildable model.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::InvalidConfig(m));
        if self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_attention_heads == 0
            || self.patch_size == 0
            || self.image_size == 0
            || self.num_channels == 0
        {
            return bad(format!("all sizes must be non-zero: {self:?}"));
        }
        if self.hidden_size.checked_rem(self.num_attention_heads) != Some(0) {
            return bad(format!("hidden_size {} is not divisible by num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if self.image_size.checked_rem(self.patch_size) != Some(0) {
            return bad(format!("image_size {} is not divisible by patch_size {}", self.image_size, self.patch_size));
        }
        Ok(())
    }

    /// The `config.json` transformers expects for this model.
    pub fn config_json(&self) -> Value {
        json!({
            "architectures": ["SiglipVisionModel"],
            "attention_dropout": 0.0,
            "dtype": "float32",
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": self.hidden_size,
            "image_size": self.image_size,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "model_type": "siglip_vision_model",
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "num_hidden_layers": self.num_hidden_layers,
            "patch_size": self.patch_size,
            "vision_use_head": self.vision_use_head,
        })
    }

    /// Tensor names, shapes and initializers, as transformers 5 names them.
    ///
    /// Init: linear / conv weights N(0, 1/fan_in), biases N(0, 0.02²), layer
    /// norm weights 1 + N(0, 0.05²), position embeddings N(0, 1/D), probe
    /// N(0, 1). Keeps a random-pixel forward pass well scaled and finite.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let d = self.hidden_size;
        let f = self.intermediate_size;
        let p = self.patch_size;
        let c = self.num_channels;
        let mut t = Vec::new();
        let linear = |t: &mut Vec<TensorSpec>, prefix: &str, out_f: usize, in_f: usize| {
            t.push(TensorSpec::f32(format!("{prefix}.weight"), vec![out_f, in_f], Init::fan_in(in_f)));
            t.push(TensorSpec::f32(format!("{prefix}.bias"), vec![out_f], Init::BIAS));
        };
        let layer_norm = |t: &mut Vec<TensorSpec>, prefix: &str| {
            t.push(TensorSpec::f32(format!("{prefix}.weight"), vec![d], Init::LN_WEIGHT));
            t.push(TensorSpec::f32(format!("{prefix}.bias"), vec![d], Init::BIAS));
        };

        t.push(TensorSpec::f32("embeddings.patch_embedding.weight".into(), vec![d, c, p, p], Init::fan_in(c * p * p)));
        t.push(TensorSpec::f32("embeddings.patch_embedding.bias".into(), vec![d], Init::BIAS));
        t.push(TensorSpec::f32("embeddings.position_embedding.weight".into(), vec![self.num_patches(), d], Init::fan_in(d)));
        for i in 0..self.num_hidden_layers {
            let l = format!("encoder.layers.{i}");
            layer_norm(&mut t, &format!("{l}.layer_norm1"));
            layer_norm(&mut t, &format!("{l}.layer_norm2"));
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                linear(&mut t, &format!("{l}.self_attn.{proj}"), d, d);
            }
            linear(&mut t, &format!("{l}.mlp.fc1"), f, d);
            linear(&mut t, &format!("{l}.mlp.fc2"), d, f);
        }
        layer_norm(&mut t, "post_layernorm");
        if self.vision_use_head {
            t.push(TensorSpec::f32("head.probe".into(), vec![1, 1, d], Init::Normal { mean: 0.0, std: 1.0 }));
            t.push(TensorSpec::f32("head.attention.in_proj_weight".into(), vec![3 * d, d], Init::fan_in(d)));
            t.push(TensorSpec::f32("head.attention.in_proj_bias".into(), vec![3 * d], Init::BIAS));
            linear(&mut t, "head.attention.out_proj", d, d);
            layer_norm(&mut t, "head.layernorm");
            linear(&mut t, "head.mlp.fc1", f, d);
            linear(&mut t, "head.mlp.fc2", d, f);
        }
        t
    }
}

/// Writes a random-weight `SiglipVisionModel` folder for an arbitrary config
/// (the table rows go through this; tests use tiny configs).
pub fn synth_siglip(cfg: &SiglipSynthConfig, out: &Path, seed: u64, progress: bool) -> Result<SynthReport, SynthError> {
    cfg.validate()?;
    write_model_dir(out, &cfg.config_json(), &cfg.tensors(), seed, progress)
}
