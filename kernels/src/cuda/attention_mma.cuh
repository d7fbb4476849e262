// ---------------------------------------------------------------------------------------
// Tensor-core prefill (included by attention.cu and attention_var.cu). DP: head dim padded to
// a multiple of 16 (72 -> 80). Needs D == Dv. grid (ceil(Sq/BQ), Hq, B), block 128 (4 warps).
// Fragments are loaded by ldmatrix (V through its transposing form), Q's fragments stay in
// registers for head dims up to 128, and the next key/value tile is copied by cp.async while
// the current one is computed. An earlier version with scalar shared loads and no copy overlap
// was 15-23% slower on an H200 (BENCHMARKS.md) and is gone.
//
// The default kernel (attn_mma_<t>_d<D>) is attn_mma<T, D, BK> with every variant flag off;
// the variants (issue 15: measured against it on the device, kernels/src/cuda/mod.rs
// `AttnVariant`, suffixes in this order) change one thing each:
// - MT = 2 ("_q128"): 128 query rows per block, 32 per warp as two m16 tiles, so each K / V
//   fragment loaded from shared memory feeds two mma instead of one.
// - ST = 3 ("_s3"): K and V of a key tile in separate cp.async groups through a ring of three
//   tile slots: while K_j is used, V_j and K_j+1 load; while V_j is used, K_j+1 and V_j+1.
//   The default (ST = 2) copies K_j+1 and V_j+1 together into the other of two buffers.
// - PAD = false ("_np", head dims with D % 16 == 8): no padding to DP: QK ends with a k8 mma
//   (m16n8k8) and PV has D/8 n-tiles (72: 4 k16 + 1 k8 steps, 9 n-tiles; padded: 5 and 10).
// - VST = true ("_vs"): each warp stages its normalised output rows in its own rows of the Q
//   tile, then stores 16-byte vectors (the default stores two 16-bit values per thread).
// Dynamic shared memory (attn_smem in Rust): (BQ + 4*BK) * (DP + 8) * 2 bytes for ST = 2,
// (BQ + ST*BK) * (DP + 8) * 2 for a ring; the row pitch DP + 8 keeps ldmatrix conflict-free.

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

// m16n8k8: A is two registers (rows g and g + 8, k 2t..2t+1), B one (k 2t..2t+1, column g).
template <typename T> __device__ __forceinline__ void mma1688(float* c, const unsigned* a, unsigned b);
template <> __device__ __forceinline__ void mma1688<bf16>(float* c, const unsigned* a, unsigned b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(b));
}
template <> __device__ __forceinline__ void mma1688<f16>(float* c, const unsigned* a, unsigned b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(b));
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

