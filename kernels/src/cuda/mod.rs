//! kiln's CUDA C kernels, as source for NVRTC: attention (tensor-core prefill, split-K
//! decode), layer / RMS norm, softmax, strided copy, gather, MoE dispatch / combine, the
//! index and axis ops (cumsum, top-k, take-along-axis, scatter-add, softmax over a middle
//! axis, resize) (`*.cu` beside this file), and the parameter block of the fused elementwise
//! regions ([`fused`]), whose source the compiler generates (`kiln-runtime`).
//!
//! Each `.cu` file is one NVRTC module (with `common.cuh` prepended); each `extern "C"`
//! kernel in it is listed in [`kernels`] with a "hot" flag: a hot kernel runs in every layer,
//! so a register spill in one is a CI failure (`kiln kernels check`).
//!
//! Launch parameters are `#[repr(C)]` structs passed by value ([`AttnParams`] and friends):
//! their layouts must match the structs of the same name in the `.cu` files.

pub mod attn;
pub mod fused;
pub mod gemv;
#[cfg(feature = "cuda")]
pub mod host;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod pdl;

/// Helpers every module includes (half conversions, warp reductions, masks).
pub const COMMON: &str = include_str!("common.cuh");
/// The tensor-core prefill's template, which the attention modules include.
pub const ATTENTION_MMA: &str = include_str!("attention_mma.cuh");

/// One NVRTC compilation unit.
#[derive(Clone, Debug)]
pub struct Module {
    /// Module name (the file stem).
    pub name: String,
    /// Complete CUDA C source (helpers included).
    pub source: String,
    /// The kernels (`extern "C"` symbols) it defines.
    pub kernels: Vec<Kernel>,
}

/// A kernel of a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The `extern "C"` symbol.
    pub name: String,
    /// Runs in every layer of some model: a spill in it fails the check.
    pub hot: bool,
}

/// The dtype suffixes kernels are instantiated for (`f32`, `bf16`, `f16`).
pub const FLOAT_TYPES: [&str; 3] = ["f32", "bf16", "f16"];
/// Head dims with a tensor-core prefill kernel (So400m: 72; SigLIP B: 64; Gemma 2: 128, 256).
pub const MMA_HEAD_DIMS: [usize; 4] = [64, 72, 128, 256];
/// Query rows per block of the tensor-core prefill kernel.
pub const MMA_BQ: usize = 64;
/// Largest head dim of the row (decode) kernel.
pub const ROWS_MAX_D: usize = 256;
/// Threads per block of the row kernels (norms, softmax, copies).
pub const BLOCK: u32 = 256;

/// Key-tile rows of the tensor-core prefill kernel for head dim `d`.
pub fn mma_bk(d: usize) -> usize {
    if d > 128 {
        32
    } else {
        64
    }
}

/// Dynamic shared memory of the tensor-core prefill kernel for head dim `d` (the query tile
/// and two buffers of key/value tiles), in bytes.
pub fn mma_smem(d: usize) -> usize {
    let dp = d.div_ceil(16) * 16;
    (MMA_BQ + 4 * mma_bk(d)) * (dp + 8) * 2
}

/// The dynamic shared memory a kernel needs beyond the default 48 KiB limit, which its
/// function attribute must allow before launch: the tensor-core attention kernels and their
/// variants ([`attn::AttnVariant::smem`]).
pub fn dynamic_smem(kernel: &str) -> Option<usize> {
    // `attn_mma_new_<t>_d<D>` has the default kernel's layout.
    if let Some(default) = kernel.strip_prefix("attn_mma_new_").map(|r| format!("attn_mma_{r}")) {
        return (attn::mma_new_kernel(&default).as_deref() == Some(kernel)).then(|| dynamic_smem(&default)).flatten();
    }
    let (_, d, v) = attn::AttnVariant::of_kernel(kernel)?;
    Some(v.smem(d))
}

