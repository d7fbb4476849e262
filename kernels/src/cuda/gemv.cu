// GEMV for small M (decode): out[m, n] = epilogue(sum_k a[m, k] * b[n, k]) for M <= 8, with
// b the weights [N, K] row-major (a matmul with transpose_b), f32 accumulation, the output
// in the inputs' dtype. Epilogues (flags): + bias[n], GELU-tanh, + residual[m, n] (the
// order cuBLASLt applies them: bias, then GELU; a residual is never combined with GELU).
// With GEMV_PREFETCH (set where the runtime launches with programmatic dependent launch,
// `CudaBackend::pdl`) each lane prefetches into L2 the weight pieces its loop will load
// before `pdl_wait()`, while the previous kernel may still run: weights are never written on
// the device. The wait comes before the first activation read and every store (also without
// the flag); `pdl_launch_dependents()` after the last loads.
//
// Memory-bound: every weight byte is read once, with 16-byte loads that bypass L1
// (ld.global.nc.L1::no_allocate), while the activation rows (M * K elements, small) are read
// through L1, where every warp of an SM finds them. One block takes a tile of output columns
// (weight rows); its warps split K (GemvParams::kchunks chunks each) and add their partial
// sums through shared memory, so small N still fills every SM without atomics. Rows are
// 16-byte aligned: K * sizeof(T) % 16 == 0 and 16-byte aligned bases (checked at lowering).
//
// - gemv_tb_<bf16|f16>: tensor cores. A tile is 16 weight rows; a chunk is 64 k. Each lane
//   (g = lane / 4, t = lane % 4) loads 16 bytes at k = 8t and at k = 32 + 8t of weight rows
//   g and g + 8 and of activation row g (zero for g >= M), so one load instruction covers 64
//   contiguous bytes of 8 rows. The four mma.m16n8k16 of a chunk take the fragments straight
//   from those registers: A = the 16 weight rows, B = the activations (column m = row g), C
//   [16 n x 8 m] in f32. The k order inside a chunk is permuted, identically for A and B,
//   which a sum over k does not notice. All M <= 8 rows cost the same as one.
// - gemv_glu_<bf16|f16>: a gated matmul (a GLU's gate and up projections): the same tiles
//   over two weight matrices of one shape, two accumulators, T(gelu(gate)) * up stored.
// - gemv_tb_f32_m<M>: CUDA cores. A tile is 4 weight rows; a chunk is 128 k (16 bytes per
//   lane); per chunk each lane loads the 4 rows and M activation pieces and accumulates
//   M x 4 dot products, reduced over the warp with shuffles.

#define GEMV_BIAS 1
#define GEMV_GELU 2
#define GEMV_RES 4
#define GEMV_GLU 8
#define GEMV_PREFETCH 16
#define GEMV_MAX_WARPS 16

// Parameters of every GEMV (by value; the layout matches `GemvParams` in Rust).
struct GemvParams {
  i64 a, b, out, bias, res;  // device addresses; bias / res 0 when the flag is off
  int m, n, k, flags;
  int kchunks;  // chunks of K per warp
  int pad_;
  i64 b2;  // with GEMV_GLU: the second product's weights [N, K] (0 otherwise)
};

