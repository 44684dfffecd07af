// Fused CPU butterfly op (schemas in cuda/monarch.cpp): twiddle (nstacks, nblocks, log_n, n/2, 2, 2),
// x (batch, nstacks, n) -> (batch, nstacks, n). Same math as layers.butterfly.butterfly_multiply_ref.
//
// Factor f (stride st) maps each pair (i0, i1 = i0 + st) by the 2x2 twiddle t[j] = [[t0, t1], [t2, t3]].
// Written per position instead of per pair, every factor is
//     out[i] = cs[i] * v[i] + cp[i] * v[i ^ st]                   (cs, cp: two "coefficient planes")
// with cs[i0] = t0, cp[i0] = t1, cs[i1] = t3, cp[i1] = t2. That form vectorises for every stride: for
// st >= W (W = lanes per vector) the partner v[i ^ st] is another whole vector, for st < W it is a lane
// permutation of the same vector. The planes are built from the twiddle once per call (2n values per
// factor, the twiddle's own size).
//
// All log2(n) * nblocks factors of a tile of rows are applied while the tile stays in cache: the first
// factor reads x and writes the output rows, the others update them in place, so memory sees one read
// of x and one write of the output. The tile height comes from the CPU's cache sizes (cpu_isa.h) and
// each factor's coefficient vectors are loaded once per tile and reused for all its rows.
//
// Backward, per tile: the forward is recomputed into a per-thread buffer that keeps every factor's
// input (they fit in L2 for the tile height chosen), then the gradient rows (in the dx output) are
// swept back through the factors, accumulating the plane gradients
//     dcs[i] += g[i] * v[i],   dcp[i] += g[i] * v[i ^ st],   g[i] <- cs[i] g[i] + cp[i ^ st] g[i ^ st]
// in registers over the tile's rows. Each of a fixed number of row chunks has its own accumulator and the
// chunks are summed in order, so results do not depend on thread timing.
//
// The tile functions are compiled for AVX-512, AVX2+FMA and baseline SSE2 (cpu_isa.h picks one);
// rows shorter than a vector use the same code with one-lane "vectors".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_isa.h"

