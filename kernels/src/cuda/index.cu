// Index and axis ops: cumulative sum, top-k, take-along-axis (torch.gather), scatter-add,
// softmax over an axis other than the last, and 2-D resampling (bilinear / bicubic).
//
// Axis-wise kernels view their tensors as [outer, len, inner] around the axis. Every kernel
// is deterministic: scatter-add gathers, for each output element, the entries that name it
// in index order (no atomics), and the scan's partition depends only on blockDim. Launch:
// blockDim.x = 256 (the `buf` arrays below assume at most 256 threads); grids stride.

// Sums: floats accumulate in double, integers in 64-bit two's complement (wrapping), and the
// total is rounded to the element type once, as the interpreter rounds its f64 sum.
struct b8 {  // bool: one byte, 0 or 1
  u8 v;
};
template <typename T> struct Sum;
template <> struct Sum<float> {
  typedef double A;
  static __device__ __forceinline__ A load(float x) { return (double)x; }
  static __device__ __forceinline__ float store(A a) { return (float)a; }
};
template <> struct Sum<bf16> {
  typedef double A;
  static __device__ __forceinline__ A load(bf16 x) { return (double)to_f32(x); }
  static __device__ __forceinline__ bf16 store(A a) { return from_f32<bf16>((float)a); }
};
template <> struct Sum<f16> {
  typedef double A;
  static __device__ __forceinline__ A load(f16 x) { return (double)to_f32(x); }
  static __device__ __forceinline__ f16 store(A a) { return from_f32<f16>((float)a); }
};
template <> struct Sum<int> {
  typedef unsigned long long A;
  static __device__ __forceinline__ A load(int x) { return (A)(i64)x; }
  static __device__ __forceinline__ int store(A a) { return (int)(unsigned)a; }
};
template <> struct Sum<i64> {
  typedef unsigned long long A;
  static __device__ __forceinline__ A load(i64 x) { return (A)x; }
  static __device__ __forceinline__ i64 store(A a) { return (i64)a; }
};
template <> struct Sum<u8> {
  typedef unsigned long long A;
  static __device__ __forceinline__ A load(u8 x) { return (A)x; }
  static __device__ __forceinline__ u8 store(A a) { return (u8)a; }
};
template <> struct Sum<b8> {
  typedef unsigned long long A;
  static __device__ __forceinline__ A load(b8 x) { return (A)x.v; }
  static __device__ __forceinline__ b8 store(A a) {
    b8 r;
    r.v = a != 0 ? 1 : 0;
    return r;
  }
};

// Grid-stride loop over [0, n) with one thread per element.
#define FOR_EACH(e, n) for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < (n); e += (i64)gridDim.x * blockDim.x)

// Lines along the middle axis of [outer, len, inner] (cumsum, softmax over an axis).
struct LineParams {
  i64 x, out, outer, len, inner;
  int exclusive, pad_;
};

// Exclusive prefix sum over the block (blockDim.x <= 256): each thread gets the sum of the
// values of the threads before it. Hillis-Steele in shared memory; `buf` is free on return.
template <typename A>
__device__ A block_exclusive(A v, A* buf) {
  const int t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  for (int o = 1; o < (int)blockDim.x; o <<= 1) {
    A u = t >= o ? buf[t - o] : (A)0;
    __syncthreads();
    buf[t] += u;
    __syncthreads();
  }
  A r = t > 0 ? buf[t - 1] : (A)0;
  __syncthreads();
  return r;
}

