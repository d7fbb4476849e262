//! A model folder's tokenizer through the `tokenizers` crate (Gemma's: BPE with byte fallback,
//! a "▁" normalizer, added special tokens), from its `tokenizer.json` or, lacking one, its
//! SentencePiece `tokenizer.model` ([`spm`]); and a streaming decoder that prints text only once
//! a multi-byte character is complete.

mod proto;
pub mod spm;

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A loaded `tokenizer.json` or `tokenizer.model`.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Reads `dir/tokenizer.json`, else `dir/tokenizer.model` or `dir/paligemma_tokenizer.model`
    /// (as transformers prefers the JSON when both exist); a missing, unparsable or unsupported file is an error naming it.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if path.is_file() {
            let inner = no_panic(|| tokenizers::Tokenizer::from_file(&path))
                .ok_or_else(|| "the tokenizers library failed on it (malformed JSON of the right syntax)".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(|e| Error::File { path: path.clone(), msg: format!("not a valid tokenizer.json: {e}") })?;
            return Ok(TextTokenizer { inner, path });
        }
        // The Kaggle JAX PaliGemma download names its SentencePiece file paligemma_tokenizer.model.
        for name in ["tokenizer.model", "paligemma_tokenizer.model"] {
            let model = dir.join(name);
            if model.is_file() {
                return Ok(TextTokenizer { inner: spm::load(&model)?, path: model });
            }
        }
        let msg = "no tokenizer.json, tokenizer.model or paligemma_tokenizer.model: text prompts need the model's tokenizer".into();
        Err(Error::File { path: dir.to_path_buf(), msg })
    }

    /// The file the tokenizer was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` as `tokenizer(text, add_special_tokens=False)` gives them: special
    /// tokens written in the text (`<bos>`, `<image>`) are matched, nothing is added.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = no_panic(|| self.inner.encode(text, false))
            .ok_or_else(|| self.err(format!("cannot encode {text:?}: the tokenizers library failed")))?
            .map_err(|e| self.err(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids`, as `tokenizer.decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| self.err(format!("token id {i} is out of range"))))
            .collect::<Result<Vec<u32>>>()?;
        no_panic(|| self.inner.decode(&ids, skip_special_tokens))
            .ok_or_else(|| self.err(format!("cannot decode {ids:?}: the tokenizers library failed")))?
            .map_err(|e| self.err(format!("cannot decode {ids:?}: {e}")))
    }

    /// The id of a token, e.g. `<bos>`; an error naming the file when the vocabulary lacks it.
    pub fn id(&self, token: &str) -> Result<i64> {
        self.inner.token_to_id(token).map(|i| i as i64).ok_or_else(|| self.err(format!("the vocabulary has no {token}")))
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn err(&self, msg: String) -> Error {
        Error::File { path: self.path.clone(), msg }
    }
}

/// Decodes a growing list of ids and hands out the text added since the last call. A byte
/// fallback piece that ends mid-character decodes to U+FFFD until the rest arrives, so text
/// ending in U+FFFD is held back until [`StreamDecoder::finish`].
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<i64>,
    printed: String,
}

impl StreamDecoder {
    /// Adds one id; the text that can be printed now (often empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: i64) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.advance(text))
    }

    /// The text not yet handed out; the whole text is then `decode(ids, skip_special_tokens=True)`.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String> {
        let text = tok.decode(&self.ids, true)?;
        Ok(self.advance(text))
    }

    /// Everything decoded so far.
    pub fn text(&self) -> &str {
        &self.printed
    }

    fn advance(&mut self, text: String) -> String {
        // Decoding more ids only appends to the text (the Gemma decoder strips nothing), but if
        // a decoder ever rewrote the tail, print nothing now and let `finish` settle it.
        match text.strip_prefix(self.printed.as_str()) {
            Some(new) => {
                let new = new.to_string();
                self.printed = text;
                new
            }
            None => String::new(),
        }
    }
}

/// Runs `f`, a call into the tokenizers crate, which panics on some malformed tokenizer.json
/// files (a `decoder` of the wrong shape: `expect("Helper")`) instead of returning an error:
/// a panic becomes `None`, its message kept off stderr (the hook is process-wide, so for the
/// moment of the call another thread's panic would print nothing either).
fn no_panic<T>(f: impl FnOnce() -> T) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.ok()
}
