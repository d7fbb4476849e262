//! The operation set. One op = one variant here + one shape rule (`infer.rs`) + one
//! interpreter arm (`interp/`) + one lowering per backend + one test row.

use crate::cost::{attended_pairs, expr_flops, Cost};
use crate::dtype::{DType, TensorType};
use serde::{Deserialize, Serialize};

/// Elementwise functions of one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Square,
    Tanh,
    Sigmoid,
    Erf,
    Sin,
    Cos,
    Floor,
    Relu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (JAX's default, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    GeluErf,
    /// `x * sigmoid(x)`.
    Silu,
    /// `log(1 + exp(x))`.
    Softplus,
    /// Logical not of a boolean.
    Not,
}

/// Elementwise functions of two (broadcast) arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    /// Comparisons return `bool`.
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinaryOp {
    /// Whether the result is a `bool` regardless of the operand type.
    pub fn is_comparison(self) -> bool {
        match self {
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => true,
            BinaryOp::Add
            | BinaryOp::Sub
            | BinaryOp::Mul
            | BinaryOp::Div
            | BinaryOp::Max
            | BinaryOp::Min
            | BinaryOp::Pow
            | BinaryOp::And
            | BinaryOp::Or => false,
        }
    }

    /// Whether `a op b == b op a`.
    pub fn is_commutative(self) -> bool {
        match self {
            BinaryOp::Add | BinaryOp::Mul | BinaryOp::Max | BinaryOp::Min | BinaryOp::Eq | BinaryOp::Ne => true,
            BinaryOp::And | BinaryOp::Or => true,
            BinaryOp::Sub | BinaryOp::Div | BinaryOp::Pow | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => false,
        }
    }
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

/// Which keys a query may attend to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MaskKind {
    /// Every key.
    None,
    /// Keys at positions `<= q_offset + i` for query `i`.
    Causal { q_offset: usize },
    /// Causal, and keys at positions `> q_offset + i - window`.
    SlidingWindow { q_offset: usize, window: usize },
    /// An additive mask `[B, Sq, Sk]` given as the fourth input (0 or -inf): for an arbitrary
    /// mask (big_vision's `mask_ar` blocks); the common ones are [`MaskKind::Positions`].
    Additive,
    /// Computed inside the kernel from run-time positions and lengths, with no `[Sq, Sk]`
    /// tensor anywhere: see [`PosMask`] for the inputs and the rule.
    Positions(PosMask),
}

/// A mask computed from positions: causal attention where query `i` sits at key index
/// `start + i`, `start` being the fourth input (i64 `[1]`, decode's `cache_position`; 0 for a
/// prefill). Key `j` of row `b` is visible when
/// `(j <= start + i && (no window || j + window > start + i) || start + i < prefix[b] && j < prefix[b])
/// && keep[b, j] != 0`: the prefix is bidirectional (for a query outside it, the prefix
/// keys are causal, so only a window can hide them).
/// The kernels visit keys only below `max(start + Sq, prefix[b])`: decode cost follows the
/// filled length of the cache, not its capacity. A query that sees no key gives zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PosMask {
    /// Gemma 2's local layers: only the `window` most recent positions (the query's own included).
    pub window: Option<usize>,
    /// Key padding: an input `keep [B, Sk]` (i64, 0 = padding) follows `start`.
    pub padding: bool,
    /// Prefix-LM: an input `prefix [B]` (i64) follows: queries and keys below it see each
    /// other (PaliGemma's bidirectional prefix, JetFormer's non-causal prefix).
    pub prefix: bool,
}

impl PosMask {
    /// How many inputs the attention op takes with this mask (q, k, v, start and the optional ones).
    pub fn arity(&self) -> usize {
        4 + usize::from(self.padding) + usize::from(self.prefix)
    }

    /// Whether key `j` is visible to the query at key index `qpos` (`keep` and `prefix` are the
    /// row's values; `None` when the mask has no such input).
    pub fn visible(&self, qpos: usize, j: usize, keep: Option<bool>, prefix: Option<usize>) -> bool {
        let causal = j <= qpos && self.window.is_none_or(|w| j + w > qpos);
        (causal || prefix.is_some_and(|p| qpos < p && j < p)) && keep.unwrap_or(true)
    }

