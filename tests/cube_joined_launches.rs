//! Issue 16 on cube: independent launches of one kernel run as one launch
//! (`runtime/src/cube/lower/merge.rs`): q's and k's RoPE matmuls, the Q and K/V projections
//! (where Q is not stacked with them); K's and V's cache writes (decode's row, prefill's prompt
//! rows) stored by the matmuls computing their rows (`lower/absorb.rs`: k's rotation, the K/V
//! projection); and the MLP's `cube.gated_matmul`.
//! The tiny Gemma 2 (4 layers, grouped-query attention) on two rows, the second left-padded:
//! prefill and three decode steps on cube (lavapipe here) against the interpreter on the
//! model's graphs, every output and every layer's K and V cache, within the f32 bound. A joined
//! launch that ran one part only, or a matmul that skipped its absorbed write, leaves a cache
//! (or q, or k) unwritten.

mod common;

use kiln_graph::program::Program;
use kiln_graph::Op;

/// Each layer of each entry has these joined pairs: the rotations (two matmuls with RoPE's
/// epilogue) and the Q and stacked K/V projections (two plain matmuls of ranks 2 and 3, batch
/// counts 1 and 2; at two rows decode too keeps Q apart from K and V). K's and V's cache
/// writes make no launch, in prefill as in decode: k's rotation and the K/V projection store
/// them.
fn check_pairs(p: &Program, layers: usize) {
    let cube = kiln_runtime::by_name("cube").unwrap();
    for (i, e) in p.entries.iter().enumerate() {
        let pairs = cube.merged_launches(p, i).unwrap();
        let kind = |s: usize| match &e.steps[s].op {
            Op::MatMul { epilogue: Some(_), .. } => "rotation",
            Op::MatMul { epilogue: None, .. } => "projection",
            Op::Concat { .. } | Op::WriteSlice { .. } => "cache write",
            other => panic!("{}: step {s} ({}) joined", e.name, other.name()),
        };
        let count = |k: &str| pairs.iter().filter(|&&(a, b)| kind(a) == k && kind(b) == k).count();
        let got = (count("rotation"), count("cache write"), count("projection"), pairs.len());
        assert_eq!(got, (layers, 0, layers, 2 * layers), "{}: {pairs:?}", e.name);
        let launches = cube.launches(p, i).unwrap();
        let absorbed = cube.absorbed_steps(p, i).unwrap();
        assert_eq!(absorbed.len(), 2 * layers, "{}: {absorbed:?}", e.name);
        for &(w, h) in &absorbed {
            assert!(matches!(e.steps[w].op, Op::WriteSlice { .. }) && kind(h) != "cache write", "{}: ({w}, {h})", e.name);
            assert_eq!(launches[w], 0, "{}: the write at {w} makes no launch", e.name);
        }
        for &(a, b) in &pairs {
            assert_eq!((launches[a], launches[b]), (0, 1), "{}: pair ({a}, {b})", e.name);
        }
        for (s, step) in e.steps.iter().enumerate() {
            if matches!(step.op, Op::Concat { .. }) {
                assert!(launches[s] <= 1, "{}: step {s}'s copies are one launch", e.name);
            }
        }
    }
}

#[test]
fn gemma2_on_cube_with_joined_launches_matches_the_interpreter() {
    common::gemma2_two_rows::gemma2_two_rows_match_the_interpreter("cube", |p| {
        check_pairs(p, 4);
        for e in &p.entries {
            assert_eq!(e.steps.iter().filter(|s| s.kernel == "cube.gated_matmul").count(), 4, "{}: one gated step per layer", e.name);
        }
    });
}
