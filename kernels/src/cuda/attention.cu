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
//   softmax stays in registers, so the score matrix never reaches memory. Its template is in
//   attention_mma.cuh (prepended to this file), shared with the variants of attention_var.cu.
//   attn_mma_new_<t>_d<D> also stores its keys and values into the caches (prefill's two
//   cache writes, in the attention's launch).
// - attn_rows_<t>: one warp per (query row, key range), for decode (Sq = 1) over a KV cache,
//   split-K over the keys with attn_combine_<t> merging the splits, and for f32.
//   attn_rows1_<t> is the same with the merge in the same launch: the last block to finish
//   for a row merges that row's splits (one launch instead of two). attn_rows_new_<t> and
//   attn_rows1_new_<t> also write the step's new K and V rows into the caches (decode's two
//   cache writes, in the attention's launch).

#define ROWS_WARPS 4
#define MAXD 256

// The rows [at, at + n) of the new keys or values at p.new_k / p.new_v: where p.at says they
// go (0 rows where that does not fit in the cache's Sk).
struct NewRows {
  int at, n;
};

__device__ __forceinline__ NewRows new_rows(const AttnParams& p) {
  const i64 at = p.at_i64 ? *(const i64*)p.at : (i64) * (const int*)p.at;
  if (at < 0 || at + p.n > p.sk) return NewRows{0, 0};
  return NewRows{(int)at, p.n};
}

// Row j of kv head hk of batch row b, `w` wide: from the cache c [B, Sk, Hkv, w], or, for j in
// [nr.at, nr.at + nr.n), from the new rows r [B, n, Hkv, w].
template <typename T, bool NEW>
__device__ __forceinline__ const T* kv_row(const AttnParams& p, i64 c, i64 r, NewRows nr, int b, int j, int hk, int w) {
  if (NEW && j >= nr.at && j < nr.at + nr.n) return (const T*)r + (((i64)b * nr.n + (j - nr.at)) * p.hkv + hk) * w;
  return (const T*)c + (((i64)b * p.sk + j) * p.hkv + hk) * w;
}

// Stores kv head hk's new rows of batch row b into the caches at [at, at + n) with the block's
// threads (a write_rows of K and of V), or sets *err where the position does not fit.
template <typename T>
__device__ void store_new_rows(const AttnParams& p, NewRows nr, int b, int hk) {
  if (nr.n != p.n) {
    if (threadIdx.x == 0 && p.err) *(int*)p.err = 1;
    return;
  }
  for (int e = threadIdx.x; e < nr.n * p.d; e += blockDim.x) {
    const int r = e / p.d, c = e % p.d;
    ((T*)p.k)[(((i64)b * p.sk + nr.at + r) * p.hkv + hk) * p.d + c] = ((const T*)p.new_k)[(((i64)b * nr.n + r) * p.hkv + hk) * p.d + c];
  }
  for (int e = threadIdx.x; e < nr.n * p.dv; e += blockDim.x) {
    const int r = e / p.dv, c = e % p.dv;
    ((T*)p.v)[(((i64)b * p.sk + nr.at + r) * p.hkv + hk) * p.dv + c] = ((const T*)p.new_v)[(((i64)b * nr.n + r) * p.hkv + hk) * p.dv + c];
  }
}

// ---------------------------------------------------------------------------------------
// Row kernel (any dtype, D <= 256, split-K). grid (Sq*Hq, B, splits), block 128.
// With splits > 1 each block writes (m, l, acc[Dv]) in f32 to p.partial at
// [((b*Sq + i)*Hq + h)*splits + s] * (Dv + 2); attn_combine merges them.
// NEW (attn_rows_new): keys [at, at + n) are read from p.new_k / p.new_v, not the caches, and
// the block of split 0, query row 0 and the first query head of each kv group stores them into
// the caches. No block of the launch reads those cache rows, so the stores race with no read.
template <typename T, bool NEW>
__device__ void attn_rows(const AttnParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ih = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int i = ih / p.hq, h = ih % p.hq;
  const int hk = h / (p.hq / p.hkv);
  NewRows nr{0, 0};
  if (NEW) {
    nr = new_rows(p);
    if (split == 0 && i == 0 && h % (p.hq / p.hkv) == 0) store_new_rows<T>(p, nr, b, hk);
  }
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
    const T* kr = kv_row<T, NEW>(p, p.k, p.new_k, nr, b, j, hk, p.d);
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
    const T* vr = kv_row<T, NEW>(p, p.v, p.new_v, nr, b, j, hk, p.dv);
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

// Merges the split-K partials of output row `row` ((b*Sq + i)*Hq + h) with the block's
// threads. The loads go to L2 (__ldcg): in attn_rows1 other blocks of the same launch wrote
// the partials, and this SM's L1 may hold stale lines of them.
template <typename T>
__device__ void attn_combine_row(const AttnParams& p, i64 row) {
  const float* part = (const float*)p.partial + row * p.splits * (i64)(p.dv + 2);
  float M = -KILN_INF;
  for (int s = 0; s < p.splits; s++) M = fmaxf(M, __ldcg(part + s * (p.dv + 2)));
  float L = 0.0f;
  for (int s = 0; s < p.splits; s++) {
    float ms = __ldcg(part + s * (p.dv + 2));
    L += ms == -KILN_INF ? 0.0f : __ldcg(part + s * (p.dv + 2) + 1) * __expf(ms - M);
  }
  T* o = (T*)p.out + row * p.dv;
  for (int c = threadIdx.x; c < p.dv; c += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < p.splits; s++) {
      float ms = __ldcg(part + s * (p.dv + 2));
      if (ms != -KILN_INF) a += __ldcg(part + s * (p.dv + 2) + 2 + c) * __expf(ms - M);
    }
    o[c] = from_f32<T>(L > 0.0f ? a / L : 0.0f);
  }
}

