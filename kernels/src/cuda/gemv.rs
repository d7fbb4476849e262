//! The small-M GEMV (`gemv.cu`): `out[m, n] = epilogue(sum_k a[m, k] * b[n, k])` for
//! `M <= 8` against weights `[N, K]` (a matmul with `transpose_b`), the alternative to a
//! cuBLASLt GEMM for decode. [`plan`] says whether it applies and how it is launched.

use super::{k, module, DevPtr, Kernel, Module};

/// Most rows (`M`) the GEMV takes.
pub const MAX_M: usize = 8;
/// Most warps per block (`GEMV_MAX_WARPS` in `gemv.cu`): the K split inside a block.
pub const MAX_WARPS: usize = 16;
/// Epilogue flags of [`GemvParams::flags`].
pub const BIAS: i32 = 1;
pub const GELU: i32 = 2;
pub const RESIDUAL: i32 = 4;
/// A gated matmul (`gemv_glu_*`): `out = T(gelu_tanh(T(a b^T))) * T(a b2^T)`, no other flag.
pub const GLU: i32 = 8;
/// Prefetch this warp's weight rows into L2 before `pdl_wait()` (set on launches with
/// programmatic dependent launch, `CudaBackend::pdl`; the result does not change).
pub const PREFETCH: i32 = 16;

/// Sets [`PREFETCH`] in the bytes of a [`GemvParams`] (a launch's parameter block); `false`
/// where `params` is too short to hold one.
pub fn set_prefetch(params: &mut [u8]) -> bool {
    let at = std::mem::offset_of!(GemvParams, flags);
    let Some(b) = params.get_mut(at..at + 4) else { return false };
    let flags = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) | PREFETCH;
    b.copy_from_slice(&flags.to_le_bytes());
    true
}

/// Streaming multiprocessors the launch geometry fills (H100 / H200 SXM: 132).
const SMS: usize = 132;
/// Warps per SM the geometry aims at: enough 16-byte loads in flight to cover HBM latency.
const WARPS_PER_SM: usize = 16;

/// Parameters of every GEMV (`GemvParams` in `gemv.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GemvParams {
    pub a: DevPtr,
    pub b: DevPtr,
    pub out: DevPtr,
    /// `bias[n]` (0 without [`BIAS`]).
    pub bias: DevPtr,
    /// `residual[m, n]`, the output's shape (0 without [`RESIDUAL`]).
    pub res: DevPtr,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub flags: i32,
    /// Chunks of K per warp (64 elements for half types, 128 for f32).
    pub kchunks: i32,
    pub pad: i32,
    /// With [`GLU`]: the second product's weights `[N, K]` (0 otherwise).
    pub b2: DevPtr,
}

/// How one GEMV is launched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub kernel: String,
    pub grid: u32,
    pub block: u32,
    pub kchunks: i32,
}

/// The launch of an `[m, k] x [n, k]^T` GEMV of elements of `esize` bytes (`suffix`: `f32`,
/// `bf16`, `f16`), or `None` where it does not apply: `m` above [`MAX_M`], rows that are not
/// a multiple of 16 bytes, an empty or too large shape, a dtype without a kernel. The caller
/// checks that the addresses are 16-byte aligned.
pub fn plan(suffix: &str, m: usize, n: usize, k: usize) -> Option<Plan> {
    let (esize, tile, chunk) = match suffix {
        "bf16" | "f16" => (2, 16, 64),
        "f32" => (4, 4, 128),
        _ => return None,
    };
    if m == 0 || m > MAX_M || n == 0 || k == 0 || !(k * esize).is_multiple_of(16) || n > i32::MAX as usize || k > i32::MAX as usize / 2 {
        return None;
    }
    let tiles = n.div_ceil(tile);
    if tiles > i32::MAX as usize {
        return None;
    }
    let chunks = k.div_ceil(chunk);
    // Warps per block: split K until the grid holds ~16 warps per SM, at least 4 warps
    // where K has the chunks for it, each warp with 2 or more chunks when it can.
    let mut warps = 1;
    while warps < MAX_WARPS && (tiles * warps < SMS * WARPS_PER_SM || warps < 4) && chunks >= 4 * warps {
        warps *= 2;
    }
    let kchunks = chunks.div_ceil(warps);
    let warps = chunks.div_ceil(kchunks);
    let kernel = if esize == 2 { format!("gemv_tb_{suffix}") } else { format!("gemv_tb_f32_m{m}") };
    Some(Plan { kernel, grid: tiles as u32, block: 32 * warps as u32, kchunks: kchunks as i32 })
}

