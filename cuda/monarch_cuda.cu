// CUDA implementation of monarch_seam::monarch_fwd / monarch_fwd_h / monarch_bwd.
//
// Every step of the Monarch product and of its backward pass is one batched GEMM launch whose
// operands are strided views of x, w1, w2, h, grad and whose result is written through an index
// map, so the Monarch permutations are index arithmetic in loads and stores and no permutation copy
// is ever made (the plan of six GEMMs is in cuda/monarch_plan.h; a CPU test executes it by emulation):
//   * stage 1 writes h straight into the permuted layout hp[l][b][r] (h[b, k*Q + q] with
//     k*Q + q = r*L + l): the epilogue splits the column index (plan::Out);
//   * stage 2 reads hp[l] as a plain matrix and writes out[b, s*L + l] (column stride L);
//   * backward reads grad[b, s*L + l] with strides (L*S, L) and writes dh[b, r*L + l].
// hp (L, B, R), flattened, is what monarch_fwd_h saves for backward.
//
// Two kernels share these views:
//   * fp16/bf16 on sm_80+: tensor cores through WMMA (16x16x16 fragments, fp32 accumulation),
//     128x128x32 block tile, 8 warps of 64x32; tiles are staged in shared memory with 16-byte
//     vector loads whenever the view has a unit stride along a tile dimension;
//   * everything else (fp32, fp64, and fp16/bf16 before sm_80): a 64x64x16 SIMT tile with fp32
//     accumulation (fp64 for double).
// The weight-gradient GEMMs have a short output (a block) and a long reduction (the whole batch),
// so when the output tiles cannot fill the GPU the reduction is split over blocks (split-K): the
// parts go to a float workspace and a second kernel sums them in a fixed order (deterministic).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "monarch_plan.h"