// Running sum: one block per line; thread t scans the chunk [t*c, (t+1)*c) of it after a
// block scan of the chunk totals. grid (lines, clamped; blocks stride), block 256.
template <typename T>
__device__ void cumsum(const LineParams p) {
  typedef typename Sum<T>::A A;
  __shared__ A buf[256];
  const i64 lines = p.outer * p.inner;
  const i64 chunk = (p.len + blockDim.x - 1) / blockDim.x;
  const i64 j0 = min(p.len, (i64)threadIdx.x * chunk), j1 = min(p.len, j0 + chunk);
  for (i64 line = blockIdx.x; line < lines; line += gridDim.x) {
    const i64 base = (line / p.inner) * p.len * p.inner + line % p.inner;
    const T* x = (const T*)p.x + base;
    T* o = (T*)p.out + base;
    A s = 0;
    for (i64 j = j0; j < j1; j++) s += Sum<T>::load(x[j * p.inner]);
    A acc = block_exclusive<A>(s, buf);
    for (i64 j = j0; j < j1; j++) {
      const A v = Sum<T>::load(x[j * p.inner]);
      if (p.exclusive) {
        o[j * p.inner] = Sum<T>::store(acc);
        acc += v;
      } else {
        acc += v;
        o[j * p.inner] = Sum<T>::store(acc);
      }
    }
  }
}

// Softmax over the middle axis: one thread per line (consecutive threads take consecutive
// inner positions, so reads coalesce). grid-stride over outer*inner lines.
template <typename T>
__device__ void softmax_axis(const LineParams p) {
  FOR_EACH(line, p.outer * p.inner) {
    const i64 base = (line / p.inner) * p.len * p.inner + line % p.inner;
    const T* x = (const T*)p.x + base;
    T* o = (T*)p.out + base;
    float mx = -KILN_INF;
    for (i64 j = 0; j < p.len; j++) mx = fmaxf(mx, to_f32(x[j * p.inner]));
    float s = 0.0f;
    for (i64 j = 0; j < p.len; j++) s += expf(to_f32(x[j * p.inner]) - mx);
    const float inv = 1.0f / s;
    for (i64 j = 0; j < p.len; j++) o[j * p.inner] = from_f32<T>(expf(to_f32(x[j * p.inner]) - mx) * inv);
  }
}

// Top-k indices (i64) along the last axis of x [rows, d] into out [rows, k], by rank: the
// thread of element j counts the elements ahead of it and writes j at that rank if it is
// below k. The order is a stable descending sort (ties to the lower index; NaN counts as
// the largest, so ranks stay a permutation): exactly the interpreter's order without NaN.
struct TopkParams {
  i64 x, out, rows, d, k;
};

__device__ __forceinline__ float key(float x) { return x; }
__device__ __forceinline__ float key(bf16 x) { return to_f32(x); }
__device__ __forceinline__ float key(f16 x) { return to_f32(x); }
__device__ __forceinline__ int key(int x) { return x; }
__device__ __forceinline__ i64 key(i64 x) { return x; }
__device__ __forceinline__ int key(u8 x) { return (int)x; }

// Whether value w at index e comes before value v at index j.
template <typename K>
__device__ __forceinline__ bool ahead(K w, i64 e, K v, i64 j) {
  const bool wn = w != w, vn = v != v;
  if (wn || vn) return wn && (!vn || e < j);
  return w > v || (w == v && e < j);
}

template <typename T>
__device__ void topk(const TopkParams p) {
  FOR_EACH(e, p.rows * p.d) {
    const i64 r = e / p.d, j = e % p.d;
    const T* x = (const T*)p.x + r * p.d;
    const auto v = key(x[j]);
    i64 rank = 0;
    for (i64 c = 0; c < p.d && rank < p.k; c++) rank += ahead(key(x[c]), c, v, j) ? 1 : 0;
    if (rank < p.k) ((i64*)p.out)[r * p.k + rank] = j;
  }
}

// Take-along-axis and scatter-add: x (the source, or scatter's base) [outer, len, inner];
// idx and src [outer, ilen, inner]; out [outer, ilen, inner] (take) or [outer, len, inner]
// (scatter). An index outside [0, len) sets *err (the host reports it); take writes zero.
struct AlongParams {
  i64 x, idx, src, out, err;
  i64 outer, len, ilen, inner;
};

template <typename E, typename I>
__device__ void take_along(const AlongParams p) {
  FOR_EACH(e, p.outer * p.ilen * p.inner) {
    const i64 c = e % p.inner, o = e / (p.ilen * p.inner);
    const i64 k = (i64)((const I*)p.idx)[e];
    E v = E(0);
    if (k >= 0 && k < p.len) v = ((const E*)p.x)[(o * p.len + k) * p.inner + c];
    else if (p.err) *(int*)p.err = 1;
    ((E*)p.out)[e] = v;
  }
}