// Two 8x8 matrices: lanes 0-7 address the first's rows, lanes 8-15 the second's (the other
// lanes' addresses are ignored).
__device__ __forceinline__ void ldsm_x2(unsigned* r, const unsigned short* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x2_trans(unsigned* r, const unsigned short* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}

// 16 bytes global -> shared, asynchronously; `ok == false` writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(unsigned short* dst, const unsigned short* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// `rows` rows of DL columns (DL / 8 chunks of 16 bytes; columns at or past D are zeros).
template <int D, int DL, int LD>
__device__ __forceinline__ void load_tile_async(unsigned short* dst, const unsigned short* src, i64 stride, int rows, int valid) {
  constexpr int CH = DL / 8;
  for (int x = threadIdx.x; x < rows * CH; x += blockDim.x) {
    int r = x / CH, c = (x % CH) * 8;
    bool ok = r < valid && c < D;
    cp_async16(dst + r * LD + c, ok ? src + r * stride + c : src, ok);
  }
}

// NEW (attn_mma_new_<t>_d<D>, prefill with Sq == Sk): the blocks of the first query head of
// each kv group (h % (Hq / Hkv) == 0) store rows [q0, min(q0 + BQ, Sk)) of kv head hk of the
// launch's own k and v into the caches p.cache_k / p.cache_v at rows at + r, after the block's
// output (under a causal or sliding mask those rows were its last key tiles, likely still in
// L2). The q tiles cover every key row once, so the launch stores all Sk rows: K's and V's
// cache writes (two write_rows) in the attention's launch. Where at < 0 or at + Sk >
// cache_rows it sets *err and stores nothing, as write_rows does. No block reads the caches.
template <int D>
__device__ void store_kv_tile(const AttnParams& p, int q0, int bq, int b, int h, int hk) {
  static_assert(D % 8 == 0, "16-byte row chunks");
  if (h % (p.hq / p.hkv) != 0) return;
  const i64 at = p.at_i64 ? *(const i64*)p.at : (i64) * (const int*)p.at;
  if (at < 0 || at + p.sk > p.cache_rows) {
    if (threadIdx.x == 0 && p.err) *(int*)p.err = 1;
    return;
  }
  constexpr int CH = D / 8;
  const int rows = min(bq, p.sk - q0), n = rows * CH;
  for (int x = threadIdx.x; x < 2 * n; x += blockDim.x) {
    const bool val = x >= n;
    const int y = val ? x - n : x, r = y / CH, c = (y % CH) * 8;
    const i64 src = (((i64)b * p.sk + q0 + r) * p.hkv + hk) * D + c;
    const i64 dst = (((i64)b * p.cache_rows + at + q0 + r) * p.hkv + hk) * D + c;
    const uint4 v = *(const uint4*)((const unsigned short*)(val ? p.v : p.k) + src);
    *(uint4*)((unsigned short*)(val ? p.cache_v : p.cache_k) + dst) = v;
  }
}

template <typename T, int D, int BK, int MT = 1, int ST = 2, bool PAD = true, bool VST = false, bool NEW = false>
__device__ void attn_mma(const AttnParams p) {
  static_assert(MT == 1 || MT == 2, "one or two m16 tiles per warp");
  static_assert(ST >= 2 && ST <= 4, "two buffers of K+V, or a ring of 3-4 tile slots");
  static_assert(PAD || (D % 8 == 0 && D <= 128), "unpadded head dims: multiples of 8 with Q in registers");
  static_assert(PAD || BK % 32 == 0, "the k8 tail loads four n-tiles at once");
  static_assert(!VST || D % 8 == 0, "16-byte output vectors");
  constexpr int BQ = 64 * MT;
  constexpr int DP = (D + 15) / 16 * 16;
  constexpr int LD = DP + 8;
  constexpr int DL = PAD ? DP : D;  // columns loaded and multiplied
  constexpr int NT = BK / 8;
  constexpr int OT = DL / 8;
  constexpr int KQ = DL / 16;          // k16 steps of QK
  constexpr bool KT = DL % 16 != 0;    // then one k8 step
  constexpr bool QREG = D <= 128;  // Q fragments in registers
  extern __shared__ __align__(16) unsigned short smem[];
  unsigned short* qs = smem;
  unsigned short* kv = qs + BQ * LD;  // ST == 2: [2 buffers][K tile, V tile]; else [ST slots][tile]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int q0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.hq / p.hkv);
  const unsigned short* qg = (const unsigned short*)p.q + (((i64)b * p.sq + q0) * p.hq + h) * D;

  int kbeg = 0, kend = key_end(p, b, min(p.sq, q0 + BQ) - 1);
  if (p.mask_kind == MASK_SLIDING) kbeg = max(0, p.q_offset + q0 - p.window + 1) / BK * BK;
  if (p.mask_kind == MASK_POSITIONS && p.window > 0 && q_start(p) + q0 >= prefix_of(p, b))
    kbeg = max(0, q_start(p) + q0 - p.window + 1) / BK * BK;
  const i64 kvstride = (i64)p.hkv * D;
  auto load_kv = [&](int k0, int buf) {
    const i64 off = (((i64)b * p.sk + k0) * p.hkv + hk) * D;
    unsigned short* ks = kv + buf * 2 * BK * LD;
    load_tile_async<D, DL, LD>(ks, (const unsigned short*)p.k + off, kvstride, BK, p.sk - k0);
    load_tile_async<D, DL, LD>(ks + BK * LD, (const unsigned short*)p.v + off, kvstride, BK, p.sk - k0);
  };
  // The ring's tile x: K (x even) or V (x odd) of the key block at kbeg + (x / 2) * BK, in slot x % ST.
  const int tiles = kbeg < kend ? 2 * ((kend - kbeg + BK - 1) / BK) : 0;
  auto load_ring = [&](int x) {
    const int k0 = kbeg + (x >> 1) * BK;
    const i64 off = (((i64)b * p.sk + k0) * p.hkv + hk) * D;
    const unsigned short* src = (const unsigned short*)((x & 1) ? p.v : p.k) + off;
    load_tile_async<D, DL, LD>(kv + (x % ST) * BK * LD, src, kvstride, BK, p.sk - k0);
  };
  // Waits for tile x (and makes it visible to every warp), then refills the slot tile x - 1
  // used, which every warp is done with past the barrier, with tile x + ST - 1. One group is
  // committed per call, empty or not, so the wait count stays ST - 2.
  auto ring_acquire = [&](int x) -> const unsigned short* {
    cp_async_wait<(ST > 2 ? ST - 2 : 0)>();
    __syncthreads();
    if (x + ST - 1 < tiles) load_ring(x + ST - 1);
    cp_async_commit();
    return kv + (x % ST) * BK * LD;
  };
  load_tile_async<D, DL, LD>(qs, qg, (i64)p.hq * D, BQ, p.sq - q0);
  if constexpr (ST == 2) {
    if (kbeg < kend) load_kv(kbeg, 0);
    cp_async_commit();
  } else {
#pragma unroll
    for (int x = 0; x < ST - 1; x++) {  // Q goes with tile 0's group
      if (x < tiles) load_ring(x);
      cp_async_commit();
    }
  }

  float o[MT][OT][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int n = 0; n < OT; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; mt++) m[mt][0] = m[mt][1] = -KILN_INF, l[mt][0] = l[mt][1] = 0.0f;
  // Row of this thread in m-tile mt, half r: r0 + mt * 16 + r * 8 (block-relative).
  const int r0 = warp * 16 * MT + g;
  // ldmatrix row addresses: Q (A operand; m-tile mt at + mt * 16 * LD), K (B, two n-tiles),
  // K's k8 tail (B, four n-tiles: lane -> key row), V (B transposed, two n-tiles).
  const unsigned short* qa = qs + (warp * 16 * MT + (lane & 15)) * LD + (lane >> 4) * 8;
  const int krow = ((lane >> 4) << 3) + (lane & 7), kcol = ((lane >> 3) & 1) * 8;
  const int vrow = lane & 15, vcol = (lane >> 4) * 8;
  unsigned qf[MT][QREG ? KQ : 1][4];
  unsigned qt[MT][2];  // the k8 tail's A fragment (KT)

  int it = 0;
  for (int k0 = kbeg; k0 < kend; k0 += BK, it++) {
    const unsigned short* ks;
    if constexpr (ST == 2) {
      const int buf = it & 1;
      if (k0 + BK < kend) {
        load_kv(k0 + BK, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      ks = kv + buf * 2 * BK * LD;
    } else {
      ks = ring_acquire(2 * it);
    }
    if (QREG && it == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int kk = 0; kk < (QREG ? KQ : 0); kk++) ldsm_x4(qf[mt][kk], qa + mt * 16 * LD + kk * 16);
        if (KT) ldsm_x2(qt[mt], qa + mt * 16 * LD + KQ * 16);
      }
    }

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int n = 0; n < NT; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KQ; kk++) {
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        if (QREG) {
          a[mt][0] = qf[mt][QREG ? kk : 0][0];
          a[mt][1] = qf[mt][QREG ? kk : 0][1];
          a[mt][2] = qf[mt][QREG ? kk : 0][2];
          a[mt][3] = qf[mt][QREG ? kk : 0][3];
        } else {
          ldsm_x4(a[mt], qa + mt * 16 * LD + kk * 16);
        }
      }
#pragma unroll
      for (int n = 0; n < NT; n += 2) {
        unsigned kb[4];
        ldsm_x4(kb, ks + (n * 8 + krow) * LD + kk * 16 + kcol);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          mma16816<T>(s[mt][n], a[mt], kb);
          mma16816<T>(s[mt][n + 1], a[mt], kb + 2);
        }
      }
    }
    if constexpr (KT) {
      // Columns KQ*16 .. D-1 (8): matrix q of the x4 load is n-tile n + q (lanes 8q..8q+7).
#pragma unroll
      for (int n = 0; n < NT; n += 4) {
        unsigned kb[4];
        ldsm_x4(kb, ks + (n * 8 + lane) * LD + KQ * 16);
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int q = 0; q < 4; q++) mma1688<T>(s[mt][n + q], qt[mt], kb[q]);
      }
    }

