//! `kiln_session_run` allocates nothing: a counting global allocator watches runs through the
//! C ABI after a first run and after every worker of the kernels' thread pool has started
//! (a worker that starts late allocates its thread state once, on a loaded machine during a
//! later run). Its own binary, so that no other test allocates meanwhile.

use kiln_capi::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_run_through_the_c_abi_allocates_nothing() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny");
    let path = |n: &str| CString::new(dir.join(n).to_str().expect("UTF-8 path")).expect("no NUL");
    let (a, w, entry) = (path("tiny.kiln"), path("weights.safetensors"), CString::new("forward").expect("no NUL"));
    let x = std::fs::read(dir.join("x.bin")).expect("x.bin");
    let bias = std::fs::read(dir.join("bias.bin")).expect("bias.bin");
    let mut s = std::ptr::null_mut();
    // SAFETY: valid strings and out-pointer.
    assert_eq!(unsafe { kiln_session_open(KILN_ABI_VERSION, a.as_ptr(), w.as_ptr(), &mut s) }, KilnStatus::Ok);
    let ins = [&x, &bias].map(|b| KilnInput { name: std::ptr::null(), dtype: KilnDtype::F32, data: b.as_ptr().cast(), bytes: b.len() });
    let (mut hidden, mut probs) = (vec![0u8; 128], vec![0u8; 32]);
    let outs = [&mut hidden, &mut probs].map(|b| KilnOutput {
        name: std::ptr::null(),
        dtype: KilnDtype::F32,
        data: b.as_mut_ptr().cast(),
        bytes: b.len(),
    });
    // SAFETY: a live session and buffers of the declared sizes.
    let run = || unsafe { kiln_session_run(s, entry.as_ptr(), ins.as_ptr(), 2, outs.as_ptr(), 2) };
    assert_eq!(run(), KilnStatus::Ok);
    // Every worker of rayon's global pool (the cpu kernels' pool) runs a job, so each has
    // started and set up its thread state before the counting starts.
    rayon::broadcast(|_| ());
    let before = ALLOCS.load(Ordering::SeqCst);
    assert!(before > 0, "the counting allocator sees the allocations of opening a session");
    for _ in 0..10 {
        assert_eq!(run(), KilnStatus::Ok);
    }
    let n = ALLOCS.load(Ordering::SeqCst) - before;
    // SAFETY: opened above, closed once.
    unsafe { kiln_session_close(s) };
    assert_eq!(n, 0, "10 runs through the C ABI allocated {n} times");
}
