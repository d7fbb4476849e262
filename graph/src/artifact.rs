//! The `.kiln` artifact: one versioned, checksummed file holding a [`Program`].
//!
//! Layout, integers little-endian:
//!
//! | offset | bytes | field                                        |
//! |--------|-------|----------------------------------------------|
//! | 0      | 8     | magic `KILN\0ART`                            |
//! | 8      | 4     | format version, u32 ([`FORMAT_VERSION`])     |
//! | 12     | 8     | body length in bytes, u64                    |
//! | 20     | 8     | FNV-1a 64 checksum of the body, u64          |
//! | 28     | n     | body: the [`Program`] in the encoding below  |
//!
//! The body is the Program's serde data model in a compact binary encoding, not JSON: JSON
//! has no infinities or NaNs (a `-inf` mask constant would come back as `null`) and
//! serde_json's default float parsing is not exact, while a program must load bit for bit.
//! Encoding: a bool is one byte; integers are fixed width (usize as u64); floats are their
//! raw bits; strings, sequences and maps are a u64 count then the items; an `Option` is a 0/1
//! byte then the value; tuples are their items in order. Structs are a u64 count of fields,
//! each its name then its value, and enum variants are their name then their contents, so
//! a program type that gains a `#[serde(default)]` field or a new op still reads old files,
//! and a file naming a field or op this kiln does not know fails with that name.
//!
//! FNV-1a detects every change confined to one byte of the body, and other corruption with
//! probability 1 - 2^-64. Loading never panics, and checks that every slot lies inside its
//! arena, weight, constant or state, so a runtime can trust the offsets.

