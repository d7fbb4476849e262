//! The cpu backend's kernels as a type: `choose` picks one per op, matching every op by name
//! (no wildcard), and the executor dispatches on it. An op the backend has no kernel for runs
//! through the reference interpreter only where an arm here says so ([`CpuKernel::Reference`]),
//! and `kiln inspect` and the parity suite list those steps.

use kiln_graph::{DType, MaskKind, Op, TensorType};

crate::kernel_enum::kernel_enum! {
    /// A kernel of the cpu backend. Its [`name`](CpuKernel::name) is what a program stores.
    pub enum CpuKernel {
        /// A source (input, weight, constant): no step runs.
        Source => "source",
        /// A reshape: the same bytes, a new type.
        View => "view",
        Gemm => "cpu.gemm",
        GemmEpilogue => "cpu.gemm+epilogue",
        /// Two products of one input and their epilogue in one pass (`Op::GatedMatMul`: a
        /// GLU's gate and up projections), the first product never stored whole.
        GemmGated => "cpu.gemm_gated",
        /// Elementwise ops, broadcasts and fused regions: one vectorised expression evaluator.
        Fused => "cpu.fused",
        LayerNorm => "cpu.layer_norm",
        RmsNorm => "cpu.rms_norm",
        /// A residual add between two RMS norms: the sum and its norm in one pass.
        ResidualRmsNorm => "cpu.residual_rms_norm",
        /// Softmax over the last axis.
        Softmax => "cpu.softmax",
        /// A reduction over trailing axes.
        Reduce => "cpu.reduce",
        FlashAttention => "cpu.flash_attention",
        /// Rows of a table (axis 0) by i64 ids, 4-byte elements (times the scale of
        /// `Op::GatherScaled`, f32).
        Gather => "cpu.gather",
        Permute => "cpu.permute",
        Slice => "cpu.slice",
        WriteSlice => "cpu.write_slice",
        Concat => "cpu.concat",
        Resize => "cpu.resize",
        Conv => "cpu.conv",
        TopK => "cpu.topk",
        TakeAlongAxis => "cpu.take_along_axis",
        ScatterAdd => "cpu.scatter_add",
        CumSum => "cpu.cumsum",
        Cast => "cpu.cast",
        MoeDispatch => "cpu.moe_dispatch",
        MoeCombine => "cpu.moe_combine",
        /// The next token per row (greedy read in place; sampling through `kiln_graph::sample`).
        SampleToken => "cpu.sample_token",
        /// Log-softmax over the last axis, `kiln_graph::sample::log_softmax_f32` row by row.
        LogSoftmax => "cpu.log_softmax",
        /// One token's log-probability per row, `kiln_graph::sample::token_log_prob_f32`.
        TokenLogProb => "cpu.token_log_prob",
        /// The interpreter's arm on converted values: correct for every dtype, slow, allocating.
        Reference => "cpu.reference",
    }
}

/// Whether `axes` are the last `axes.len()` axes of a rank-`rank` tensor (and not none).
fn trailing_axes(axes: &[usize], rank: usize) -> bool {
    !axes.is_empty() && axes.iter().enumerate().all(|(i, &a)| a + axes.len() == rank + i)
}

fn float_ok(t: &TensorType) -> bool {
    !t.dtype.is_float() || t.dtype == DType::F32
}

/// Conversions `cpu.cast` runs directly (index arithmetic done in f32, masks to numbers).
fn cast_kernel(from: DType, to: DType) -> bool {
    matches!(
        (from, to),
        (DType::I64 | DType::I32 | DType::Bool | DType::U8, DType::F32) | (DType::F32, DType::I64 | DType::I32) | (DType::F32, DType::F32)
    )
}

/// Whether the table and output are f32 (input 1 holds indices).
fn f32_all_but_ids(inputs: &[TensorType], out: &TensorType) -> bool {
    out.dtype == DType::F32 && inputs.first().is_some_and(|t| t.dtype == DType::F32)
}