#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
      float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
      for (int n = 0; n < NT; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          int i = q0 + r0 + mt * 16 + (e >> 1) * 8, j = k0 + n * 8 + 2 * t + (e & 1);
          float v = (i < p.sq && j < p.sk) ? score_of<T>(p, s[mt][n][e], b, i, j) : -KILN_INF;
          s[mt][n][e] = v;
          mx[e >> 1] = fmaxf(mx[e >> 1], v);
        }
      }
      float corr[2];
#pragma unroll
      for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        corr[r] = mx[r] == -KILN_INF ? 1.0f : __expf(m[mt][r] - mx[r]);
        m[mt][r] = mx[r];
        l[mt][r] *= corr[r];
      }
#pragma unroll
      for (int n = 0; n < NT; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          int r = e >> 1;
          float pe = s[mt][n][e] == -KILN_INF ? 0.0f : __expf(s[mt][n][e] - m[mt][r]);
          s[mt][n][e] = pe;
          l[mt][r] += pe;
        }
      }
#pragma unroll
      for (int n = 0; n < OT; n++) {
        o[mt][n][0] *= corr[0];
        o[mt][n][1] *= corr[0];
        o[mt][n][2] *= corr[1];
        o[mt][n][3] *= corr[1];
      }
    }

    const unsigned short* vs;
    if constexpr (ST == 2) {
      vs = ks + BK * LD;
    } else {
      vs = ring_acquire(2 * it + 1);
    }
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int n = 0; n + 1 < OT; n += 2) {
        unsigned vb[4];
        ldsm_x4_trans(vb, vs + (kk * 16 + vrow) * LD + n * 8 + vcol);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          mma16816<T>(o[mt][n], a[mt], vb);
          mma16816<T>(o[mt][n + 1], a[mt], vb + 2);
        }
      }
      if constexpr (OT % 2 == 1) {
        // The last n-tile alone: lanes 0-15 address its 16 key rows (vcol is 0 there).
        unsigned vb[2];
        ldsm_x2_trans(vb, vs + (kk * 16 + vrow) * LD + (OT - 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) mma16816<T>(o[mt][OT - 1], a[mt], vb);
      }
    }
    if constexpr (ST == 2) {
      __syncthreads();  // every warp is done with this buffer before it is refilled
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
      l[mt][r] = l[mt][r] > 0.0f ? 1.0f / l[mt][r] : 0.0f;
    }
  }
  if constexpr (VST) {
    // This warp's rows of the Q tile are its own (read only by it, and done with): the
    // normalised tile goes there, then out as 16-byte vectors, D / 8 per row. The barrier: with
    // no key tile (no loop barrier), another thread's copy of Q into these rows may be in flight.
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int r = 0; r < 2; r++) {
        unsigned short* row = qs + (r0 + mt * 16 + r * 8) * LD;
#pragma unroll
        for (int n = 0; n < OT; n++) {
          int c = n * 8 + 2 * t;
          if (c < D) *(unsigned*)(row + c) = pack2<T>(o[mt][n][2 * r] * l[mt][r], o[mt][n][2 * r + 1] * l[mt][r]);
        }
      }
    }
    __syncwarp();
    constexpr int CH = D / 8;
    const int w0 = warp * 16 * MT;
    for (int x = lane; x < 16 * MT * CH; x += 32) {
      int rr = x / CH, c = (x % CH) * 8;
      int i = q0 + w0 + rr;
      if (i < p.sq) {
        T* out = (T*)p.out + (((i64)b * p.sq + i) * p.hq + h) * D + c;
        *(uint4*)out = *(const uint4*)(qs + (w0 + rr) * LD + c);
      }
    }
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int r = 0; r < 2; r++) {
        int i = q0 + r0 + mt * 16 + r * 8;
        if (i >= p.sq) continue;
        T* out = (T*)p.out + (((i64)b * p.sq + i) * p.hq + h) * D;
#pragma unroll
        for (int n = 0; n < OT; n++) {
          int c = n * 8 + 2 * t;
          if (c < D) {
            out[c] = from_f32<T>(o[mt][n][2 * r] * l[mt][r]);
            out[c + 1] = from_f32<T>(o[mt][n][2 * r + 1] * l[mt][r]);
          }
        }
      }
    }
  }
  if constexpr (NEW) store_kv_tile<D>(p, q0, BQ, b, h, hk);
}
