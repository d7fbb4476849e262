//! Issue 16: decode attends over the filled part of the KV cache, not its capacity. The cpu
//! attention kernel counts the key rows it reads (`keys_visited`); the same prompt and the
//! same number of new tokens must read the same keys whether the cache holds 32 slots or
//! 4,096. (One test in this binary: the counter is per process.)

mod common;

use kiln::generate::Generator;
use kiln_kernels::cpu::attention::keys_visited;

/// Keys the cpu attention reads to generate `new` tokens after an 8-token prompt (3 of them
/// left padding) with a cache of `capacity` slots, and the generated ids.
fn keys_read(dir: &std::path::Path, capacity: usize, new: usize) -> (u64, Vec<i64>) {
    let prompt = 8;
    let mut g = Generator::new(dir, 1, prompt, capacity - prompt, "cpu").expect("compile");
    let ids = [0, 0, 0, 2, 17, 45, 99, 120];
    let mask = [0, 0, 0, 1, 1, 1, 1, 1];
    let before = keys_visited();
    let out = g.generate(&ids, &mask, prompt, new, None).expect("generate");
    let keys = keys_visited() - before;
    assert_eq!(out.new_tokens, new, "capacity {capacity}");
    (keys, out.sequences)
}

#[test]
fn decode_reads_the_filled_keys_not_the_capacity() {
    let dir = common::long_gemma2("keys", 8192);
    let new = 21;
    let (small, seq_small) = keys_read(&dir, 32, new);
    let (large, seq_large) = keys_read(&dir, 4096, new);
    eprintln!("keys read for {new} new tokens: {small} at capacity 32, {large} at capacity 4,096");
    assert_eq!(seq_small, seq_large, "the same tokens whatever the capacity");
    assert!(small > 0, "the counter counts nothing");
    assert_eq!(small, large, "decode reads keys past the filled ones");
    // What that is: 4 layers x 4 query heads per token. Prefill: 8 keys for each of the 8
    // queries' block (one query block, its last query seeing 8 keys); global layers read all
    // filled keys, windowed layers (window 6) only the last 6 of them. Decode step t (the
    // cache holding 8 + t + 1 keys after writing its own): 8 + t + 1, or 6 in a window.
    let (layers, heads, window) = (2u64, 4u64, 6u64);
    let prefill = 2 * layers * heads * 8;
    let decode: u64 = (0..new as u64 - 1).map(|t| layers * heads * ((9 + t) + (9 + t).min(window))).sum();
    assert_eq!(small, prefill + decode, "keys read by prefill {prefill} and decode {decode}");
    let _ = std::fs::remove_dir_all(&dir);
}
