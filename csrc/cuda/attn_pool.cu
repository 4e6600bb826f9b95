// CUDA kernels for the JWTH attention-pooling head and the linear probe.
//
// Same three stages as the CPU path (see cpu/kernels.cpp):
//   A  class tokens -> fp32, q = W_q c + b_q, u_h = W_k,h^T q_h / sqrt(d)      (small GEMMs)
//   B  token pass: each block streams a chunk of one tile's patch tokens through shared memory once
//      (16-byte cp.async copies, double-buffered), computes the H scores per token, keeps an online
//      softmax and z_h = sum_i a_hi p_i in fp32 registers; a combine kernel merges the chunks
//      (flash-decoding style split over tokens, so B = 1..64 tiles still fill the GPU)
//   C  o_h = W_v,h z_h + b_v,h, pooled = W_o o + b_o, logits = W_c pooled + b_c   (small GEMMs)
// Everything runs on the caller's stream; nothing here allocates or synchronises.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "cuda/api.h"
#include "cuda/check.cuh"

namespace jwth {
namespace cuda {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---- a small tiled GEMM for the projections ------------------------------------------------------
// C[m, n] = alpha sum_k A[m, k] B[k, n] (+ bias[n]) with element strides on every operand, batched
// over blockIdx.z (heads) and split over K when the output alone would not fill the GPU. Split
// partials go to a workspace and a second kernel sums them in a fixed order (deterministic).
// They read each weight matrix once per call (16 MB for the four D x D matrices at D = 1024 in fp32,
// against 34-68 MB of tokens at B = 64), so they need to spread over the GPU, not to be clever.
constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 16, kGemmThreads = 256;
constexpr int kGemmPad = 4;  // keeps rows 16-byte aligned for the float4 reads below

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
void launch_gather(const void* tokens, int64_t B, int64_t T_, int64_t D, float* out, float* out2, int sms,
                   cudaStream_t stream) {
  const unsigned blocks = unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(B * D, 256), 4 * int64_t(sms))));
  gather_class_kernel<T><<<blocks, 256, 0, stream>>>(static_cast<const T*>(tokens), B, T_, D, out, out2);
  JWTH_CUDA_LAUNCH_CHECK();
}

// ---- stage B: the token pass ------------------------------------------------------------------------
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

template <int HALF>
__device__ __forceinline__ void reduce_scatter_level(float* v, int lane) {
  const bool upper = (lane & HALF) != 0;
#pragma unroll
  for (int k = 0; k < HALF; ++k) {
    const float send = upper ? v[k] : v[k + HALF];
    const float keep = upper ? v[k + HALF] : v[k];
    v[k] = keep + __shfl_xor_sync(0xffffffffu, send, HALF);
  }
}

template <typename T>
__device__ __forceinline__ void issue_sub_chunk(const T* src, T* dst, int64_t count) {
  constexpr int kVec = 16 / int(sizeof(T));
  if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
    const int64_t nvec = count / kVec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) __pipeline_memcpy_async(dst + v * kVec, src + v * kVec, 16);
    for (int64_t e = nvec * kVec + threadIdx.x; e < count; e += blockDim.x) dst[e] = src[e];
  } else {  // odd D with a 2- or 4-byte type: rows are not 16-byte aligned
    for (int64_t e = threadIdx.x; e < count; e += blockDim.x) dst[e] = src[e];
  }
  __pipeline_commit();
}

// Sub-chunk `s` of a chunk [i_begin, i_end), or an empty commit past its end (keeps the group count).
template <typename T>
__device__ __forceinline__ void issue_or_skip(const T* tile, T* dst, int64_t i_begin, int64_t i_end, int s, int nsub,
                                              int64_t D) {
  if (s < nsub) {
    const int64_t i0 = i_begin + int64_t(s) * kNS;
    issue_sub_chunk(tile + i0 * D, dst, min64(kNS, i_end - i0) * D);
  } else {
    __pipeline_commit();
  }
}

