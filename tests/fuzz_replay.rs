//! The fuzz targets on stable Rust (`kiln::fuzz`): every committed seed (`fuzz/corpus/<target>/`)
//! and every regression input (`fuzz/regressions/<target>/`, crashes cargo-fuzz found, each
//! fixed), then seeded mutations of the seeds. No input may panic (an abort or hang would fail
//! the test binary). The long runs are cargo-fuzz's: `scripts/fuzz.sh <target> <execs>`.

use std::path::{Path, PathBuf};

/// Mutations per target in CI (a few thousand in all).
const MUTATIONS: usize = 400;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

/// Runs one input; a panic fails the test with the input written out for `cargo fuzz run`.
fn check(target: &str, what: &str, data: &[u8]) -> bool {
    let fixtures = root().join("tests/fixtures");
    match std::panic::catch_unwind(|| kiln::fuzz::run(target, &fixtures, data)) {
        Ok(accepted) => accepted,
        Err(_) => {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("crash-{target}"));
            std::fs::write(&out, data).unwrap();
            panic!("fuzz target {target} panicked on {what} (input written to {})", out.display());
        }
    }
}

fn replay(target: &str) {
    let seeds = files(&root().join("fuzz/corpus").join(target));
    assert!(!seeds.is_empty(), "{target}: no seed corpus");
    let mut accepted = 0;
    for (path, data) in &seeds {
        accepted += usize::from(check(target, &path.display().to_string(), data));
    }
    // A corpus of only rejected inputs would fuzz the first check and nothing behind it.
    assert!(accepted > 0, "{target}: no seed is accepted");
    for (path, data) in files(&root().join("fuzz/regressions").join(target)) {
        check(target, &path.display().to_string(), &data);
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ target.len() as u64;
    for i in 0..MUTATIONS {
        let (_, seed) = &seeds[i % seeds.len()];
        let data = kiln::fuzz::mutate(seed, &mut state);
        check(target, &format!("mutation {i} of seed {}", i % seeds.len()), &data);
    }
}

#[test]
fn every_target_has_a_test() {
    let here = std::fs::read_to_string(root().join("tests/fuzz_replay.rs")).unwrap();
    let fuzz_toml = std::fs::read_to_string(root().join("fuzz/Cargo.toml")).unwrap();
    for t in kiln::fuzz::TARGETS {
        assert!(here.contains(&format!("replay(\"{t}\")")), "{t}: no replay test");
        assert!(fuzz_toml.contains(&format!("name = \"{t}\"")), "{t}: no cargo-fuzz binary");
    }
}

#[test]
fn safetensors() {
    replay("safetensors");
}

#[test]
fn npz() {
    replay("npz");
}

#[test]
fn npy() {
    replay("npy");
}

#[test]
fn artifact() {
    replay("artifact");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn tokenizer_json() {
    replay("tokenizer_json");
}

#[test]
fn spm_model() {
    replay("spm_model");
}

#[test]
fn image() {
    replay("image");
}

#[test]
fn run_inputs() {
    replay("run_inputs");
}
