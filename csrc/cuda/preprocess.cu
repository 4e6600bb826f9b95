// Fused tile preprocessing on the GPU: uint8 HWC -> antialiased bilinear resize -> normalise ->
// fp32/fp16/bf16 NCHW in one kernel, so the host->device copy moves uint8 (4x less than fp32) and
// the float image is written once.
//
// One thread per output pixel (all three channels). The separable antialiased filter of torch's
// interpolate(mode="bilinear", antialias=True) is applied as a 2-D sum over the window; its taps
// are recomputed per thread in fp32 (cheaper than a table; weights differ from the float64
// reference only in rounding, and a tap whose inclusion could differ has weight ~0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/api.h"
#include "cuda/check.cuh"

namespace jwth {
namespace cuda {
namespace {

struct PreArgs {
  const uint8_t* src = nullptr;
  void* dst = nullptr;
  int64_t N = 0;
  int in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  float sx = 1.f, sy = 1.f;  // input / output
  float scale[3], shift[3];
};

__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float triangle(float x) { return fmaxf(0.f, 1.f - fabsf(x)); }

struct Window {
  int begin, end;
  float center, inv, total;
};

// Same window and weights as torch's _compute_weights_aa: support = max(scale, 1), taps
// [int(center - support + 0.5), int(center + support + 0.5)) clipped to the image.
__device__ __forceinline__ Window make_window(int i, float scale, int in_size) {
  Window w;
  const float support = scale >= 1.f ? scale : 1.f;
  w.inv = scale >= 1.f ? 1.f / scale : 1.f;
  w.center = scale * (float(i) + 0.5f);
  w.begin = max(int(w.center - support + 0.5f), 0);
  w.end = min(int(w.center + support + 0.5f), in_size);
  w.total = 0.f;
  for (int j = w.begin; j < w.end; ++j) w.total += triangle((float(j) - w.center + 0.5f) * w.inv);
  return w;
}

template <typename OutT>
__global__ void resize_normalize_kernel(PreArgs a) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y;
  if (x >= a.out_w) return;
  const Window wx = make_window(x, a.sx, a.in_w);
  const Window wy = make_window(y, a.sy, a.in_h);
  const float norm = (wx.total != 0.f && wy.total != 0.f) ? 1.f / (wx.total * wy.total) : 0.f;
  const int64_t plane = int64_t(a.out_h) * a.out_w;
  OutT* dst = static_cast<OutT*>(a.dst);
  for (int64_t n = blockIdx.z; n < a.N; n += gridDim.z) {
    const uint8_t* img = a.src + n * a.in_h * int64_t(a.in_w) * 3;
    float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f;
    for (int yy = wy.begin; yy < wy.end; ++yy) {
      const float wyv = triangle((float(yy) - wy.center + 0.5f) * wy.inv);
      if (wyv == 0.f) continue;
      const uint8_t* row = img + int64_t(yy) * a.in_w * 3;
      float r0 = 0.f, r1 = 0.f, r2 = 0.f;
      for (int xx = wx.begin; xx < wx.end; ++xx) {
        const float wxv = triangle((float(xx) - wx.center + 0.5f) * wx.inv);
        const uint8_t* px = row + xx * 3;
        r0 += wxv * float(px[0]);
        r1 += wxv * float(px[1]);
        r2 += wxv * float(px[2]);
      }
      acc0 += wyv * r0;
      acc1 += wyv * r1;
      acc2 += wyv * r2;
    }
    const int64_t o = n * 3 * plane + int64_t(y) * a.out_w + x;
    store_out(dst + o, acc0 * norm * a.scale[0] + a.shift[0]);
    store_out(dst + o + plane, acc1 * norm * a.scale[1] + a.shift[1]);
    store_out(dst + o + 2 * plane, acc2 * norm * a.scale[2] + a.shift[2]);
  }
}

// Input already at the model size: normalise and convert only.
template <typename OutT>
__global__ void normalize_kernel(PreArgs a) {
  const int64_t plane = int64_t(a.out_h) * a.out_w;
  const int64_t total = a.N * plane;
  OutT* dst = static_cast<OutT*>(a.dst);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = idx / plane, e = idx % plane;
    const uint8_t* px = a.src + idx * 3;
    const int64_t o = n * 3 * plane + e;
    store_out(dst + o, float(px[0]) * a.scale[0] + a.shift[0]);
    store_out(dst + o + plane, float(px[1]) * a.scale[1] + a.shift[1]);
    store_out(dst + o + 2 * plane, float(px[2]) * a.scale[2] + a.shift[2]);
  }
}

template <typename OutT>
void launch(const PreArgs& a, cudaStream_t stream, int sms) {
  if (a.in_h == a.out_h && a.in_w == a.out_w) {
    const int64_t total = a.N * a.out_h * int64_t(a.out_w);
    const unsigned blocks = unsigned(std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 8 * int64_t(sms))));
    normalize_kernel<OutT><<<blocks, 256, 0, stream>>>(a);
    JWTH_CUDA_LAUNCH_CHECK();
    return;
  }
  const dim3 grid(unsigned((a.out_w + 127) / 128), unsigned(a.out_h), unsigned(std::min<int64_t>(a.N, 65535)));
  resize_normalize_kernel<OutT><<<grid, 128, 0, stream>>>(a);
  JWTH_CUDA_LAUNCH_CHECK();
}

}  // namespace

void preprocess(const PreprocessParams& p, int device, void* stream_handle) {
  if (p.N == 0) return;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  PreArgs a;
  a.src = p.src;
  a.dst = p.dst;
  a.N = p.N;
  a.in_h = int(p.in_h); a.in_w = int(p.in_w); a.out_h = int(p.out_h); a.out_w = int(p.out_w);
  a.sx = float(double(p.in_w) / double(p.out_w));
  a.sy = float(double(p.in_h) / double(p.out_h));
  for (int c = 0; c < 3; ++c) {
    a.scale[c] = p.scale[c];
    a.shift[c] = p.shift[c];
  }
  const int sms = device_props(device).sm_count;
  switch (p.dst_dtype) {
    case DType::kFloat32: launch<float>(a, stream, sms); break;
    case DType::kFloat16: launch<__half>(a, stream, sms); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(a, stream, sms); break;
    default: throw std::invalid_argument(std::string("dst: unsupported dtype ") + dtype_name(p.dst_dtype));
  }
}

}  // namespace cuda
}  // namespace jwth
