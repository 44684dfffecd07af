// CPU implementation of the monarch_seam ops (the op schemas are defined here too).
//
// Monarch multiply, with x (B, K*P), w1 (K, Q, P), w2 (L, S, R), K*Q == L*R:
//   h[b, k*Q + q]   = sum_p w1[k, q, p] * x[b, k*P + p]           (stage 1, h in natural layout)
//   out[b, s*L + l] = sum_r w2[l, s, r] * h[b, r*L + l]           (stage 2: both permutations)
// The reference does this with two bmm calls and three permutation copies over the whole batch.
//
// Here every product is a call of one small GEMM engine (below) whose operands are *strided views*:
// the engine copies ("packs") each operand into the panel layout its register kernel reads, and that
// copy takes arbitrary row and column strides, so the Monarch permutations cost nothing beyond the
// packing every fast GEMM does anyway (e.g. stage 2 reads h[b, r*L + l] as a matrix with strides
// (K*Q, L)). Rows are processed in tiles of <= 128 tokens so that a tile's intermediate stays in
// cache; the weights are packed once per call and shared by all tiles and threads. Only two things
// are reordered explicitly, both on a tile that is in cache: the output block l is scattered into
// out[b, s*L + l], and in the backward pass dh is brought back to its natural layout.
//
// The register kernel is written once with GCC vector extensions and compiled three times with
// function-level target attributes (AVX-512: 8x48 floats / 8x24 doubles, AVX2+FMA: 4x24 / 4x12,
// baseline SSE2: 4x12 / 4x6); the best one the CPU supports is chosen at load time
// (MONARCH_SEAM_CPU_ISA=avx512|avx2|base overrides it, for tests). No BLAS is called.
//
// The butterfly ops (schemas below) are implemented in cuda/butterfly_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
};

// One MR x (NV*W) block of C from a packed A panel (kc x MR) and a packed B panel (kc x NV*W).
// The accumulators live in registers for the whole k loop: with AVX-512 and 8x48 floats that is
// 24 zmm accumulators + 3 for B, and each A value is a broadcast operand of the FMAs.
template <class T, int VB, int MR, int NV>
static inline __attribute__((always_inline)) void ukernel_body(int64_t kc, const T* __restrict A,
                                                               const T* __restrict B, T* __restrict C,
                                                               int64_t ldc, bool acc) {
  typedef typename Vec<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  V c[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[i][j] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(&b[j], B + j * W, VB);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T a = A[i];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] += a * b[j];
    }
    A += MR;
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
using UkFn = void (*)(int64_t, const T*, const T*, T*, int64_t, bool);

// One register kernel per dtype and ISA: the same body, compiled under each target attribute.
#define MONARCH_SEAM_UK(NAME, T, TARGET, VB, MR)                                                   \
  TARGET void NAME(int64_t kc, const T* A, const T* B, T* C, int64_t ldc, bool acc) {              \
    ukernel_body<T, VB, MR, 3>(kc, A, B, C, ldc, acc);                                            \
  }
MONARCH_SEAM_UK(uk_f32_avx512, float, __attribute__((target("avx512f"))), 64, 8)    // 8 x 48 floats
MONARCH_SEAM_UK(uk_f64_avx512, double, __attribute__((target("avx512f"))), 64, 8)   // 8 x 24 doubles
MONARCH_SEAM_UK(uk_f32_avx2, float, __attribute__((target("avx2,fma"))), 32, 4)     // 4 x 24 floats
MONARCH_SEAM_UK(uk_f64_avx2, double, __attribute__((target("avx2,fma"))), 32, 4)    // 4 x 12 doubles
MONARCH_SEAM_UK(uk_f32_base, float, , 16, 4)                                        // 4 x 12 floats (SSE2)
MONARCH_SEAM_UK(uk_f64_base, double, , 16, 4)                                       // 4 x 6 doubles
#undef MONARCH_SEAM_UK