use crate::program::Program;
use serde::de::{self, DeserializeSeed, Visitor};
use serde::{ser, Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use thiserror::Error;

/// The first eight bytes of every `.kiln` file.
pub const MAGIC: &[u8; 8] = b"KILN\0ART";
/// The newest layout and body encoding this kiln writes and reads. Version 3 added
/// [`Program::weight_sets`] (weights from several checkpoints, an ensemble), version 4 the op
/// [`crate::Op::SampleToken`] (a generation program that chooses its tokens; also
/// [`crate::Op::LogSoftmax`], beam search's candidates, and [`crate::Op::TokenLogProb`]), version 5
/// [`Program::tuning`] (a cuda program's measured kernel choices), version 6 casts inside
/// fused expressions ([`crate::Instr::Cast`]), version 7 the op [`crate::Op::GatedMatMul`]
/// (a GLU's gate and up products in one step). A program without them is
/// still written as the oldest version that holds it, byte for byte as before, so older kilns
/// read it.
pub const FORMAT_VERSION: u32 = 7;
/// The oldest version this kiln reads.
pub const OLDEST_VERSION: u32 = 2;
/// Bytes before the body: magic, version, body length, checksum.
pub const HEADER_BYTES: usize = 28;

/// Why an artifact could not be loaded or saved; each names the file.
#[derive(Debug, Error)]
pub enum ArtifactError {
    /// The file does not start with the magic bytes.
    #[error("{file}: not a kiln artifact: it looks like {looks_like} (a .kiln file starts with `KILN\\0ART`)")]
    NotKiln { file: String, looks_like: String },
    /// Another format version wrote the file.
    #[error(
        "{file}: made by format version {found}, this kiln reads versions {OLDEST_VERSION} to {expected}: recompile it with `kiln compile`"
    )]
    Version { file: String, found: u32, expected: u32 },
    /// The file is shorter than its header says.
    #[error("{file}: truncated: expected {expected} bytes, found {found}")]
    Truncated { file: String, expected: u64, found: u64 },
    /// The file is longer than its header says.
    #[error("{file}: unexpected bytes after the program: expected {expected} bytes, found {found}")]
    Trailing { file: String, expected: u64, found: u64 },
    /// The body does not match its checksum.
    #[error("{file}: checksum mismatch (stored {stored:016x}, computed {computed:016x}): the file is corrupt")]
    Checksum { file: String, stored: u64, computed: u64 },
    /// The body does not decode as a program.
    #[error("{file}: the program does not parse: {msg}")]
    Parse { file: String, msg: String },
    /// The program decodes but a slot lies outside its arena, weight or constant.
    #[error("{file}: the program is inconsistent: {msg}")]
    Invalid { file: String, msg: String },
    /// Reading or writing the file failed.
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The artifact's bytes.
pub fn save(program: &Program) -> Vec<u8> {
    let mut enc = Enc::default();
    // Unreachable: the encoder fails only through `Error::custom`, which derived impls never call.
    if let Err(e) = program.serialize(&mut enc) {
        unreachable!("a Program always encodes: {e}");
    }
    let body = enc.out;
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version_for(program).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a64(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The oldest format version that can hold `program`.
pub fn version_for(program: &Program) -> u32 {
    let casts = |op: &crate::Op| matches!(op, crate::Op::Fused(e) | crate::Op::MatMul { epilogue: Some(e), .. } if e.has_cast());
    if program.entries.iter().any(|e| e.steps.iter().any(|s| matches!(s.op, crate::Op::GatedMatMul { .. }))) {
        7
    } else if program.entries.iter().any(|e| e.steps.iter().any(|s| casts(&s.op))) {
        6
    } else if !program.tuning.is_empty() {
        5
    } else if program
        .entries
        .iter()
        .any(|e| e.steps.iter().any(|s| matches!(s.op, crate::Op::SampleToken | crate::Op::LogSoftmax | crate::Op::TokenLogProb)))
    {
        4
    } else if !program.weight_sets.is_empty() {
        3
    } else {
        2
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Reads an artifact; `source` names it in errors (a file name).
pub fn load(bytes: &[u8], source: &str) -> Result<Program, ArtifactError> {
    let file = source.to_string();
    let found = bytes.len() as u64;
    let truncated = |expected: u64| ArtifactError::Truncated { file: file.clone(), expected, found };
    if bytes.len() < MAGIC.len() {
        if !bytes.is_empty() && MAGIC.starts_with(bytes) {
            return Err(truncated(HEADER_BYTES as u64));
        }
        return Err(ArtifactError::NotKiln { file, looks_like: looks_like(bytes) });
    }
    if &bytes[..8] != MAGIC {
        return Err(ArtifactError::NotKiln { file, looks_like: looks_like(bytes) });
    }
    if bytes.len() < 12 {
        return Err(truncated(HEADER_BYTES as u64));
    }
    let version = u32_at(bytes, 8);
    if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(ArtifactError::Version { file, found: version, expected: FORMAT_VERSION });
    }
    if bytes.len() < HEADER_BYTES {
        return Err(truncated(HEADER_BYTES as u64));
    }
    let expected = (HEADER_BYTES as u64).saturating_add(u64_at(bytes, 12));
    if found < expected {
        return Err(truncated(expected));
    }
    if found > expected {
        return Err(ArtifactError::Trailing { file, expected, found });
    }
    let body = &bytes[HEADER_BYTES..];
    let (stored, computed) = (u64_at(bytes, 20), fnv1a64(body));
    if stored != computed {
        return Err(ArtifactError::Checksum { file, stored, computed });
    }
    let mut dec = Dec { buf: body, field: "" };
    let program = Program::deserialize(&mut dec).map_err(|e| ArtifactError::Parse { file: file.clone(), msg: e.0 })?;
    if !dec.buf.is_empty() {
        let msg = format!("{} bytes left over after the program", dec.buf.len());
        return Err(ArtifactError::Parse { file, msg });
    }
    // The version lies outside the checksum; a writer writes the oldest version that holds the
    // program, so any other is a damaged header.
    let needed = version_for(&program);
    if version < needed {
        let what = match needed {
            6 => "casts inside fused regions",
            5 => "tuning entries",
            4 => "sample_token steps",
            _ => "weight sets",
        };
        let msg = format!("format version {version} cannot hold {what} (version {needed} can)");
        return Err(ArtifactError::Invalid { file, msg });
    }
    if version > needed {
        let msg = format!("written as format version {version}, but it holds nothing version {needed} cannot: a damaged header");
        return Err(ArtifactError::Invalid { file, msg });
    }
    program.validate_layout().map_err(|msg| ArtifactError::Invalid { file, msg })?;
    Ok(program)
}

/// Writes an artifact (to a temporary file first, so a reader never sees half of one).
pub fn save_file(path: &Path, program: &Program) -> Result<(), ArtifactError> {
    let file = path.display().to_string();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let io = |source| ArtifactError::Io { file: file.clone(), source };
    if path.is_dir() {
        return Err(io(std::io::Error::other("is a folder; name the artifact file to write")));
    }
    // The temporary file never outlives a failed write or rename.
    let r = std::fs::write(&tmp, save(program)).and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(io)
}

/// Reads an artifact from a file.
pub fn load_file(path: &Path) -> Result<Program, ArtifactError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ArtifactError::Io { file: file.clone(), source })?;
    load(&bytes, &file)
}

/// A guess at what a file that is not an artifact is, for the error message.
fn looks_like(b: &[u8]) -> String {
    let first_text = b.iter().find(|c| !c.is_ascii_whitespace());
    let printable = |c: &u8| c.is_ascii_graphic() || c.is_ascii_whitespace();
    if b.is_empty() {
        "an empty file".into()
    } else if b.len() > 8 && b[8] == b'{' && u64_at(b, 0) <= (b.len() - 8) as u64 {
        "a safetensors file (weights, not a compiled program)".into()
    } else if b.starts_with(b"PK\x03\x04") {
        "a zip archive (an .npz checkpoint?)".into()
    } else if b.starts_with(b"\x93NUMPY") {
        "a .npy array".into()
    } else if matches!(first_text, Some(b'{') | Some(b'[')) {
        "JSON text".into()
    } else if b.starts_with(b"\x1f\x8b") {
        "gzip data".into()
    } else if b.starts_with(b"\x7fELF") {
        "an executable (ELF)".into()
    } else if b.iter().take(64).all(printable) {
        let head: String = b.iter().take(24).map(|&c| c as char).collect();
        format!("text starting {:?}", head)
    } else {
        let head: Vec<String> = b.iter().take(8).map(|c| format!("{c:02x}")).collect();
        format!("binary data starting {}", head.join(" "))
    }
}

// ---- the body encoding: a serde Serializer and Deserializer ----

/// A message from the body codec.
#[derive(Debug)]
struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl ser::Error for CodecError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        CodecError(msg.to_string())
    }
}

