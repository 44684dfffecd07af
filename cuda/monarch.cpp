// CPU implementation of the monarch_seam ops (schemas are defined here too).
//
// Monarch multiply, with x (B, K*P), w1 (K, Q, P), w2 (L, S, R), K*Q == L*R:
//   h[b, k*Q + q] = sum_p w1[k, q, p] * x[b, k*P + p]
//   g[b, l, r]    = h[b, r*L + l]                       (the Monarch permutation)
//   out[b, s*L+l] = sum_r w2[l, s, r] * g[b, l, r]       (output permutation)
// The reference does this with two bmm calls and three permutation copies over
// the whole batch. Here rows are processed in tiles of <= 128 tokens; each tile runs
// BLAS GEMMs on strided views so that
//   * stage 1 writes straight into the permuted layout hp[l][b][r]: for a fixed
//     (k, l) the rows q of w1[k] that land in grid column l are q0, q0+L, ...
//     (a BLAS matrix with leading dimension L*P), and they land in a contiguous
//     range of r;
//   * stage 2 reads hp[l] as a plain matrix; only its output is scattered into
//     out[b, s*L + l], and that tile is still in cache.
// When Q/L is small (large nblocks) or P is large, the strided-row GEMMs get too
// thin (or re-read a wide x tile L times), so stage 1 computes whole blocks into
// a tile buffer and permutes it while it is in cache. The backward pass is tiled
// the same way (grad gathered per block in cache, dh permuted back in cache) and
// accumulates dw1/dw2 in per-thread buffers that are summed at the end.
//
// Butterfly: twiddle (nstacks, nblocks, log_n, n/2, 2, 2), x (batch, nstacks, n).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

// Fortran BLAS (MKL inside libtorch_cpu exports these). Column-major.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
}

namespace monarch_seam {
namespace {

inline void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                 const float* al, const float* a, const int* la, const float* b, const int* lb,
                 const float* be, float* c, const int* lc) {
  sgemm_(ta, tb, m, n, k, al, a, la, b, lb, be, c, lc);
}
inline void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                 const double* al, const double* a, const int* la, const double* b,
                 const int* lb, const double* be, double* c, const int* lc) {
  dgemm_(ta, tb, m, n, k, al, a, la, b, lb, be, c, lc);
}

// Row-major C[M,N] = op(A)[M,K] @ op(B)[K,N] + beta*C. A is stored (M,K) with
// row stride lda, or (K,M) when ta; same for B. Computed as the column-major
// C^T = op(B)^T op(A)^T, which needs no copies.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  const int m = (int)N, n = (int)M, k = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
  const T one = 1;
  blas(&ca, &cb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}

struct Dims {
  int64_t B, K, P, Q, L, S, R;
  // grid rows of w1[k] that map to grid column l: q0, q0+L, ...; they land at r0...
  void split(int64_t k, int64_t l, int64_t& q0, int64_t& cnt, int64_t& r0) const {
    q0 = (((l - k * Q) % L) + L) % L;
    cnt = q0 < Q ? (Q - q0 + L - 1) / L : 0;
    r0 = (k * Q + q0 - l) / L;
  }
  bool direct() const { return L == 1 || (Q / L >= 24 && P <= 256); }
};

constexpr int64_t kTile = 128;  // rows per tile: the tile buffers stay in L2 (256 and 512 measured no faster)

// Smaller tiles for small batches so that every thread gets rows (each runs single-threaded BLAS).
inline int64_t tile_rows(int64_t B) {
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = ((B + nth - 1) / nth + 7) / 8 * 8;
  return std::max<int64_t>(16, std::min<int64_t>(kTile, per));
}

// Stage 1 for rows [b0, b0+tb): writes hp-layout planes S[l*hs + i*R + r].
template <typename T>
void stage1(const Dims& d, const T* x, const T* w1, int64_t b0, int64_t tb, T* Sb, int64_t hs,
            T* tmp) {
  const int64_t KP = d.K * d.P, KQ = d.K * d.Q;
  if (d.direct()) {
    for (int64_t k = 0; k < d.K; ++k)
      for (int64_t l = 0; l < d.L; ++l) {
        int64_t q0, cnt, r0;
        d.split(k, l, q0, cnt, r0);
        gemm_rm<T>(false, true, tb, cnt, d.P, x + b0 * KP + k * d.P, KP,
                   w1 + (k * d.Q + q0) * d.P, d.L * d.P, T(0), Sb + l * hs + r0, d.R);
      }
    return;
  }
  for (int64_t k = 0; k < d.K; ++k)
    gemm_rm<T>(false, true, tb, d.Q, d.P, x + b0 * KP + k * d.P, KP, w1 + k * d.Q * d.P, d.P,
               T(0), tmp + k * d.Q, KQ);
  for (int64_t i = 0; i < tb; ++i)
    for (int64_t r = 0; r < d.R; ++r) {
      const T* src = tmp + i * KQ + r * d.L;
      for (int64_t l = 0; l < d.L; ++l) Sb[l * hs + i * d.R + r] = src[l];
    }
}

