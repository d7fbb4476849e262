// Attention: q [B,Sq,Hq,D], k [B,Sk,Hkv,D], v [B,Sk,Hkv,Dv] -> out [B,Sq,Hq,Dv] (the graph's
// Attention op). Scores are scaled, soft-capped (Gemma 2), then masked (causal, sliding
// window, or an additive [B,Sq,Sk] mask for prefix-LM / padding). Grouped-query: query head
// h reads kv head h / (Hq / Hkv).
//
// Two kernels:
// - attn_mma_<t>_d<D>: prefill, flash-style (FlashAttention-2 schedule) on tensor cores with
//   mma.sync m16n8k16 (sm_80+; on Hopper it runs on the same tensor cores as wgmma at lower
//   issue efficiency). One block of 4 warps takes 64 query rows of one (batch, head); each
//   warp owns 16 rows; key/value tiles of BK rows stream through shared memory; the online
//   softmax stays in registers, so the score matrix never reaches memory.
// - attn_rows_<t>: one warp per (query row, key range), for decode (Sq = 1) over a KV cache,
//   split-K over the keys with attn_combine_<t> merging the splits, and for f32.

#define ROWS_WARPS 4
#define MAXD 256

// ---------------------------------------------------------------------------------------
// Row kernel (any dtype, D <= 256, split-K). grid (Sq*Hq, B, splits), block 128.
// With splits > 1 each block writes (m, l, acc[Dv]) in f32 to p.partial at
// [((b*Sq + i)*Hq + h)*splits + s] * (Dv + 2); attn_combine merges them.
template <typename T>
__device__ void attn_rows(const AttnParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ih = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int i = ih / p.hq, h = ih % p.hq;
  const int hk = h / (p.hq / p.hkv);
  const T* q = (const T*)p.q + (((i64)b * p.sq + i) * p.hq + h) * p.d;
  float qr[MAXD / 32], acc[MAXD / 32];
#pragma unroll
  for (int r = 0; r < MAXD / 32; r++) {
    int c = lane + 32 * r;
    qr[r] = c < p.d ? to_f32(q[c]) : 0.0f;
    acc[r] = 0.0f;
  }
  // The splits share the keys this row may see (the filled ones under a position mask).
  const int kend = key_end(p, b, i);
  const int chunk = (kend + p.splits - 1) / p.splits;
  const int j0 = split * chunk, j1 = min(kend, j0 + chunk);
  float m = -KILN_INF, l = 0.0f;
  for (int j = j0 + warp; j < j1; j += ROWS_WARPS) {
    const T* kr = (const T*)p.k + (((i64)b * p.sk + j) * p.hkv + hk) * p.d;
    float dot = 0.0f;
#pragma unroll
    for (int r = 0; r < MAXD / 32; r++) {
      int c = lane + 32 * r;
      if (c < p.d) dot += qr[r] * to_f32(kr[c]);
    }
    dot = warp_sum(dot);
    float s = score_of<T>(p, dot, b, i, j);
    if (s == -KILN_INF) continue;
    float mn = fmaxf(m, s);
    float corr = __expf(m - mn), e = __expf(s - mn);
    l = l * corr + e;
    m = mn;
    const T* vr = (const T*)p.v + (((i64)b * p.sk + j) * p.hkv + hk) * p.dv;
#pragma unroll
    for (int r = 0; r < MAXD / 32; r++) {
      int c = lane + 32 * r;
      if (c < p.dv) acc[r] = acc[r] * corr + e * to_f32(vr[c]);
    }
  }
  // Merge the warps' (m, l, acc) through shared memory.
  __shared__ float sm[ROWS_WARPS], sl[ROWS_WARPS], sacc[ROWS_WARPS][MAXD];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int r = 0; r < MAXD / 32; r++) sacc[warp][lane + 32 * r] = acc[r];
  __syncthreads();
  float M = -KILN_INF;
  for (int w = 0; w < ROWS_WARPS; w++) M = fmaxf(M, sm[w]);
  float L = 0.0f, wt[ROWS_WARPS];
  for (int w = 0; w < ROWS_WARPS; w++) {
    wt[w] = sm[w] == -KILN_INF ? 0.0f : __expf(sm[w] - M);
    L += sl[w] * wt[w];
  }
  const i64 row = ((i64)b * p.sq + i) * p.hq + h;
  if (p.splits == 1) {
    T* o = (T*)p.out + row * p.dv;
    for (int c = threadIdx.x; c < p.dv; c += blockDim.x) {
      float a = 0.0f;
      for (int w = 0; w < ROWS_WARPS; w++) a += sacc[w][c] * wt[w];
      o[c] = from_f32<T>(L > 0.0f ? a / L : 0.0f);
    }
  } else {
    float* part = (float*)p.partial + (row * p.splits + split) * (i64)(p.dv + 2);
    if (threadIdx.x == 0) {
      part[0] = M;
      part[1] = L;
    }
    for (int c = threadIdx.x; c < p.dv; c += blockDim.x) {
      float a = 0.0f;
      for (int w = 0; w < ROWS_WARPS; w++) a += sacc[w][c] * wt[w];
      part[2 + c] = a;
    }
  }
}

