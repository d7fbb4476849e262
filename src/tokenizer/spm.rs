//! A SentencePiece `tokenizer.model` (the `ModelProto` protobuf that big_vision and the Kaggle
//! downloads ship) read directly into the `tokenizers` pipeline that transformers'
//! `GemmaTokenizer` builds from the same file (transformers 5.24:
//! `TokenizersBackend._convert_from_sentencepiece`, i.e. `SentencePieceExtractor.extract` then
//! `GemmaTokenizer.__init__`):
//!
//! - a BPE model over every piece (id = position) with `<unk>` as unknown token, fused unknowns
//!   and byte fallback as the model's `trainer_spec.byte_fallback` says;
//! - merges from `generate_merges`: every split of a piece into two pieces of the vocabulary,
//!   ranked by the merged piece's id, then by the left part's length in characters. For a
//!   trained BPE model ids follow the scores (normal pieces score `-rank`), so this is the
//!   score order SentencePiece merges in;
//! - normalizer `" "` -> `"▁"`, pre-tokenizer split on `" "` (merged with previous; a no-op after
//!   the normalizer), decoder `"▁"` -> `" "`, byte fallback, fuse;
//! - special added tokens `<pad> <eos> <bos> <unk> <mask>` (GemmaTokenizer's defaults; one the
//!   model lacks is appended after the pieces, as transformers does) and every CONTROL piece;
//!   USER_DEFINED pieces are added tokens that are not special. All match the raw text.
//!
//! UNIGRAM models are encoded by [`super::unigram`] instead. Of BPE models, only those that
//! this pipeline encodes as SentencePiece itself would are accepted: the
//! identity normalization rule, no dummy prefix, whitespace escaped to "▁" and kept (no removal
//! of extra whitespace), "▁" as a prefix. Anything else is refused by name.

use super::proto::{Reader, Value};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::Replace;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The special tokens `GemmaTokenizer` names by default (pad, eos, bos, unk, mask).
const GEMMA_SPECIALS: [&str; 5] = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"];

/// What a piece is (`ModelProto.SentencePiece.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<Self> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry; its id is its position in [`SpModel::pieces`].
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The text, with "▁" for a space.
    pub piece: String,
    /// Its log-probability (unigram) or `-rank` (BPE).
    pub score: f32,
    /// NORMAL unless said otherwise.
    pub kind: PieceType,
}

/// `TrainerSpec.model_type`; a model that does not say is UNIGRAM (the proto's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
    Unknown(u64),
}

/// The fields of a `NormalizerSpec` that change how text is encoded (proto2 defaults when absent).
#[derive(Clone, Debug, PartialEq)]
pub struct NormalizerSpec {
    /// The rule's name ("identity", "nmt_nfkc", ...).
    pub name: String,
    /// The compiled normalization rule; empty for the identity rule.
    pub precompiled_charsmap: Vec<u8>,
    /// A "▁" is prepended to the text.
    pub add_dummy_prefix: bool,
    /// Leading, trailing and repeated spaces are removed.
    pub remove_extra_whitespaces: bool,
    /// Spaces are written as "▁".
    pub escape_whitespaces: bool,
}

/// A parsed `tokenizer.model`: what the encoder needs, nothing of the training run.
#[derive(Clone, Debug, PartialEq)]
pub struct SpModel {
    /// The vocabulary, id = position.
    pub pieces: Vec<Piece>,
    /// `trainer_spec.model_type`.
    pub model_type: ModelType,
    /// `trainer_spec.byte_fallback`: unknown characters become `<0xXX>` byte pieces.
    pub byte_fallback: bool,
    /// `trainer_spec.treat_whitespace_as_suffix`.
    pub treat_whitespace_as_suffix: bool,
    /// `trainer_spec.unk_surface`: what `<unk>` decodes to (" \u{2047} " by default).
    pub unk_surface: String,
    /// How text is normalized before encoding.
    pub normalizer: NormalizerSpec,
    /// How text is normalized after decoding, when the model says.
    pub denormalizer: Option<NormalizerSpec>,
}

fn utf8(b: &[u8], what: &str, at: usize) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
}

