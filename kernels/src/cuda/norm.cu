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
  extern "C" __global__ void __launch_bounds__(256) layer_norm_##t(const NormParams p) { layer_norm<T>(p); } \
  extern "C" __global__ void __launch_bounds__(256) rms_norm_##t(const NormParams p) { rms_norm<T>(p); }     \
  extern "C" __global__ void __launch_bounds__(256) softmax_##t(const NormParams p) { softmax<T>(p); }
NORMS(f32, float)
NORMS(bf16, bf16)
NORMS(f16, f16)