template <typename T>
void fwd_impl(const Dims& d, const T* x, const T* w1, const T* w2, T* out, T* hp) {
  const int64_t tile = tile_rows(d.B), ntiles = (d.B + tile - 1) / tile, LS = d.L * d.S;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> sbuf(hp ? 0 : d.L * tile * d.R), tbuf(d.L > 1 ? d.L * tile * d.S : 0),
        tmp(d.direct() ? 0 : tile * d.K * d.Q);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * tile, tb = std::min(tile, d.B - b0);
      T* Sb = hp ? hp + b0 * d.R : sbuf.data();
      const int64_t hs = hp ? d.B * d.R : tb * d.R;
      stage1(d, x, w1, b0, tb, Sb, hs, tmp.data());
      if (d.L == 1) {
        gemm_rm<T>(false, true, tb, d.S, d.R, Sb, d.R, w2, d.R, T(0), out + b0 * d.S, d.S);
        continue;
      }
      for (int64_t l = 0; l < d.L; ++l)
        gemm_rm<T>(false, true, tb, d.S, d.R, Sb + l * hs, d.R, w2 + l * d.S * d.R, d.R, T(0),
                   tbuf.data() + l * tb * d.S, d.S);
      for (int64_t i = 0; i < tb; ++i)  // contiguous reads; the strided writes stay in one row
        for (int64_t l = 0; l < d.L; ++l) {
          T* o = out + (b0 + i) * LS + l;
          const T* src = tbuf.data() + (l * tb + i) * d.S;
          for (int64_t s = 0; s < d.S; ++s) o[s * d.L] = src[s];
        }
    }
  });
}

