//! The cuda backend's kernels as a type: `choose` picks one per op (every op matched by name,
//! no wildcard) or says why the op has no CUDA kernel. A kernel is a family, which the
//! lowering dispatches on, and the CUDA function it launches, whose name carries dtypes (and
//! for generated regions a hash of their code); [`CudaKernel::name`] is what a program stores.

use super::fused_codegen as codegen;
use super::gemm::{epilogue_kind, epilogue_region};
use super::lower::{float_suffix, index, index_suffix};
use kiln_graph::{DType, MaskKind, Op, TensorType};
use kiln_kernels::cuda::{self as kc, fused, MAX_RANK};

/// A kernel of the cuda backend: its family, and the function it launches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaKernel {
    /// Inputs, weights, constants: no launch.
    Source,
    /// A reshape: the same bytes, a new type.
    View,
    /// A cuBLASLt GEMM (or the GEMV the executor may pick at load), with its epilogue:
    /// `cublaslt.gemm_<t>[_tb][+<cuBLASLt epilogue> | ;<generated region>]`.
    Gemm(String),
    /// kiln's GEMV run by rule: a gated matmul's two products and GLU (`gemv_glu_<t>`).
    Gemv(String),
    /// A generated elementwise region (`fused_codegen`).
    Fused(String),
    /// Layer norm and RMS norm over the last axis.
    Norm(String),
    /// Softmax over the last axis.
    Softmax(String),
    /// Flash attention: the tensor-core prefill (`attn_mma_*`) or the row kernel (`attn_rows_*`).
    Attention(String),
    /// Permutes, slices and concats: a strided copy (`copy_b<bytes>`).
    Copy(String),
    Gather(String),
    /// `write_slice`: the KV cache's new rows written in place.
    WriteRows(String),
    MoeDispatch(String),
    MoeCombine(String),
    Reduce(String),
    Iota(String),
    /// The index and axis ops of `index.cu` (cumsum, top-k, take-along-axis, scatter-add,
    /// softmax over a middle axis, resize).
    Index(String),
}

impl CudaKernel {
    /// The name a program stores and `kiln inspect` shows: the CUDA function's, or `source`
    /// and `view`.
    pub fn name(&self) -> &str {
        use CudaKernel as K;
        match self {
            K::Source => "source",
            K::View => "view",
            K::Gemm(n)
            | K::Gemv(n)
            | K::Fused(n)
            | K::Norm(n)
            | K::Softmax(n)
            | K::Attention(n)
            | K::Copy(n)
            | K::Gather(n)
            | K::WriteRows(n)
            | K::MoeDispatch(n)
            | K::MoeCombine(n)
            | K::Reduce(n)
            | K::Iota(n)
            | K::Index(n) => n,
        }
    }
}

/// The name of the kernel a step uses (shown by `kiln inspect`), or why there is none.
pub fn kernel_for(op: &Op, inputs: &[TensorType], out: &TensorType) -> Result<String, String> {
    choose(op, inputs, out).map(|k| k.name().to_string())
}

