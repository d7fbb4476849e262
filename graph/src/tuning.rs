//! The tuning table: kernel choices measured on a GPU, keyed by the card's name, the kernel
//! and the shape, which `kiln compile --backend cuda` reads and stores in the artifact
//! ([`crate::program::Program::tuning`]) so that a load on that card uses them instead of
//! measuring again. A shape the table lacks, or a card it does not name, falls back to the
//! choice made at load (measured, as before).
//!
//! The file is JSON:
//!
//! ```json
//! {"format": "kiln-tuning", "version": 1, "entries": [
//!   {"card": "NVIDIA H200", "kernel": "gemm", "shape": "1x2304x2048 BF16 tb", "choice": "gemv", "us": 4.1}
//! ]}
//! ```
//!
//! - `card`: the name the CUDA driver gives the device (`cuDeviceGetName`).
//! - `kernel`: what is chosen: `gemm` (kiln's GEMV or one of cuBLASLt's algorithms for one
//!   GEMM shape), `layer_norm` or `rms_norm` (the block-per-row or the warp-per-row kernel),
//!   `attention` (the tensor-core prefill kernel or one of its variants).
//! - `shape`: the key the runtime prints for that kernel (`KILN_CUDA_VERBOSE=1`): for a GEMM
//!   `MxNxK DTYPE[ tb][+epilogue][ batch B strides SA/SB]`, for a norm `ROWSxD DTYPE`, for
//!   attention `BxSQxHQxD kv SKxHKV DTYPE MASK[ softcap]` ([`AttentionShape`]).
//! - `choice`: for `gemm`, `gemv` or `cublaslt:<i>` (the i-th of cuBLASLt's heuristic
//!   candidates); for a norm, `block` or `warp`; for attention, `default` or the variant's
//!   flags joined by `_` in the order of [`ATTENTION_FLAGS`] (`q128_s3`: the kernel
//!   `attn_mma_bf16_d72_q128_s3`; which variants exist per head dim is kiln-kernels' list,
//!   checked when `kiln compile` reads the table).
//! - `us`: optional, the time per call the choice measured (microseconds), for people.
//!
//! A load writes the choices it measured as such a table when `KILN_CUDA_TUNING_OUT` names a
//! file (merged into the file's entries when it exists), which is how the device script
//! makes one.

use crate::DType;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The value of the table's `format` field.
pub const FORMAT: &str = "kiln-tuning";
/// The table version this kiln reads and writes.
pub const VERSION: u32 = 1;
/// The kernels a table may choose for.
pub const KERNELS: &[&str] = &["gemm", "layer_norm", "rms_norm", "attention"];
/// The variant flags an attention choice may name, in suffix order (kiln-kernels'
/// `ATTN_FLAGS`; a runtime test keeps the two equal).
pub const ATTENTION_FLAGS: [&str; 5] = ["q128", "s3", "np", "vs", "k32"];
/// The mask kinds of an attention shape key.
pub const ATTENTION_MASKS: [&str; 5] = ["none", "causal", "sliding", "additive", "positions"];

/// The shape key of an attention step: `BxSQxHQxD kv SKxHKV DTYPE MASK[ softcap]`, e.g.
/// `32x256x16x72 kv 256x16 BF16 none` (So400m at 224 px, batch 32).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub sq: usize,
    pub hq: usize,
    pub d: usize,
    pub sk: usize,
    pub hkv: usize,
    pub dtype: DType,
    /// One of [`ATTENTION_MASKS`].
    pub mask: String,
    pub softcap: bool,
}

impl AttentionShape {
    /// The table's spelling.
    pub fn key(&self) -> String {
        let cap = if self.softcap { " softcap" } else { "" };
        let (b, sq, hq, d, sk, hkv) = (self.batch, self.sq, self.hq, self.d, self.sk, self.hkv);
        format!("{b}x{sq}x{hq}x{d} kv {sk}x{hkv} {:?} {}{cap}", self.dtype, self.mask)
    }

