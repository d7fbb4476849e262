//! The cube backend's kernels as a type: `choose` picks one per op (every op matched by
//! name, no wildcard) or says why the op has no cube kernel. The cube backend has no
//! interpreter fallback: an op it cannot run is a compile error naming it.

use super::lower;
use kiln_graph::{DType, MaskKind, Op, TensorType};
use kiln_kernels::cube as k;

crate::kernel_enum::kernel_enum! {
    /// A kernel of the cube backend. Its [`name`](CubeKernel::name) is what a program stores.
    pub enum CubeKernel {
        Cast => "cube.cast",
        /// Permutes, slices and concats of f32 or words.
        Copy => "cube.copy",
        CumSum => "cube.cumsum",
        FlashAttention => "cube.flash_attention",
        Fused => "cube.fused",
        /// A permute or slice of non-f32 words: the fused kernel reading strided.
        StridedCopy => "cube.fused(strided)",
        Gather => "cube.gather",
        /// A GLU's gate and up products and their epilogue (`kiln_kernels::cube::gated`).
        GatedMatMul => "cube.gated_matmul",
        Iota => "cube.iota",
        MatMul => "cube.matmul",
        MatMulEpilogue => "cube.matmul+epilogue",
        MoeCombine => "cube.moe_combine",
        MoeDispatch => "cube.moe_dispatch",
        /// Layer norm and RMS norm.
        Norm => "cube.norm",
        Reduce => "cube.reduce",
        Resize => "cube.resize",
        ScatterAdd => "cube.scatter_add",
        Softmax => "cube.softmax",
        /// Softmax over an axis other than the last.
        SoftmaxAxis => "cube.softmax_axis",
        TopK => "cube.topk",
        /// One token's log-probability per row (f32 arithmetic).
        TokenLogProb => "cube.token_log_prob",
        /// `write_slice`: the KV cache's new rows written in place.
        WriteRows => "cube.write_rows",
        Source => "source",
        /// A reshape: the same bytes, a new type.
        View => "view",
    }
}

fn is_f32(t: &TensorType) -> bool {
    t.dtype == DType::F32
}

/// Whether the arena can hold the type (f16/bf16 activations are not kept on the device).
fn storable(t: &TensorType) -> bool {
    lower::repr(t.dtype).is_ok()
}

/// Whether the type is stored a word or two per element (not packed bytes).
fn wordy(t: &TensorType) -> bool {
    matches!(lower::repr(t.dtype), Ok(k::Repr::Float | k::Repr::I32 | k::Repr::I64))
}

