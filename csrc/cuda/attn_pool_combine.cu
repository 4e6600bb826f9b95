// Stage B, second half: merges the token pass's per-chunk partials (flash-decoding style). See
// attn_pool.cu.
#include <algorithm>

#include "cuda/attn_pool.cuh"
#include "cuda/check.cuh"

namespace jwth {
namespace cuda {
namespace attn {
namespace {

// Merges the per-chunk (max, sum, z) of each (tile, head) and normalises; turns the raw scores into
// the exact softmax with the final max and sum.
__global__ void combine_kernel(TokenPassArgs a, float* z, float* attn) {
  __shared__ float w[kMaxChunks];
  __shared__ float m_sh, inv_l_sh;
  const int h = blockIdx.x;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    __syncthreads();  // previous tile's readers of w are done
    if (threadIdx.x == 0) {
      float m = -INFINITY;
      for (int c = 0; c < a.nchunks; ++c) m = fmaxf(m, a.pm[(b * a.nchunks + c) * a.H + h]);
      float l = 0.f;
      for (int c = 0; c < a.nchunks; ++c) {
        const int64_t idx = (b * a.nchunks + c) * a.H + h;
        w[c] = expf(a.pm[idx] - m);
        l += w[c] * a.pl[idx];
      }
      m_sh = m;
      inv_l_sh = 1.f / l;
    }
    __syncthreads();
    const float inv_l = inv_l_sh, m = m_sh;
    for (int64_t col = threadIdx.x; col < a.D; col += blockDim.x) {
      float acc = 0.f;
      for (int c = 0; c < a.nchunks; ++c) acc += w[c] * a.pz[((b * a.nchunks + c) * a.H + h) * a.D + col];
      z[(b * a.H + h) * a.D + col] = acc * inv_l;
    }
    if (attn) {
      for (int64_t i = threadIdx.x; i < a.P; i += blockDim.x) {
        const int64_t idx = (b * a.H + h) * a.P + i;
        attn[idx] = expf(attn[idx] - m) * inv_l;
      }
    }
  }
}

}  // namespace

void launch_combine(const TokenPassArgs& args, float* z, float* attn, cudaStream_t stream) {
  combine_kernel<<<dim3(unsigned(args.H), unsigned(std::min<int64_t>(args.B, 65535))), 256, 0, stream>>>(args, z, attn);
  JWTH_CUDA_LAUNCH_CHECK();
}

}  // namespace attn
}  // namespace cuda
}  // namespace jwth