template <class T>
struct Engine {
  int mr, nr;
  UkFn<T> fn;
};
template <class T>
Engine<T> engine();
template <>
Engine<float> engine<float>() {
  switch (isa()) {
    case kAvx512: return {8, 48, uk_f32_avx512};
    case kAvx2: return {4, 24, uk_f32_avx2};
    default: return {4, 12, uk_f32_base};
  }
}
template <>
Engine<double> engine<double>() {
  switch (isa()) {
    case kAvx512: return {8, 24, uk_f64_avx512};
    case kAvx2: return {4, 12, uk_f64_avx2};
    default: return {4, 6, uk_f64_base};
  }
}

constexpr int64_t kKC = 192;  // k-slice: a 192 x 48 float B panel (36 KiB) stays in L1 while A panels stream
constexpr int64_t kMC = 256;  // rows of A packed at a time (at most 192 KiB, in L2)

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

// Packed A: panels of mr rows for one k-slice: dst[(i/mr)*kc*mr + k*mr + i%mr] = a[i*ars + k*acs].
template <class T>
void pack_a(const Engine<T>& e, int64_t mc, int64_t kc, const T* a, int64_t ars, int64_t acs, T* dst) {
  const int mr = e.mr;
  for (int64_t i0 = 0; i0 < mc; i0 += mr) {
    const int64_t m = std::min<int64_t>(mr, mc - i0);
    T* d = dst + i0 * kc;
    if (m < mr)
      std::fill(d, d + kc * mr, T(0));
    if (ars == 1) {
      for (int64_t k = 0; k < kc; ++k) std::memcpy(d + k * mr, a + i0 + k * acs, m * sizeof(T));
    } else if (acs < ars) {  // walk along the smaller stride
      for (int64_t i = 0; i < m; ++i) {
        const T* src = a + (i0 + i) * ars;
        for (int64_t k = 0; k < kc; ++k) d[k * mr + i] = src[k * acs];
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = a + i0 * ars + k * acs;
        for (int64_t i = 0; i < m; ++i) d[k * mr + i] = src[i * ars];
      }
    }
  }
}

// Scratch for one thread's A panels.
template <class T>
int64_t abuf_size(const Engine<T>& e) {
  return round_up(kMC, e.mr) * kKC;
}

