// Variants of the tensor-core prefill (attention_mma.cuh, prepended), in modules apart from
// attention.cu, one per dtype (attention_var_<t>: this file, then `MMA_VARIANTS(t, T)`): a
// load measures them against the default kernel with KILN_CUDA_TUNE=attention
// (runtime/src/cuda/attn_tune.rs), and a tuning table names the one to use per card and
// shape. The list matches `ATTN_VARIANTS` in attn.rs (a test reads these lines): suffix,
// then D, BK, MT (m16 tiles per warp), ST (2: K+V buffers; 3: ring), PAD, VST.

#define MMAV(t, T, D, BK, SUFFIX, MT, ST, PAD, VST)                                                  \
  extern "C" __global__ void __launch_bounds__(128) attn_mma_##t##_d##D##SUFFIX(const AttnParams p) { pdl_enter(); \
    attn_mma<T, D, BK, MT, ST, PAD, VST>(p);                                                          \
  }
#define MMA_VARIANTS(t, T)                              \
  MMAV(t, T, 72, 64, _s3, 1, 3, true, false)            \
  MMAV(t, T, 72, 64, _np, 1, 2, false, false)           \
  MMAV(t, T, 72, 64, _vs, 1, 2, true, true)             \
  MMAV(t, T, 72, 32, _q128_k32, 2, 2, true, false)      \
  MMAV(t, T, 72, 64, _q128_s3, 2, 3, true, false)       \
  MMAV(t, T, 72, 64, _s3_np_vs, 1, 3, false, true)      \
  MMAV(t, T, 72, 32, _q128_np_vs_k32, 2, 2, false, true) \
  MMAV(t, T, 72, 64, _q128_s3_np_vs, 2, 3, false, true)
