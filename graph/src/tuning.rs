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
//!   GEMM shape), `layer_norm` or `rms_norm` (the block-per-row or the warp-per-row kernel).
//! - `shape`: the key the runtime prints for that kernel (`KILN_CUDA_VERBOSE=1`): for a GEMM
//!   `MxNxK DTYPE[ tb][+epilogue][ batch B strides SA/SB]`, for a norm `ROWSxD DTYPE`.
//! - `choice`: for `gemm`, `gemv` or `cublaslt:<i>` (the i-th of cuBLASLt's heuristic
//!   candidates); for a norm, `block` or `warp`.
//! - `us`: optional, the time per call the choice measured (microseconds), for people.
//!
//! A load writes the choices it measured as such a table when `KILN_CUDA_TUNING_OUT` names a
//! file (merged into the file's entries when it exists), which is how the device script
//! makes one.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The value of the table's `format` field.
pub const FORMAT: &str = "kiln-tuning";
/// The table version this kiln reads and writes.
pub const VERSION: u32 = 1;
/// The kernels a table may choose for.
pub const KERNELS: &[&str] = &["gemm", "layer_norm", "rms_norm"];

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
                table(&entry("H200", "attention", "1x2x3 F32", "gemv")),
                "kernel \"attention\" is not one kiln tunes (known: gemm, layer_norm, rms_norm)",
            ),
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
    fn merging_replaces_an_entry_with_the_same_key() {
        let mut t = TuningTable::new();
        let e = |choice: &str| TuningEntry { card: "c".into(), kernel: "gemm".into(), shape: "s".into(), choice: choice.into(), us: None };
        t.merge([e("gemv")]);
        t.merge([e("cublaslt:1")]);
        assert_eq!(t.entries, vec![e("cublaslt:1")]);
        assert!(t.validate().is_ok());
    }
}
