// kiln's CUDA C on the host (kernels/src/cuda/host/mod.rs): prepended, with ptx.h, to a
// module's source, which the C++ compiler then builds for this CPU. The threads of a block are
// cooperative fibers that switch only at barriers and warp collectives; blocks run one after
// another; launches are serialized by the caller (mod.rs), so `__shared__` variables are plain
// statics and the built-in indices plain globals. rewrite.rs rewrites, after preprocessing:
// `KILN_SHARED` (what `__shared__` expands to) into `static`, `extern __shared__` arrays into
// pointers to `kiln_host_dyn_smem`, `KILN_GLOBAL` (`__global__`) away, and each inline PTX
// statement into a call of the `kiln_ptx_*` function in ptx.h that implements it.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#define KILN_HOST 1
#define __global__ KILN_GLOBAL
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ KILN_SHARED

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

// The thread's built-in indices: set by the scheduler before it switches to a fiber.
uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
const int warpSize = 32;

// CUDA's min / max overloads (int, long long, unsigned, float, double and mixes of them, in
// the type of the usual arithmetic conversions; a value, not a reference to a parameter).
template <typename A, typename B> inline auto min(A a, B b) -> decltype(a + b) { return b < a ? b : a; }
template <typename A, typename B> inline auto max(A a, B b) -> decltype(a + b) { return a < b ? b : a; }

template <typename To, typename From> inline To kiln_bits(From f) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between sizes");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}
inline float __uint_as_float(unsigned u) { return kiln_bits<float>(u); }
inline float __int_as_float(int u) { return kiln_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return kiln_bits<unsigned>(f); }
inline int __float_as_int(float f) { return kiln_bits<int>(f); }
inline double __longlong_as_double(long long u) { return kiln_bits<double>(u); }
inline long long __double_as_longlong(double d) { return kiln_bits<long long>(d); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline void __threadfence() {}
inline void __threadfence_block() {}
// Fibers switch only at barriers, so a read-modify-write is atomic.
template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
template <typename T> inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }

// ---------------------------------------------------------------------------------------
// Fibers and barriers.

namespace kiln_host {
enum State { RUN, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };
const size_t STACK = 128 * 1024;  // bytes of each fiber's stack
const int WORDS = 12;  // 32-bit words a lane gives to / gets from a warp collective
struct Warp;
// Computes the results of a warp collective from what the lanes in `lanes` gave.
typedef void (*Collective)(Warp& w, unsigned lanes);
struct Warp {
  unsigned arrived, mask;  // lanes waiting; the lanes named by their sync masks
  Collective op;
  uint32_t in[32][WORDS], out[32][WORDS];
};
extern "C" void kiln_host_fiber_main();
#if defined(__x86_64__)
// A fiber's saved stack pointer; below it: MXCSR and the x87 control word, the callee-saved
// registers, the return address (System V AMD64). No signal mask is switched: unlike
// swapcontext, no system call per switch.
struct Context {
  void* sp;
};
extern "C" void kiln_host_switch(void** save, void* to);
asm(R"(
  .text
  .p2align 4
  .hidden kiln_host_switch
  .type kiln_host_switch, @function
kiln_host_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kiln_host_switch, .-kiln_host_switch
  .p2align 4
  .hidden kiln_host_fiber_start
  .type kiln_host_fiber_start, @function
kiln_host_fiber_start:
  andq $-16, %rsp
  call kiln_host_fiber_main
  ud2
  .size kiln_host_fiber_start, .-kiln_host_fiber_start
)");
extern "C" void kiln_host_fiber_start();
inline void switch_context(Context* save, Context* to) { kiln_host_switch(&save->sp, to->sp); }
// A fresh fiber on the stack [base, base + STACK): its first switch returns into
// kiln_host_fiber_start with the caller's floating-point control state.
inline void start_context(Context* c, char* base) {
  uint64_t* sp = (uint64_t*)(base + STACK);
  *--sp = 0;  // a spare slot: kiln_host_fiber_start realigns the stack before its call
  *--sp = (uint64_t)(uintptr_t)kiln_host_fiber_start;
  for (int r = 0; r < 6; ++r) *--sp = 0;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = (uint64_t)mxcsr | (uint64_t)fpucw << 32;
  c->sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context* save, Context* to) { swapcontext(&save->uc, &to->uc); }
inline void start_context(Context* c, char* base) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = base;
  c->uc.uc_stack.ss_size = STACK;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, kiln_host_fiber_main, 0);
}
#endif

