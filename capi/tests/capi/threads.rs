//! Threads: one session shared by several threads, and one session per thread; every run's
//! outputs equal the Rust API's for the same inputs.

use crate::common::*;
use std::sync::Arc;

const THREADS: usize = 4;
const RUNS: usize = 25;

/// One thread's inputs (name, bytes) and the Rust API's outputs for them.
type Case = (Vec<(String, Vec<u8>)>, Vec<Vec<u8>>);

/// Each thread's case.
fn cases() -> Vec<Case> {
    (0..THREADS)
        .map(|t| {
            let ins = scaled_inputs(1.0 + t as f32 * 0.5);
            let want = rust_outputs(&ins).into_iter().map(|(_, b)| b).collect();
            (ins, want)
        })
        .collect()
}

#[test]
fn one_session_shared_by_threads() {
    let h = Arc::new(open_tiny());
    let cases = cases();
    std::thread::scope(|s| {
        for (ins, want) in &cases {
            let h = Arc::clone(&h);
            s.spawn(move || {
                for _ in 0..RUNS {
                    assert_eq!(&run_c(&h, ins), want);
                }
            });
        }
    });
}

#[test]
fn one_session_per_thread() {
    let cases = cases();
    std::thread::scope(|s| {
        for (ins, want) in &cases {
            s.spawn(move || {
                let h = open_tiny();
                for _ in 0..RUNS {
                    assert_eq!(&run_c(&h, ins), want);
                }
            });
        }
    });
}

#[test]
fn the_last_error_is_per_thread() {
    let h = open_tiny();
    let mut storage = output_storage();
    let outs = output_bufs(&mut storage);
    assert_eq!(run_raw(&h, "nope", &[], &outs), kiln_capi::KilnStatus::UnknownEntry);
    let mine = last_error();
    assert!(mine.contains("no entry 'nope'"));
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(last_error(), "", "a new thread starts with no error"));
    });
    assert_eq!(last_error(), mine);
}