namespace monarch_seam {
namespace {

struct BDims {
  int64_t batch, nstacks, nblocks, log_n, n, nf;  // nf = nblocks * log_n factors
};

BDims bcheck(const at::Tensor& tw, const at::Tensor& x) {
  TORCH_CHECK(tw.dim() == 6 && tw.size(4) == 2 && tw.size(5) == 2,
              "butterfly: twiddle must be (nstacks, nblocks, log_n, n/2, 2, 2), got ", tw.sizes());
  TORCH_CHECK(x.dim() == 3, "butterfly: x must be (batch, nstacks, n), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == tw.scalar_type(), "butterfly: x and twiddle dtypes differ");
  BDims d{x.size(0), x.size(1), tw.size(1), tw.size(2), x.size(2), tw.size(1) * tw.size(2)};
  TORCH_CHECK(tw.size(0) == d.nstacks, "butterfly: nstacks mismatch");
  TORCH_CHECK(d.log_n < 31 && (int64_t(1) << d.log_n) == d.n && tw.size(3) == d.n / 2,
              "butterfly: n must be 2**log_n with twiddle.size(3) == n/2");
  return d;
}

// Stride of factor f (flattened over blocks); the direction flips after every block.
inline int64_t bstride(const BDims& d, int64_t f, bool inc) {
  const int64_t blk = f / d.log_n, idx = f % d.log_n;
  const bool up = (blk % 2 == 0) ? inc : !inc;
  return int64_t(1) << (up ? idx : d.log_n - 1 - idx);
}

inline void pair_of(int64_t j, int64_t st, int64_t& i0, int64_t& i1) {
  i0 = (j / st) * 2 * st + j % st;
  i1 = i0 + st;
}

// planes[(stk * nf + f) * 2n + {0, n} + i] = cs / cp of factor f of stack stk.
template <class T>
void make_planes(const BDims& d, const T* tw, bool inc, T* planes) {
  for (int64_t sf = 0; sf < d.nstacks * d.nf; ++sf) {
    const int64_t st = bstride(d, sf % d.nf, inc);
    const T* t = tw + sf * 2 * d.n;
    T* cs = planes + sf * 2 * d.n;
    T* cp = cs + d.n;
    for (int64_t j = 0; j < d.n / 2; ++j) {
      int64_t i0, i1;
      pair_of(j, st, i0, i1);
      cs[i0] = t[4 * j + 0];
      cp[i0] = t[4 * j + 1];
      cp[i1] = t[4 * j + 2];
      cs[i1] = t[4 * j + 3];
    }
  }
}

// The plane gradients back in the twiddle's layout (the transpose of make_planes).
template <class T>
void planes_to_twiddle(const BDims& d, const T* dplanes, bool inc, T* dtw) {
  for (int64_t sf = 0; sf < d.nstacks * d.nf; ++sf) {
    const int64_t st = bstride(d, sf % d.nf, inc);
    const T* cs = dplanes + sf * 2 * d.n;
    const T* cp = cs + d.n;
    T* t = dtw + sf * 2 * d.n;
    for (int64_t j = 0; j < d.n / 2; ++j) {
      int64_t i0, i1;
      pair_of(j, st, i0, i1);
      t[4 * j + 0] = cs[i0];
      t[4 * j + 1] = cp[i0];
      t[4 * j + 2] = cp[i1];
      t[4 * j + 3] = cs[i1];
    }
  }
}

// ---------------------------------------------------------------- vector helpers
template <class T, int VB>
struct V_ {
  typedef T type __attribute__((vector_size(VB)));
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type I;
  typedef I mask __attribute__((vector_size(VB)));
};

template <class T, int VB>
static inline __attribute__((always_inline)) typename V_<T, VB>::type ld(const T* p) {
  typename V_<T, VB>::type v;
  std::memcpy(&v, p, VB);
  return v;
}

template <class T, int VB>
static inline __attribute__((always_inline)) void sto(T* p, typename V_<T, VB>::type v) {
  std::memcpy(p, &v, VB);
}

// Lane i <- lane i ^ ST, for ST < W (a constant shuffle).
template <class M, int ST, int... I>
constexpr M xor_mask(std::integer_sequence<int, I...>) {
  return M{(I ^ ST)...};
}

template <class T, int VB, int ST>
static inline __attribute__((always_inline)) typename V_<T, VB>::type swap_lanes(typename V_<T, VB>::type a) {
  typedef typename V_<T, VB>::mask M;
  constexpr M m = xor_mask<M, ST>(std::make_integer_sequence<int, int(VB / sizeof(T))>());
  return __builtin_shuffle(a, m);
}

// ---------------------------------------------------------------- one factor over a tile of rows
// Strides below the vector width: the partner of lane i is lane i ^ ST of the same vector.
template <class T, int VB, int ST>
static inline __attribute__((always_inline)) void fwd_small(int64_t n, const T* cs, const T* cp,
                                                            const T* const* src, T* const* dst, int R) {
  typedef typename V_<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  for (int64_t c = 0; c < n; c += W) {
    const V s = ld<T, VB>(cs + c), p = ld<T, VB>(cp + c);
    for (int r = 0; r < R; ++r) {
      const V a = ld<T, VB>(src[r] + c);
      sto<T, VB>(dst[r] + c, s * a + p * swap_lanes<T, VB, ST>(a));
    }
  }
}

template <class T, int VB, int ST>
static inline __attribute__((always_inline)) void bwd_small(int64_t n, const T* cs, const T* cp, const T* const* v,
                                                            T* const* g, T* dcs, T* dcp, int R) {
  typedef typename V_<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  for (int64_t c = 0; c < n; c += W) {
    const V s = ld<T, VB>(cs + c), pp = swap_lanes<T, VB, ST>(ld<T, VB>(cp + c));  // pp[i] = cp[i ^ st]
    V ds{}, dp{};
    for (int r = 0; r < R; ++r) {
      const V a = ld<T, VB>(v[r] + c), gg = ld<T, VB>(g[r] + c);
      ds += gg * a;
      dp += gg * swap_lanes<T, VB, ST>(a);
      sto<T, VB>(g[r] + c, s * gg + pp * swap_lanes<T, VB, ST>(gg));
    }
    sto<T, VB>(dcs + c, ld<T, VB>(dcs + c) + ds);
    sto<T, VB>(dcp + c, ld<T, VB>(dcp + c) + dp);
  }
}
// dst[r] = factor(src[r]) for r < R; dst may equal src (in place).
template <class T, int VB>
static inline __attribute__((always_inline)) void fwd_factor(int64_t n, int64_t st, const T* cs, const T* cp,
                                                             const T* const* src, T* const* dst, int R) {
  typedef typename V_<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  if (st >= W) {
    for (int64_t base = 0; base < n; base += 2 * st)
      for (int64_t o = 0; o < st; o += W) {
        const int64_t i0 = base + o, i1 = i0 + st;
        const V s0 = ld<T, VB>(cs + i0), p0 = ld<T, VB>(cp + i0);
        const V s1 = ld<T, VB>(cs + i1), p1 = ld<T, VB>(cp + i1);
        for (int r = 0; r < R; ++r) {
          const V a = ld<T, VB>(src[r] + i0), b = ld<T, VB>(src[r] + i1);
          sto<T, VB>(dst[r] + i0, s0 * a + p0 * b);
          sto<T, VB>(dst[r] + i1, s1 * b + p1 * a);
        }
      }
    return;
  }
  if constexpr (W >= 2) if (st == 1) return fwd_small<T, VB, 1>(n, cs, cp, src, dst, R);
  if constexpr (W >= 4) if (st == 2) return fwd_small<T, VB, 2>(n, cs, cp, src, dst, R);
  if constexpr (W >= 8) if (st == 4) return fwd_small<T, VB, 4>(n, cs, cp, src, dst, R);
  if constexpr (W >= 16) if (st == 8) return fwd_small<T, VB, 8>(n, cs, cp, src, dst, R);
}

// g[r] <- factor^T g[r] in place; dcs/dcp += sum over the tile's rows (inputs v[r] of this factor).
template <class T, int VB>
static inline __attribute__((always_inline)) void bwd_factor(int64_t n, int64_t st, const T* cs, const T* cp,
                                                             const T* const* v, T* const* g, T* dcs, T* dcp,
                                                             int R) {
  typedef typename V_<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  if (st >= W) {
    for (int64_t base = 0; base < n; base += 2 * st)
      for (int64_t o = 0; o < st; o += W) {
        const int64_t i0 = base + o, i1 = i0 + st;
        const V s0 = ld<T, VB>(cs + i0), p0 = ld<T, VB>(cp + i0);
        const V s1 = ld<T, VB>(cs + i1), p1 = ld<T, VB>(cp + i1);
        V ds0{}, dp0{}, ds1{}, dp1{};
        for (int r = 0; r < R; ++r) {
          const V a0 = ld<T, VB>(v[r] + i0), a1 = ld<T, VB>(v[r] + i1);
          const V g0 = ld<T, VB>(g[r] + i0), g1 = ld<T, VB>(g[r] + i1);
          ds0 += g0 * a0;
          dp0 += g0 * a1;
          ds1 += g1 * a1;
          dp1 += g1 * a0;
          sto<T, VB>(g[r] + i0, s0 * g0 + p1 * g1);
          sto<T, VB>(g[r] + i1, s1 * g1 + p0 * g0);
        }
        sto<T, VB>(dcs + i0, ld<T, VB>(dcs + i0) + ds0);
        sto<T, VB>(dcp + i0, ld<T, VB>(dcp + i0) + dp0);
        sto<T, VB>(dcs + i1, ld<T, VB>(dcs + i1) + ds1);
        sto<T, VB>(dcp + i1, ld<T, VB>(dcp + i1) + dp1);
      }
    return;
  }
  if constexpr (W >= 2) if (st == 1) return bwd_small<T, VB, 1>(n, cs, cp, v, g, dcs, dcp, R);
  if constexpr (W >= 4) if (st == 2) return bwd_small<T, VB, 2>(n, cs, cp, v, g, dcs, dcp, R);
  if constexpr (W >= 8) if (st == 4) return bwd_small<T, VB, 4>(n, cs, cp, v, g, dcs, dcp, R);
  if constexpr (W >= 16) if (st == 8) return bwd_small<T, VB, 8>(n, cs, cp, v, g, dcs, dcp, R);
}

// ---------------------------------------------------------------- tiles
constexpr int kMaxRows = 64;  // the most rows a tile can have

// A tile: rows (b, stk) for b in [b0, b0 + R) of one stack; row pointers are built by the caller.
// Rows are worked on in a per-thread buffer whose row pitch is n plus one cache line: at the tensors' own
// power-of-two row distance every row of a tile would fall into the same L1 sets.
inline int64_t pitch_of(int64_t n, int64_t elem) { return n + 64 / elem; }

// Runtime stride below the vector width (a predictable branch per use).
template <class T, int VB>
static inline __attribute__((always_inline)) typename V_<T, VB>::type swap_rt(typename V_<T, VB>::type a,
                                                                            int64_t st) {
  constexpr int W = VB / sizeof(T);
  if constexpr (W >= 16) if (st == 8) return swap_lanes<T, VB, 8>(a);
  if constexpr (W >= 8) if (st == 4) return swap_lanes<T, VB, 4>(a);
  if constexpr (W >= 4) if (st == 2) return swap_lanes<T, VB, 2>(a);
  if constexpr (W >= 2) return swap_lanes<T, VB, 1>(a);
  return a;
}

// Passes: consecutive factors whose strides are all below the vector width run in registers, one load and
// one store per vector for the whole run ("run"); two consecutive larger strides a, b are one
// radix-4 pass over {i, i+a, i+b, i+a+b} ("pair", a != b); any other factor is a pass of its own ("one").
enum PassKind { kRun, kOne, kPair };
struct Pass {
  int64_t f0, f1;  // factors [f0, f1)
  PassKind kind;
};
constexpr int kMaxRun = 4;  // strides 1, 2, 4, 8: at most log2(16) factors below a 16-lane vector

inline std::vector<Pass> plan_passes(const BDims& d, bool inc, int W, bool pairs) {
  std::vector<Pass> out;
  for (int64_t f = 0; f < d.nf;) {
    if (bstride(d, f, inc) < W) {
      int64_t g = f + 1;
      while (g < d.nf && g - f < kMaxRun && bstride(d, g, inc) < W) ++g;
      out.push_back({f, g, kRun});
      f = g;
    } else if (pairs && f + 1 < d.nf && bstride(d, f + 1, inc) >= W &&
               bstride(d, f + 1, inc) != bstride(d, f, inc)) {  // a block boundary repeats a stride
      out.push_back({f, f + 2, kPair});
      f += 2;
    } else {
      out.push_back({f, f + 1, kOne});
      f += 1;
    }
  }
  return out;
}

template <class T, int VB>
static inline __attribute__((always_inline)) void fwd_run(const BDims& d, const T* pl, int64_t f0, int64_t f1,
                                                          bool inc, const T* const* src, T* const* dst, int R) {
  typedef typename V_<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  const int nr = int(f1 - f0);
  int64_t st[kMaxRun];
  for (int j = 0; j < nr; ++j) st[j] = bstride(d, f0 + j, inc);
  for (int64_t c = 0; c < d.n; c += W) {
    V cs[kMaxRun], cp[kMaxRun];
    for (int j = 0; j < nr; ++j) {
      cs[j] = ld<T, VB>(pl + (f0 + j) * 2 * d.n + c);
      cp[j] = ld<T, VB>(pl + (f0 + j) * 2 * d.n + d.n + c);
    }
    for (int r = 0; r < R; ++r) {
      V v = ld<T, VB>(src[r] + c);
      for (int j = 0; j < nr; ++j) v = cs[j] * v + cp[j] * swap_rt<T, VB>(v, st[j]);
      sto<T, VB>(dst[r] + c, v);
    }
  }
}

template <class T, int VB>
static inline __attribute__((always_inline)) void fwd_pair(int64_t n, int64_t a, int64_t b, const T* pa,
                                                           const T* pb, const T* const* src, T* const* dst, int R) {
  typedef typename V_<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  const int64_t lo = std::min(a, b), hi = std::max(a, b);
  const T *csa = pa, *cpa = pa + n, *csb = pb, *cpb = pb + n;
  for (int64_t b0 = 0; b0 < n; b0 += 2 * hi)
    for (int64_t b1 = b0; b1 < b0 + hi; b1 += 2 * lo)
      for (int64_t o = 0; o < lo; o += W) {
        const int64_t i0 = b1 + o, i1 = i0 + a, i2 = i0 + b, i3 = i0 + a + b;
        const V sa0 = ld<T, VB>(csa + i0), sa1 = ld<T, VB>(csa + i1), sa2 = ld<T, VB>(csa + i2),
                sa3 = ld<T, VB>(csa + i3);
        const V qa0 = ld<T, VB>(cpa + i0), qa1 = ld<T, VB>(cpa + i1), qa2 = ld<T, VB>(cpa + i2),
                qa3 = ld<T, VB>(cpa + i3);
        const V sb0 = ld<T, VB>(csb + i0), sb1 = ld<T, VB>(csb + i1), sb2 = ld<T, VB>(csb + i2),
                sb3 = ld<T, VB>(csb + i3);
        const V qb0 = ld<T, VB>(cpb + i0), qb1 = ld<T, VB>(cpb + i1), qb2 = ld<T, VB>(cpb + i2),
                qb3 = ld<T, VB>(cpb + i3);
        for (int r = 0; r < R; ++r) {
          const V x0 = ld<T, VB>(src[r] + i0), x1 = ld<T, VB>(src[r] + i1), x2 = ld<T, VB>(src[r] + i2),
                  x3 = ld<T, VB>(src[r] + i3);
          // factor a pairs (i0, i1) and (i2, i3), then factor b pairs (i0, i2) and (i1, i3)
          const V y0 = sa0 * x0 + qa0 * x1, y1 = sa1 * x1 + qa1 * x0;
          const V y2 = sa2 * x2 + qa2 * x3, y3 = sa3 * x3 + qa3 * x2;
          sto<T, VB>(dst[r] + i0, sb0 * y0 + qb0 * y2);
          sto<T, VB>(dst[r] + i2, sb2 * y2 + qb2 * y0);
          sto<T, VB>(dst[r] + i1, sb1 * y1 + qb1 * y3);
          sto<T, VB>(dst[r] + i3, sb3 * y3 + qb3 * y1);
        }
      }
}

// Backward through a pair (factor a, then factor b; strides a != b, both >= W), in registers: recompute factor
// a's output y from the pair's input x, sweep the gradient back through b, then a, accumulating all four planes'
// gradients over the tile's rows. One load of x and g and one store of g per vector for the two factors.
template <class T, int VB>
static inline __attribute__((always_inline)) void bwd_pair(int64_t n, int64_t a, int64_t b, const T* pa,
                                                           const T* pb, T* dpa, T* dpb, const T* const* v,
                                                           T* const* g, int R) {
  typedef typename V_<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  const int64_t lo = std::min(a, b), hi = std::max(a, b);
  const T *csa = pa, *cpa = pa + n, *csb = pb, *cpb = pb + n;
  for (int64_t b0 = 0; b0 < n; b0 += 2 * hi)
    for (int64_t b1 = b0; b1 < b0 + hi; b1 += 2 * lo)
      for (int64_t o = 0; o < lo; o += W) {
        const int64_t i[4] = {b1 + o, b1 + o + a, b1 + o + b, b1 + o + a + b};
        V sa[4], qa[4], sb[4], qb[4], dsa[4], dqa[4], dsb[4], dqb[4];
        for (int k = 0; k < 4; ++k) {
          sa[k] = ld<T, VB>(csa + i[k]);
          qa[k] = ld<T, VB>(cpa + i[k]);
          sb[k] = ld<T, VB>(csb + i[k]);
          qb[k] = ld<T, VB>(cpb + i[k]);
          dsa[k] = dqa[k] = dsb[k] = dqb[k] = V{};
        }
        for (int r = 0; r < R; ++r) {
          V x[4], gz[4];
          for (int k = 0; k < 4; ++k) {
            x[k] = ld<T, VB>(v[r] + i[k]);
            gz[k] = ld<T, VB>(g[r] + i[k]);
          }
          // factor a pairs (0, 1) and (2, 3); factor b pairs (0, 2) and (1, 3): partner of k is k ^ 1, k ^ 2
          V y[4], gy[4];
          for (int k = 0; k < 4; ++k) y[k] = sa[k] * x[k] + qa[k] * x[k ^ 1];
          for (int k = 0; k < 4; ++k) {
            dsb[k] += gz[k] * y[k];
            dqb[k] += gz[k] * y[k ^ 2];
            gy[k] = sb[k] * gz[k] + qb[k ^ 2] * gz[k ^ 2];
          }
          for (int k = 0; k < 4; ++k) {
            dsa[k] += gy[k] * x[k];
            dqa[k] += gy[k] * x[k ^ 1];
            sto<T, VB>(g[r] + i[k], sa[k] * gy[k] + qa[k ^ 1] * gy[k ^ 1]);
          }
        }
        for (int k = 0; k < 4; ++k) {
          sto<T, VB>(dpa + i[k], ld<T, VB>(dpa + i[k]) + dsa[k]);
          sto<T, VB>(dpa + n + i[k], ld<T, VB>(dpa + n + i[k]) + dqa[k]);
          sto<T, VB>(dpb + i[k], ld<T, VB>(dpb + i[k]) + dsb[k]);
          sto<T, VB>(dpb + n + i[k], ld<T, VB>(dpb + n + i[k]) + dqb[k]);
        }
      }
}

// Backward through a run, in registers: recompute the run's activations from its input v, then sweep the
// gradient back through its factors, accumulating the plane gradients over the tile's rows.
template <class T, int VB>
static inline __attribute__((always_inline)) void bwd_run(const BDims& d, const T* pl, T* dpl, int64_t f0,
                                                          int64_t f1, bool inc, const T* const* v, T* const* g,
                                                          int R) {
  typedef typename V_<T, VB>::type V;
  constexpr int W = VB / sizeof(T);
  const int nr = int(f1 - f0);
  int64_t st[kMaxRun];
  for (int j = 0; j < nr; ++j) st[j] = bstride(d, f0 + j, inc);
  for (int64_t c = 0; c < d.n; c += W) {
    V cs[kMaxRun], cp[kMaxRun], cq[kMaxRun], ds[kMaxRun], dp[kMaxRun];
    for (int j = 0; j < nr; ++j) {
      cs[j] = ld<T, VB>(pl + (f0 + j) * 2 * d.n + c);
      cp[j] = ld<T, VB>(pl + (f0 + j) * 2 * d.n + d.n + c);
      cq[j] = swap_rt<T, VB>(cp[j], st[j]);  // cq[i] = cp[i ^ st]
      ds[j] = V{};
      dp[j] = V{};
    }
    for (int r = 0; r < R; ++r) {
      V a[kMaxRun];
      a[0] = ld<T, VB>(v[r] + c);
      for (int j = 1; j < nr; ++j) a[j] = cs[j - 1] * a[j - 1] + cp[j - 1] * swap_rt<T, VB>(a[j - 1], st[j - 1]);
      V gg = ld<T, VB>(g[r] + c);
      for (int j = nr - 1; j >= 0; --j) {
        ds[j] += gg * a[j];
        dp[j] += gg * swap_rt<T, VB>(a[j], st[j]);
        gg = cs[j] * gg + cq[j] * swap_rt<T, VB>(gg, st[j]);
      }
      sto<T, VB>(g[r] + c, gg);
    }
    for (int j = 0; j < nr; ++j) {
      T* dcs = dpl + (f0 + j) * 2 * d.n + c;
      sto<T, VB>(dcs, ld<T, VB>(dcs) + ds[j]);
      sto<T, VB>(dcs + d.n, ld<T, VB>(dcs + d.n) + dp[j]);
    }
  }
}

template <class T, int VB>
static inline __attribute__((always_inline)) void fwd_tile_body(const BDims& d, const T* planes, bool inc,
                                                                const T* const* xr, T* const* outr, int R,
                                                                int64_t stk, T* scratch) {
  constexpr int W = VB / sizeof(T);
  if (d.nf == 0) {
    for (int r = 0; r < R; ++r) std::memcpy(outr[r], xr[r], d.n * sizeof(T));
    return;
  }
  const int64_t pitch = pitch_of(d.n, sizeof(T));
  T* buf[kMaxRows];
  for (int r = 0; r < R; ++r) buf[r] = scratch + r * pitch;
  const T* pl = planes + stk * d.nf * 2 * d.n;  // this stack's planes
  const std::vector<Pass> passes = plan_passes(d, inc, W, true);
  const int np = int(passes.size());
  // x -> buffer (first pass), buffer in place, buffer -> output (last pass)
  for (int i = 0; i < np; ++i) {
    const Pass& ps = passes[i];
    const T* const* src = i == 0 ? xr : buf;
    T* const* dst = i == np - 1 ? outr : buf;
    if (ps.kind == kRun) {
      fwd_run<T, VB>(d, pl, ps.f0, ps.f1, inc, src, dst, R);
    } else if (ps.kind == kPair) {
      fwd_pair<T, VB>(d.n, bstride(d, ps.f0, inc), bstride(d, ps.f0 + 1, inc), pl + ps.f0 * 2 * d.n,
                      pl + (ps.f0 + 1) * 2 * d.n, src, dst, R);
    } else {
      const T* cs = pl + ps.f0 * 2 * d.n;
      fwd_factor<T, VB>(d.n, bstride(d, ps.f0, inc), cs, cs + d.n, src, dst, R);
    }
  }
}

// scratch: (passes + 1) * R rows at the padded pitch: every pass's output, then the gradient rows. The
// gradient rows gr hold the incoming gradient and receive dx; dpl: this chunk's plane-gradient
// accumulator (all stacks). Each pass's input is stored; the activations inside a run or a pair are
// recomputed in registers by bwd_run / bwd_pair.
template <class T, int VB>
static inline __attribute__((always_inline)) void bwd_tile_body(const BDims& d, const T* planes, bool inc,
                                                                const T* const* xr, T* const* gr, int R,
                                                                int64_t stk, T* scratch, T* dpl) {
  constexpr int W = VB / sizeof(T);
  const int64_t pitch = pitch_of(d.n, sizeof(T));
  const std::vector<Pass> passes = plan_passes(d, inc, W, true);
  const int np = int(passes.size());
  // input of pass i, row r: x itself for i == 0, else scratch row (i - 1) * R + r
  auto act = [&](int i, int r) -> T* { return scratch + (int64_t(i - 1) * R + r) * pitch; };
  const T* pl = planes + stk * d.nf * 2 * d.n;
  T* dp = dpl + stk * d.nf * 2 * d.n;
  const T* vin[kMaxRows];
  T* vout[kMaxRows];
  for (int i = 0; i + 1 < np; ++i) {  // the last pass's output is not needed
    for (int r = 0; r < R; ++r) {
      vin[r] = i == 0 ? xr[r] : act(i, r);
      vout[r] = act(i + 1, r);
    }
    const Pass& ps = passes[i];
    if (ps.kind == kRun) {
      fwd_run<T, VB>(d, pl, ps.f0, ps.f1, inc, vin, vout, R);
    } else if (ps.kind == kPair) {
      fwd_pair<T, VB>(d.n, bstride(d, ps.f0, inc), bstride(d, ps.f0 + 1, inc), pl + ps.f0 * 2 * d.n,
                      pl + (ps.f0 + 1) * 2 * d.n, vin, vout, R);
    } else {
      const T* cs = pl + ps.f0 * 2 * d.n;
      fwd_factor<T, VB>(d.n, bstride(d, ps.f0, inc), cs, cs + d.n, vin, vout, R);
    }
  }
  T* g[kMaxRows];
  for (int r = 0; r < R; ++r) {
    g[r] = act(np, r);
    std::memcpy(g[r], gr[r], d.n * sizeof(T));
  }
  for (int i = np - 1; i >= 0; --i) {
    for (int r = 0; r < R; ++r) vin[r] = i == 0 ? xr[r] : act(i, r);
    const Pass& ps = passes[i];
    if (ps.kind == kRun) {
      bwd_run<T, VB>(d, pl, dp, ps.f0, ps.f1, inc, vin, g, R);
    } else if (ps.kind == kPair) {
      const int64_t off = ps.f0 * 2 * d.n;
      bwd_pair<T, VB>(d.n, bstride(d, ps.f0, inc), bstride(d, ps.f0 + 1, inc), pl + off, pl + off + 2 * d.n,
                      dp + off, dp + off + 2 * d.n, vin, g, R);
    } else {
      const int64_t off = ps.f0 * 2 * d.n;
      bwd_factor<T, VB>(d.n, bstride(d, ps.f0, inc), pl + off, pl + off + d.n, vin, g, dp + off, dp + off + d.n, R);
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(gr[r], g[r], d.n * sizeof(T));
}

template <class T>
using FwdTile = void (*)(const BDims&, const T*, bool, const T* const*, T* const*, int, int64_t, T*);
template <class T>
using BwdTile = void (*)(const BDims&, const T*, bool, const T* const*, T* const*, int, int64_t, T*, T*);

#define MONARCH_SEAM_BFLY(ISA, T, TARGET, VB)                                                             \
  TARGET void fwd_tile_##ISA(const BDims& d, const T* planes, bool inc, const T* const* xr,               \
                             T* const* outr, int R, int64_t stk, T* scratch) {                             \
    fwd_tile_body<T, VB>(d, planes, inc, xr, outr, R, stk, scratch);                                      \
  }                                                                                                        \
  TARGET void bwd_tile_##ISA(const BDims& d, const T* planes, bool inc, const T* const* xr,               \
                             T* const* gr, int R, int64_t stk, T* scratch, T* dpl) {                       \
    bwd_tile_body<T, VB>(d, planes, inc, xr, gr, R, stk, scratch, dpl);                                      \
  }
// One overload per dtype for each ISA.
MONARCH_SEAM_BFLY(avx512, float, __attribute__((target("avx512f"))), 64)
MONARCH_SEAM_BFLY(avx512, double, __attribute__((target("avx512f"))), 64)
MONARCH_SEAM_BFLY(avx2, float, __attribute__((target("avx2,fma"))), 32)
MONARCH_SEAM_BFLY(avx2, double, __attribute__((target("avx2,fma"))), 32)
MONARCH_SEAM_BFLY(base, float, , 16)
MONARCH_SEAM_BFLY(base, double, , 16)
MONARCH_SEAM_BFLY(lane, float, , 4)  // one-lane "vectors", for rows shorter than a vector
MONARCH_SEAM_BFLY(lane, double, , 8)
#undef MONARCH_SEAM_BFLY

template <class T>
struct Tiles {
  FwdTile<T> fwd;
  BwdTile<T> bwd;
  int lanes;
};

template <class T>
Tiles<T> tiles(int64_t n) {
  const Isa i = isa();
  const int lanes = (i == kAvx512 ? 64 : i == kAvx2 ? 32 : 16) / int(sizeof(T));
  if (n < lanes) return {fwd_tile_lane, bwd_tile_lane, 1};
  switch (i) {
    case kAvx512: return {fwd_tile_avx512, bwd_tile_avx512, lanes};
    case kAvx2: return {fwd_tile_avx2, bwd_tile_avx2, lanes};
    default: return {fwd_tile_base, bwd_tile_base, lanes};
  }
}

// Tile heights from the cache sizes: forward keeps a tile in half the L1 when at least 4 rows fit there,
// else in a quarter of the L2; backward keeps the tile's nf + 1 activations and its gradient in half the L2.
int fwd_rows(const BDims& d, int64_t elem) {
  const int64_t row = d.n * elem;
  int64_t r = l1_bytes() / 2 / row;
  if (r < 4) r = l2_bytes() / 4 / row;
  return int(std::max<int64_t>(1, std::min<int64_t>({r, kMaxRows, d.batch})));
}

int bwd_rows(const BDims& d, int64_t elem) {
  const int64_t r = l2_bytes() / 2 / ((d.nf + 2) * d.n * elem);
  return int(std::max<int64_t>(1, std::min<int64_t>({r, 16, d.batch})));
}

at::Tensor butterfly_fwd_cpu(const at::Tensor& tw_, const at::Tensor& x_, bool inc) {
  const BDims d = bcheck(tw_, x_);
  auto tw = tw_.contiguous(), x = x_.contiguous();
  auto out = empty_out(x.sizes(), x.options());  // huge pages from 4 MiB (cpu_isa.h)
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterfly_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<T> planes(static_cast<size_t>(d.nstacks * d.nf * 2 * d.n));
    make_planes(d, tw.data_ptr<T>(), inc, planes.data());
    const Tiles<T> k = tiles<T>(d.n);
    const int R = fwd_rows(d, sizeof(T));
    const int64_t per_stack = (d.batch + R - 1) / R;
    const T* X = x.data_ptr<T>();
    T* O = out.data_ptr<T>();
    at::parallel_for(0, d.nstacks * per_stack, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> scratch(static_cast<size_t>(R * pitch_of(d.n, sizeof(T))));
      const T* xr[kMaxRows];
      T* orow[kMaxRows];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t stk = t / per_stack, b0 = (t % per_stack) * R;
        const int rows = int(std::min<int64_t>(R, d.batch - b0));
        for (int r = 0; r < rows; ++r) {
          const int64_t off = ((b0 + r) * d.nstacks + stk) * d.n;
          xr[r] = X + off;
          orow[r] = O + off;
        }
        k.fwd(d, planes.data(), inc, xr, orow, rows, stk, scratch.data());
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> butterfly_bwd_cpu(const at::Tensor& g_, const at::Tensor& tw_,
                                                     const at::Tensor& x_, bool inc) {
  const BDims d = bcheck(tw_, x_);
  TORCH_CHECK(g_.sizes() == x_.sizes(), "butterfly_bwd: grad must have x's shape");
  auto tw = tw_.contiguous(), x = x_.contiguous();
  // dx starts as a copy of the incoming gradient; the tiles turn it into dx in place.
  auto dx = empty_out(x.sizes(), x.options());  // huge pages from 4 MiB (cpu_isa.h)
  dx.copy_(g_);
  auto dtw = at::zeros_like(tw);
  if (x.numel() == 0) return {dtw, dx};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterfly_bwd_cpu", [&] {
    using T = scalar_t;
    const int64_t np = d.nstacks * d.nf * 2 * d.n;
    std::vector<T> planes(static_cast<size_t>(np));
    make_planes(d, tw.data_ptr<T>(), inc, planes.data());
    const Tiles<T> k = tiles<T>(d.n);
    const int R = bwd_rows(d, sizeof(T));
    const int64_t per_stack = (d.batch + R - 1) / R, ntiles = d.nstacks * per_stack;
    // A fixed number of chunks (not thread ids), each with its own accumulator, summed in order.
    const int64_t nch = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
    const int64_t per_ch = (ntiles + nch - 1) / nch;
    std::vector<T> acc(static_cast<size_t>(nch * np), T(0));
    const T* X = x.data_ptr<T>();
    T* DX = dx.data_ptr<T>();
    at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
      std::vector<T> scratch(static_cast<size_t>((d.nf + 1) * R * pitch_of(d.n, sizeof(T))));
      const T* xr[kMaxRows];
      T* grow[kMaxRows];
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t t = c * per_ch; t < std::min(ntiles, (c + 1) * per_ch); ++t) {
          const int64_t stk = t / per_stack, b0 = (t % per_stack) * R;
          const int rows = int(std::min<int64_t>(R, d.batch - b0));
          for (int r = 0; r < rows; ++r) {
            const int64_t off = ((b0 + r) * d.nstacks + stk) * d.n;
            xr[r] = X + off;
            grow[r] = DX + off;
          }
          k.bwd(d, planes.data(), inc, xr, grow, rows, stk, scratch.data(), acc.data() + c * np);
        }
    });
    for (int64_t c = 1; c < nch; ++c)
      for (int64_t i = 0; i < np; ++i) acc[i] += acc[c * np + i];
    planes_to_twiddle(d, acc.data(), inc, dtw.data_ptr<T>());
  });
  return {dtw, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(monarch_seam, CPU, m) {
  m.impl("butterfly_fwd", &butterfly_fwd_cpu);
  m.impl("butterfly_bwd", &butterfly_bwd_cpu);
}

}  // namespace monarch_seam
