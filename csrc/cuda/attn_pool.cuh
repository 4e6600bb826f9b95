// Declarations shared by the parts of the CUDA attention-pooling head (see attn_pool.cu for the
// stages): attn_pool_gemm.cu (class-token gather and the projection GEMMs, stages A and C),
// attn_pool_tokens.cu (the token pass, stage B), attn_pool_combine.cu (merging its chunks) and
// attn_pool.cu (planning and the host entry points). Internal to the CUDA library.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "cuda/cpt_list.h"

namespace jwth {
namespace cuda {
namespace attn {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---- stages A and C (attn_pool_gemm.cu) ------------------------------------------------------------
struct GemmArgs {
  const float* a = nullptr;
  int64_t a_sm = 0, a_sk = 0, a_sb = 0;
  const float* b = nullptr;
  int64_t b_sk = 0, b_sn = 0, b_sb = 0;
  const float* bias = nullptr;
  int64_t bias_sb = 0;
  float* c = nullptr;
  int64_t c_sm = 0, c_sb = 0;
  float* partial = nullptr;  // [splits, batch, M, N] when splits > 1
  int M = 0, N = 0, K = 0, batch = 1, splits = 1, k_per_split = 0;
  float alpha = 1.f;
};

// 64 x 64 output tile per block, 4 x 4 per thread; each k step is two float4 shared-memory reads

// Floats of split-K workspace launch_gemm needs for this shape (0 when it does not split).
int64_t gemm_partial_floats(int64_t M, int64_t N, int64_t K, int64_t batch, int sms);
void launch_gemm(GemmArgs g, float* partial, int sms, cudaStream_t stream);
// out[b, :] (and out2 when not null) = fp32 class token of tile b.
void launch_gather(DType dtype, const void* tokens, int64_t B, int64_t T_, int64_t D, float* out, float* out2,
                   int sms, cudaStream_t stream);

// ---- stage B (attn_pool_tokens.cu, attn_pool_combine.cu) --------------------------------------------
// Thread layout: a block is `hs` head slices x `ct` column threads. A thread owns kHPT = 4 heads and
// the columns ctid + ct * j (j < CPT) of u_h and z_h, in registers. Tokens come in sub-chunks of
// kNS = 8: each thread forms 8 x 4 partial scores over its columns, a warp reduce-scatter leaves
// lane L with the warp's sum of score L (31 shuffles for 32 values instead of 160), and one thread
// per head sums the warps, updates the online softmax and publishes the weights; then every thread
// updates its z columns. kNS * kHPT must equal the warp size for the reduce-scatter.
constexpr int kNS = 8;
constexpr int kHPT = 4;
constexpr int kMaxThreads = 256;
constexpr int kMaxChunks = 64;
static_assert(kNS * kHPT == 32, "reduce-scatter needs one value per lane");

struct TokenPassArgs {
  const void* tokens = nullptr;
  int64_t B = 0, T = 0, D = 0, P = 0, num_prefix = 0;
  int H = 0;
  const float* u = nullptr;  // [B, H, D]
  float* pz = nullptr;       // [B, nchunks, H, D]
  float* pm = nullptr;       // [B, nchunks, H]
  float* pl = nullptr;       // [B, nchunks, H]
  float* scores = nullptr;   // [B, H, P] raw scores, or null
  int ct = 0, hs = 0, hb = 0, nchunks = 0, chunk_tokens = 0;
  int nbuf = 1;               // pipeline stages (token buffers in shared memory), 1..4
  int64_t tok_buf_bytes = 0;  // one sub-chunk buffer, 16-byte multiple
};

struct TokenPassConfig {
  int cpt = 0, ct = 0, hs = 0, hb = 0, groups = 0, threads = 0;
};

// Grid (tp.groups, args.nchunks, tiles); args.tok_buf_bytes and args.nbuf are set here.
void launch_token_pass(DType dtype, const TokenPassConfig& tp, TokenPassArgs args, cudaStream_t stream, int device);
// z [B, H, D] from the chunk partials; turns the raw scores in attn (if not null) into the softmax.
void launch_combine(const TokenPassArgs& args, float* z, float* attn, cudaStream_t stream);

}  // namespace attn
}  // namespace cuda
}  // namespace jwth