fn module(name: &str, body: &str, kernels: Vec<Kernel>) -> Module {
    Module { name: name.to_string(), source: format!("{COMMON}\n{body}"), kernels }
}

fn k(name: String, hot: bool) -> Kernel {
    Kernel { name, hot }
}

/// Whether module `name` is compiled only where a program needs it (the prefill's variants,
/// `attention_var_<t>`), rather than for every cuda program.
pub fn on_demand(name: &str) -> bool {
    name.starts_with("attention_var_")
}

/// Every hand-written module with its kernels; [`on_demand`] says which of them a program
/// needs only when it launches one of their kernels.
pub fn modules() -> Vec<Module> {
    let mut att = Vec::new();
    for t in FLOAT_TYPES {
        att.push(k(format!("attn_rows_{t}"), true));
        att.push(k(format!("attn_combine_{t}"), true));
        att.push(k(format!("attn_rows1_{t}"), true));
        att.push(k(format!("attn_rows_new_{t}"), true));
        att.push(k(format!("attn_rows1_new_{t}"), true));
    }
    for t in ["bf16", "f16"] {
        for d in MMA_HEAD_DIMS {
            att.push(k(format!("attn_mma_{t}_d{d}"), true));
        }
        for d in MMA_HEAD_DIMS {
            att.extend(attn::mma_new_kernel(&format!("attn_mma_{t}_d{d}")).map(|n| k(n, true)));
        }
    }
    let mut norm = Vec::new();
    for t in FLOAT_TYPES {
        for n in ["layer_norm", "rms_norm", "softmax", "layer_norm_warp", "rms_norm_warp", "residual_rms_norm"] {
            norm.push(k(format!("{n}_{t}"), true));
        }
    }
    let mut data = Vec::new();
    for b in [1, 2, 4, 8] {
        data.push(k(format!("copy_b{b}"), true));
        data.push(k(format!("copy_b{b}_x2"), true));
        data.push(k(format!("copy_b{b}_x4"), true));
    }
    for it in ["i32", "i64"] {
        for b in [1, 2, 4, 8] {
            data.push(k(format!("gather_b{b}_{it}"), false));
            data.push(k(format!("write_rows_b{b}_{it}"), false));
            data.push(k(format!("write_rows_b{b}_{it}_x2"), false));
        }
        for t in FLOAT_TYPES {
            data.push(k(format!("gather_scaled_{t}_{it}"), false));
        }
    }
    for it in ["i32", "i64"] {
        for t in FLOAT_TYPES {
            data.push(k(format!("moe_dispatch_{t}_{it}"), false));
            data.push(k(format!("moe_combine_{t}_{it}"), false));
        }
    }
    for t in FLOAT_TYPES {
        data.push(k(format!("reduce_{t}"), false));
    }
    for t in ["f32", "bf16", "f16", "i32", "i64"] {
        data.push(k(format!("iota_{t}"), false));
    }
    let attention = format!("{ATTENTION_MMA}\n{}", include_str!("attention.cu"));
    let mut v = vec![
        module("attention", &attention, att),
        module("norm", include_str!("norm.cu"), norm),
        module("data", include_str!("data.cu"), data),
        module("index", include_str!("index.cu"), index_kernels()),
        gemv::gemv_module(),
    ];
    for (t, ty) in [("bf16", "bf16"), ("f16", "f16")] {
        let kernels =
            attn::ATTN_VARIANTS.iter().filter_map(|&(d, tag)| attn::AttnVariant::parse(tag).map(|a| k(a.kernel(t, d), true))).collect();
        let body = format!("{ATTENTION_MMA}\n{}\nMMA_VARIANTS({t}, {ty})\n", include_str!("attention_var.cu"));
        v.push(module(&format!("attention_var_{t}"), &body, kernels));
    }
    v
}