/// The module and its kernels (all hot: they run in every decoder layer).
pub fn gemv_module() -> Module {
    let mut ks: Vec<Kernel> = vec![k("gemv_tb_bf16".into(), true), k("gemv_tb_f16".into(), true)];
    // Half operands, the f32 accumulator written (a bf16 head whose epilogue ends in f32).
    ks.extend(["gemv_tb_bf16_to_f32", "gemv_tb_f16_to_f32"].map(|n| k(n.into(), true)));
    // A GLU's gate and up products and `gelu(gate) * up` in one launch (`Op::GatedMatMul`).
    ks.extend(["gemv_glu_bf16", "gemv_glu_f16"].map(|n| k(n.into(), true)));
    ks.extend((1..=MAX_M).map(|m| k(format!("gemv_tb_f32_m{m}"), true)));
    module("gemv", include_str!("gemv.cu"), ks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_have_the_c_layout() {
        assert_eq!(std::mem::size_of::<GemvParams>(), 6 * 8 + 6 * 4);
    }

    #[test]
    fn prefetch_sets_the_flag_and_keeps_the_rest() {
        let p = GemvParams { m: 3, n: 7, k: 64, flags: BIAS | RESIDUAL, kchunks: 2, b2: 9, ..Default::default() };
        // SAFETY: a `#[repr(C)]` struct of integers, read as its bytes.
        let mut bytes =
            unsafe { std::slice::from_raw_parts(&p as *const GemvParams as *const u8, std::mem::size_of::<GemvParams>()) }.to_vec();
        assert!(set_prefetch(&mut bytes));
        // SAFETY: as many bytes as the struct, any bit pattern valid; read unaligned.
        let q: GemvParams = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const GemvParams) };
        assert_eq!(q, GemvParams { flags: BIAS | RESIDUAL | PREFETCH, ..p });
        assert!(!set_prefetch(&mut bytes[..20]));
    }

    #[test]
    fn decode_shapes_fill_the_gpu() {
        // Gemma 2 2B: gate/up, down, q, logits.
        for (n, k) in [(9216, 2304), (2304, 9216), (2048, 2304), (256_000, 2304)] {
            let p = plan("bf16", 1, n, k).unwrap();
            let warps = p.grid as usize * p.block as usize / 32;
            assert!(warps >= SMS * 8, "{n}x{k}: {warps} warps");
            assert!(p.block <= 32 * MAX_WARPS as u32 && p.block >= 128, "{n}x{k}: block {}", p.block);
            let chunks = k.div_ceil(64);
            assert!(p.kchunks as usize * (p.block as usize / 32) >= chunks, "{n}x{k}: K not covered");
            assert!((p.kchunks as usize) * (p.block as usize / 32 - 1) < chunks, "{n}x{k}: an idle warp");
        }
        assert_eq!(plan("bf16", 1, 9216, 2304).unwrap().grid, 576);
        assert_eq!(plan("f32", 3, 100, 36).unwrap().kernel, "gemv_tb_f32_m3");
    }

    #[test]
    fn unaligned_rows_and_large_m_fall_back() {
        assert!(plan("bf16", 1, 64, 100).is_none(), "100 bf16 = 200 bytes, not a multiple of 16");
        assert!(plan("f32", 1, 64, 100).is_some());
        assert!(plan("bf16", 9, 64, 64).is_none());
        assert!(plan("i32", 1, 64, 64).is_none());
        let p = plan("bf16", 8, 5, 8).unwrap();
        assert_eq!((p.grid, p.block, p.kchunks), (1, 32, 1));
    }
}