struct Fiber {
  Context ctx;
  State state;
};
struct Block {
  Fiber* fibers;
  Warp* warps;
  int threads, live, current;
  const char* error;
  Context scheduler;
  void (*entry)(const void*);
  const void* params;
};
static Block* block;
static char* stacks;
static size_t stacks_size;
static Fiber* fibers;
static Warp* warps;
static size_t fibers_n;

inline void yield(State s) {
  Fiber& f = block->fibers[block->current];
  f.state = s;
  switch_context(&f.ctx, &block->scheduler);
}

// Runs lane's part of a collective over its warp: gives `in`, waits for the other lanes of
// `mask` that have not exited, gets its `out`. All lanes must call the same collective.
inline void collective(Collective op, unsigned mask, const uint32_t* in, int nin, uint32_t* out, int nout) {
  const int t = block->current, lane = t & 31;
  Warp& w = block->warps[t >> 5];
  if (w.arrived != 0 && w.op != op) block->error = "lanes of a warp wait in different collectives";
  w.op = op;
  w.mask |= mask;
  w.arrived |= 1u << lane;
  memcpy(w.in[lane], in, nin * 4);
  yield(AT_WARP_BARRIER);
  memcpy(out, w.out[lane], nout * 4);
}

// Releases the warps whose waiting lanes include every live lane of their masks, and the
// block barrier once every live thread waits there. Whether something was released.
inline bool settle() {
  Block& b = *block;
  bool released = false;
  for (int wi = 0; wi * 32 < b.threads; ++wi) {
    Warp& w = b.warps[wi];
    if (w.arrived == 0) continue;
    unsigned live = 0;
    for (int l = 0; l < 32 && wi * 32 + l < b.threads; ++l)
      if (b.fibers[wi * 32 + l].state != DONE) live |= 1u << l;
    if ((w.mask & live & ~w.arrived) != 0) continue;
    w.op(w, w.arrived);
    for (int l = 0; l < 32; ++l)
      if (w.arrived >> l & 1) b.fibers[wi * 32 + l].state = RUN;
    w.arrived = 0;
    w.mask = 0;
    released = true;
  }
  int waiting = 0;
  for (int i = 0; i < b.threads; ++i) waiting += b.fibers[i].state == AT_BLOCK_BARRIER;
  if (waiting > 0 && waiting == b.live) {
    for (int i = 0; i < b.threads; ++i) b.fibers[i].state = RUN;
    released = true;
  }
  return released;
}

extern "C" __attribute__((used)) void kiln_host_fiber_main() {
  block->entry(block->params);
  block->fibers[block->current].state = DONE;
  block->live--;
  Context gone;
  switch_context(&gone, &block->scheduler);  // never resumed
}

// One block: every fiber runs until it waits or exits, then the barriers that can open do.
inline const char* run_block(Block& b) {
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = b.fibers[i];
    start_context(&f.ctx, stacks + (size_t)i * STACK);
    f.state = RUN;
  }
  for (int w = 0; w * 32 < b.threads; ++w) b.warps[w].arrived = b.warps[w].mask = 0;
  b.live = b.threads;
  while (b.live > 0 && !b.error) {
    bool ran = false;
    for (int i = 0; i < b.threads && !b.error; ++i) {
      if (b.fibers[i].state != RUN) continue;
      b.current = i;
      threadIdx.x = i;
      switch_context(&b.scheduler, &b.fibers[i].ctx);
      ran = true;
    }
    if (!settle() && !ran && b.live > 0) return "deadlock: threads wait at barriers that cannot open";
  }
  return b.error;
}
}  // namespace kiln_host

inline void __syncthreads() { kiln_host::yield(kiln_host::AT_BLOCK_BARRIER); }
inline void kiln_host_syncwarp_op(kiln_host::Warp&, unsigned) {}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  kiln_host::collective(kiln_host_syncwarp_op, mask, nullptr, 0, nullptr, 0);
}