namespace monarch_seam {
namespace {

using plan::Out;
using plan::View;

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}

// Epilogue of one output element: straight to C, or to this split's slice of the workspace.
template <typename T>
__device__ __forceinline__ void put(T* C, const Out& c, acc_t<T>* ws, int64_t zs, int64_t z, int64_t M,
                                    int64_t N, int64_t m, int64_t n, acc_t<T> v) {
  if (ws != nullptr)
    ws[(zs * M + m) * N + n] = v;
  else
    C[c.at(z, m, n)] = from_acc<T>(v);
}

// ---------------------------------------------------------------- SIMT kernel (any dtype)
constexpr int BM = 64, BN = 64, BK = 16, NT = 256;

// C[z] (M x N) = A[z] (M x Kd) @ B[z] (Kd x N) over k in this split's chunk.
// blockIdx.z = z * splits + split.
template <typename T>
__global__ void __launch_bounds__(NT) simt_gemm_kernel(int64_t M, int64_t N, int64_t Kd, int64_t kchunk,
                                                       int splits, const T* __restrict__ A, View a,
                                                       const T* __restrict__ B, View b, T* __restrict__ C,
                                                       Out c, acc_t<T>* __restrict__ ws) {
  using acc = acc_t<T>;
  __shared__ acc As[BK][BM + 1];
  __shared__ acc Bs[BK][BN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t zs = blockIdx.z, z = zs / splits, sp = zs % splits;
  const int64_t m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;
  const int64_t kbeg = sp * kchunk, kend = min(Kd, kbeg + kchunk);
  A += z * a.bs;
  B += z * b.bs;
  // Choose the load order so that consecutive threads read consecutive addresses when an
  // operand has a unit stride (coalescing); the mapping stays correct for any strides.
  const bool a_k_fast = a.cs <= a.rs, b_n_fast = b.cs <= b.rs;
  acc r[4][4] = {};
  for (int64_t k0 = kbeg; k0 < kend; k0 += BK) {
#pragma unroll
    for (int e0 = 0; e0 < BM * BK; e0 += NT) {
      const int e = e0 + tid;
      const int mi = a_k_fast ? e / BK : e % BM, ki = a_k_fast ? e % BK : e / BM;
      const int64_t gm = m0 + mi, gk = k0 + ki;
      As[ki][mi] = (gm < M && gk < kend) ? to_acc<T>(A[gm * a.rs + gk * a.cs]) : acc(0);
    }
#pragma unroll
    for (int e0 = 0; e0 < BK * BN; e0 += NT) {
      const int e = e0 + tid;
      const int ni = b_n_fast ? e % BN : e / BK, ki = b_n_fast ? e / BN : e % BK;
      const int64_t gn = n0 + ni, gk = k0 + ki;
      Bs[ki][ni] = (gn < N && gk < kend) ? to_acc<T>(B[gk * b.rs + gn * b.cs]) : acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) r[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + ty + 16 * i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gn < N) put<T>(C, c, ws, zs, z, M, N, gm, gn, r[i][j]);
    }
  }
}

// ---------------------------------------------------------------- tensor-core kernel (fp16/bf16)
constexpr int WBM = 128, WBN = 128, WBK = 32, WNT = 256;
constexpr int APAD = 8, BPAD = 8, CLD = 20;  // row pads keep 16-byte rows and spread shared banks

template <typename T>
struct Wmma;  // at:: type -> CUDA type used by the fragments
template <>
struct Wmma<at::Half> {
  using type = __half;
};
template <>
struct Wmma<at::BFloat16> {
  using type = __nv_bfloat16;
};

// s[r*lds + c] = g[(r0+r)*rs + (c0+c)*cs] for the R x CC tile (0 outside rows < rmax, cols < cmax).
// 16-byte vector loads along whichever tile dimension has unit stride (when aligned), else scalar
// loads ordered along the smaller stride.
template <int R, int CC, typename U>
__device__ __forceinline__ void load_tile(U* s, int lds, const U* g, int64_t rs, int64_t cs, int64_t r0, int64_t c0,
                                          int64_t rmax, int64_t cmax) {
  const bool aligned = (reinterpret_cast<uintptr_t>(g) % 16) == 0;
  const U zero = U{};  // all-zero bits (+0.0); the float constructors are disabled in torch builds
  if (cs == 1 && rs % 8 == 0 && aligned) {
    for (int v = threadIdx.x; v < R * (CC / 8); v += WNT) {
      const int r = v / (CC / 8), c = (v % (CC / 8)) * 8;
      const int64_t gr = r0 + r, gc = c0 + c;
      if (gr < rmax && gc + 8 <= cmax) {
        *reinterpret_cast<uint4*>(s + r * lds + c) = *reinterpret_cast<const uint4*>(g + gr * rs + gc);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) s[r * lds + c + e] = (gr < rmax && gc + e < cmax) ? g[gr * rs + gc + e] : zero;
      }
    }
  } else if (rs == 1 && cs % 8 == 0 && aligned) {
    for (int v = threadIdx.x; v < (R / 8) * CC; v += WNT) {
      const int c = v / (R / 8), r = (v % (R / 8)) * 8;
      const int64_t gr = r0 + r, gc = c0 + c;
      if (gc < cmax && gr + 8 <= rmax) {
        const uint4 q = *reinterpret_cast<const uint4*>(g + gr + gc * cs);
        const U* e = reinterpret_cast<const U*>(&q);
#pragma unroll
        for (int i = 0; i < 8; ++i) s[(r + i) * lds + c] = e[i];
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) s[(r + i) * lds + c] = (gc < cmax && gr + i < rmax) ? g[gr + i + gc * cs] : zero;
      }
    }
  } else if (cs <= rs) {
    for (int v = threadIdx.x; v < R * CC; v += WNT) {
      const int r = v / CC, c = v % CC;
      const int64_t gr = r0 + r, gc = c0 + c;
      s[r * lds + c] = (gr < rmax && gc < cmax) ? g[gr * rs + gc * cs] : zero;
    }
  } else {
    for (int v = threadIdx.x; v < R * CC; v += WNT) {
      const int c = v / R, r = v % R;
      const int64_t gr = r0 + r, gc = c0 + c;
      s[r * lds + c] = (gr < rmax && gc < cmax) ? g[gr * rs + gc * cs] : zero;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(WNT) wmma_gemm_kernel(int64_t M, int64_t N, int64_t Kd, int64_t kchunk,
                                                        int splits, const T* __restrict__ A_, View a,
                                                        const T* __restrict__ B_, View b, T* __restrict__ C,
                                                        Out c, float* __restrict__ ws) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using U = typename Wmma<T>::type;
  __shared__ __align__(32) U As[WBM * (WBK + APAD)];
  __shared__ __align__(32) U Bs[WBK * (WBN + BPAD)];
  __shared__ __align__(32) float Cs[WNT / 32][16 * CLD];
  const U* A = reinterpret_cast<const U*>(A_);
  const U* B = reinterpret_cast<const U*>(B_);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // 2 x 4 warps, 64 x 32 outputs each
  const int64_t zs = blockIdx.z, z = zs / splits, sp = zs % splits;
  const int64_t m0 = (int64_t)blockIdx.y * WBM, n0 = (int64_t)blockIdx.x * WBN;
  const int64_t kbeg = sp * kchunk, kend = min(Kd, kbeg + kchunk);
  A += z * a.bs;
  B += z * b.bs;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (int64_t k0 = kbeg; k0 < kend; k0 += WBK) {
    load_tile<WBM, WBK>(As, WBK + APAD, A, a.rs, a.cs, m0, k0, M, kend);  // As[m][k]
    load_tile<WBK, WBN>(Bs, WBN + BPAD, B, b.rs, b.cs, k0, n0, kend, N);  // Bs[k][n]
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < WBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, U, wmma::row_major> af[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, U, wmma::row_major> bf[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(af[i], As + (wm * 64 + i * 16) * (WBK + APAD) + kk, WBK + APAD);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], Bs + kk * (WBN + BPAD) + wn * 32 + j * 16, WBN + BPAD);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
    __syncthreads();
  }
  // Each 16x16 accumulator goes through this warp's staging tile so that every element can be stored
  // through the Out index map (the permutations) with bounds checks.
  float* cs = Cs[warp];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(cs, acc[i][j], CLD, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = e / 16, cc = e % 16;
        const int64_t gm = m0 + wm * 64 + i * 16 + r, gn = n0 + wn * 32 + j * 16 + cc;
        if (gm < M && gn < N) put<T>(C, c, ws, zs, z, M, N, gm, gn, cs[r * CLD + cc]);
      }
      __syncwarp();
    }
#endif
}