template <typename T, int CPT>
__global__ void __launch_bounds__(kMaxThreads) token_pass_kernel(TokenPassArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* tokbuf = reinterpret_cast<T*>(smem);
  const int wps = a.ct / 32;  // warps per head slice
  float* red = reinterpret_cast<float*>(smem + a.nbuf * a.tok_buf_bytes);  // [hs][wps][32]
  float* probs = red + a.hs * wps * 32;                                    // [hb][kNS]
  float* rescale = probs + a.hb * kNS;                                     // [hb]
  const int64_t buf_elems = a.tok_buf_bytes / int64_t(sizeof(T));

  const int tid = threadIdx.x, lane = tid & 31;
  const int slice = tid / a.ct, ctid = tid % a.ct, wis = ctid / 32;
  const int group = blockIdx.x, chunk = blockIdx.y;
  const int head0 = group * a.hb + slice * kHPT;
  const int64_t D = a.D;
  const int64_t i_begin = int64_t(chunk) * a.chunk_tokens;
  const int64_t i_end = min64(a.P, i_begin + a.chunk_tokens);
  const int nsub = int((i_end - i_begin + kNS - 1) / kNS);

  for (int64_t b = blockIdx.z; b < a.B; b += gridDim.z) {
    const T* tile = static_cast<const T*>(a.tokens) + (b * a.T + a.num_prefix) * D;
    float u[kHPT][CPT], z[kHPT][CPT];
#pragma unroll
    for (int h = 0; h < kHPT; ++h) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int64_t col = ctid + int64_t(a.ct) * j;
        const int head = head0 + h;
        u[h][j] = (col < D && head < a.H) ? a.u[(b * a.H + head) * D + col] : 0.f;
        z[h][j] = 0.f;
      }
    }
    float run_m = -INFINITY, run_l = 0.f;  // meaningful in threads tid < hb (one block head each)

    __syncthreads();  // the previous tile (if any) is done with the buffers
    // Pipeline of `stages` buffers: sub-chunk s lives in buffer s % stages. With two or more, every
    // iteration commits one cp.async group (empty past the end), so "all but the newest stages - 2
    // groups done" means sub-chunk s has landed. One buffer (large D on small-smem GPUs): load,
    // compute, sync, load the next.
    const int stages = a.nbuf;
    if (stages == 1) {
      if (nsub > 0) issue_sub_chunk(tile + i_begin * D, tokbuf, min64(kNS, i_end - i_begin) * D);
    } else {
      for (int st = 0; st < stages - 1; ++st) issue_or_skip(tile, tokbuf + st * buf_elems, i_begin, i_end, st, nsub, D);
    }
    for (int s = 0; s < nsub; ++s) {
      const int buf = s % stages;
      const int64_t i0 = i_begin + int64_t(s) * kNS;
      const int n = int(min64(kNS, i_end - i0));
      switch (stages) {  // cp.async.wait_group takes an immediate
        case 1: case 2: __pipeline_wait_prior(0); break;
        case 3: __pipeline_wait_prior(1); break;
        default: __pipeline_wait_prior(2); break;
      }
      __syncthreads();  // (A) sub-chunk s visible to all; everyone finished sub-chunk s - 1
      if (stages > 1) {
        const int ahead = s + stages - 1;  // its buffer held sub-chunk s - 1, which all threads are done with
        issue_or_skip(tile, tokbuf + (ahead % stages) * buf_elems, i_begin, i_end, ahead, nsub, D);
      }
      const T* x = tokbuf + buf * buf_elems;

      float v[kNS * kHPT];
#pragma unroll
      for (int e = 0; e < kNS * kHPT; ++e) v[e] = 0.f;
#pragma unroll
      for (int i = 0; i < kNS; ++i) {
        if (i < n) {
#pragma unroll
          for (int j = 0; j < CPT; ++j) {
            const int64_t col = ctid + int64_t(a.ct) * j;
            const float xv = col < D ? to_float(x[i * D + col]) : 0.f;
#pragma unroll
            for (int h = 0; h < kHPT; ++h) v[i * kHPT + h] += u[h][j] * xv;
          }
        }
      }
      reduce_scatter_level<16>(v, lane);
      reduce_scatter_level<8>(v, lane);
      reduce_scatter_level<4>(v, lane);
      reduce_scatter_level<2>(v, lane);
      reduce_scatter_level<1>(v, lane);
      red[(slice * wps + wis) * 32 + lane] = v[0];  // lane L holds score (token L / 4, head L % 4)
      __syncthreads();  // (B)

      if (tid < a.hb) {
        const int sl = tid / kHPT, hh = tid % kHPT, head = group * a.hb + tid;
        float sc[kNS];
        float mx = run_m;
#pragma unroll
        for (int i = 0; i < kNS; ++i) {
          float acc = 0.f;
          for (int w = 0; w < wps; ++w) acc += red[(sl * wps + w) * 32 + i * kHPT + hh];
          sc[i] = acc;
          if (i < n) mx = fmaxf(mx, acc);
        }
        const float r = expf(run_m - mx);  // 0 for the first sub-chunk (run_m = -inf)
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < kNS; ++i) {
          const float e = i < n ? expf(sc[i] - mx) : 0.f;
          probs[tid * kNS + i] = e;
          sum += e;
          if (i < n && a.scores && head < a.H) a.scores[(b * a.H + head) * a.P + i0 + i] = sc[i];
        }
        run_l = run_l * r + sum;
        run_m = mx;
        rescale[tid] = r;
      }
      __syncthreads();  // (C)