// Merges split-K partials. grid (Sq*Hq, B), block 128.
template <typename T>
__device__ void attn_combine(const AttnParams p) {
  const int ih = blockIdx.x, b = blockIdx.y;
  const int i = ih / p.hq, h = ih % p.hq;
  const i64 row = ((i64)b * p.sq + i) * p.hq + h;
  const float* part = (const float*)p.partial + row * p.splits * (i64)(p.dv + 2);
  float M = -KILN_INF;
  for (int s = 0; s < p.splits; s++) M = fmaxf(M, part[s * (p.dv + 2)]);
  float L = 0.0f;
  for (int s = 0; s < p.splits; s++) {
    float ms = part[s * (p.dv + 2)];
    L += ms == -KILN_INF ? 0.0f : part[s * (p.dv + 2) + 1] * __expf(ms - M);
  }
  T* o = (T*)p.out + row * p.dv;
  for (int c = threadIdx.x; c < p.dv; c += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < p.splits; s++) {
      float ms = part[s * (p.dv + 2)];
      if (ms != -KILN_INF) a += part[s * (p.dv + 2) + 2 + c] * __expf(ms - M);
    }
    o[c] = from_f32<T>(L > 0.0f ? a / L : 0.0f);
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core prefill. DP: head dim padded to a multiple of 16 (72 -> 80). Needs D == Dv.
// grid (ceil(Sq/64), Hq, B), block 128. Fragments are loaded by ldmatrix (V through its
// transposing form), Q's fragments stay in registers for head dims up to 128, and the next
// key/value tile is copied by cp.async while the current one is computed (two buffers):
// dynamic shared memory (64 + 4*BK) * (DP + 8) * 2 bytes (mma_smem in Rust). An earlier
// version with scalar shared loads and no copy overlap was 15-23% slower on an H200
// (BENCHMARKS.md) and is gone.

template <typename T> __device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b);
template <> __device__ __forceinline__ void mma16816<bf16>(float* c, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<f16>(float* c, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(unsigned* r, const unsigned short* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned* r, const unsigned short* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16 bytes global -> shared, asynchronously; `ok == false` writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(unsigned short* dst, const unsigned short* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

template <int D, int DP, int LD>
__device__ __forceinline__ void load_tile_async(unsigned short* dst, const unsigned short* src, i64 stride, int rows, int valid) {
  constexpr int CH = DP / 8;
  for (int x = threadIdx.x; x < rows * CH; x += blockDim.x) {
    int r = x / CH, c = (x % CH) * 8;
    bool ok = r < valid && c < D;
    cp_async16(dst + r * LD + c, ok ? src + r * stride + c : src, ok);
  }
}

template <typename T, int D, int BK>
__device__ void attn_mma(const AttnParams p) {
  constexpr int DP = (D + 15) / 16 * 16;
  constexpr int LD = DP + 8;
  constexpr int NT = BK / 8;
  constexpr int OT = DP / 8;
  constexpr int KQ = DP / 16;
  constexpr bool QREG = D <= 128;  // Q fragments in registers
  extern __shared__ __align__(16) unsigned short smem[];
  unsigned short* qs = smem;
  unsigned short* kv = qs + 64 * LD;  // [2 buffers][K tile, V tile]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int q0 = blockIdx.x * 64, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.hq / p.hkv);
  const unsigned short* qg = (const unsigned short*)p.q + (((i64)b * p.sq + q0) * p.hq + h) * D;

  int kbeg = 0, kend = key_end(p, b, min(p.sq, q0 + 64) - 1);
  if (p.mask_kind == MASK_SLIDING) kbeg = max(0, p.q_offset + q0 - p.window + 1) / BK * BK;
  if (p.mask_kind == MASK_POSITIONS && p.window > 0 && q_start(p) + q0 >= prefix_of(p, b))
    kbeg = max(0, q_start(p) + q0 - p.window + 1) / BK * BK;
  const i64 kvstride = (i64)p.hkv * D;
  auto load_kv = [&](int k0, int buf) {
    const i64 off = (((i64)b * p.sk + k0) * p.hkv + hk) * D;
    unsigned short* ks = kv + buf * 2 * BK * LD;
    load_tile_async<D, DP, LD>(ks, (const unsigned short*)p.k + off, kvstride, BK, p.sk - k0);
    load_tile_async<D, DP, LD>(ks + BK * LD, (const unsigned short*)p.v + off, kvstride, BK, p.sk - k0);
  };
  load_tile_async<D, DP, LD>(qs, qg, (i64)p.hq * D, 64, p.sq - q0);
  if (kbeg < kend) load_kv(kbeg, 0);
  cp_async_commit();

  float o[OT][4];
#pragma unroll
  for (int n = 0; n < OT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-KILN_INF, -KILN_INF}, l[2] = {0.0f, 0.0f};
  const int r0 = warp * 16 + g;
  // ldmatrix row addresses: Q (A operand), K (B, two n-tiles), V (B transposed, two n-tiles).
  const unsigned short* qa = qs + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
  const int krow = ((lane >> 4) << 3) + (lane & 7), kcol = ((lane >> 3) & 1) * 8;
  const int vrow = lane & 15, vcol = (lane >> 4) * 8;
  unsigned qf[QREG ? KQ : 1][4];

  int it = 0;
  for (int k0 = kbeg; k0 < kend; k0 += BK, it++) {
    const int buf = it & 1;
    if (k0 + BK < kend) {
      load_kv(k0 + BK, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const unsigned short* ks = kv + buf * 2 * BK * LD;
    const unsigned short* vs = ks + BK * LD;
    if (QREG && it == 0) {
#pragma unroll
      for (int kk = 0; kk < (QREG ? KQ : 0); kk++) ldsm_x4(qf[kk], qa + kk * 16);
    }

    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KQ; kk++) {
      unsigned a[4];
      if (QREG) {
        a[0] = qf[QREG ? kk : 0][0];
        a[1] = qf[QREG ? kk : 0][1];
        a[2] = qf[QREG ? kk : 0][2];
        a[3] = qf[QREG ? kk : 0][3];
      } else {
        ldsm_x4(a, qa + kk * 16);
      }
#pragma unroll
      for (int n = 0; n < NT; n += 2) {
        unsigned kb[4];
        ldsm_x4(kb, ks + (n * 8 + krow) * LD + kk * 16 + kcol);
        mma16816<T>(s[n], a, kb);
        mma16816<T>(s[n + 1], a, kb + 2);
      }
    }

    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < NT; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int i = q0 + r0 + (e >> 1) * 8, j = k0 + n * 8 + 2 * t + (e & 1);
        float v = (i < p.sq && j < p.sk) ? score_of<T>(p, s[n][e], b, i, j) : -KILN_INF;
        s[n][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      corr[r] = mx[r] == -KILN_INF ? 1.0f : __expf(m[r] - mx[r]);
      m[r] = mx[r];
      l[r] *= corr[r];
    }
#pragma unroll
    for (int n = 0; n < NT; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int r = e >> 1;
        float pe = s[n][e] == -KILN_INF ? 0.0f : __expf(s[n][e] - m[r]);
        s[n][e] = pe;
        l[r] += pe;
      }
    }
#pragma unroll
    for (int n = 0; n < OT; n++) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }

#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      unsigned a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int n = 0; n < OT; n += 2) {
        unsigned vb[4];
        ldsm_x4_trans(vb, vs + (kk * 16 + vrow) * LD + n * 8 + vcol);
        mma16816<T>(o[n], a, vb);
        mma16816<T>(o[n + 1], a, vb + 2);
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    l[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
  }
#pragma unroll
  for (int r = 0; r < 2; r++) {
    int i = q0 + r0 + r * 8;
    if (i >= p.sq) continue;
    T* out = (T*)p.out + (((i64)b * p.sq + i) * p.hq + h) * D;
#pragma unroll
    for (int n = 0; n < OT; n++) {
      int c = n * 8 + 2 * t;
      if (c < D) {
        out[c] = from_f32<T>(o[n][2 * r] * l[r]);
        out[c + 1] = from_f32<T>(o[n][2 * r + 1] * l[r]);
      }
    }
  }
}

#define ROWS(t, T)                                                                            \
  extern "C" __global__ void __launch_bounds__(128) attn_rows_##t(const AttnParams p) { attn_rows<T>(p); } \
  extern "C" __global__ void __launch_bounds__(128) attn_combine_##t(const AttnParams p) { attn_combine<T>(p); }
ROWS(f32, float)
ROWS(bf16, bf16)
ROWS(f16, f16)

#define MMA(t, T, D, BK) \
  extern "C" __global__ void __launch_bounds__(128) attn_mma_##t##_d##D(const AttnParams p) { attn_mma<T, D, BK>(p); }
MMA(bf16, bf16, 64, 64)
MMA(bf16, bf16, 72, 64)
MMA(bf16, bf16, 128, 64)
MMA(bf16, bf16, 256, 32)
MMA(f16, f16, 64, 64)
MMA(f16, f16, 72, 64)
MMA(f16, f16, 128, 64)
MMA(f16, f16, 256, 32)