    /// The keys a query at `qpos` may see lie in `lo..hi` (clipped to `sk`).
    pub fn key_range(&self, qpos: usize, prefix: Option<usize>, sk: usize) -> (usize, usize) {
        let p = prefix.unwrap_or(0);
        let hi = (qpos + 1).max(p).min(sk);
        let lo = if qpos < p { 0 } else { self.window.map_or(0, |w| (qpos + 1).saturating_sub(w)) };
        (lo.min(hi), hi)
    }
}

/// Attributes of the semantic attention op.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    /// Multiplies `q . k` before soft-capping.
    pub scale: f32,
    /// `c * tanh(s / c)` on the scaled scores, before the mask (Gemma 2).
    pub softcap: Option<f32>,
    pub mask: MaskKind,
}

/// Attributes of [`Op::ResidualRmsNorm`]: both norms share `eps` and `add_one` (as in
/// [`Op::RmsNorm`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResidualRmsNorm {
    pub eps: f32,
    pub add_one: bool,
    /// Whether `o` is normalised (by `w_post`) before the add (Gemma 2's post-norms).
    pub post: bool,
    /// Rows per half of the output (at least the input's rows).
    pub rows_pad: usize,
}

/// How a resampling op interpolates (PyTorch `interpolate`, `align_corners=False`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResizeMode {
    Bilinear,
    Bicubic,
}

pub use crate::expr::{Expr, Instr};