fn wrong_type(field: &str, at: usize) -> String {
    format!("field {field} at byte {at} has the wrong wire type")
}

fn parse_piece(b: &[u8], at: usize, id: usize) -> Result<Piece, String> {
    let (mut piece, mut score, mut kind) = (None, 0f32, PieceType::Normal);
    let mut r = Reader::nested(b, at);
    while let Some((field, value, vat)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(s)) => piece = Some(utf8(s, &format!("the text of piece {id}"), vat)?),
            (2, Value::Fixed32(f)) => score = f32::from_bits(f),
            (3, Value::Varint(t)) => {
                kind = PieceType::from_proto(t).ok_or_else(|| format!("piece {id} (byte {vat}) has unknown type {t}"))?
            }
            (1..=3, _) => return Err(wrong_type(&format!("{field} of piece {id}"), vat)),
            _ => {}
        }
    }
    let piece = piece.ok_or_else(|| format!("piece {id} (byte {at}) has no text"))?;
    Ok(Piece { piece, score, kind })
}

/// What the encoder needs of a `TrainerSpec`.
struct Trainer {
    model_type: ModelType,
    byte_fallback: bool,
    suffix: bool,
    unk_surface: String,
}

fn parse_trainer(b: &[u8], at: usize) -> Result<Trainer, String> {
    let (mut model_type, mut byte_fallback, mut suffix) = (ModelType::Unigram, false, false);
    let mut unk_surface = " \u{2047} ".to_string();
    let mut r = Reader::nested(b, at);
    while let Some((field, value, vat)) = r.next_field()? {
        match (field, value) {
            (3, Value::Varint(t)) => {
                model_type = match t {
                    1 => ModelType::Unigram,
                    2 => ModelType::Bpe,
                    3 => ModelType::Word,
                    4 => ModelType::Char,
                    t => ModelType::Unknown(t),
                }
            }
            (35, Value::Varint(v)) => byte_fallback = v != 0,
            (24, Value::Varint(v)) => suffix = v != 0,
            (44, Value::Bytes(s)) => unk_surface = utf8(s, "trainer_spec.unk_surface", vat)?,
            (3 | 24 | 35 | 44, _) => return Err(wrong_type(&format!("trainer_spec.{field}"), vat)),
            _ => {}
        }
    }
    Ok(Trainer { model_type, byte_fallback, suffix, unk_surface })
}

fn parse_normalizer(b: &[u8], at: usize) -> Result<NormalizerSpec, String> {
    let mut n = NormalizerSpec {
        name: String::new(),
        precompiled_charsmap: Vec::new(),
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
        escape_whitespaces: true,
    };
    let mut r = Reader::nested(b, at);
    while let Some((field, value, vat)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(s)) => n.name = utf8(s, "the normalizer's name", vat)?,
            (2, Value::Bytes(s)) => n.precompiled_charsmap = s.to_vec(),
            (3, Value::Varint(v)) => n.add_dummy_prefix = v != 0,
            (4, Value::Varint(v)) => n.remove_extra_whitespaces = v != 0,
            (5, Value::Varint(v)) => n.escape_whitespaces = v != 0,
            (1..=5, _) => return Err(wrong_type(&format!("normalizer_spec.{field}"), vat)),
            _ => {}
        }
    }
    Ok(n)
}

/// Parses the bytes of a `tokenizer.model`; an error says what is wrong and at which byte.
pub fn parse(bytes: &[u8]) -> Result<SpModel, String> {
    let (mut pieces, mut trainer, mut normalizer, mut denormalizer) = (Vec::new(), None, None, None);
    let mut r = Reader::new(bytes);
    while let Some((field, value, at)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => pieces.push(parse_piece(b, at, pieces.len())?),
            (2, Value::Bytes(b)) => trainer = Some(parse_trainer(b, at)?),
            (3, Value::Bytes(b)) => normalizer = Some(parse_normalizer(b, at)?),
            (5, Value::Bytes(b)) => denormalizer = Some(parse_normalizer(b, at)?),
            (1..=3 | 5, _) => return Err(wrong_type(&field.to_string(), at)),
            // self_test_data (4) and fields newer than this reader.
            _ => {}
        }
    }
    if pieces.is_empty() {
        return Err("it holds no pieces".into());
    }
    // SentencePiece writes pieces, then trainer_spec, then normalizer_spec: a file cut at a field
    // boundary lacks the specs.
    let n = pieces.len();
    let t = trainer.ok_or_else(|| format!("no trainer_spec follows its {n} pieces (truncated file?)"))?;
    let normalizer = normalizer.ok_or_else(|| format!("no normalizer_spec follows its {n} pieces (truncated file?)"))?;
    Ok(SpModel {
        pieces,
        model_type: t.model_type,
        byte_fallback: t.byte_fallback,
        treat_whitespace_as_suffix: t.suffix,
        unk_surface: t.unk_surface,
        normalizer,
        denormalizer,
    })
}

