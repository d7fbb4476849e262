// Row-wise kernels over the last axis: layer norm, RMS norm, softmax. One block of 256
// threads per row; statistics in f32; the row is read from global memory (L1/L2) per pass.

struct NormParams {
  i64 x, w, b, out;
  int rows, d;
  float eps;
  int add_one;  // RMS norm: scale by (1 + w) (Gemma) instead of w
};

template <typename T>
__device__ void layer_norm(const NormParams p) {
  __shared__ float red[32];
  const T* x = (const T*)p.x + (i64)blockIdx.x * p.d;
  float s = 0.0f;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) s += to_f32(x[c]);
  const float mean = block_sum(s, red) / p.d;
  float v = 0.0f;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
    float z = to_f32(x[c]) - mean;
    v += z * z;
  }
  const float inv = rsqrtf(block_sum(v, red) / p.d + p.eps);
  const T* w = (const T*)p.w;
  const T* bias = (const T*)p.b;
  T* o = (T*)p.out + (i64)blockIdx.x * p.d;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x)
    o[c] = from_f32<T>((to_f32(x[c]) - mean) * inv * to_f32(w[c]) + to_f32(bias[c]));
}

template <typename T>
__device__ void rms_norm(const NormParams p) {
  __shared__ float red[32];
  const T* x = (const T*)p.x + (i64)blockIdx.x * p.d;
  float s = 0.0f;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
    float z = to_f32(x[c]);
    s += z * z;
  }
  const float inv = rsqrtf(block_sum(s, red) / p.d + p.eps);
  const T* w = (const T*)p.w;
  T* o = (T*)p.out + (i64)blockIdx.x * p.d;
  const float one = p.add_one ? 1.0f : 0.0f;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) o[c] = from_f32<T>(to_f32(x[c]) * inv * (one + to_f32(w[c])));
}

template <typename T>
__device__ void softmax(const NormParams p) {
  __shared__ float red[32];
  const T* x = (const T*)p.x + (i64)blockIdx.x * p.d;
  float mx = -KILN_INF;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) mx = fmaxf(mx, to_f32(x[c]));
  mx = block_max(mx, red);
  float s = 0.0f;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) s += __expf(to_f32(x[c]) - mx);
  const float inv = 1.0f / block_sum(s, red);
  T* o = (T*)p.out + (i64)blockIdx.x * p.d;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) o[c] = from_f32<T>(__expf(to_f32(x[c]) - mx) * inv);
}

#define NORMS(t, T)                                                                                       \
  extern "C" __global__ void __launch_bounds__(256) layer_norm_##t(const NormParams p) { pdl_enter(); layer_norm<T>(p); } \
  extern "C" __global__ void __launch_bounds__(256) rms_norm_##t(const NormParams p) { pdl_enter(); rms_norm<T>(p); }     \
  extern "C" __global__ void __launch_bounds__(256) softmax_##t(const NormParams p) { pdl_enter(); softmax<T>(p); }
NORMS(f32, float)
NORMS(bf16, bf16)
NORMS(f16, f16)

// Warp-per-row variants (issue 15's tuning sweep): each warp owns one row, held in registers
// as 16-byte vectors (VE elements each, at most MAXV vectors per lane), so x is read from
// global memory once and the statistics need only shuffles. Rows need d a multiple of VE,
// d / VE <= 32 * MAXV, and 16-byte aligned rows, weights and output (the lowering checks).
// Chosen per (card, shape) from the tuning table, after the device check compared them with
// the block kernels above.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4 v, float* f) {
  const T* e = (const T*)&v;
#pragma unroll
  for (int j = 0; j < (int)(16 / sizeof(T)); j++) f[j] = to_f32(e[j]);
}
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* f) {
  uint4 v;
  T* e = (T*)&v;
#pragma unroll
  for (int j = 0; j < (int)(16 / sizeof(T)); j++) e[j] = from_f32<T>(f[j]);
  return v;
}

