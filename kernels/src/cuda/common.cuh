// Shared helpers of kiln's CUDA kernels. NVRTC ships no cuda_fp16.h / cuda_bf16.h in the
// nvidia-cuda-nvrtc wheel, so half types are stored as 16-bit integers and converted with
// PTX `cvt` instructions (sm_80+ for bf16).
typedef unsigned short bf16_t;
typedef unsigned short f16_t;
typedef long long i64;
typedef unsigned char u8;
#define KILN_INF __int_as_float(0x7f800000)

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_f32(int x) { return (float)x; }
__device__ __forceinline__ float to_f32(i64 x) { return (float)x; }
__device__ __forceinline__ float to_f32(u8 x) { return (float)x; }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}
template <> __device__ __forceinline__ int from_f32<int>(float x) { return (int)x; }
template <> __device__ __forceinline__ i64 from_f32<i64>(float x) { return (i64)x; }
template <> __device__ __forceinline__ u8 from_f32<u8>(float x) { return (u8)x; }

// Two f32 values packed into one 32-bit register of two halves (low half first), the
// operand format of mma.sync.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<bf16>(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ unsigned pack2<f16>(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : 0.0f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : -KILN_INF;
  return warp_max(v);
}

// Attention masks (graph MaskKind): 0 none, 1 causal, 2 sliding window, 3 additive [B,Sq,Sk],
// 4 positions (graph PosMask: causal from the i64 start at p.pos, window when p.window > 0,
// key padding keep [B,Sk] and prefix lengths [B] (i64) when their addresses are not 0).
#define MASK_NONE 0
#define MASK_CAUSAL 1
#define MASK_SLIDING 2
#define MASK_ADDITIVE 3
#define MASK_POSITIONS 4

// Parameters of every attention launch (by value; the layout matches `AttnParams` in Rust).
struct AttnParams {
  i64 q, k, v, mask, out, partial;  // device addresses; partial: split-K scratch (f32)
  i64 pos, keep, prefix;            // position mask operands (i64), 0 when absent
  int batch, sq, sk, hq, hkv, d, dv;
  int mask_kind, q_offset, window, splits, pad_;
  float scale, softcap;  // softcap <= 0: none
  // u32 per output row, zero between launches: attn_rows1's count of finished splits. Last,
  // so the kernels compiled before it read the fields above where they were.
  i64 counters;
  // attn_rows_new / attn_rows1_new: K's and V's new rows [B, n, Hkv, D] and [B, n, Hkv, Dv],
  // which the launch reads for keys [at, at + n) and stores into the caches k and v there; at
  // is read from the 1-element index at `at` (i64 when at_i64, else i32); err is set on a
  // position that does not fit. After counters, so older kernels read the fields above.
  i64 new_k, new_v, at, err;
  int at_i64, n;
  // attn_mma_new (prefill, Sq == Sk): the caches [B, cache_rows, Hkv, D] into which the launch
  // stores its own keys and values k and v at rows [at, at + Sk) (at, at_i64 and err as above).
  // After n, so older kernels read the fields above.
  i64 cache_k, cache_v;
  int cache_rows, pad2_;
};

// Key index of query row 0: static, or read from the position mask's start (negative reads 0).
__device__ __forceinline__ int q_start(const AttnParams& p) {
  if (p.mask_kind != MASK_POSITIONS) return p.q_offset;
  i64 s = *(const i64*)p.pos;
  return s < 0 ? 0 : (int)s;
}

// A position mask's prefix length for batch row b (0 without one).
__device__ __forceinline__ int prefix_of(const AttnParams& p, int b) {
  if (p.mask_kind != MASK_POSITIONS || p.prefix == 0) return 0;
  i64 v = ((const i64*)p.prefix)[b];
  return v < 0 ? 0 : (int)v;
}

// One past the last key that query rows up to `i` of batch row b may see: decode under a
// position mask reads the filled keys only, not the cache's capacity.
__device__ __forceinline__ int key_end(const AttnParams& p, int b, int i) {
  if (p.mask_kind == MASK_POSITIONS) return min(p.sk, max(q_start(p) + i + 1, prefix_of(p, b)));
  if (p.mask_kind == MASK_CAUSAL || p.mask_kind == MASK_SLIDING) return min(p.sk, p.q_offset + i + 1);
  return p.sk;
}

// Whether key `j` is visible to query row `i` of batch row `b` under a structural mask.
__device__ __forceinline__ bool visible(const AttnParams& p, int b, int i, int j) {
  int qpos = q_start(p) + i;
  if (p.mask_kind == MASK_CAUSAL) return j <= qpos;
  if (p.mask_kind == MASK_SLIDING) return j <= qpos && j > qpos - p.window;
  if (p.mask_kind == MASK_POSITIONS) {
    bool causal = j <= qpos && (p.window <= 0 || j > qpos - p.window);
    int pre = prefix_of(p, b);
    if (!causal && !(qpos < pre && j < pre)) return false;
    return p.keep == 0 || ((const i64*)p.keep)[(i64)b * p.sk + j] != 0;
  }
  return true;
}

// Scaled, soft-capped, masked score.
template <typename T>
__device__ __forceinline__ float score_of(const AttnParams& p, float dot, int b, int i, int j) {
  float s = dot * p.scale;
  if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
  if (!visible(p, b, i, j)) return -KILN_INF;
  if (p.mask_kind == MASK_ADDITIVE) s += to_f32(((const T*)p.mask)[((i64)b * p.sq + i) * p.sk + j]);
  return s;
}

// The Rust struct's size (`param_structs_have_the_c_layout` checks its offsets there).
static_assert(sizeof(AttnParams) == 200, "AttnParams differs from the Rust struct");

// Programmatic dependent launch (PDL; `CudaBackend::pdl`): a kernel launched with the
// programmatic stream serialization attribute may start while the kernel before it in the
// stream still runs. `griddepcontrol.wait` (PTX ISA 7.8, sm_90+) waits until the prerequisite
// grids in flight have completed and their memory operations are visible; every kiln kernel
// executes it in every thread before its first read of memory another kernel writes and
// before its first global store (the GEMVs prefetch their weight rows into L2 before it:
// weights are never written on the device). `griddepcontrol.launch_dependents` lets the next
// such launch be scheduled once every CTA of this grid has executed it or exited; the next
// kernel's own wait still waits for this grid to complete. Below sm_90 both compile to
// nothing.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The entry of a kernel that has nothing to read before the wait: waits, then allows the
// next kernel's CTAs (scheduled once every CTA of this grid has got here or exited).
__device__ __forceinline__ void pdl_enter() {
  pdl_wait();
  pdl_launch_dependents();
}
// Prefetches the 128-byte L2 line holding `p` (global memory).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
// Present in every module built from this header: the runtime launches a module's kernels
// with the PDL attribute only where its CUBIN defines this symbol (CUBINs from before the
// waits existed launch as before).
extern "C" __device__ const int kiln_pdl_waits = 1;
