//! Two generations in one session: prefill and decode write their K/V rows into the cache in
//! place and nothing zeroes it between generations, so the rows past what the second
//! generation has written still hold the first's. Attention must never read them: the second
//! generation's tokens and logits equal a fresh session's, bit for bit, while its cache differs
//! from the fresh one's past its rows (the stale rows are really there).

mod common;

use kiln::generate::{Generated, Generator};
use kiln_graph::DType;
use kiln_runtime::Tensor;

const BUCKET: usize = 12;
const NEW: usize = 6;

/// Ids and mask `[B, len]`, and `len`.
type Prompt = (Vec<i64>, Vec<i64>, usize);

/// A prompt of `rows` rows of `len` tokens, all real (mask 1), differing with `seed`.
fn prompt(rows: usize, len: usize, seed: i64) -> (Vec<i64>, Vec<i64>) {
    let ids = (0..rows * len).map(|i| 3 + (i as i64 * 37 + seed * 11) % 200).collect();
    (ids, vec![1; rows * len])
}

fn generate(g: &mut Generator, (ids, mask): &(Vec<i64>, Vec<i64>), len: usize, new: usize, px: Option<&Tensor>) -> Generated {
    g.generate(ids, mask, len, new, px).expect("generate")
}

/// Layer 0's key cache after the last generation.
fn cache(g: &mut Generator) -> Vec<f32> {
    g.session.state("cache.0.key").expect("read state").expect("a cache state").to_f32()
}

/// A long prompt for `NEW` tokens, then a shorter one (more left padding) for fewer tokens in
/// the same session, against the shorter one in a fresh session.
fn second_equals_fresh(backend: &str, dir: &std::path::Path, bucket: usize, long: Prompt, short: Prompt, px: Option<&Tensor>) {
    let rows = long.0.len() / long.2;
    let open = || Generator::with_outputs(dir, (rows, 1), bucket, NEW, backend, DType::F32, true).expect("compile");
    let mut g = open();
    let first = generate(&mut g, &(long.0, long.1), long.2, NEW, px);
    let short_prompt = (short.0, short.1);
    let second = generate(&mut g, &short_prompt, short.2, NEW - 2, px);
    assert!(first.decode_steps > second.decode_steps, "{backend}: the first generation must write rows the second does not");
    let mut fresh = open();
    let want = generate(&mut fresh, &short_prompt, short.2, NEW - 2, px);
    assert_eq!(second.sequences, want.sequences, "{backend}: the second generation's ids against a fresh session's");
    assert!(!want.step_logits.is_empty() && second.step_logits.len() == want.step_logits.len(), "{backend}: logits");
    let differs = second.step_logits.iter().zip(&want.step_logits).position(|(a, b)| a.to_bits() != b.to_bits());
    if let Some(i) = differs {
        let (a, b) = (second.step_logits[i], want.step_logits[i]);
        panic!("{backend}: the second generation's logits differ from a fresh session's at {i}: {a} vs {b}");
    }
    let stale = cache(&mut g) != cache(&mut fresh);
    assert!(stale, "{backend}: no stale rows in the reused cache (the test would prove nothing)");
}

/// The tiny Gemma 2 (EOS never produced, so every generation runs all its steps): 12 prompt
/// tokens per row, then 5 and 6 left-padded to 12.
fn gemma_on(backend: &str) {
    let dir = common::long_gemma2(&format!("reuse-{backend}"), 64);
    let (ids, mask) = prompt(2, BUCKET, 1);
    let (short_ids, mut short_mask) = prompt(2, BUCKET, 2);
    for r in 0..2 {
        short_mask[r * BUCKET..r * BUCKET + 7 - r].fill(0);
    }
    second_equals_fresh(backend, &dir, BUCKET, (ids, mask, BUCKET), (short_ids, short_mask, BUCKET), None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn second_generation_equals_a_fresh_session_cpu() {
    gemma_on("cpu");
}

#[cfg(feature = "cube")]
#[test]
fn second_generation_equals_a_fresh_session_cube() {
    gemma_on("cube");
}

/// PaliGemma (a prefix-LM prefill over the image and the prompt): the fixture's batch, then the
/// same batch without its last prompt token.
#[test]
fn second_generation_equals_a_fresh_session_paligemma_cpu() {
    let dir = common::gemma_case("paligemma");
    let (ids, mask, px, b, l) = common::gemma_batch("paligemma");
    let cut = |x: &[i64]| (0..b).flat_map(|r| x[r * l..(r + 1) * l - 1].to_vec()).collect::<Vec<_>>();
    let short = (cut(&ids), cut(&mask), l - 1);
    second_equals_fresh("cpu", &dir, l, (ids, mask, l), short, px.as_ref());
}
