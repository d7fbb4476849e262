//! A SentencePiece UNIGRAM model (T5's and big_vision's `c4_en` vocabulary, which JetFormer
//! uses) encoded and decoded as the `sentencepiece` library does (v0.2: `normalizer.cc`
//! `Normalizer::Normalize`, `unigram_model.cc` `Model::EncodeOptimized`,
//! `sentencepiece_processor.cc` `PopulateSentencePieceText` and `Decode`). The `tokenizers`
//! crate's Unigram pipeline differs from it in small ways (its compiled-charsmap normalizer
//! takes the shortest rule and works per grapheme), so this follows the library itself:
//!
//! - **Normalize**: at each position the longest rule of the compiled charsmap (a Darts double
//!   array over the bytes; no rule: the character itself, a malformed byte U+FFFD), user-defined
//!   pieces matched first and kept as written; leading spaces dropped and runs of spaces
//!   squeezed (`remove_extra_whitespaces`), "▁" prepended (`add_dummy_prefix`), spaces written
//!   as "▁" (`escape_whitespaces`), trailing "▁" dropped.
//! - **Encode**: Viterbi over the normalized bytes with NORMAL, USER_DEFINED and UNUSED pieces
//!   (UNUSED skipped), a user-defined piece scoring `length · max_score - 0.1`, one character
//!   with no piece an unknown scoring `min_score - 10` (scores over NORMAL pieces); a later
//!   candidate replaces an earlier one only when strictly better. Runs of unknowns are merged
//!   into one `<unk>`, or, with byte fallback, each unknown written as its UTF-8 byte pieces.
//! - **Decode**: CONTROL pieces vanish, `<unk>` is the model's `unk_surface` (" ⁇ "), byte
//!   pieces are joined and read as UTF-8 (a bad byte U+FFFD), "▁" is a space, and the leading
//!   "▁" of the first piece is dropped (of every piece until text appears when extra
//!   whitespace is removed).

use super::spm::{PieceType, SpModel};
use std::collections::HashMap;

const SPACE: &str = "\u{2581}";
/// `kUnkPenalty` of `unigram_model.cc`.
const UNK_PENALTY: f32 = 10.0;

/// The compiled normalization rule of a `NormalizerSpec.precompiled_charsmap`: a little-endian
/// u32 byte length of the Darts double array, its u32 units, then the replacement strings,
/// each ending in a NUL byte.
struct CharsMap {
    units: Vec<u32>,
    normalized: Vec<u8>,
}

impl CharsMap {
    fn parse(b: &[u8]) -> Result<Self, String> {
        let bad = |what: &str| format!("the compiled normalization rule is malformed ({what})");
        let n = b.get(..4).map(|h| u32::from_le_bytes(h.try_into().unwrap()) as usize).ok_or_else(|| bad("no size"))?;
        if n % 4 != 0 || n == 0 || b.len() < 4 + n {
            return Err(bad(&format!("a double array of {n} bytes in {} bytes", b.len())));
        }
        let units = b[4..4 + n].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        Ok(CharsMap { units, normalized: b[4 + n..].to_vec() })
    }

    /// The longest rule matching a prefix of `key`: (bytes matched, replacement).
    fn longest(&self, key: &[u8]) -> Option<(usize, &[u8])> {
        let unit = |i: usize| self.units.get(i).copied();
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let label = |u: u32| u & ((1 << 31) | 0xff);
        let mut pos = offset(unit(0)?);
        let mut best = None;
        for (len, &c) in key.iter().enumerate() {
            if c == 0 {
                break;
            }
            pos ^= c as usize;
            let u = unit(pos)?;
            if label(u) != c as u32 {
                break;
            }
            pos ^= offset(u);
            if (u >> 8) & 1 == 1 {
                let value = (unit(pos)? & ((1 << 31) - 1)) as usize;
                best = Some((len + 1, value));
            }
        }
        let (len, at) = best?;
        let rest = self.normalized.get(at..)?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Some((len, &rest[..end]))
    }
}

/// A UNIGRAM `tokenizer.model` ready to encode and decode.
pub struct Unigram {
    model: SpModel,
    charsmap: Option<CharsMap>,
    /// NORMAL, USER_DEFINED and UNUSED pieces by text.
    pieces: HashMap<Vec<u8>, u32>,
    /// The longest such piece, in bytes.
    max_len: usize,
    /// USER_DEFINED pieces, longest first (matched before normalization).
    user: Vec<String>,
    unk: u32,
    bytes: HashMap<u8, u32>,
    min_score: f32,
    max_score: f32,
}

