//! FLOP and byte counts of each kernel kind against hand-computed values for small shapes.
//! Every tensor is f32 (4 bytes an element) unless a row says otherwise.

use kiln_graph::cost::{attended_pairs, cost, Cost};
use kiln_graph::infer::infer;
use kiln_graph::{Attention, BinaryOp, DType, Expr, Instr, MaskKind, Op, ReduceOp, ResizeMode, TensorType, UnaryOp};

fn f32(shape: &[usize]) -> TensorType {
    TensorType::new(DType::F32, shape)
}

/// The cost of `op` on `inputs`, its output type given by the op's own shape rule.
fn cost_of(op: Op, inputs: &[TensorType]) -> Cost {
    let refs: Vec<&TensorType> = inputs.iter().collect();
    let out = infer(&op, &refs, None).unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    cost(&op, inputs, &out)
}

fn c(flops: u64, bytes: u64) -> Cost {
    Cost { flops, bytes }
}

/// `gelu_tanh(x + bias)`: loads 2, one add, one GELU.
fn bias_gelu() -> Expr {
    Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Add, 0, 1), Instr::Unary(UnaryOp::GeluTanh, 2)] }
}

#[test]
fn matmul_is_two_mnk_and_reads_the_weight_once() {
    // [2,3] x [4,3]^T -> [2,4]: 2*2*4*3 = 48 FLOPs; (6 + 12 + 8) * 4 = 104 bytes.
    let op = Op::MatMul { transpose_b: true, epilogue: None };
    assert_eq!(cost_of(op, &[f32(&[2, 3]), f32(&[4, 3])]), c(48, 104));
    // Batched [5,2,3] x [3,4] -> [5,2,4]: 5 * 48 = 240; (30 + 12 + 40) * 4 = 328.
    let op = Op::MatMul { transpose_b: false, epilogue: None };
    assert_eq!(cost_of(op, &[f32(&[5, 2, 3]), f32(&[3, 4])]), c(240, 328));
}

#[test]
fn a_matmul_epilogue_adds_its_instructions_and_reads_its_inputs() {
    // As above plus bias [4]: 48 + 2 arithmetic instructions * 8 elements = 64 FLOPs;
    // (6 + 12 + 4 + 8) * 4 = 120 bytes.
    let op = Op::MatMul { transpose_b: true, epilogue: Some(bias_gelu()) };
    assert_eq!(cost_of(op, &[f32(&[2, 3]), f32(&[4, 3]), f32(&[4])]), c(64, 120));
}

#[test]
fn attention_counts_four_bhsd_plus_the_softmax() {
    // B=1, S=3, H=2, D=4: 2*4 + 2*4 + 1 + 5 = 22 per pair, 2 heads * 9 pairs = 396 FLOPs;
    // q, k, v, out each 24 elements: 4 * 24 * 4 = 384 bytes.
    let a = Attention { scale: 0.5, softcap: None, mask: MaskKind::None };
    let qkv = f32(&[1, 3, 2, 4]);
    assert_eq!(cost_of(Op::Attention(a), &[qkv.clone(), qkv.clone(), qkv.clone()]), c(396, 384));
    // Grouped K/V (Hkv=1) with Dv=2 and Sk=5, one query: 2*4 + 2*2 + 6 = 18 per pair,
    // 2 heads * 5 pairs = 180; q 8 + k 20 + v 10 + out 4 = 42 elements = 168 bytes.
    let (q, k, v) = (f32(&[1, 1, 2, 4]), f32(&[1, 5, 1, 4]), f32(&[1, 5, 1, 2]));
    assert_eq!(cost_of(Op::Attention(a), &[q, k, v]), c(180, 168));
}

#[test]
fn attention_masks_count_only_kept_pairs() {
    assert_eq!(attended_pairs(MaskKind::None, 3, 3), 9);
    // Causal 3x3: 1 + 2 + 3.
    assert_eq!(attended_pairs(MaskKind::Causal { q_offset: 0 }, 3, 3), 6);
    // Decode: one query at position 4 of 5 keys sees all 5.
    assert_eq!(attended_pairs(MaskKind::Causal { q_offset: 4 }, 1, 5), 5);
    // Window 2 over 4x4 causal: 1 + 2 + 2 + 2.
    assert_eq!(attended_pairs(MaskKind::SlidingWindow { q_offset: 0, window: 2 }, 4, 4), 7);
    // Position masks: a prefill (queries fill the keys) counts as causal from 0; a decode
    // step over a cache counts every key (the start is only known at run time).
    let pm = |window| MaskKind::Positions(kiln_graph::PosMask { window, padding: true, prefix: false });
    assert_eq!(attended_pairs(pm(None), 3, 3), 6);
    assert_eq!(attended_pairs(pm(Some(2)), 4, 4), 7);
    assert_eq!(attended_pairs(pm(None), 1, 5), 5);
    // Causal 3x3 with a softcap: (2*4 + 2*4 + 6 + 3) = 25 per pair, 6 pairs, 2 heads.
    let a = Attention { scale: 0.5, softcap: Some(50.0), mask: MaskKind::Causal { q_offset: 0 } };
    let qkv = f32(&[1, 3, 2, 4]);
    assert_eq!(cost_of(Op::Attention(a), &[qkv.clone(), qkv.clone(), qkv.clone()]).flops, 300);
    // An additive mask [1,3,3] costs one add per pair and is read: 23 * 9 * 2 = 414 FLOPs,
    // 384 + 36 bytes.
    let a = Attention { scale: 0.5, softcap: None, mask: MaskKind::Additive };
    assert_eq!(cost_of(Op::Attention(a), &[qkv.clone(), qkv.clone(), qkv, f32(&[1, 3, 3])]), c(414, 420));
}

