//! A model folder's tokenizer through the `tokenizers` crate (Gemma's: BPE with byte fallback,
//! a "▁" normalizer, added special tokens), from its `tokenizer.json` or, lacking one, its
//! SentencePiece `tokenizer.model` ([`spm`]; a UNIGRAM model such as T5's and big_vision's
//! `c4_en`, JetFormer's, through [`unigram`], as the `sentencepiece` library encodes it); and a
//! streaming decoder that prints text only once a multi-byte character is complete.

mod proto;
pub mod spm;
pub mod unigram;

/// The SentencePiece file names a folder may hold, in the order they are looked for: Gemma's,
/// the Kaggle JAX PaliGemma download's, and T5's (`c4_en` is `cc_en.32000/sentencepiece.model`).
pub const SPM_NAMES: [&str; 3] = ["tokenizer.model", "paligemma_tokenizer.model", "sentencepiece.model"];

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Unigram(Box<unigram::Unigram>),
}

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A loaded `tokenizer.json` or `tokenizer.model`.
pub struct TextTokenizer {
    inner: Inner,
    path: PathBuf,
}

impl TextTokenizer {
    /// Reads `dir/tokenizer.json`, else the first of [`SPM_NAMES`] that exists (as transformers
    /// prefers the JSON when both exist); a missing, unparsable or unsupported file is an error
    /// naming it.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if path.is_file() {
            let inner = no_panic(|| tokenizers::Tokenizer::from_file(&path))
                .ok_or_else(|| "the tokenizers library failed on it (malformed JSON of the right syntax)".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(|e| Error::File { path: path.clone(), msg: format!("not a valid tokenizer.json: {e}") })?;
            return Ok(TextTokenizer { inner: Inner::Hf(Box::new(inner)), path });
        }
        for name in SPM_NAMES {
            let model = dir.join(name);
            if model.is_file() {
                return Self::open_spm(&model);
            }
        }
        let msg =
            "no tokenizer.json, tokenizer.model, paligemma_tokenizer.model or sentencepiece.model: text prompts need the model's tokenizer"
                .into();
        Err(Error::File { path: dir.to_path_buf(), msg })
    }

    /// Reads a SentencePiece model file.
    pub fn open_spm(path: &Path) -> Result<Self> {
        let inner = match spm::load(path)? {
            spm::Loaded::Bpe(t) => Inner::Hf(t),
            spm::Loaded::Unigram(u) => Inner::Unigram(u),
        };
        Ok(TextTokenizer { inner, path: path.to_path_buf() })
    }

    /// The file the tokenizer was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` as `tokenizer(text, add_special_tokens=False)` gives them: special
    /// tokens written in the text (`<bos>`, `<image>`) are matched, nothing is added.
    /// A UNIGRAM model gives `EncodeAsIds` of the `sentencepiece` library.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let ids = match &self.inner {
            Inner::Hf(t) => no_panic(|| t.encode(text, false))
                .ok_or_else(|| self.err(format!("cannot encode {text:?}: the tokenizers library failed")))?
                .map_err(|e| self.err(format!("cannot encode {text:?}: {e}")))?
                .get_ids()
                .to_vec(),
            Inner::Unigram(u) => u.encode(text),
        };
        Ok(ids.iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids`, as `tokenizer.decode(ids, skip_special_tokens=...)`; a UNIGRAM model
    /// decodes as `DecodeIds` of the `sentencepiece` library (control pieces always dropped).
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| self.err(format!("token id {i} is out of range"))))
            .collect::<Result<Vec<u32>>>()?;
        match &self.inner {
            Inner::Hf(t) => no_panic(|| t.decode(&ids, skip_special_tokens))
                .ok_or_else(|| self.err(format!("cannot decode {ids:?}: the tokenizers library failed")))?
                .map_err(|e| self.err(format!("cannot decode {ids:?}: {e}"))),
            Inner::Unigram(u) => u.decode(&ids).map_err(|e| self.err(format!("cannot decode: {e}"))),
        }
    }

    /// The id of a token, e.g. `<bos>`; an error naming the file when the vocabulary lacks it.
    pub fn id(&self, token: &str) -> Result<i64> {
        let id = match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::Unigram(u) => u.id(token),
        };
        id.map(|i| i as i64).ok_or_else(|| self.err(format!("the vocabulary has no {token}")))
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Unigram(u) => u.vocab_size(),
        }
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
