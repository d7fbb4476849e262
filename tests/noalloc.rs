//! `Session::run_into` allocates nothing once the session is loaded: a counting global
//! allocator watches a second run (the first may warm thread pools).
//!
//! One exception is measured and reported, not hidden: the third-party `gemm` crate
//! allocates its packing buffers inside each call and offers no way to pass scratch in.
//! Allocations made while such a call is in progress are counted apart; everything kiln's
//! own code does (operand setup, fused regions, epilogues, attention, norms, copies) must
//! allocate nothing.

mod common;

use kiln::{compile, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static GEMM_ALLOCS: AtomicUsize = AtomicUsize::new(0);
/// Bytes asked for (by alloc and realloc), wherever.
static BYTES: AtomicUsize = AtomicUsize::new(0);

fn count() {
    if kiln_kernels::cpu::gemm::third_party_gemm_active() {
        GEMM_ALLOCS.fetch_add(1, Ordering::SeqCst);
    } else {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
    }
}

// SAFETY: forwards to the system allocator unchanged, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        BYTES.fetch_add(l.size(), Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        BYTES.fetch_add(n, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counters are process-wide: the tests take turns so none counts another's allocations.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn run_into_does_not_allocate() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::siglip_case("vision_map");
    let profile = Profile { batch: 2, ..Profile::default() };
    let c = compile(&dir, &CompileOptions { profile, backend: "cpu".into(), trace: false }).expect("compile");
    let e = c.program.entries[0].clone();
    let mut s = Session::new(c.program, Arc::new(WeightStore::open(&dir).expect("weights"))).expect("session");
    let n = e.inputs[0].operand.ty.numel();
    let input: Vec<u8> = (0..n).flat_map(|i| ((i % 7) as f32 * 0.25 - 0.75).to_le_bytes()).collect();
    let mut outs: Vec<Vec<u8>> = e.outputs.iter().map(|o| vec![0u8; o.operand.ty.bytes()]).collect();
    let run = |s: &mut Session, outs: &mut Vec<Vec<u8>>| {
        let mut bufs: Vec<&mut [u8]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        let before = ALLOCS.load(Ordering::SeqCst);
        s.run_into(0, &[&input], &mut bufs).expect("run");
        ALLOCS.load(Ordering::SeqCst) - before
    };
    run(&mut s, &mut outs);
    let first = outs.clone();
    run(&mut s, &mut outs);
    // Each run is handed to rayon's pool once; its injector queue allocates a new block of
    // 63 slots when one fills, so at most one allocation in 63 runs is rayon's, not kiln's.
    let runs = 20;
    let gemm_before = GEMM_ALLOCS.load(Ordering::SeqCst);
    let per_run: Vec<usize> = (0..runs).map(|_| run(&mut s, &mut outs)).collect();
    let gemm = GEMM_ALLOCS.load(Ordering::SeqCst) - gemm_before;
    let total: usize = per_run.iter().sum();
    println!(
        "{runs} runs: {total} allocations outside the gemm crate; {} per run inside its calls ({} matmul steps; attention uses it for block products)",
        gemm / runs,
        e.steps.iter().filter(|s| s.kernel.starts_with("cpu.gemm")).count()
    );
    assert!(total <= 1, "{runs} runs allocated {per_run:?} times outside the gemm crate");
    assert_eq!(first, outs, "two runs on the same input differ");
    assert!(outs[0].iter().any(|&b| b != 0), "the output was never written");
}

/// Both entries of the Jet flow (permutation matmuls, slices, concats, the logdet sums) run
/// without allocating either.
#[test]
fn jet_entries_do_not_allocate() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jet");
    let profile = Profile { batch: 2, ..Profile::default() };
    let c = compile(&dir, &CompileOptions { profile, backend: "cpu".into(), trace: false }).expect("compile");
    let entries = c.program.entries.clone();
    let mut s = Session::new(c.program, Arc::new(WeightStore::open(&dir).expect("weights"))).expect("session");
    for (ei, e) in entries.iter().enumerate() {
        let n = e.inputs[0].operand.ty.numel();
        let input: Vec<u8> = (0..n).flat_map(|i| ((i % 7) as f32 * 0.25 - 0.75).to_le_bytes()).collect();
        let mut outs: Vec<Vec<u8>> = e.outputs.iter().map(|o| vec![0u8; o.operand.ty.bytes()]).collect();
        let mut run = || {
            let mut bufs: Vec<&mut [u8]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
            let before = ALLOCS.load(Ordering::SeqCst);
            s.run_into(ei, &[&input], &mut bufs).expect("run");
            ALLOCS.load(Ordering::SeqCst) - before
        };
        run();
        run();
        let per_run: Vec<usize> = (0..10).map(|_| run()).collect();
        assert!(per_run.iter().sum::<usize>() <= 1, "{}: runs allocated {per_run:?} times outside the gemm crate", e.name);
    }
}