    /// Reads a key written by [`AttentionShape::key`].
    pub fn parse(s: &str) -> Option<AttentionShape> {
        let parts: Vec<&str> = s.split(' ').collect();
        let (q, kv, dt, mask, cap) = match parts.as_slice() {
            [q, "kv", kv, dt, mask] => (q, kv, dt, mask, false),
            [q, "kv", kv, dt, mask, "softcap"] => (q, kv, dt, mask, true),
            _ => return None,
        };
        let dims = |x: &str| x.split('x').map(|n| n.parse::<usize>().ok().filter(|&n| n > 0)).collect::<Option<Vec<usize>>>();
        let (q, kv) = (dims(q)?, dims(kv)?);
        let ([batch, sq, hq, d], [sk, hkv]) = (q.as_slice(), kv.as_slice()) else { return None };
        let dtype = DType::parse(&dt.to_ascii_lowercase()).filter(|t| t.is_float() && format!("{t:?}") == *dt)?;
        ATTENTION_MASKS.contains(mask).then_some(())?;
        let mask = mask.to_string();
        Some(AttentionShape { batch: *batch, sq: *sq, hq: *hq, d: *d, sk: *sk, hkv: *hkv, dtype, mask, softcap: cap })
    }
}

/// Whether `choice` is `default` or variant flags in [`ATTENTION_FLAGS`] order, each once.
pub fn attention_choice_ok(choice: &str) -> bool {
    if choice == "default" {
        return true;
    }
    let mut next = 0;
    for part in choice.split('_') {
        match ATTENTION_FLAGS.iter().position(|f| *f == part) {
            Some(i) if i >= next => next = i + 1,
            _ => return false,
        }
    }
    true
}

/// One measured choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningEntry {
    pub card: String,
    pub kernel: String,
    pub shape: String,
    pub choice: String,
    /// Microseconds per call of the chosen option, where measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub us: Option<f64>,
}

/// A whole table file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningTable {
    pub format: String,
    pub version: u32,
    pub entries: Vec<TuningEntry>,
}

/// How a GEMM runs on the cuda backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmChoice {
    /// kiln's GEMV kernel.
    Gemv,
    /// cuBLASLt with its heuristic's i-th algorithm.
    CublasLt(usize),
}

impl GemmChoice {
    /// Parses `gemv` or `cublaslt:<i>`.
    pub fn parse(s: &str) -> Option<GemmChoice> {
        if s == "gemv" {
            return Some(GemmChoice::Gemv);
        }
        let i = s.strip_prefix("cublaslt:")?;
        if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        i.parse().ok().map(GemmChoice::CublasLt)
    }

    /// The table's spelling.
    pub fn name(self) -> String {
        match self {
            GemmChoice::Gemv => "gemv".into(),
            GemmChoice::CublasLt(i) => format!("cublaslt:{i}"),
        }
    }
}

impl TuningEntry {
    /// Why the entry is unusable, if it is.
    fn check(&self) -> Result<(), String> {
        if self.card.trim().is_empty() {
            return Err("`card` is empty (the name the CUDA driver gives the device, e.g. \"NVIDIA H200\")".into());
        }
        if !KERNELS.contains(&self.kernel.as_str()) {
            return Err(format!("kernel \"{}\" is not one kiln tunes (known: {})", self.kernel, KERNELS.join(", ")));
        }
        if self.shape.trim().is_empty() {
            return Err("`shape` is empty".into());
        }
        if self.kernel == "gemm" && GemmChoice::parse(&self.choice).is_none() {
            return Err(format!("choice \"{}\" for a gemm: expected \"gemv\" or \"cublaslt:<index>\"", self.choice));
        }
        if self.kernel.ends_with("_norm") && !matches!(self.choice.as_str(), "block" | "warp") {
            return Err(format!("choice \"{}\" for a {}: expected \"block\" or \"warp\"", self.choice, self.kernel));
        }
        if self.kernel == "attention" {
            if AttentionShape::parse(&self.shape).is_none() {
                return Err(format!(
                    "attention shape \"{}\": expected \"BxSQxHQxD kv SKxHKV DTYPE MASK[ softcap]\" (DTYPE F32, BF16 or F16; MASK one of {})",
                    self.shape,
                    ATTENTION_MASKS.join(", ")
                ));
            }
            if !attention_choice_ok(&self.choice) {
                return Err(format!(
                    "choice \"{}\" for attention: expected \"default\" or variant flags joined by _ in this order: {}",
                    self.choice,
                    ATTENTION_FLAGS.join(", ")
                ));
            }
        }
        if let Some(us) = self.us {
            if !us.is_finite() || us < 0.0 {
                return Err(format!("`us` is {us}: expected a time in microseconds, at least 0"));
            }
        }
        Ok(())
    }
}

impl TuningTable {
    /// An empty table.
    pub fn new() -> TuningTable {
        TuningTable { format: FORMAT.into(), version: VERSION, entries: vec![] }
    }

