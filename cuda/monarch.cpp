// CPU implementation of the monarch_seam ops (the op schemas are defined here too).
//
// Monarch multiply, with x (B, K*P), w1 (K, Q, P), w2 (L, S, R), K*Q == L*R:
//   h[b, k*Q + q]   = sum_p w1[k, q, p] * x[b, k*P + p]           (stage 1, h in natural layout)
//   out[b, s*L + l] = sum_r w2[l, s, r] * h[b, r*L + l]           (stage 2: both permutations)
// The reference does this with two bmm calls and three permutation copies over the whole batch.
//
// The "engine" route: every product is a call of one small GEMM engine (below) whose A operand is a
// *strided view* read in place (each A value is a broadcast operand of the register kernel), so the
// Monarch permutations cost nothing (e.g. stage 2 reads h[b, r*L + l] as a matrix with strides (K*Q, L))
// and no A panel is packed. Rows are processed in tiles of <= 128 tokens so that a tile's intermediate
// stays in cache; the weights are packed once per call and shared by all tiles and threads. Only a few
// things are reordered explicitly, all on a tile that is in cache: the output block l is scattered into
// out[b, s*L + l] (except for L = 2 or 4 floats, or 2 doubles, with R within one k-slice: there stage 2 is
// one "lane" GEMM whose output is already in that order, see bcast); for L >= 8 a tile's h is split into its L groups before stage 2; in the backward pass dh
// is brought back to its natural layout, and where S > R the tile's g and h are split into their groups.
//
// The register kernel is written once with GCC vector extensions and compiled for three ISAs with
// function-level target attributes (AVX-512, AVX2+FMA, baseline SSE2), each in three or four panel widths
// (AVX-512 floats: 8x48, 6x64, 8x32, 8x16); the best ISA the CPU supports is chosen at load time
// (MONARCH_SEAM_CPU_ISA=avx512|avx2|base overrides it, for tests), the width per GEMM from its N. Two more
// routes (ATen's two-bmm algorithm and the BLAS that torch ships, on strided views) compete with it per shape:
// see "routes".
//
// The butterfly ops (schemas below) are implemented in cuda/butterfly_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <type_traits>
#include <utility>
#include <unistd.h>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "monarch_plan.h"

namespace monarch_seam {
namespace {

// ---------------------------------------------------------------- GEMM engine
// C[i, j] (+)= sum_k A(i, k) B(k, j), A(i, k) = a[i*ars + k*acs]. B is given packed (see pack_b);
// C is row-major with row stride ldc. T = float or double.

template <class T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type I;
  typedef I mask __attribute__((vector_size(VB)));
};

// One MR x (NV*W) block of C from rows of A read in place and a packed B panel (kc x NV*W). A(i, k) is
// a[i*ars + k*acs] for any strides (a Monarch permutation is such a view): every A value is a broadcast
// operand, so A needs no packing, which for the narrow block products of a Monarch layer (a few hundred
// columns) would cost a fifth of the product. Rows at or beyond mvalid read row 0 (results discarded).
// The accumulators live in registers for the whole k loop: with AVX-512 and 8x48 floats that is 24 zmm
// accumulators + 3 for B.
constexpr int kEdge = 8 * 48;  // most elements of any kernel's MR x NV*W block (gemm's ragged-edge buffer)

// A "lane" kernel (BL > 1) reads BL consecutive values per A element and repeats them across the vector
// (lane j gets A(i, k)[j % BL]). With A(i, k) = h[b, k*L ...) and BL = L, one GEMM over all L blocks at once,
// C(b, s*L + l) = sum_r h[b, r*L + l] w2[l, s, r], makes Monarch's stage 2 straight in its output order: no
// interleave of the output (B packed by pack_lanes). Every broadcast is one load uop (vpbroadcastq,
// vbroadcastf32x4/f128, or a plain load where BL values fill the vector): inline asm where no vector-extension
// form compiles to it (a shuffle per broadcast would take an FMA port). Only BL*sizeof(T) <= 16 bytes: A's
// traffic per FMA grows with BL, and at L = 8 or 16 floats the lane GEMM ran 0-30% slower than the block GEMMs
// with the interleave (forced engine routes on the Intel Xeon of BENCHMARKS.md, 4096 tokens, forward).
struct Bytes16 { char c[16]; };
template <class T, int VB, int BL>
static inline __attribute__((always_inline)) typename Vec<T, VB>::type bcast(const T* p) {
  typedef typename Vec<T, VB>::type V;
  constexpr int BY = BL * int(sizeof(T));
  static_assert(BL > 1 && VB % BY == 0, "lane broadcast: BL values must tile the vector");
  V r;
  if constexpr (BY == VB) {
    std::memcpy(&r, p, VB);
  } else if constexpr (BY == 8) {
    typedef int64_t I __attribute__((vector_size(VB)));
    int64_t v;
    std::memcpy(&v, p, 8);
    const I iv = I{} + v;
    std::memcpy(&r, &iv, VB);
  } else if constexpr (VB == 64 && BY == 16) {
    asm("vbroadcastf32x4 %1, %0" : "=v"(r) : "m"(*reinterpret_cast<const Bytes16*>(p)));
  } else {
    static_assert(VB == 32 && BY == 16, "lane broadcast: unsupported width");
    asm("vbroadcastf128 %1, %0" : "=x"(r) : "m"(*reinterpret_cast<const Bytes16*>(p)));
  }
  return r;
}

template <class T, int VB, int MR, int NV, int BL = 1>
static inline __attribute__((always_inline)) void ukernel_body(int64_t kc, const T* __restrict A, int64_t ars,
                                                               int64_t acs, int mvalid, const T* __restrict B,
                                                               T* __restrict C, int64_t ldc, bool acc) {
  typedef typename Vec<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  static_assert(MR * NV * W <= kEdge, "the ragged-edge buffer must hold one kernel block");
  const T* ap[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) ap[i] = A + (i < mvalid ? i : 0) * ars;
  V c[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[i][j] = V{};
  for (int64_t k = 0, ko = 0; k < kc; ++k, ko += acs) {
    // Every 16 k steps, ask for each A row's values 64 steps ahead: the rows are read in place (no packed
    // panel for the hardware prefetcher to stream), and their first sweep comes from memory. Measured with
    // forced engine routes on the Intel Xeon of BENCHMARKS.md: 3072->768 forward +10-14%, 1024 at nblocks 16
    // +15-30%, the others unchanged (a prefetch cannot fault, so reading ahead of the end is harmless).
    if ((k & 15) == 0) {
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) __builtin_prefetch(ap[i] + ko + 64 * acs);
    }
    V b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(&b[j], B + j * W, VB);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      if constexpr (BL == 1) {
        const T a = ap[i][ko];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) c[i][j] += a * b[j];
      } else {
        const V a = bcast<T, VB, BL>(ap[i] + ko);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) c[i][j] += a * b[j];
      }
    }
    B += NV * W;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      T* p = C + i * ldc + j * W;
      if (acc) {
        V t;
        std::memcpy(&t, p, VB);
        c[i][j] += t;
      }
      std::memcpy(p, &c[i][j], VB);
    }
}

template <class T>
using UkFn = void (*)(int64_t, const T*, int64_t, int64_t, int, const T*, T*, int64_t, bool);

// Register kernels per dtype and ISA: the same body, compiled under each target attribute, in up to four
// widths of NV vectors (the panel width nr = NV*W), so that a GEMM whose N is not a multiple of one width
// wastes little on padding (N = 64 in 48-wide panels computes 96 columns; the block products of nblocks 16
// layers and of ViTAE's MLPs are 64 wide). MR x NV accumulators fill the registers: 24 of the 32 zmm with
// AVX-512, 12 of the 16 ymm/xmm otherwise (a 4-wide AVX2/SSE2 kernel would leave no register for B).
#define MONARCH_SEAM_UK(NAME, T, TARGET, VB, MR, NV)                                               \
  TARGET void NAME(int64_t kc, const T* A, int64_t ars, int64_t acs, int mvalid, const T* B, T* C,  \
                   int64_t ldc, bool acc) {                                                          \
    ukernel_body<T, VB, MR, NV>(kc, A, ars, acs, mvalid, B, C, ldc, acc);                         \
  }
#define MONARCH_SEAM_AVX512 __attribute__((target("avx512f")))
#define MONARCH_SEAM_AVX2 __attribute__((target("avx2,fma")))
MONARCH_SEAM_UK(uk_f32_avx512_4, float, MONARCH_SEAM_AVX512, 64, 6, 4)    // 6 x 64 floats
MONARCH_SEAM_UK(uk_f32_avx512_3, float, MONARCH_SEAM_AVX512, 64, 8, 3)    // 8 x 48
MONARCH_SEAM_UK(uk_f32_avx512_2, float, MONARCH_SEAM_AVX512, 64, 8, 2)    // 8 x 32
MONARCH_SEAM_UK(uk_f32_avx512_1, float, MONARCH_SEAM_AVX512, 64, 8, 1)    // 8 x 16
MONARCH_SEAM_UK(uk_f64_avx512_4, double, MONARCH_SEAM_AVX512, 64, 6, 4)   // 6 x 32 doubles
MONARCH_SEAM_UK(uk_f64_avx512_3, double, MONARCH_SEAM_AVX512, 64, 8, 3)   // 8 x 24
MONARCH_SEAM_UK(uk_f64_avx512_2, double, MONARCH_SEAM_AVX512, 64, 8, 2)   // 8 x 16
MONARCH_SEAM_UK(uk_f64_avx512_1, double, MONARCH_SEAM_AVX512, 64, 8, 1)   // 8 x 8
MONARCH_SEAM_UK(uk_f32_avx2_3, float, MONARCH_SEAM_AVX2, 32, 4, 3)        // 4 x 24 floats
MONARCH_SEAM_UK(uk_f32_avx2_2, float, MONARCH_SEAM_AVX2, 32, 6, 2)        // 6 x 16
MONARCH_SEAM_UK(uk_f32_avx2_1, float, MONARCH_SEAM_AVX2, 32, 8, 1)        // 8 x 8
MONARCH_SEAM_UK(uk_f64_avx2_3, double, MONARCH_SEAM_AVX2, 32, 4, 3)       // 4 x 12 doubles
MONARCH_SEAM_UK(uk_f64_avx2_2, double, MONARCH_SEAM_AVX2, 32, 6, 2)       // 6 x 8
MONARCH_SEAM_UK(uk_f64_avx2_1, double, MONARCH_SEAM_AVX2, 32, 8, 1)       // 8 x 4
MONARCH_SEAM_UK(uk_f32_base_3, float, , 16, 4, 3)                         // 4 x 12 floats (SSE2)
MONARCH_SEAM_UK(uk_f32_base_2, float, , 16, 6, 2)                         // 6 x 8
MONARCH_SEAM_UK(uk_f32_base_1, float, , 16, 8, 1)                         // 8 x 4
MONARCH_SEAM_UK(uk_f64_base_3, double, , 16, 4, 3)                        // 4 x 6 doubles
MONARCH_SEAM_UK(uk_f64_base_2, double, , 16, 6, 2)                        // 6 x 4
MONARCH_SEAM_UK(uk_f64_base_1, double, , 16, 8, 1)                        // 8 x 2