/// A Gemma 2 decode step reads and updates its KV cache in place: `Session::run` allocates
/// its outputs (the logits) and no cache-sized buffer, where it used to allocate and copy
/// every layer's cache per token. The steps that still allocate are named: the attention
/// mask's bool arithmetic runs on the interpreter's reference path (a few small vectors
/// each), which this test pins so a new one shows up.
#[test]
fn gemma_decode_moves_no_cache_bytes() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::gemma_case("gemma2_gqa");
    let mut g = kiln::generate::Generator::new(&dir, 1, 8, 6, "cpu").expect("compile");
    let (ids, mask) = ([2i64, 5, 7, 9], [1i64; 4]);
    g.generate(&ids, &mask, 4, 2, None).expect("generate");
    let c = g.meta.capacity;
    let s = &mut g.session;
    let e = s.program().entries[s.entry_index("decode").expect("decode entry")].clone();
    let cache: usize = s.program().states.iter().map(|st| st.ty.bytes()).sum();
    // The entry chooses the token: it outputs ids and logprobs, and the bound below stays the
    // size of the logits it no longer returns.
    let logits = 4 * g.meta.vocab;
    assert!(e.outputs.iter().all(|o| o.name != "logits"));
    let states = e.inputs.iter().filter(|io| s.program().state_index(&io.name).is_some()).count();
    assert!(states > 0 && e.inputs.len() == states + 6);
    let mut am = vec![0i64; c];
    am[4..10].fill(1);
    let ins = [
        ("input_ids", Tensor::from_i64(&[1, 1], &[3])),
        ("attention_mask", Tensor::from_i64(&[1, c], &am)),
        ("position_ids", Tensor::from_i64(&[1, 1], &[5])),
        ("cache_position", Tensor::from_i64(&[1], &[9])),
        ("sampling", Tensor::from_f32(&[2], &[0.0, 1.0])),
        ("sampling_counters", Tensor::from_i64(&[4], &[0, 0, 0, 1])),
    ];
    let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (*n, t)).collect();
    let mut run = || {
        let before = BYTES.load(Ordering::SeqCst);
        s.run("decode", &refs).expect("run");
        BYTES.load(Ordering::SeqCst) - before
    };
    run();
    let per_run: Vec<usize> = (0..5).map(|_| run()).collect();
    let slow: Vec<String> =
        e.steps.iter().filter(|st| st.kernel == "cpu.reference").map(|st| format!("{} -> {}", st.op.name(), st.output.ty)).collect();
    println!("decode: {per_run:?} bytes allocated per run; logits {logits} B, cache {cache} B; reference steps {slow:?}");
    assert!(per_run.iter().all(|&b| b < logits + 16 * 1024 && b < cache / 4), "decode runs allocated {per_run:?} bytes");
    assert!(slow.len() <= 5 && slow.iter().all(|s| s.ends_with(&format!("[1,1,{c}]"))), "{slow:?}");
    use kiln_graph::program::Slot;
    assert!(e.steps.iter().any(|st| st.kernel == "cpu.write_slice" && matches!(st.output.slot, Slot::State(_))));
    // Both entries compute every cache in place: no step copies a value into a state.
    for entry in &s.program().entries {
        let copies = entry.steps.iter().filter(|st| st.op.name() == "permute" && matches!(st.output.slot, Slot::State(_))).count();
        let writes = entry.steps.iter().filter(|st| matches!(st.output.slot, Slot::State(_))).count();
        assert_eq!((copies, writes), (0, s.program().states.len()), "entry '{}'", entry.name);
    }
}