// out[o, t, c] = x[o, t, c] + sum over j (ascending) with idx[o, j, c] == t of src[o, j, c]:
// the interpreter's order of additions. The threads of t == 0 report bad indices.
template <typename T, typename I>
__device__ void scatter_add(const AlongParams p) {
  typedef typename Sum<T>::A A;
  FOR_EACH(e, p.outer * p.len * p.inner) {
    const i64 c = e % p.inner, t = (e / p.inner) % p.len, o = e / (p.len * p.inner);
    const I* ix = (const I*)p.idx + o * p.ilen * p.inner + c;
    const T* src = (const T*)p.src + o * p.ilen * p.inner + c;
    A acc = Sum<T>::load(((const T*)p.x)[e]);
    for (i64 j = 0; j < p.ilen; j++) {
      const i64 k = (i64)ix[j * p.inner];
      if (k == t) acc += Sum<T>::load(src[j * p.inner]);
      else if (t == 0 && (k < 0 || k >= p.len) && p.err) *(int*)p.err = 1;
    }
    ((T*)p.out)[e] = Sum<T>::store(acc);
  }
}

// Resampling of the last two axes, x [planes, ih, iw] -> out [planes, oh, ow], as PyTorch's
// interpolate(align_corners=False, antialias=False): source coordinate (o + 0.5) * in / out
// - 0.5 (clamped at 0 for bilinear), taps clamped to the border, bicubic with A = -0.75.
// Coordinates and weights in double (the interpreter's), the weighted sum in f32.
struct ResizeParams {
  i64 x, out, planes, ih, iw, oh, ow;
  int cubic, pad_;
};

__device__ __forceinline__ void resize_taps(i64 o, i64 in, i64 out, int cubic, i64* at, float* w) {
  double src = ((double)o + 0.5) * ((double)in / (double)out) - 0.5;
  if (!cubic && src < 0.0) src = 0.0;
  const double f = floor(src);
  const double t = src - f;
  const i64 i0 = (i64)f;
  if (cubic) {
    const double a = -0.75;
    const double u = t + 1.0, v = 1.0 - t, z = 2.0 - t;
    w[0] = (float)(((a * u - 5.0 * a) * u + 8.0 * a) * u - 4.0 * a);
    w[1] = (float)(((a + 2.0) * t - (a + 3.0)) * t * t + 1.0);
    w[2] = (float)(((a + 2.0) * v - (a + 3.0)) * v * v + 1.0);
    w[3] = (float)(((a * z - 5.0 * a) * z + 8.0 * a) * z - 4.0 * a);
#pragma unroll
    for (int q = 0; q < 4; q++) at[q] = min(max(i0 - 1 + q, (i64)0), in - 1);
  } else {
    w[0] = (float)(1.0 - t);
    w[1] = (float)t;
    w[2] = w[3] = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; q++) at[q] = min(max(i0 + (q == 1 ? 1 : 0), (i64)0), in - 1);
  }
}

template <typename T>
__device__ void resize(const ResizeParams p) {
  const int taps = p.cubic ? 4 : 2;
  FOR_EACH(e, p.planes * p.oh * p.ow) {
    const i64 ox = e % p.ow, oy = (e / p.ow) % p.oh, pl = e / (p.ow * p.oh);
    i64 ay[4], ax[4];
    float wy[4], wx[4];
    resize_taps(oy, p.ih, p.oh, p.cubic, ay, wy);
    resize_taps(ox, p.iw, p.ow, p.cubic, ax, wx);
    const T* x = (const T*)p.x + pl * p.ih * p.iw;
    float s = 0.0f;
#pragma unroll
    for (int a = 0; a < 4; a++) {
      if (a < taps) {
        float r = 0.0f;
#pragma unroll
        for (int b = 0; b < 4; b++)
          if (b < taps) r += wx[b] * to_f32(x[ay[a] * p.iw + ax[b]]);
        s += wy[a] * r;
      }
    }
    ((T*)p.out)[e] = from_f32<T>(s);
  }
}