// Shuffles: each lane gives its value (two words) and its source lane (word 2).
inline void kiln_host_shfl_op(kiln_host::Warp& w, unsigned lanes) {
  for (int l = 0; l < 32; ++l) {
    if (!(lanes >> l & 1)) continue;
    const unsigned src = w.in[l][2];
    const int from = src < 32 && (lanes >> src & 1) ? (int)src : l;
    w.out[l][0] = w.in[from][0];
    w.out[l][1] = w.in[from][1];
  }
}
template <typename T> inline T kiln_host_shfl(unsigned mask, T v, unsigned src) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  uint32_t in[3] = {0, 0, src}, out[2];
  memcpy(in, &v, sizeof(T));
  kiln_host::collective(kiln_host_shfl_op, mask, in, 3, out, 2);
  memcpy(&v, out, sizeof(T));
  return v;
}
// Lanes in groups of `width`: a source outside the caller's group reads the caller's value.
inline unsigned kiln_host_lane() { return threadIdx.x & 31; }
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  const unsigned l = kiln_host_lane(), s = l ^ (unsigned)m;
  return kiln_host_shfl(mask, v, (s / width == l / width) ? s : l);
}
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const unsigned l = kiln_host_lane();
  return kiln_host_shfl(mask, v, l / width * width + (unsigned)src % width);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  const unsigned l = kiln_host_lane(), s = l + d;
  return kiln_host_shfl(mask, v, (s / width == l / width) ? s : l);
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  const unsigned l = kiln_host_lane();
  return kiln_host_shfl(mask, v, (l % width >= d) ? l - d : l);
}
inline void kiln_host_ballot_op(kiln_host::Warp& w, unsigned lanes) {
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((lanes >> l & 1) && w.in[l][0]) bits |= 1u << l;
  for (int l = 0; l < 32; ++l) w.out[l][0] = bits;
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  uint32_t in = p != 0, out;
  kiln_host::collective(kiln_host_ballot_op, mask, &in, 1, &out, 1);
  return out & mask;
}
inline int __any_sync(unsigned mask, int p) { return __ballot_sync(mask, p) != 0; }
// Every live lane of `mask` (the second ballot names them) has `p`.
inline int __all_sync(unsigned mask, int p) { return __ballot_sync(mask, p) == __ballot_sync(mask, 1); }

// Dynamic shared memory (`extern __shared__` arrays point here) and the base of the 32-bit
// shared-window addresses of `__cvta_generic_to_shared`: static `__shared__` variables are in
// this object's .bss too, well within 2 GiB of it.
alignas(128) char kiln_host_dyn_smem[227 * 1024];
inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)((const char*)p - kiln_host_dyn_smem); }
inline void* kiln_host_shared_ptr(unsigned a) { return kiln_host_dyn_smem + (int32_t)a; }

// The launch entry host.rs calls: `grid` blocks of `threads` threads of `entry(params)`, with
// `smem` bytes of dynamic shared memory. Returns null, or what went wrong.
extern "C" __attribute__((visibility("default"))) const char* kiln_host_launch(void (*entry)(const void*), const void* params,
                                                                            unsigned gx, unsigned gy, unsigned gz,
                                                                            unsigned threads, unsigned smem) {
  using namespace kiln_host;
  if (threads == 0 || threads > 1024) return "block size must be 1..=1024 threads";
  if (smem > sizeof(kiln_host_dyn_smem)) return "dynamic shared memory above 227 KiB";
  if (fibers_n < threads) {
    free(stacks);
    free(fibers);
    free(warps);
    stacks = (char*)malloc(threads * STACK);
    fibers = (Fiber*)calloc(threads, sizeof(Fiber));
    warps = (Warp*)calloc((threads + 31) / 32, sizeof(Warp));
    if (!stacks || !fibers || !warps) return "out of memory for fiber stacks";
    fibers_n = threads;
  }
  Block b = {};
  b.fibers = fibers;
  b.warps = warps;
  b.threads = (int)threads;
  b.entry = entry;
  b.params = params;
  block = &b;
  gridDim = {gx, gy, gz};
  blockDim = {threads, 1, 1};
  threadIdx = {0, 0, 0};
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, z};
        if (const char* e = run_block(b)) return e;
      }
  return nullptr;
}
