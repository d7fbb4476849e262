//! A strict reader for config.json: every field is either used, known to be metadata, or an
//! error. A field kiln does not understand could change the model, so it is never ignored.

use crate::error::{ModelError, Result};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Fields of Hugging Face configs that never change what a forward pass computes.
const METADATA: &[&str] = &[
    "_name_or_path",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "initializer_range",
    "initializer_factor",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "bos_token_id",
    "pad_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "finetuning_task",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "pruned_heads",
    "tf_legacy_loss",
    "use_bfloat16",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "attention_dropout",
    "dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "model_type",
    "quantization_config_hint",
];

/// The largest integer a config field may hold (2^24): sizes, counts and token ids of real
/// models are far below it, and a larger one would only size an allocation that aborts.
pub const MAX_INT: u64 = 1 << 24;

/// A JSON object being read field by field.
pub struct ConfigReader {
    pub path: PathBuf,
    obj: Map<String, Value>,
    used: BTreeSet<String>,
    scope: String,
}

impl ConfigReader {
    /// Reads `path` as a JSON object.
    pub fn open(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json { path: path.into(), msg: e.to_string() })?;
        match v {
            Value::Object(obj) => Ok(ConfigReader { path: path.into(), obj, used: BTreeSet::new(), scope: String::new() }),
            _ => Err(ModelError::Json { path: path.into(), msg: "the top level is not an object".into() }),
        }
    }

    /// Reads `value` as a JSON object; errors name `path`.
    pub fn from_value(path: &Path, value: Value) -> Result<Self> {
        match value {
            Value::Object(obj) => Ok(ConfigReader { path: path.into(), obj, used: BTreeSet::new(), scope: String::new() }),
            _ => Err(ModelError::Json { path: path.into(), msg: "not an object".into() }),
        }
    }

    fn err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Config { path: self.path.clone(), field: format!("{}{field}", self.scope), msg: msg.into() }
    }

    /// Whether the field is present and not null. Asking reads the field: a null the builder
    /// asked about is the module's default (Python's `None`), not an unknown field.
    pub fn has(&mut self, field: &str) -> bool {
        self.used.insert(field.into());
        self.obj.get(field).is_some_and(|v| !v.is_null())
    }

    fn get(&mut self, field: &str) -> Option<&Value> {
        self.used.insert(field.into());
        self.obj.get(field).filter(|v| !v.is_null())
    }

    /// For a field whose Python default is a value, not `None`: a JSON null would be `None`,
    /// which the module cannot take (Python would fail). Fields whose default is `None` are
    /// asked with [`ConfigReader::has`] first and never get here as null. Booleans are not
    /// refused: `None` is falsy where Python tests them (transformers' configs write
    /// `"use_bidirectional_attention": null`), so a null boolean is its default.
    fn refuse_null(&self, field: &str, kind: &str) -> Result<()> {
        if self.is_null(field) {
            return Err(self.err(field, format!("null (Python None) is not {kind}; leave the field out for the default")));
        }
        Ok(())
    }

    /// A non-negative integer, or the default when absent.
    pub fn usize_or(&mut self, field: &str, default: Option<usize>) -> Result<usize> {
        self.refuse_null(field, "a non-negative integer")?;
        match self.get(field).cloned() {
            Some(v) => match v.as_u64() {
                Some(x) if x > MAX_INT => {
                    Err(self.err(field, format!("{x} is larger than any model kiln builds uses (at most {MAX_INT})")))
                }
                Some(x) => Ok(x as usize),
                None => Err(self.err(field, format!("expected a non-negative integer, found {v}"))),
            },
            None => default.ok_or_else(|| self.err(field, "missing")),
        }
    }

    /// A number, or the default when absent.
    pub fn f64_or(&mut self, field: &str, default: Option<f64>) -> Result<f64> {
        self.refuse_null(field, "a number")?;
        match self.get(field).cloned() {
            Some(v) => v.as_f64().ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
            None => default.ok_or_else(|| self.err(field, "missing")),
        }
    }

    /// A boolean, or the default when absent.
    pub fn bool_or(&mut self, field: &str, default: bool) -> Result<bool> {
        match self.get(field).cloned() {
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
            None => Ok(default),
        }
    }

    /// A string, or the default when absent.
    pub fn str_or(&mut self, field: &str, default: Option<&str>) -> Result<String> {
        self.refuse_null(field, "a string")?;
        match self.get(field).cloned() {
            Some(v) => v.as_str().map(str::to_string).ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
            None => default.map(str::to_string).ok_or_else(|| self.err(field, "missing")),
        }
    }

    /// A list of strings, or the default when absent.
    pub fn str_list_or(&mut self, field: &str, default: &[&str]) -> Result<Vec<String>> {
        let bad = |r: &Self, v: &Value| r.err(field, format!("expected a list of strings, found {v}"));
        match self.get(field).cloned() {
            Some(Value::Array(items)) => items.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(self, v))).collect(),
            Some(v) => Err(bad(self, &v)),
            None => Ok(default.iter().map(|s| s.to_string()).collect()),
        }
    }

    /// The raw value of a field (marked as read), or `None` when absent or null.
    pub fn value(&mut self, field: &str) -> Option<Value> {
        self.get(field).cloned()
    }

    /// Whether the field is present with the value null.
    pub fn is_null(&self, field: &str) -> bool {
        self.obj.get(field).is_some_and(|v| v.is_null())
    }

    /// A non-negative integer or a list of them (token ids), empty when absent.
    pub fn usize_list(&mut self, field: &str) -> Result<Vec<usize>> {
        let bad = |r: &Self, v: &Value| r.err(field, format!("expected an integer or a list of integers up to {MAX_INT}, found {v}"));
        let as_int = |v: &Value| v.as_u64().filter(|&x| x <= MAX_INT);
        match self.get(field).cloned() {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items.iter().map(|v| as_int(v).map(|x| x as usize).ok_or_else(|| bad(self, v))).collect(),
            Some(v) => Ok(vec![as_int(&v).ok_or_else(|| bad(self, &v))? as usize]),
        }
    }

    /// A list of strings, or `None` when absent.
    pub fn str_list(&mut self, field: &str) -> Result<Option<Vec<String>>> {
        match self.get(field).cloned() {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.err(field, format!("expected a list of strings, found {v}"))))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.err(field, format!("expected a list of strings, found {v}"))),
            None => Ok(None),
        }
    }

    /// A nested object as its own reader (fields reported as `parent.child`).
    pub fn object(&mut self, field: &str) -> Result<Option<ConfigReader>> {
        match self.get(field).cloned() {
            Some(Value::Object(obj)) => {
                Ok(Some(ConfigReader { path: self.path.clone(), obj, used: BTreeSet::new(), scope: format!("{}{field}.", self.scope) }))
            }
            Some(v) => Err(self.err(field, format!("expected an object, found {v}"))),
            None => Ok(None),
        }
    }

    /// Marks fields as read without using them (they belong to a part kiln does not build).
    pub fn skip(&mut self, fields: &[&str]) {
        self.used.extend(fields.iter().map(|s| s.to_string()));
    }

    /// An error for a value kiln does not support.
    pub fn unsupported(&self, field: &str, msg: impl Into<String>) -> ModelError {
        self.err(field, msg)
    }

    /// Fails on any field that was neither read nor known metadata.
    pub fn finish(self) -> Result<()> {
        let unknown: Vec<&String> = self.obj.keys().filter(|k| !self.used.contains(*k) && !METADATA.contains(&k.as_str())).collect();
        if let Some(first) = unknown.first() {
            let all: Vec<&str> = unknown.iter().map(|s| s.as_str()).collect();
            return Err(self.err(
                first,
                format!(
                    "kiln does not know this field (unknown: {}); it may change the model, so it is refused rather than ignored",
                    all.join(", ")
                ),
            ));
        }
        Ok(())
    }
}