/// The kernel a step of `op` uses on the cuda backend, or why it has none: every op matched
/// by name, no wildcard.
pub fn choose(op: &Op, inputs: &[TensorType], out: &TensorType) -> Result<CudaKernel, String> {
    use CudaKernel as K;
    let no = |what: &str| Err(format!("{} has no CUDA kernel ({what})", op.name()));
    Ok(match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => K::Source,
        Op::Reshape { .. } => K::View,
        Op::MatMul { transpose_b, epilogue } => {
            let t = float_suffix(inputs[0].dtype)?;
            float_suffix(out.dtype)?;
            // The output differs from the operands only through an epilogue's final cast: the
            // GEMM then writes its f32 accumulator in the output's dtype.
            if inputs[1].dtype != inputs[0].dtype || (inputs[0].dtype != out.dtype && (epilogue.is_none() || out.dtype != DType::F32)) {
                return no("mixed dtypes");
            }
            let tb = if *transpose_b { "_tb" } else { "" };
            let to = if out.dtype == inputs[0].dtype { String::new() } else { format!("_to_{}", float_suffix(out.dtype)?) };
            K::Gemm(match epilogue {
                None => format!("cublaslt.gemm_{t}{tb}"),
                Some(e) => match epilogue_kind(e, &inputs[2..], out).filter(|_| to.is_empty()) {
                    Some(kind) => format!("cublaslt.gemm_{t}{tb}+{}", kind.name()),
                    None => {
                        let extra: Vec<DType> = inputs[2..].iter().map(|t| t.dtype).collect();
                        let (e, ins) = epilogue_region(e, inputs[0].dtype, out.dtype, &extra);
                        format!("cublaslt.gemm_{t}{tb}{to};{}", codegen::kernel_name(&e, &ins, out.dtype))
                    }
                },
            })
        }
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } | Op::Broadcast { .. } | Op::Fused(_) => {
            let e = op.elementwise_expr().ok_or("not elementwise")?;
            if inputs.len() > fused::MAX_INPUTS {
                return no("more than 16 inputs");
            }
            if out.rank() > MAX_RANK {
                return no("rank above 8");
            }
            let ins: Vec<DType> = inputs.iter().map(|t| t.dtype).collect();
            K::Fused(codegen::kernel_name(&e, &ins, out.dtype))
        }
        Op::LayerNorm { .. } => K::Norm(format!("layer_norm_{}", float_suffix(out.dtype)?)),
        Op::RmsNorm { .. } => K::Norm(format!("rms_norm_{}", float_suffix(out.dtype)?)),
        Op::ResidualRmsNorm(_) => K::Norm(format!("residual_rms_norm_{}", float_suffix(out.dtype)?)),
        Op::Softmax { axis } if axis + 1 == out.rank() => K::Softmax(format!("softmax_{}", float_suffix(out.dtype)?)),
        Op::Softmax { .. } => K::Index(index::kernel_for(op, inputs, out)?),
        Op::Attention(a) => {
            let t = float_suffix(out.dtype)?;
            if a.mask == MaskKind::Additive && (inputs.len() != 4 || inputs[3].dtype != inputs[0].dtype) {
                return no("an additive mask must have the queries' dtype");
            }
            let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
            let (d, dv) = (q.shape[3], v.shape[3]);
            let half = matches!(q.dtype, DType::BF16 | DType::F16);
            if half && q.shape[1] > 1 && d == dv && kc::MMA_HEAD_DIMS.contains(&d) {
                K::Attention(format!("attn_mma_{t}_d{d}"))
            } else if d > kc::ROWS_MAX_D || dv > kc::ROWS_MAX_D || k.shape[2] == 0 || q.shape[2] % k.shape[2] != 0 {
                return no("head dim above 256 or heads not grouped");
            } else {
                K::Attention(format!("attn_rows_{t}"))
            }
        }
        Op::Permute { .. } | Op::Slice { .. } | Op::Concat { .. } => {
            if out.rank() > MAX_RANK {
                return no("rank above 8");
            }
            K::Copy(format!("copy_b{}", out.dtype.size()))
        }
        Op::Gather { .. } => K::Gather(format!("gather_b{}_{}", out.dtype.size(), index_suffix(inputs[1].dtype)?)),
        Op::GatherScaled { .. } => K::Gather(format!("gather_scaled_{}_{}", float_suffix(out.dtype)?, index_suffix(inputs[1].dtype)?)),
        Op::WriteSlice { .. } => K::WriteRows(format!("write_rows_b{}_{}", out.dtype.size(), index_suffix(inputs[2].dtype)?)),
        Op::MoeDispatch { .. } => K::MoeDispatch(format!("moe_dispatch_{}_{}", float_suffix(out.dtype)?, index_suffix(inputs[1].dtype)?)),
        Op::MoeCombine => K::MoeCombine(format!("moe_combine_{}_{}", float_suffix(out.dtype)?, index_suffix(inputs[1].dtype)?)),
        Op::Reduce { .. } => K::Reduce(format!("reduce_{}", float_suffix(out.dtype)?)),
        Op::Iota { .. } => match out.dtype {
            DType::F32 | DType::BF16 | DType::F16 | DType::I32 | DType::I64 => K::Iota(format!("iota_{}", out.dtype.name())),
            other => return no(&format!("iota of {other}")),
        },
        Op::TakeAlongAxis { .. } | Op::ScatterAdd { .. } | Op::TopK { .. } | Op::CumSum { .. } | Op::Resize { .. } => {
            K::Index(index::kernel_for(op, inputs, out)?)
        }
        Op::Conv(_) => return no("the compiler rewrites convolutions as a gather and a matmul for this backend"),
        Op::GatedMatMul { transpose_b, epilogue } => match super::gemm::gated_kernel(*transpose_b, epilogue, inputs, out) {
            Ok(name) => K::Gemv(name),
            Err(e) => return no(&e),
        },
        Op::SampleToken if inputs[0].dtype != DType::F32 => return no("f32 logits only"),
        Op::SampleToken => K::Index("sample_token_f32".to_string()),
        Op::LogSoftmax if inputs[0].dtype != DType::F32 || out.dtype != DType::F32 => return no("f32 only"),
        Op::LogSoftmax => K::Index(index::kernel_for(op, inputs, out)?),
        Op::TokenLogProb if inputs[0].dtype != DType::F32 => return no("f32 logits only"),
        Op::TokenLogProb => K::Index(index::kernel_for(op, inputs, out)?),
    })
}