impl Unigram {
    /// Builds the encoder; refuses, by name, what SentencePiece itself would refuse.
    pub fn new(model: SpModel) -> Result<Self, String> {
        if model.treat_whitespace_as_suffix {
            return Err("trainer_spec.treat_whitespace_as_suffix is on; kiln reads prefix-space unigram models".into());
        }
        let n = &model.normalizer;
        let charsmap = if n.precompiled_charsmap.is_empty() { None } else { Some(CharsMap::parse(&n.precompiled_charsmap)?) };
        let (mut pieces, mut user, mut bytes, mut unk) = (HashMap::new(), Vec::new(), HashMap::new(), None);
        let (mut min_score, mut max_score) = (f32::MAX, f32::MIN_POSITIVE);
        let mut seen = HashMap::new();
        for (id, p) in model.pieces.iter().enumerate() {
            let id = id as u32;
            if p.piece.is_empty() {
                return Err(format!("piece {id} is empty"));
            }
            if let Some(first) = seen.insert(p.piece.clone(), id) {
                return Err(format!("piece {:?} appears twice (ids {first} and {id})", p.piece));
            }
            match p.kind {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => {
                    pieces.insert(p.piece.as_bytes().to_vec(), id);
                }
                PieceType::Unknown if unk.is_some() => return Err("it has two UNKNOWN pieces".into()),
                PieceType::Unknown => unk = Some(id),
                PieceType::Byte => {
                    let b = byte_of(&p.piece).ok_or_else(|| format!("byte piece {:?} is not <0xXX>", p.piece))?;
                    bytes.insert(b, id);
                }
                PieceType::Control => {}
            }
            if p.kind == PieceType::UserDefined {
                user.push(p.piece.clone());
            }
            if p.kind == PieceType::Normal {
                min_score = min_score.min(p.score);
                max_score = max_score.max(p.score);
            }
        }
        let unk = unk.ok_or("it has no UNKNOWN piece")?;
        if model.byte_fallback && bytes.len() != 256 {
            return Err(format!("byte_fallback is on but it has {} of the 256 byte pieces", bytes.len()));
        }
        user.sort_by_key(|u| std::cmp::Reverse(u.len()));
        let max_len = pieces.keys().map(Vec::len).max().unwrap_or(0);
        Ok(Unigram { model, charsmap, pieces, max_len, user, unk, bytes, min_score, max_score })
    }

