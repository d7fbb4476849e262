// Data movement: strided copy (permute, slice, concat, broadcast), embedding gather, and
// mixture-of-experts dispatch / combine. Copies and gathers move raw elements of 1, 2, 4
// or 8 bytes, so one kernel serves every dtype of that size.

#define MAXR 8

// out[dst + sum idx_a * dst_st[a]] = src[src + sum idx_a * src_st[a]] over `dims`.
struct CopyParams {
  i64 src, dst, n;
  int rank, pad_;
  i64 dims[MAXR], src_st[MAXR], dst_st[MAXR];
};

template <typename E>
__device__ void copy_strided(const CopyParams& p) {
  for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < p.n; x += (i64)gridDim.x * blockDim.x) {
    i64 rem = x, s = 0, d = 0;
    for (int a = p.rank - 1; a >= 0; a--) {
      i64 ia = rem % p.dims[a];
      rem /= p.dims[a];
      s += ia * p.src_st[a];
      d += ia * p.dst_st[a];
    }
    ((E*)p.dst)[d] = ((const E*)p.src)[s];
  }
}

// Gather along an axis: x viewed as [outer, len, inner], idx as [nidx] -> out [outer, nidx,
// inner]. An index out of [0, len) writes zeros and sets *err (the host reports it).
struct GatherParams {
  i64 x, idx, out, err;
  i64 outer, len, nidx, inner;
};

template <typename E, typename I>
__device__ void gather(const GatherParams p) {
  const i64 n = p.outer * p.nidx * p.inner;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x) {
    i64 c = e % p.inner, j = (e / p.inner) % p.nidx, o = e / (p.inner * p.nidx);
    i64 k = (i64)((const I*)p.idx)[j];
    E v = E(0);
    if (k >= 0 && k < p.len) v = ((const E*)p.x)[(o * p.len + k) * p.inner + c];
    else if (p.err) *(int*)p.err = 1;
    ((E*)p.out)[e] = v;
  }
}

// Gather times a scale (`Op::GatherScaled`: an embedding's sqrt(hidden)): each gathered value
// widened to f32, times `scale` (a value of T), rounded to T once. For bf16 and f16 the f32
// product is exact, for f32 it is the one rounding of the exact product: the unfused
// multiply's bits.
struct ScaledGatherParams {
  GatherParams g;
  float scale;
  int pad_;
};

template <typename T, typename I>
__device__ void gather_scaled(const ScaledGatherParams sp) {
  const GatherParams p = sp.g;
  const i64 n = p.outer * p.nidx * p.inner;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x) {
    i64 c = e % p.inner, j = (e / p.inner) % p.nidx, o = e / (p.inner * p.nidx);
    i64 k = (i64)((const I*)p.idx)[j];
    float v = 0.0f;
    if (k >= 0 && k < p.len) v = to_f32(((const T*)p.x)[(o * p.len + k) * p.inner + c]) * sp.scale;
    else if (p.err) *(int*)p.err = 1;
    ((T*)p.out)[e] = from_f32<T>(v);
  }
}

// Write rows in place: x [outer, nidx, inner] into out [outer, len, inner] at the position
// idx[0] along the middle axis (a KV cache row). A position that does not fit writes nothing
// and sets *err.
template <typename E, typename I>
__device__ void write_rows(const GatherParams& p) {
  const i64 at = (i64)((const I*)p.idx)[0];
  if (at < 0 || at + p.nidx > p.len) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && p.err) *(int*)p.err = 1;
    return;
  }
  const i64 n = p.outer * p.nidx * p.inner;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x) {
    i64 c = e % p.inner, j = (e / p.inner) % p.nidx, o = e / (p.inner * p.nidx);
    ((E*)p.out)[(o * p.len + at + j) * p.inner + c] = ((const E*)p.x)[e];
  }
}

// MoE. Dispatch: out [rows, D] (zeroed by the host first); for every (t, k) with
// slot[t, k] >= 0, out[slot] += x[t]. grid (T*K), block 256. Static capacity gives each
// expert row at most one token, so rows never race.
struct MoeParams {
  i64 x, slot, w, out;
  int tokens, k, d, rows;
};