#pragma unroll
      for (int h = 0; h < kHPT; ++h) {
        const float r = rescale[slice * kHPT + h];
#pragma unroll
        for (int j = 0; j < CPT; ++j) z[h][j] *= r;
      }
#pragma unroll
      for (int i = 0; i < kNS; ++i) {
        if (i < n) {
          float pr[kHPT];
#pragma unroll
          for (int h = 0; h < kHPT; ++h) pr[h] = probs[(slice * kHPT + h) * kNS + i];
#pragma unroll
          for (int j = 0; j < CPT; ++j) {
            const int64_t col = ctid + int64_t(a.ct) * j;
            const float xv = col < D ? to_float(x[i * D + col]) : 0.f;
#pragma unroll
            for (int h = 0; h < kHPT; ++h) z[h][j] += pr[h] * xv;
          }
        }
      }
      if (stages == 1 && s + 1 < nsub) {
        __syncthreads();  // (D) single buffer: everyone is done reading it
        const int64_t i1 = i0 + kNS;
        issue_sub_chunk(tile + i1 * D, tokbuf, min64(kNS, i_end - i1) * D);
      }
    }

    const int64_t part = b * a.nchunks + chunk;
#pragma unroll
    for (int h = 0; h < kHPT; ++h) {
      const int head = head0 + h;
      if (head >= a.H) continue;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int64_t col = ctid + int64_t(a.ct) * j;
        if (col < D) a.pz[(part * a.H + head) * D + col] = z[h][j];
      }
    }
    if (tid < a.hb) {
      const int head = group * a.hb + tid;
      if (head < a.H) {
        a.pm[part * a.H + head] = run_m;
        a.pl[part * a.H + head] = run_l;
      }
    }
  }
}

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

// ---- planning: launch shapes and the workspace layout, one function for the query and the run ------
struct TokenPassConfig {
  int cpt = 0, ct = 0, hs = 0, hb = 0, groups = 0, threads = 0;
};

TokenPassConfig token_pass_config(int64_t D, int64_t H) {
  TokenPassConfig c;
  const int cpts[] = {4, 8, 12, 16};  // keep in sync with JWTH_DISPATCH_CPT
  for (int cpt : cpts) {
    if (ceil_div(D, cpt) <= 128) {
      c.cpt = cpt;
      break;
    }
  }
  if (c.cpt == 0) throw std::invalid_argument("tokens: D = " + std::to_string(D) + " exceeds " + std::to_string(kMaxDim) +
                                              ", the largest the CUDA token-pass kernel supports");
  c.ct = int(round_up(ceil_div(D, c.cpt), 32));
  c.hs = int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(H, kHPT), kMaxThreads / c.ct)));
  c.hb = kHPT * c.hs;
  c.groups = int(ceil_div(H, c.hb));
  c.threads = c.hs * c.ct;
  return c;
}

#define JWTH_DISPATCH_CPT(CPT_VALUE, NAME, ...)                               \
  switch (CPT_VALUE) {                                                        \
    case 4: { constexpr int NAME = 4; __VA_ARGS__(); break; }                 \
    case 8: { constexpr int NAME = 8; __VA_ARGS__(); break; }                 \
    case 12: { constexpr int NAME = 12; __VA_ARGS__(); break; }               \
    case 16: { constexpr int NAME = 16; __VA_ARGS__(); break; }               \
    default: throw std::logic_error("token pass: no kernel for this column count"); \
  }

struct JwthPlan {
  TokenPassConfig tp;
  int sms = 0, nchunks = 0, chunk_tokens = 0;
  int64_t xc = 0, q = 0, u = 0, pz = 0, pm = 0, pl = 0, z = 0, o = 0, pooled = 0, partial = 0, total = 0;
};