/// Element types of cumsum and scatter-add (`bool` sums to "any").
pub const SUM_TYPES: [&str; 7] = ["f32", "bf16", "f16", "i32", "i64", "u8", "bool"];
/// Element types of top-k's input (a `bool` input uses `u8`'s kernel).
pub const TOPK_TYPES: [&str; 6] = ["f32", "bf16", "f16", "i32", "i64", "u8"];

/// The kernels of `index.cu`: none runs in every layer.
fn index_kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for t in SUM_TYPES {
        v.push(k(format!("cumsum_{t}"), false));
    }
    for t in TOPK_TYPES {
        v.push(k(format!("topk_{t}"), false));
    }
    for it in ["i32", "i64"] {
        for b in [1, 2, 4, 8] {
            v.push(k(format!("take_along_b{b}_{it}"), false));
        }
        for t in SUM_TYPES {
            v.push(k(format!("scatter_add_{t}_{it}"), false));
        }
    }
    for t in FLOAT_TYPES {
        v.push(k(format!("softmax_axis_{t}"), false));
        v.push(k(format!("resize_{t}"), false));
    }
    v.push(k("sample_token_f32".to_string(), false));
    v.push(k("sample_token_log_prob_f32".to_string(), false));
    v.push(k("log_softmax_f32".to_string(), false));
    for it in ["i32", "i64"] {
        v.push(k(format!("token_log_prob_f32_{it}"), false));
    }
    v
}

/// The module that defines kernel `name` (hand-written modules only).
pub fn module_of(name: &str) -> Option<String> {
    modules().into_iter().find(|m| m.kernels.iter().any(|k| k.name == name)).map(|m| m.name)
}

/// Device address of a buffer (a `CUdeviceptr`), as the kernels' parameter structs hold it.
pub type DevPtr = u64;

/// Parameters of every attention kernel (`AttnParams` in `common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttnParams {
    pub q: DevPtr,
    pub k: DevPtr,
    pub v: DevPtr,
    pub mask: DevPtr,
    pub out: DevPtr,
    /// Split-K scratch (f32), `B*Sq*Hq*splits*(Dv+2)` values.
    pub partial: DevPtr,
    /// A position mask's operands (i64): the start `[1]`, `keep [B, Sk]`, `prefix [B]`; 0 when absent.
    pub pos: DevPtr,
    pub keep: DevPtr,
    pub prefix: DevPtr,
    pub batch: i32,
    pub sq: i32,
    pub sk: i32,
    pub hq: i32,
    pub hkv: i32,
    pub d: i32,
    pub dv: i32,
    /// 0 none, 1 causal, 2 sliding window, 3 additive, 4 positions.
    pub mask_kind: i32,
    pub q_offset: i32,
    pub window: i32,
    pub splits: i32,
    pub pad: i32,
    pub scale: f32,
    /// `<= 0`: no soft-cap.
    pub softcap: f32,
    /// `attn_rows1_*`'s count of finished splits, a u32 per output row (`B*Sq*Hq`), zero
    /// between launches; 0 when absent. Last, so CUBINs compiled before it read the fields
    /// above at their offsets.
    pub counters: DevPtr,
    /// `attn_rows_new_*` / `attn_rows1_new_*`: K's new rows `[B, n, Hkv, D]`, read for keys
    /// `[at, at + n)` and stored into the cache `k` there; 0 for the other kernels.
    pub new_k: DevPtr,
    /// V's new rows `[B, n, Hkv, Dv]`, likewise into `v`.
    pub new_v: DevPtr,
    /// The 1-element index holding `at` (i64 where `at_i64` is 1, else i32).
    pub at: DevPtr,
    /// An `int` flag set to 1 where `at + n` does not fit the cache (as `write_rows` sets it).
    pub err: DevPtr,
    pub at_i64: i32,
    /// New rows per batch row.
    pub n: i32,
    /// `attn_mma_new_*` (prefill, `Sq == Sk`): the K cache `[B, cache_rows, Hkv, D]` into
    /// which the launch stores its keys `k` at rows `[at, at + Sk)` (`at`, `at_i64` and `err`
    /// as above); 0 for the other kernels. After `n`, so CUBINs compiled before it read the
    /// fields above at their offsets.
    pub cache_k: DevPtr,
    /// The V cache, likewise for the values `v`.
    pub cache_v: DevPtr,
    /// The caches' rows per batch row.
    pub cache_rows: i32,
    pub pad2: i32,
}

