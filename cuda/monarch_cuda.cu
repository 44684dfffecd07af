// CUDA implementation of monarch_seam::monarch_fwd / monarch_fwd_h / monarch_bwd.
//
// Every step of the Monarch product and of its backward pass is a batched GEMM whose operands
// are strided views of x, w1, w2, h and grad: the Monarch permutations (h[b, r*L + l] read as
// g[b, l, r], and out[b, s*L + l]) are only index arithmetic in the (batch, row, col) strides
// below, so no permutation copy is ever made. One tiled shared-memory kernel serves all six
// GEMMs: 64x64 output tile per block, 16-deep K slices, 256 threads with 4x4 outputs each,
// fp32 accumulation for every input dtype (fp32, fp64 in double, fp16, bf16).
//
// h (saved for backward) is stored in its natural layout h[b, k*Q + q], flattened to 1-D.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

namespace monarch_seam {
namespace {

struct View {  // element (z, i, j) of a batched matrix lives at ptr[z*bs + i*rs + j*cs]
  int64_t bs, rs, cs;
};

constexpr int BM = 64, BN = 64, BK = 16, NT = 256;

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// C[z] (M x N) = A[z] (M x Kd) @ B[z] (Kd x N), all operands given by strided views.
template <typename T>
__global__ void __launch_bounds__(NT) bgemm_kernel(int64_t M, int64_t N, int64_t Kd,
                                                    const T* __restrict__ A, View a,
                                                    const T* __restrict__ B, View b,
                                                    T* __restrict__ C, View c) {
  using acc = acc_t<T>;
  __shared__ acc As[BK][BM + 1];
  __shared__ acc Bs[BK][BN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t z = blockIdx.z, m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;
  A += z * a.bs;
  B += z * b.bs;
  C += z * c.bs;
  // Choose the load order so that consecutive threads read consecutive addresses when an
  // operand has a unit stride (coalescing); the mapping stays correct for any strides.
  const bool a_k_fast = a.cs == 1, b_n_fast = b.cs == 1 || b.rs != 1;
  acc r[4][4] = {};
  for (int64_t k0 = 0; k0 < Kd; k0 += BK) {
#pragma unroll
    for (int e0 = 0; e0 < BM * BK; e0 += NT) {
      const int e = e0 + tid;
      const int mi = a_k_fast ? e / BK : e % BM, ki = a_k_fast ? e % BK : e / BM;
      const int64_t gm = m0 + mi, gk = k0 + ki;
      As[ki][mi] = (gm < M && gk < Kd) ? static_cast<acc>(A[gm * a.rs + gk * a.cs]) : acc(0);
    }
#pragma unroll
    for (int e0 = 0; e0 < BK * BN; e0 += NT) {
      const int e = e0 + tid;
      const int ni = b_n_fast ? e % BN : e / BK, ki = b_n_fast ? e / BN : e % BK;
      const int64_t gn = n0 + ni, gk = k0 + ki;
      Bs[ki][ni] = (gn < N && gk < Kd) ? static_cast<acc>(B[gk * b.rs + gn * b.cs]) : acc(0);
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
      if (gn < N) C[gm * c.rs + gn * c.cs] = static_cast<T>(r[i][j]);
    }
  }
}

template <typename T>
void bgemm(int64_t batch, int64_t M, int64_t N, int64_t Kd, const T* A, View a, const T* B,
           View b, T* C, View c) {
  if (batch == 0 || M == 0 || N == 0) return;
  TORCH_CHECK(batch <= 65535 && (M + BM - 1) / BM <= 65535, "monarch_cuda: grid too large");
  // Kd == 0 is fine: the K loop is skipped and C is written with zeros (an empty sum).
  dim3 grid((unsigned)((N + BN - 1) / BN), (unsigned)((M + BM - 1) / BM), (unsigned)batch);
  bgemm_kernel<T><<<grid, NT, 0, c10::cuda::getCurrentCUDAStream()>>>(M, N, Kd, A, a, B, b, C, c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Dims {
  int64_t B, K, P, Q, L, S, R;
};

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

// h[b, k*Q + q] = sum_p x[b, k*P + p] w1[k, q, p]
template <typename T>
void stage1(const Dims& d, const T* x, const T* w1, T* h) {
  const int64_t KP = d.K * d.P, KQ = d.K * d.Q;
  bgemm<T>(d.K, d.B, d.Q, d.P, x, View{d.P, KP, 1}, w1, View{d.Q * d.P, 1, d.P}, h,
           View{d.Q, KQ, 1});
}

template <typename T>
void fwd(const Dims& d, const T* x, const T* w1, const T* w2, T* h, T* out) {
  const int64_t KQ = d.K * d.Q, LS = d.L * d.S;
  stage1(d, x, w1, h);
  // out[b, s*L + l] = sum_r h[b, r*L + l] w2[l, s, r]
  bgemm<T>(d.L, d.B, d.S, d.R, h, View{1, KQ, d.L}, w2, View{d.S * d.R, 1, d.R}, out,
           View{1, LS, d.L});
}

template <typename T>
void bwd(const Dims& d, const T* g, const T* x, const T* w1, const T* w2, const T* h, T* dh,
         T* dx, T* dw1, T* dw2) {
  const int64_t KP = d.K * d.P, KQ = d.K * d.Q, LS = d.L * d.S;
  // dh[b, r*L + l] = sum_s g[b, s*L + l] w2[l, s, r]
  bgemm<T>(d.L, d.B, d.R, d.S, g, View{1, LS, d.L}, w2, View{d.S * d.R, d.R, 1}, dh,
           View{1, KQ, d.L});
  // dw2[l, s, r] = sum_b g[b, s*L + l] h[b, r*L + l]
  bgemm<T>(d.L, d.S, d.R, d.B, g, View{1, d.L, LS}, h, View{1, KQ, d.L}, dw2,
           View{d.S * d.R, d.R, 1});
  // dx[b, k*P + p] = sum_q dh[b, k*Q + q] w1[k, q, p]
  bgemm<T>(d.K, d.B, d.P, d.Q, dh, View{d.Q, KQ, 1}, w1, View{d.Q * d.P, d.P, 1}, dx,
           View{d.P, KP, 1});
  // dw1[k, q, p] = sum_b dh[b, k*Q + q] x[b, k*P + p]
  bgemm<T>(d.K, d.Q, d.P, d.B, dh, View{d.Q, 1, KQ}, x, View{d.P, KP, 1}, dw1,
           View{d.Q * d.P, d.P, 1});
}

std::tuple<at::Tensor, at::Tensor> fwd_h_cuda(const at::Tensor& x_, const at::Tensor& w1_,
                                              const at::Tensor& w2_) {
  Dims d = check(x_, w1_, w2_);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  auto out = at::empty({d.B, d.L * d.S}, x.options());
  auto h = at::empty({d.B * d.K * d.Q}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "monarch_fwd_cuda", [&] {
    fwd<scalar_t>(d, x.const_data_ptr<scalar_t>(), w1.const_data_ptr<scalar_t>(),
                  w2.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
                  out.mutable_data_ptr<scalar_t>());
  });
  return {out, h};
}

at::Tensor monarch_fwd_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  return std::get<0>(fwd_h_cuda(x, w1, w2));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_bwd_cuda(
    const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& w1_, const at::Tensor& w2_,
    const std::optional<at::Tensor>& h_) {
  Dims d = check(x_, w1_, w2_);
  TORCH_CHECK(g_.dim() == 2 && g_.size(0) == d.B && g_.size(1) == d.L * d.S,
              "monarch_cuda: grad must be (B, L*S)");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  auto g = g_.to(x.scalar_type()).contiguous();
  at::Tensor h;
  if (h_.has_value() && h_->numel() == d.B * d.K * d.Q) {
    h = h_->to(x.scalar_type()).contiguous();
  } else {
    h = at::empty({d.B * d.K * d.Q}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "monarch_h_cuda", [&] {
      stage1<scalar_t>(d, x.const_data_ptr<scalar_t>(), w1.const_data_ptr<scalar_t>(),
                       h.mutable_data_ptr<scalar_t>());
    });
  }
  auto dh = at::empty({d.B * d.K * d.Q}, x.options());
  auto dx = at::empty_like(x), dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "monarch_bwd_cuda", [&] {
    bwd<scalar_t>(d, g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                  w1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>(),
                  h.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(),
                  dx.mutable_data_ptr<scalar_t>(), dw1.mutable_data_ptr<scalar_t>(),
                  dw2.mutable_data_ptr<scalar_t>());
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