JwthPlan make_jwth_plan(int64_t B, int64_t P, int64_t D, int64_t H, int64_t C, int device) {
  JwthPlan p;
  p.tp = token_pass_config(D, H);
  p.sms = device_props(device).sm_count;
  // About two blocks per SM over (head groups x chunks x tiles); chunks of whole sub-chunks.
  const int64_t want = ceil_div(2 * int64_t(p.sms), std::max<int64_t>(1, B * p.tp.groups));
  const int64_t max_chunks = std::min<int64_t>(kMaxChunks, ceil_div(P, kNS));
  const int64_t nchunks = std::max<int64_t>(1, std::min(want, max_chunks));
  p.chunk_tokens = int(round_up(ceil_div(P, nchunks), kNS));
  p.nchunks = int(ceil_div(P, p.chunk_tokens));
  const int64_t d = D / H;
  int64_t off = 0;
  p.xc = off; off += B * D;
  p.q = off; off += B * D;
  p.u = off; off += B * H * D;
  p.pz = off; off += B * p.nchunks * H * D;
  p.pm = off; off += B * p.nchunks * H;
  p.pl = off; off += B * p.nchunks * H;
  p.z = off; off += B * H * D;
  p.o = off; off += B * D;
  p.pooled = off; off += B * D;
  p.partial = off;
  int64_t partial = 0;
  partial = std::max(partial, gemm_partial_floats(B, D, D, 1, p.sms));  // q, pooled
  partial = std::max(partial, gemm_partial_floats(B, D, d, H, p.sms));  // u
  partial = std::max(partial, gemm_partial_floats(B, d, D, H, p.sms));  // o
  partial = std::max(partial, gemm_partial_floats(B, C, D, 1, p.sms));  // logits
  off += partial;
  p.total = off;
  return p;
}

template <typename T>
void launch_token_pass(const JwthPlan& plan, TokenPassArgs args, cudaStream_t stream, int device) {
  args.tok_buf_bytes = round_up(int64_t(kNS) * args.D * int64_t(sizeof(T)), 16);
  const int wps = plan.tp.ct / 32;
  const int64_t small = (int64_t(plan.tp.hs) * wps * 32 + int64_t(plan.tp.hb) * kNS + plan.tp.hb) * 4;
  const int64_t limit = device_props(device).max_smem_optin;
  // Up to four stages: with ~1 block per SM (u and z live in registers) the bytes in flight per SM
  // come from the pipeline depth, not from occupancy.
  args.nbuf = int(std::max<int64_t>(1, std::min<int64_t>(4, (limit - small) / args.tok_buf_bytes)));
  const int64_t smem = args.nbuf * args.tok_buf_bytes + small;
  if (smem > limit)
    throw std::invalid_argument("tokens: D = " + std::to_string(args.D) + " needs " + std::to_string(smem) +
                                " bytes of shared memory per block; this GPU allows " + std::to_string(limit));
  const dim3 grid(unsigned(plan.tp.groups), unsigned(plan.nchunks), unsigned(std::min<int64_t>(args.B, 65535)));
  JWTH_DISPATCH_CPT(plan.tp.cpt, CPT, [&] {
    auto kernel = token_pass_kernel<T, CPT>;
    // The device's opt-in maximum, not this call's size: another thread may launch the same
    // kernel with a larger D between this call's attribute change and its launch.
    JWTH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit)));
    kernel<<<grid, plan.tp.threads, size_t(smem), stream>>>(args);
    JWTH_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace

int64_t jwth_workspace_floats(int64_t B, int64_t P, int64_t D, int64_t H, int64_t C, int device) {
  DeviceGuard guard(device);
  return make_jwth_plan(B, P, D, H, C, device).total;
}