/// An operation. Inputs are listed on the node; the op carries only attributes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A named runtime input (the node's type is the input's type).
    Input { name: String },
    /// A named weight from the checkpoint.
    Weight { name: String },
    /// A small constant tensor (values stored as f64, exact for every dtype used).
    Constant { values: Vec<f64> },
    /// `values[i] = start + i * step` along axis `axis` of the node's shape.
    Iota { axis: usize, start: f64, step: f64 },
    /// Elementwise `f(x)`.
    Unary(UnaryOp),
    /// Elementwise `a op b` with numpy broadcasting.
    Binary(BinaryOp),
    /// `cond ? a : b`, broadcast.
    Select,
    /// Converts to another element type (float to int truncates toward zero).
    Cast { to: DType },
    /// Reduction over `axes` (sorted, unique); `keep_dims` keeps them as size 1.
    Reduce { op: ReduceOp, axes: Vec<usize>, keep_dims: bool },
    /// Batched `a @ b` (`[.., M, K] x [.., K, N]`, leading axes broadcast); with
    /// `transpose_b` b is `[.., N, K]`. An epilogue, when present, is applied to each result
    /// element: `Input(0)` is the product, `Input(i)` for `i >= 1` reads node input `i + 1`
    /// broadcast to the result.
    MatMul { transpose_b: bool, epilogue: Option<Expr> },
    /// Same elements, new shape.
    Reshape { shape: Vec<usize> },
    /// Axis permutation: output axis `i` is input axis `perm[i]`.
    Permute { perm: Vec<usize> },
    /// Elements `start, start+step, .. < end` along `axis`.
    Slice { axis: usize, start: usize, end: usize, step: usize },
    /// Concatenation of all inputs along `axis`.
    Concat { axis: usize },
    /// Numpy broadcast to `shape`.
    Broadcast { shape: Vec<usize> },
    /// `out[.., j, ..] = x[.., idx[j], ..]` along `axis` (idx any shape, integer; out shape
    /// is `x[..axis] ++ idx ++ x[axis+1..]`). Out-of-range indices are an error.
    Gather { axis: usize },
    /// `out[i][j][k] = x[i][idx[i][j][k]][k]` along `axis` (torch.gather; idx has x's rank).
    TakeAlongAxis { axis: usize },
    /// `out = base; out[.., idx[..], ..] += src[..]` along `axis` (torch.scatter_add).
    ScatterAdd { axis: usize },
    /// Indices (i64) of the `k` largest elements along the last axis, descending, ties to
    /// the lower index.
    TopK { k: usize },
    /// Running sum along `axis`; `exclusive` starts from zero.
    CumSum { axis: usize, exclusive: bool },
    /// Resamples the last two axes to `size` (PyTorch `interpolate`, `align_corners=False`).
    Resize { size: [usize; 2], mode: ResizeMode },
    /// Softmax over `axis`.
    Softmax { axis: usize },
    /// `(x - mean) / sqrt(var + eps) * scale + bias` over the last axis; inputs x, scale, bias.
    LayerNorm { eps: f32 },
    /// `x / sqrt(mean(x^2) + eps) * (add_one ? 1 + w : w)` over the last axis; inputs x, w.
    RmsNorm { eps: f32, add_one: bool },
    /// A residual add between two RMS norms, as one step (made by the `residual_rms_norm`
    /// pass): inputs `x [.., d]`, `o` (x's type), `w_post [d]` (only when `post`) and `w_pre
    /// [d]`. With `rows = numel(x) / d` the output is `[2 * rows_pad, d]`: rows `0..rows` hold
    /// `h = x + rms_norm(o, w_post)` (`x + o` without `post`), rows `rows_pad..rows_pad + rows`
    /// hold `rms_norm(h, w_pre)`, the other rows zeros. Each half is rounded to the dtype as
    /// the unfused ops would store it; `rows_pad` makes the second half start on an arena
    /// boundary, so both halves are zero-copy slices.
    ResidualRmsNorm(ResidualRmsNorm),
    /// Multi-head attention on `q [B,Sq,Hq,D]`, `k [B,Sk,Hkv,D]`, `v [B,Sk,Hkv,Dv]` (and a
    /// mask `[B,Sq,Sk]` for [`MaskKind::Additive`], the position inputs of [`PosMask`]), giving `[B,Sq,Hq,Dv]`; `Hq % Hkv == 0`.
    Attention(Attention),
    /// Mixture-of-experts dispatch: `out [rows, D]` starts at zero and, for every assignment
    /// `(t, k)` with `slot[t, k] >= 0`, `out[slot[t, k]] += x[t]`; inputs `x [T, D]`,
    /// `slot [T, K]` (integer, -1 = dropped). Expert buffers of static capacity.
    MoeDispatch { rows: usize },
    /// Mixture-of-experts combine: `out[t] = sum_k w[t, k] * y[slot[t, k]]` over the
    /// assignments with `slot[t, k] >= 0` (a token dropped by every expert gets zero); inputs
    /// `y [R, D]`, `slot [T, K]` (integer), `w [T, K]`.
    MoeCombine,
    /// `out = dst` with `rows` written along `axis` from position `at[0]` on: inputs
    /// `dst`, `rows` (dst's shape but `n <= dst[axis]` along `axis`), `at` (integer `[1]`;
    /// `at + n > dst[axis]` is an error). Functional here; when `dst` is persistent state
    /// the lowering makes the output alias it, so a step writes only the `n` new rows (the
    /// KV cache's one-token update).
    WriteSlice { axis: usize },
    /// A fused elementwise region over broadcast inputs (made by the fusion pass).
    Fused(Expr),
    /// 2-D convolution, or transposed convolution, over NHWC images: inputs `x [B, H, W, Ci]`
    /// and a kernel `w [KH, KW, Ci, Co]` (HWIO, Flax's layout), giving `[B, OH, OW, Co]`.
    Conv(Conv),
    /// The next token of each row, chosen as the last step of a generation entry
    /// ([`crate::sample`]): inputs `logits [B, V]` (float), `options [2]` (f32: temperature,
    /// top-p), `counters [4]` (i64: top-k, the seed's high and low 32 bits, the step) and
    /// `streams [B]` (i64: each row's random stream); the ids `[B]` (i64). Temperature <= 0
    /// is greedy (the first argmax).
    SampleToken,
    /// Log-softmax over the last axis, `x - log(sum(exp(x)))`, with the log-sum-exp taken in
    /// double precision (the row's max, then the sum of `exp(x - max)` in index order) before
    /// the result is rounded to the element type ([`crate::sample::log_softmax`]): the
    /// candidate scores of beam search, equal to the host's log-softmax of the same logits.
    LogSoftmax,
    /// The log-probability of one token per row: inputs `logits [R, V]` (float) and `ids [R]`
    /// or `[R, 1]` (integer), giving f32 of the ids' shape, `logits[r, id] - log(sum(exp(
    /// logits[r, :])))` with the log-sum-exp taken as [`Op::LogSoftmax`] takes it
    /// ([`crate::sample::token_log_prob`]): the take-along-axis of the log-softmax at the ids,
    /// bit for bit, in one step that writes no `[R, V]` tensor.
    TokenLogProb,
    /// `gather(table, ids)` along `axis` (as [`Op::Gather`]), each element times `scale` and
    /// rounded to the table's float dtype: `gather(table, ids) * scale` in one step (an
    /// embedding's `sqrt(hidden)`), made by the `gather_scale` pass. `scale` is a value of the
    /// dtype, so the step gives the unfused product's bits.
    GatherScaled { axis: usize, scale: f32 },
    /// Two products of one `a` combined by an epilogue in one step, a gated linear unit's
    /// gate and up projections (`gelu(a @ w_gate) * (a @ w_up)`): `b` holds both weights
    /// stacked, `[2, K, N]` (`[2, N, K]` with `transpose_b`), `a` is `[.., M, K]` and each
    /// product `[.., M, N]`, rounded to the operands' dtype. The epilogue reads the first
    /// product as `Input(0)`, the second as `Input(1)` and node input `i` as `Input(i)` for
    /// `i >= 2` (broadcast to the result). Made by the `gated_matmul` pass where a backend
    /// computes both products and the epilogue in one kernel, so the first product is never
    /// stored whole.
    GatedMatMul { transpose_b: bool, epilogue: Expr },
}

