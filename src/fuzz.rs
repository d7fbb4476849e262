//! Fuzz target bodies: each reads untrusted bytes as kiln reads a user's file and must return
//! (the bytes accepted or an error), never panic, abort or hang. The cargo-fuzz crate in
//! `fuzz/` calls them (`scripts/fuzz.sh`), and `tests/fuzz_replay.rs` replays the committed
//! seed corpora (`fuzz/corpus/<target>/`) plus seeded mutations through them on stable Rust.

use crate::{io, preprocess, tokenizer};
use kiln_models::Profile;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The targets, by the name their corpus folder and cargo-fuzz binary have.
pub const TARGETS: [&str; 9] = ["safetensors", "npz", "npy", "artifact", "config", "tokenizer_json", "spm_model", "image", "run_inputs"];

/// Runs target `name` on `data`; `fixtures` is the repository's `tests/fixtures` (the model
/// folders the config and run-input targets use). Returns whether the input was accepted.
pub fn run(name: &str, fixtures: &Path, data: &[u8]) -> bool {
    match name {
        "safetensors" => safetensors(data),
        "npz" => npz(data),
        "npy" => npy(data),
        "artifact" => artifact(data),
        "config" => config(fixtures, data),
        "tokenizer_json" => tokenizer_json(data),
        "spm_model" => spm_model(data),
        "image" => image(data),
        "run_inputs" => run_inputs(fixtures, data),
        other => panic!("no fuzz target {other}"),
    }
}

/// A safetensors file: the header's length and JSON, every tensor's range, then the inputs
/// reader of `kiln run` (`io::parse`).
pub fn safetensors(data: &[u8]) -> bool {
    let indexed = kiln_graph::safetensors::index_file(Path::new("fuzz.safetensors"), data).is_ok();
    let parsed = io::parse(data, Path::new("fuzz.safetensors")).is_ok();
    indexed || parsed
}

/// An `.npz` file: the zip directory, each member's `.npy` header, deflated members inflated.
pub fn npz(data: &[u8]) -> bool {
    let stored = kiln_graph::npz::parse_index(data).is_ok();
    let inflated = kiln_graph::npz::read_index(data, true).is_ok();
    stored || inflated
}

/// One `.npy` header (the format inside an `.npz`).
pub fn npy(data: &[u8]) -> bool {
    kiln_graph::npz::parse_npy_header(data).is_ok()
}

/// An artifact: the format reader (magic, version, checksum, layout), then the validator
/// every session runs.
pub fn artifact(data: &[u8]) -> bool {
    let raw = kiln_graph::artifact::load(data, "fuzz.kiln").is_ok_and(|p| p.validate().is_ok());
    // With the length and checksum made right, a mutation reaches the decoder and validator.
    let h = kiln_graph::artifact::HEADER_BYTES;
    if data.len() < h || &data[..8] != kiln_graph::artifact::MAGIC {
        return raw;
    }
    let mut fixed = data.to_vec();
    let body_len = (data.len() - h) as u64;
    fixed[12..20].copy_from_slice(&body_len.to_le_bytes());
    let sum = kiln_graph::artifact::fnv1a64(&data[h..]);
    fixed[20..28].copy_from_slice(&sum.to_le_bytes());
    let Ok(p) = kiln_graph::artifact::load(&fixed, "fuzz.kiln") else { return raw };
    if p.validate().is_err() {
        return raw;
    }
    run_program(p);
    true
}

/// Runs a valid program without weights on the cpu backend, every entry on zeroed inputs, when
/// it is small: a program the validator passed must not panic the executor.
fn run_program(p: kiln_graph::program::Program) {
    let small = p.entries.iter().all(|e| e.arena_bytes < 1 << 24) && p.states.iter().all(|s| s.ty.bytes() < 1 << 24);
    if p.backend != "cpu" || !p.weights.is_empty() || !small {
        return;
    }
    let entries: Vec<(String, Vec<(String, kiln_runtime::Tensor)>)> = p
        .entries
        .iter()
        .map(|e| {
            let ins = e.inputs.iter().map(|io| (io.name.clone(), kiln_runtime::Tensor::zeros(io.operand.ty.clone()))).collect();
            (e.name.clone(), ins)
        })
        .collect();
    let Ok(mut s) = kiln_runtime::Session::new(p, std::sync::Arc::new(kiln_runtime::WeightStore::empty())) else { return };
    for (name, ins) in &entries {
        let named: Vec<(&str, &kiln_runtime::Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let _ = s.run(name, &named);
    }
}

/// The model folders whose `config.json` the config target replaces (first byte of the input
/// picks one): one per family, with their own weights, built for a small profile.
pub const CONFIG_FOLDERS: [&str; 12] = [
    "siglip/vision_map",
    "siglip/siglip_full",
    "gemma/gemma2_gqa",
    "gemma/paligemma",
    "big_vision/vit_map_learn",
    "big_vision/vmoe",
    "big_vision/cappa_captioner",
    "big_vision/jetformer",
    "big_vision/uvim_vqvae",
    "big_vision/paligemma_bv",
    "big_vision/vit_tok_sincos2d",
    "jet",
];

/// A scratch folder for this process (a target writes the file kiln reads from a folder).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("kiln-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    })
}

