//! Helpers shared by the tests: the shipped model's paths, the Rust API's outputs, and thin
//! wrappers that call the C functions the way a C program would.

use kiln_capi::*;
use kiln_runtime::{Session, Tensor};
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

/// The entry the tiny model has.
pub const ENTRY: &str = "forward";

/// The shipped artifact.
pub fn artifact() -> PathBuf {
    crate::tiny::dir().join("tiny.kiln")
}

/// The shipped weights.
pub fn weights() -> PathBuf {
    crate::tiny::dir().join("weights.safetensors")
}

/// The shipped inputs, in declared order: (name, bytes).
pub fn inputs() -> Vec<(String, Vec<u8>)> {
    ["x", "bias"]
        .iter()
        .map(|n| {
            let p = crate::tiny::dir().join(format!("{n}.bin"));
            (n.to_string(), std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        })
        .collect()
}

/// `x` scaled by `k` (each thread of the thread tests runs its own inputs).
pub fn scaled_inputs(k: f32) -> Vec<(String, Vec<u8>)> {
    let mut ins = inputs();
    ins[0].1 = ins[0].1.chunks_exact(4).flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * k).to_le_bytes()).collect();
    ins
}

/// The Rust API's outputs for `inputs`: (name, bytes) in declared order.
pub fn rust_outputs(inputs: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut s = Session::load(&artifact(), &weights()).expect("Rust session");
    let e = s.program().entry(ENTRY).expect("entry").clone();
    let tensors: Vec<Tensor> =
        e.inputs.iter().zip(inputs).map(|(io, (_, b))| Tensor { ty: io.operand.ty.clone(), bytes: b.clone() }).collect();
    let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, _)| n.as_str()).zip(&tensors).collect();
    s.run(ENTRY, &named).expect("Rust run").into_iter().map(|(n, t)| (n, t.bytes)).collect()
}

/// A C string.
pub fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// A C path.
pub fn c_path(p: &Path) -> CString {
    c(p.to_str().expect("UTF-8 path"))
}

/// This thread's last error.
pub fn last_error() -> String {
    // SAFETY: kiln_last_error always returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(kiln_last_error()) }.to_string_lossy().into_owned()
}

/// A string the library returned.
pub fn from_c(p: *const c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: the library returns NUL-terminated strings it keeps alive.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// An open session, closed on drop.
pub struct Handle(pub *mut KilnSession);

// SAFETY: the C ABI allows a session to be used from any thread (KilnSession is Sync).
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: an open session, closed once.
        unsafe { kiln_session_close(self.0) }
    }
}

/// Opens a session through the C ABI: the handle, or the status and message.
pub fn open(artifact: &Path, weights: &Path) -> Result<Handle, (KilnStatus, String)> {
    let mut s = std::ptr::null_mut();
    // SAFETY: valid C strings and out-pointer.
    let st = unsafe { kiln_session_open(KILN_ABI_VERSION, c_path(artifact).as_ptr(), c_path(weights).as_ptr(), &mut s) };
    if st == KilnStatus::Ok {
        assert!(!s.is_null());
        Ok(Handle(s))
    } else {
        assert!(s.is_null(), "a failed open leaves *out NULL");
        Err((st, last_error()))
    }
}

/// Opens the shipped model.
pub fn open_tiny() -> Handle {
    open(&artifact(), &weights()).unwrap_or_else(|(st, m)| panic!("open: {st:?}: {m}"))
}

/// Input buffers over `inputs`, named and typed f32 as declared.
pub fn input_bufs(inputs: &[(String, Vec<u8>)], names: &[CString]) -> Vec<KilnInput> {
    inputs
        .iter()
        .zip(names)
        .map(|((_, b), n)| KilnInput { name: n.as_ptr(), dtype: KilnDtype::F32, data: b.as_ptr().cast(), bytes: b.len() })
        .collect()
}

/// Output buffers over `outs`, unnamed, typed f32.
pub fn output_bufs(outs: &mut [Vec<u8>]) -> Vec<KilnOutput> {
    outs.iter_mut()
        .map(|b| KilnOutput { name: std::ptr::null(), dtype: KilnDtype::F32, data: b.as_mut_ptr().cast(), bytes: b.len() })
        .collect()
}

/// Zeroed output storage for the tiny model: hidden f32[2,16], probs f32[2,4].
pub fn output_storage() -> Vec<Vec<u8>> {
    vec![vec![0; 2 * 16 * 4], vec![0; 2 * 4 * 4]]
}

/// Runs `entry` through the C ABI on raw buffers.
pub fn run_raw(h: &Handle, entry: &str, ins: &[KilnInput], outs: &[KilnOutput]) -> KilnStatus {
    // SAFETY: the buffers point to live vectors of the stated sizes.
    unsafe { kiln_session_run(h.0, c(entry).as_ptr(), ins.as_ptr(), ins.len(), outs.as_ptr(), outs.len()) }
}

/// Runs the tiny model's entry through the C ABI: the outputs' bytes.
pub fn run_c(h: &Handle, inputs: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    let names: Vec<CString> = inputs.iter().map(|(n, _)| c(n)).collect();
    let ins = input_bufs(inputs, &names);
    let mut storage = output_storage();
    let outs = output_bufs(&mut storage);
    let st = run_raw(h, ENTRY, &ins, &outs);
    assert_eq!(st, KilnStatus::Ok, "{}", last_error());
    storage
}
