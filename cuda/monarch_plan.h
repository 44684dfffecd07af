// The CUDA Monarch op as a plan of strided batched GEMMs, shared by monarch_cuda.cu (which launches it)
// and monarch.cpp (which exposes it as monarch_seam::_cuda_plan so that a CPU test can execute the
// exact same plan by emulation: the index algebra is checked on machines without a GPU).
//
// Shapes: x (B, K*P), w1 (K, Q, P), w2 (L, S, R), K*Q == L*R, grad/out (B, L*S).
// Buffers: hp (L, B, R) is h[b, k*Q + q] in the permuted layout hp[l][b][r] with k*Q + q = r*L + l
// (saved by monarch_fwd_h); dh (B, K*Q) is the gradient of h in natural layout.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MS_HD __host__ __device__ __forceinline__
#else
#define MS_HD inline
#endif

namespace monarch_seam {
namespace plan {

struct View {  // element (z, i, j) of a batched operand lives at ptr[z*bs + i*rs + j*cs]
  int64_t bs, rs, cs;
};

// Where C(z, i, j) is stored. Affine (pl == 0): z*bs + i*rs + j*cs. Monarch split (pl > 0): the
// column t = z*pq + j of a (rows x K*Q) result goes to plane t % pl, position t / pl of row i:
// (t % pl)*plane + i*rs + t / pl.
struct Out {
  int64_t bs, rs, cs;
  int64_t pq, pl, plane;
  MS_HD int64_t at(int64_t z, int64_t i, int64_t j) const {
    if (pl > 0) {
      const int64_t t = z * pq + j;
      return (t % pl) * plane + i * rs + t / pl;
    }
    return z * bs + i * rs + j * cs;
  }
};

enum Buf { X = 0, W1, W2, G, HP, DH, OUT, DX, DW1, DW2 };

// C[z] (M x N) = A[z] (M x Kd) @ B[z] (Kd x N) for z < batch, over the buffers named by a, b, c.
struct Gemm {
  int a, b, c;
  int64_t batch, M, N, Kd;
  View av, bv;
  Out cv;
};

struct Dims {
  int64_t B, K, P, Q, L, S, R;
};

inline Out affine(int64_t bs, int64_t rs, int64_t cs) { return Out{bs, rs, cs, 0, 0, 0}; }

// hp[l][b][r] = sum_p x[b, k*P + p] w1[k, q, p] for k*Q + q = r*L + l
inline Gemm stage1(const Dims& d) {
  return Gemm{X, W1, HP, d.K, d.B, d.Q, d.P, View{d.P, d.K * d.P, 1}, View{d.Q * d.P, 1, d.P},
              Out{0, d.R, 0, d.Q, d.L, d.B * d.R}};
}

// out[b, s*L + l] = sum_r hp[l, b, r] w2[l, s, r]
inline Gemm stage2(const Dims& d) {
  return Gemm{HP, W2, OUT, d.L, d.B, d.S, d.R, View{d.B * d.R, d.R, 1}, View{d.S * d.R, 1, d.R},
              affine(1, d.L * d.S, d.L)};
}

// The backward pass, in order (dh is produced by the first and read by the last two).
inline void backward(const Dims& d, Gemm g[4]) {
  const int64_t KP = d.K * d.P, KQ = d.K * d.Q, LS = d.L * d.S;
  // dh[b, r*L + l] = sum_s grad[b, s*L + l] w2[l, s, r]
  g[0] = Gemm{G, W2, DH, d.L, d.B, d.R, d.S, View{1, LS, d.L}, View{d.S * d.R, d.R, 1}, affine(1, KQ, d.L)};
  // dw2[l, s, r] = sum_b grad[b, s*L + l] hp[l, b, r]
  g[1] = Gemm{G, HP, DW2, d.L, d.S, d.R, d.B, View{1, d.L, LS}, View{d.B * d.R, d.R, 1}, affine(d.S * d.R, d.R, 1)};
  // dx[b, k*P + p] = sum_q dh[b, k*Q + q] w1[k, q, p]
  g[2] = Gemm{DH, W1, DX, d.K, d.B, d.P, d.Q, View{d.Q, KQ, 1}, View{d.Q * d.P, d.P, 1}, affine(d.P, KP, 1)};
  // dw1[k, q, p] = sum_b dh[b, k*Q + q] x[b, k*P + p]
  g[3] = Gemm{DH, X, DW1, d.K, d.Q, d.P, d.B, View{d.Q, 1, KQ}, View{d.P, KP, 1}, affine(d.Q * d.P, d.P, 1)};
}

}  // namespace plan
}  // namespace monarch_seam