/// `kernel` when `fast` holds, else the reference interpreter's arm.
fn or_reference(fast: bool, kernel: CpuKernel) -> CpuKernel {
    if fast {
        kernel
    } else {
        CpuKernel::Reference
    }
}

/// The kernel a step of `op` uses on the cpu backend, or why it cannot run there.
pub fn choose(op: &Op, inputs: &[TensorType], out: &TensorType) -> Result<CpuKernel, String> {
    use CpuKernel as K;
    if !float_ok(out) || !inputs.iter().all(float_ok) {
        return Err(format!(
            "the cpu backend computes floats in f32 (bf16/f16 weights are upcast when loaded); {} on {out} needs --dtype f32",
            op.name()
        ));
    }
    let f32_all = out.dtype == DType::F32 && inputs.iter().all(|t| t.dtype == DType::F32);
    let dtype = |i: usize| inputs.get(i).map(|t| t.dtype);
    let int_index = |i: usize| matches!(dtype(i), Some(DType::I64 | DType::I32));
    Ok(match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => K::Source,
        Op::Reshape { .. } => K::View,
        // An epilogue's extra inputs may be integers, read through casts (RoPE's positions).
        Op::MatMul { epilogue: Some(_), .. } => or_reference(
            out.dtype == DType::F32
                && inputs.iter().take(2).all(|t| t.dtype == DType::F32)
                && inputs.iter().skip(2).all(|t| !t.dtype.is_float() || t.dtype == DType::F32),
            K::GemmEpilogue,
        ),
        Op::MatMul { epilogue: None, .. } => or_reference(f32_all, K::Gemm),
        Op::GatedMatMul { .. } => or_reference(
            out.dtype == DType::F32
                && inputs.iter().take(2).all(|t| t.dtype == DType::F32)
                && inputs.iter().skip(2).all(|t| !t.dtype.is_float() || t.dtype == DType::F32),
            K::GemmGated,
        ),
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Broadcast { .. } => or_reference(f32_all, K::Fused),
        // A region reads integers and bools only through casts (the shape rule checks it).
        Op::Fused(_) => {
            or_reference(out.dtype == DType::F32 && inputs.iter().all(|t| !t.dtype.is_float() || t.dtype == DType::F32), K::Fused)
        }
        Op::LayerNorm { .. } => or_reference(f32_all, K::LayerNorm),
        Op::RmsNorm { .. } => or_reference(f32_all, K::RmsNorm),
        Op::ResidualRmsNorm(_) => or_reference(f32_all, K::ResidualRmsNorm),
        Op::Softmax { axis } => or_reference(f32_all && *axis + 1 == out.rank(), K::Softmax),
        Op::Reduce { axes, .. } => or_reference(f32_all && trailing_axes(axes, inputs.first().map_or(0, |t| t.rank())), K::Reduce),
        Op::Attention(a) => {
            let qkv_f32 = out.dtype == DType::F32 && inputs.iter().take(3).all(|t| t.dtype == DType::F32);
            let ok = match a.mask {
                MaskKind::Additive => f32_all && inputs.len() == 4,
                // The position inputs are i64 (the shape rule checks them).
                MaskKind::Positions(pm) => qkv_f32 && inputs.len() == pm.arity(),
                MaskKind::None | MaskKind::Causal { .. } | MaskKind::SlidingWindow { .. } => f32_all,
            };
            or_reference(ok, K::FlashAttention)
        }
        Op::Gather { axis } => {
            or_reference(*axis == 0 && inputs.len() == 2 && dtype(1) == Some(DType::I64) && inputs[0].dtype.size() == 4, K::Gather)
        }
        Op::Permute { .. } => K::Permute,
        Op::Slice { .. } => K::Slice,
        Op::WriteSlice { .. } => or_reference(int_index(2), K::WriteSlice),
        Op::Concat { .. } => K::Concat,
        Op::Resize { .. } => or_reference(f32_all, K::Resize),
        Op::TopK { .. } => or_reference(dtype(0) == Some(DType::F32) && out.dtype == DType::I64, K::TopK),
        Op::TakeAlongAxis { .. } => or_reference(dtype(1) == Some(DType::I64) && matches!(out.dtype.size(), 4 | 8), K::TakeAlongAxis),
        Op::ScatterAdd { .. } => or_reference(dtype(1) == Some(DType::I64) && matches!(out.dtype, DType::F32 | DType::I64), K::ScatterAdd),
        Op::CumSum { .. } => or_reference(matches!(out.dtype, DType::F32 | DType::I64), K::CumSum),
        Op::Cast { to } => or_reference(dtype(0).is_some_and(|from| cast_kernel(from, *to)), K::Cast),
        Op::MoeDispatch { .. } => or_reference(out.dtype == DType::F32 && dtype(1) == Some(DType::I64), K::MoeDispatch),
        Op::MoeCombine => or_reference(
            out.dtype == DType::F32 && dtype(0) == Some(DType::F32) && dtype(1) == Some(DType::I64) && dtype(2) == Some(DType::F32),
            K::MoeCombine,
        ),
        // Positions and ranges: made once per run, small; the interpreter's arm fills them.
        Op::Iota { .. } => K::Reference,
        Op::Conv(_) => or_reference(f32_all, K::Conv),
        // The selection is `kiln_graph::sample`'s code, which the host's sampler runs too.
        Op::SampleToken => or_reference(dtype(0) == Some(DType::F32), K::SampleToken),
        // The host's log-softmax code (beam search's scores must equal the host's).
        Op::LogSoftmax => or_reference(f32_all, K::LogSoftmax),
        Op::TokenLogProb => or_reference(dtype(0) == Some(DType::F32) && dtype(1) == Some(DType::I64), K::TokenLogProb),
        // The gather's kernel, then the product in f32 (the unfused multiply's arithmetic).
        Op::GatherScaled { axis, .. } => {
            or_reference(*axis == 0 && inputs.len() == 2 && dtype(1) == Some(DType::I64) && f32_all_but_ids(inputs, out), K::Gather)
        }
    })
}