/// The geometry of a [`Op::Conv`]; zero padding, the same `pad` before and after each axis.
///
/// Direct (`transposed: false`): `y[b, i, j, o] = sum x[b, i*s + kh - pad, j*s + kw - pad, c] *
/// w[kh, kw, c, o]` over the kernel and input channels (outside the image reads zero);
/// `OH = (H + 2 pad - KH) / s + 1`.
///
/// Transposed (PyTorch `ConvTranspose2d(stride=s, padding=pad)` with its weight `[Ci, Co, KH,
/// KW]` permuted to HWIO): every input pixel scatters `x[b, i, j, c] * w[kh, kw, c, o]` to
/// `y[b, i*s + kh - pad, j*s + kw - pad, o]`; `OH = (H - 1) s + KH - 2 pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conv {
    /// Stride along H and W.
    pub stride: [usize; 2],
    /// Zero padding along H and W (each side).
    pub pad: [usize; 2],
    pub transposed: bool,
}

impl Conv {
    /// The output's spatial size for an input of `hw` and a kernel of `k`, or why there is none.
    pub fn out_hw(&self, hw: [usize; 2], k: [usize; 2]) -> Result<[usize; 2], String> {
        let mut out = [0; 2];
        for a in 0..2 {
            let (n, k, s, p) = (hw[a], k[a], self.stride[a], self.pad[a]);
            if s == 0 || n == 0 || k == 0 {
                return Err(format!("conv with stride {s}, input {n}, kernel {k} along axis {a}"));
            }
            out[a] = if self.transposed {
                ((n - 1) * s + k)
                    .checked_sub(2 * p)
                    .filter(|&o| o > 0)
                    .ok_or_else(|| format!("transposed conv: padding {p} leaves nothing"))?
            } else {
                let padded = n + 2 * p;
                if padded < k {
                    return Err(format!("conv: kernel {k} larger than the padded input {padded}"));
                }
                (padded - k) / s + 1
            };
        }
        Ok(out)
    }
}

