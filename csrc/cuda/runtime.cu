// Device queries shared by the CUDA kernels and the binding.
#include <map>
#include <mutex>
#include <string>

#include "cuda/api.h"
#include "cuda/check.cuh"

#ifndef JWTH_CUDA_ARCHS_STR
#define JWTH_CUDA_ARCHS_STR "unknown"
#endif

namespace jwth {
namespace cuda {

int device_count() {
  int n = 0;
  // With no driver (a CPU-only machine) this fails with cudaErrorInsufficientDriver or
  // cudaErrorNoDevice; that is "no GPU", not an error, and must not stay as the last error.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string runtime_info() {
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  cudaGetLastError();
  auto fmt = [](int v) { return v ? std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10) : std::string("none"); };
  return "runtime " + fmt(runtime) + " (static), driver " + fmt(driver) + ", archs " JWTH_CUDA_ARCHS_STR;
}

DeviceProps device_props(int device) {
  static std::mutex mu;
  static std::map<int, DeviceProps> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceProps p;
  JWTH_CUDA_CHECK(cudaDeviceGetAttribute(&p.sm_count, cudaDevAttrMultiProcessorCount, device));
  JWTH_CUDA_CHECK(cudaDeviceGetAttribute(&p.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache[device] = p;
  return p;
}

}  // namespace cuda
}  // namespace jwth