#define CUMSUM(t, T) extern "C" __global__ void __launch_bounds__(256) cumsum_##t(const LineParams p) { pdl_enter(); cumsum<T>(p); }
CUMSUM(f32, float)
CUMSUM(bf16, bf16)
CUMSUM(f16, f16)
CUMSUM(i32, int)
CUMSUM(i64, i64)
CUMSUM(u8, u8)
CUMSUM(bool, b8)

#define TOPK(t, T) extern "C" __global__ void __launch_bounds__(256) topk_##t(const TopkParams p) { pdl_enter(); topk<T>(p); }
TOPK(f32, float)
TOPK(bf16, bf16)
TOPK(f16, f16)
TOPK(i32, int)
TOPK(i64, i64)
TOPK(u8, u8)

#define TAKE_ALONG(n, E, it, I) \
  extern "C" __global__ void __launch_bounds__(256) take_along_b##n##_##it(const AlongParams p) { pdl_enter(); take_along<E, I>(p); }
TAKE_ALONG(1, unsigned char, i32, int)
TAKE_ALONG(2, unsigned short, i32, int)
TAKE_ALONG(4, unsigned int, i32, int)
TAKE_ALONG(8, unsigned long long, i32, int)
TAKE_ALONG(1, unsigned char, i64, i64)
TAKE_ALONG(2, unsigned short, i64, i64)
TAKE_ALONG(4, unsigned int, i64, i64)
TAKE_ALONG(8, unsigned long long, i64, i64)

#define SCATTER_ADD(t, T, it, I) \
  extern "C" __global__ void __launch_bounds__(256) scatter_add_##t##_##it(const AlongParams p) { pdl_enter(); scatter_add<T, I>(p); }
SCATTER_ADD(f32, float, i32, int)
SCATTER_ADD(bf16, bf16, i32, int)
SCATTER_ADD(f16, f16, i32, int)
SCATTER_ADD(i32, int, i32, int)
SCATTER_ADD(i64, i64, i32, int)
SCATTER_ADD(u8, u8, i32, int)
SCATTER_ADD(bool, b8, i32, int)
SCATTER_ADD(f32, float, i64, i64)
SCATTER_ADD(bf16, bf16, i64, i64)
SCATTER_ADD(f16, f16, i64, i64)
SCATTER_ADD(i32, int, i64, i64)
SCATTER_ADD(i64, i64, i64, i64)
SCATTER_ADD(u8, u8, i64, i64)
SCATTER_ADD(bool, b8, i64, i64)

#define AXIS_FLOAT(t, T)                                                                                                \
  extern "C" __global__ void __launch_bounds__(256) softmax_axis_##t(const LineParams p) { pdl_enter(); softmax_axis<T>(p); } \
  extern "C" __global__ void __launch_bounds__(256) resize_##t(const ResizeParams p) { pdl_enter(); resize<T>(p); }
AXIS_FLOAT(f32, float)
AXIS_FLOAT(bf16, bf16)
AXIS_FLOAT(f16, f16)

// Log-softmax over the last axis of f32 x [outer, len] into out (`Op::LogSoftmax`, as
// kiln_graph::sample::log_softmax computes it): one block per row; the row's max, the sum of
// exp(x - max) in double (each thread's strided part, then a tree over the block: another
// order of additions than the host's, so the sum may differ in its last double bits),
// lse = max + log(sum), out = (float)((double)x - lse).
extern "C" __global__ void __launch_bounds__(256) log_softmax_f32(const LineParams p) { pdl_enter();
  __shared__ double red[256];
  const int t = threadIdx.x;
  for (i64 r = blockIdx.x; r < p.outer; r += gridDim.x) {
    const float* x = (const float*)p.x + r * p.len;
    float* o = (float*)p.out + r * p.len;
    double m = __longlong_as_double(0xfff0000000000000ll);  // -inf
    for (i64 i = t; i < p.len; i += blockDim.x) m = fmax(m, (double)x[i]);
    red[t] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (t < s) red[t] = fmax(red[t], red[t + s]);
      __syncthreads();
    }
    m = red[0];
    __syncthreads();
    double sum = 0.0;
    for (i64 i = t; i < p.len; i += blockDim.x) sum += exp((double)x[i] - m);
    red[t] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (t < s) red[t] += red[t + s];
      __syncthreads();
    }
    const double lse = m + log(red[0]);
    __syncthreads();
    for (i64 i = t; i < p.len; i += blockDim.x) o[i] = (float)((double)x[i] - lse);
  }
}