template <typename T, int MAXV, bool LAYER>
__device__ void norm_warp(const NormParams p) {
  constexpr int VE = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  if (row >= p.rows) return;
  const int nv = p.d / VE;
  const uint4* x = (const uint4*)((const T*)p.x + (i64)row * p.d);
  uint4 r[MAXV];
  float s = 0.0f, q = 0.0f;
#pragma unroll
  for (int i = 0; i < MAXV; i++) {
    const int v = lane + i * 32;
    if (v < nv) {
      r[i] = x[v];
      float f[VE];
      unpack16<T>(r[i], f);
#pragma unroll
      for (int j = 0; j < VE; j++) {
        s += f[j];
        q += f[j] * f[j];
      }
    }
  }
  float mean = 0.0f, inv;
  if (LAYER) {
    mean = warp_sum(s) / p.d;
    // The variance as the block kernel takes it: the mean of squared deviations (two passes
    // over the registers, not E[x^2] - mean^2).
    float v2 = 0.0f;
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
      if (lane + i * 32 < nv) {
        float f[VE];
        unpack16<T>(r[i], f);
#pragma unroll
        for (int j = 0; j < VE; j++) v2 += (f[j] - mean) * (f[j] - mean);
      }
    }
    inv = rsqrtf(warp_sum(v2) / p.d + p.eps);
  } else {
    inv = rsqrtf(warp_sum(q) / p.d + p.eps);
  }
  const uint4* w = (const uint4*)p.w;
  const uint4* b = (const uint4*)p.b;
  uint4* o = (uint4*)((T*)p.out + (i64)row * p.d);
  const float one = p.add_one ? 1.0f : 0.0f;
#pragma unroll
  for (int i = 0; i < MAXV; i++) {
    const int v = lane + i * 32;
    if (v < nv) {
      float f[VE], g[VE], y[VE];
      unpack16<T>(r[i], f);
      unpack16<T>(w[v], g);
      if (LAYER) {
        float c[VE];
        unpack16<T>(b[v], c);
#pragma unroll
        for (int j = 0; j < VE; j++) y[j] = (f[j] - mean) * inv * g[j] + c[j];
      } else {
#pragma unroll
        for (int j = 0; j < VE; j++) y[j] = f[j] * inv * (one + g[j]);
      }
      o[v] = pack16<T>(y);
    }
  }
}

// MAXV 12: rows up to 3072 bf16/f16 elements or 1536 f32 (Gemma 2 2B's 2304, So400m's 1152).
#define NORMS_WARP(t, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(256) layer_norm_warp_##t(const NormParams p) { pdl_enter();            \
    norm_warp<T, 12, true>(p);                                                                            \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(256) rms_norm_warp_##t(const NormParams p) { pdl_enter(); norm_warp<T, 12, false>(p); }
NORMS_WARP(f32, float)
NORMS_WARP(bf16, bf16)
NORMS_WARP(f16, f16)

// A residual add between two RMS norms (kiln's `residual_rms_norm` op), one block per output
// row: row r < rows writes h = x + rms_norm(o, w_post) (x + o without post) into out row r and
// rms_norm(h, w_pre) into out row rows_pad + r; the other rows (r >= rows) write zeros. Each
// value is rounded to T where the unfused kernels store it, with their loops and reductions,
// so both halves equal what rms_norm_T, the fused add and rms_norm_T give (the add is
// __fadd_rn: never contracted with the norm's product into an FMA).
struct ResidualNormParams {
  i64 x, o, w_post, w_pre, out;
  int rows, rows_pad, d;
  float eps;
  int add_one, post;
};

template <typename T>
__device__ void residual_rms_norm(const ResidualNormParams p) {
  __shared__ float red[32];
  const int r = blockIdx.x;
  T* h = (T*)p.out + (i64)r * p.d;
  T* n = (T*)p.out + ((i64)p.rows_pad + r) * p.d;
  if (r >= p.rows) {
    for (int c = threadIdx.x; c < p.d; c += blockDim.x) h[c] = n[c] = from_f32<T>(0.0f);
    return;
  }
  const T* x = (const T*)p.x + (i64)r * p.d;
  const T* o = (const T*)p.o + (i64)r * p.d;
  const float one = p.add_one ? 1.0f : 0.0f;
  float inv = 0.0f;
  if (p.post) {
    float s = 0.0f;
    for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
      float z = to_f32(o[c]);
      s += z * z;
    }
    inv = rsqrtf(block_sum(s, red) / p.d + p.eps);
  }
  const T* wp = (const T*)p.w_post;
  float s = 0.0f;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
    const float add = p.post ? to_f32(from_f32<T>(to_f32(o[c]) * inv * (one + to_f32(wp[c])))) : to_f32(o[c]);
    const T v = from_f32<T>(__fadd_rn(to_f32(x[c]), add));
    h[c] = v;
    const float z = to_f32(v);
    s += z * z;
  }
  const float inv2 = rsqrtf(block_sum(s, red) / p.d + p.eps);
  const T* w = (const T*)p.w_pre;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) n[c] = from_f32<T>(to_f32(h[c]) * inv2 * (one + to_f32(w[c])));
}

#define RESIDUAL(t, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(256) residual_rms_norm_##t(const ResidualNormParams p) { pdl_enter(); \
    residual_rms_norm<T>(p);                                                                            \
  }
RESIDUAL(f32, float)
RESIDUAL(bf16, bf16)
RESIDUAL(f16, f16)
