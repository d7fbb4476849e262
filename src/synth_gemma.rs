//! `kiln synth` rows for Gemma 2: a `Gemma2ForCausalLM` folder transformers loads, with
//! random weights (written by the generic writer in [`crate::synth`]).

use crate::synth::{Init, TensorSpec};
use serde_json::{json, Value};

/// Hyper-parameters of a `Gemma2ForCausalLM` (the rest is Gemma 2's defaults: soft-caps 50
/// and 30, window 4096 on even layers, query scalar 256, tied embeddings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemma2SynthConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

impl Gemma2SynthConfig {
    /// The `config.json` transformers expects for this model.
    pub fn config_json(&self) -> Value {
        let layer_types: Vec<&str> =
            (0..self.num_hidden_layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
        json!({
            "architectures": ["Gemma2ForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "attn_logit_softcapping": 50.0,
            "bos_token_id": 2,
            "dtype": "float32",
            "eos_token_id": 1,
            "final_logit_softcapping": 30.0,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "layer_types": layer_types,
            "max_position_embeddings": 8192,
            "model_type": "gemma2",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": 0,
            "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "sliding_window": 4096,
            "tie_word_embeddings": true,
            "vocab_size": self.vocab_size,
        })
    }

    /// Tensor names and shapes as transformers 5 names them. Init: projections N(0, 1/fan_in),
    /// RMSNorm offsets N(0, 0.05²) (the scale is `1 + w`), embeddings N(0, 1/D) (scaled by
    /// sqrt(D) on the way in).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        let norm = Init::Normal { mean: 0.0, std: 0.05 };
        let mut t = vec![TensorSpec::f32("model.embed_tokens.weight".into(), vec![self.vocab_size, d], Init::fan_in(d))];
        for i in 0..self.num_hidden_layers {
            let l = format!("model.layers.{i}");
            for n in ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                t.push(TensorSpec::f32(format!("{l}.{n}.weight"), vec![d], norm));
            }
            t.push(TensorSpec::f32(format!("{l}.self_attn.q_proj.weight"), vec![h * hd, d], Init::fan_in(d)));
            t.push(TensorSpec::f32(format!("{l}.self_attn.k_proj.weight"), vec![kv * hd, d], Init::fan_in(d)));
            t.push(TensorSpec::f32(format!("{l}.self_attn.v_proj.weight"), vec![kv * hd, d], Init::fan_in(d)));
            t.push(TensorSpec::f32(format!("{l}.self_attn.o_proj.weight"), vec![d, h * hd], Init::fan_in(h * hd)));
            t.push(TensorSpec::f32(format!("{l}.mlp.gate_proj.weight"), vec![f, d], Init::fan_in(d)));
            t.push(TensorSpec::f32(format!("{l}.mlp.up_proj.weight"), vec![f, d], Init::fan_in(d)));
            t.push(TensorSpec::f32(format!("{l}.mlp.down_proj.weight"), vec![d, f], Init::fan_in(f)));
        }
        t.push(TensorSpec::f32("model.norm.weight".into(), vec![d], norm));
        t
    }
}