template <typename T>
void bwd_impl(const Dims& d, const T* g, const T* x, const T* w1, const T* w2, const T* hp,
              T* dx, T* dw1, T* dw2) {
  const int64_t tile = tile_rows(d.B), ntiles = (d.B + tile - 1) / tile, LS = d.L * d.S, KP = d.K * d.P,
                KQ = d.K * d.Q;
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
  const int64_t n1 = d.K * d.Q * d.P, n2 = d.L * d.S * d.R;
  std::vector<T> acc((size_t)(nth * (n1 + n2)), T(0));
  at::parallel_for(0, ntiles, (ntiles + nth - 1) / nth, [&](int64_t t0, int64_t t1) {
    const int64_t th = std::min<int64_t>(at::get_thread_num(), nth - 1);
    T* a1 = acc.data() + th * (n1 + n2);
    T* a2 = a1 + n1;
    std::vector<T> sbuf(hp ? 0 : d.L * tile * d.R), gbuf(d.L > 1 ? d.L * tile * d.S : 0),
        dsb(d.L * tile * d.R), tmp(d.L == 1 ? 0 : tile * KQ);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * tile, tb = std::min(tile, d.B - b0);
      const T* Sb = hp ? hp + b0 * d.R : sbuf.data();
      const int64_t hs = hp ? d.B * d.R : tb * d.R;
      if (!hp) stage1(d, x, w1, b0, tb, sbuf.data(), hs, tmp.data());
      // grad tile gathered per output block l: G_l[i, s] = g[b0+i, s*L + l]
      const T* G = g + b0 * LS;
      int64_t gld = d.S, gls = 0;
      if (d.L > 1) {
        for (int64_t i = 0; i < tb; ++i)
          for (int64_t l = 0; l < d.L; ++l) {
            const T* src = g + (b0 + i) * LS + l;
            T* dst = gbuf.data() + (l * tb + i) * d.S;
            for (int64_t s = 0; s < d.S; ++s) dst[s] = src[s * d.L];
          }
        G = gbuf.data();
        gls = tb * d.S;
      }
      for (int64_t l = 0; l < d.L; ++l) {
        const T* Gl = G + l * gls;
        gemm_rm<T>(false, false, tb, d.R, d.S, Gl, gld, w2 + l * d.S * d.R, d.R, T(0),
                   dsb.data() + l * tb * d.R, d.R);
        gemm_rm<T>(true, false, d.S, d.R, tb, Gl, gld, Sb + l * hs, d.R, T(1), a2 + l * d.S * d.R,
                   d.R);
      }
      const T* xt = x + b0 * KP;
      // Stage-1 backward: with L > 1 the strided-row GEMMs would have an inner dimension of only
      // Q/L, so dS is permuted back to h's natural layout in cache and each block is one GEMM.
      if (d.L == 1) {
        for (int64_t k = 0; k < d.K; ++k) {
          bool first = true;
          for (int64_t l = 0; l < d.L; ++l) {
            int64_t q0, cnt, r0;
            d.split(k, l, q0, cnt, r0);
            if (cnt == 0) continue;
            const T* ds = dsb.data() + l * tb * d.R + r0;
            gemm_rm<T>(false, false, tb, d.P, cnt, ds, d.R, w1 + (k * d.Q + q0) * d.P, d.L * d.P,
                       first ? T(0) : T(1), dx + b0 * KP + k * d.P, KP);
            gemm_rm<T>(true, false, cnt, d.P, tb, ds, d.R, xt + k * d.P, KP, T(1),
                       a1 + (k * d.Q + q0) * d.P, d.L * d.P);
            first = false;
          }
          if (first)
            for (int64_t i = 0; i < tb; ++i)
              std::fill_n(dx + (b0 + i) * KP + k * d.P, d.P, T(0));
        }
      } else {
        T* dh = tmp.data();  // back to h's natural layout dh[i, k*Q + q]
        for (int64_t i = 0; i < tb; ++i)
          for (int64_t r = 0; r < d.R; ++r) {
            T* dst = dh + i * KQ + r * d.L;
            for (int64_t l = 0; l < d.L; ++l) dst[l] = dsb[(l * tb + i) * d.R + r];
          }
        for (int64_t k = 0; k < d.K; ++k) {
          gemm_rm<T>(false, false, tb, d.P, d.Q, dh + k * d.Q, KQ, w1 + k * d.Q * d.P, d.P, T(0),
                     dx + b0 * KP + k * d.P, KP);
          gemm_rm<T>(true, false, d.Q, d.P, tb, dh + k * d.Q, KQ, xt + k * d.P, KP, T(1),
                     a1 + k * d.Q * d.P, d.P);
        }
      }
    }
  });
  for (int64_t i = 0; i < n1; ++i) {
    T s = 0;
    for (int64_t th = 0; th < nth; ++th) s += acc[th * (n1 + n2) + i];
    dw1[i] = s;
  }
  for (int64_t i = 0; i < n2; ++i) {
    T s = 0;
    for (int64_t th = 0; th < nth; ++th) s += acc[th * (n1 + n2) + n1 + i];
    dw2[i] = s;
  }
}

Dims check(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2, "monarch: x must be 2-D (B, K*P), got ", x.sizes());
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "monarch: w1 (K,Q,P) and w2 (L,S,R) must be 3-D");
  TORCH_CHECK(x.scalar_type() == w1.scalar_type() && x.scalar_type() == w2.scalar_type(),
              "monarch: x, w1, w2 must share a dtype");
  Dims d{x.size(0), w1.size(0), w1.size(2), w1.size(1), w2.size(0), w2.size(1), w2.size(2)};
  TORCH_CHECK(x.size(1) == d.K * d.P, "monarch: x.size(1)=", x.size(1), " != K*P=", d.K * d.P);
  TORCH_CHECK(d.K * d.Q == d.L * d.R, "monarch: need K*Q == L*R, got ", d.K * d.Q, " vs ",
              d.L * d.R);
  TORCH_CHECK(d.L > 0 && d.K > 0, "monarch: empty block dimension");
  return d;
}

