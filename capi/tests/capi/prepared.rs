//! The C API maps an artifact's prepared weight file (`<artifact>.weights`): outputs equal the
//! Rust API's from the checkpoint, with the weights path given or NULL, and a corrupt prepared
//! file fails the open with `KILN_STATUS_WEIGHTS` naming it (so the open did read it).

use crate::common::*;
use kiln_capi::*;
use kiln_runtime::cpu::prepared;
use kiln_runtime::WeightStore;
use std::sync::Arc;

#[test]
fn the_c_api_uses_the_prepared_file() {
    let dir = std::env::temp_dir().join(format!("kiln-capi-prepared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch");
    let (art, w) = (dir.join("tiny.kiln"), dir.join("weights.safetensors"));
    std::fs::copy(artifact(), &art).expect("copy artifact");
    std::fs::copy(weights(), &w).expect("copy weights");
    let program = kiln_graph::artifact::load_file(&art).expect("artifact");
    let store = WeightStore::for_program(&program, Some(&w)).expect("weights");
    prepared::write(&program, Arc::new(store), &prepared::path_for(&art)).expect("write prepared");
    let want: Vec<Vec<u8>> = rust_outputs(&inputs()).into_iter().map(|(_, b)| b).collect();
    let h = open(&art, &w).unwrap_or_else(|(st, m)| panic!("open: {st:?}: {m}"));
    assert_eq!(run_c(&h, &inputs()), want);
    drop(h);
    let mut s = std::ptr::null_mut();
    // SAFETY: a valid C string, NULL weights (allowed) and a valid out-pointer.
    let st = unsafe { kiln_session_open(KILN_ABI_VERSION, c_path(&art).as_ptr(), std::ptr::null(), &mut s) };
    assert_eq!(st, KilnStatus::Ok, "{}", last_error());
    let h = Handle(s);
    assert_eq!(run_c(&h, &inputs()), want);
    drop(h);
    let pp = prepared::path_for(&art);
    let mut bytes = std::fs::read(&pp).expect("prepared");
    *bytes.last_mut().expect("bytes") ^= 1;
    std::fs::write(&pp, &bytes).expect("corrupt");
    let (st, msg) = match open(&art, &w) {
        Ok(_) => panic!("a corrupt prepared file was accepted"),
        Err(e) => e,
    };
    assert_eq!(st, KilnStatus::Weights, "{msg}");
    assert!(msg.contains(&pp.display().to_string()) && msg.contains("checksum mismatch"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}