// Lane kernels (see bcast) in the two widest panel widths per ISA, for BL = L of at most 16 bytes: the GEMMs
// they run are N = S*L wide, so a narrower panel would rarely pad less.
template <class T, int MR, int NV, int BL>
MONARCH_SEAM_AVX512 void ukl_avx512(int64_t kc, const T* A, int64_t ars, int64_t acs, int mvalid, const T* B, T* C,
                                    int64_t ldc, bool acc) {
  ukernel_body<T, 64, MR, NV, BL>(kc, A, ars, acs, mvalid, B, C, ldc, acc);
}
template <class T, int MR, int NV, int BL>
MONARCH_SEAM_AVX2 void ukl_avx2(int64_t kc, const T* A, int64_t ars, int64_t acs, int mvalid, const T* B, T* C,
                                int64_t ldc, bool acc) {
  ukernel_body<T, 32, MR, NV, BL>(kc, A, ars, acs, mvalid, B, C, ldc, acc);
}
template <class T, int MR, int NV, int BL>
void ukl_base(int64_t kc, const T* A, int64_t ars, int64_t acs, int mvalid, const T* B, T* C, int64_t ldc,
              bool acc) {
  ukernel_body<T, 16, MR, NV, BL>(kc, A, ars, acs, mvalid, B, C, ldc, acc);
}
#undef MONARCH_SEAM_UK

// ---------------------------------------------------------------- block interleave
// dst[i*dst_row + s*L + l] = src[l*src_plane + i*n + s] for i < rows, s < n: the Monarch output
// permutation (and its transpose in the backward pass) on a tile in cache. For L a power of two up to the
// vector width W it is log2(L) stages of two-source shuffles per L*W outputs; other L are scalar.
template <class T, int VB, int U, int... J>
constexpr typename Vec<T, VB>::mask interleave_mask(int half, std::integer_sequence<int, J...>) {
  // out[j] = (j % 2U < U ? a : b)[half*W/2 + (j / 2U)*U + j % U]; b's lanes are numbered W..2W-1
  constexpr int W = VB / sizeof(T);
  return typename Vec<T, VB>::mask{
      ((J % (2 * U)) < U ? 0 : W) + half * W / 2 + (J / (2 * U)) * U + J % U ...};
}

template <class T, int VB, int U, int HALF>
static inline __attribute__((always_inline)) typename Vec<T, VB>::type ilv(typename Vec<T, VB>::type a,
                                                                        typename Vec<T, VB>::type b) {
  constexpr auto m = interleave_mask<T, VB, U>(HALF, std::make_integer_sequence<int, int(VB / sizeof(T))>());
  return __builtin_shuffle(a, b, m);
}

// The interleave of L vectors v_0..v_{L-1}: out holds the sequence o[s*L + l] = v_l[s], s < W. Recursively:
// interleave each half, then merge the two sequences in units of L/2 elements.
template <class T, int VB, int L>
static inline __attribute__((always_inline)) void ilv_vecs(const typename Vec<T, VB>::type* v,
                                                           typename Vec<T, VB>::type* out) {
  typedef typename Vec<T, VB>::type V;
  if constexpr (L == 1) {
    out[0] = v[0];
  } else {
    V x[L / 2], y[L / 2];
    ilv_vecs<T, VB, L / 2>(v, x);
    ilv_vecs<T, VB, L / 2>(v + L / 2, y);
#pragma GCC unroll 16
    for (int k = 0; k < L / 2; ++k) {
      out[2 * k] = ilv<T, VB, L / 2, 0>(x[k], y[k]);
      out[2 * k + 1] = ilv<T, VB, L / 2, 1>(x[k], y[k]);
    }
  }
}

// Rows of the vectorised interleave for a power of two L <= W; returns the first s not done (the tail).
template <class T, int VB, int L>
static inline __attribute__((always_inline)) int64_t ilv_row(int64_t n, const T* s0, int64_t src_plane, T* o) {
  typedef typename Vec<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  int64_t s = 0;
  for (; s + W <= n; s += W) {
    V v[L], out[L];
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) std::memcpy(&v[l], s0 + l * src_plane + s, VB);
    ilv_vecs<T, VB, L>(v, out);
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) std::memcpy(o + L * s + l * W, &out[l], VB);
  }
  return s;
}

template <class T, int VB>
static inline __attribute__((always_inline)) void interleave_body(int64_t rows, int64_t L, int64_t n,
                                                                  const T* src, int64_t src_plane, T* dst,
                                                                  int64_t dst_row) {
  constexpr int W = VB / sizeof(T);
  for (int64_t i = 0; i < rows; ++i) {
    T* o = dst + i * dst_row;
    const T* s0 = src + i * n;
    int64_t s = 0;
    if constexpr (W >= 2) if (L == 2) s = ilv_row<T, VB, 2>(n, s0, src_plane, o);
    if constexpr (W >= 4) if (L == 4) s = ilv_row<T, VB, 4>(n, s0, src_plane, o);
    if constexpr (W >= 8) if (L == 8) s = ilv_row<T, VB, 8>(n, s0, src_plane, o);
    if constexpr (W >= 16) if (L == 16) s = ilv_row<T, VB, 16>(n, s0, src_plane, o);
    for (; s < n; ++s)
      for (int64_t l = 0; l < L; ++l) o[s * L + l] = s0[l * src_plane + s];
  }
}

// The inverse: dst[l*dst_plane + i*n + s] = src[i*src_row + s*L + l] (a tile's h, split into its L output
// groups so that stage 2 reads them contiguously). Undo the last merge (units of L/2), then recurse.
template <class T, int VB, int U, int SECOND, int... J>
constexpr typename Vec<T, VB>::mask deinterleave_mask(std::integer_sequence<int, J...>) {
  constexpr int W = VB / sizeof(T);
  return typename Vec<T, VB>::mask{(J < W / 2 ? 0 : W) + 2 * ((J % (W / 2)) / U) * U + SECOND * U + J % U ...};
}

template <class T, int VB, int L>
static inline __attribute__((always_inline)) void dilv_vecs(const typename Vec<T, VB>::type* c,
                                                            typename Vec<T, VB>::type* v) {
  typedef typename Vec<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  if constexpr (L == 1) {
    v[0] = c[0];
  } else {
    constexpr auto mx = deinterleave_mask<T, VB, L / 2, 0>(std::make_integer_sequence<int, W>());
    constexpr auto my = deinterleave_mask<T, VB, L / 2, 1>(std::make_integer_sequence<int, W>());
    V x[L / 2], y[L / 2];
#pragma GCC unroll 16
    for (int k = 0; k < L / 2; ++k) {
      x[k] = __builtin_shuffle(c[2 * k], c[2 * k + 1], mx);
      y[k] = __builtin_shuffle(c[2 * k], c[2 * k + 1], my);
    }
    dilv_vecs<T, VB, L / 2>(x, v);
    dilv_vecs<T, VB, L / 2>(y, v + L / 2);
  }
}

template <class T, int VB, int L>
static inline __attribute__((always_inline)) int64_t dilv_row(int64_t n, const T* s0, T* o, int64_t dst_plane) {
  typedef typename Vec<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  int64_t s = 0;
  for (; s + W <= n; s += W) {
    V c[L], v[L];
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) std::memcpy(&c[l], s0 + L * s + l * W, VB);
    dilv_vecs<T, VB, L>(c, v);
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) std::memcpy(o + l * dst_plane + s, &v[l], VB);
  }
  return s;
}

template <class T, int VB>
static inline __attribute__((always_inline)) void deinterleave_body(int64_t rows, int64_t L, int64_t n,
                                                                    const T* src, int64_t src_row, T* dst,
                                                                    int64_t dst_plane) {
  constexpr int W = VB / sizeof(T);
  for (int64_t i = 0; i < rows; ++i) {
    const T* s0 = src + i * src_row;
    T* o = dst + i * n;
    int64_t s = 0;
    if constexpr (W >= 2) if (L == 2) s = dilv_row<T, VB, 2>(n, s0, o, dst_plane);
    if constexpr (W >= 4) if (L == 4) s = dilv_row<T, VB, 4>(n, s0, o, dst_plane);
    if constexpr (W >= 8) if (L == 8) s = dilv_row<T, VB, 8>(n, s0, o, dst_plane);
    if constexpr (W >= 16) if (L == 16) s = dilv_row<T, VB, 16>(n, s0, o, dst_plane);
    for (; s < n; ++s)
      for (int64_t l = 0; l < L; ++l) o[l * dst_plane + s] = s0[s * L + l];
  }
}

template <class T>
using IlFn = void (*)(int64_t, int64_t, int64_t, const T*, int64_t, T*, int64_t);

#define MONARCH_SEAM_IL(NAME, T, TARGET, VB)                                                          \
  TARGET void NAME(int64_t rows, int64_t L, int64_t n, const T* src, int64_t src_plane, T* dst,       \
                   int64_t dst_row) {                                                                 \
    interleave_body<T, VB>(rows, L, n, src, src_plane, dst, dst_row);                                 \
  }                                                                                                   \
  TARGET void d##NAME(int64_t rows, int64_t L, int64_t n, const T* src, int64_t src_row, T* dst,      \
                      int64_t dst_plane) {                                                            \
    deinterleave_body<T, VB>(rows, L, n, src, src_row, dst, dst_plane);                               \
  }
MONARCH_SEAM_IL(il_f32_avx512, float, __attribute__((target("avx512f"))), 64)
MONARCH_SEAM_IL(il_f64_avx512, double, __attribute__((target("avx512f"))), 64)
MONARCH_SEAM_IL(il_f32_avx2, float, __attribute__((target("avx2,fma"))), 32)
MONARCH_SEAM_IL(il_f64_avx2, double, __attribute__((target("avx2,fma"))), 32)
MONARCH_SEAM_IL(il_f32_base, float, , 16)
MONARCH_SEAM_IL(il_f64_base, double, , 16)
#undef MONARCH_SEAM_IL

template <class T>
struct Engine {
  int mr, nr;
  UkFn<T> fn;
  IlFn<T> il;   // the output permutation (interleave of L blocks)
  IlFn<T> dil;  // its inverse (a tile's h split into L contiguous groups)
};

