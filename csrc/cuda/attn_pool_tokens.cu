// Stage B of the attention-pooling head: the token pass (layout and pipeline below), one kernel per
// token type and per entry of JWTH_TOKEN_PASS_CPTS. See attn_pool.cu.
#include <cuda_pipeline.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/attn_pool.cuh"
#include "cuda/check.cuh"

namespace jwth {
namespace cuda {
namespace attn {
namespace {

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

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

// Calls f(std::integral_constant<int, CPT>) for the runtime cpt: one case per JWTH_TOKEN_PASS_CPTS entry.
template <typename F>
void dispatch_cpt(int cpt, F&& f) {
  switch (cpt) {
#define JWTH_CPT_CASE_(CPT)                  \
  case CPT:                                  \
    f(std::integral_constant<int, CPT>());   \
    return;
    JWTH_TOKEN_PASS_CPTS(JWTH_CPT_CASE_)
#undef JWTH_CPT_CASE_
    default:
      throw std::logic_error("token pass: no kernel for this column count");
  }
}

template <typename T>
void launch_token_pass_typed(const TokenPassConfig& tp, TokenPassArgs args, cudaStream_t stream, int device) {
  args.tok_buf_bytes = round_up(int64_t(kNS) * args.D * int64_t(sizeof(T)), 16);
  const int wps = tp.ct / 32;
  const int64_t small = (int64_t(tp.hs) * wps * 32 + int64_t(tp.hb) * kNS + tp.hb) * 4;
  const int64_t limit = device_props(device).max_smem_optin;
  // Up to four stages: with ~1 block per SM (u and z live in registers) the bytes in flight per SM
  // come from the pipeline depth, not from occupancy.
  args.nbuf = int(std::max<int64_t>(1, std::min<int64_t>(4, (limit - small) / args.tok_buf_bytes)));
  const int64_t smem = args.nbuf * args.tok_buf_bytes + small;
  if (smem > limit)
    throw std::invalid_argument("tokens: D = " + std::to_string(args.D) + " needs " + std::to_string(smem) +
                                " bytes of shared memory per block; this GPU allows " + std::to_string(limit));
  const dim3 grid(unsigned(tp.groups), unsigned(args.nchunks), unsigned(std::min<int64_t>(args.B, 65535)));
  dispatch_cpt(tp.cpt, [&](auto cpt) {
    auto kernel = token_pass_kernel<T, decltype(cpt)::value>;
    // The device's opt-in maximum, not this call's size: another thread may launch the same
    // kernel with a larger D between this call's attribute change and its launch.
    JWTH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit)));
    kernel<<<grid, tp.threads, size_t(smem), stream>>>(args);
    JWTH_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace

void launch_token_pass(DType dtype, const TokenPassConfig& tp, TokenPassArgs args, cudaStream_t stream, int device) {
  JWTH_DISPATCH_TOKEN_TYPES(dtype, float, __half, __nv_bfloat16, T, "tokens", [&] {
    launch_token_pass_typed<T>(tp, args, stream, device);
  });
}

}  // namespace attn
}  // namespace cuda
}  // namespace jwth