impl de::Error for CodecError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        CodecError(msg.to_string())
    }
}

/// The encoder; `open` holds, per open sequence, map or struct, where its count goes and the
/// count so far.
#[derive(Default)]
struct Enc {
    out: Vec<u8>,
    open: Vec<(usize, u64)>,
}

impl Enc {
    fn begin(&mut self) {
        self.open.push((self.out.len(), 0));
        self.out.extend_from_slice(&0u64.to_le_bytes());
    }

    fn item(&mut self) {
        if let Some(top) = self.open.last_mut() {
            top.1 += 1;
        }
    }

    fn end(&mut self) {
        if let Some((at, n)) = self.open.pop() {
            self.out[at..at + 8].copy_from_slice(&n.to_le_bytes());
        }
    }

    fn str(&mut self, s: &str) {
        self.out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
}

type EncResult = Result<(), CodecError>;

macro_rules! enc_num {
    ($($method:ident $t:ty;)*) => {$(
        fn $method(self, v: $t) -> EncResult {
            self.out.extend_from_slice(&v.to_le_bytes());
            Ok(())
        }
    )*};
}

impl ser::Serializer for &mut Enc {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    enc_num! {
        serialize_i8 i8; serialize_i16 i16; serialize_i32 i32; serialize_i64 i64;
        serialize_u8 u8; serialize_u16 u16; serialize_u32 u32; serialize_u64 u64;
        serialize_f32 f32; serialize_f64 f64;
    }

