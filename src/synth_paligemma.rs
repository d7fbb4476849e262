//! `kiln synth` rows for PaliGemma 2: a `PaliGemmaForConditionalGeneration` folder (SigLIP
//! So400m/14 tower without its head, a linear projector, a Gemma 2 decoder) with random
//! weights stored as bf16, as the released checkpoints are, named as transformers 5 saves them.

use crate::synth::{Gemma2SynthConfig, Init, SiglipSynthConfig, SynthDtype, TensorSpec};
use serde_json::{json, Value};

/// A PaliGemma 2 model: tower, decoder and the id of `<image>`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaliGemma2SynthConfig {
    pub vision: SiglipSynthConfig,
    pub text: Gemma2SynthConfig,
    pub image_token_index: usize,
}

impl PaliGemma2SynthConfig {
    /// The `config.json` transformers expects (MODELS.md §4: 256 000 base pieces + 1024 loc +
    /// 128 seg = 257 152 = the `<image>` id; the embedding holds 257 216 rows).
    pub fn config_json(&self) -> Value {
        let mut text = self.text.config_json();
        let mut vision = self.vision.config_json();
        let n = self.vision.num_patches();
        for (v, proj) in [(&mut text, false), (&mut vision, true)] {
            let o = v.as_object_mut().expect("a JSON object");
            o.remove("architectures");
            o.insert("dtype".into(), json!("bfloat16"));
            o.insert("num_image_tokens".into(), json!(n));
            if proj {
                o.insert("projection_dim".into(), json!(self.text.hidden_size));
            }
        }
        json!({
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "bos_token_id": 2,
            "dtype": "bfloat16",
            "eos_token_id": 1,
            "hidden_size": self.text.hidden_size,
            "image_token_index": self.image_token_index,
            "model_type": "paligemma",
            "pad_token_id": 0,
            "projection_dim": self.text.hidden_size,
            "text_config": text,
            "vision_config": vision,
        })
    }

    /// The tensors, all bf16: the tower under `vision_tower.`, the projector, the decoder under
    /// `language_model.model.` (the embedding is tied to the output head).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (dv, dt) = (self.vision.hidden_size, self.text.hidden_size);
        let mut t: Vec<TensorSpec> =
            self.vision.tensors().into_iter().map(|s| TensorSpec { name: format!("vision_tower.{}", s.name), ..s }).collect();
        t.push(TensorSpec::f32("multi_modal_projector.linear.weight".into(), vec![dt, dv], Init::fan_in(dv)));
        t.push(TensorSpec::f32("multi_modal_projector.linear.bias".into(), vec![dt], Init::BIAS));
        t.extend(self.text.tensors().into_iter().map(|s| TensorSpec { name: format!("language_model.{}", s.name), ..s }));
        t.into_iter().map(|s| TensorSpec { dtype: SynthDtype::BF16, ..s }).collect()
    }
}
