// CUDA implementation of monarch_seam::butterfly_fwd / butterfly_bwd (float32; float64 too).
//
// twiddle (nstacks, nblocks, log_n, n/2, 2, 2), x (batch, nstacks, n). One thread block per
// (batch, stack) row keeps the row in shared memory and applies the nblocks*log_n factors in
// order; each thread owns whole pairs (i0, i1) of a factor, so the update is in place and one
// __syncthreads separates factors. Backward recomputes the forward pass of the row, keeping the
// input of every factor in a global workspace, then walks the factors in reverse with the
// gradient in shared memory; d_twiddle is reduced over rows with atomicAdd.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace monarch_seam {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSmem = 48 * 1024;

// Stride of flattened factor f: the direction starts as `inc` and flips after each block.
__device__ __forceinline__ int factor_stride(int f, int log_n, bool inc) {
  const int blk = f / log_n, idx = f % log_n;
  const bool up = (blk % 2 == 0) ? inc : !inc;
  return 1 << (up ? idx : log_n - 1 - idx);
}

template <typename T>
__global__ void bfly_fwd_kernel(const T* __restrict__ tw, const T* __restrict__ x,
                                T* __restrict__ out, int nstacks, int nf, int log_n, bool inc) {
  extern __shared__ unsigned char smem[];
  T* buf = reinterpret_cast<T*>(smem);
  const int n = 1 << log_n, half = n / 2;
  const int64_t row = blockIdx.x;
  const int stk = (int)(row % nstacks);
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = x[row * n + i];
  __syncthreads();
  for (int f = 0; f < nf; ++f) {
    const int st = factor_stride(f, log_n, inc);
    const T* t = tw + ((int64_t)stk * nf + f) * half * 4;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
      const int i0 = (j / st) * 2 * st + j % st, i1 = i0 + st;
      const T a = buf[i0], b = buf[i1];
      buf[i0] = t[4 * j + 0] * a + t[4 * j + 1] * b;
      buf[i1] = t[4 * j + 2] * a + t[4 * j + 3] * b;
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[row * n + i] = buf[i];
}

template <typename T>
__global__ void bfly_bwd_kernel(const T* __restrict__ tw, const T* __restrict__ x,
                                const T* __restrict__ g, T* __restrict__ acts,
                                T* __restrict__ dtw, T* __restrict__ dx, int nstacks, int nf,
                                int log_n, bool inc) {
  extern __shared__ unsigned char smem[];
  T* buf = reinterpret_cast<T*>(smem);
  const int n = 1 << log_n, half = n / 2;
  const int64_t row = blockIdx.x;
  const int stk = (int)(row % nstacks);
  T* act = acts + row * (int64_t)nf * n;  // act[f*n + i]: input of factor f
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = x[row * n + i];
  __syncthreads();
  for (int f = 0; f < nf; ++f) {
    const int st = factor_stride(f, log_n, inc);
    const T* t = tw + ((int64_t)stk * nf + f) * half * 4;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
      const int i0 = (j / st) * 2 * st + j % st, i1 = i0 + st;
      const T a = buf[i0], b = buf[i1];
      act[f * n + i0] = a;
      act[f * n + i1] = b;
      buf[i0] = t[4 * j + 0] * a + t[4 * j + 1] * b;
      buf[i1] = t[4 * j + 2] * a + t[4 * j + 3] * b;
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = g[row * n + i];
  __syncthreads();
  for (int f = nf - 1; f >= 0; --f) {
    const int st = factor_stride(f, log_n, inc);
    const int64_t off = ((int64_t)stk * nf + f) * half * 4;
    const T* t = tw + off;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
      const int i0 = (j / st) * 2 * st + j % st, i1 = i0 + st;
      const T g0 = buf[i0], g1 = buf[i1], a = act[f * n + i0], b = act[f * n + i1];
      atomicAdd(dtw + off + 4 * j + 0, g0 * a);
      atomicAdd(dtw + off + 4 * j + 1, g0 * b);
      atomicAdd(dtw + off + 4 * j + 2, g1 * a);
      atomicAdd(dtw + off + 4 * j + 3, g1 * b);
      buf[i0] = t[4 * j + 0] * g0 + t[4 * j + 2] * g1;
      buf[i1] = t[4 * j + 1] * g0 + t[4 * j + 3] * g1;
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) dx[row * n + i] = buf[i];
}

struct BDims {
  int64_t rows, nstacks, nf, log_n, n;
};

BDims bcheck(const at::Tensor& tw, const at::Tensor& x) {
  TORCH_CHECK(tw.dim() == 6 && tw.size(4) == 2 && tw.size(5) == 2 && x.dim() == 3,
              "butterfly_cuda: twiddle (nstacks, nblocks, log_n, n/2, 2, 2), x (batch, nstacks, n)");
  TORCH_CHECK(x.is_cuda() && tw.device() == x.device(), "butterfly_cuda: tensors on one CUDA device");
  TORCH_CHECK(x.scalar_type() == tw.scalar_type(), "butterfly_cuda: dtypes differ");
  const int64_t log_n = tw.size(2), n = x.size(2);
  TORCH_CHECK(log_n >= 1 && log_n < 31 && (int64_t(1) << log_n) == n && tw.size(3) == n / 2 &&
                  tw.size(0) == x.size(1),
              "butterfly_cuda: shapes of twiddle and x do not match");
  TORCH_CHECK(n * (int64_t)x.element_size() <= kMaxSmem, "butterfly_cuda: n=", n,
              " too large for the shared-memory kernel");
  return BDims{x.size(0) * x.size(1), x.size(1), tw.size(1) * log_n, log_n, n};
}

at::Tensor butterfly_fwd_cuda(const at::Tensor& tw_, const at::Tensor& x_, bool inc) {
  BDims d = bcheck(tw_, x_);
  c10::cuda::CUDAGuard guard(x_.device());
  auto tw = tw_.contiguous(), x = x_.contiguous();
  auto out = at::empty_like(x);
  if (d.rows == 0) return out;
  const int threads = (int)std::min<int64_t>(kThreads, std::max<int64_t>(32, d.n / 2));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterfly_fwd_cuda", [&] {
    bfly_fwd_kernel<scalar_t><<<(unsigned)d.rows, threads, d.n * sizeof(scalar_t),
                                c10::cuda::getCurrentCUDAStream()>>>(
        tw.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), (int)d.nstacks, (int)d.nf, (int)d.log_n, inc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> butterfly_bwd_cuda(const at::Tensor& g_, const at::Tensor& tw_,
                                                      const at::Tensor& x_, bool inc) {
  BDims d = bcheck(tw_, x_);
  TORCH_CHECK(g_.sizes() == x_.sizes(), "butterfly_cuda: grad must have x's shape");
  c10::cuda::CUDAGuard guard(x_.device());
  auto tw = tw_.contiguous(), x = x_.contiguous(), g = g_.to(x_.scalar_type()).contiguous();
  auto dx = at::empty_like(x);
  auto dtw = at::zeros_like(tw);
  if (d.rows == 0) return {dtw, dx};
  auto acts = at::empty({d.rows * d.nf * d.n}, x.options());
  const int threads = (int)std::min<int64_t>(kThreads, std::max<int64_t>(32, d.n / 2));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "butterfly_bwd_cuda", [&] {
    bfly_bwd_kernel<scalar_t><<<(unsigned)d.rows, threads, d.n * sizeof(scalar_t),
                                c10::cuda::getCurrentCUDAStream()>>>(
        tw.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        acts.mutable_data_ptr<scalar_t>(), dtw.mutable_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(), (int)d.nstacks, (int)d.nf, (int)d.log_n, inc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dtw, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(monarch_seam, CUDA, m) {
  m.impl("butterfly_fwd", &butterfly_fwd_cuda);
  m.impl("butterfly_bwd", &butterfly_bwd_cuda);
}

}  // namespace monarch_seam