// The log-sum-exp of one f32 row as log_softmax_f32 takes it (and kiln_graph::sample::
// log_sum_exp, up to the order of additions), by one block (blockDim.x <= 256, `red` its shared
// scratch): the row's max, the sum of exp(x - max) in double, max + log(sum). Every thread gets
// it; `red` is free on return.
__device__ __forceinline__ double row_log_sum_exp(const float* x, i64 len, double* red) {
  const int t = threadIdx.x;
  double m = __longlong_as_double(0xfff0000000000000ll);  // -inf
  for (i64 i = t; i < len; i += blockDim.x) m = fmax(m, (double)x[i]);
  red[t] = m;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) red[t] = fmax(red[t], red[t + s]);
    __syncthreads();
  }
  m = red[0];
  __syncthreads();
  double sum = 0.0;
  for (i64 i = t; i < len; i += blockDim.x) sum += exp((double)x[i] - m);
  red[t] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) red[t] += red[t + s];
    __syncthreads();
  }
  const double lse = m + log(red[0]);
  __syncthreads();
  return lse;
}

// One token's log-probability per row (`Op::TokenLogProb`, kiln_graph::sample::token_log_prob):
// f32 x [outer, len], idx [outer] (the ids), out f32 [outer]; one block per row,
// out = (float)((double)x[id] - lse), the element log_softmax_f32 would write there. An id
// outside [0, len) writes 0 and sets *err (the host reports it).
template <typename I>
__device__ void token_log_prob(const AlongParams p) {
  __shared__ double red[256];
  for (i64 r = blockIdx.x; r < p.outer; r += gridDim.x) {
    const float* x = (const float*)p.x + r * p.len;
    const double lse = row_log_sum_exp(x, p.len, red);
    if (threadIdx.x == 0) {
      const i64 k = (i64)((const I*)p.idx)[r];
      float v = 0.0f;
      if (k >= 0 && k < p.len) v = (float)((double)x[k] - lse);
      else if (p.err) *(int*)p.err = 1;
      ((float*)p.out)[r] = v;
    }
  }
}
extern "C" __global__ void __launch_bounds__(256) token_log_prob_f32_i32(const AlongParams p) { pdl_enter(); token_log_prob<int>(p); }
extern "C" __global__ void __launch_bounds__(256) token_log_prob_f32_i64(const AlongParams p) { pdl_enter(); token_log_prob<i64>(p); }

// The next token per row (`Op::SampleToken`, kiln_graph::sample): one block per row.
// x: f32 logits [rows, v]; opts: f32 [temperature, top_p]; ctr: i64 [top_k, seed_hi, seed_lo,
// step]; streams: i64 [rows]; out: i64 [rows]; scratch: int [rows, v] (top-p's order).
// Greedy (temperature <= 0) is the first argmax, reduced across the block. Sampling follows
// the host's code step by step in double: scores x / T; top-k's k-th largest score found by a
// radix select over the scores' ordered bits (exact); top-p's ascending order (stable by
// index) sorted by thread 0 in the scratch and its running sum taken in that order; the draw
// summed in index order by thread 0. Bad options set *err (the host reports it).
struct SampleParams {
  i64 x, opts, ctr, streams, out, err, scratch, rows, v;
};

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
// Ordered bits of a double: a < b (total order, -0 < +0) iff okey(a) < okey(b).
__device__ __forceinline__ unsigned long long okey(double d) {
  const unsigned long long b = (unsigned long long)__double_as_longlong(d);
  return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}