impl Op {
    /// A short name for printing and kernel tables.
    pub fn name(&self) -> &'static str {
        self.describe_with(false).0
    }

    /// The attributes as `kiln inspect --ir` prints them between brackets.
    pub fn attrs(&self) -> String {
        self.describe().1
    }

    /// The op's name and its attributes: the one place an op says what it is.
    pub fn describe(&self) -> (&'static str, String) {
        self.describe_with(true)
    }

    /// [`Op::describe`], formatting the attributes only when `attrs` is set (`name` asks for
    /// none, and allocates nothing).
    fn describe_with(&self, attrs: bool) -> (&'static str, String) {
        let a = |f: &dyn Fn() -> String| if attrs { f() } else { String::new() };
        let lower = |d: &dyn std::fmt::Debug| format!("{d:?}").to_lowercase();
        match self {
            Op::Input { name } => ("input", a(&|| format!("\"{name}\""))),
            Op::Weight { name } => ("weight", a(&|| format!("\"{name}\""))),
            Op::Constant { values } if values.len() <= 4 => ("constant", a(&|| format!("{values:?}"))),
            Op::Constant { values } => ("constant", a(&|| format!("{} values", values.len()))),
            Op::Iota { axis, start, step } => ("iota", a(&|| format!("axis={axis}, start={start}, step={step}"))),
            Op::Unary(u) => ("unary", a(&|| lower(u))),
            Op::Binary(b) => ("binary", a(&|| lower(b))),
            Op::Select => ("select", String::new()),
            Op::Cast { to } => ("cast", a(&|| to.to_string())),
            Op::Reduce { op, axes, keep_dims } => ("reduce", a(&|| format!("{}, axes={axes:?}, keep_dims={keep_dims}", lower(op)))),
            Op::MatMul { transpose_b, epilogue } => (
                "matmul",
                a(&|| {
                    let mut s = if *transpose_b { "b^T".to_string() } else { String::new() };
                    if let Some(e) = epilogue {
                        s = format!("{s}{}epilogue={}", if s.is_empty() { "" } else { ", " }, e.formula());
                    }
                    s
                }),
            ),
            Op::Reshape { shape } => ("reshape", a(&|| format!("{shape:?}"))),
            Op::Permute { perm } => ("permute", a(&|| format!("{perm:?}"))),
            Op::Slice { axis, start, end, step } => ("slice", a(&|| format!("axis={axis}, {start}..{end}, step={step}"))),
            Op::Concat { axis } => ("concat", a(&|| format!("axis={axis}"))),
            Op::Broadcast { shape } => ("broadcast", a(&|| format!("{shape:?}"))),
            Op::Gather { axis } => ("gather", a(&|| format!("axis={axis}"))),
            Op::TakeAlongAxis { axis } => ("take_along_axis", a(&|| format!("axis={axis}"))),
            Op::ScatterAdd { axis } => ("scatter_add", a(&|| format!("axis={axis}"))),
            Op::TopK { k } => ("topk", a(&|| format!("k={k}"))),
            Op::CumSum { axis, exclusive } => ("cumsum", a(&|| format!("axis={axis}, exclusive={exclusive}"))),
            Op::Resize { size, mode } => ("resize", a(&|| format!("{size:?}, {}", lower(mode)))),
            Op::Softmax { axis } => ("softmax", a(&|| format!("axis={axis}"))),
            Op::LayerNorm { eps } => ("layer_norm", a(&|| format!("eps={eps:e}"))),
            Op::RmsNorm { eps, add_one } => ("rms_norm", a(&|| format!("eps={eps:e}, add_one={add_one}"))),
            Op::ResidualRmsNorm(r) => {
                ("residual_rms_norm", a(&|| format!("eps={:e}, add_one={}, post={}, rows_pad={}", r.eps, r.add_one, r.post, r.rows_pad)))
            }
            Op::Attention(at) => (
                "attention",
                a(&|| {
                    let mask = match at.mask {
                        MaskKind::None => "none".to_string(),
                        MaskKind::Causal { q_offset } => format!("causal(+{q_offset})"),
                        MaskKind::SlidingWindow { q_offset, window } => format!("window({window}, +{q_offset})"),
                        MaskKind::Additive => "additive".to_string(),
                        MaskKind::Positions(pm) => {
                            let w = pm.window.map(|w| format!(", window={w}")).unwrap_or_default();
                            let pad = if pm.padding { ", padding" } else { "" };
                            let pre = if pm.prefix { ", prefix" } else { "" };
                            format!("positions(start{w}{pad}{pre})")
                        }
                    };
                    let cap = at.softcap.map(|c| format!(", softcap={c}")).unwrap_or_default();
                    format!("scale={}, mask={mask}{cap}", at.scale)
                }),
            ),
            Op::MoeDispatch { rows } => ("moe_dispatch", a(&|| format!("rows={rows}"))),
            Op::MoeCombine => ("moe_combine", String::new()),
            Op::WriteSlice { axis } => ("write_slice", a(&|| format!("axis={axis}"))),
            Op::Fused(e) => ("fused", a(&|| e.formula())),
            Op::SampleToken => ("sample_token", String::new()),
            Op::LogSoftmax => ("log_softmax", String::new()),
            Op::TokenLogProb => ("token_log_prob", String::new()),
            Op::GatherScaled { axis, scale } => ("gather_scaled", a(&|| format!("axis={axis}, scale={scale:?}"))),
            Op::GatedMatMul { transpose_b, epilogue } => {
                ("gated_matmul", a(&|| format!("{}epilogue={}", if *transpose_b { "b^T, " } else { "" }, epilogue.formula())))
            }
            Op::Conv(c) => {
                ("conv", a(&|| format!("stride={:?}, pad={:?}{}", c.stride, c.pad, if c.transposed { ", transposed" } else { "" })))
            }
        }
    }

    /// The FLOPs and fewest bytes of this op on inputs of types `inputs` giving `output`, by
    /// the counting rules of [`crate::cost`].
    pub fn cost(&self, inputs: &[TensorType], output: &TensorType) -> Cost {
        let n_out = output.numel() as u64;
        let all_bytes = inputs.iter().map(|t| t.bytes() as u64).sum::<u64>() + output.bytes() as u64;
        let keep_only = |extra: u64| 2 * output.bytes() as u64 + extra;
        let input_numel = |i: usize| inputs.get(i).map_or(0, |t| t.numel() as u64);
        let (flops, bytes) = match self {
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Reshape { .. } => (0, 0),
            Op::Iota { .. } => (2 * n_out, output.bytes() as u64),
            Op::Unary(_) | Op::Binary(_) | Op::Select => (n_out, all_bytes),
            Op::Fused(e) => (expr_flops(e) * n_out, all_bytes),
            Op::Cast { .. } | Op::Permute { .. } | Op::Concat { .. } | Op::Broadcast { .. } => (0, all_bytes),
            Op::Slice { .. } => (0, keep_only(0)),
            // In place on persistent state: only the new rows move.
            Op::WriteSlice { .. } => (0, 2 * inputs.get(1).map_or(0, |t| t.bytes() as u64)),
            Op::Gather { .. } | Op::TakeAlongAxis { .. } => (0, keep_only(inputs.get(1).map_or(0, |t| t.bytes() as u64))),
            Op::GatherScaled { .. } => (n_out, keep_only(inputs.get(1).map_or(0, |t| t.bytes() as u64))),
            // The row's log-sum-exp (as the log-softmax) and one subtraction per row.
            Op::TokenLogProb => (4 * input_numel(0) + n_out, all_bytes),
            Op::Reduce { op, .. } => {
                let extra = match op {
                    ReduceOp::Mean => n_out,
                    ReduceOp::Sum | ReduceOp::Max | ReduceOp::Min => 0,
                };
                (input_numel(0) + extra, all_bytes)
            }
            Op::MatMul { epilogue, .. } => {
                let k = inputs.first().and_then(|a| a.shape.last()).copied().unwrap_or(0) as u64;
                (2 * n_out * k + epilogue.as_ref().map_or(0, expr_flops) * n_out, all_bytes)
            }
            // Two products, then the epilogue per element.
            Op::GatedMatMul { epilogue, .. } => {
                let k = inputs.first().and_then(|a| a.shape.last()).copied().unwrap_or(0) as u64;
                (4 * n_out * k + expr_flops(epilogue) * n_out, all_bytes)
            }
            Op::ScatterAdd { .. } => (input_numel(2), all_bytes),
            // Dispatch copies each kept token into its expert buffer: no arithmetic.
            Op::MoeDispatch { .. } => (0, all_bytes),
            // Combine: one multiply-add per kept assignment and model dimension.
            Op::MoeCombine => (2 * input_numel(1) * output.shape.last().copied().unwrap_or(1) as u64, all_bytes),
            Op::TopK { .. } => (input_numel(0), all_bytes),
            // Greedy: a compare per logit (sampling's sorts are not counted).
            Op::SampleToken => (input_numel(0), all_bytes),
            Op::CumSum { .. } => (n_out, all_bytes),
            Op::Resize { mode, .. } => {
                let taps = match mode {
                    ResizeMode::Bilinear => 4,
                    ResizeMode::Bicubic => 16,
                };
                (2 * taps * n_out, all_bytes)
            }
            Op::Softmax { .. } | Op::LogSoftmax => (5 * n_out, all_bytes),
            Op::LayerNorm { .. } => (7 * n_out, all_bytes),
            Op::RmsNorm { .. } => (4 * n_out, all_bytes),
            // Two norms and an add per element of x; the output's padding rows are written too.
            Op::ResidualRmsNorm(r) => ((if r.post { 9 } else { 5 }) * input_numel(0), all_bytes),
            Op::Attention(a) => {
                let dim = |i: usize, d: usize| inputs.get(i).and_then(|t| t.shape.get(d)).copied().unwrap_or(0);
                let (b, sq, hq, d) = (dim(0, 0), dim(0, 1), dim(0, 2), dim(0, 3));
                let (sk, dv) = (dim(1, 1), dim(2, 3));
                let per_pair = 2 * d as u64
                    + 2 * dv as u64
                    + 1
                    + 5
                    + if a.softcap.is_some() { 3 } else { 0 }
                    + if a.mask == MaskKind::Additive { 1 } else { 0 };
                ((b * hq) as u64 * attended_pairs(a.mask, sq, sk) * per_pair, all_bytes)
            }
            // A multiply-add per kernel tap and channel pair, per output pixel for a direct
            // conv and per input pixel for a transposed one (zero padding counted).
            Op::Conv(c) => {
                let w = inputs.get(1).map_or(&[][..], |t| &t.shape[..]);
                let dim = |i: usize| w.get(i).copied().unwrap_or(0) as u64;
                let pixels = if c.transposed { input_numel(0) / dim(2).max(1) } else { n_out / dim(3).max(1) };
                (2 * pixels * dim(0) * dim(1) * dim(2) * dim(3), all_bytes)
            }
        };
        Cost { flops, bytes }
    }

    /// Whether the node is a source (no inputs, value known before any step runs).
    pub fn is_source(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. })
    }

    /// The expression an elementwise step computes, so that every backend runs plain
    /// elementwise ops, broadcasts, casts and fused regions through one path (a cast and a
    /// broadcast are `Input(0)` stored in the output's type); `None` for every other op.
    pub fn elementwise_expr(&self) -> Option<Expr> {
        let instrs = match self {
            Op::Unary(u) => vec![Instr::Input(0), Instr::Unary(*u, 0)],
            Op::Binary(b) => vec![Instr::Input(0), Instr::Input(1), Instr::Binary(*b, 0, 1)],
            Op::Select => vec![Instr::Input(0), Instr::Input(1), Instr::Input(2), Instr::Select(0, 1, 2)],
            Op::Broadcast { .. } | Op::Cast { .. } => vec![Instr::Input(0)],
            Op::Fused(e) => return Some(e.clone()),
            // Every other op is not elementwise. A new op forgotten here is not computed wrongly:
            // each backend's exhaustive kernel choice must still handle it.
            _ => return None,
        };
        Some(Expr { instrs })
    }

    /// Whether the op is elementwise (a candidate for fused regions).
    pub fn is_elementwise(&self) -> bool {
        matches!(self, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Fused(_))
    }
}
