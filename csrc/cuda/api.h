// Host entry points of the CUDA kernels. Plain C++ (no CUDA types) so the binding compiles with the
// host compiler; streams travel as the raw cudaStream_t value.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"
#include "cuda/cpt_list.h"  // kMaxDim, the largest D the token pass is instantiated for

namespace jwth {
namespace cuda {

int device_count();           // 0 when there is no driver or no device; never throws
std::string runtime_info();   // runtime and driver versions, compiled architectures

int64_t jwth_workspace_floats(int64_t B, int64_t P, int64_t D, int64_t H, int64_t C, int device);
void jwth_pool(const JwthPoolParams& p, int device, void* stream);

int64_t linear_probe_workspace_floats(int64_t B, int64_t D, int64_t C, int device);
void linear_probe(const LinearProbeParams& p, int device, void* stream);

void preprocess(const PreprocessParams& p, int device, void* stream);

}  // namespace cuda
}  // namespace jwth
