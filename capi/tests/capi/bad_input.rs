//! Bad input through the C ABI: every case returns a status and a message, nothing crashes,
//! and the session keeps working afterwards.

use crate::common::*;
use crate::tiny;
use kiln_capi::*;
use kiln_graph::{DType, TensorType};
use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};

/// A scratch folder for this test's files.
fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-capi-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Writes `bytes` to `dir/name`.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

/// Opening fails with `want`, and the message contains every one of `says`.
fn open_fails(artifact: &Path, weights: &Path, want: KilnStatus, says: &[&str]) {
    let (st, msg) = match open(artifact, weights) {
        Ok(_) => panic!("opening {} with {} succeeded", artifact.display(), weights.display()),
        Err(e) => e,
    };
    assert_eq!(st, want, "{msg}");
    for s in says {
        assert!(msg.contains(s), "message {msg:?} does not say {s:?}");
    }
}

/// Running fails with `want` and a message saying every one of `says`; the outputs are
/// untouched, and a good run on the same session still works afterwards.
fn run_fails(h: &Handle, entry: &str, ins: &[KilnInput], outs: &[KilnOutput], want: KilnStatus, says: &[&str]) {
    let st = run_raw(h, entry, ins, outs);
    let msg = last_error();
    assert_eq!(st, want, "{msg}");
    for s in says {
        assert!(msg.contains(s), "message {msg:?} does not say {s:?}");
    }
    assert_eq!(run_c(h, &inputs()).len(), 2);
}

#[test]
fn null_pointers_are_refused() {
    let (a, w) = (c_path(&artifact()), c_path(&weights()));
    let mut s: *mut KilnSession = std::ptr::null_mut();
    // SAFETY: every pointer is NULL or valid; the library must check the NULL ones.
    unsafe {
        assert_eq!(kiln_session_open(KILN_ABI_VERSION, a.as_ptr(), w.as_ptr(), std::ptr::null_mut()), KilnStatus::NullPointer);
        assert!(last_error().contains("'out'"), "{}", last_error());
        assert_eq!(kiln_session_open(KILN_ABI_VERSION, std::ptr::null(), w.as_ptr(), &mut s), KilnStatus::NullPointer);
        assert!(last_error().contains("'artifact_path'"), "{}", last_error());
        assert!(s.is_null());
        // A NULL weights path is allowed (the prepared file, else the compiled-from folder):
        // see prepared.rs.

        let mut n = 0usize;
        let mut name: *const c_char = std::ptr::null();
        let mut info = KilnIoInfo { name: std::ptr::null(), dtype: KilnDtype::F32, rank: 0, shape: std::ptr::null(), bytes: 0 };
        let e = c(ENTRY);
        assert_eq!(kiln_session_entry_count(std::ptr::null(), &mut n), KilnStatus::NullPointer);
        assert!(last_error().contains("'session'"));
        assert_eq!(kiln_session_entry_name(std::ptr::null(), 0, &mut name), KilnStatus::NullPointer);
        assert_eq!(kiln_session_input_count(std::ptr::null(), e.as_ptr(), &mut n), KilnStatus::NullPointer);
        assert_eq!(kiln_session_output_info(std::ptr::null(), e.as_ptr(), 0, &mut info), KilnStatus::NullPointer);
        let no_outs: *const KilnOutput = std::ptr::null();
        assert_eq!(kiln_session_run(std::ptr::null(), e.as_ptr(), std::ptr::null(), 0, no_outs, 0), KilnStatus::NullPointer);

        let h = open_tiny();
        assert_eq!(kiln_session_entry_count(h.0, std::ptr::null_mut()), KilnStatus::NullPointer);
        assert_eq!(kiln_session_entry_name(h.0, 0, std::ptr::null_mut()), KilnStatus::NullPointer);
        assert_eq!(kiln_session_input_count(h.0, std::ptr::null(), &mut n), KilnStatus::NullPointer);
        assert!(last_error().contains("'entry'"));
        assert_eq!(kiln_session_input_info(h.0, e.as_ptr(), 0, std::ptr::null_mut()), KilnStatus::NullPointer);
        // Buffer arrays that are NULL while their counts say otherwise.
        let mut storage = output_storage();
        let outs = output_bufs(&mut storage);
        assert_eq!(kiln_session_run(h.0, e.as_ptr(), std::ptr::null(), 2, outs.as_ptr(), 2), KilnStatus::NullPointer);
        assert!(last_error().contains("'inputs'"));
        let ins = inputs();
        let names = [c("x"), c("bias")];
        let bufs = input_bufs(&ins, &names);
        assert_eq!(kiln_session_run(h.0, e.as_ptr(), bufs.as_ptr(), 2, no_outs, 2), KilnStatus::NullPointer);
        assert!(last_error().contains("'outputs'"));
        // NULL data in one buffer.
        let mut bad = bufs.clone();
        bad[1].data = std::ptr::null::<c_void>();
        run_fails(&h, ENTRY, &bad, &outs, KilnStatus::Input, &["input 1 ('bias')", "data is NULL"]);
        // Closing NULL is a no-op.
        kiln_session_close(std::ptr::null_mut());
    }
}