void jwth_pool(const JwthPoolParams& p, int device, void* stream_handle) {
  if (p.B == 0) return;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t B = p.B, D = p.D, H = p.H, C = p.C, d = D / H;
  const JwthPlan plan = make_jwth_plan(B, p.P, D, H, C, device);
  if (p.workspace_floats < plan.total)
    throw std::invalid_argument("workspace: " + std::to_string(p.workspace_floats) + " floats given, " +
                                std::to_string(plan.total) + " needed");
  float* w = p.workspace;
  float *xc = w + plan.xc, *q = w + plan.q, *u = w + plan.u, *z = w + plan.z, *o = w + plan.o;
  float* partial = w + plan.partial;
  float* pooled = p.pooled ? p.pooled : w + plan.pooled;

  JWTH_DISPATCH_TOKEN_TYPES(p.tokens_dtype, float, __half, __nv_bfloat16, T, "tokens", [&] {
    launch_gather<T>(p.tokens, B, p.T, D, xc, nullptr, plan.sms, stream);
  });

  GemmArgs g;  // q = W_q c + b_q
  g.a = xc; g.a_sm = D; g.a_sk = 1;
  g.b = p.wq; g.b_sk = 1; g.b_sn = D;
  g.bias = p.bq; g.c = q; g.c_sm = D;
  g.M = int(B); g.N = int(D); g.K = int(D);
  launch_gemm(g, partial, plan.sms, stream);

  g = GemmArgs();  // u_h = W_k,h^T q_h / sqrt(d), one batch entry per head
  g.a = q; g.a_sm = D; g.a_sk = 1; g.a_sb = d;
  g.b = p.wk; g.b_sk = D; g.b_sn = 1; g.b_sb = d * D;
  g.c = u; g.c_sm = H * D; g.c_sb = D;
  g.M = int(B); g.N = int(D); g.K = int(d); g.batch = int(H);
  g.alpha = 1.f / std::sqrt(float(d));
  launch_gemm(g, partial, plan.sms, stream);

  TokenPassArgs args;
  args.tokens = p.tokens; args.B = B; args.T = p.T; args.D = D; args.P = p.P; args.num_prefix = p.num_prefix;
  args.H = int(H); args.u = u;
  args.pz = w + plan.pz; args.pm = w + plan.pm; args.pl = w + plan.pl; args.scores = p.attn;
  args.ct = plan.tp.ct; args.hs = plan.tp.hs; args.hb = plan.tp.hb;
  args.nchunks = plan.nchunks; args.chunk_tokens = plan.chunk_tokens;
  JWTH_DISPATCH_TOKEN_TYPES(p.tokens_dtype, float, __half, __nv_bfloat16, T, "tokens", [&] {
    launch_token_pass<T>(plan, args, stream, device);
  });
  combine_kernel<<<dim3(unsigned(H), unsigned(std::min<int64_t>(B, 65535))), 256, 0, stream>>>(args, z, p.attn);
  JWTH_CUDA_LAUNCH_CHECK();

  g = GemmArgs();  // o_h = W_v,h z_h + b_v,h
  g.a = z; g.a_sm = H * D; g.a_sk = 1; g.a_sb = D;
  g.b = p.wv; g.b_sk = 1; g.b_sn = D; g.b_sb = d * D;
  g.bias = p.bv; g.bias_sb = d;
  g.c = o; g.c_sm = D; g.c_sb = d;
  g.M = int(B); g.N = int(d); g.K = int(D); g.batch = int(H);
  launch_gemm(g, partial, plan.sms, stream);

  g = GemmArgs();  // pooled = W_o o + b_o
  g.a = o; g.a_sm = D; g.a_sk = 1;
  g.b = p.wo; g.b_sk = 1; g.b_sn = D;
  g.bias = p.bo; g.c = pooled; g.c_sm = D;
  g.M = int(B); g.N = int(D); g.K = int(D);
  launch_gemm(g, partial, plan.sms, stream);

  g = GemmArgs();  // logits = W_c pooled + b_c
  g.a = pooled; g.a_sm = D; g.a_sk = 1;
  g.b = p.wc; g.b_sk = 1; g.b_sn = D;
  g.bias = p.bc; g.c = p.logits; g.c_sm = C;
  g.M = int(B); g.N = int(C); g.K = int(D);
  launch_gemm(g, partial, plan.sms, stream);
}

int64_t linear_probe_workspace_floats(int64_t B, int64_t D, int64_t C, int device) {
  DeviceGuard guard(device);
  return B * D + gemm_partial_floats(B, C, D, 1, device_props(device).sm_count);
}

void linear_probe(const LinearProbeParams& p, int device, void* stream_handle) {
  if (p.B == 0) return;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int sms = device_props(device).sm_count;
  const int64_t need = p.B * p.D + gemm_partial_floats(p.B, p.C, p.D, 1, sms);
  if (p.workspace_floats < need)
    throw std::invalid_argument("workspace: " + std::to_string(p.workspace_floats) + " floats given, " +
                                std::to_string(need) + " needed");
  float* xc = p.workspace;
  JWTH_DISPATCH_TOKEN_TYPES(p.tokens_dtype, float, __half, __nv_bfloat16, T, "tokens", [&] {
    launch_gather<T>(p.tokens, p.B, p.T, p.D, xc, p.pooled, sms, stream);
  });
  GemmArgs g;
  g.a = xc; g.a_sm = p.D; g.a_sk = 1;
  g.b = p.wc; g.b_sk = 1; g.b_sn = p.D;
  g.bias = p.bc; g.c = p.logits; g.c_sm = p.C;
  g.M = int(p.B); g.N = int(p.C); g.K = int(p.D);
  launch_gemm(g, p.workspace + p.B * p.D, sms, stream);
}

}  // namespace cuda
}  // namespace jwth