/// Parameters of layer norm, RMS norm and softmax (`NormParams` in `norm.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NormParams {
    pub x: DevPtr,
    pub w: DevPtr,
    pub b: DevPtr,
    pub out: DevPtr,
    pub rows: i32,
    pub d: i32,
    pub eps: f32,
    pub add_one: i32,
}

/// Parameters of the residual junction between two RMS norms (`ResidualNormParams` in
/// `norm.cu`): `w_post` is read only when `post` is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ResidualNormParams {
    pub x: DevPtr,
    pub o: DevPtr,
    pub w_post: DevPtr,
    pub w_pre: DevPtr,
    pub out: DevPtr,
    pub rows: i32,
    pub rows_pad: i32,
    pub d: i32,
    pub eps: f32,
    pub add_one: i32,
    pub post: i32,
}

/// Largest rank of a strided copy.
pub const MAX_RANK: usize = 8;

/// Parameters of the strided copy (`CopyParams` in `data.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CopyParams {
    pub src: DevPtr,
    pub dst: DevPtr,
    pub n: i64,
    pub rank: i32,
    pub pad: i32,
    pub dims: [i64; MAX_RANK],
    pub src_st: [i64; MAX_RANK],
    pub dst_st: [i64; MAX_RANK],
}

/// Parameters of the gather (`GatherParams` in `data.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GatherParams {
    pub x: DevPtr,
    pub idx: DevPtr,
    pub out: DevPtr,
    /// An `int` flag set to 1 when an index is out of range (0: not reported).
    pub err: DevPtr,
    pub outer: i64,
    pub len: i64,
    pub nidx: i64,
    pub inner: i64,
}

/// Parameters of the gather times a scale (`ScaledGatherParams` in `data.cu`): the gather's,
/// then the scale (a value of the table's dtype).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScaledGatherParams {
    pub g: GatherParams,
    pub scale: f32,
    pub pad: i32,
}

/// Parameters of MoE dispatch and combine (`MoeParams` in `data.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MoeParams {
    pub x: DevPtr,
    pub slot: DevPtr,
    pub w: DevPtr,
    pub out: DevPtr,
    pub tokens: i32,
    pub k: i32,
    pub d: i32,
    pub rows: i32,
}

/// Parameters of the reduction (`ReduceParams` in `data.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReduceParams {
    pub x: DevPtr,
    pub out: DevPtr,
    pub nout: i64,
    pub nred: i64,
    pub rank_o: i32,
    pub rank_r: i32,
    /// 0 sum, 1 mean, 2 max, 3 min.
    pub op: i32,
    pub pad: i32,
    pub dims_o: [i64; MAX_RANK],
    pub st_o: [i64; MAX_RANK],
    pub dims_r: [i64; MAX_RANK],
    pub st_r: [i64; MAX_RANK],
}

/// Parameters of iota (`IotaParams` in `data.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IotaParams {
    pub out: DevPtr,
    pub n: i64,
    pub inner: i64,
    pub len: i64,
    pub start: f64,
    pub step: f64,
}

/// Lines along the middle axis of `[outer, len, inner]`: cumsum and softmax over an axis
/// (`LineParams` in `index.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LineParams {
    pub x: DevPtr,
    pub out: DevPtr,
    pub outer: i64,
    pub len: i64,
    pub inner: i64,
    /// cumsum: position `i` holds the sum before it.
    pub exclusive: i32,
    pub pad: i32,
}