#[test]
fn wrong_buffers_are_refused_before_anything_runs() {
    let h = open_tiny();
    let ins = inputs();
    let names = [c("x"), c("bias")];
    let good = input_bufs(&ins, &names);
    let mut storage = output_storage();
    let outs = output_bufs(&mut storage);

    // Counts.
    run_fails(&h, ENTRY, &good[..1], &outs, KilnStatus::Input, &["1 input buffers given, the entry takes 2"]);
    run_fails(&h, ENTRY, &good, &outs[..1], KilnStatus::Output, &["1 output buffers given, the entry has 2"]);
    // Sizes.
    let mut bad = good.clone();
    bad[0].bytes = 60;
    run_fails(&h, ENTRY, &bad, &outs, KilnStatus::Input, &["input 0 ('x')", "60 bytes given", "needs 64"]);
    let mut small = outs.clone();
    small[1].bytes = 16;
    run_fails(&h, ENTRY, &good, &small, KilnStatus::Output, &["output 1 ('probs')", "16 bytes given", "needs 32"]);
    // Dtypes: a wrong one, and a value that is no dtype at all.
    let mut bad = good.clone();
    bad[0].dtype = KilnDtype::I32;
    run_fails(&h, ENTRY, &bad, &outs, KilnStatus::Input, &["dtype i32 given", "declares f32 [2, 8]"]);
    let mut wrong_out = outs.clone();
    wrong_out[0].dtype = KilnDtype::Bf16;
    run_fails(&h, ENTRY, &good, &wrong_out, KilnStatus::Output, &["output 0 ('hidden')", "dtype bf16 given"]);
    /// `KilnInput` as C lays it out, with any integer in the dtype field.
    #[repr(C)]
    struct RawInput {
        name: *const c_char,
        dtype: i32,
        data: *const c_void,
        bytes: usize,
    }
    let raw: Vec<RawInput> = good
        .iter()
        .enumerate()
        .map(|(i, b)| RawInput { name: b.name, dtype: if i == 1 { 99 } else { 0 }, data: b.data, bytes: b.bytes })
        .collect();
    // SAFETY: RawInput has KilnInput's layout; the library reads the dtype as an integer.
    let st = unsafe { kiln_session_run(h.0, c(ENTRY).as_ptr(), raw.as_ptr().cast::<KilnInput>(), 2, outs.as_ptr(), 2) };
    assert_eq!(st, KilnStatus::Input);
    assert!(last_error().contains("dtype #99 (not a KilnDtype) given"), "{}", last_error());
    // Names: swapped buffers are caught by their names.
    let swapped = [good[1], good[0]];
    run_fails(&h, ENTRY, &swapped, &outs, KilnStatus::Input, &["named 'bias', the entry declares 'x'"]);
    // Overlapping outputs, and an output over an input.
    let mut overlap = outs.clone();
    overlap[1].data = overlap[0].data;
    run_fails(&h, ENTRY, &good, &overlap, KilnStatus::Output, &["overlaps output 0 ('hidden')"]);
    let mut in_place = vec![0u8; 128];
    let aliased = [KilnInput { name: std::ptr::null(), dtype: KilnDtype::F32, data: in_place.as_ptr().cast(), bytes: 64 }, good[1]];
    let mut outs2 = outs.clone();
    outs2[0].data = in_place.as_mut_ptr().cast();
    run_fails(&h, ENTRY, &aliased, &outs2, KilnStatus::Output, &["overlaps input 0 ('x')"]);
    // An unknown entry names the ones there are.
    run_fails(&h, "backward", &good, &outs, KilnStatus::UnknownEntry, &["no entry 'backward'", "it has: forward"]);
    // A failed run leaves the outputs as they were.
    let mut zeros = output_storage();
    let zouts = output_bufs(&mut zeros);
    assert_eq!(run_raw(&h, ENTRY, &good[..1], &zouts), KilnStatus::Input);
    assert!(zeros.iter().all(|b| b.iter().all(|&x| x == 0)));
}