    fn serialize_bool(self, v: bool) -> EncResult {
        self.out.push(v as u8);
        Ok(())
    }
    fn serialize_char(self, v: char) -> EncResult {
        self.serialize_u32(v as u32)
    }
    fn serialize_str(self, v: &str) -> EncResult {
        self.str(v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> EncResult {
        self.out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        self.out.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> EncResult {
        self.out.push(0);
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> EncResult {
        self.out.push(1);
        value.serialize(self)
    }
    fn serialize_unit(self) -> EncResult {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> EncResult {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> EncResult {
        self.str(variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _: &'static str, value: &T) -> EncResult {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(self, _: &'static str, _: u32, variant: &'static str, value: &T) -> EncResult {
        self.str(variant);
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, CodecError> {
        self.begin();
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, CodecError> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, CodecError> {
        Ok(self)
    }
    fn serialize_tuple_variant(self, _: &'static str, _: u32, variant: &'static str, _: usize) -> Result<Self, CodecError> {
        self.str(variant);
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, CodecError> {
        self.begin();
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, CodecError> {
        self.begin();
        Ok(self)
    }
    fn serialize_struct_variant(self, _: &'static str, _: u32, variant: &'static str, _: usize) -> Result<Self, CodecError> {
        self.str(variant);
        self.begin();
        Ok(self)
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

impl ser::SerializeSeq for &mut Enc {
    type Ok = ();
    type Error = CodecError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> EncResult {
        self.item();
        value.serialize(&mut **self)
    }
    fn end(self) -> EncResult {
        Enc::end(self);
        Ok(())
    }
}

impl ser::SerializeMap for &mut Enc {
    type Ok = ();
    type Error = CodecError;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> EncResult {
        self.item();
        key.serialize(&mut **self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> EncResult {
        value.serialize(&mut **self)
    }
    fn end(self) -> EncResult {
        Enc::end(self);
        Ok(())
    }
}

macro_rules! enc_positional {
    ($($trait:ident $method:ident;)*) => {$(
        impl ser::$trait for &mut Enc {
            type Ok = ();
            type Error = CodecError;
            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> EncResult {
                value.serialize(&mut **self)
            }
            fn end(self) -> EncResult {
                Ok(())
            }
        }
    )*};
}

enc_positional! {
    SerializeTuple serialize_element;
    SerializeTupleStruct serialize_field;
    SerializeTupleVariant serialize_field;
}

macro_rules! enc_named {
    ($($trait:ident;)*) => {$(
        impl ser::$trait for &mut Enc {
            type Ok = ();
            type Error = CodecError;
            fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> EncResult {
                self.item();
                self.str(key);
                value.serialize(&mut **self)
            }
            fn end(self) -> EncResult {
                Enc::end(self);
                Ok(())
            }
        }
    )*};
}

enc_named! { SerializeStruct; SerializeStructVariant; }

/// The decoder: the bytes not yet read, and the last field name read (for messages).
struct Dec<'de> {
    buf: &'de [u8],
    field: &'de str,
}

impl<'de> Dec<'de> {
    fn take(&mut self, n: usize) -> Result<&'de [u8], CodecError> {
        if n > self.buf.len() {
            return Err(CodecError(format!("needs {n} more bytes, {} left", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A length; every item of a Program takes at least one byte, so it cannot exceed the rest.
    fn len(&mut self) -> Result<usize, CodecError> {
        let n = u64::from_le_bytes(self.array()?);
        if n > self.buf.len() as u64 {
            return Err(CodecError(format!("a length of {n} with {} bytes left", self.buf.len())));
        }
        Ok(n as usize)
    }

    fn str(&mut self) -> Result<&'de str, CodecError> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|e| CodecError(format!("a string that is not UTF-8: {e}")))
    }
}

type DecResult<T> = Result<T, CodecError>;

macro_rules! dec_num {
    ($($method:ident $visit:ident $t:ty;)*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
            v.$visit(<$t>::from_le_bytes(self.array()?))
        }
    )*};
}

/// The items of a sequence, map, tuple or struct: `left` more to read.
struct Items<'a, 'de> {
    dec: &'a mut Dec<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Items<'_, 'de> {
    type Error = CodecError;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> DecResult<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.dec).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::MapAccess<'de> for Items<'_, 'de> {
    type Error = CodecError;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> DecResult<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.dec).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> DecResult<V::Value> {
        seed.deserialize(&mut *self.dec)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::Deserializer<'de> for &mut Dec<'de> {
    type Error = CodecError;

    dec_num! {
        deserialize_i8 visit_i8 i8; deserialize_i16 visit_i16 i16;
        deserialize_i32 visit_i32 i32; deserialize_i64 visit_i64 i64;
        deserialize_u8 visit_u8 u8; deserialize_u16 visit_u16 u16;
        deserialize_u32 visit_u32 u32; deserialize_u64 visit_u64 u64;
        deserialize_f32 visit_f32 f32; deserialize_f64 visit_f64 f64;
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> DecResult<V::Value> {
        Err(CodecError("the body encoding is not self-describing".into()))
    }
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        match self.array::<1>()?[0] {
            0 => v.visit_bool(false),
            1 => v.visit_bool(true),
            b => Err(CodecError(format!("a bool byte of {b}"))),
        }
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        let c = u32::from_le_bytes(self.array()?);
        v.visit_char(char::from_u32(c).ok_or_else(|| CodecError(format!("{c:#x} is not a char")))?)
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        v.visit_borrowed_str(self.str()?)
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        self.deserialize_str(v)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        let n = self.len()?;
        v.visit_borrowed_bytes(self.take(n)?)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        self.deserialize_bytes(v)
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        match self.array::<1>()?[0] {
            0 => v.visit_none(),
            1 => v.visit_some(self),
            b => Err(CodecError(format!("an option tag of {b}"))),
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> DecResult<V::Value> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> DecResult<V::Value> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        let left = self.len()?;
        v.visit_seq(Items { dec: self, left })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, left: usize, v: V) -> DecResult<V::Value> {
        v.visit_seq(Items { dec: self, left })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _: &'static str, left: usize, v: V) -> DecResult<V::Value> {
        v.visit_seq(Items { dec: self, left })
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        let left = self.len()?;
        v.visit_map(Items { dec: self, left })
    }
    fn deserialize_struct<V: Visitor<'de>>(self, _: &'static str, _: &'static [&'static str], v: V) -> DecResult<V::Value> {
        self.deserialize_map(v)
    }
    fn deserialize_enum<V: Visitor<'de>>(self, _: &'static str, _: &'static [&'static str], v: V) -> DecResult<V::Value> {
        v.visit_enum(self)
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> DecResult<V::Value> {
        self.field = self.str()?;
        v.visit_borrowed_str(self.field)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> DecResult<V::Value> {
        // Values are not self-describing, so an unknown field cannot be skipped.
        Err(CodecError(format!("field `{}` is unknown to this kiln (a newer kiln wrote it?)", self.field)))
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

impl<'de> de::EnumAccess<'de> for &mut Dec<'de> {
    type Error = CodecError;
    type Variant = Self;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> DecResult<(V::Value, Self)> {
        let name = de::value::BorrowedStrDeserializer::<CodecError>::new(self.str()?);
        Ok((seed.deserialize(name)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for &mut Dec<'de> {
    type Error = CodecError;
    fn unit_variant(self) -> DecResult<()> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> DecResult<T::Value> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, left: usize, v: V) -> DecResult<V::Value> {
        v.visit_seq(Items { dec: self, left })
    }
    fn struct_variant<V: Visitor<'de>>(self, _: &'static [&'static str], v: V) -> DecResult<V::Value> {
        de::Deserializer::deserialize_map(self, v)
    }
}