impl SpModel {
    /// Refuses, by name, the options transformers' Gemma pipeline ignores (with them it would
    /// encode unlike SentencePiece), duplicate pieces, and a model without Gemma's four specials.
    pub fn check(&self) -> Result<(), String> {
        let kind = match self.model_type {
            ModelType::Bpe => None,
            ModelType::Unigram => Some("UNIGRAM".to_string()),
            ModelType::Word => Some("WORD".into()),
            ModelType::Char => Some("CHAR".into()),
            ModelType::Unknown(t) => Some(format!("{t} (not a type SentencePiece defines)")),
        };
        if let Some(kind) = kind {
            return Err(format!("trainer_spec.model_type is {kind}; kiln reads BPE (Gemma's) and UNIGRAM (T5's) models only"));
        }
        let n = &self.normalizer;
        let refuse = |what: &str| Err(format!("{what}; kiln reads SentencePiece models normalized as Gemma's are"));
        if !n.precompiled_charsmap.is_empty() {
            return refuse(&format!("normalizer_spec applies the normalization rule {:?} (a compiled charsmap)", n.name));
        }
        if n.add_dummy_prefix {
            return refuse("normalizer_spec.add_dummy_prefix is on (a \"▁\" is prepended to the text)");
        }
        if n.remove_extra_whitespaces {
            return refuse("normalizer_spec.remove_extra_whitespaces is on (runs of spaces are squeezed)");
        }
        if !n.escape_whitespaces {
            return refuse("normalizer_spec.escape_whitespaces is off (spaces are not written as \"▁\")");
        }
        if self.treat_whitespace_as_suffix {
            return refuse("trainer_spec.treat_whitespace_as_suffix is on (\"▁\" ends pieces instead of starting them)");
        }
        if let Some(d) = self.denormalizer.as_ref().filter(|d| !d.precompiled_charsmap.is_empty()) {
            return refuse(&format!("denormalizer_spec applies the rule {:?} when decoding", d.name));
        }
        let mut seen = HashMap::with_capacity(self.pieces.len());
        for (id, p) in self.pieces.iter().enumerate() {
            if let Some(first) = seen.insert(p.piece.as_str(), id) {
                return Err(format!("piece {:?} appears twice (ids {first} and {id})", p.piece));
            }
        }
        for name in &GEMMA_SPECIALS[..4] {
            if !seen.contains_key(name) {
                return Err(format!("it has no {name} piece; kiln reads models with Gemma's <pad> <eos> <bos> <unk>"));
            }
        }
        Ok(())
    }