__device__ __forceinline__ double from_okey(unsigned long long k) {
  return __longlong_as_double((long long)((k >> 63) ? (k & 0x7fffffffffffffffull) : ~k));
}
// (score, index) ascending, as the host's top-p sort.
__device__ __forceinline__ bool before(const float* x, double t, int a, int b) {
  const unsigned long long ka = okey((double)x[a] / t), kb = okey((double)x[b] / t);
  return ka < kb || (ka == kb && a < b);
}
__device__ void sift(int* h, int n, int i, const float* x, double t) {
  for (;;) {
    int c = 2 * i + 1;
    if (c >= n) return;
    if (c + 1 < n && before(x, t, h[c], h[c + 1])) c++;
    if (!before(x, t, h[i], h[c])) return;
    const int s = h[i];
    h[i] = h[c];
    h[c] = s;
    i = c;
  }
}

// Whether the options are bad (the host's checks): a non-finite temperature, top-p outside
// (0, 1] when sampling, a counter outside [0, 2^32).
__device__ __forceinline__ bool bad_options(const SampleParams& p) {
  const float* o = (const float*)p.opts;
  const i64* c = (const i64*)p.ctr;
  const double t = (double)o[0], top_p = (double)o[1];
  return !(fabs(t) <= 1.7976931348623157e308) || (t > 0.0 && !(top_p > 0.0 && top_p <= 1.0)) || c[0] < 0 || c[0] >= (1ll << 32) ||
         c[1] < 0 || c[1] >= (1ll << 32) || c[2] < 0 || c[2] >= (1ll << 32) || c[3] < 0 || c[3] >= (1ll << 32);
}

// Row `r`'s token by the whole block; thread 0 writes it. The block may reuse its shared memory
// after a __syncthreads().
__device__ __forceinline__ void sample_row(const SampleParams& p, const bool bad, const i64 r) {
  __shared__ float bv[256];
  __shared__ i64 bi[256];
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long prefix;
  __shared__ i64 want;
  const float* o = (const float*)p.opts;
  const i64* c = (const i64*)p.ctr;
  const double t = (double)o[0], top_p = (double)o[1];
  {
    const float* x = (const float*)p.x + r * p.v;
    i64* out = (i64*)p.out + r;
    if (bad || ((const i64*)p.streams)[r] < 0) {
      if (threadIdx.x == 0) {
        *out = 0;
        if (p.err) *(int*)p.err = 1;
      }
      return;
    }
    if (t <= 0.0 || p.v < 2) {
      float best = x[0];
      i64 at = 0;
      for (i64 i = threadIdx.x; i < p.v; i += blockDim.x) {
        if (x[i] > best) best = x[i], at = i;
      }
      bv[threadIdx.x] = best;
      bi[threadIdx.x] = at;
      __syncthreads();
      for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
          const float v2 = bv[threadIdx.x + s];
          const i64 i2 = bi[threadIdx.x + s];
          if (v2 > bv[threadIdx.x] || (v2 == bv[threadIdx.x] && i2 < bi[threadIdx.x])) bv[threadIdx.x] = v2, bi[threadIdx.x] = i2;
        }
        __syncthreads();
      }
      if (threadIdx.x == 0) *out = bi[0];
      __syncthreads();
      return;
    }
    // Top-k: the k-th largest score (with multiplicity), 8 bits of its ordered key at a time.
    const i64 k = c[0];
    double kth = __longlong_as_double(0xfff0000000000000ll);  // -inf: every score kept
    if (k > 0 && k < p.v) {
      if (threadIdx.x == 0) prefix = 0, want = k;
      unsigned long long mask = 0;
      for (int shift = 56; shift >= 0; shift -= 8) {
        hist[threadIdx.x] = 0;
        __syncthreads();
        for (i64 i = threadIdx.x; i < p.v; i += blockDim.x) {
          const unsigned long long key = okey((double)x[i] / t);
          if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          for (int b = 255; b >= 0; b--) {
            if (want <= (i64)hist[b]) {
              prefix |= (unsigned long long)b << shift;
              break;
            }
            want -= hist[b];
          }
        }
        mask |= 255ull << shift;
        __syncthreads();
      }
      kth = from_okey(prefix);
    }
    if (threadIdx.x == 0) {
      // Top-p: the kept scores ascending (stable by index); a prefix whose running share is
      // at most 1 - p goes, the largest always stays. `lo` is the last dropped (or -1).
      int* h = (int*)p.scratch + r * p.v;
      int n = 0;
      for (int i = 0; i < p.v; i++) {
        if ((double)x[i] / t >= kth) h[n++] = i;
      }
      int lo = -1;
      if (top_p < 1.0 && n > 1) {
        for (int i = n / 2 - 1; i >= 0; i--) sift(h, n, i, x, t);
        for (int e = n - 1; e > 0; e--) {
          const int s = h[0];
          h[0] = h[e];
          h[e] = s;
          sift(h, e, 0, x, t);
        }
        const double mx = (double)x[h[n - 1]] / t;
        double z = 0.0, cum = 0.0;
        for (int j = 0; j < n; j++) z += exp((double)x[h[j]] / t - mx);
        for (int j = 0; j + 1 < n; j++) {
          cum += exp((double)x[h[j]] / t - mx) / z;
          if (cum <= 1.0 - top_p) lo = h[j];
          else break;
        }
      }
      const unsigned long long seed = ((unsigned long long)c[1] << 32) | (unsigned long long)c[2];
      const unsigned long long hsh =
          mix64(mix64(mix64(seed) ^ (unsigned long long)((const i64*)p.streams)[r]) ^ (unsigned long long)c[3]);
      const double u = (double)(hsh >> 11) / 9007199254740992.0;
      // The draw over what is kept, in index order.
      double mx = __longlong_as_double(0xfff0000000000000ll), total = 0.0, cum = 0.0;
      i64 last = 0;
      for (int i = 0; i < p.v; i++) {
        const double s = (double)x[i] / t;
        if (s >= kth && (lo < 0 || !before(x, t, i, lo) && i != lo)) mx = fmax(mx, s);
      }
      for (int i = 0; i < p.v; i++) {
        const double s = (double)x[i] / t;
        if (s >= kth && (lo < 0 || !before(x, t, i, lo) && i != lo)) total += exp(s - mx);
      }
      i64 pick = -1;
      for (int i = 0; i < p.v && pick < 0; i++) {
        const double s = (double)x[i] / t;
        if (s >= kth && (lo < 0 || !before(x, t, i, lo) && i != lo)) {
          cum += exp(s - mx) / total;
          last = i;
          if (u < cum) pick = i;
        }
      }
      *out = pick < 0 ? last : pick;
    }
    __syncthreads();
  }
}