/// The conversions [`cast_kernel`] accepts (float to integer truncates toward zero).
pub(super) fn cast(src: &[u8], from: DType, to: DType, dst: &mut [u8]) {
    match (from, to) {
        (DType::F32, DType::F32) => dst.copy_from_slice(src),
        (DType::F32, DType::I64) => {
            let d: &mut [i64] = bytemuck::cast_slice_mut(dst);
            d.iter_mut().zip(bytemuck::cast_slice::<u8, f32>(src)).for_each(|(o, &x)| *o = x as i64);
        }
        (DType::F32, DType::I32) => {
            let d: &mut [i32] = bytemuck::cast_slice_mut(dst);
            d.iter_mut().zip(bytemuck::cast_slice::<u8, f32>(src)).for_each(|(o, &x)| *o = x as i32);
        }
        (_, _) => {
            let d: &mut [f32] = bytemuck::cast_slice_mut(dst);
            match from {
                DType::I64 => d.iter_mut().zip(bytemuck::cast_slice::<u8, i64>(src)).for_each(|(o, &x)| *o = x as f32),
                DType::I32 => d.iter_mut().zip(bytemuck::cast_slice::<u8, i32>(src)).for_each(|(o, &x)| *o = x as f32),
                _ => d.iter_mut().zip(src).for_each(|(o, &x)| *o = x as f32),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_distinct() {
        for &k in CpuKernel::ALL {
            assert_eq!(CpuKernel::parse(k.name()), Some(k));
        }
        assert_eq!(CpuKernel::parse("cublaslt.gemm_bf16"), None);
    }
}