    /// Reads and validates a table; `source` names it in errors (a path).
    pub fn parse(text: &str, source: &str) -> Result<TuningTable, String> {
        let t: TuningTable = serde_json::from_str(text).map_err(|e| format!("tuning table {source}: {e}"))?;
        t.validate().map_err(|e| format!("tuning table {source}: {e}"))?;
        Ok(t)
    }

    /// Checks the format, the version, every entry, and that no key (card, kernel, shape)
    /// appears twice.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is \"{}\", expected \"{FORMAT}\"", self.format));
        }
        if self.version != VERSION {
            return Err(format!("version {} (this kiln reads version {VERSION})", self.version));
        }
        let mut seen = HashSet::new();
        for (i, e) in self.entries.iter().enumerate() {
            e.check().map_err(|m| format!("entry {i}: {m}"))?;
            if !seen.insert((&e.card, &e.kernel, &e.shape)) {
                return Err(format!("entry {i}: a second entry for card \"{}\", {} \"{}\"", e.card, e.kernel, e.shape));
            }
        }
        Ok(())
    }

    /// Adds `entries`, replacing those with the same key.
    pub fn merge(&mut self, entries: impl IntoIterator<Item = TuningEntry>) {
        for e in entries {
            match self.entries.iter_mut().find(|x| x.card == e.card && x.kernel == e.kernel && x.shape == e.shape) {
                Some(x) => *x = e,
                None => self.entries.push(e),
            }
        }
    }

    /// The table as pretty JSON (one entry per line).
    pub fn to_json(&self) -> String {
        let mut s = format!("{{\"format\": \"{}\", \"version\": {}, \"entries\": [", self.format, self.version);
        for (i, e) in self.entries.iter().enumerate() {
            s += if i == 0 { "\n  " } else { ",\n  " };
            s += &serde_json::to_string(e).unwrap_or_default();
        }
        s += if self.entries.is_empty() { "]}\n" } else { "\n]}\n" };
        s
    }
}

impl Default for TuningTable {
    fn default() -> Self {
        TuningTable::new()
    }
}

