// Stages A and C of the attention-pooling head: class tokens -> fp32, and the small projection
// GEMMs (q, u, o, pooled, logits). See attn_pool.cu.
#include <algorithm>

#include "cuda/attn_pool.cuh"
#include "cuda/check.cuh"

namespace jwth {
namespace cuda {
namespace attn {
namespace {

// C[m, n] = alpha sum_k A[m, k] B[k, n] (+ bias[n]) with element strides on every operand, batched
// over blockIdx.z (heads) and split over K when the output alone would not fill the GPU. Split
// partials go to a workspace and a second kernel sums them in a fixed order (deterministic).
// They read each weight matrix once per call (16 MB for the four D x D matrices at D = 1024 in fp32,
// against 34-68 MB of tokens at B = 64), so they need to spread over the GPU, not to be clever.
constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 16, kGemmThreads = 256;
constexpr int kGemmPad = 4;  // keeps rows 16-byte aligned for the float4 reads below

// (one broadcast) for 16 FMAs. Tiles are filled along whichever operand dimension is contiguous in
// global memory, so both the nn.Linear layout ([out, in]) and row-major operands load coalesced.
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(GemmArgs g) {
  __shared__ __align__(16) float As[kGemmBK][kGemmBM + kGemmPad];
  __shared__ __align__(16) float Bs[kGemmBK][kGemmBN + kGemmPad];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int m0 = blockIdx.y * kGemmBM, n0 = blockIdx.x * kGemmBN;
  const int batch = blockIdx.z % g.batch, split = blockIdx.z / g.batch;
  const int k_begin = split * g.k_per_split;
  const int k_end = min(g.K, k_begin + g.k_per_split);
  const float* A = g.a + batch * g.a_sb;
  const float* B = g.b + batch * g.b_sb;
  float acc[4][4] = {};
  for (int k0 = k_begin; k0 < k_end; k0 += kGemmBK) {
#pragma unroll
    for (int q = 0; q < (kGemmBM * kGemmBK) / kGemmThreads; ++q) {
      const int e = tid + kGemmThreads * q;
      int mm, kk;
      if (g.a_sk == 1) { kk = e % kGemmBK; mm = e / kGemmBK; } else { mm = e % kGemmBM; kk = e / kGemmBM; }
      const int gm = m0 + mm, gk = k0 + kk;
      As[kk][mm] = (gm < g.M && gk < k_end) ? A[gm * g.a_sm + gk * g.a_sk] : 0.f;
    }
#pragma unroll
    for (int q = 0; q < (kGemmBN * kGemmBK) / kGemmThreads; ++q) {
      const int e = tid + kGemmThreads * q;
      int nn, kk;
      if (g.b_sk == 1) { kk = e % kGemmBK; nn = e / kGemmBK; } else { nn = e % kGemmBN; kk = e / kGemmBN; }
      const int gn = n0 + nn, gk = k0 + kk;
      Bs[kk][nn] = (gn < g.N && gk < k_end) ? B[gk * g.b_sk + gn * g.b_sn] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmBK; ++kk) {
      const float4 a4 = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b4 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float a[4] = {a4.x, a4.y, a4.z, a4.w};
      const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * b[c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int m = m0 + ty * 4 + r;
    if (m >= g.M) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int n = n0 + tx * 4 + c;
      if (n >= g.N) continue;
      if (g.splits == 1) {
        float v = g.alpha * acc[r][c];
        if (g.bias) v += g.bias[batch * g.bias_sb + n];
        g.c[batch * g.c_sb + int64_t(m) * g.c_sm + n] = v;
      } else {
        g.partial[((int64_t(split) * g.batch + batch) * g.M + m) * g.N + n] = acc[r][c];
      }
    }
  }
}

__global__ void gemm_reduce_kernel(GemmArgs g) {
  const int64_t total = int64_t(g.batch) * g.M * g.N;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int n = int(idx % g.N);
    const int m = int((idx / g.N) % g.M);
    const int batch = int(idx / (int64_t(g.M) * g.N));
    float s = 0.f;
    for (int split = 0; split < g.splits; ++split) s += g.partial[int64_t(split) * total + idx];
    float v = g.alpha * s;
    if (g.bias) v += g.bias[batch * g.bias_sb + n];
    g.c[batch * g.c_sb + int64_t(m) * g.c_sm + n] = v;
  }
}

// Splits K until the grid has about two blocks per SM (at most 16 splits, at least 128 k each).
int gemm_splits(int64_t M, int64_t N, int64_t K, int64_t batch, int sms) {
  const int64_t tiles = ceil_div(M, kGemmBM) * ceil_div(N, kGemmBN) * batch;
  const int64_t want = ceil_div(2 * int64_t(sms), tiles);
  const int64_t limit = std::max<int64_t>(1, std::min<int64_t>(16, K / 128));
  const int64_t splits = std::max<int64_t>(1, std::min(want, limit));
  const int64_t per = round_up(ceil_div(K, splits), kGemmBK);
  return int(ceil_div(K, per));
}

}  // namespace

int64_t gemm_partial_floats(int64_t M, int64_t N, int64_t K, int64_t batch, int sms) {
  const int s = gemm_splits(M, N, K, batch, sms);
  return s > 1 ? int64_t(s) * batch * M * N : 0;
}

void launch_gemm(GemmArgs g, float* partial, int sms, cudaStream_t stream) {
  g.splits = gemm_splits(g.M, g.N, g.K, g.batch, sms);
  g.k_per_split = int(round_up(ceil_div(g.K, g.splits), kGemmBK));
  g.partial = partial;
  const dim3 grid(unsigned(ceil_div(g.N, kGemmBN)), unsigned(ceil_div(g.M, kGemmBM)), unsigned(g.batch * g.splits));
  gemm_kernel<<<grid, kGemmThreads, 0, stream>>>(g);
  JWTH_CUDA_LAUNCH_CHECK();
  if (g.splits > 1) {
    const int64_t total = int64_t(g.batch) * g.M * g.N;
    const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(total, 256), 4 * int64_t(sms)));
    gemm_reduce_kernel<<<blocks, 256, 0, stream>>>(g);
    JWTH_CUDA_LAUNCH_CHECK();
  }
}

namespace {

// ---- class tokens -> fp32 -------------------------------------------------------------------------
template <typename T>
__global__ void gather_class_kernel(const T* tokens, int64_t B, int64_t T_, int64_t D, float* out, float* out2) {
  const int64_t total = B * D;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / D, k = idx % D;
    const float v = to_float(tokens[b * T_ * D + k]);
    out[idx] = v;
    if (out2) out2[idx] = v;
  }
}

template <typename T>
void launch_gather_typed(const void* tokens, int64_t B, int64_t T_, int64_t D, float* out, float* out2, int sms,
                         cudaStream_t stream) {
  const unsigned blocks = unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(B * D, 256), 4 * int64_t(sms))));
  gather_class_kernel<T><<<blocks, 256, 0, stream>>>(static_cast<const T*>(tokens), B, T_, D, out, out2);
  JWTH_CUDA_LAUNCH_CHECK();
}

}  // namespace

void launch_gather(DType dtype, const void* tokens, int64_t B, int64_t T_, int64_t D, float* out, float* out2,
                   int sms, cudaStream_t stream) {
  JWTH_DISPATCH_TOKEN_TYPES(dtype, float, __half, __nv_bfloat16, T, "tokens", [&] {
    launch_gather_typed<T>(tokens, B, T_, D, out, out2, sms, stream);
  });
}

}  // namespace attn
}  // namespace cuda
}  // namespace jwth