// A register kernel of one width: MR rows, NV vectors, and its speed relative to the ISA's first (8 x 3) kernel
// on panels that need no padding. The figures are rough (measured with forced widths on an Intel Xeon with
// AVX-512, 2026-12-03: 6 x 64 ran 768->3072 at ~0.93 of 8 x 48, 8 x 32 ran 64-wide products below 6 x 64;
// 8 x 16 needs 9 loads per 8 FMAs): they only break near-ties, the padding decides the rest (N = 64: 64
// columns in 6 x 64 against 96 in 8 x 48).
template <class T>
struct Width {
  int mr, nv;
  UkFn<T> fn;
  double speed;
};

// The engine for GEMMs with N output columns: the width whose padded panels cost least (columns computed
// over relative speed); ties go to the earlier (wider) entry. Every B operand is packed with the nr of the
// engine that multiplies it (pack_b and gemm take the same Engine).
template <class T>
Engine<T> pick(int64_t N, int W, std::initializer_list<Width<T>> ws, IlFn<T> il, IlFn<T> dil) {
  const Width<T>* best = nullptr;
  double best_cost = 0;
  for (const Width<T>& w : ws) {
    const int64_t nr = int64_t(w.nv) * W;
    const double cost = double((std::max<int64_t>(N, 1) + nr - 1) / nr * nr) / w.speed;
    if (best == nullptr || cost < best_cost * (1 - 1e-9)) best = &w, best_cost = cost;
  }
  return {best->mr, best->nv * W, best->fn, il, dil};
}

