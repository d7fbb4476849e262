// Host versions of the inline PTX in kiln's kernels (after shim.h). rewrite.rs replaces each
// `asm("template" : outputs : inputs)` whose template it knows (host/rewrite.rs `PTX`) by a call of the
// function named there, with the outputs by address and then the inputs, in operand order.

// Halves: bf16 is the top 16 bits of an f32; f16 is IEEE binary16 (g++'s _Float16, whose
// conversion from float rounds to nearest even, subnormals and overflow to infinity included).
inline unsigned short kiln_host_bf16(float x) {
  const unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN: the canonical NaN, as cvt.rn gives
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}
inline unsigned short kiln_host_f16(float x) {
  if (x != x) return 0x7fff;  // NaN: the canonical NaN
  return kiln_bits<unsigned short>((_Float16)x);
}
inline float kiln_host_f16_to_f32(unsigned short h) { return (float)kiln_bits<_Float16>(h); }
inline float kiln_host_bf16_to_f32(unsigned short h) { return __uint_as_float((unsigned)h << 16); }

inline void kiln_ptx_cvt_f32_f16(float* d, unsigned short a) { *d = kiln_host_f16_to_f32(a); }
inline void kiln_ptx_cvt_rn_bf16_f32(unsigned short* d, float a) { *d = kiln_host_bf16(a); }
inline void kiln_ptx_cvt_rn_f16_f32(unsigned short* d, float a) { *d = kiln_host_f16(a); }
// cvt.rn.{bf16,f16}x2.f32 d, a, b: a goes to the upper half, b to the lower.
inline void kiln_ptx_cvt_rn_bf16x2_f32(unsigned* d, float a, float b) {
  *d = (unsigned)kiln_host_bf16(a) << 16 | kiln_host_bf16(b);
}
inline void kiln_ptx_cvt_rn_f16x2_f32(unsigned* d, float a, float b) { *d = (unsigned)kiln_host_f16(a) << 16 | kiln_host_f16(b); }

inline void kiln_ptx_nop() {}
inline void kiln_ptx_nop(const void*) {}
inline void kiln_ptx_nop(int) {}
inline void kiln_ptx_ld_v4_u32(unsigned* x, unsigned* y, unsigned* z, unsigned* w, const void* p) {
  const unsigned* q = (const unsigned*)p;
  *x = q[0], *y = q[1], *z = q[2], *w = q[3];
}

// cp.async.cg.shared.global [dst], [src], 16, n: copies n bytes and zero-fills the rest of the
// 16, at once (commit_group and wait_group are no-ops).
inline void kiln_ptx_cp_async_16(unsigned dst, const void* src, int n) {
  char* d = (char*)kiln_host_shared_ptr(dst);
  memcpy(d, src, n);
  memset(d + n, 0, 16 - n);
}

// ---------------------------------------------------------------------------------------
// mma.sync m16n8k{16,8}.row.col, f32 += {bf16,f16} x {bf16,f16}, as warp collectives. Fragment
// layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k8 with floating point type"),
// for lane l: g = l / 4, t = l % 4; each 32-bit register holds two halves, the lower-indexed
// element in the low 16 bits.
// - A (16 x K, row major), m16n8k16: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
//   a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]; m16n8k8: a0 and a1 only.
// - B (K x 8, column major), m16n8k16: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; m16n8k8: b0.
// - C and D (16 x 8, f32): c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1].
// Lane words: c0..c3 (0-3), the A registers (4..), then the B registers. The products are
// summed in f32 in k order onto C (the tensor cores' order of rounding is not specified).