// Merges split-K partials. grid (Sq*Hq, B), block 128.
template <typename T>
__device__ void attn_combine(const AttnParams p) {
  attn_combine_row<T>(p, (i64)blockIdx.y * p.sq * p.hq + blockIdx.x);
}

// attn_rows, then the merge of each row by the last of its splits' blocks to finish: every
// block writes its partial, fences it, and counts itself in the row's u32 at p.counters; the
// block that counts last (splits - 1 before it) merges the row and sets the count back to 0
// for the next launch (and a CUDA graph's replay). grid (Sq*Hq, B, splits), block 128.
template <typename T, bool NEW>
__device__ void attn_rows1(const AttnParams p) {
  attn_rows<T, NEW>(p);
  if (p.splits == 1) return;
  const i64 row = (i64)blockIdx.y * p.sq * p.hq + blockIdx.x;
  __shared__ bool last;
  // Each thread wrote part of the partial: each fences its writes (device scope) before
  // thread 0 counts the block, so the block that counts last sees every split's.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* count = (unsigned*)p.counters + row;
    last = atomicAdd(count, 1u) == (unsigned)(p.splits - 1);
    if (last) atomicExch(count, 0u);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  attn_combine_row<T>(p, row);
}

#define ROWS(t, T)                                                                            \
  extern "C" __global__ void __launch_bounds__(128) attn_rows_##t(const AttnParams p) { pdl_enter(); attn_rows<T, false>(p); } \
  extern "C" __global__ void __launch_bounds__(128) attn_combine_##t(const AttnParams p) { pdl_enter(); attn_combine<T>(p); } \
  extern "C" __global__ void __launch_bounds__(128) attn_rows1_##t(const AttnParams p) { pdl_enter(); attn_rows1<T, false>(p); } \
  extern "C" __global__ void __launch_bounds__(128) attn_rows_new_##t(const AttnParams p) { pdl_enter(); attn_rows<T, true>(p); } \
  extern "C" __global__ void __launch_bounds__(128) attn_rows1_new_##t(const AttnParams p) { pdl_enter(); attn_rows1<T, true>(p); }
ROWS(f32, float)
ROWS(bf16, bf16)
ROWS(f16, f16)

#define MMA(t, T, D, BK) \
  extern "C" __global__ void __launch_bounds__(128) attn_mma_##t##_d##D(const AttnParams p) { pdl_enter(); attn_mma<T, D, BK>(p); }
MMA(bf16, bf16, 64, 64)
MMA(bf16, bf16, 72, 64)
MMA(bf16, bf16, 128, 64)
MMA(bf16, bf16, 256, 32)
MMA(f16, f16, 64, 64)
MMA(f16, f16, 72, 64)
MMA(f16, f16, 128, 64)
MMA(f16, f16, 256, 32)

// Prefill that also does K's and V's cache writes (attn_mma's NEW), for the head dims with no
// variants (kernels/src/cuda/attn.rs `mma_new_kernel`).
#define MMA_NEW(t, T, D, BK) \
  extern "C" __global__ void __launch_bounds__(128) attn_mma_new_##t##_d##D(const AttnParams p) { pdl_enter(); attn_mma<T, D, BK, 1, 2, true, false, true>(p); }
MMA_NEW(bf16, bf16, 64, 64)
MMA_NEW(bf16, bf16, 128, 64)
MMA_NEW(bf16, bf16, 256, 32)
MMA_NEW(f16, f16, 64, 64)
MMA_NEW(f16, f16, 128, 64)
MMA_NEW(f16, f16, 256, 32)