/// The entry for `card`, `kernel` and `shape` in `entries`.
pub fn lookup<'a>(entries: &'a [TuningEntry], card: &str, kernel: &str, shape: &str) -> Option<&'a TuningEntry> {
    entries.iter().find(|e| e.card == card && e.kernel == kernel && e.shape == shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &str) -> String {
        format!("{{\"format\": \"kiln-tuning\", \"version\": 1, \"entries\": [{entries}]}}")
    }

    #[test]
    fn a_valid_table_reads_and_writes_back() {
        let text = table(
            r#"{"card": "NVIDIA H200", "kernel": "gemm", "shape": "1x2304x2048 BF16 tb", "choice": "gemv", "us": 4.5},
               {"card": "NVIDIA H200", "kernel": "gemm", "shape": "1024x2304x2048 BF16 tb", "choice": "cublaslt:3"}"#,
        );
        let t = TuningTable::parse(&text, "t.json").unwrap();
        assert_eq!(t.entries.len(), 2);
        assert_eq!(GemmChoice::parse(&t.entries[1].choice), Some(GemmChoice::CublasLt(3)));
        assert_eq!(TuningTable::parse(&t.to_json(), "again").unwrap(), t);
        let e = lookup(&t.entries, "NVIDIA H200", "gemm", "1x2304x2048 BF16 tb").unwrap();
        assert_eq!(e.us, Some(4.5));
        assert!(lookup(&t.entries, "NVIDIA H100 80GB HBM3", "gemm", "1x2304x2048 BF16 tb").is_none());
    }

    #[test]
    fn malformed_tables_are_refused_by_name() {
        let entry = |card: &str, kernel: &str, shape: &str, choice: &str| {
            format!(r#"{{"card": "{card}", "kernel": "{kernel}", "shape": "{shape}", "choice": "{choice}"}}"#)
        };
        let cases = [
            ("{".to_string(), "EOF"),
            (r#"{"format": "kiln-tuning", "version": 2, "entries": []}"#.to_string(), "version 2"),
            (r#"{"format": "other", "version": 1, "entries": []}"#.to_string(), "format is \"other\""),
            (r#"{"format": "kiln-tuning", "version": 1}"#.to_string(), "missing field `entries`"),
            (table(&entry("", "gemm", "1x2x3 F32", "gemv")), "entry 0: `card` is empty"),
            (
                table(&entry("H200", "softmax", "1x2x3 F32", "gemv")),
                "kernel \"softmax\" is not one kiln tunes (known: gemm, layer_norm, rms_norm, attention)",
            ),
            (table(&entry("H200", "attention", "1x2x3 F32", "default")), "attention shape \"1x2x3 F32\": expected"),
            (table(&entry("H200", "attention", "32x256x16x72 kv 256x16 BF16 window", "default")), "MASK one of none, causal"),
            (table(&entry("H200", "attention", "32x256x16x72 kv 256x16 bf16 none", "default")), "DTYPE F32, BF16 or F16"),
            (table(&entry("H200", "attention", "32x256x16x72 kv 256x16 I32 none", "default")), "attention shape"),
            (table(&entry("H200", "attention", "32x0x16x72 kv 256x16 BF16 none", "default")), "attention shape"),
            (table(&entry("H200", "attention", "32x256x16x72 kv 256x16 BF16 none", "s3_q128")), "choice \"s3_q128\" for attention"),
            (table(&entry("H200", "attention", "32x256x16x72 kv 256x16 BF16 none", "fast")), "q128, s3, np, vs, k32"),
            (table(&entry("H200", "attention", "32x256x16x72 kv 256x16 BF16 none", "s3_s3")), "choice \"s3_s3\""),
            (table(&entry("H200", "gemm", "", "gemv")), "`shape` is empty"),
            (table(&entry("H200", "gemm", "1x2x3 F32", "cublaslt:")), "choice \"cublaslt:\""),
            (table(&entry("H200", "gemm", "1x2x3 F32", "cublaslt:-1")), "choice \"cublaslt:-1\""),
            (table(&entry("H200", "gemm", "1x2x3 F32", "fast")), "choice \"fast\""),
            (table(&entry("H200", "rms_norm", "8x2304 BF16", "gemv")), "choice \"gemv\" for a rms_norm"),
            (
                table(&format!("{}, {}", entry("H200", "gemm", "1x2x3 F32", "gemv"), entry("H200", "gemm", "1x2x3 F32", "cublaslt:0"))),
                "entry 1: a second entry",
            ),
            (table(r#"{"card": "H200", "kernel": "gemm", "shape": "s", "choice": "gemv", "speed": 1}"#), "unknown field `speed`"),
            (table(r#"{"card": "H200", "kernel": "gemm", "shape": "s", "choice": "gemv", "us": -1}"#), "`us` is -1"),
        ];
        for (text, want) in cases {
            let e = TuningTable::parse(&text, "bad.json").unwrap_err();
            assert!(e.starts_with("tuning table bad.json: "), "{e}");
            assert!(e.contains(want), "{text}: {e} (wanted {want})");
        }
    }

    #[test]
    fn attention_entries_read_back_with_their_shapes() {
        let text = table(
            r#"{"card": "NVIDIA H200", "kernel": "attention", "shape": "32x256x16x72 kv 256x16 BF16 none", "choice": "q128_s3", "us": 75.5},
               {"card": "NVIDIA H200", "kernel": "attention", "shape": "1x1024x8x256 kv 1024x4 BF16 causal softcap", "choice": "default"}"#,
        );
        let t = TuningTable::parse(&text, "t.json").unwrap();
        assert_eq!(TuningTable::parse(&t.to_json(), "again").unwrap(), t);
        let s = AttentionShape::parse(&t.entries[0].shape).unwrap();
        assert_eq!((s.batch, s.sq, s.hq, s.d, s.sk, s.hkv, s.dtype), (32, 256, 16, 72, 256, 16, DType::BF16));
        assert_eq!((s.mask.as_str(), s.softcap), ("none", false));
        assert_eq!(s.key(), t.entries[0].shape);
        let g = AttentionShape::parse(&t.entries[1].shape).unwrap();
        assert!(g.softcap && g.mask == "causal" && g.key() == t.entries[1].shape);
        assert!(lookup(&t.entries, "NVIDIA H200", "attention", "32x256x16x72 kv 256x16 BF16 none").is_some());
        for ok in ["default", "q128", "q128_s3_np_vs_k32", "np_vs"] {
            assert!(attention_choice_ok(ok), "{ok}");
        }
        for bad in ["", "_", "q128_", "vs_np", "default_s3", "Q128"] {
            assert!(!attention_choice_ok(bad), "{bad}");
        }
    }

    #[test]
    fn merging_replaces_an_entry_with_the_same_key() {
        let mut t = TuningTable::new();
        let e = |choice: &str| TuningEntry { card: "c".into(), kernel: "gemm".into(), shape: "s".into(), choice: choice.into(), us: None };
        t.merge([e("gemv")]);
        t.merge([e("cublaslt:1")]);
        assert_eq!(t.entries, vec![e("cublaslt:1")]);
        assert!(t.validate().is_ok());
    }
}