template <bool F16> inline float kiln_host_half(unsigned r, int hi) {
  const unsigned short h = (unsigned short)(hi ? r >> 16 : r);
  return F16 ? kiln_host_f16_to_f32(h) : kiln_host_bf16_to_f32(h);
}
template <bool F16, int K> inline void kiln_host_mma_op(kiln_host::Warp& w, unsigned lanes) {
  float A[16][K] = {}, B[K][8] = {}, C[16][8] = {};
  const int na = K / 4;  // A registers per lane
  for (int l = 0; l < 32; ++l) {
    if (!(lanes >> l & 1)) continue;
    const int g = l >> 2, t = l & 3;
    const uint32_t* in = w.in[l];
    for (int r = 0; r < na; ++r) {
      const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
      A[row][col] = kiln_host_half<F16>(in[4 + r], 0);
      A[row][col + 1] = kiln_host_half<F16>(in[4 + r], 1);
    }
    for (int r = 0; r < K / 8; ++r) {
      B[2 * t + r * 8][g] = kiln_host_half<F16>(in[4 + na + r], 0);
      B[2 * t + r * 8 + 1][g] = kiln_host_half<F16>(in[4 + na + r], 1);
    }
    for (int i = 0; i < 4; ++i) C[g + (i >> 1) * 8][2 * t + (i & 1)] = __uint_as_float(in[i]);
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >> 1) * 8, col = 2 * t + (i & 1);
      float acc = C[row][col];
      for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
      w.out[l][i] = __float_as_uint(acc);
    }
  }
}
template <bool F16, int K> inline void kiln_host_mma(float* c0, float* c1, float* c2, float* c3, const unsigned* ab) {
  uint32_t in[4 + K / 4 + K / 8], out[4];
  in[0] = __float_as_uint(*c0), in[1] = __float_as_uint(*c1), in[2] = __float_as_uint(*c2), in[3] = __float_as_uint(*c3);
  memcpy(in + 4, ab, (K / 4 + K / 8) * 4);
  kiln_host::collective(kiln_host_mma_op<F16, K>, 0xffffffffu, in, 4 + K / 4 + K / 8, out, 4);
  *c0 = __uint_as_float(out[0]), *c1 = __uint_as_float(out[1]), *c2 = __uint_as_float(out[2]), *c3 = __uint_as_float(out[3]);
}
template <bool F16>
inline void kiln_ptx_mma_m16n8k16(float* c0, float* c1, float* c2, float* c3, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                  unsigned b0, unsigned b1) {
  const unsigned ab[6] = {a0, a1, a2, a3, b0, b1};
  kiln_host_mma<F16, 16>(c0, c1, c2, c3, ab);
}
template <bool F16> inline void kiln_ptx_mma_m16n8k8(float* c0, float* c1, float* c2, float* c3, unsigned a0, unsigned a1, unsigned b0) {
  const unsigned ab[3] = {a0, a1, b0};
  kiln_host_mma<F16, 8>(c0, c1, c2, c3, ab);
}

// ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16: matrix i (8 x 8 halves) has its row
// r at the address lane 8i + r gives. Lane l gets in register i, without .trans, row l / 4's
// elements 2(l % 4) and 2(l % 4) + 1; with .trans, column l / 4's elements at rows 2(l % 4)
// and 2(l % 4) + 1 (the lower-indexed element in the low half).
template <int N, bool TRANS> inline void kiln_host_ldmatrix_op(kiln_host::Warp& w, unsigned) {
  for (int l = 0; l < 32; ++l) {
    const int q = l >> 2, t = l & 3;
    for (int i = 0; i < N; ++i) {
      unsigned short lo, hi;
      const unsigned short* row;
      if (!TRANS) {
        row = (const unsigned short*)kiln_host_shared_ptr(w.in[8 * i + q][0]);
        lo = row[2 * t], hi = row[2 * t + 1];
      } else {
        lo = ((const unsigned short*)kiln_host_shared_ptr(w.in[8 * i + 2 * t][0]))[q];
        hi = ((const unsigned short*)kiln_host_shared_ptr(w.in[8 * i + 2 * t + 1][0]))[q];
      }
      w.out[l][i] = (unsigned)hi << 16 | lo;
    }
  }
}
template <int N, bool TRANS> inline void kiln_host_ldmatrix(unsigned* r0, unsigned* r1, unsigned* r2, unsigned* r3, unsigned a) {
  uint32_t out[4];
  kiln_host::collective(kiln_host_ldmatrix_op<N, TRANS>, 0xffffffffu, &a, 1, out, N);
  *r0 = out[0], *r1 = out[1];
  if (N == 4) *r2 = out[2], *r3 = out[3];
}
inline void kiln_ptx_ldmatrix_x4(unsigned* r0, unsigned* r1, unsigned* r2, unsigned* r3, unsigned a) {
  kiln_host_ldmatrix<4, false>(r0, r1, r2, r3, a);
}
inline void kiln_ptx_ldmatrix_x4_trans(unsigned* r0, unsigned* r1, unsigned* r2, unsigned* r3, unsigned a) {
  kiln_host_ldmatrix<4, true>(r0, r1, r2, r3, a);
}
inline void kiln_ptx_ldmatrix_x2(unsigned* r0, unsigned* r1, unsigned a) { kiln_host_ldmatrix<2, false>(r0, r1, nullptr, nullptr, a); }
inline void kiln_ptx_ldmatrix_x2_trans(unsigned* r0, unsigned* r1, unsigned a) { kiln_host_ldmatrix<2, true>(r0, r1, nullptr, nullptr, a); }