// Sums the split-K parts in order and stores through the Out map.
template <typename T>
__global__ void splitk_reduce_kernel(int64_t batch, int64_t M, int64_t N, int splits, const acc_t<T>* __restrict__ ws,
                                     T* __restrict__ C, Out c) {
  const int64_t total = batch * M * N;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t z = e / (M * N), mn = e % (M * N), m = mn / N, n = mn % N;
    acc_t<T> s = 0;
    for (int sp = 0; sp < splits; ++sp) s += ws[((z * splits + sp) * M + m) * N + n];
    C[c.at(z, m, n)] = from_acc<T>(s);
  }
}

template <typename T>
constexpr bool is_half_type() {
  return std::is_same<T, at::Half>::value || std::is_same<T, at::BFloat16>::value;
}

struct DeviceInfo {
  int major, sms;
};

// Compute capability and SM count of the current device, read once per device (ATen's CUDAContext.h
// would pull in the cuSPARSE/cuBLAS headers, which a bare toolkit may not have).
DeviceInfo device_info() {
  static DeviceInfo cache[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  TORCH_CHECK(dev >= 0 && dev < 64, "monarch_cuda: device index out of range");
  if (cache[dev].sms == 0) {
    DeviceInfo info{};
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = info;
  }
  return cache[dev];
}

// Launches C[z] = A[z] @ B[z] for z < batch through the views; picks the kernel and the split-K.
template <typename T>
void bgemm(const at::Tensor& like, int64_t batch, int64_t M, int64_t N, int64_t Kd, const T* A, View a, const T* B,
           View b, T* C, Out c) {
  if (batch == 0 || M == 0 || N == 0) return;
  const DeviceInfo dev = device_info();
  const bool tc = is_half_type<T>() && dev.major >= 8;
  const int64_t bm = tc ? WBM : BM, bn = tc ? WBN : BN, bk = tc ? WBK : BK;
  const int64_t tiles = batch * ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
  // split the reduction when the output tiles leave most of the GPU idle and each part stays long
  int64_t splits = 1;
  const int64_t want = 2 * (int64_t)dev.sms;
  if (tiles < want && Kd >= 8 * bk) splits = std::min<int64_t>((want + tiles - 1) / tiles, Kd / (4 * bk));
  int64_t kchunk = (Kd + splits - 1) / splits;
  kchunk = std::max<int64_t>(bk, (kchunk + bk - 1) / bk * bk);
  splits = std::max<int64_t>(1, (Kd + kchunk - 1) / kchunk);
  TORCH_CHECK(batch * splits <= 65535 && (M + bm - 1) / bm <= 65535, "monarch_cuda: grid too large");
  if (Kd == 0) kchunk = 1;  // empty sum: the k loop is skipped and zeros are stored
  at::Tensor ws;
  acc_t<T>* wsp = nullptr;
  if (splits > 1) {
    ws = at::empty({batch * splits * M * N}, like.options().dtype(std::is_same<T, double>::value ? at::kDouble : at::kFloat));
    wsp = ws.mutable_data_ptr<acc_t<T>>();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid((unsigned)((N + bn - 1) / bn), (unsigned)((M + bm - 1) / bm), (unsigned)(batch * splits));
  if constexpr (is_half_type<T>()) {
    if (tc) {
      wmma_gemm_kernel<T><<<grid, WNT, 0, stream>>>(M, N, Kd, kchunk, (int)splits, A, a, B, b, C, c, wsp);
    } else {
      simt_gemm_kernel<T><<<grid, NT, 0, stream>>>(M, N, Kd, kchunk, (int)splits, A, a, B, b, C, c, wsp);
    }
  } else {
    simt_gemm_kernel<T><<<grid, NT, 0, stream>>>(M, N, Kd, kchunk, (int)splits, A, a, B, b, C, c, wsp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t total = batch * M * N;
    const int blocks = (int)std::min<int64_t>((total + 255) / 256, 4096);
    splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(batch, M, N, (int)splits, wsp, C, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------- the Monarch op
using plan::Dims;

Dims check(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3,
              "monarch_cuda: x (B, K*P), w1 (K, Q, P), w2 (L, S, R) expected");
  TORCH_CHECK(x.is_cuda() && w1.device() == x.device() && w2.device() == x.device(),
              "monarch_cuda: all tensors must be on the same CUDA device");
  TORCH_CHECK(x.scalar_type() == w1.scalar_type() && x.scalar_type() == w2.scalar_type(),
              "monarch_cuda: x, w1, w2 must share a dtype");
  Dims d{x.size(0), w1.size(0), w1.size(2), w1.size(1), w2.size(0), w2.size(1), w2.size(2)};
  TORCH_CHECK(x.size(1) == d.K * d.P, "monarch_cuda: x.size(1) must be K*P");
  TORCH_CHECK(d.K * d.Q == d.L * d.R, "monarch_cuda: need K*Q == L*R");
  return d;
}

// Data pointers of the plan's buffers, indexed by plan::Buf (unused ones stay null).
template <typename T>
void set_bufs(T** bufs, std::initializer_list<std::pair<plan::Buf, const at::Tensor*>> items) {
  for (const auto& item : items) bufs[item.first] = item.second->data_ptr<T>();
}

// Runs one GEMM of the plan (cuda/monarch_plan.h) over the buffers, indexed by plan::Buf.
template <typename T>
void run(const at::Tensor& like, const plan::Gemm& g, T* const* bufs) {
  bgemm<T>(like, g.batch, g.M, g.N, g.Kd, bufs[g.a], g.av, bufs[g.b], g.bv, bufs[g.c], g.cv);
}

std::tuple<at::Tensor, at::Tensor> fwd_h_cuda(const at::Tensor& x_, const at::Tensor& w1_, const at::Tensor& w2_) {
  Dims d = check(x_, w1_, w2_);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  auto out = at::empty({d.B, d.L * d.S}, x.options());
  auto hp = at::empty({d.B * d.K * d.Q}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "monarch_fwd_cuda", [&] {
    scalar_t* bufs[10] = {};
    set_bufs<scalar_t>(bufs, {{plan::X, &x}, {plan::W1, &w1}, {plan::W2, &w2}, {plan::HP, &hp}, {plan::OUT, &out}});
    run<scalar_t>(x, plan::stage1(d), bufs);
    run<scalar_t>(x, plan::stage2(d), bufs);
  });
  return {out, hp};
}

at::Tensor monarch_fwd_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  return std::get<0>(fwd_h_cuda(x, w1, w2));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd_cuda(const at::Tensor& g_, const at::Tensor& x_,
                                                                const at::Tensor& w1_, const at::Tensor& w2_,
                                                                const std::optional<at::Tensor>& h_) {
  Dims d = check(x_, w1_, w2_);
  TORCH_CHECK(g_.dim() == 2 && g_.size(0) == d.B && g_.size(1) == d.L * d.S, "monarch_cuda: grad must be (B, L*S)");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  auto g = g_.to(x.scalar_type()).contiguous();
  at::Tensor hp;
  if (h_.has_value() && h_->numel() == d.B * d.K * d.Q) {
    hp = h_->to(x.scalar_type()).contiguous();
  } else {
    hp = at::empty({d.B * d.K * d.Q}, x.options());
  }
  const bool recompute = !(h_.has_value() && h_->numel() == d.B * d.K * d.Q);
  auto dh = at::empty({d.B * d.K * d.Q}, x.options());
  auto dx = at::empty_like(x), dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "monarch_bwd_cuda", [&] {
    scalar_t* bufs[10] = {};
    set_bufs<scalar_t>(bufs, {{plan::X, &x}, {plan::W1, &w1}, {plan::W2, &w2}, {plan::G, &g}, {plan::HP, &hp},
                              {plan::DH, &dh}, {plan::DX, &dx}, {plan::DW1, &dw1}, {plan::DW2, &dw2}});
    if (recompute) run<scalar_t>(x, plan::stage1(d), bufs);
    plan::Gemm steps[4];
    plan::backward(d, steps);
    for (const auto& step : steps) run<scalar_t>(x, step, bufs);
  });
  return {dx, dw1, dw2};
}

}  // namespace

TORCH_LIBRARY_IMPL(monarch_seam, CUDA, m) {
  m.impl("monarch_fwd", &monarch_fwd_cuda);
  m.impl("monarch_fwd_h", &fwd_h_cuda);
  m.impl("monarch_bwd", &monarch_bwd_cuda);
}

}  // namespace monarch_seam
