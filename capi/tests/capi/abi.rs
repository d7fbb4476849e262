//! The C ABI against the Rust API on the shipped tiny model: metadata and bit-exact outputs.

use crate::common::*;
use kiln_capi::*;
use std::ffi::c_char;

#[test]
fn versions_are_reported() {
    assert_eq!(kiln_abi_version(), KILN_ABI_VERSION);
    assert_eq!(kiln_artifact_version(), kiln_graph::artifact::FORMAT_VERSION);
}

#[test]
fn c_abi_and_rust_api_agree_bit_for_bit() {
    let h = open_tiny();
    let ins = inputs();
    let want = rust_outputs(&ins);
    let got = run_c(&h, &ins);
    assert_eq!(want.len(), got.len());
    for ((name, w), g) in want.iter().zip(&got) {
        assert!(w == g, "output '{name}' differs between the C ABI and the Rust API");
    }
    // The outputs are real numbers, not zeros left in the buffers.
    let probs: Vec<f32> = got[1].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    for row in probs.chunks(4) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
    }
    // A second run on the same session gives the same bytes.
    assert_eq!(run_c(&h, &ins), got);
}

#[test]
fn entries_and_their_inputs_and_outputs_are_described() {
    let h = open_tiny();
    let mut n = 0usize;
    // SAFETY: a live session and out-pointer.
    assert_eq!(unsafe { kiln_session_entry_count(h.0, &mut n) }, KilnStatus::Ok);
    assert_eq!(n, 1);
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: as above.
    assert_eq!(unsafe { kiln_session_entry_name(h.0, 0, &mut name) }, KilnStatus::Ok);
    assert_eq!(from_c(name), ENTRY);
    let entry = c(ENTRY);
    let (mut n_in, mut n_out) = (0usize, 0usize);
    // SAFETY: as above.
    unsafe {
        assert_eq!(kiln_session_input_count(h.0, entry.as_ptr(), &mut n_in), KilnStatus::Ok);
        assert_eq!(kiln_session_output_count(h.0, entry.as_ptr(), &mut n_out), KilnStatus::Ok);
    }
    assert_eq!((n_in, n_out), (2, 2));
    let describe = |input: bool, i: usize| {
        let mut info = KilnIoInfo { name: std::ptr::null(), dtype: KilnDtype::Bool, rank: 0, shape: std::ptr::null(), bytes: 0 };
        // SAFETY: as above.
        let st = unsafe {
            if input {
                kiln_session_input_info(h.0, entry.as_ptr(), i, &mut info)
            } else {
                kiln_session_output_info(h.0, entry.as_ptr(), i, &mut info)
            }
        };
        assert_eq!(st, KilnStatus::Ok, "{}", last_error());
        // SAFETY: `shape` points to `rank` dimensions owned by the session.
        let shape = unsafe { std::slice::from_raw_parts(info.shape, info.rank) }.to_vec();
        (from_c(info.name), info.dtype, shape, info.bytes)
    };
    assert_eq!(describe(true, 0), ("x".into(), KilnDtype::F32, vec![2, 8], 64));
    assert_eq!(describe(true, 1), ("bias".into(), KilnDtype::F32, vec![2, 4], 32));
    assert_eq!(describe(false, 0), ("hidden".into(), KilnDtype::F32, vec![2, 16], 128));
    assert_eq!(describe(false, 1), ("probs".into(), KilnDtype::F32, vec![2, 4], 32));
}

#[test]
fn unnamed_buffers_are_taken_in_declared_order() {
    let h = open_tiny();
    let ins = inputs();
    let bufs: Vec<KilnInput> = ins
        .iter()
        .map(|(_, b)| KilnInput { name: std::ptr::null(), dtype: KilnDtype::F32, data: b.as_ptr().cast(), bytes: b.len() })
        .collect();
    let mut storage = output_storage();
    let outs = output_bufs(&mut storage);
    assert_eq!(run_raw(&h, ENTRY, &bufs, &outs), KilnStatus::Ok, "{}", last_error());
    let want: Vec<Vec<u8>> = rust_outputs(&ins).into_iter().map(|(_, b)| b).collect();
    assert_eq!(storage, want);
}