template <class T>
Engine<T> engine(int64_t N);
// The engines of one dtype (F: f32 or f64; W: its vector width in elements with AVX-512, halved per lesser ISA).
#define MONARCH_SEAM_ENGINE(T, F, W)                                                                        \
  template <>                                                                                               \
  Engine<T> engine<T>(int64_t N) {                                                                          \
    switch (isa()) {                                                                                        \
      case kAvx512:                                                                                         \
        return pick<T>(N, W, {{8, 3, uk_##F##_avx512_3, 1.0}, {6, 4, uk_##F##_avx512_4, 0.93},             \
                              {8, 2, uk_##F##_avx512_2, 0.90}, {8, 1, uk_##F##_avx512_1, 0.8}},            \
                       il_##F##_avx512, dil_##F##_avx512);                                                  \
      case kAvx2:                                                                                           \
        return pick<T>(N, W / 2, {{4, 3, uk_##F##_avx2_3, 1.0}, {6, 2, uk_##F##_avx2_2, 0.95},            \
                                  {8, 1, uk_##F##_avx2_1, 0.8}},                                            \
                       il_##F##_avx2, dil_##F##_avx2);                                                      \
      default:                                                                                              \
        return pick<T>(N, W / 4, {{4, 3, uk_##F##_base_3, 1.0}, {6, 2, uk_##F##_base_2, 0.95},            \
                                  {8, 1, uk_##F##_base_1, 0.8}},                                            \
                       il_##F##_base, dil_##F##_base);                                                      \
    }                                                                                                       \
  }
MONARCH_SEAM_ENGINE(float, f32, 16)
MONARCH_SEAM_ENGINE(double, f64, 8)
#undef MONARCH_SEAM_ENGINE

// The lane engine for GEMMs of N = n*L columns whose A elements are L consecutive values (see bcast); its fn
// is null where no lane kernel exists for this L and dtype (L other than 2 or 4 floats, 2 doubles): callers
// then use the per-block GEMMs and the (de)interleaves.
template <class T, int BL>
Engine<T> lane_engine_bl(int64_t N) {
  constexpr int W = 64 / int(sizeof(T));  // elements per AVX-512 vector
  switch (isa()) {
    case kAvx512:
      return pick<T>(N, W, {{8, 3, ukl_avx512<T, 8, 3, BL>, 1.0}, {6, 4, ukl_avx512<T, 6, 4, BL>, 0.93}}, nullptr,
                     nullptr);
    case kAvx2:
      return pick<T>(N, W / 2, {{4, 3, ukl_avx2<T, 4, 3, BL>, 1.0}, {6, 2, ukl_avx2<T, 6, 2, BL>, 0.95}}, nullptr,
                     nullptr);
    default:
      return pick<T>(N, W / 4, {{4, 3, ukl_base<T, 4, 3, BL>, 1.0}, {6, 2, ukl_base<T, 6, 2, BL>, 0.95}}, nullptr,
                     nullptr);
  }
}

template <class T>
Engine<T> lane_engine(int64_t N, int64_t L) {
  if (L == 2) return lane_engine_bl<T, 2>(N);
  if constexpr (sizeof(T) == 4)
    if (L == 4) return lane_engine_bl<T, 4>(N);
  return {0, 0, nullptr, nullptr, nullptr};
}

inline int64_t round_down(int64_t v, int64_t m) { return v / m * m; }

// Blocking from this CPU's caches (cpu_isa.h): the k-slice of a B panel (kc x nr) takes three quarters of
// the L1 (on a 48 KiB L1 with AVX-512 floats: 192 x 48), and the A rows swept per panel (mc x kc) a quarter
// of the L2.
template <class T>
int64_t kc_of(const Engine<T>& e) {
  const int64_t kc = round_down(l1_bytes() * 3 / 4 / (e.nr * int64_t(sizeof(T))), 16);
  return std::max<int64_t>(32, std::min<int64_t>(512, kc));
}

template <class T>
int64_t mc_of(const Engine<T>& e, int64_t kc) {
  return std::max<int64_t>(e.mr, std::min<int64_t>(1024, round_down(l2_bytes() / 4 / (kc * int64_t(sizeof(T))), e.mr)));
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Packed B: panels of nr columns, each holding all K rows: dst[(j/nr)*K*nr + k*nr + j%nr] = b[k*brs + j*bcs]
// (zero beyond N). A k-slice [pc, pc+kc) of a panel is then contiguous.
template <class T>
int64_t packed_b_size(const Engine<T>& e, int64_t K, int64_t N) {
  return round_up(N, e.nr) * K;
}

template <class T>
void pack_b(const Engine<T>& e, int64_t K, int64_t N, const T* b, int64_t brs, int64_t bcs, T* dst) {
  const int nr = e.nr;
  for (int64_t j0 = 0; j0 < N; j0 += nr) {
    const int64_t n = std::min<int64_t>(nr, N - j0);
    T* d = dst + (j0 / nr) * K * nr;
    if (bcs == 1) {
      for (int64_t k = 0; k < K; ++k) {
        std::memcpy(d + k * nr, b + k * brs + j0, n * sizeof(T));
        std::fill(d + k * nr + n, d + (k + 1) * nr, T(0));
      }
    } else {
      for (int64_t k = 0; k < K; ++k) std::fill(d + k * nr + n, d + (k + 1) * nr, T(0));
      if (brs < bcs) {  // walk the source columns (contiguous when brs == 1, e.g. a transposed weight),
        // 64 rows at a time so that the 64 destination rows being filled stay in L1
        for (int64_t k0 = 0; k0 < K; k0 += 64) {
          const int64_t kb = std::min<int64_t>(64, K - k0);
          for (int64_t j = 0; j < n; ++j) {
            const T* src = b + (j0 + j) * bcs + k0 * brs;
            T* dd = d + k0 * nr + j;
            for (int64_t k = 0; k < kb; ++k) dd[k * nr] = src[k * brs];
          }
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const T* src = b + k * brs + j0 * bcs;
          for (int64_t j = 0; j < n; ++j) d[k * nr + j] = src[j * bcs];
        }
      }
    }
  }
}

// Packed B of a lane GEMM (see bcast): N = n*L columns, column j = c*L + l holding
// src[l*plane + c*cstride + k*kstride] for k < K, in pack_b's panel layout. Monarch's w2 (L, S, R) as the
// forward's B(r, s*L + l) = w2[l, s, r] is (plane, cstride, kstride) = (S*R, R, 1), as the backward's
// B(s, r*L + l) = w2[l, s, r] it is (S*R, 1, R). Parallel over panels; 64 k rows at a time, as pack_b.
template <class T>
void pack_lanes(const Engine<T>& e, int64_t K, int64_t N, int64_t L, const T* src, int64_t plane, int64_t cstride,
                int64_t kstride, T* dst) {
  const int nr = e.nr;
  const int64_t npan = (N + nr - 1) / nr;
  at::parallel_for(0, npan, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j0 = q * nr, n = std::min<int64_t>(nr, N - j0);
      T* d = dst + q * K * nr;
      for (int64_t k = 0; k < K; ++k) std::fill(d + k * nr + n, d + (k + 1) * nr, T(0));
      for (int64_t k0 = 0; k0 < K; k0 += 64) {
        const int64_t kb = std::min<int64_t>(64, K - k0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t jj = j0 + j;
          const T* sp = src + (jj % L) * plane + (jj / L) * cstride + k0 * kstride;
          T* dd = d + k0 * nr + j;
          for (int64_t k = 0; k < kb; ++k) dd[k * nr] = sp[k * kstride];
        }
      }
    }
  });
}

// C (M x N, row stride ldc) = [C +] A @ B, A a strided view read in place, B packed by pack_b with the same K.
// Loop order: k-slices of kc, then mc rows of A (they stay in L2), then B panels (each stays in L1 while
// the micro-kernel sweeps the rows).
template <class T>
void gemm(const Engine<T>& e, int64_t M, int64_t N, int64_t K, const T* a, int64_t ars, int64_t acs,
          const T* bp, T* C, int64_t ldc, bool acc) {
  const int mr = e.mr, nr = e.nr;
  if (K == 0) {
    if (!acc)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  alignas(64) T edge[kEdge];
  const int64_t kcb = kc_of(e), mcb = mc_of(e, kcb);
  for (int64_t pc = 0; pc < K; pc += kcb) {
    const int64_t kc = std::min(kcb, K - pc);
    const bool accum = acc || pc > 0;
    for (int64_t ic = 0; ic < M; ic += mcb) {
      const int64_t mc = std::min(mcb, M - ic);
      for (int64_t jr = 0; jr < N; jr += nr) {
        const int64_t nb = std::min<int64_t>(nr, N - jr);
        const T* bpan = bp + (jr / nr) * K * nr + pc * nr;
        for (int64_t ir = 0; ir < mc; ir += mr) {
          const int mb = int(std::min<int64_t>(mr, mc - ir));
          const T* ablk = a + (ic + ir) * ars + pc * acs;
          T* c = C + (ic + ir) * ldc + jr;
          if (mb == mr && nb == nr) {
            e.fn(kc, ablk, ars, acs, mr, bpan, c, ldc, accum);
          } else {  // ragged edge: full block into a buffer, then the valid part
            e.fn(kc, ablk, ars, acs, mb, bpan, edge, nr, false);
            for (int64_t i = 0; i < mb; ++i)
              for (int64_t j = 0; j < nb; ++j)
                c[i * ldc + j] = accum ? c[i * ldc + j] + edge[i * nr + j] : edge[i * nr + j];
          }
        }
      }
    }
  }
}

// Scratch memory that grows and is kept, one set per thread: repeated calls allocate nothing (a fresh
// multi-MiB std::vector per call costs more in page faults than the whole product at small batch). What
// stays allocated is bounded by the largest layer seen: about 3x its weights in the calling thread (packed
// weights, and the per-chunk weight-gradient sums of the backward pass) plus a few tile buffers per thread.
struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  template <class T>
  T* get(int64_t n) {
    const size_t bytes = (size_t)round_up(std::max<int64_t>(n, 1) * (int64_t)sizeof(T), 64);
    if (bytes > cap) {
      std::free(p);
      cap = 0;
      p = std::aligned_alloc(64, bytes);
      TORCH_CHECK(p != nullptr, "monarch: out of memory for a ", bytes, "-byte scratch buffer");
      cap = bytes;
    }
    return static_cast<T*>(p);
  }
};

// Slots: the calling thread's buffers (packed weights, dw accumulators) and each worker's tile buffers
// are distinct, since the calling thread is also worker 0 of at::parallel_for.
enum Slot { kW1, kW2, kW1T, kAcc, kHbuf, kObuf, kDsb, kDh, kBb, kGs, kHs, kNumSlots };

template <class T>
T* scratch(Slot slot, int64_t n) {
  thread_local Scratch s[kNumSlots];
  return s[slot].get<T>(n);
}

// ---------------------------------------------------------------- Monarch
using plan::Dims;  // B tokens; w1 (K, Q, P); w2 (L, S, R)

constexpr int64_t kTile = 128;  // most token rows per tile

// Token rows per tile: the per-row buffers of a tile (row_bytes: its intermediate and output blocks) fill at
// most half of this CPU's L2, and small batches get smaller tiles so that every thread has rows.
inline int64_t tile_rows(int64_t B, int64_t row_bytes) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = round_up((B + nth - 1) / nth, 8);
  const int64_t fit = std::max<int64_t>(8, l2_bytes() / 2 / std::max<int64_t>(row_bytes, 1) / 8 * 8);
  return std::max<int64_t>(8, std::min<int64_t>({kTile, per, fit}));
}

// Packs weight blocks w[blk] (nblk x rows x cols) as GEMM B operands, either as stored
// (K = rows, N = cols) or transposed (K = cols, N = rows). Returns the per-block stride.
template <class T>
const T* pack_weights(const Engine<T>& e, const T* w, int64_t nblk, int64_t rows, int64_t cols, bool transpose,
                      Slot slot, int64_t* per_block) {
  const int64_t Kd = transpose ? cols : rows, Nd = transpose ? rows : cols;
  const int64_t per = packed_b_size(e, Kd, Nd);
  T* out = scratch<T>(slot, nblk * per);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      pack_b(e, Kd, Nd, w + b * rows * cols, transpose ? 1 : cols, transpose ? cols : 1, out + b * per);
  });
  *per_block = per;
  return out;
}

// h rows [b0, b0+tb) of stage 1 into H (row stride K*Q).
template <class T>
void stage1_tile(const Engine<T>& e, const Dims& d, const T* x, const T* w1p, int64_t w1s, int64_t b0,
                 int64_t tb, T* H) {
  const int64_t KP = d.K * d.P, KQ = d.K * d.Q;
  for (int64_t k = 0; k < d.K; ++k)
    gemm(e, tb, d.Q, d.P, x + b0 * KP + k * d.P, KP, 1, w1p + k * w1s, H + k * d.Q, KQ, false);
}

// The forward's stage-2 lane engine, or a null fn where it takes the block GEMMs and the interleave.
// L > 1 with a lane kernel for this L, and R within one k-slice: stage 2 is one lane GEMM per tile, h read
// in place, out written once in its final order (see bcast); otherwise L block GEMMs per tile into a buffer
// in cache and the interleave below. With R over a k-slice the lane GEMM would add each slice's partial sums
// into out itself, outside the cache: 1024->1024 at nblocks 4 (R = 256 > kc = 192) ran ~7% slower that way,
// while 768->3072 and 3072->768 (R = 192) ran 3-10% faster (forced engine routes, the Xeon of BENCHMARKS.md).
template <class T>
Engine<T> fwd_lanes(const Dims& d) {
  Engine<T> el = d.L > 1 ? lane_engine<T>(d.L * d.S, d.L) : Engine<T>{0, 0, nullptr, nullptr, nullptr};
  if (el.fn && d.R > kc_of(el)) el.fn = nullptr;
  return el;
}

template <class T>
void fwd_impl(const Dims& d, const T* x, const T* w1, const T* w2, T* out, T* hsave) {
  const Engine<T> e = engine<T>(d.S), e1 = engine<T>(d.Q);  // stage 2 makes S columns, stage 1 Q
  const int64_t KQ = d.K * d.Q, LS = d.L * d.S;
  const Engine<T> el = fwd_lanes<T>(d);  // null fn: the block GEMMs and the interleave
  int64_t w1s, w2s = 0;
  const T* w1p = pack_weights(e1, w1, d.K, d.Q, d.P, true, kW1, &w1s);  // B(p, q) = w1[k, q, p]
  const T* w2p = nullptr;
  if (el.fn) {  // B(r, s*L + l) = w2[l, s, r]
    T* p = scratch<T>(kW2, packed_b_size(el, d.R, LS));
    pack_lanes(el, d.R, LS, d.L, w2, d.S * d.R, d.R, 1, p);
    w2p = p;
  } else {
    w2p = pack_weights(e, w2, d.L, d.S, d.R, true, kW2, &w2s);  // B(r, s) = w2[l, s, r]
  }
  const int64_t tile = tile_rows(d.B, 2 * KQ * int64_t(sizeof(T))), ntiles = (d.B + tile - 1) / tile;
  // output columns per chunk: a chunk's L blocks (L x tile x sc) take at most a quarter of the L2
  const int64_t sc = std::min(
      d.S, std::max<int64_t>(e.nr, l2_bytes() / 4 / (d.L * tile * int64_t(sizeof(T))) / e.nr * e.nr));
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    T* hbuf = hsave ? nullptr : scratch<T>(kHbuf, tile * KQ);
    T* obuf = el.fn ? nullptr : scratch<T>(kObuf, d.L * tile * sc);
    T* gbuf = d.L >= 8 && !el.fn ? scratch<T>(kDsb, tile * KQ) : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * tile, tb = std::min(tile, d.B - b0);
      T* H = hsave ? hsave + b0 * KQ : hbuf;
      stage1_tile(e1, d, x, w1p, w1s, b0, tb, H);
      if (d.L == 1) {  // no permutation at all: straight into out
        gemm(e, tb, d.S, d.R, H, KQ, 1, w2p, out + b0 * LS, LS, false);
        continue;
      }
      if (el.fn) {  // A(i, r) = the L values h[b0+i, r*L ...): strides (K*Q, L), output in final order
        gemm(el, tb, LS, d.R, H, KQ, d.L, w2p, out + b0 * LS, LS, false);
        continue;
      }
      // block l reads h[b, r*L + l]: the A view with strides (K*Q, L). Its output is made sc columns at a
      // time for all blocks (so that the L blocks of a chunk stay in cache) and interleaved into
      // out[b, s*L + l] from there.
      // For L >= 8 the strided view would touch a new cache line at every k step, so the tile's h is
      // first split into L contiguous (tb x R) groups (one pass over it, in cache).
      const T* A2 = H + 0;
      int64_t ars = KQ, acs = d.L, lstride = 1;
      if (d.L >= 8) {
        e.dil(tb, d.L, d.R, H, KQ, gbuf, tb * d.R);
        A2 = gbuf, ars = d.R, acs = 1, lstride = tb * d.R;
      }
      for (int64_t s0 = 0; s0 < d.S; s0 += sc) {
        const int64_t sn = std::min(sc, d.S - s0);
        for (int64_t l = 0; l < d.L; ++l)
          gemm(e, tb, sn, d.R, A2 + l * lstride, ars, acs, w2p + l * w2s + (s0 / e.nr) * d.R * e.nr,
               obuf + l * tb * sn, sn, false);
        e.il(tb, d.L, sn, obuf, tb * sn, out + b0 * LS + s0 * d.L, LS);
      }
    }
  });
}

template <class T>
void bwd_impl(const Dims& d, const T* g, const T* x, const T* w1, const T* w2, const T* hsaved, T* dx, T* dw1,
              T* dw2) {
  // engines by the width of what they make: R columns (dS, dw2), P (dx, dw1), Q (h, when recomputed)
  const Engine<T> eR = engine<T>(d.R), eP = engine<T>(d.P), eQ = engine<T>(d.Q);
  const int64_t KP = d.K * d.P, KQ = d.K * d.Q, LS = d.L * d.S;
  int64_t w1s, w2s, w1ts = 0;
  const T* w2p = pack_weights(eR, w2, d.L, d.S, d.R, false, kW2, &w2s);  // B(s, r) = w2[l, s, r]
  const T* w1p = pack_weights(eP, w1, d.K, d.Q, d.P, false, kW1, &w1s);  // B(q, p) = w1[k, q, p]
  const T* w1tp = hsaved ? nullptr : pack_weights(eQ, w1, d.K, d.Q, d.P, true, kW1T, &w1ts);  // recompute
  const int64_t tile = tile_rows(d.B, 3 * KQ * int64_t(sizeof(T)) / 2), ntiles = (d.B + tile - 1) / tile;
  // Split each tile's g and h into their L contiguous groups first (below) only where g is the wider of the two
  // (S > R). Measured with forced engine routes on the Intel Xeon of BENCHMARKS.md, 4096 tokens, GFLOP/s of the
  // backward, in place -> split: 768->3072 at nblocks 16 (S = 4R) 116-131 -> 162-176, at nblocks 4 186-192 ->
  // 239-251, ViTAE's 256->512 MLP (6,272 tokens) 189-213 -> 215-231; but 3072->768 at nblocks 16 (S = R)
  // 147-165 -> 133-141, where the two split copies push the tile's working set out of the L2.
  const bool split = d.L > 1 && d.S > d.R;
  // Tiles are split into nch contiguous chunks, one dw1/dw2 accumulator each, summed at the end: the
  // result does not depend on which thread runs which chunk.
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  const int64_t per_ch = (ntiles + nch - 1) / nch;
  const int64_t n1 = d.K * d.Q * d.P, n2 = d.L * d.S * d.R;
  T* acc = scratch<T>(kAcc, nch * (n1 + n2));
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    T* hbuf = hsaved ? nullptr : scratch<T>(kHbuf, tile * KQ);
    T* dsb = scratch<T>(kDsb, d.L * tile * d.R);
    T* dh = scratch<T>(kDh, tile * KQ);
    T* bb = scratch<T>(kBb, std::max(packed_b_size(eR, tile, d.R), packed_b_size(eP, tile, d.P)));
    T* gs = split ? scratch<T>(kGs, tile * LS) : nullptr;
    T* hs = split ? scratch<T>(kHs, tile * KQ) : nullptr;
    for (int64_t c = c0; c < c1; ++c) {
      T* a1 = acc + c * (n1 + n2);
      T* a2 = a1 + n1;
      const int64_t tbeg = c * per_ch, tend = std::min(ntiles, tbeg + per_ch);
      if (tbeg >= tend) std::fill(a1, a2 + n2, T(0));
      for (int64_t t = tbeg; t < tend; ++t) {
        const bool first = t == tbeg;
        const int64_t b0 = t * tile, tb = std::min(tile, d.B - b0);
        const T* H = hsaved ? hsaved + b0 * KQ : hbuf;
        if (!hsaved) stage1_tile(eQ, d, x, w1tp, w1ts, b0, tb, hbuf);
        // G_l(i, s) = g[b0+i, s*L + l] and Hp_l(i, r) = h[b0+i, r*L + l]: with `split` both are first split
        // into their L contiguous groups (vectorised, one pass over the tile), so that every GEMM below reads
        // rows: read in place, G_l^T takes a new cache line per row at every k step once L >= 16, and Hp_l's
        // packing is a scalar gather.
        const T* G = g + b0 * LS;  // G_l(i, s) = G[l * gplane + i * gld + s * gcs]
        const T* Hp = H;           // Hp_l(i, r) = Hp[l * hplane + i * hld + r * hcs]
        int64_t gld = LS, gplane = 1, gcs = d.L, hld = KQ, hplane = 1, hcs = d.L;
        if (split) {
          eR.dil(tb, d.L, d.S, G, LS, gs, tb * d.S);
          eR.dil(tb, d.L, d.R, H, KQ, hs, tb * d.R);
          G = gs, gld = d.S, gplane = tb * d.S, gcs = 1;
          Hp = hs, hld = d.R, hplane = tb * d.R, hcs = 1;
        }
        for (int64_t l = 0; l < d.L; ++l) {
          // dS_l = G_l @ w2[l], and dw2[l] += G_l^T @ Hp_l
          const T* Gl = G + l * gplane;
          gemm(eR, tb, d.R, d.S, Gl, gld, gcs, w2p + l * w2s, dsb + l * tb * d.R, d.R, false);
          const T* hb = bb;
          if (hcs == 1 && hld == d.R && d.R == eR.nr)  // one full panel of contiguous rows is already packed
            hb = Hp + l * hplane;
          else
            pack_b(eR, tb, d.R, Hp + l * hplane, hld, hcs, bb);
          gemm(eR, d.S, d.R, tb, Gl, gcs, gld, hb, a2 + l * d.S * d.R, d.R, !first);
        }
        const T* DH = dsb;  // L == 1: dS is already dh in natural layout
        if (d.L > 1) {      // dh[i, r*L + l] = dS_l[i, r], in cache
          eR.il(tb, d.L, d.R, dsb, tb * d.R, dh, KQ);
          DH = dh;
        }
        for (int64_t k = 0; k < d.K; ++k) {
          // dx_k = dH_k @ w1[k], and dw1[k] += dH_k^T @ X_k
          gemm(eP, tb, d.P, d.Q, DH + k * d.Q, KQ, 1, w1p + k * w1s, dx + b0 * KP + k * d.P, KP, false);
          pack_b(eP, tb, d.P, x + b0 * KP + k * d.P, KP, 1, bb);
          gemm(eP, d.Q, d.P, tb, DH + k * d.Q, 1, KQ, bb, a1 + k * d.Q * d.P, d.P, !first);
        }
      }
    }
  });
  at::parallel_for(0, n1 + n2, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T s = 0;
      for (int64_t c = 0; c < nch; ++c) s += acc[c * (n1 + n2) + i];
      (i < n1 ? dw1[i] : dw2[i - n1]) = s;
    }
  });
}

Dims check(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2, "monarch: x must be 2-D (B, K*P), got ", x.sizes());
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "monarch: w1 (K,Q,P) and w2 (L,S,R) must be 3-D");
  TORCH_CHECK(x.scalar_type() == w1.scalar_type() && x.scalar_type() == w2.scalar_type(),
              "monarch: x, w1, w2 must share a dtype");
  Dims d{x.size(0), w1.size(0), w1.size(2), w1.size(1), w2.size(0), w2.size(1), w2.size(2)};
  TORCH_CHECK(x.size(1) == d.K * d.P, "monarch: x.size(1)=", x.size(1), " != K*P=", d.K * d.P);
  TORCH_CHECK(d.K * d.Q == d.L * d.R, "monarch: need K*Q == L*R, got ", d.K * d.Q, " vs ", d.L * d.R);
  TORCH_CHECK(d.L > 0 && d.K > 0, "monarch: empty block dimension");
  return d;
}