    /// transformers' `generate_merges(vocab)`: each split of each piece into two pieces of the
    /// vocabulary, ordered by (merged id, left length in characters, right length, left id,
    /// right id).
    pub fn merges(&self, vocab: &Vocab) -> Vec<(String, String)> {
        let mut ranked = Vec::new();
        for (id, p) in self.pieces.iter().enumerate() {
            let s = p.piece.as_str();
            let chars = s.chars().count();
            for (k, (cut, _)) in s.char_indices().enumerate().skip(1) {
                let (l, r) = s.split_at(cut);
                if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                    ranked.push(((id, k, chars - k, li, ri), l, r));
                }
            }
        }
        ranked.sort_by_key(|(key, _, _)| *key);
        ranked.into_iter().map(|(_, l, r)| (l.to_string(), r.to_string())).collect()
    }

    /// The `tokenizers` pipeline transformers' `GemmaTokenizer` builds from this model.
    pub fn tokenizer(&self) -> Result<Tokenizer, String> {
        let vocab: Vocab = self.pieces.iter().enumerate().map(|(i, p)| (p.piece.clone(), i as u32)).collect();
        let merges = self.merges(&vocab);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token("<unk>".into())
            .fuse_unk(true)
            .byte_fallback(self.byte_fallback)
            .build()
            .map_err(|e| format!("cannot build the BPE model: {e}"))?;
        let e = |e: tokenizers::Error| e.to_string();
        let mut t = Tokenizer::new(bpe);
        t.with_normalizer(Some(Replace::new(" ", "▁").map_err(e)?));
        t.with_pre_tokenizer(Some(Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false).map_err(e)?));
        t.with_decoder(Some(Sequence::new(vec![
            DecoderWrapper::Replace(Replace::new("▁", " ").map_err(e)?),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ])));
        let named = |p: &Piece| GEMMA_SPECIALS.contains(&p.piece.as_str());
        let token = |s: &str, special: bool| AddedToken::from(s.to_string(), special).normalized(false);
        let mut special: Vec<AddedToken> = GEMMA_SPECIALS.iter().map(|s| token(s, true)).collect();
        special.extend(self.pieces.iter().filter(|p| p.kind == PieceType::Control && !named(p)).map(|p| token(&p.piece, true)));
        t.add_special_tokens(&special);
        let user: Vec<AddedToken> =
            self.pieces.iter().filter(|p| p.kind == PieceType::UserDefined && !named(p)).map(|p| token(&p.piece, false)).collect();
        t.add_tokens(&user);
        Ok(t)
    }
}

/// A `tokenizer.model` ready to use: a BPE model (Gemma's) through the `tokenizers` pipeline
/// transformers builds, or a UNIGRAM model (T5's `c4_en`) as the `sentencepiece` library encodes it.
pub enum Loaded {
    Bpe(Box<Tokenizer>),
    Unigram(Box<super::unigram::Unigram>),
}