template <typename T, typename I>
__device__ void moe_dispatch(const MoeParams p) {
  const int tk = blockIdx.x;
  const i64 r = (i64)((const I*)p.slot)[tk];
  if (r < 0 || r >= p.rows) return;
  const T* x = (const T*)p.x + (i64)(tk / p.k) * p.d;
  T* o = (T*)p.out + r * p.d;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) o[c] = from_f32<T>(to_f32(o[c]) + to_f32(x[c]));
}

// Combine: out[t] = sum_k w[t, k] * y[slot[t, k]] (slot >= 0). grid (T), block 256.
template <typename T, typename I>
__device__ void moe_combine(const MoeParams p) {
  const int t = blockIdx.x;
  T* o = (T*)p.out + (i64)t * p.d;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
    float a = 0.0f;
    for (int k = 0; k < p.k; k++) {
      i64 r = (i64)((const I*)p.slot)[t * p.k + k];
      if (r >= 0 && r < p.rows) a += to_f32(((const T*)p.w)[t * p.k + k]) * to_f32(((const T*)p.x)[r * p.d + c]);
    }
    o[c] = from_f32<T>(a);
  }
}

// Two independent copies in one launch (two steps' concat copies): half blockIdx.y runs
// p.p[blockIdx.y] (the lowering's `merge`).
struct CopyParams2 {
  CopyParams p[2];
};

// Four: two concats' two parts each (the pair's two `_x2` launches as one).
struct CopyParams4 {
  CopyParams p[4];
};

#define COPY(n, E)                                                                                                 \
  extern "C" __global__ void __launch_bounds__(256) copy_b##n(const CopyParams p) { pdl_enter(); copy_strided<E>(p); }          \
  extern "C" __global__ void __launch_bounds__(256) copy_b##n##_x2(const CopyParams2 p) { pdl_enter(); copy_strided<E>(p.p[blockIdx.y]); } \
  extern "C" __global__ void __launch_bounds__(256) copy_b##n##_x4(const CopyParams4 p) { pdl_enter(); copy_strided<E>(p.p[blockIdx.y]); }
COPY(1, unsigned char)
COPY(2, unsigned short)
COPY(4, unsigned int)
COPY(8, unsigned long long)

#define GATHER(n, E, it, I) \
  extern "C" __global__ void __launch_bounds__(256) gather_b##n##_##it(const GatherParams p) { pdl_enter(); gather<E, I>(p); }
GATHER(1, unsigned char, i32, int)
GATHER(2, unsigned short, i32, int)
GATHER(4, unsigned int, i32, int)
GATHER(8, unsigned long long, i32, int)
GATHER(1, unsigned char, i64, i64)
GATHER(2, unsigned short, i64, i64)
GATHER(4, unsigned int, i64, i64)
GATHER(8, unsigned long long, i64, i64)

#define GATHER_SCALED(t, T, it, I)                                                                        \
  extern "C" __global__ void __launch_bounds__(256) gather_scaled_##t##_##it(const ScaledGatherParams p) { pdl_enter(); \
    gather_scaled<T, I>(p);                                                                               \
  }
GATHER_SCALED(f32, float, i32, int)
GATHER_SCALED(bf16, bf16, i32, int)
GATHER_SCALED(f16, f16, i32, int)
GATHER_SCALED(f32, float, i64, i64)
GATHER_SCALED(bf16, bf16, i64, i64)
GATHER_SCALED(f16, f16, i64, i64)

// Two independent row writes in one launch (K's and V's cache rows): half blockIdx.y of the
// grid runs p.p[blockIdx.y] (the lowering's `merge`).
struct GatherParams2 {
  GatherParams p[2];
};

#define WRITE_ROWS(n, E, it, I)                                                                               \
  extern "C" __global__ void __launch_bounds__(256) write_rows_b##n##_##it(const GatherParams p) { pdl_enter(); write_rows<E, I>(p); } \
  extern "C" __global__ void __launch_bounds__(256) write_rows_b##n##_##it##_x2(const GatherParams2 p) { pdl_enter();                  \
    if (blockIdx.y == 0) /* constant indices: the blocks stay in parameter space */                                    \
      write_rows<E, I>(p.p[0]);                                                                                         \
    else                                                                                                                \
      write_rows<E, I>(p.p[1]);                                                                                         \
  }