// float/double run natively; other dtypes compute in float32 (like ATen's CPU
// reduced-precision matmul, which also accumulates in float32).
bool native(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// ---------------------------------------------------------------- routes
// Three implementations of each direction compute the same product (h is saved in the natural layout
// (B*K*Q,) by all of them, so the forward and backward routes are chosen independently):
//   engine: the packed-GEMM engine above (permutations fused into its packing);
//   aten:   the two-bmm algorithm of the reference, through ATen (no packing: cheapest for few rows);
//   blas:   the BLAS that torch ships (MKL or OpenBLAS, through ATen mm on strided views) for every block
//           product, by row tiles kept in L2: the permutations are the engine's vectorised (de)interleaves on
//           the tile, so every output value is written once, from cache (fwd_blas_impl, bwd_blas_impl).
//           Fastest where that BLAS is (e.g. MKL on Intel CPUs).
enum Route { kEngine = 0, kAten = 1, kBlas = 2, kNumRoutes = 3 };
const char* kRouteNames[] = {"engine", "aten", "blas"};

std::tuple<at::Tensor, at::Tensor> fwd_engine(const Dims& d, const at::Tensor& x, const at::Tensor& w1,
                                              const at::Tensor& w2, bool keep_h) {
  auto out = empty_out({d.B, d.L * d.S}, x.options());
  auto h = empty_out({keep_h ? d.B * d.K * d.Q : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "monarch_fwd_cpu", [&] {
    fwd_impl<scalar_t>(d, x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), keep_h ? h.data_ptr<scalar_t>() : nullptr);
  });
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_engine(const Dims& d, const at::Tensor& g, const at::Tensor& x,
                                                          const at::Tensor& w1, const at::Tensor& w2,
                                                          const at::Tensor& h) {
  auto dx = empty_out(x.sizes(), x.options()), dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "monarch_bwd_cpu", [&] {
    bwd_impl<scalar_t>(d, g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(),
                       w2.data_ptr<scalar_t>(), h.defined() ? h.data_ptr<scalar_t>() : nullptr,
                       dx.data_ptr<scalar_t>(), dw1.data_ptr<scalar_t>(), dw2.data_ptr<scalar_t>());
  });
  return {dx, dw1, dw2};
}

std::tuple<at::Tensor, at::Tensor> fwd_aten(const Dims& d, const at::Tensor& x, const at::Tensor& w1,
                                            const at::Tensor& w2, bool keep_h) {
  auto h = at::bmm(x.view({d.B, d.K, d.P}).transpose(0, 1), w1.transpose(1, 2));  // (K, B, Q)
  auto hn = h.transpose(0, 1).reshape({d.B, d.K * d.Q});                           // natural layout
  auto o = at::bmm(hn.view({d.B, d.R, d.L}).permute({2, 0, 1}), w2.transpose(1, 2));  // (L, B, S)
  auto out = o.permute({1, 2, 0}).reshape({d.B, d.S * d.L});
  return {out, keep_h ? hn.reshape({-1}) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_aten(const Dims& d, const at::Tensor& g, const at::Tensor& x,
                                                        const at::Tensor& w1, const at::Tensor& w2, at::Tensor hn) {
  if (!hn.defined())
    hn = at::bmm(x.view({d.B, d.K, d.P}).transpose(0, 1), w1.transpose(1, 2)).transpose(0, 1).reshape({d.B, -1});
  hn = hn.view({d.B, -1});
  auto gp = g.view({d.B, d.S, d.L}).permute({2, 0, 1});  // (L, B, S)
  auto hp = hn.view({d.B, d.R, d.L}).permute({2, 0, 1});  // (L, B, R)
  auto dS = at::bmm(gp, w2);                              // (L, B, R)
  auto dw2 = at::bmm(gp.transpose(1, 2), hp);             // (L, S, R)
  auto dh = dS.permute({1, 2, 0}).reshape({d.B, d.K, d.Q}).transpose(0, 1);  // (K, B, Q)
  auto xb = x.view({d.B, d.K, d.P}).transpose(0, 1);                         // (K, B, P)
  auto dx = at::bmm(dh, w1).transpose(0, 1).reshape({d.B, d.K * d.P});
  auto dw1 = at::bmm(dh.transpose(1, 2), xb);  // (K, Q, P)
  return {dx, dw1, dw2};
}

// out (a strided view, usually) = a @ b through ATen's mm, i.e. the BLAS that torch ships; ATen calls the
// BLAS on the view in place when one of its strides is 1 (every view below is made so).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// The blas forward, by row tiles that stay in this CPU's L2 (sized from it, as the engine's): stage 1 is K BLAS
// products of the tile's x columns (read in place) into its h rows (natural layout, straight into the saved h
// when there is one); the tile's h is split into its L contiguous (tb x R) groups by the vectorised
// de-interleave; stage 2 is L BLAS products per chunk of sc output columns into a buffer, which the vectorised
// interleave writes to out[b, s*L + l]. Every value of out is written once, from cache: no pass over the whole
// output (a full-size transpose of a fresh multi-MiB output cost as much as all the GEMMs on the Intel CPU
// it was measured on).
template <class T>
void fwd_blas_impl(const Dims& d, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, at::Tensor& out,
                   T* hsave) {
  const Engine<T> e = engine<T>(0);  // only its (de)interleaves
  const int64_t KQ = d.K * d.Q, LS = d.L * d.S, sz = sizeof(T);
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  // h and its split copy (2 x tb x K*Q) in half the L2, at least 64 rows (fewer starve the BLAS kernels)
  const int64_t tile = std::max<int64_t>(
      8, std::min<int64_t>({512, round_up((d.B + nth - 1) / nth, 8),
                            std::max<int64_t>(64, l2_bytes() / 2 / (2 * KQ * sz) / 16 * 16)}));
  const int64_t ntiles = (d.B + tile - 1) / tile;
  // output columns per chunk: the chunk's L blocks (L x tile x sc) in a quarter of the L2
  const int64_t sc = std::min(d.S, std::max<int64_t>(16, l2_bytes() / 4 / (d.L * tile * sz) / 16 * 16));
  auto opt = x.options();
  T* outp = out.data_ptr<T>();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    // tile buffers from the worker's kept scratch (see Scratch): fresh tensors per call were freed and faulted
    // in again on every call, which made this route's speed depend on the allocator's state
    T* hb = hsave ? nullptr : scratch<T>(kHbuf, tile * KQ);
    T* gp = d.L > 1 ? scratch<T>(kBb, tile * KQ) : nullptr;
    T* obp = d.L > 1 ? scratch<T>(kObuf, d.L * tile * sc) : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * tile, tb = std::min(tile, d.B - b0);
      T* hp = hsave ? hsave + b0 * KQ : hb;
      auto H = at::from_blob(hp, {tb, KQ}, opt);
      auto xt = x.narrow(0, b0, tb);
      for (int64_t k = 0; k < d.K; ++k)
        mm_into(H.narrow(1, k * d.Q, d.Q), xt.narrow(1, k * d.P, d.P), w1.select(0, k).t());
      if (d.L == 1) {
        mm_into(out.narrow(0, b0, tb), H, w2.select(0, 0).t());
        continue;
      }
      e.dil(tb, d.L, d.R, hp, KQ, gp, tb * d.R);  // G[l, i, r] = h[b0 + i, r*L + l]
      auto G = at::from_blob(gp, {d.L, tb, d.R}, opt);
      for (int64_t s0 = 0; s0 < d.S; s0 += sc) {
        const int64_t sn = std::min(sc, d.S - s0);
        auto O = at::from_blob(obp, {d.L, tb, sn}, opt);
        for (int64_t l = 0; l < d.L; ++l)
          mm_into(O.select(0, l), G.select(0, l), w2.select(0, l).narrow(0, s0, sn).t());
        e.il(tb, d.L, sn, obp, tb * sn, outp + b0 * LS + s0 * d.L, LS);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_blas(const Dims& d, const at::Tensor& x, const at::Tensor& w1,
                                            const at::Tensor& w2, bool keep_h) {
  auto out = empty_out({d.B, d.L * d.S}, x.options());
  auto h = empty_out({keep_h ? d.B * d.K * d.Q : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "monarch_fwd_blas", [&] {
    fwd_blas_impl<scalar_t>(d, x, w1, w2, out, keep_h ? h.data_ptr<scalar_t>() : nullptr);
  });
  return {out, h};
}

// The blas backward, by row tiles as the forward: per tile, g and h are split into their L contiguous groups
// (vectorised de-interleave; h recomputed by K BLAS products when it was not saved), dS_l = G_l w2[l] and
// dw2[l] += G_l^T H_l (2L BLAS products), dS is interleaved back into the tile's dh (natural layout), and
// dx_k = dh_k w1[k] (written in place into dx's columns), dw1[k] += dh_k^T x_k (2K BLAS products). The weight
// gradients are summed over tiles in nch fixed chunks of consecutive tiles, one accumulator each, added up in
// chunk order at the end, so that the result does not depend on which thread ran which chunk.
template <class T>
void bwd_blas_impl(const Dims& d, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w1,
                   const at::Tensor& w2, const T* hsaved, at::Tensor& dx, at::Tensor& dw1, at::Tensor& dw2) {
  const Engine<T> e = engine<T>(0);  // only its (de)interleaves
  const int64_t KQ = d.K * d.Q, LS = d.L * d.S, sz = sizeof(T);
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  // per row: g's groups (L*S), h and its groups, dS and dh (4 x K*Q); 128..512 rows, fewer starve the
  // BLAS kernels of the weight gradients (their inner dimension is the tile height)
  const int64_t row_bytes = (LS + 4 * KQ) * sz;
  const int64_t tile = std::max<int64_t>(
      8, std::min<int64_t>({512, round_up((d.B + nth - 1) / nth, 8),
                            std::max<int64_t>(128, l2_bytes() / row_bytes / 16 * 16)}));
  const int64_t ntiles = (d.B + tile - 1) / tile;
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(nth, ntiles)), per_ch = (ntiles + nch - 1) / nch;
  auto opt = x.options();
  // All buffers come from the kept scratch (see Scratch and fwd_blas_impl): the per-chunk sums in the calling
  // thread's weight slots (this route packs no weights), the tile buffers in each worker's tile slots.
  auto acc1 = at::from_blob(scratch<T>(kW1, nch * d.K * d.Q * d.P), {nch, d.K, d.Q, d.P}, opt);
  auto acc2 = at::from_blob(scratch<T>(kW2, nch * d.L * d.S * d.R), {nch, d.L, d.S, d.R}, opt);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    T *gs = scratch<T>(kBb, tile * LS), *hbp = scratch<T>(kHbuf, tile * KQ), *hsp = scratch<T>(kObuf, tile * KQ),
      *dsp = scratch<T>(kDsb, tile * KQ), *dhbp = scratch<T>(kDh, tile * KQ);
    for (int64_t c = c0; c < c1; ++c) {
      auto a1 = acc1.select(0, c), a2 = acc2.select(0, c);
      const int64_t tbeg = c * per_ch, tend = std::min(ntiles, tbeg + per_ch);
      if (tbeg >= tend) {
        a1.zero_();
        a2.zero_();
      }
      for (int64_t t = tbeg; t < tend; ++t) {
        const bool first = t == tbeg;
        const int64_t b0 = t * tile, tb = std::min(tile, d.B - b0);
        auto xt = x.narrow(0, b0, tb);
        const T* hp = hsaved ? hsaved + b0 * KQ : hbp;
        if (!hsaved) {
          auto H = at::from_blob(hbp, {tb, KQ}, opt);
          for (int64_t k = 0; k < d.K; ++k)
            mm_into(H.narrow(1, k * d.Q, d.Q), xt.narrow(1, k * d.P, d.P), w1.select(0, k).t());
        }
        const T* gp = g.data_ptr<T>() + b0 * LS;
        if (d.L > 1) {
          e.dil(tb, d.L, d.S, gp, LS, gs, tb * d.S);   // G[l, i, s] = g[b0 + i, s*L + l]
          e.dil(tb, d.L, d.R, hp, KQ, hsp, tb * d.R);  // Hs[l, i, r] = h[b0 + i, r*L + l]
        }
        auto G = at::from_blob(d.L > 1 ? gs : const_cast<T*>(gp), {d.L, tb, d.S}, opt);
        auto Hs = at::from_blob(d.L > 1 ? hsp : const_cast<T*>(hp), {d.L, tb, d.R}, opt);
        auto DS = at::from_blob(dsp, {d.L, tb, d.R}, opt);
        for (int64_t l = 0; l < d.L; ++l) {
          mm_into(DS.select(0, l), G.select(0, l), w2.select(0, l));
          auto dst = a2.select(0, l);
          if (first) mm_into(dst, G.select(0, l).t(), Hs.select(0, l));
          else dst.addmm_(G.select(0, l).t(), Hs.select(0, l));
        }
        T* dhp = dsp;  // L == 1: dS is dh in natural layout
        if (d.L > 1) {
          dhp = dhbp;
          e.il(tb, d.L, d.R, dsp, tb * d.R, dhp, KQ);  // dh[i, r*L + l] = dS[l, i, r]
        }
        auto DH = at::from_blob(dhp, {tb, KQ}, opt);
        auto dxt = dx.narrow(0, b0, tb);
        for (int64_t k = 0; k < d.K; ++k) {
          auto dk = DH.narrow(1, k * d.Q, d.Q);
          mm_into(dxt.narrow(1, k * d.P, d.P), dk, w1.select(0, k));
          auto dst = a1.select(0, k);
          if (first) mm_into(dst, dk.t(), xt.narrow(1, k * d.P, d.P));
          else dst.addmm_(dk.t(), xt.narrow(1, k * d.P, d.P));
        }
      }
    }
  });
  at::sum_out(dw1, acc1, {0});
  at::sum_out(dw2, acc2, {0});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_blas(const Dims& d, const at::Tensor& g, const at::Tensor& x,
                                                        const at::Tensor& w1, const at::Tensor& w2,
                                                        const at::Tensor& hn) {
  auto dx = empty_out(x.sizes(), x.options()), dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "monarch_bwd_blas", [&] {
    bwd_blas_impl<scalar_t>(d, g, x, w1, w2, hn.defined() ? hn.data_ptr<scalar_t>() : nullptr, dx, dw1, dw2);
  });
  return {dx, dw1, dw2};
}

// ---------------------------------------------------------------- route choice
// Each call picks its route from the shape: MONARCH_SEAM_CPU_ROUTE=engine|aten|blas forces one; products
// under kTuneFlops use aten (fixed costs dominate there); otherwise the first call for a shape key (direction,
// K, P, Q, L, S, R, dtype, threads and B rounded up to a power of two) times every route on its real inputs
// (a warm-up, then interleaved rounds, the best of each route: see measure_routes) and keeps the fastest (the
// two-bmm route unless another beats it by 5%). Decisions are stored in a small text file beside the build (the
// path is set by cuda/monarch_ops.py; MONARCH_SEAM_TUNE_FILE overrides it there), whose first line names the
// CPU model and ISA: a file from another CPU, or one with a damaged line, is ignored (with one warning, from
// monarch_ops.py) and rewritten. A route the CPU is slow at is thus never chosen, whatever CPU this runs on.
constexpr double kTuneFlops = 4e6;

const char* kTuneHeader = "monarch_seam cpu routes v1";

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) {
      auto c = line.find(':');
      if (c != std::string::npos) return line.substr(c + 2);
    }
  return "unknown cpu";
}

std::string tune_signature() { return cpu_model() + "|" + isa_name(isa()); }

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// The file also keeps cuda/monarch_ops.py's verdicts, for products small enough that the op's call overhead may
// decide: whether the op (on its routes) or the Python reference is faster there, measured in Python once per key
// ("call_fwd ..." / "call_fwd_h ...", the route key of that direction) and stored as "op" or "ref".
const char* kVerdictNames[] = {"ref", "op"};

struct Tuner {
  std::mutex mu;
  std::map<std::string, int> table;
  std::map<std::string, std::string> verdicts;
  std::string file;
  bool loaded = false;
  bool forced_checked = false;
  int forced = -1;
  std::atomic<uint64_t> gen{0};  // bumped when the file (and so the table) changes: invalidates the memos

  std::string path() { return file; }

  // Reads the file once; returns "" or what is wrong with it (then it is ignored and later rewritten).
  std::string load() {  // under mu
    if (loaded) return "";
    loaded = true;
    const std::string p = path();
    if (p.empty()) return "";
    std::ifstream f(p);
    if (!f) return "";  // no file yet
    std::string line, problem;
    std::map<std::string, int> got;
    std::map<std::string, std::string> got_verdicts;
    if (!std::getline(f, line) || line != std::string(kTuneHeader) + "\t" + tune_signature()) {
      problem = "it was written for another CPU or format (" + line.substr(0, 120) + ")";
    } else {
      while (std::getline(f, line)) {
        std::istringstream ls(line);
        std::string key, route, hash;
        if (!(std::getline(ls, key, '\t') && std::getline(ls, route, '\t') && std::getline(ls, hash))) {
          problem = "a line is malformed";
          break;
        }
        const bool verdict = key.rfind("call_", 0) == 0;
        int r = -1;
        if (verdict) {
          if (route == kVerdictNames[0] || route == kVerdictNames[1]) r = 0;
        } else {
          for (int i = 0; i < kNumRoutes; ++i)
            if (route == kRouteNames[i]) r = i;
        }
        std::ostringstream hs;
        hs << std::hex << fnv1a(key + "\t" + route);
        if (r < 0 || hs.str() != hash) {
          problem = "a line fails its check";
          break;
        }
        if (verdict)
          got_verdicts[key] = route;
        else
          got[key] = r;
      }
    }
    if (problem.empty()) {
      table = got;
      verdicts = got_verdicts;
    }
    return problem;
  }

  void save() {  // under mu; whole file, written to a temporary and renamed
    const std::string p = path();
    if (p.empty()) return;
    const std::string tmp = p + ".tmp" + std::to_string(getpid());
    {
      std::ofstream f(tmp, std::ios::trunc);
      if (!f) return;  // read-only location: decisions stay in memory
      f << kTuneHeader << "\t" << tune_signature() << "\n";
      auto line = [&](const std::string& body) { f << body << "\t" << std::hex << fnv1a(body) << std::dec << "\n"; };
      for (const auto& kv : table) line(kv.first + "\t" + kRouteNames[kv.second]);
      for (const auto& kv : verdicts) line(kv.first + "\t" + kv.second);
      if (!f) return;
    }
    std::rename(tmp.c_str(), p.c_str());
  }

  int forced_route() {
    if (!forced_checked) {
      forced_checked = true;
      const char* env = std::getenv("MONARCH_SEAM_CPU_ROUTE");
      if (env && *env && std::string(env) != "auto") {
        for (int i = 0; i < kNumRoutes; ++i)
          if (std::string(env) == kRouteNames[i]) forced = i;
        TORCH_CHECK(forced >= 0, "MONARCH_SEAM_CPU_ROUTE must be auto, engine, aten or blas, got ", env);
      }
    }
    return forced;
  }
};

Tuner& tuner() {
  static Tuner t;
  return t;
}

std::string route_key(const char* dir, const Dims& d, at::ScalarType st) {
  int64_t b = 1;
  while (b < d.B) b *= 2;
  std::ostringstream k;
  k << dir << " B<=" << b << " K" << d.K << " P" << d.P << " Q" << d.Q << " L" << d.L << " S" << d.S << " R"
    << d.R << " " << c10::toString(st) << " t" << at::get_num_threads();
  return k.str();
}

// Times every route on the call's inputs and returns the fastest. Each route is run once to warm up
// (first-touch allocations, BLAS and thread-pool start), then the routes are timed in interleaved rounds
// (route 0, 1, 2, route 0, 1, 2, ...) and each keeps its best time: a burst of load from another process
// then slows one round of every route rather than all the runs of one route, which on a shared machine
// would decide the choice. At least 5 rounds, more for short products (about 0.3 s of runs in all, at most 20
// rounds): the 2-core test machine's capacity was seen to change in streaks of a second or so, by up to 40%
// (load from other tenants of the host), and a choice is made once per shape and cached, so a longer measurement
// is cheap. The two-bmm route wins unless another is faster by more than kMargin.
constexpr double kMargin = 0.05;

template <class F>
int measure_routes(F&& run) {
  double best[kNumRoutes];
  for (int r = 0; r < kNumRoutes; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run(r);
    best[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  double round_s = 0;
  for (double v : best) round_s += v;
  const int rounds = int(std::max(5.0, std::min(20.0, 0.3 / std::max(round_s, 1e-9))));
  for (int r = 0; r < kNumRoutes; ++r) best[r] = 1e300;
  for (int i = 0; i < rounds; ++i)
    for (int r = 0; r < kNumRoutes; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      run(r);
      best[r] = std::min(best[r], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  // A compiled route must beat the two-bmm one by kMargin: within it the difference is timing noise, and the
  // two-bmm route is the reference's own algorithm (cuda/monarch_ops.py then calls the reference itself).
  const int fastest = int(std::min_element(best, best + kNumRoutes) - best);
  return best[kAten] <= best[fastest] * (1 + kMargin) ? int(kAten) : fastest;
}

// The route for this call; run(route) executes one route (used to time them on the first call of a key).
template <class F>
int pick_route(const char* dir, const Dims& d, at::ScalarType st, F&& run) {
  Tuner& t = tuner();
  {
    std::lock_guard<std::mutex> g(t.mu);
    const int forced = t.forced_route();
    if (forced >= 0) return forced;
  }
  const double flops = 2.0 * d.B * (d.K * d.Q * d.P + d.L * d.S * d.R);
  if (flops < kTuneFlops) return kAten;
  // A few recent decisions per thread, compared field by field: the string key below costs more than a small
  // product (a training step cycles through its layers' shapes, hence more than one entry).
  struct Memo {
    const char* dir = "";
    int64_t b = -1, K, P, Q, L, S, R;
    at::ScalarType st;
    int threads;
    uint64_t gen;
    int route;
  };
  constexpr int kMemo = 16;
  thread_local Memo memo[kMemo];
  thread_local int memo_next = 0;
  int64_t bkt = 1;
  while (bkt < d.B) bkt *= 2;
  const int nth = at::get_num_threads();
  const uint64_t gen = t.gen.load();
  for (const Memo& m : memo)
    if (m.b == bkt && m.K == d.K && m.P == d.P && m.Q == d.Q && m.L == d.L && m.S == d.S && m.R == d.R &&
        m.st == st && m.threads == nth && m.gen == gen && std::strcmp(m.dir, dir) == 0)
      return m.route;
  auto remember = [&](int route) {
    memo[memo_next] = Memo{dir, bkt, d.K, d.P, d.Q, d.L, d.S, d.R, st, nth, gen, route};
    memo_next = (memo_next + 1) % kMemo;
    return route;
  };
  const std::string key = route_key(dir, d, st);
  {
    std::lock_guard<std::mutex> g(t.mu);
    t.load();
    auto it = t.table.find(key);
    if (it != t.table.end()) return remember(it->second);
  }
  const int best = measure_routes(run);
  std::lock_guard<std::mutex> g(t.mu);
  t.table[key] = best;
  t.save();
  return remember(best);
}

std::tuple<at::Tensor, at::Tensor> fwd_route(int r, const Dims& d, const at::Tensor& x, const at::Tensor& w1,
                                             const at::Tensor& w2, bool keep_h) {
  switch (r) {
    case kEngine: return fwd_engine(d, x, w1, w2, keep_h);
    case kAten: return fwd_aten(d, x, w1, w2, keep_h);
    default: return fwd_blas(d, x, w1, w2, keep_h);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_route(int r, const Dims& d, const at::Tensor& g,
                                                         const at::Tensor& x, const at::Tensor& w1,
                                                         const at::Tensor& w2, const at::Tensor& h) {
  switch (r) {
    case kEngine: return bwd_engine(d, g, x, w1, w2, h);
    case kAten: return bwd_aten(d, g, x, w1, w2, h);
    default: return bwd_blas(d, g, x, w1, w2, h);
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_h_cpu(const at::Tensor& x_, const at::Tensor& w1_, const at::Tensor& w2_,
                                             bool keep_h) {
  // The routes call ATen ops (mm into views) on the op's inputs, which may require grad: below autograd,
  // as every kernel of an op with its own autograd formula runs.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Dims d = check(x_, w1_, w2_);
  if (!native(x_)) {
    auto r = fwd_h_cpu(x_.to(at::kFloat), w1_.to(at::kFloat), w2_.to(at::kFloat), keep_h);
    return {std::get<0>(r).to(x_.scalar_type()), std::get<1>(r).to(x_.scalar_type())};
  }
  // detached: the guard above is per thread, and the blas route calls ATen from at::parallel_for workers
  auto x = x_.detach().contiguous(), w1 = w1_.detach().contiguous(), w2 = w2_.detach().contiguous();
  if (d.B == 0) return fwd_aten(d, x, w1, w2, keep_h);
  const int r = pick_route(keep_h ? "fwd_h" : "fwd", d, x.scalar_type(),
                           [&](int rr) { fwd_route(rr, d, x, w1, w2, keep_h); });
  return fwd_route(r, d, x, w1, w2, keep_h);
}

at::Tensor monarch_fwd_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  return std::get<0>(fwd_h_cpu(x, w1, w2, false));
}
std::tuple<at::Tensor, at::Tensor> monarch_fwd_h_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                     const at::Tensor& w2) {
  return fwd_h_cpu(x, w1, w2, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd_cpu(const at::Tensor& g_, const at::Tensor& x_,
                                                               const at::Tensor& w1_, const at::Tensor& w2_,
                                                               const std::optional<at::Tensor>& h_) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in fwd_h_cpu
  Dims d = check(x_, w1_, w2_);
  TORCH_CHECK(g_.dim() == 2 && g_.size(0) == d.B && g_.size(1) == d.L * d.S, "monarch_bwd: grad must be (B, L*S)");
  const bool use_h = h_.has_value() && h_->numel() == d.B * d.K * d.Q;
  if (!native(x_)) {
    auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    std::optional<at::Tensor> hf;
    if (use_h) hf = f(*h_);
    auto r = monarch_bwd_cpu(f(g_), f(x_), f(w1_), f(w2_), hf);
    auto st = x_.scalar_type();
    return {std::get<0>(r).to(st), std::get<1>(r).to(st), std::get<2>(r).to(st)};
  }
  auto g = g_.detach().to(x_.scalar_type()).contiguous(), x = x_.detach().contiguous(),
       w1 = w1_.detach().contiguous(), w2 = w2_.detach().contiguous();
  at::Tensor h = use_h ? h_->detach().to(x_.scalar_type()).contiguous() : at::Tensor();
  if (d.B == 0) return bwd_aten(d, g, x, w1, w2, h);
  const int r = pick_route(use_h ? "bwd_h" : "bwd", d, x.scalar_type(),
                           [&](int rr) { bwd_route(rr, d, g, x, w1, w2, h); });
  return bwd_route(r, d, g, x, w1, w2, h);
}

// The route a call with these dims would take if already decided ("" when not yet measured).
std::string cpu_route(const std::string& dir, std::vector<int64_t> dims, at::ScalarType st) {
  TORCH_CHECK(dims.size() == 7, "cpu_route: dims must be [B, K, P, Q, L, S, R]");
  Dims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]};
  Tuner& t = tuner();
  std::lock_guard<std::mutex> g(t.mu);
  const int forced = t.forced_route();
  if (forced >= 0) return kRouteNames[forced];
  if (2.0 * d.B * (d.K * d.Q * d.P + d.L * d.S * d.R) < kTuneFlops) return kRouteNames[kAten];
  t.load();
  auto it = t.table.find(route_key(dir.c_str(), d, st));
  return it == t.table.end() ? std::string() : std::string(kRouteNames[it->second]);
}

// The route of a forward call with these dims, deciding it now if needed: a key not decided yet is measured on
// synthetic inputs of the shape (normal x, factors and output gradient), exactly as the first real call would
// measure it. For fwd_h (a training step) the backward's route (bwd_h) is decided too and the answer names both,
// "fwd+bwd" (e.g. "aten+blas"). cuda/monarch_ops.py asks this once per shape key and calls the reference itself
// where the answer is "aten" or "aten+aten" (no compiled route beats the two-bmm one in any direction), and where
// only one direction gains on a product too small for that gain to pay the op's overhead (_decide there).
std::string cpu_decide(const std::string& dir, std::vector<int64_t> dims, at::ScalarType st) {
  TORCH_CHECK(dir == "fwd" || dir == "fwd_h", "_cpu_decide: dir must be fwd or fwd_h, got ", dir);
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "_cpu_decide: dtype must be float32 or float64");
  TORCH_CHECK(dims.size() == 7, "_cpu_decide: dims must be [B, K, P, Q, L, S, R]");
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]};
  TORCH_CHECK(d.B > 0 && d.K > 0 && d.P > 0 && d.Q > 0 && d.L > 0 && d.S > 0 && d.R > 0 && d.K * d.Q == d.L * d.R,
              "_cpu_decide: bad dims");
  const bool keep_h = dir == "fwd_h";
  std::string fwd = cpu_route(dir, dims, st), bwd = keep_h ? cpu_route("bwd_h", dims, st) : "-";
  if (!fwd.empty() && !bwd.empty()) return keep_h ? fwd + "+" + bwd : fwd;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto opt = at::TensorOptions().dtype(st);
  auto x = at::randn({d.B, d.K * d.P}, opt), w1 = at::randn({d.K, d.Q, d.P}, opt),
       w2 = at::randn({d.L, d.S, d.R}, opt);
  fwd = kRouteNames[pick_route(dir.c_str(), d, st, [&](int rr) { fwd_route(rr, d, x, w1, w2, keep_h); })];
  if (!keep_h) return fwd;
  auto g = at::randn({d.B, d.L * d.S}, opt), h = std::get<1>(fwd_aten(d, x, w1, w2, true));
  bwd = kRouteNames[pick_route("bwd_h", d, st, [&](int rr) { bwd_route(rr, d, g, x, w1, w2, h); })];
  return fwd + "+" + bwd;
}

// cuda/monarch_ops.py's verdict for a call of these dims (dir fwd or fwd_h): "op", "ref", or "" if not measured.
std::string verdict_key(const std::string& dir, const std::vector<int64_t>& dims, at::ScalarType st) {
  TORCH_CHECK(dir == "fwd" || dir == "fwd_h", "cpu verdict: dir must be fwd or fwd_h, got ", dir);
  TORCH_CHECK(dims.size() == 7, "cpu verdict: dims must be [B, K, P, Q, L, S, R]");
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]};
  return route_key(("call_" + dir).c_str(), d, st);
}

std::string cpu_verdict(const std::string& dir, std::vector<int64_t> dims, at::ScalarType st) {
  const std::string key = verdict_key(dir, dims, st);
  Tuner& t = tuner();
  std::lock_guard<std::mutex> g(t.mu);
  t.load();
  auto it = t.verdicts.find(key);
  return it == t.verdicts.end() ? std::string() : it->second;
}

void set_cpu_verdict(const std::string& dir, std::vector<int64_t> dims, at::ScalarType st,
                     const std::string& verdict) {
  TORCH_CHECK(verdict == kVerdictNames[0] || verdict == kVerdictNames[1], "cpu verdict must be ref or op, got ",
              verdict);
  const std::string key = verdict_key(dir, dims, st);
  Tuner& t = tuner();
  std::lock_guard<std::mutex> g(t.mu);
  t.load();
  t.verdicts[key] = verdict;
  t.save();
}

void set_tune_file(const std::string& path) {
  Tuner& t = tuner();
  std::lock_guard<std::mutex> g(t.mu);
  t.file = path;
  t.loaded = false;
  t.table.clear();
  t.verdicts.clear();
  t.gen++;
}

// Loads the route file now; returns "" or the reason it was ignored (cuda/monarch_ops.py warns with it).
std::string load_tune_file() {
  Tuner& t = tuner();
  std::lock_guard<std::mutex> g(t.mu);
  return t.load();
}

std::string cpu_isa() { return isa_name(isa()); }

// The panel width (columns of one register-kernel block) that the engine uses for a GEMM with n output columns.
int64_t cpu_panel_width(int64_t n, at::ScalarType st) {
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "_cpu_panel_width: dtype must be float32 or float64");
  return st == at::kFloat ? engine<float>(n).nr : engine<double>(n).nr;
}