// Weights: read once, keep them out of L1 (the activations live there); L2 prefetches 256 B.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}
// Activations: read by every warp, cached in L1.
__device__ __forceinline__ uint4 ld_act(const void* p) {
  uint4 r;
  asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ float gemv_gelu(float x) {
  return 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
}

// The epilogue of one output element, written in O (the operands' T, or f32: the f32
// accumulator of a bf16 head whose fused epilogue rounds and converts it).
template <typename T, typename O = T>
__device__ __forceinline__ void gemv_store(const GemvParams& p, int m, int n, float v) {
  if (p.flags & GEMV_BIAS) v += to_f32(((const T*)p.bias)[n]);
  if (p.flags & GEMV_GELU) v = gemv_gelu(v);
  const i64 at = (i64)m * p.n + n;
  if (p.flags & GEMV_RES) v += to_f32(((const T*)p.res)[at]);
  ((O*)p.out)[at] = from_f32<O>(v);
}

// A gated matmul's output element (GEMV_GLU): both products rounded to T, then
// T(T(gelu_tanh(gate)) * up), each value rounded as the unfused steps round it (the gate and up
// GEMVs store T; the generated region computes GELU in float with this formula, rounds it to T,
// then the product).
template <typename T>
__device__ __forceinline__ void gemv_store_glu(const GemvParams& p, int m, int n, float gate, float up) {
  const float g = to_f32(from_f32<T>(gate)), u = to_f32(from_f32<T>(up));
  const float h = to_f32(from_f32<T>(gemv_gelu(g)));
  ((T*)p.out)[(i64)m * p.n + n] = from_f32<T>(h * u);
}

// ---------------------------------------------------------------------------------------
// Tensor cores (bf16, f16). grid ceil(N / 16), block 32 * warps.

template <typename T> __device__ __forceinline__ void gemv_mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void gemv_mma<bf16>(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void gemv_mma<f16>(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One chunk of 64 k at element k0 (the lane's offset 8t is in the row pointers). TAIL: the
// last, partial chunk, whose 16-byte pieces past K read as zeros.
template <typename T, bool TAIL>
__device__ __forceinline__ void gemv_chunk(float* acc, const unsigned short* w0, const unsigned short* w1, const unsigned short* x,
                                          bool xrow, int k0, int kleft) {
  const uint4 z = make_uint4(0, 0, 0, 0);
  const bool in0 = !TAIL || kleft > 0, in1 = !TAIL || kleft > 32;
  const uint4 p0 = in0 ? ld_stream(w0 + k0) : z, p1 = in1 ? ld_stream(w0 + k0 + 32) : z;
  const uint4 q0 = in0 ? ld_stream(w1 + k0) : z, q1 = in1 ? ld_stream(w1 + k0 + 32) : z;
  const uint4 x0 = xrow && in0 ? ld_act(x + k0) : z, x1 = xrow && in1 ? ld_act(x + k0 + 32) : z;
  gemv_mma<T>(acc, p0.x, q0.x, p0.y, q0.y, x0.x, x0.y);
  gemv_mma<T>(acc, p0.z, q0.z, p0.w, q0.w, x0.z, x0.w);
  gemv_mma<T>(acc, p1.x, q1.x, p1.y, q1.y, x1.x, x1.y);
  gemv_mma<T>(acc, p1.z, q1.z, p1.w, q1.w, x1.z, x1.w);
}

// GLU: a second accumulator over the weights at p.b2 (the same rows of the second product),
// the activations' chunk read again from L1, and the gated store.
template <typename T, typename O = T, bool GLU = false>
__device__ void gemv_half(const GemvParams p) {
  __shared__ float4 red[GEMV_MAX_WARPS][GLU ? 64 : 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const i64 r0 = (i64)min(n0 + g, p.n - 1) * p.k + 8 * t, r1 = (i64)min(n0 + g + 8, p.n - 1) * p.k + 8 * t;
  // Rows past N repeat the last row (in bounds); their results are not written.
  const unsigned short* b = (const unsigned short*)p.b;
  const unsigned short* w0 = b + r0;
  const unsigned short* w1 = b + r1;
  const unsigned short* b2 = GLU ? (const unsigned short*)p.b2 : b;
  const unsigned short* v0 = b2 + r0;
  const unsigned short* v1 = b2 + r1;
  const bool xrow = g < p.m;
  const unsigned short* x = (const unsigned short*)p.a + (i64)(xrow ? g : 0) * p.k + 8 * t;
  const int chunks = (p.k + 63) >> 6, full = p.k >> 6;
  const int c0 = warp * p.kchunks, c1 = min(c0 + p.kchunks, chunks), cf = min(c1, full);
  if (p.flags & GEMV_PREFETCH) {
    // Into L2, the 16-byte pieces of weights the loop below loads (the lane's, in bounds).
#pragma unroll 1
    for (int c = c0; c < c1; ++c) {
      const int kleft = p.k - (c << 6) - 8 * t;
      for (int h = 0; h < 64 && h < kleft; h += 32) {
        prefetch_l2(w0 + (c << 6) + h);
        prefetch_l2(w1 + (c << 6) + h);
        if (GLU) prefetch_l2(v0 + (c << 6) + h);
        if (GLU) prefetch_l2(v1 + (c << 6) + h);
      }
    }
  }
  pdl_wait();
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float acc2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int c = c0;
#pragma unroll 2
  for (; c < cf; ++c) {
    gemv_chunk<T, false>(acc, w0, w1, x, xrow, c << 6, 0);
    if (GLU) gemv_chunk<T, false>(acc2, v0, v1, x, xrow, c << 6, 0);
  }
  if (c < c1) {
    gemv_chunk<T, true>(acc, w0, w1, x, xrow, c << 6, p.k - (c << 6) - 8 * t);
    if (GLU) gemv_chunk<T, true>(acc2, v0, v1, x, xrow, c << 6, p.k - (c << 6) - 8 * t);
  }
  pdl_launch_dependents();
  if (nw > 1) {
    red[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    if (GLU) red[warp][32 + lane] = make_float4(acc2[0], acc2[1], acc2[2], acc2[3]);
    __syncthreads();
    if (warp != 0) return;
    for (int w = 1; w < nw; ++w) {
      const float4 v = red[w][lane];
      acc[0] += v.x;
      acc[1] += v.y;
      acc[2] += v.z;
      acc[3] += v.w;
      if (GLU) {
        const float4 u = red[w][32 + lane];
        acc2[0] += u.x;
        acc2[1] += u.y;
        acc2[2] += u.z;
        acc2[3] += u.w;
      }
    }
  }
  // C fragment: acc[0..1] = (n0 + g, m = 2t, 2t + 1), acc[2..3] = (n0 + g + 8, same m).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n = n0 + g + (i >> 1) * 8, m = 2 * t + (i & 1);
    if (n < p.n && m < p.m) {
      if (GLU) {
        gemv_store_glu<T>(p, m, n, acc[i], acc2[i]);
      } else {
        gemv_store<T, O>(p, m, n, acc[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// CUDA cores (f32). grid ceil(N / 4), block 32 * warps.

__device__ __forceinline__ float4 as_f4(uint4 u) {
  return make_float4(__uint_as_float(u.x), __uint_as_float(u.y), __uint_as_float(u.z), __uint_as_float(u.w));
}

template <int M, bool TAIL>
__device__ __forceinline__ void gemv_chunk_f32(float (&acc)[M][4], const float* const (&w)[4], const float* x, int k, int k_lane, int kdim) {
  const bool in = !TAIL || k_lane < kdim;
  const uint4 z = make_uint4(0, 0, 0, 0);
  float4 wv[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) wv[r] = as_f4(in ? ld_stream(w[r] + k) : z);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float4 xv = as_f4(in ? ld_act(x + (i64)m * kdim + k) : z);
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[m][r] += xv.x * wv[r].x + xv.y * wv[r].y + xv.z * wv[r].z + xv.w * wv[r].w;
  }
}

template <int M>
__device__ void gemv_f32(const GemvParams p) {
  __shared__ float red[GEMV_MAX_WARPS][M * 4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int n0 = blockIdx.x * 4;
  const float* w[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) w[r] = (const float*)p.b + (i64)min(n0 + r, p.n - 1) * p.k + 4 * lane;
  const float* x = (const float*)p.a + 4 * lane;
  const int chunks = (p.k + 127) >> 7, full = p.k >> 7;
  const int c0 = warp * p.kchunks, c1 = min(c0 + p.kchunks, chunks), cf = min(c1, full);
  float acc[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[m][r] = 0.0f;
  if (p.flags & GEMV_PREFETCH) {
    // Into L2, the 16-byte pieces of weights the loop below loads (the lane's, in bounds).
#pragma unroll 1
    for (int c = c0; c < c1 && (c << 7) + 4 * lane < p.k; ++c)
#pragma unroll
      for (int r = 0; r < 4; ++r) prefetch_l2(w[r] + (c << 7));
  }
  pdl_wait();
  int c = c0;
#pragma unroll 2
  for (; c < cf; ++c) gemv_chunk_f32<M, false>(acc, w, x, c << 7, 0, p.k);
  if (c < c1) gemv_chunk_f32<M, true>(acc, w, x, c << 7, (c << 7) + 4 * lane, p.k);
  pdl_launch_dependents();
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float v = warp_sum(acc[m][r]);
      if (lane == 0) red[warp][m * 4 + r] = v;
    }
  __syncthreads();
  if (warp != 0 || lane >= M * 4) return;
  float v = 0.0f;
  for (int i = 0; i < nw; ++i) v += red[i][lane];
  const int m = lane >> 2, n = n0 + (lane & 3);
  if (n < p.n) gemv_store<float>(p, m, n, v);
}

extern "C" __global__ void __launch_bounds__(512) gemv_tb_bf16(const GemvParams p) { gemv_half<bf16>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f16(const GemvParams p) { gemv_half<f16>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_bf16_to_f32(const GemvParams p) { gemv_half<bf16, float>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f16_to_f32(const GemvParams p) { gemv_half<f16, float>(p); }
// Gated matmuls (GEMV_GLU): p.b the gate's weights, p.b2 the up's.
extern "C" __global__ void __launch_bounds__(512) gemv_glu_bf16(const GemvParams p) { gemv_half<bf16, bf16, true>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_glu_f16(const GemvParams p) { gemv_half<f16, f16, true>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f32_m1(const GemvParams p) { gemv_f32<1>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f32_m2(const GemvParams p) { gemv_f32<2>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f32_m3(const GemvParams p) { gemv_f32<3>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f32_m4(const GemvParams p) { gemv_f32<4>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f32_m5(const GemvParams p) { gemv_f32<5>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f32_m6(const GemvParams p) { gemv_f32<6>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f32_m7(const GemvParams p) { gemv_f32<7>(p); }
extern "C" __global__ void __launch_bounds__(512) gemv_tb_f32_m8(const GemvParams p) { gemv_f32<8>(p); }