WRITE_ROWS(1, unsigned char, i32, int)
WRITE_ROWS(2, unsigned short, i32, int)
WRITE_ROWS(4, unsigned int, i32, int)
WRITE_ROWS(8, unsigned long long, i32, int)
WRITE_ROWS(1, unsigned char, i64, i64)
WRITE_ROWS(2, unsigned short, i64, i64)
WRITE_ROWS(4, unsigned int, i64, i64)
WRITE_ROWS(8, unsigned long long, i64, i64)

#define MOE(t, T, it, I)                                                                                         \
  extern "C" __global__ void __launch_bounds__(256) moe_dispatch_##t##_##it(const MoeParams p) { pdl_enter(); moe_dispatch<T, I>(p); } \
  extern "C" __global__ void __launch_bounds__(256) moe_combine_##t##_##it(const MoeParams p) { pdl_enter(); moe_combine<T, I>(p); }
MOE(f32, float, i32, int)
MOE(bf16, bf16, i32, int)
MOE(f16, f16, i32, int)
MOE(f32, float, i64, i64)
MOE(bf16, bf16, i64, i64)
MOE(f16, f16, i64, i64)

// Reduction: one thread per output element over `nred` elements. The kept axes (dims_o,
// st_o) and the reduced axes (dims_r, st_r) index the input. op: 0 sum, 1 mean, 2 max, 3 min.
struct ReduceParams {
  i64 x, out, nout, nred;
  int rank_o, rank_r, op, pad_;
  i64 dims_o[MAXR], st_o[MAXR], dims_r[MAXR], st_r[MAXR];
};

template <typename T>
__device__ void reduce(const ReduceParams p) {
  for (i64 o = blockIdx.x * (i64)blockDim.x + threadIdx.x; o < p.nout; o += (i64)gridDim.x * blockDim.x) {
    i64 rem = o, base = 0;
    for (int a = p.rank_o - 1; a >= 0; a--) {
      base += (rem % p.dims_o[a]) * p.st_o[a];
      rem /= p.dims_o[a];
    }
    float acc = p.op == 2 ? -KILN_INF : (p.op == 3 ? KILN_INF : 0.0f);
    for (i64 r = 0; r < p.nred; r++) {
      i64 rr = r, off = base;
      for (int a = p.rank_r - 1; a >= 0; a--) {
        off += (rr % p.dims_r[a]) * p.st_r[a];
        rr /= p.dims_r[a];
      }
      float v = to_f32(((const T*)p.x)[off]);
      acc = p.op == 2 ? fmaxf(acc, v) : (p.op == 3 ? fminf(acc, v) : acc + v);
    }
    if (p.op == 1) acc /= (float)p.nred;
    ((T*)p.out)[o] = from_f32<T>(acc);
  }
}

// Iota: out[i] = start + step * ((i / inner) % len).
struct IotaParams {
  i64 out, n, inner, len;
  double start, step;
};

template <typename T>
__device__ void iota(const IotaParams p) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
    double v = p.start + p.step * (double)((i / p.inner) % p.len);
    ((T*)p.out)[i] = from_f32<T>((float)v);
  }
}
template <> __device__ void iota<i64>(const IotaParams p) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x)
    ((i64*)p.out)[i] = (i64)(p.start + p.step * (double)((i / p.inner) % p.len));
}

#define RED(t, T) extern "C" __global__ void __launch_bounds__(256) reduce_##t(const ReduceParams p) { pdl_enter(); reduce<T>(p); }
RED(f32, float)
RED(bf16, bf16)
RED(f16, f16)
#define IOTA(t, T) extern "C" __global__ void __launch_bounds__(256) iota_##t(const IotaParams p) { pdl_enter(); iota<T>(p); }
IOTA(f32, float)
IOTA(bf16, bf16)
IOTA(f16, f16)
IOTA(i32, int)
IOTA(i64, i64)