/// Top-k indices along the last axis (`TopkParams` in `index.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TopkParams {
    pub x: DevPtr,
    /// i64 `[rows, k]`.
    pub out: DevPtr,
    pub rows: i64,
    pub d: i64,
    pub k: i64,
}

/// The next token per row (`SampleParams` in `index.cu`): f32 logits `x [rows, v]`, the
/// options (f32 `[2]`), counters (i64 `[4]`), streams (i64 `[rows]`), ids `out` (i64
/// `[rows]`), the error flag, and a scratch of `rows * v` i32 (top-p's order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleParams {
    pub x: DevPtr,
    pub opts: DevPtr,
    pub ctr: DevPtr,
    pub streams: DevPtr,
    pub out: DevPtr,
    pub err: DevPtr,
    pub scratch: DevPtr,
    pub rows: i64,
    pub v: i64,
}

/// Take-along-axis and scatter-add (`AlongParams` in `index.cu`): `x` (scatter's base)
/// `[outer, len, inner]`, `idx` and `src` `[outer, ilen, inner]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AlongParams {
    pub x: DevPtr,
    pub idx: DevPtr,
    /// Scatter-add's values (0 for take-along-axis).
    pub src: DevPtr,
    pub out: DevPtr,
    /// An `int` flag set to 1 when an index is out of range.
    pub err: DevPtr,
    pub outer: i64,
    pub len: i64,
    pub ilen: i64,
    pub inner: i64,
}