/// A family's `config.json`: `data[0]` picks a folder of [`CONFIG_FOLDERS`], the rest is its
/// config, read and built (graph only) against the folder's weights. A build is serialised:
/// the folder is shared.
pub fn config(fixtures: &Path, data: &[u8]) -> bool {
    static LOCK: Mutex<()> = Mutex::new(());
    let Some((&pick, json)) = data.split_first() else { return false };
    let src = fixtures.join(CONFIG_FOLDERS[pick as usize % CONFIG_FOLDERS.len()]);
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch().join("config");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    for e in std::fs::read_dir(&src).into_iter().flatten().flatten() {
        let name = e.file_name();
        if name != "config.json" {
            link(&e.path(), &dir.join(&name));
        }
    }
    if std::fs::write(dir.join("config.json"), json).is_err() {
        return false;
    }
    let profile = Profile { seq_len: Some(4), ..Profile::default() };
    kiln_models::build(&dir, &profile).is_ok()
}

fn link(from: &Path, to: &Path) {
    #[cfg(unix)]
    let _ = std::os::unix::fs::symlink(from, to);
    #[cfg(not(unix))]
    let _ = std::fs::copy(from, to);
}

/// A `tokenizer.json`: parsed, then a prompt with special tokens encoded and decoded.
pub fn tokenizer_json(data: &[u8]) -> bool {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch().join("tokenizer");
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("tokenizer.json"), data).is_err() {
        return false;
    }
    exercise(tokenizer::TextTokenizer::open(&dir))
}

/// A SentencePiece `tokenizer.model` (protobuf): parsed, checked, built, then used.
pub fn spm_model(data: &[u8]) -> bool {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch().join("spm");
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("tokenizer.model"), data).is_err() {
        return false;
    }
    exercise(tokenizer::TextTokenizer::open(&dir))
}

fn exercise(t: crate::Result<tokenizer::TextTokenizer>) -> bool {
    let Ok(t) = t else { return false };
    let ids = t.encode("<bos>a photo of <image> caption en\n").unwrap_or_default();
    let _ = t.decode(&ids, false);
    let _ = t.decode(&[0, 1, 2, 3, i64::MAX, -1], true);
    let _ = t.id("<eos>");
    true
}

/// An image file (JPEG or PNG, any mode): decoded and converted as `kiln generate --image`
/// does, then resized as the SigLIP processor does.
pub fn image(data: &[u8]) -> bool {
    match preprocess::decode_image(data, Path::new("fuzz-image"), true) {
        Ok(img) => {
            let _ = preprocess::resize(&img.pixels, img.width, img.height, 3, 7, 5, preprocess::Filter::Bilinear);
            true
        }
        Err(_) => false,
    }
}

/// The inputs of `kiln run` (a safetensors file) given to a loaded ViT (the tiny big_vision
/// fixture): read, then run, so every name, dtype and shape check meets them.
pub fn run_inputs(fixtures: &Path, data: &[u8]) -> bool {
    static SESSION: OnceLock<Option<Mutex<kiln_runtime::Session>>> = OnceLock::new();
    let Ok(ins) = io::parse(data, Path::new("fuzz-inputs.safetensors")) else { return false };
    let session = SESSION.get_or_init(|| {
        let opts = crate::CompileOptions { profile: Profile::default(), backend: "cpu".into(), trace: false };
        let dir = fixtures.join("big_vision/vit_map_learn");
        let c = crate::compile(&dir, &opts).ok()?;
        let store = kiln_runtime::WeightStore::open(&dir).ok()?;
        kiln_runtime::Session::new(c.program, std::sync::Arc::new(store)).ok().map(Mutex::new)
    });
    let Some(session) = session else { return false };
    let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
    let named: Vec<(&str, &kiln_runtime::Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
    s.run("forward", &named).is_ok()
}

/// Deterministic mutations of a seed (a small xorshift generator): byte flips, overwrites with
/// edge values, insertions, deletions, truncation and splices of a seed's own bytes; what a
/// stable `cargo test` replays through the targets (cargo-fuzz does the long runs).
pub fn mutate(seed: &[u8], state: &mut u64) -> Vec<u8> {
    let mut next = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    };
    let mut v = seed.to_vec();
    let rounds = 1 + next() % 4;
    for _ in 0..rounds {
        let len = v.len().max(1);
        let at = (next() as usize) % len;
        match next() % 7 {
            0 if !v.is_empty() => v[at] ^= 1 << (next() % 8),
            1 if !v.is_empty() => v[at] = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'{', b'-'][(next() % 9) as usize],
            2 => v.insert(at.min(v.len()), next() as u8),
            3 if !v.is_empty() => {
                let n = 1 + (next() as usize) % 16;
                v.drain(at..(at + n).min(v.len()));
            }
            4 => v.truncate(at),
            5 if v.len() > 8 => {
                // Copy a run of the input over another place (repeats fields, lengths, markers).
                let from = (next() as usize) % v.len();
                let n = 1 + (next() as usize) % 32;
                let chunk: Vec<u8> = v[from..(from + n).min(v.len())].to_vec();
                for (k, b) in chunk.into_iter().enumerate() {
                    if let Some(x) = v.get_mut(at + k) {
                        *x = b;
                    }
                }
            }
            _ => {
                // A decimal number written over digits: lengths, shapes, offsets in text headers.
                if let Some(p) = v.iter().skip(at).position(u8::is_ascii_digit) {
                    let big = ["0", "4294967296", "18446744073709551615", "99999999999", "-1", "1e308"][(next() % 6) as usize];
                    let s = at + p;
                    let e = v[s..].iter().position(|c| !c.is_ascii_digit()).map_or(v.len(), |k| s + k);
                    v.splice(s..e, big.bytes());
                }
            }
        }
    }
    v
}