    /// Pieces in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.model.pieces.len()
    }

    /// The id of a piece, whatever its type.
    pub fn id(&self, piece: &str) -> Option<u32> {
        self.model.pieces.iter().position(|p| p.piece == piece).map(|i| i as u32)
    }

    /// One normalized prefix of `input`: (its replacement, bytes consumed).
    fn prefix<'a>(&'a self, input: &'a [u8]) -> (&'a [u8], usize) {
        if let Some(u) = self.user.iter().find(|u| input.starts_with(u.as_bytes())) {
            return (&input[..u.len()], u.len());
        }
        if let Some((len, to)) = self.charsmap.as_ref().and_then(|c| c.longest(input)) {
            return (to, len);
        }
        match utf8_len(input) {
            Some(n) => (&input[..n], n),
            None => ("\u{FFFD}".as_bytes(), 1),
        }
    }

    /// `Normalizer::Normalize`.
    pub fn normalize(&self, text: &str) -> Vec<u8> {
        let spec = &self.model.normalizer;
        let mut input = text.as_bytes();
        let mut out = Vec::with_capacity(input.len() * 3);
        if spec.remove_extra_whitespaces {
            while !input.is_empty() {
                let (to, used) = self.prefix(input);
                if to != b" " {
                    break;
                }
                input = &input[used..];
            }
        }
        if input.is_empty() {
            return out;
        }
        let space: &[u8] = if spec.escape_whitespaces { SPACE.as_bytes() } else { b" " };
        if spec.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        let mut prev_space = spec.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut to, used) = self.prefix(input);
            while prev_space && to.first() == Some(&b' ') {
                to = &to[1..];
            }
            if !to.is_empty() {
                for &b in to {
                    if b == b' ' {
                        out.extend_from_slice(space);
                    } else {
                        out.push(b);
                    }
                }
                prev_space = to.ends_with(b" ");
            }
            input = &input[used..];
            if !spec.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if spec.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }

    /// `Model::EncodeOptimized` over normalized bytes: (piece bytes, id) along the best path;
    /// an unknown character has the unknown id.
    fn viterbi<'a>(&self, s: &'a [u8]) -> Vec<(&'a [u8], u32)> {
        #[derive(Clone, Copy)]
        struct Best {
            id: u32,
            score: f32,
            start: Option<usize>,
        }
        let unk_score = self.min_score - UNK_PENALTY;
        let mut best = vec![Best { id: 0, score: 0.0, start: None }; s.len() + 1];
        let update = |best: &mut Vec<Best>, end: usize, start: usize, id: u32, score: f32| {
            let b = &mut best[end];
            if b.start.is_none() || score > b.score {
                *b = Best { id, score, start: Some(start) };
            }
        };
        let mut start = 0;
        while start < s.len() {
            let here = best[start].score;
            let mblen = utf8_len(&s[start..]).unwrap_or(1);
            let mut single = false;
            for end in start + 1..=(start + self.max_len).min(s.len()) {
                let Some(&id) = self.pieces.get(&s[start..end]) else { continue };
                let kind = self.model.pieces[id as usize].kind;
                if kind == PieceType::Unused {
                    continue;
                }
                let len = end - start;
                let score =
                    if kind == PieceType::UserDefined { len as f32 * self.max_score - 0.1 } else { self.model.pieces[id as usize].score };
                update(&mut best, end, start, id, score + here);
                single |= len == mblen;
            }
            if !single {
                update(&mut best, start + mblen, start, self.unk, unk_score + here);
            }
            start += mblen;
        }
        let mut out = Vec::new();
        let mut end = s.len();
        while end > 0 {
            let b = best[end];
            let start = b.start.unwrap_or(0);
            out.push((&s[start..end], b.id));
            end = start;
        }
        out.reverse();
        out
    }

    /// Token ids of `text` as `SentencePieceProcessor::EncodeAsIds` gives them.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalize(text);
        let mut ids = Vec::new();
        let mut prev_unk = false;
        for (piece, id) in self.viterbi(&normalized) {
            let is_unk = id == self.unk;
            if is_unk && self.model.byte_fallback {
                ids.extend(piece.iter().map(|b| self.bytes[b]));
            } else if !(is_unk && prev_unk) {
                ids.push(id);
            }
            prev_unk = is_unk;
        }
        ids
    }

    /// Text of `ids` as `SentencePieceProcessor::DecodeIds` gives it; an id past the vocabulary
    /// is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        let spec = &self.model.normalizer;
        let strip_first = spec.add_dummy_prefix || spec.remove_extra_whitespaces;
        let (mut text, mut run) = (String::new(), Vec::new());
        let (mut bos_ws, mut bos_ws_seen) = (true, false);
        for &id in ids {
            let p = self.model.pieces.get(id as usize).ok_or_else(|| format!("token id {id} is past the {} pieces", self.vocab_size()))?;
            if p.kind == PieceType::Byte {
                run.push(byte_of(&p.piece).unwrap_or(0));
                continue;
            }
            push_bytes(&mut text, &mut run);
            if bos_ws_seen || !text.is_empty() {
                bos_ws = false;
            }
            bos_ws_seen = false;
            match p.kind {
                PieceType::Control => {}
                PieceType::Unknown => text.push_str(&self.model.unk_surface),
                _ => {
                    let mut piece = p.piece.as_str();
                    if bos_ws && strip_first {
                        if let Some(rest) = piece.strip_prefix(SPACE) {
                            piece = rest;
                            bos_ws_seen = !spec.remove_extra_whitespaces;
                        }
                    }
                    text.push_str(&piece.replace(SPACE, " "));
                }
            }
        }
        push_bytes(&mut text, &mut run);
        Ok(text)
    }
}

/// The byte of a `<0xXX>` piece.
fn byte_of(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// The length of the UTF-8 character `b` starts with; `None` if it is malformed.
fn utf8_len(b: &[u8]) -> Option<usize> {
    let n = match *b.first()? {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return None,
    };
    std::str::from_utf8(b.get(..n)?).ok().map(|_| n)
}

/// Appends the byte pieces of `run` as text (a malformed byte as U+FFFD) and empties it.
fn push_bytes(text: &mut String, run: &mut Vec<u8>) {
    let mut rest = &run[..];
    while !rest.is_empty() {
        match utf8_len(rest) {
            Some(n) => {
                text.push_str(std::str::from_utf8(&rest[..n]).unwrap_or("\u{FFFD}"));
                rest = &rest[n..];
            }
            None => {
                text.push('\u{FFFD}');
                rest = &rest[1..];
            }
        }
    }
    run.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_pieces_and_utf8_lengths() {
        assert_eq!(byte_of("<0x0A>"), Some(10));
        assert_eq!(byte_of("<0xZZ>"), None);
        assert_eq!(byte_of("<0x0>"), None);
        assert_eq!(utf8_len("é".as_bytes()), Some(2));
        assert_eq!(utf8_len(&[0xe2, 0x96]), None);
        assert_eq!(utf8_len(&[0xff]), None);
        let mut t = String::new();
        push_bytes(&mut t, &mut vec![0x61, 0xff, 0xc3, 0xa9, 0xe2]);
        assert_eq!(t, "a\u{FFFD}é\u{FFFD}");
    }
}