// Whether the engine's forward makes stage 2 with a lane kernel (see fwd_lanes) for dims [B, K, P, Q, L, S, R].
bool cpu_fwd_lanes(std::vector<int64_t> dims, at::ScalarType st) {
  TORCH_CHECK(dims.size() == 7, "_cpu_fwd_lanes: dims must be [B, K, P, Q, L, S, R]");
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "_cpu_fwd_lanes: dtype must be float32 or float64");
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]};
  return st == at::kFloat ? fwd_lanes<float>(d).fn != nullptr : fwd_lanes<double>(d).fn != nullptr;
}

// The CUDA op's GEMM plan (cuda/monarch_plan.h) for dims [B, K, P, Q, L, S, R], flattened as 19 ints per
// GEMM (a, b, c, batch, M, N, Kd, A view, B view, C map) for stage 1, stage 2 and the four backward
// GEMMs: lets a CPU test execute the CUDA launch plan by emulation.
std::vector<int64_t> cuda_plan(std::vector<int64_t> dims) {
  TORCH_CHECK(dims.size() == 7, "_cuda_plan: dims must be [B, K, P, Q, L, S, R]");
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6]};
  plan::Gemm g[6];
  g[0] = plan::stage1(d);
  g[1] = plan::stage2(d);
  plan::backward(d, g + 2);
  std::vector<int64_t> out;
  for (const auto& e : g)
    for (int64_t v : {int64_t(e.a), int64_t(e.b), int64_t(e.c), e.batch, e.M, e.N, e.Kd, e.av.bs, e.av.rs, e.av.cs,
                      e.bv.bs, e.bv.rs, e.bv.cs, e.cv.bs, e.cv.rs, e.cv.cs, e.cv.pq, e.cv.pl, e.cv.plane})
      out.push_back(v);
  return out;
}

}  // namespace