/// Resampling of the last two axes (`ResizeParams` in `index.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ResizeParams {
    pub x: DevPtr,
    pub out: DevPtr,
    pub planes: i64,
    pub ih: i64,
    pub iw: i64,
    pub oh: i64,
    pub ow: i64,
    /// 1 bicubic, 0 bilinear.
    pub cubic: i32,
    pub pad: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_in_its_module() {
        for m in modules() {
            for k in &m.kernels {
                let sym = format!(" {}(", k.name);
                let defined = m.source.contains(&sym) || macro_defines(&m.source, &k.name);
                assert!(defined, "{} is listed for module {} but not defined there", k.name, m.name);
            }
        }
    }

    /// Kernels come from macros (`ROWS(bf16, bf16)` defines `attn_rows_bf16`): checks the
    /// instantiation line exists.
    fn macro_defines(src: &str, name: &str) -> bool {
        let inst = |prefix: &str, args: &str| name.starts_with(prefix) && src.contains(args);
        let parts: Vec<&str> = name.split('_').collect();
        match parts.as_slice() {
            ["attn", "rows" | "combine" | "rows1", t] | ["attn", "rows" | "rows1", "new", t] => {
                src.contains(&format!("ROWS({t},")) && src.contains(&format!("{}##t(", &name[..name.len() - t.len()]))
            }
            ["attn", "mma", "new", t, d] => {
                src.contains(&format!("MMA_NEW({t}, {}, {},", if *t == "bf16" { "bf16" } else { "f16" }, &d[1..]))
                    && src.contains("attn_mma_new_##t##_d##D(")
            }
            ["attn", "mma" | "mma2", t, d] => {
                src.contains(&format!("MMA({t}, {}, {},", if *t == "bf16" { "bf16" } else { "f16" }, &d[1..]))
            }
            ["attn", "mma", t, _, _, ..] => {
                let Some((_, d, v)) = attn::AttnVariant::of_kernel(name) else { return false };
                src.contains(&format!("MMA_VARIANTS({t},")) && src.contains(&variant_line(d, v))
            }
            ["layer" | "rms", "norm", t] | ["softmax", t] => src.contains(&format!("NORMS({t},")),
            ["layer" | "rms", "norm", "warp", t] => src.contains(&format!("NORMS_WARP({t},")),
            ["residual", "rms", "norm", t] => src.contains(&format!("RESIDUAL({t},")),
            // A pair entry (`_x2`) is defined by its kernel's macro, beside the kernel.
            [.., "x2"] => src.contains("##_x2(") && macro_defines(src, &name[..name.len() - 3]),
            [.., "x4"] => src.contains("##_x4(") && macro_defines(src, &name[..name.len() - 3]),
            ["copy", b] => inst("copy", &format!("COPY({},", &b[1..])),
            ["gather", b, it] => src.contains(&format!("GATHER({},", &b[1..])) && src.contains(&format!(", {it}, ")),
            ["reduce", t] => src.contains(&format!("RED({t},")),
            ["iota", t] => src.contains(&format!("IOTA({t},")),
            ["write", "rows", b, it] => {
                src.lines().any(|l| l.starts_with(&format!("WRITE_ROWS({},", &b[1..])) && l.contains(&format!(", {it}, ")))
            }
            ["moe", "dispatch" | "combine", t, it] => src.contains(&format!("MOE({t}, ")) && src.contains(&format!(", {it}, ")),
            ["cumsum", t] => src.contains(&format!("CUMSUM({t},")),
            ["topk", t] => src.contains(&format!("TOPK({t},")),
            ["take", "along", b, it] => {
                src.lines().any(|l| l.starts_with(&format!("TAKE_ALONG({},", &b[1..])) && l.contains(&format!(", {it}, ")))
            }
            ["scatter", "add", t, it] => {
                src.lines().any(|l| l.starts_with(&format!("SCATTER_ADD({t},")) && l.contains(&format!(", {it}, ")))
            }
            ["softmax", "axis", t] | ["resize", t] => src.contains(&format!("AXIS_FLOAT({t},")),
            ["sample", "token", "f32"] => src.contains("void __launch_bounds__(256) sample_token_f32("),
            ["sample", "token", "log", "prob", "f32"] => src.contains("void __launch_bounds__(256) sample_token_log_prob_f32("),
            ["log", "softmax", "f32"] => src.contains("void __launch_bounds__(256) log_softmax_f32("),
            ["token", "log", "prob", "f32", it] => src.contains(&format!("void __launch_bounds__(256) token_log_prob_f32_{it}(")),
            ["gather", "scaled", t, it] => {
                src.lines().any(|l| l.starts_with(&format!("GATHER_SCALED({t},")) && l.contains(&format!(", {it}, ")))
            }
            _ => false,
        }
    }

    /// The `MMAV` line of `attention_var.cu` that instantiates variant `v` at head dim `d`.
    fn variant_line(d: usize, v: attn::AttnVariant) -> String {
        let (mt, st) = (if v.q128 { 2 } else { 1 }, if v.s3 { 3 } else { 2 });
        format!("MMAV(t, T, {d}, {}, _{}, {mt}, {st}, {}, {})", v.bk(d), v.tag(), !v.np, v.vs)
    }

    #[test]
    fn the_variant_list_matches_the_instantiations() {
        let src = include_str!("attention_var.cu");
        let lines: Vec<&str> = src.lines().map(str::trim).filter(|l| l.starts_with("MMAV(t, T,")).collect();
        assert_eq!(lines.len(), attn::ATTN_VARIANTS.len(), "{lines:?}");
        for &(d, tag) in attn::ATTN_VARIANTS {
            let line = variant_line(d, attn::AttnVariant::parse(tag).unwrap());
            assert!(lines.iter().any(|l| l.starts_with(&line)), "no `{line}` in attention_var.cu");
        }
        let var: Vec<Module> = modules().into_iter().filter(|m| on_demand(&m.name)).collect();
        assert_eq!(var.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["attention_var_bf16", "attention_var_f16"]);
        for m in &var {
            assert_eq!(m.kernels.len(), attn::ATTN_VARIANTS.len());
            assert!(m.kernels.iter().all(|k| k.hot && attn::attn_kernel_exists(&k.name)));
        }
        assert!(!on_demand("attention"));
    }

    #[test]
    fn param_structs_have_the_c_layout() {
        assert_eq!(std::mem::size_of::<AttnParams>(), 9 * 8 + 12 * 4 + 2 * 4 + 8 + 4 * 8 + 2 * 4 + 2 * 8 + 2 * 4);
        // The fields older CUBINs read keep their offsets; the counters follow them, then the
        // new rows' fields.
        assert_eq!(std::mem::offset_of!(AttnParams, softcap), 124);
        assert_eq!(std::mem::offset_of!(AttnParams, counters), 128);
        assert_eq!(std::mem::offset_of!(AttnParams, new_k), 136);
        assert_eq!(std::mem::offset_of!(AttnParams, err), 160);
        assert_eq!(std::mem::offset_of!(AttnParams, n), 172);
        assert_eq!(std::mem::offset_of!(AttnParams, cache_k), 176);
        assert_eq!(std::mem::offset_of!(AttnParams, cache_rows), 192);
        assert_eq!(std::mem::size_of::<NormParams>(), 4 * 8 + 4 * 4);
        assert_eq!(std::mem::size_of::<ResidualNormParams>(), 5 * 8 + 6 * 4);
        assert_eq!(std::mem::size_of::<CopyParams>(), 3 * 8 + 2 * 4 + 3 * 8 * 8);
        assert_eq!(std::mem::size_of::<GatherParams>(), 8 * 8);
        assert_eq!(std::mem::size_of::<ScaledGatherParams>(), 8 * 8 + 2 * 4);
        assert_eq!(std::mem::size_of::<MoeParams>(), 4 * 8 + 4 * 4);
        assert_eq!(std::mem::size_of::<LineParams>(), 5 * 8 + 2 * 4);
        assert_eq!(std::mem::size_of::<TopkParams>(), 5 * 8);
        assert_eq!(std::mem::size_of::<SampleParams>(), 9 * 8);
        assert_eq!(std::mem::size_of::<AlongParams>(), 9 * 8);
        assert_eq!(std::mem::size_of::<ResizeParams>(), 7 * 8 + 2 * 4);
    }

    /// The `_x2` entries (two launches as one) read their parameter blocks where they lie: no
    /// copy to a stack frame, which an indexed `p.p[blockIdx.y]` of a row write would make.
    #[cfg(feature = "cuda")]
    #[test]
    fn pair_entries_need_no_stack() {
        if !nvrtc::available() {
            assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "{}", nvrtc::INSTALL_HINT);
            return;
        }
        let data = modules().into_iter().find(|m| m.name == "data").unwrap();
        let c = nvrtc::compile("data", &data.source, "sm_90a").unwrap();
        let pairs: Vec<_> = c.kernels.iter().filter(|(k, _)| k.ends_with("_x2") || k.ends_with("_x4")).collect();
        assert_eq!(pairs.len(), 16, "{:?}", c.kernels);
        for (k, r) in pairs {
            assert!(r.stack == 0 && r.spill_stores == 0, "{k}: {r:?}");
        }
    }

    #[test]
    fn prefill_shared_memory_fits_hopper() {
        for d in MMA_HEAD_DIMS {
            assert!(mma_smem(d) <= 227 * 1024, "d {d}: {} bytes", mma_smem(d));
        }
        assert_eq!(mma_smem(72), (64 + 4 * 64) * 88 * 2);
        assert_eq!(dynamic_smem("attn_mma_bf16_d256"), Some(mma_smem(256)));
        assert_eq!(dynamic_smem("attn_mma_bf16_d72_q128_s3"), Some((128 + 3 * 64) * 88 * 2));
        assert_eq!(dynamic_smem("attn_rows_bf16"), None);
        // The entry that also stores the keys and values: the default kernel's layout.
        assert_eq!(dynamic_smem("attn_mma_new_f16_d128"), Some(mma_smem(128)));
        assert_eq!(dynamic_smem("attn_mma_new_bf16_d72_s3"), None);
    }
}
