// Shared between the CPU kernels, the CUDA kernels and the binding: element types, the plain
// parameter structs every kernel takes, the workspace layout, and the switch macros that turn
// runtime values into template parameters. Nothing here knows about Python or PyTorch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace jwth {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3, kFloat64 = 4, kOther = 99 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kUInt8: return "uint8";
    case DType::kFloat64: return "float64";
    default: return "unsupported";
  }
}

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kUInt8: return 1;
    case DType::kFloat64: return 8;
    default: return 0;
  }
}

// JWTH attention pooling over one batch of token tensors [B, T, D] laid out as
// [class, R registers, P patches]. Weights are nn.Linear layout [out, in], contiguous fp32 on the
// device of the tokens. The key bias is not an input: q_h . b_k,h is one constant per
// (tile, head) added to every score, which softmax removes exactly.
struct JwthPoolParams {
  const void* tokens = nullptr;
  DType tokens_dtype = DType::kFloat32;
  int64_t B = 0, T = 0, D = 0, P = 0, num_prefix = 0, H = 0, C = 0;
  const float *wq = nullptr, *bq = nullptr, *wk = nullptr, *wv = nullptr, *bv = nullptr;
  const float *wo = nullptr, *bo = nullptr, *wc = nullptr, *bc = nullptr;
  float* logits = nullptr;  // [B, C]
  float* pooled = nullptr;  // [B, D] or null (then kept in the workspace)
  float* attn = nullptr;    // [B, H, P] or null
  float* workspace = nullptr;
  int64_t workspace_floats = 0;
  int num_threads = 0;      // CPU: OpenMP threads, 0 = runtime default
};

// Linear probe: logits = W_c c + b_c on the class token; pooled = the class token in fp32.
struct LinearProbeParams {
  const void* tokens = nullptr;
  DType tokens_dtype = DType::kFloat32;
  int64_t B = 0, T = 0, D = 0, C = 0;
  const float *wc = nullptr, *bc = nullptr;
  float* logits = nullptr;  // [B, C]
  float* pooled = nullptr;  // [B, D] or null
  float* workspace = nullptr;
  int64_t workspace_floats = 0;
  int num_threads = 0;
};

// uint8 HWC tiles [N, in_h, in_w, 3] -> antialiased bilinear resize -> v * scale[c] + shift[c]
// -> [N, 3, out_h, out_w] in dst_dtype. scale = 1 / (255 std), shift = -mean / std, so the affine
// normalisation commutes with the resize (its weights sum to one).
struct PreprocessParams {
  const uint8_t* src = nullptr;
  int64_t N = 0, in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  void* dst = nullptr;
  DType dst_dtype = DType::kFloat32;
  float scale[3] = {1.f, 1.f, 1.f};
  float shift[3] = {0.f, 0.f, 0.f};
  int num_threads = 0;
};

// ---- workspace layout (floats), shared by the size query and the kernels so they cannot disagree.
struct JwthCpuWorkspace {
  int64_t xc = 0, q = 0, u = 0, z = 0, o = 0, pooled = 0, xt = 0, yt = 0, total = 0;
};

inline JwthCpuWorkspace jwth_cpu_workspace(int64_t B, int64_t D, int64_t H, int64_t C) {
  JwthCpuWorkspace w;
  int64_t off = 0;
  w.xc = off; off += B * D;         // class tokens in fp32
  w.q = off; off += B * D;          // q = W_q c + b_q
  w.u = off; off += B * H * D;      // u_h = W_k,h^T q_h / sqrt(d)
  w.z = off; off += B * H * D;      // z_h = sum_i a_hi p_i
  w.o = off; off += B * D;          // o = concat_h(W_v,h z_h + b_v,h)
  w.pooled = off; off += B * D;     // used when the caller did not ask for pooled
  w.xt = off; off += B * D;         // transposed activations for the batched linear layers
  w.yt = off; off += B * (D > C ? D : C);
  w.total = off;
  return w;
}

struct LinearProbeCpuWorkspace {
  int64_t xc = 0, xt = 0, yt = 0, total = 0;
};

inline LinearProbeCpuWorkspace linear_probe_cpu_workspace(int64_t B, int64_t D, int64_t C) {
  LinearProbeCpuWorkspace w;
  int64_t off = 0;
  w.xc = off; off += B * D;
  w.xt = off; off += B * D;
  w.yt = off; off += B * C;
  w.total = off;
  return w;
}

// ---- runtime value -> template parameter ---------------------------------------------------------
#define JWTH_PRIVATE_CASE_TYPE(ENUM, TYPE, ALIAS, ...) \
  case ENUM: {                                         \
    using ALIAS = TYPE;                                \
    __VA_ARGS__();                                     \
    break;                                             \
  }

// Token element types. FP32_T/FP16_T/BF16_T are the storage types of the caller (CPU: float and
// two 16-bit tag types; CUDA: float, __half, __nv_bfloat16).
#define JWTH_DISPATCH_TOKEN_TYPES(DTYPE, FP32_T, FP16_T, BF16_T, ALIAS, WHAT, ...)                    \
  switch (DTYPE) {                                                                                   \
    JWTH_PRIVATE_CASE_TYPE(::jwth::DType::kFloat32, FP32_T, ALIAS, __VA_ARGS__)                      \
    JWTH_PRIVATE_CASE_TYPE(::jwth::DType::kFloat16, FP16_T, ALIAS, __VA_ARGS__)                      \
    JWTH_PRIVATE_CASE_TYPE(::jwth::DType::kBFloat16, BF16_T, ALIAS, __VA_ARGS__)                     \
    default:                                                                                         \
      throw std::invalid_argument(std::string(WHAT) + ": unsupported dtype " +                      \
                                  ::jwth::dtype_name(DTYPE));                                        \
  }

}  // namespace jwth