#[test]
fn norms_and_softmax_count_per_element() {
    // [2,8]: 16 elements.
    let x = f32(&[2, 8]);
    // Layer norm: 7 * 16 = 112; x 16 + scale 8 + bias 8 + out 16 = 48 elements.
    assert_eq!(cost_of(Op::LayerNorm { eps: 1e-6 }, &[x.clone(), f32(&[8]), f32(&[8])]), c(112, 192));
    // RMS norm: 4 * 16 = 64; 16 + 8 + 16 = 40 elements.
    assert_eq!(cost_of(Op::RmsNorm { eps: 1e-6, add_one: true }, &[x.clone(), f32(&[8])]), c(64, 160));
    // Softmax: 5 * 16 = 80; 32 elements.
    assert_eq!(cost_of(Op::Softmax { axis: 1 }, &[x]), c(80, 128));
}

#[test]
fn elementwise_and_fused_regions_count_arithmetic_instructions() {
    let (x, b) = (f32(&[2, 3]), f32(&[3]));
    assert_eq!(cost_of(Op::Unary(UnaryOp::Exp), std::slice::from_ref(&x)), c(6, 48));
    // Broadcast add: 6 outputs; reads 6 + 3, writes 6.
    assert_eq!(cost_of(Op::Binary(BinaryOp::Add), &[x.clone(), b.clone()]), c(6, 60));
    // A region of 2 arithmetic instructions over 6 elements.
    assert_eq!(cost_of(Op::Fused(bias_gelu()), &[x.clone(), b]), c(12, 60));
    let cond = TensorType::new(DType::Bool, [2, 3]);
    // Select: 1 per element; bool 6 bytes + 2 * 24 + out 24.
    assert_eq!(cost_of(Op::Select, &[cond, x.clone(), x.clone()]), c(6, 78));
    assert_eq!(cost_of(Op::Cast { to: DType::BF16 }, &[x]), c(0, 24 + 12));
}

#[test]
fn movement_ops_move_bytes_and_no_flops() {
    let x = f32(&[2, 3, 4]);
    assert_eq!(cost_of(Op::Permute { perm: vec![2, 0, 1] }, std::slice::from_ref(&x)), c(0, 192));
    assert_eq!(cost_of(Op::Broadcast { shape: vec![5, 2, 3, 4] }, std::slice::from_ref(&x)), c(0, 96 + 480));
    assert_eq!(cost_of(Op::Concat { axis: 1 }, &[x.clone(), x.clone()]), c(0, 384));
    // A slice keeps 2*1*4 = 8 elements: read 8, write 8.
    assert_eq!(cost_of(Op::Slice { axis: 1, start: 1, end: 3, step: 2 }, std::slice::from_ref(&x)), c(0, 64));
    // Gather 5 rows of a [10,4] table with i64 indices: read 20 + write 20 elements + 40 index bytes.
    let idx = TensorType::new(DType::I64, [5]);
    assert_eq!(cost_of(Op::Gather { axis: 0 }, &[f32(&[10, 4]), idx]), c(0, 160 + 40));
    assert_eq!(cost_of(Op::Reshape { shape: vec![24] }, &[x]), c(0, 0));
}

#[test]
fn reductions_scans_and_resize() {
    let x = f32(&[4, 6]);
    // Sum over the last axis: 24 adds; read 24, write 4.
    assert_eq!(cost_of(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keep_dims: false }, std::slice::from_ref(&x)), c(24, 112));
    // Mean: plus one divide per output.
    assert_eq!(cost_of(Op::Reduce { op: ReduceOp::Mean, axes: vec![1], keep_dims: true }, std::slice::from_ref(&x)), c(28, 112));
    assert_eq!(cost_of(Op::CumSum { axis: 1, exclusive: false }, std::slice::from_ref(&x)), c(24, 192));
    // Top-2 of 6 per row: 24 comparisons; read 96 bytes, write 8 i64 = 64 bytes.
    assert_eq!(cost_of(Op::TopK { k: 2 }, &[x]), c(24, 160));
    // Bicubic [1,2,2] -> [1,4,4]: 16 outputs * 16 taps * 2 = 512; 4 + 16 elements.
    assert_eq!(cost_of(Op::Resize { size: [4, 4], mode: ResizeMode::Bicubic }, &[f32(&[1, 2, 2])]), c(512, 80));
    assert_eq!(cost_of(Op::Resize { size: [4, 4], mode: ResizeMode::Bilinear }, &[f32(&[1, 2, 2])]).flops, 128);
}

#[test]
fn sources_run_no_kernel() {
    let t = f32(&[3]);
    assert_eq!(cost(&Op::Weight { name: "w".into() }, &[], &t), c(0, 0));
    assert_eq!(cost(&Op::Iota { axis: 0, start: 0.0, step: 1.0 }, &[], &t), c(6, 12));
    assert_eq!(c(10, 4).intensity(), 2.5);
    assert_eq!(c(10, 0).intensity(), 0.0);
}
