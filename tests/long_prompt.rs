//! Issue 16: attention masks are computed inside the attention kernels from positions and
//! lengths (`MaskKind::Positions`), so a prompt's prefill plans and runs in memory linear in
//! its length. Before, Gemma built an f32 `[B, L, L]` mask per window size: the tiny Gemma 2
//! fixture peaked at 136 MB for 2,048 tokens, 496 MB for 4,096 and 1.84 GB for 8,000.

mod common;

use kiln::generate::{generation_program_with, Generator};
use kiln_graph::DType;
use kiln_runtime::{Session, WeightStore};
use std::sync::Arc;

/// The prefill entry's arena, after checking that no tensor of the plan holds `L * L` elements.
fn prefill_arena(dir: &std::path::Path, len: usize) -> (usize, kiln::generate::GenerationProgram) {
    // With the logits among the outputs (step_logits), which the test reads below.
    let g = generation_program_with(dir, (1, 1), len, 1, ("cpu", DType::F32), true).expect("compile");
    let e = g.program.entry("prefill").expect("a prefill entry");
    for s in &e.steps {
        let n = s.output.ty.numel();
        assert!(n < len * len, "{len} tokens: step {} ({}) makes {} ({n} elements)", s.node, s.op.name(), s.output.ty);
    }
    for io in e.inputs.iter().chain(&e.outputs) {
        assert!(io.operand.ty.numel() < len * len, "{len} tokens: {} is {}", io.name, io.operand.ty);
    }
    (e.arena_bytes, g)
}

#[test]
fn prefill_memory_is_linear_in_the_prompt_and_8000_tokens_run() {
    let dir = common::long_gemma2("prefill", 8192);
    let (a4, _) = prefill_arena(&dir, 4000);
    let (a8, g8) = prefill_arena(&dir, 8000);
    eprintln!("prefill arena: {a4} bytes at 4,000 tokens, {a8} at 8,000 ({:.2}x)", a8 as f64 / a4 as f64);
    assert!((a8 as f64) < 2.2 * a4 as f64, "arena {a8} at 8,000 tokens against {a4} at 4,000: not linear");
    // 2 layers' K/V of 8,000 rows (2 heads of 32) and the activations: a few MB, not the
    // 256 MB of one f32 [8000, 8000] mask.
    assert!(a8 < 64 << 20, "arena {a8} bytes at 8,000 tokens");

    // And the prefill runs: 8,000 tokens (the first 5 left padding) and one new token.
    let session = Session::new(g8.program, Arc::new(WeightStore::open(&dir).expect("weights"))).expect("load");
    let mut gen = Generator::from_session(session, &dir).expect("generator");
    let len = 8000;
    let ids: Vec<i64> = (0..len).map(|i| if i < 5 { 0 } else { 3 + (i as i64 * 37) % 290 }).collect();
    let mask: Vec<i64> = (0..len).map(|i| i64::from(i >= 5)).collect();
    let out = gen.generate(&ids, &mask, len, 1, None).expect("generate");
    assert_eq!(out.new_tokens, 1);
    assert_eq!(out.sequences.len(), len + 1);
    assert!(out.step_logits.iter().all(|x| x.is_finite()), "non-finite logits");
    assert!(out.step_logits.iter().any(|&x| x != out.step_logits[0]), "constant logits");
    let _ = std::fs::remove_dir_all(&dir);
}