/// Reads, checks and builds `path` (a `tokenizer.model`); errors name the file.
pub fn load(path: &Path) -> Result<Loaded> {
    let err = |msg: String| Error::File { path: path.to_path_buf(), msg };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let model = parse(&bytes).map_err(|e| err(format!("not a valid SentencePiece tokenizer.model: {e}")))?;
    if model.model_type == ModelType::Unigram {
        let u = super::unigram::Unigram::new(model).map_err(|e| err(format!("unsupported SentencePiece model: {e}")))?;
        return Ok(Loaded::Unigram(Box::new(u)));
    }
    model.check().map_err(|e| err(format!("unsupported SentencePiece model: {e}")))?;
    model.tokenizer().map(|t| Loaded::Bpe(Box::new(t))).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf field: key, then the value (varint, or length and bytes).
    fn field(out: &mut Vec<u8>, number: u32, value: &[u8], len_delimited: bool) {
        let varint = |mut v: u64, out: &mut Vec<u8>| loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            out.push(if v == 0 { b } else { b | 0x80 });
            if v == 0 {
                break;
            }
        };
        varint((u64::from(number) << 3) | (u64::from(len_delimited) * 2), out);
        if len_delimited {
            varint(value.len() as u64, out);
        }
        out.extend(value);
    }

    fn flag(out: &mut Vec<u8>, number: u32, on: bool) {
        field(out, number, &[u8::from(on)], false);
    }

    /// Gemma's four specials, then "▁ab", "ab", "a", "b", "▁".
    fn pieces() -> Vec<u8> {
        let mut out = Vec::new();
        for (s, kind) in [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("▁ab", 1), ("ab", 1), ("a", 1), ("b", 1), ("▁", 1)] {
            let mut p = Vec::new();
            field(&mut p, 1, s.as_bytes(), true);
            field(&mut p, 3, &[kind], false);
            field(&mut out, 1, &p, true);
        }
        out
    }

    /// A BPE-or-not model over [`pieces`]; `edit` changes the trainer and normalizer specs.
    fn model(model_type: u8, edit: impl Fn(&mut Vec<u8>, &mut Vec<u8>)) -> Vec<u8> {
        let mut out = pieces();
        let (mut trainer, mut norm) = (Vec::new(), Vec::new());
        field(&mut trainer, 3, &[model_type], false);
        field(&mut norm, 1, b"identity", true);
        flag(&mut norm, 3, false);
        flag(&mut norm, 4, false);
        edit(&mut trainer, &mut norm);
        field(&mut out, 2, &trainer, true);
        field(&mut out, 3, &norm, true);
        out
    }

    #[test]
    fn a_gemma_like_model_encodes_and_decodes() {
        let m = parse(&model(2, |_, _| {})).unwrap();
        m.check().unwrap();
        assert_eq!(m.pieces[3].kind, PieceType::Unknown);
        let t = m.tokenizer().unwrap();
        // "▁ab" merges as ("▁", "ab") ranked by its id 4, before ("a", "b") for "ab" at id 5.
        let vocab: Vocab = m.pieces.iter().enumerate().map(|(i, p)| (p.piece.clone(), i as u32)).collect();
        assert_eq!(m.merges(&vocab), [("▁".to_string(), "ab".to_string()), ("a".into(), "b".into())]);
        let ids = t.encode("ab ab<bos>c", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [5, 4, 2, 3]);
        // <mask> is missing from the pieces, so it is appended as transformers does.
        assert_eq!(t.token_to_id("<mask>"), Some(9));
        // <bos> and <unk> are special: skipped.
        assert_eq!(t.decode(&ids, true).unwrap(), "ab ab");
        assert_eq!(t.decode(&ids, false).unwrap(), "ab ab<bos><unk>");
    }

    #[test]
    fn refuses_what_gemma_does_not_do_by_name() {
        let err = |b: Vec<u8>| parse(&b).unwrap().check().unwrap_err();
        assert!(err(model(1, |_, _| {})).contains("model_type is UNIGRAM"));
        assert!(err(model(3, |_, _| {})).contains("model_type is WORD"));
        assert!(err(model(2, |_, n| flag(n, 3, true))).contains("add_dummy_prefix is on"));
        assert!(err(model(2, |_, n| flag(n, 4, true))).contains("remove_extra_whitespaces is on"));
        assert!(err(model(2, |_, n| flag(n, 5, false))).contains("escape_whitespaces is off"));
        assert!(err(model(2, |t, _| flag(t, 24, true))).contains("treat_whitespace_as_suffix"));
        let e = err(model(2, |_, n| {
            field(n, 1, b"nmt_nfkc", true);
            field(n, 2, &[1, 2, 3], true);
        }));
        assert!(e.contains("normalization rule \"nmt_nfkc\""), "{e}");
    }

    #[test]
    fn defaults_of_absent_fields_are_proto2_defaults() {
        // A trainer_spec and normalizer_spec with no fields at all: UNIGRAM, dummy prefix on.
        let mut out = Vec::new();
        let mut p = Vec::new();
        field(&mut p, 1, b"<unk>", true);
        field(&mut out, 1, &p, true);
        field(&mut out, 2, &[], true);
        field(&mut out, 3, &[], true);
        let m = parse(&out).unwrap();
        assert_eq!(m.model_type, ModelType::Unigram);
        assert!(m.normalizer.add_dummy_prefix && m.normalizer.remove_extra_whitespaces && m.normalizer.escape_whitespaces);
        assert!(!m.byte_fallback);
        assert_eq!(m.pieces[0].kind, PieceType::Normal);
    }

    #[test]
    fn truncated_and_foreign_bytes_are_errors() {
        let b = model(2, |_, _| {});
        for cut in [1, 5, 17, b.len() / 2, b.len() - 1] {
            assert!(parse(&b[..cut]).is_err(), "a model cut at byte {cut} parsed");
        }
        // Cut right after the pieces: parses as protobuf, but the specs are missing.
        let e = parse(&b[..pieces().len()]).unwrap_err();
        assert!(e.contains("no trainer_spec follows its 9 pieces"), "{e}");
        assert!(parse(b"").unwrap_err().contains("no pieces"));
        assert!(parse(b"{\"model\": {\"type\": \"BPE\"}}").is_err());
    }
}