// float/double run natively; other dtypes compute in float32 (like ATen's CPU
// reduced-precision matmul, which also accumulates in float32).
bool native(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

std::tuple<at::Tensor, at::Tensor> fwd_h_cpu(const at::Tensor& x_, const at::Tensor& w1_,
                                             const at::Tensor& w2_, bool keep_h) {
  Dims d = check(x_, w1_, w2_);
  if (!native(x_)) {
    auto r = fwd_h_cpu(x_.to(at::kFloat), w1_.to(at::kFloat), w2_.to(at::kFloat), keep_h);
    return {std::get<0>(r).to(x_.scalar_type()), std::get<1>(r).to(x_.scalar_type())};
  }
  auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  auto out = at::empty({d.B, d.L * d.S}, x.options());
  auto h = at::empty({keep_h ? d.B * d.K * d.Q : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "monarch_fwd_cpu", [&] {
    fwd_impl<scalar_t>(d, x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(),
                       w2.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       keep_h ? h.data_ptr<scalar_t>() : nullptr);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd_cpu(
    const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& w1_, const at::Tensor& w2_,
    const std::optional<at::Tensor>& h_) {
  Dims d = check(x_, w1_, w2_);
  TORCH_CHECK(g_.dim() == 2 && g_.size(0) == d.B && g_.size(1) == d.L * d.S,
              "monarch_bwd: grad must be (B, L*S)");
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
  at::Tensor h = use_h ? h_->contiguous() : at::Tensor();
  auto dx = at::empty_like(x), dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "monarch_bwd_cpu", [&] {
    bwd_impl<scalar_t>(d, g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(),
                       w2.data_ptr<scalar_t>(), use_h ? h.data_ptr<scalar_t>() : nullptr,
                       dx.data_ptr<scalar_t>(), dw1.data_ptr<scalar_t>(), dw2.data_ptr<scalar_t>());
  });
  return {dx, dw1, dw2};
}

// ---------------------------------------------------------------- butterfly
struct BDims {
  int64_t batch, nstacks, nblocks, log_n, n;
};

BDims bcheck(const at::Tensor& tw, const at::Tensor& x) {
  TORCH_CHECK(tw.dim() == 6 && tw.size(4) == 2 && tw.size(5) == 2,
              "butterfly: twiddle must be (nstacks, nblocks, log_n, n/2, 2, 2), got ", tw.sizes());
  TORCH_CHECK(x.dim() == 3, "butterfly: x must be (batch, nstacks, n), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == tw.scalar_type(), "butterfly: x and twiddle dtypes differ");
  BDims d{x.size(0), x.size(1), tw.size(1), tw.size(2), x.size(2)};
  TORCH_CHECK(tw.size(0) == d.nstacks, "butterfly: nstacks mismatch");
  TORCH_CHECK(d.log_n < 31 && (int64_t(1) << d.log_n) == d.n && tw.size(3) == d.n / 2,
              "butterfly: n must be 2**log_n with twiddle.size(3) == n/2");
  return d;
}

// stride of factor f (flattened over blocks) for the given starting direction
inline int64_t bstride(const BDims& d, int64_t f, bool inc) {
  const int64_t blk = f / d.log_n, idx = f % d.log_n;
  const bool up = (blk % 2 == 0) ? inc : !inc;
  return int64_t(1) << (up ? idx : d.log_n - 1 - idx);
}

template <typename T>
void bfly_apply(const BDims& d, const T* t, const T* in, T* out, int64_t st) {
  for (int64_t j = 0; j < d.n / 2; ++j) {
    const int64_t i0 = (j / st) * 2 * st + j % st, i1 = i0 + st;
    const T a = in[i0], b = in[i1];
    const T* tj = t + 4 * j;
    out[i0] = tj[0] * a + tj[1] * b;
    out[i1] = tj[2] * a + tj[3] * b;
  }
}

at::Tensor butterfly_fwd_cpu(const at::Tensor& tw_, const at::Tensor& x_, bool inc) {
  BDims d = bcheck(tw_, x_);
  auto tw = tw_.contiguous(), x = x_.contiguous();
  auto out = at::empty_like(x);
  const int64_t nf = d.nblocks * d.log_n, tstack = nf * d.n * 2;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterfly_fwd_cpu", [&] {
    const scalar_t* T = tw.data_ptr<scalar_t>();
    const scalar_t* X = x.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, d.batch * d.nstacks, 16, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> buf(d.n);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t stk = row % d.nstacks;
        scalar_t* o = O + row * d.n;
        std::copy_n(X + row * d.n, d.n, o);
        for (int64_t f = 0; f < nf; ++f) {
          bfly_apply(d, T + stk * tstack + f * d.n * 2, o, buf.data(), bstride(d, f, inc));
          std::copy(buf.begin(), buf.end(), o);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> butterfly_bwd_cpu(const at::Tensor& g_, const at::Tensor& tw_,
                                                     const at::Tensor& x_, bool inc) {
  BDims d = bcheck(tw_, x_);
  TORCH_CHECK(g_.sizes() == x_.sizes(), "butterfly_bwd: grad must have x's shape");
  auto tw = tw_.contiguous(), x = x_.contiguous(), g = g_.to(x_.scalar_type()).contiguous();
  auto dx = at::empty_like(x);
  auto dtw = at::zeros_like(tw);
  const int64_t nf = d.nblocks * d.log_n, tstack = nf * d.n * 2, rows = d.batch * d.nstacks;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterfly_bwd_cpu", [&] {
    using T = scalar_t;
    const T* TW = tw.data_ptr<T>();
    const T* X = x.data_ptr<T>();
    const T* G = g.data_ptr<T>();
    T* DX = dx.data_ptr<T>();
    const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    std::vector<T> acc((size_t)(nth * tw.numel()), T(0));
    at::parallel_for(0, rows, (rows + nth - 1) / nth, [&](int64_t r0, int64_t r1) {
      T* A = acc.data() + std::min<int64_t>(at::get_thread_num(), nth - 1) * tw.numel();
      std::vector<T> acts((nf + 1) * d.n), gb(d.n), gn(d.n);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t stk = row % d.nstacks;
        std::copy_n(X + row * d.n, d.n, acts.data());
        for (int64_t f = 0; f < nf; ++f)
          bfly_apply(d, TW + stk * tstack + f * d.n * 2, acts.data() + f * d.n,
                     acts.data() + (f + 1) * d.n, bstride(d, f, inc));
        std::copy_n(G + row * d.n, d.n, gb.data());
        for (int64_t f = nf - 1; f >= 0; --f) {
          const int64_t st = bstride(d, f, inc);
          const T* t = TW + stk * tstack + f * d.n * 2;
          T* dt = A + stk * tstack + f * d.n * 2;
          const T* in = acts.data() + f * d.n;
          for (int64_t j = 0; j < d.n / 2; ++j) {
            const int64_t i0 = (j / st) * 2 * st + j % st, i1 = i0 + st;
            const T g0 = gb[i0], g1 = gb[i1], a = in[i0], b = in[i1];
            dt[4 * j + 0] += g0 * a;
            dt[4 * j + 1] += g0 * b;
            dt[4 * j + 2] += g1 * a;
            dt[4 * j + 3] += g1 * b;
            gn[i0] = t[4 * j + 0] * g0 + t[4 * j + 2] * g1;
            gn[i1] = t[4 * j + 1] * g0 + t[4 * j + 3] * g1;
          }
          std::swap(gb, gn);
        }
        std::copy(gb.begin(), gb.end(), DX + row * d.n);
      }
    });
    T* D = dtw.data_ptr<T>();
    for (int64_t th = 0; th < nth; ++th)
      for (int64_t i = 0; i < tw.numel(); ++i) D[i] += acc[th * tw.numel() + i];
  });
  return {dtw, dx};
}

}  // namespace

TORCH_LIBRARY(monarch_seam, m) {
  m.def("monarch_fwd(Tensor x, Tensor w1, Tensor w2) -> Tensor");
  // h: stage-1 activations in an implementation-defined 1-D layout, for monarch_bwd
  m.def("monarch_fwd_h(Tensor x, Tensor w1, Tensor w2) -> (Tensor, Tensor)");
  m.def("monarch_bwd(Tensor grad, Tensor x, Tensor w1, Tensor w2, Tensor? h) -> (Tensor, Tensor, Tensor)");
  m.def("butterfly_fwd(Tensor twiddle, Tensor x, bool increasing_stride) -> Tensor");
  m.def("butterfly_bwd(Tensor grad, Tensor twiddle, Tensor x, bool increasing_stride) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(monarch_seam, CPU, m) {
  m.impl("monarch_fwd", &monarch_fwd_cpu);
  m.impl("monarch_fwd_h", &monarch_fwd_h_cpu);
  m.impl("monarch_bwd", &monarch_bwd_cpu);
  m.impl("butterfly_fwd", &butterfly_fwd_cpu);
  m.impl("butterfly_bwd", &butterfly_bwd_cpu);
}

}  // namespace monarch_seam
