// CUDA error handling: every runtime call goes through JWTH_CUDA_CHECK, every launch is followed by
// JWTH_CUDA_LAUNCH_CHECK. Both throw (the binding turns std::runtime_error into RuntimeError) with
// the failing call, file and line, instead of printing and carrying on.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define JWTH_CUDA_CHECK(expr)                                                                      \
  do {                                                                                             \
    const cudaError_t jwth_err_ = (expr);                                                          \
    if (jwth_err_ != cudaSuccess) {                                                                \
      throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(jwth_err_) + " (" +   \
                               cudaGetErrorString(jwth_err_) + ") in `" #expr "` at " __FILE__ ":" + \
                               std::to_string(__LINE__));                                          \
    }                                                                                              \
  } while (0)

// cudaGetLastError also clears a non-sticky launch error, so the next launch starts clean.
#define JWTH_CUDA_LAUNCH_CHECK() JWTH_CUDA_CHECK(cudaGetLastError())

namespace jwth {
namespace cuda {

// Makes `device` current for the runtime inside this module for the guard's lifetime. The module
// links its own static CUDA runtime, whose current device is independent of PyTorch's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    JWTH_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) JWTH_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

struct DeviceProps {
  int sm_count = 0;
  int max_smem_optin = 0;  // bytes of dynamic shared memory one block may ask for
};

DeviceProps device_props(int device);  // cached per device (runtime.cu)

}  // namespace cuda
}  // namespace jwth