extern "C" __global__ void __launch_bounds__(256) sample_token_f32(const SampleParams p) { pdl_enter();
  const bool bad = bad_options(p);
  for (i64 r = blockIdx.x; r < p.rows; r += gridDim.x) sample_row(p, bad, r);
}

// The next token and its log-probability in one launch (issue 16: a generation step's last two
// steps, `Op::SampleToken` then `Op::TokenLogProb` of the token it chose, merged by the cuda
// lowering, runtime/src/cuda/lower/fold.rs): per row, sample_token_f32's row, then, once its id
// is written, token_log_prob's row on the same logits (still in cache), with the same bits.
struct SampleLogProbParams {
  SampleParams s;
  i64 logprob;
};
extern "C" __global__ void __launch_bounds__(256) sample_token_log_prob_f32(const SampleLogProbParams q) { pdl_enter();
  __shared__ double red[256];
  const SampleParams& p = q.s;
  const bool bad = bad_options(p);
  for (i64 r = blockIdx.x; r < p.rows; r += gridDim.x) {
    sample_row(p, bad, r);
    __syncthreads();  // the id thread 0 wrote is visible to the block
    const float* x = (const float*)p.x + r * p.v;
    const double lse = row_log_sum_exp(x, p.v, red);
    if (threadIdx.x == 0) {
      const i64 k = ((const i64*)p.out)[r];
      float v = 0.0f;
      if (k >= 0 && k < p.v) v = (float)((double)x[k] - lse);
      else if (p.err) *(int*)p.err = 1;
      ((float*)q.logprob)[r] = v;
    }
  }
}