// C (M x N, row stride ldc) = [C +] A @ B, A a strided view, B packed by pack_b with the same K.
template <class T>
void gemm(const Engine<T>& e, int64_t M, int64_t N, int64_t K, const T* a, int64_t ars, int64_t acs,
          const T* bp, T* C, int64_t ldc, bool acc, T* abuf) {
  const int mr = e.mr, nr = e.nr;
  if (K == 0) {
    if (!acc)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  alignas(64) T edge[8 * 48];
  for (int64_t pc = 0; pc < K; pc += kKC) {
    const int64_t kc = std::min(kKC, K - pc);
    const bool accum = acc || pc > 0;
    for (int64_t ic = 0; ic < M; ic += kMC) {
      const int64_t mc = std::min(kMC, M - ic);
      pack_a(e, mc, kc, a + ic * ars + pc * acs, ars, acs, abuf);
      for (int64_t jr = 0; jr < N; jr += nr) {
        const int64_t nb = std::min<int64_t>(nr, N - jr);
        const T* bpan = bp + (jr / nr) * K * nr + pc * nr;
        for (int64_t ir = 0; ir < mc; ir += mr) {
          const int64_t mb = std::min<int64_t>(mr, mc - ir);
          T* c = C + (ic + ir) * ldc + jr;
          if (mb == mr && nb == nr) {
            e.fn(kc, abuf + ir * kc, bpan, c, ldc, accum);
          } else {  // ragged edge: full block into a buffer, then the valid part
            e.fn(kc, abuf + ir * kc, bpan, edge, nr, false);
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
enum Slot { kW1, kW2, kW1T, kAcc, kAbuf, kHbuf, kObuf, kDsb, kDh, kBb, kNumSlots };

template <class T>
T* scratch(Slot slot, int64_t n) {
  thread_local Scratch s[kNumSlots];
  return s[slot].get<T>(n);
}

// ---------------------------------------------------------------- Monarch
using plan::Dims;  // B tokens; w1 (K, Q, P); w2 (L, S, R)

constexpr int64_t kTile = 128;  // token rows per tile: a tile's h (128 x K*Q) stays in L2

// Smaller tiles for small batches so that every thread gets rows.
inline int64_t tile_rows(int64_t B) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = round_up((B + nth - 1) / nth, 8);
  return std::max<int64_t>(8, std::min<int64_t>(kTile, per));
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
                 int64_t tb, T* H, T* abuf) {
  const int64_t KP = d.K * d.P, KQ = d.K * d.Q;
  for (int64_t k = 0; k < d.K; ++k)
    gemm(e, tb, d.Q, d.P, x + b0 * KP + k * d.P, KP, 1, w1p + k * w1s, H + k * d.Q, KQ, false, abuf);
}

template <class T>
void fwd_impl(const Dims& d, const T* x, const T* w1, const T* w2, T* out, T* hsave) {
  const Engine<T> e = engine<T>();
  const int64_t KQ = d.K * d.Q, LS = d.L * d.S;
  int64_t w1s, w2s;
  const T* w1p = pack_weights(e, w1, d.K, d.Q, d.P, true, kW1, &w1s);  // B(p, q) = w1[k, q, p]
  const T* w2p = pack_weights(e, w2, d.L, d.S, d.R, true, kW2, &w2s);  // B(r, s) = w2[l, s, r]
  const int64_t tile = tile_rows(d.B), ntiles = (d.B + tile - 1) / tile;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    T* abuf = scratch<T>(kAbuf, abuf_size(e));
    T* hbuf = hsave ? nullptr : scratch<T>(kHbuf, tile * KQ);
    T* obuf = scratch<T>(kObuf, d.L * tile * d.S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * tile, tb = std::min(tile, d.B - b0);
      T* H = hsave ? hsave + b0 * KQ : hbuf;
      stage1_tile(e, d, x, w1p, w1s, b0, tb, H, abuf);
      if (d.L == 1) {  // no permutation at all: straight into out
        gemm(e, tb, d.S, d.R, H, KQ, 1, w2p, out + b0 * LS, LS, false, abuf);
        continue;
      }
      // block l reads h[b, r*L + l]: the A view with strides (K*Q, L)
      for (int64_t l = 0; l < d.L; ++l)
        gemm(e, tb, d.S, d.R, H + l, KQ, d.L, w2p + l * w2s, obuf + l * tb * d.S, d.S, false, abuf);
      for (int64_t i = 0; i < tb; ++i) {  // out[b, s*L + l] = obuf[l, i, s], row by row in cache
        T* o = out + (b0 + i) * LS;
        for (int64_t l = 0; l < d.L; ++l) {
          const T* src = obuf + (l * tb + i) * d.S;
          for (int64_t s = 0; s < d.S; ++s) o[s * d.L + l] = src[s];
        }
      }
    }
  });
}

template <class T>
void bwd_impl(const Dims& d, const T* g, const T* x, const T* w1, const T* w2, const T* hsaved, T* dx, T* dw1,
              T* dw2) {
  const Engine<T> e = engine<T>();
  const int64_t KP = d.K * d.P, KQ = d.K * d.Q, LS = d.L * d.S;
  int64_t w1s, w2s, w1ts = 0;
  const T* w2p = pack_weights(e, w2, d.L, d.S, d.R, false, kW2, &w2s);  // B(s, r) = w2[l, s, r]
  const T* w1p = pack_weights(e, w1, d.K, d.Q, d.P, false, kW1, &w1s);  // B(q, p) = w1[k, q, p]
  const T* w1tp = hsaved ? nullptr : pack_weights(e, w1, d.K, d.Q, d.P, true, kW1T, &w1ts);  // recompute
  const int64_t tile = tile_rows(d.B), ntiles = (d.B + tile - 1) / tile;
  // Tiles are split into nch contiguous chunks, one dw1/dw2 accumulator each, summed at the end: the
  // result does not depend on which thread runs which chunk.
  const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  const int64_t per_ch = (ntiles + nch - 1) / nch;
  const int64_t n1 = d.K * d.Q * d.P, n2 = d.L * d.S * d.R;
  T* acc = scratch<T>(kAcc, nch * (n1 + n2));
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    T* abuf = scratch<T>(kAbuf, abuf_size(e));
    T* hbuf = hsaved ? nullptr : scratch<T>(kHbuf, tile * KQ);
    T* dsb = scratch<T>(kDsb, d.L * tile * d.R);
    T* dh = scratch<T>(kDh, tile * KQ);
    T* bb = scratch<T>(kBb, std::max(packed_b_size(e, tile, d.R), packed_b_size(e, tile, d.P)));
    for (int64_t c = c0; c < c1; ++c) {
      T* a1 = acc + c * (n1 + n2);
      T* a2 = a1 + n1;
      const int64_t tbeg = c * per_ch, tend = std::min(ntiles, tbeg + per_ch);
      if (tbeg >= tend) std::fill(a1, a2 + n2, T(0));
      for (int64_t t = tbeg; t < tend; ++t) {
        const bool first = t == tbeg;
        const int64_t b0 = t * tile, tb = std::min(tile, d.B - b0);
        const T* H = hsaved ? hsaved + b0 * KQ : hbuf;
        if (!hsaved) stage1_tile(e, d, x, w1tp, w1ts, b0, tb, hbuf, abuf);
        const T* gt = g + b0 * LS;
        for (int64_t l = 0; l < d.L; ++l) {
          // G_l(i, s) = g[b0+i, s*L + l]: dS_l = G_l @ w2[l], and dw2[l] += G_l^T @ Hp_l with
          // Hp_l(i, r) = h[b0+i, r*L + l]
          gemm(e, tb, d.R, d.S, gt + l, LS, d.L, w2p + l * w2s, dsb + l * tb * d.R, d.R, false, abuf);
          pack_b(e, tb, d.R, H + l, KQ, d.L, bb);
          gemm(e, d.S, d.R, tb, gt + l, d.L, LS, bb, a2 + l * d.S * d.R, d.R, !first, abuf);
        }
        const T* DH = dsb;  // L == 1: dS is already dh in natural layout
        if (d.L > 1) {      // dh[i, r*L + l] = dS_l[i, r], in cache
          for (int64_t i = 0; i < tb; ++i) {
            T* o = dh + i * KQ;
            for (int64_t l = 0; l < d.L; ++l) {
              const T* src = dsb + (l * tb + i) * d.R;
              for (int64_t r = 0; r < d.R; ++r) o[r * d.L + l] = src[r];
            }
          }
          DH = dh;
        }
        for (int64_t k = 0; k < d.K; ++k) {
          // dx_k = dH_k @ w1[k], and dw1[k] += dH_k^T @ X_k
          gemm(e, tb, d.P, d.Q, DH + k * d.Q, KQ, 1, w1p + k * w1s, dx + b0 * KP + k * d.P, KP, false, abuf);
          pack_b(e, tb, d.P, x + b0 * KP + k * d.P, KP, 1, bb);
          gemm(e, d.Q, d.P, tb, DH + k * d.Q, 1, KQ, bb, a1 + k * d.Q * d.P, d.P, !first, abuf);
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

// Below this many token rows the packing of the weights (one pass over them per call) costs more than
// the product itself, so the op runs the two-bmm algorithm through ATen instead (its small-matrix
// GEMMs read the weights in place). MONARCH_SEAM_CPU_SMALL_BATCH overrides the threshold (tests use it
// to run both paths on the same inputs).
int64_t small_batch() {
  static const int64_t v = [] {
    const char* env = std::getenv("MONARCH_SEAM_CPU_SMALL_BATCH");
    return env && *env ? std::atoll(env) : int64_t(64);
  }();
  return v;
}

// The ATen path (same layouts as the engine path: h natural (B*K*Q,), out[b, s*L + l]).
std::tuple<at::Tensor, at::Tensor> fwd_small(const Dims& d, const at::Tensor& x, const at::Tensor& w1,
                                             const at::Tensor& w2, bool keep_h) {
  auto h = at::bmm(x.view({d.B, d.K, d.P}).transpose(0, 1), w1.transpose(1, 2));  // (K, B, Q)
  auto hn = h.transpose(0, 1).reshape({d.B, d.K * d.Q});                           // natural layout
  auto o = at::bmm(hn.view({d.B, d.R, d.L}).permute({2, 0, 1}), w2.transpose(1, 2));  // (L, B, S)
  auto out = o.permute({1, 2, 0}).reshape({d.B, d.S * d.L});
  return {out, keep_h ? hn.reshape({-1}) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_small(const Dims& d, const at::Tensor& g, const at::Tensor& x,
                                                         const at::Tensor& w1, const at::Tensor& w2,
                                                         at::Tensor hn) {
  if (!hn.defined())
    hn = at::bmm(x.view({d.B, d.K, d.P}).transpose(0, 1), w1.transpose(1, 2)).transpose(0, 1).reshape({d.B, -1});
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

std::tuple<at::Tensor, at::Tensor> fwd_h_cpu(const at::Tensor& x_, const at::Tensor& w1_, const at::Tensor& w2_,
                                             bool keep_h) {
  Dims d = check(x_, w1_, w2_);
  if (!native(x_)) {
    auto r = fwd_h_cpu(x_.to(at::kFloat), w1_.to(at::kFloat), w2_.to(at::kFloat), keep_h);
    return {std::get<0>(r).to(x_.scalar_type()), std::get<1>(r).to(x_.scalar_type())};
  }
  auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  if (d.B < small_batch()) return fwd_small(d, x, w1, w2, keep_h);
  auto out = at::empty({d.B, d.L * d.S}, x.options());
  auto h = at::empty({keep_h ? d.B * d.K * d.Q : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "monarch_fwd_cpu", [&] {
    fwd_impl<scalar_t>(d, x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), keep_h ? h.data_ptr<scalar_t>() : nullptr);
  });
  return {out, h};
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
  auto g = g_.to(x_.scalar_type()).contiguous(), x = x_.contiguous(), w1 = w1_.contiguous(),
       w2 = w2_.contiguous();
  at::Tensor h = use_h ? h_->to(x_.scalar_type()).contiguous() : at::Tensor();
  if (d.B < small_batch()) return bwd_small(d, g, x, w1, w2, use_h ? h.view({d.B, -1}) : at::Tensor());
  auto dx = at::empty_like(x), dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "monarch_bwd_cpu", [&] {
    bwd_impl<scalar_t>(d, g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(),
                       w2.data_ptr<scalar_t>(), use_h ? h.data_ptr<scalar_t>() : nullptr, dx.data_ptr<scalar_t>(),
                       dw1.data_ptr<scalar_t>(), dw2.data_ptr<scalar_t>());
  });
  return {dx, dw1, dw2};
}

std::string cpu_isa() { return isa_name(isa()); }

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
  // the CUDA GEMM plan, for a CPU emulation test (see cuda/monarch_plan.h)
  m.def("_cuda_plan(int[] dims) -> int[]", &cuda_plan);
}

TORCH_LIBRARY_IMPL(monarch_seam, CPU, m) {
  m.impl("monarch_fwd", &monarch_fwd_cpu);
  m.impl("monarch_fwd_h", &monarch_fwd_h_cpu);
  m.impl("monarch_bwd", &monarch_bwd_cpu);
}

}  // namespace monarch_seam