#[test]
fn bad_queries_are_refused() {
    let h = open_tiny();
    let (mut n, mut name) = (0usize, std::ptr::null::<c_char>());
    let mut info = KilnIoInfo { name: std::ptr::null(), dtype: KilnDtype::F32, rank: 0, shape: std::ptr::null(), bytes: 0 };
    // SAFETY: live session and out-pointers.
    unsafe {
        assert_eq!(kiln_session_entry_name(h.0, 1, &mut name), KilnStatus::InvalidArgument);
        assert!(last_error().contains("entry 1 asked for, the artifact has 1"), "{}", last_error());
        assert!(name.is_null(), "out-parameters are written only on success");
        assert_eq!(kiln_session_output_count(h.0, c("decode").as_ptr(), &mut n), KilnStatus::UnknownEntry);
        assert!(last_error().contains("no entry 'decode'"));
        assert_eq!(kiln_session_input_info(h.0, c(ENTRY).as_ptr(), 2, &mut info), KilnStatus::InvalidArgument);
        assert!(last_error().contains("index 2 asked for, entry 'forward' has 2 inputs"), "{}", last_error());
    }
}

#[test]
fn a_header_of_another_abi_version_is_refused() {
    let (a, w) = (c_path(&artifact()), c_path(&weights()));
    let mut s: *mut KilnSession = std::ptr::null_mut();
    // SAFETY: valid strings and out-pointer.
    let st = unsafe { kiln_session_open(KILN_ABI_VERSION + 1, a.as_ptr(), w.as_ptr(), &mut s) };
    assert_eq!(st, KilnStatus::AbiVersion);
    assert!(s.is_null());
    let msg = last_error();
    assert!(msg.contains(&format!("ABI version {}", KILN_ABI_VERSION + 1)) && msg.contains("rebuild against the kiln.h"), "{msg}");
}

#[test]
fn bad_artifacts_are_refused() {
    let dir = scratch("artifacts");
    let good = std::fs::read(artifact()).expect("artifact");
    let w = weights();
    open_fails(&dir.join("missing.kiln"), &w, KilnStatus::Io, &["missing.kiln"]);
    // One flipped byte in the body.
    let mut flipped = good.clone();
    let at = kiln_graph::artifact::HEADER_BYTES + (good.len() - kiln_graph::artifact::HEADER_BYTES) / 2;
    flipped[at] ^= 0x10;
    open_fails(&write(&dir, "flipped.kiln", &flipped), &w, KilnStatus::Artifact, &["flipped.kiln", "checksum mismatch"]);
    open_fails(&write(&dir, "cut.kiln", &good[..good.len() - 9]), &w, KilnStatus::Artifact, &["truncated"]);
    open_fails(&w, &w, KilnStatus::Artifact, &["not a kiln artifact", "safetensors"]);
    open_fails(&write(&dir, "empty.kiln", &[]), &w, KilnStatus::Artifact, &["an empty file"]);
    // Another format version.
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(kiln_graph::artifact::FORMAT_VERSION + 1).to_le_bytes());
    let want = format!("made by format version {}", kiln_graph::artifact::FORMAT_VERSION + 1);
    open_fails(&write(&dir, "newer.kiln", &newer), &w, KilnStatus::ArtifactVersion, &[&want, "recompile it"]);
    // A program for a backend this build lacks.
    let mut p = kiln_graph::artifact::load(&good, "tiny").expect("load");
    p.backend = "cuda".into();
    let cuda = write(&dir, "cuda.kiln", &kiln_graph::artifact::save(&p));
    open_fails(&cuda, &w, KilnStatus::Unsupported, &["backend cuda"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn weights_that_do_not_match_the_artifact_are_refused() {
    let dir = scratch("weights");
    let a = artifact();
    let t = tiny::build();
    let mut missing = t.weights.clone();
    missing.retain(|(n, _, _)| n != "fc2.bias");
    let p = write(&dir, "missing.safetensors", &tiny::safetensors(&missing));
    open_fails(&a, &p, KilnStatus::Weights, &["fc2.bias", "not found"]);
    let mut reshaped = t.weights.clone();
    reshaped[2].1 = TensorType::new(DType::F32, [8, 16]);
    let p = write(&dir, "reshaped.safetensors", &tiny::safetensors(&reshaped));
    open_fails(&a, &p, KilnStatus::Weights, &["fc1.weight", "expects shape [16, 8]"]);
    let mut full = tiny::safetensors(&t.weights);
    full.truncate(full.len() - 5);
    let p = write(&dir, "truncated.safetensors", &full);
    open_fails(&a, &p, KilnStatus::Weights, &["truncated"]);
    let p = write(&dir, "garbage.safetensors", b"not a safetensors file at all");
    open_fails(&a, &p, KilnStatus::Weights, &["garbage.safetensors"]);
    open_fails(&a, &dir.join("absent.safetensors"), KilnStatus::Io, &["absent.safetensors"]);
    let _ = std::fs::remove_dir_all(dir);
}