/// The kernel a step of `op` uses on the cube backend, or why it has none.
pub fn choose(op: &Op, inputs: &[TensorType], out: &TensorType) -> Result<CubeKernel, String> {
    use CubeKernel as K;
    let tys = || inputs.iter().chain([out]).map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
    if !storable(out) || !inputs.iter().all(storable) {
        return Err(format!(
            "the cube backend keeps activations in f32 (and integers, bools); {} on {} has no cube kernel",
            op.name(),
            tys()
        ));
    }
    let no = |what: &str| Err(format!("{} has no cube kernel yet ({what})", op.name()));
    // A position mask's operands (after q, k, v) are i64, read by the kernel as they are.
    let floats = match op {
        Op::Attention(a) if matches!(a.mask, MaskKind::Positions(_)) => &inputs[..inputs.len().min(3)],
        // An epilogue's extra inputs may be integers, read through casts (RoPE's positions).
        Op::MatMul { epilogue: Some(_), .. } | Op::GatedMatMul { .. } => &inputs[..inputs.len().min(2)],
        _ => inputs,
    };
    let extras_ok = match op {
        Op::MatMul { epilogue: Some(_), .. } | Op::GatedMatMul { .. } => inputs.iter().skip(2).all(|t| is_f32(t) || !t.dtype.is_float()),
        _ => true,
    };
    let all_f32 = is_f32(out) && floats.iter().all(is_f32) && extras_ok;
    let kernel = match op {
        Op::MatMul { .. }
        | Op::GatedMatMul { .. }
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::ResidualRmsNorm(_)
        | Op::Softmax { .. }
        | Op::Attention(_)
        | Op::Resize { .. }
            if !all_f32 =>
        {
            return Err(format!("{} on {} has no cube kernel (f32 only)", op.name(), tys()));
        }
        Op::MatMul { epilogue, .. } => {
            if epilogue.is_some() {
                K::MatMulEpilogue
            } else {
                K::MatMul
            }
        }
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Broadcast { .. } | Op::Fused(_) => K::Fused,
        Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::ResidualRmsNorm(_) => K::Norm,
        Op::Softmax { axis } if axis + 1 == out.rank() => K::Softmax,
        Op::Softmax { .. } => K::SoftmaxAxis,
        Op::Attention(a) => {
            if a.mask == MaskKind::Additive
                && (inputs.len() != 4 || inputs[3].numel() != inputs[0].shape[0] * inputs[0].shape[1] * inputs[1].shape[1])
            {
                return no("an additive mask must be [batch, q_len, kv_len]");
            }
            K::FlashAttention
        }
        Op::Permute { .. } | Op::Slice { .. } if is_f32(out) => K::Copy,
        Op::Permute { .. } | Op::Slice { .. } => K::StridedCopy,
        Op::Concat { .. } if is_f32(out) || wordy(out) => K::Copy,
        Op::Concat { .. } => return no("concat of bytes"),
        Op::Reshape { .. } => K::View,
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => K::Source,
        Op::Cast { .. } => K::Cast,
        Op::Iota { .. }
        | Op::Reduce { .. }
        | Op::Gather { .. }
        | Op::GatherScaled { .. }
        | Op::TakeAlongAxis { .. }
        | Op::ScatterAdd { .. }
        | Op::TopK { .. }
        | Op::CumSum { .. }
            if !wordy(out)
                || (matches!(op, Op::Gather { .. } | Op::GatherScaled { .. } | Op::TakeAlongAxis { .. }) && !wordy(&inputs[0])) =>
        {
            return no("an output of bytes");
        }
        Op::Iota { .. } => K::Iota,
        Op::Reduce { .. } => K::Reduce,
        Op::Gather { .. } | Op::GatherScaled { .. } | Op::TakeAlongAxis { .. } => K::Gather,
        Op::WriteSlice { .. } if !wordy(out) => return no("an output of bytes"),
        Op::WriteSlice { .. } => K::WriteRows,
        Op::ScatterAdd { .. } => K::ScatterAdd,
        Op::TopK { .. } => K::TopK,
        Op::CumSum { .. } => K::CumSum,
        Op::MoeDispatch { .. } | Op::MoeCombine if !is_f32(out) || !is_f32(&inputs[0]) => return no("f32 activations only"),
        Op::MoeDispatch { .. } => K::MoeDispatch,
        Op::MoeCombine if !is_f32(&inputs[2]) => return no("f32 weights only"),
        Op::MoeCombine => K::MoeCombine,
        Op::Resize { .. } => K::Resize,
        Op::Conv(_) => return no("the compiler rewrites convolutions as a gather and a matmul for this backend"),
        Op::GatedMatMul { .. } => K::GatedMatMul,
        // The sampler draws in f64 from a 64-bit counter-based generator (`kiln_graph::sample`),
        // which WGSL has neither of; generation on cube chooses its tokens on the host.
        Op::SampleToken => return no("sampling needs f64 and u64 arithmetic"),
        // Its log-sum-exp is taken in f64 so that beam search's scores equal the host's; WGSL
        // has no f64, so beam search on cube reads the logits and scores them on the host.
        Op::LogSoftmax => return no("the log-softmax's log-sum-exp is taken in f64"),
        // In f32 (WGSL has no f64): within about 1e-6 * log(V) of the interpreter's value.
        Op::TokenLogProb if !is_f32(&inputs[0]) => return no("f32 logits only"),
        Op::TokenLogProb => K::TokenLogProb,
    };
    Ok(kernel)
}

/// Checks at load that every step's stored kernel is the one this build picks for its op and
/// operands: a program lowered for another backend, or a corrupt one, fails here by step.
pub(super) fn check(program: &kiln_graph::program::Program) -> crate::error::Result<()> {
    for e in &program.entries {
        for (i, s) in e.steps.iter().enumerate() {
            let err = |msg: String| crate::error::RuntimeError::Step { step: i, op: s.op.name(), msg };
            let stored = CubeKernel::parse(&s.kernel).ok_or_else(|| err(format!("kernel `{}` is not a cube kernel", s.kernel)))?;
            let types: Vec<TensorType> = s.inputs.iter().map(|o| o.ty.clone()).collect();
            let chosen = choose(&s.op, &types, &s.output.ty).map_err(err)?;
            if stored != chosen {
                return Err(err(format!("kernel `{}` cannot run this step (this build picks `{}`)", s.kernel, chosen.name())));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &k in CubeKernel::ALL {
            assert_eq!(CubeKernel::parse(k.name()), Some(k));
        }
    }
}