TORCH_LIBRARY(monarch_seam, m) {
  m.def("monarch_fwd(Tensor x, Tensor w1, Tensor w2) -> Tensor");
  // h: stage-1 activations in an implementation-defined 1-D layout, for monarch_bwd
  m.def("monarch_fwd_h(Tensor x, Tensor w1, Tensor w2) -> (Tensor, Tensor)");
  m.def("monarch_bwd(Tensor grad, Tensor x, Tensor w1, Tensor w2, Tensor? h) -> (Tensor, Tensor, Tensor)");
  m.def("butterfly_fwd(Tensor twiddle, Tensor x, bool increasing_stride) -> Tensor");
  m.def("butterfly_bwd(Tensor grad, Tensor twiddle, Tensor x, bool increasing_stride) -> (Tensor, Tensor)");
  // which register kernel the CPU ops use: "avx512", "avx2" or "base"
  m.def("cpu_isa() -> str", &cpu_isa);
  // the engine's panel width for a GEMM with n output columns (tests check that every width is exercised)
  m.def("_cpu_panel_width(int n, ScalarType dtype) -> int", &cpu_panel_width);
  m.def("_cpu_fwd_lanes(int[] dims, ScalarType dtype) -> bool", &cpu_fwd_lanes);
  // the CPU Monarch route chosen for a shape: dir in fwd, fwd_h, bwd, bwd_h; "" if not measured yet
  m.def("cpu_route(str dir, int[] dims, ScalarType dtype) -> str", &cpu_route);
  // the same, deciding (measuring on synthetic inputs) if not decided yet; dir in fwd, fwd_h
  m.def("_cpu_decide(str dir, int[] dims, ScalarType dtype) -> str", &cpu_decide);
  // cuda/monarch_ops.py's measured choice between the op and the Python reference, kept in the same file
  m.def("_cpu_verdict(str dir, int[] dims, ScalarType dtype) -> str", &cpu_verdict);
  m.def("_set_cpu_verdict(str dir, int[] dims, ScalarType dtype, str verdict) -> ()", &set_cpu_verdict);
  // where the CPU route decisions are stored (set at load by cuda/monarch_ops.py)
  m.def("_set_tune_file(str path) -> ()", &set_tune_file);
  m.def("_load_tune_file() -> str", &load_tune_file);
  // the CUDA GEMM plan, for a CPU emulation test (see cuda/monarch_plan.h)
  m.def("_cuda_plan(int[] dims) -> int[]", &cuda_plan);
}

TORCH_LIBRARY_IMPL(monarch_seam, CPU, m) {
  m.impl("monarch_fwd", &monarch_fwd_cpu);
  m.impl("monarch_fwd_h", &monarch_fwd_h_cpu);
  m.impl("monarch_bwd", &monarch_bwd_cpu);
}

}  // namespace monarch_seam
